"""Figures: the reconstruction grid, and the pieces every figure is drawn with (the readouts' too).

Figures are laid out like the paper's (input first). Every save function
writes one PNG and returns its path; the object API of matplotlib is used so
that no display backend is needed. matplotlib is imported where a figure is
drawn, not with this module, so that training runs where it is not installed
(a bare GPU machine): :func:`figures_unavailable` says why none can be drawn. Each readout draws its own figure
(:mod:`gmae.readouts`) with :func:`show`, :func:`picture_row` and :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model.vit import patchify, unpatchify

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figures_unavailable() -> str | None:
    """Why no figure can be drawn here (matplotlib does not import), or None when one can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib does not import ({exc})"
    return None


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
    from matplotlib.figure import Figure  # the object API needs no display backend

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
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (its folder made if needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def show(ax, picture: np.ndarray, title: str) -> None:
    """One panel: `picture` ((H, W, 3) or (H, W) grey, in [0, 1]) titled, without axes."""
    ax.imshow(picture, interpolation="nearest", cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def picture_row(fig_or_subfig, pictures: list[np.ndarray], titles: list[str], columns: int | None = None) -> None:
    """One row of pictures, centred in a grid of `columns` equal cells (default: one per picture)."""
    columns = columns or len(pictures)
    grid = fig_or_subfig.add_gridspec(1, columns)
    first = (columns - len(pictures)) // 2
    for i, (picture, title) in enumerate(zip(pictures, titles)):
        show(fig_or_subfig.add_subplot(grid[0, first + i]), picture, title)


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
