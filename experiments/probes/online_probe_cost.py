#!/usr/bin/env python
"""The online probe's cost per pre-training step: the same steps with and without it, interleaved in one process.

The tiny preset's encoder (192 x 6) on digits, batch 16, fp32, one thread: even steps train the model alone, odd
steps also hook the encoder's blocks and take the probe's step (`gmae.train.online_probe_step`), so machine load
falls on both alike. Prints the median step time of each (steps 10-59) and of the probe's step alone.

    python experiments/probes/online_probe_cost.py [IMG_SIZE]     # 32 (default) or 64
"""

import argparse
import time

import numpy as np
import torch

from gmae.runtime import distributed
from gmae.config import model_config, train_config
from gmae.data import SeededStream, build_dataset, source_labels
from gmae.model import build_model, masking_noise, param_groups
from gmae.model.online_probe import OnlineProbe
from gmae.io.runs import autocast
from gmae.train import PretrainTask, online_probe_step
from gmae.train.engine import Engine

BATCH, STEPS, WARM = 16, 60, 10


def main(img: int) -> None:
    torch.set_num_threads(1)
    mcfg = model_config("tiny", img_size=img, patch_size=8, num_gaussians=32 if img == 32 else 128)
    tcfg = train_config("tiny", batch_size=BATCH, data="digits")
    source = build_dataset("digits", img)
    stream = SeededStream(source, 0, labels=source_labels(source, "digits", img))
    ctx, amp = distributed.Context(), autocast("fp32", torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(mcfg)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    probe = OnlineProbe(mcfg.embed_dim, mcfg.depth, 10)
    probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-4, weight_decay=0.0)
    times = {False: [], True: []}
    for step in range(STEPS):
        imgs, labels = zip(*[stream[g] for g in range(step * BATCH, (step + 1) * BATCH)])
        imgs, labels = torch.stack(imgs), torch.tensor(labels)
        noise = masking_noise(0, step, BATCH, mcfg.num_patches)
        on = step % 2 == 1
        if on:
            probe.attach(model.encoder)
        t = time.perf_counter()
        Engine(model, optimizer, tcfg, ctx, lambda s: 1e-4, amp=amp).step(
            PretrainTask(model, optimizer, mcfg, tcfg, ctx, None, (None, None, None), None, None), (imgs, noise))
        if on:
            online_probe_step(probe, probe_optimizer, labels, 1e-4, ctx, BATCH)
        dt = time.perf_counter() - t
        probe.detach_hooks()
        if step >= WARM:
            times[on].append(dt)
    off, on = np.median(times[False]), np.median(times[True])
    print(f"img {img}: median step {off * 1000:.1f} ms without, {on * 1000:.1f} ms with the probe "
          f"({(on / off - 1) * 100:+.1f}%)")
    # The probe's step alone (its features kept by one hooked forward, untimed).
    alone = []
    probe.attach(model.encoder)
    for _ in range(20):
        with torch.no_grad():
            model.encoder(imgs, mcfg.mask_ratio, noise)
        t = time.perf_counter()
        online_probe_step(probe, probe_optimizer, labels, 1e-4, ctx, BATCH)
        alone.append(time.perf_counter() - t)
    probe.detach_hooks()
    print(f"the probe's step alone: median {np.median(alone) * 1000:.2f} ms")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("img_size", nargs="?", type=int, default=32, choices=[32, 64], help="image size (default 32)")
    main(parser.parse_args().img_size)
