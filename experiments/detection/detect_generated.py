#!/usr/bin/env python
"""Detection and instance segmentation on generated images (gmae.evaluate.detection): one fine-tuning run.

ViTDet's Mask R-CNN on a gmae encoder (a file read by gmae.io.loader.load: a run folder, checkpoint,
export or MAE/timm file; or a random encoder of the tiny preset with --random-init), fine-tuned on TRAIN
generated images (seed 0, indices 0...) and scored by COCO AP on VAL others (indices from 10**6), boxes and
masks of every visible object as the ground truth (gmae.evaluate.detection.data.generated_set).

    python experiments/detection/detect_generated.py --data sprites --random-init --steps 300 --threads 1

prints the losses every 10 steps and a JSON line of the results; --out FILE also writes that JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VAL_START = 10**6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["sprites", "deadleaves"], default="sprites")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder file or run folder (gmae.io.loader.load)")
    source.add_argument("--random-init", action="store_true", help="a random encoder of the tiny preset")
    p.add_argument("--class-agnostic", action="store_true", help="one category, object, instead of the shapes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=200, help="held-out images scored")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layer-decay", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning's seed (new layers, batches, flips)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()

    import torch

    from gmae.config import model_config
    from gmae.evaluate.detection.data import generated_set
    from gmae.evaluate.detection.train import DetectionRecipe, train_detector
    from gmae.io.loader import load
    from gmae.model import ViTEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = generated_set(args.data, args.image_size, args.train, seed=0, class_agnostic=args.class_agnostic)
    val = generated_set(args.data, args.image_size, args.val, seed=0, start=VAL_START,
                        class_agnostic=args.class_agnostic)
    print(f"data: {len(train)} + {len(val)} images, {sum(len(t['labels']) for t in train.targets)} train objects, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.random_init:
        torch.manual_seed(args.seed)
        m = model_config("tiny", img_size=args.image_size)
        encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio,
                             input_norm=m.input_norm)
    else:
        encoder = load(args.encoder, "encoder")[0]
    recipe = DetectionRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
                             seed=args.seed, warmup_steps=min(250, args.steps // 12))

    def log(step, losses, lr):
        parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items())
        print(f"step {step:5d}  lr {lr:.2e}  {parts}  {time.perf_counter() - start:.0f} s", flush=True)

    _, results = train_detector(encoder, train, val, recipe, log=log)
    results = {"data": args.data, "class_agnostic": args.class_agnostic,
               "encoder": "random" if args.random_init else args.encoder, **vars(recipe), **results}
    print(json.dumps(results), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
