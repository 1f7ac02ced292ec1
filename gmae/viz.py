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
#
# Each figure is built by a *_figure function (returning the matplotlib Figure, so that tests can
# read its panels) and written by the save_* function of the same name.

FIGURE_TINT = np.array([1.0, 0.45, 0.0])  # the figure-ground overlay's colour for "figure"
GROUND_DIM = 0.3  # ground pixels keep this share of their brightness


def _show(ax, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture, interpolation="nearest", cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _row(fig_or_subfig, pictures: list[np.ndarray], titles: list[str], columns: int | None = None) -> None:
    """One row of pictures, centred in a grid of `columns` equal cells (default: one per picture)."""
    columns = columns or len(pictures)
    grid = fig_or_subfig.add_gridspec(1, columns)
    first = (columns - len(pictures)) // 2
    for i, (picture, title) in enumerate(zip(pictures, titles)):
        _show(fig_or_subfig.add_subplot(grid[0, first + i]), picture, title)


def layers_figure(image: torch.Tensor, counts: list[int], partial: torch.Tensor, layer_images: torch.Tensor,
                  cell: float = 1.6) -> Figure:
    """Top: the input, then renders of the K farthest Gaussians (nearer ones added left to right);
    bottom: each depth layer alone, far (left) to near (right). Only panels with a picture are drawn.

    image (C, H, W); partial (len(counts), C, H, W); layer_images (l, C, H, W), farthest first.
    """
    k, l = counts[-1], layer_images.shape[0]
    columns = max(len(counts) + 1, l)
    fig = Figure(figsize=(cell * columns, 2 * cell + 1.0), dpi=100, layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    top.suptitle(f"partial renders: the K farthest of the {k} Gaussians", fontsize=10)
    _row(top, [to_numpy_image(image)] + [to_numpy_image(x) for x in partial],
         ["input"] + [f"farthest {c}" if c < k else f"all {k}" for c in counts], columns)
    bottom.suptitle(f"each of {l} depth layers alone ({k // l if k % l == 0 else f'~{k // l}'} Gaussians each), "
                    "far \u2192 near", fontsize=10)
    names = [f"{i + 1} (far)" if i == 0 else f"{i + 1} (near)" if i == l - 1 else f"{i + 1}" for i in range(l)]
    _row(bottom, [to_numpy_image(x) for x in layer_images], [f"layer {n}" for n in names], columns)
    return fig


def save_layers_figure(image: torch.Tensor, counts: list[int], partial: torch.Tensor, layer_images: torch.Tensor,
                       path: str | Path) -> Path:
    """:func:`layers_figure` written to `path`."""
    return _save(layers_figure(image, counts, partial, layer_images), path)


def edges_figure(image: torch.Tensor, per_level: dict[int, torch.Tensor], soft: torch.Tensor,
                 cell: float = 1.6) -> Figure:
    """Input, the binary edges with the Gaussians cut into l depth layers for each level l (black on
    white), and the soft edge map (their mean over levels and change thresholds)."""
    pictures = [to_numpy_image(image)] + [1.0 - e.float().cpu().numpy() for e in per_level.values()]
    pictures.append(1.0 - soft.float().cpu().numpy())
    titles = ["input"] + [f"{level} layers" for level in per_level] + ["soft: mean of all"]
    fig = Figure(figsize=(cell * len(pictures), cell + 0.6), dpi=100, layout="constrained")
    fig.suptitle("edges: where the nearest depth layer that changes a pixel differs from its neighbour's",
                 fontsize=10)
    _row(fig, pictures, titles)
    return fig


def save_edges_figure(image: torch.Tensor, per_level: dict[int, torch.Tensor], soft: torch.Tensor,
                      path: str | Path) -> Path:
    """:func:`edges_figure` written to `path`."""
    return _save(edges_figure(image, per_level, soft), path)


def segment_figure(image: torch.Tensor, figure: torch.Tensor, near_render: torch.Tensor, cell: float = 1.8) -> Figure:
    """Input, the nearest Gaussians rendered alone, and the figure mask over the input: figure tinted
    orange, ground dimmed, with a legend saying so."""
    from matplotlib.patches import Patch

    img = to_numpy_image(image)
    fg = figure.cpu().numpy().astype(bool)
    overlay = np.clip(np.where(fg[..., None], 0.55 * img + 0.45 * FIGURE_TINT, GROUND_DIM * img), 0, 1)
    fig = Figure(figsize=(cell * 3, cell + 0.8), dpi=100, layout="constrained")
    _row(fig, [img, to_numpy_image(near_render), overlay],
         ["input", "nearest Gaussians alone", f"figure: {fg.mean():.0%} of the image"])
    fig.legend(handles=[Patch(facecolor=0.55 + 0.45 * FIGURE_TINT, edgecolor="black", label="figure (tinted)"),
                        Patch(facecolor=(GROUND_DIM / 2,) * 3, edgecolor="black", label="ground (dimmed)")],
               loc="lower right", ncol=2, fontsize=8, frameon=False)
    return fig


def save_segment_figure(image: torch.Tensor, figure: torch.Tensor, near_render: torch.Tensor,
                        path: str | Path) -> Path:
    """:func:`segment_figure` written to `path`."""
    return _save(segment_figure(image, figure, near_render), path)


OPACITY_SPREAD = 0.05  # opacities within this of each other encode nothing worth a colour scale


def gaussians_figure(image: torch.Tensor, means: torch.Tensor, opacities: torch.Tensor, render: torch.Tensor,
                     colors: torch.Tensor | None = None, cell: float = 2.4) -> Figure:
    """Input, the xy centres of the Gaussians, their render.

    The centres are sized and coloured by opacity; when all opacities are
    within OPACITY_SPREAD of each other that says nothing, so the panel says
    so instead and colours each centre by its Gaussian's colour (if given).
    means (K, 3) world units (x, y in (-1, 1), y down); opacities (K,); colors (K, 3).
    """
    fig = Figure(figsize=(cell * 3 + 0.6, cell + 0.5), dpi=100)
    ax_in, ax_sc, ax_re = fig.subplots(1, 3)
    _show(ax_in, to_numpy_image(image), "input")
    _show(ax_re, to_numpy_image(render), "render")
    xy, o = means[:, :2].float().cpu().numpy(), opacities.float().cpu().numpy()
    if o.max() - o.min() < OPACITY_SPREAD:
        rgb = None if colors is None else colors[:, :3].float().cpu().clamp(0, 1).numpy()
        ax_sc.scatter(xy[:, 0], xy[:, 1], s=20, c=rgb if rgb is not None else "tab:blue", edgecolors="black",
                      linewidths=0.3)
        ax_sc.set_title(f"{len(o)} Gaussian centres", fontsize=9)
        ax_sc.set_xlabel(f"all opacities \u2248 {o.mean():.2f} ({o.min():.2f}\u2013{o.max():.2f}), so not shown"
                         + ("\ncolour: each Gaussian's own" if rgb is not None else ""), fontsize=8)
    else:
        points = ax_sc.scatter(xy[:, 0], xy[:, 1], s=4 + 40 * o, c=o, cmap="viridis", vmin=0, vmax=1, linewidths=0)
        ax_sc.set_title(f"{len(o)} Gaussian centres", fontsize=9)
        fig.colorbar(points, ax=ax_sc, fraction=0.046, pad=0.02, label="opacity (also size)")
    ax_sc.set_xlim(-1, 1)
    ax_sc.set_ylim(1, -1)  # y down, as in the image
    ax_sc.set_aspect("equal")
    ax_sc.set_xticks([])
    ax_sc.set_yticks([])
    fig.tight_layout()
    return fig


def save_gaussians_figure(image: torch.Tensor, means: torch.Tensor, opacities: torch.Tensor, render: torch.Tensor,
                          path: str | Path, colors: torch.Tensor | None = None) -> Path:
    """:func:`gaussians_figure` written to `path`."""
    return _save(gaussians_figure(image, means, opacities, render, colors), path)
