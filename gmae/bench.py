"""Benchmarks that report ratios measured inside one run (machines are shared and noisy).

`step_ratio`: GMAE training-step time over MAE training-step time, same encoder,
same batch, same masks. The two are timed interleaved (G, M, G, M, ...) so that
a slow spell of the machine hits both, and medians are compared.
"""

from __future__ import annotations

import statistics
import time

import torch

from .config import model_config
from .model import build_model
from .train import masking_noise, param_groups


def _train_step(model, optimizer, imgs, noise) -> None:
    loss = model(imgs, noise).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_ratio(preset: str = "tiny", batch_size: int = 32, repeats: int = 10, warmup: int = 2,
               device: str = "cpu", seed: int = 0, **overrides) -> dict:
    """Median training-step seconds of GMAE and MAE on one preset and batch, and their ratio."""
    torch.manual_seed(seed)
    models, optims = {}, {}
    for kind in ("gmae", "mae"):
        cfg = model_config(preset, model=kind, **overrides)
        torch.manual_seed(seed)  # same encoder initialisation for both
        models[kind] = build_model(cfg).to(device).train()
        optims[kind] = torch.optim.AdamW(param_groups(models[kind], 0.05), lr=1e-4, betas=(0.9, 0.95))
    size, n = cfg.img_size, cfg.num_patches
    imgs = torch.rand(batch_size, cfg.in_chans, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    noise = masking_noise(seed, 0, batch_size, n).to(device)

    times = {"gmae": [], "mae": []}
    for i in range(warmup + repeats):
        for kind in ("gmae", "mae"):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _train_step(models[kind], optims[kind], imgs, noise)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    gmae_s, mae_s = statistics.median(times["gmae"]), statistics.median(times["mae"])
    return {
        "preset": preset, "batch_size": batch_size, "img_size": size, "num_gaussians": cfg.num_gaussians,
        "device": device, "repeats": repeats,
        "gmae_step_s": gmae_s, "mae_step_s": mae_s, "ratio": gmae_s / mae_s,
        "gmae_imgs_per_s": batch_size / gmae_s, "mae_imgs_per_s": batch_size / mae_s,
    }


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
