"""Figures: the reconstruction grid and the zero-shot readouts, laid out like the paper's (input first).

Every function writes one PNG and returns its path; the object API of
matplotlib is used so that no display backend is needed.
"""

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


def save_image_grid(rows: list[list[np.ndarray]], titles: list[str] | list[list[str]], path: str | Path,
                    cell: float = 1.6) -> Path:
    """Save a grid of images (rows of (H, W, 3) or (H, W) arrays) as a PNG.

    titles: one list for the columns (shown above the first row) or one list per row.
    Rows may differ in length; missing cells are left blank.
    """
    per_row = bool(titles) and isinstance(titles[0], (list, tuple))
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    fig = Figure(figsize=(cell * n_cols, cell * n_rows + (0.25 * n_rows if per_row else 0)), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(rows[r]):
                continue
            image = rows[r][c]
            ax.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            title = titles[r][c] if per_row else (titles[c] if r == 0 else None)
            if title:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
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


# --------------------------------------------------------------------------- zero-shot readouts


def save_layers_figure(image: torch.Tensor, counts: list[int], partial: torch.Tensor, layer_images: torch.Tensor,
                       path: str | Path) -> Path:
    """Row 1: input, then renders of the first K far-to-near Gaussians; row 2: input, each layer alone.

    image (C, H, W); partial (len(counts), C, H, W); layer_images (l, C, H, W), farthest first.
    """
    k = counts[-1]
    rows = [[to_numpy_image(image)] + [to_numpy_image(x) for x in partial],
            [to_numpy_image(image)] + [to_numpy_image(x) for x in layer_images]]
    l = layer_images.shape[0]
    titles = [["input"] + [f"K={c}" if c < k else f"all {k}" for c in counts],
              ["input"] + [f"layer {i + 1}/{l}" for i in range(l)]]
    return save_image_grid(rows, titles, path)


def save_edges_figure(image: torch.Tensor, per_level: dict[int, torch.Tensor], soft: torch.Tensor,
                      path: str | Path) -> Path:
    """Input, the binary edges at each level l (l@32, l@16, ...: black on white), the soft edge map."""
    row = [to_numpy_image(image)] + [1.0 - e.float().cpu().numpy() for e in per_level.values()]
    row.append(1.0 - soft.float().cpu().numpy())
    titles = ["input"] + [f"l@{level}" for level in per_level] + ["soft edges"]
    return save_image_grid([row], titles, path)


def save_segment_figure(image: torch.Tensor, figure: torch.Tensor, near_render: torch.Tensor,
                        path: str | Path) -> Path:
    """Input, the near Gaussians' render, the figure mask, the input with the ground dimmed."""
    img = to_numpy_image(image)
    fg = figure.cpu().numpy().astype(np.float32)
    overlay = img * (0.25 + 0.75 * fg[..., None])
    row = [img, to_numpy_image(near_render), fg, overlay]
    return save_image_grid([row], ["input", "near Gaussians", "figure", "figure on input"], path)


def save_gaussians_figure(image: torch.Tensor, means: torch.Tensor, opacities: torch.Tensor, render: torch.Tensor,
                          path: str | Path, cell: float = 2.4) -> Path:
    """Input, the xy centres of the Gaussians (size and colour by opacity), their render.

    means (K, 3) world units (x, y in (-1, 1), y down); opacities (K,).
    """
    fig = Figure(figsize=(cell * 3 + 0.6, cell + 0.3), dpi=100)
    ax_in, ax_sc, ax_re = fig.subplots(1, 3)
    for ax, picture, title in ((ax_in, image, "input"), (ax_re, render, "render")):
        ax.imshow(to_numpy_image(picture), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    xy, o = means[:, :2].float().cpu().numpy(), opacities.float().cpu().numpy()
    points = ax_sc.scatter(xy[:, 0], xy[:, 1], s=4 + 40 * o, c=o, cmap="viridis", vmin=0, vmax=1, linewidths=0)
    ax_sc.set_xlim(-1, 1)
    ax_sc.set_ylim(1, -1)  # y down, as in the image
    ax_sc.set_aspect("equal")
    ax_sc.set_xticks([])
    ax_sc.set_yticks([])
    ax_sc.set_title(f"{len(o)} Gaussian centres", fontsize=9)
    fig.colorbar(points, ax=ax_sc, fraction=0.046, pad=0.02, label="opacity")
    fig.tight_layout()
    return _save(fig, path)
