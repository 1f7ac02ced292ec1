"""Figures: the reconstruction grid (input / masked input / reconstruction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API needs no display backend

from .model.vit import patchify, unpatchify


def to_numpy_image(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [0, 1] -> (H, W, C) float array clipped to [0, 1] (grey for C = 1)."""
    arr = img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def masked_view(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, fill: float = 0.5) -> torch.Tensor:
    """imgs (B, C, H, W) with the masked patches (mask (B, N) == 1) painted grey."""
    patches = patchify(imgs, patch_size)
    patches = torch.where(mask.bool().unsqueeze(-1), torch.full_like(patches, fill), patches)
    return unpatchify(patches, patch_size, imgs.shape[1])


def save_image_grid(rows: list[list[np.ndarray]], titles: list[str], path: str | Path, cell: float = 1.6) -> Path:
    """Save a grid of images (rows of (H, W, 3) arrays) with column titles as a PNG."""
    n_rows, n_cols = len(rows), len(titles)
    fig = Figure(figsize=(cell * n_cols, cell * n_rows), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


@torch.no_grad()
def save_reconstruction_figure(model, imgs: torch.Tensor, path: str | Path, noise: torch.Tensor | None = None,
                               mask_ratio: float | None = None) -> Path:
    """One row per image: input, masked input (what the encoder saw), reconstruction."""
    was_training = model.training
    model.eval()
    ratio = model.cfg.mask_ratio if mask_ratio is None else mask_ratio
    out = model(imgs, noise, mask_ratio=ratio)
    model.train(was_training)
    masked = masked_view(imgs, out.mask, model.cfg.patch_size)
    rows = [
        [to_numpy_image(imgs[i]), to_numpy_image(masked[i]), to_numpy_image(out.image[i])]
        for i in range(imgs.shape[0])
    ]
    name = "render" if model.cfg.model == "gmae" else "reconstruction"
    return save_image_grid(rows, ["input", f"masked {ratio:.0%}", name], path)
