#!/usr/bin/env python
"""Fine-tuning on the scene probes' point tasks (front, figure): GMAE vs MAE vs random init (docs/evaluation.md).

The frozen probes of `gmae probe --data sprites` cannot separate pre-trained from random encoders at this scale,
and `gmae finetune` takes image-level tasks only (count, shape). This script fine-tunes an encoder on a *point*
task: the encoder's patch tokens at the marked points (gmae.data.scenes: ``front`` two points, ``figure`` one),
after the classifier's ``fc_norm``, concatenated into a linear head. Everything else is `gmae finetune`'s default
recipe (gmae.config.FinetuneConfig: 5 epochs of batch 32, lr 1e-3 = blr 8e-3 x 32 / 256, one warmup epoch then
cosine to 1e-6, AdamW betas (0.9, 0.999), weight decay 0.05, layer decay 0.75, drop path 0.1, label smoothing
0.1), except augmentation: none (a flip would move the marked points). Train / val are the scene probes' splits
(seeds 3001 / 3002, 2000 / 1000 images; images without a valid point pair are left out).

    python experiments/probes/point_finetune.py --runs runs/probe --data sprites --task front --threads 1   # every seed
    python experiments/probes/point_finetune.py --runs runs/probe --data sprites --table

Runs are RUNS/{gmae,mae}-DATA-sSEED (experiments/probes/scene_probes.py trains them); random init is the GMAE run's
architecture at its initial weights (the encoder is built first, so MAE's run of the same seed starts from the
same encoder). Each result is written to RUN/ft-point-TASK[-init].json and skipped when it exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gmae.config import FinetuneConfig
from gmae.data.scenes import scene_labels, task_targets
from gmae.model import param_groups
from gmae.model.classifier import ViTClassifier
from gmae.io.loader import load
from gmae.io.runs import learning_rate

POINT_TASKS = ("front", "figure")
TRAIN, VAL = 2000, 1000


class PointClassifier(ViTClassifier):
    """MAE's fine-tuning ViT whose head reads the (fc_norm'ed) patch tokens at P marked points, concatenated."""

    def __init__(self, encoder, num_classes: int, points: int, drop_path: float):
        super().__init__(encoder, num_classes, drop_path, "avg")
        dim = self.cls_token.shape[-1]
        self.head = nn.Linear(dim * points, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W) in [0, 1], points (B, P) patch indices -> logits (B, classes)."""
        tokens = self.fc_norm(self.forward_tokens(imgs)[:, 1:])  # (B, N, D)
        picked = tokens[torch.arange(len(imgs))[:, None], points]  # (B, P, D)
        return self.head(picked.flatten(1))


def task_data(data: str, task: str, split: str, img_size: int, patch_size: int, images: int, classes=None):
    """(images (n, C, H, W), points (n, P), labels (n,)) of the images where ``task`` has a valid label."""
    labels = scene_labels(data, split, img_size, patch_size, images, progress=False)
    y = torch.from_numpy(task_targets(task, labels, labels)[0])
    points = torch.from_numpy(labels.front_points if task == "front" else labels.figure_point[:, None])
    keep = torch.nonzero(y >= 0).flatten()
    source = labels.source()
    imgs = torch.stack([source.load(int(i)) for i in keep])
    return imgs, points[keep], y[keep]


def finetune_points(encoder, mcfg, task: str, data: str, seed: int) -> dict:
    cfg = FinetuneConfig(seed=seed)
    train = task_data(data, task, "train", mcfg.img_size, mcfg.patch_size, TRAIN)
    val = task_data(data, task, "val", mcfg.img_size, mcfg.patch_size, VAL)
    cfg = cfg.resolved(len(train[2]))
    torch.manual_seed(seed)  # the head's initial weights and the batches' order
    model = PointClassifier(encoder, 2, train[1].shape[1], cfg.drop_path)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=0.0, betas=cfg.betas)
    n, step, t0 = len(train[2]), 0, time.time()
    model.train()
    while step < cfg.steps:
        perm = torch.randperm(n)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):  # whole batches, cfg.steps in all
            if step == cfg.steps:
                break
            idx = perm[start : start + cfg.batch_size]
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss = F.cross_entropy(model(train[0][idx], train[1][idx]), train[2][idx], label_smoothing=cfg.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val[0][s : s + 256], val[1][s : s + 256]).argmax(1) for s in range(0, len(val[2]), 256)])
    majority = torch.bincount(train[2], minlength=2).argmax()
    return {"task": task, "data": data, "seed": seed, "val_acc": (pred == val[2]).float().mean().item(),
            "chance": (val[2] == majority).float().mean().item(), "steps": cfg.steps, "num_train": n,
            "num_val": len(val[2]), "final_loss": loss.item(), "seconds": round(time.time() - t0, 1)}


def table(runs: Path, data: str, seeds: int) -> str:
    rows = ["| data | task (fine-tuned) | GMAE | MAE | random init | chance | seeds |", "|---|---|---:|---:|---:|---:|---:|"]
    for task in POINT_TASKS:
        cols, chance, counts = [], None, []
        for model, suffix in (("gmae", ""), ("mae", ""), ("gmae", "-init")):
            found = []
            for s in range(seeds):
                f = runs / f"{model}-{data}-s{s}" / f"ft-point-{task}{suffix}.json"
                if f.exists():
                    r = json.loads(f.read_text())
                    found.append(100 * r["val_acc"])
                    chance = 100 * r["chance"]
            counts.append(str(len(found)))
            cols.append("–" if not found else f"{found[0]:.1f}" if len(found) == 1 else
                        f"{statistics.mean(found):.1f} ± {statistics.stdev(found):.1f}")
        if chance is not None:
            rows.append(f"| {data} | {task} | {' | '.join(cols)} | {chance:.1f} | {'/'.join(counts)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/probe")
    p.add_argument("--data", default="sprites", choices=["sprites", "deadleaves"])
    p.add_argument("--task", action="append", choices=POINT_TASKS, help="default: both")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if args.table:
        print(table(runs, args.data, args.seeds))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    for task in args.task or POINT_TASKS:
        for seed in range(args.seeds):
            for model, initial in (("gmae", False), ("mae", False), ("gmae", True)):
                run = runs / f"{model}-{args.data}-s{seed}"
                out = run / f"ft-point-{task}{'-init' if initial else ''}.json"
                if out.exists() or not run.exists():
                    continue
                net, mcfg, _ = load(run, "model", initial=initial)
                result = {"run": str(run), "initial": initial, **finetune_points(net.encoder, mcfg, task, args.data, seed)}
                out.write_text(json.dumps(result, indent=1))
                print(f"{out}: {100 * result['val_acc']:.1f}% ({result['seconds']} s)", flush=True)
    print(table(runs, args.data, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
