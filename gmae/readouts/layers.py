"""Readout `layers`: renders of the K nearest Gaussians, and each depth layer alone (the paper's Figs. 4-5).

Rule (the paper gives it in words only; the order is the authors' code's,
``limit_gaussian_z``: z ascending, the first K kept): the near-to-far list
(:func:`gmae.readouts.core.near_to_far`) is cut into ``l`` equal consecutive
groups (sizes differ by at most one when l does not divide k); layer 1 (index
0) is the nearest group, layer l the farthest. Partial renders add the
Gaussians near to far: the K nearest for each K of :data:`PARTIAL_COUNTS`
below k, then all k. Under the authors' camera z moves only through on-screen
size, so the nearest are the large, low-frequency blobs and detail comes last.

Like every readout module, nothing here imports torch until it computes (see
:mod:`gmae.readouts.record`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.choices import positive_int
from .record import Flag, Readout

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from ..render.gaussians import Gaussians
    from .core import Canvas

__all__ = ["PARTIAL_COUNTS", "READOUT", "layers", "layers_figure", "partial_renders"]

PARTIAL_COUNTS = (32, 64, 128, 256, 512, 1024)  # the paper's K; "all" is always added


def partial_renders(g: Gaussians, canvas: Canvas, counts=PARTIAL_COUNTS) -> tuple[list[int], torch.Tensor]:
    """Renders of the K nearest Gaussians (the first K of the near-to-far list) for each K in counts below k,
    then all k.

    -> (the K used, images (B, len(K), C, H, W)).
    """
    import torch

    from .core import render_subsets

    k = g.num
    used = [c for c in counts if 0 < c < k] + [k]
    keep = torch.arange(k, device=g.means.device) < torch.tensor(used, device=g.means.device).unsqueeze(1)
    return used, render_subsets(g, keep, canvas)[0]


def layers(g: Gaussians, canvas: Canvas, num_layers: int = 8, cumulative: bool = False):
    """Each of num_layers equal groups of the depth-ordered list g rendered alone (or, when cumulative,
    view i = groups 0..i together).

    g near to far (as :func:`gmae.readouts.core.gaussians_of` gives it): group 0 is the nearest, cumulative
    view i the i + 1 nearest groups. -> images (B, l, C, H, W), alpha (B, l, H, W).
    """
    import torch

    from .core import group_ids, render_subsets

    group = group_ids(g.num, num_layers, g.means.device)
    layer = torch.arange(num_layers, device=g.means.device).unsqueeze(1)
    keep = group <= layer if cumulative else group == layer  # (l, K)
    return render_subsets(g, keep, canvas)


def layers_figure(image: torch.Tensor, counts: list[int], partial: torch.Tensor, layer_images: torch.Tensor,
                  cell: float = 1.6) -> Figure:
    """Top: the input, then renders of the K nearest Gaussians (farther ones added left to right);
    bottom: each depth layer alone, near (left) to far (right). Only panels with a picture are drawn.

    image (C, H, W); partial (len(counts), C, H, W); layer_images (l, C, H, W), nearest first.
    """
    from matplotlib.figure import Figure

    from ..viz.figures import picture_row, to_numpy_image

    k, l = counts[-1], layer_images.shape[0]
    columns = max(len(counts) + 1, l)
    fig = Figure(figsize=(cell * columns, 2 * cell + 1.0), dpi=100, layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    top.suptitle(f"partial renders: the K nearest of the {k} Gaussians", fontsize=10)
    picture_row(top, [to_numpy_image(image)] + [to_numpy_image(x) for x in partial],
                ["input"] + [f"K = {c} nearest" if c < k else f"all {k}" for c in counts], columns)
    bottom.suptitle(f"each of {l} depth layers alone ({k // l if k % l == 0 else f'~{k // l}'} Gaussians each), "
                    "near \u2192 far", fontsize=10)
    names = [f"{i + 1} (nearest)" if i == 0 else f"{i + 1} (farthest)" if i == l - 1 else f"{i + 1}" for i in range(l)]
    picture_row(bottom, [to_numpy_image(x) for x in layer_images], [f"layer {n}" for n in names], columns)
    return fig


def _compute(g: Gaussians, canvas: Canvas, options):
    counts, partial = partial_renders(g, canvas)
    layer_images, _ = layers(g, canvas, min(options.layers, g.num))
    return counts, partial, layer_images


def _save(image, computed, path):
    from ..viz.figures import save_figure

    counts, partial, layer_images = computed
    return save_figure(layers_figure(image, counts, partial[0], layer_images[0]), path)


READOUT = Readout(
    name="layers",
    summary="partial renders (the K nearest Gaussians) and each depth layer alone, nearest first",
    compute=_compute,
    save=_save,
    flags=(Flag("--layers", type=positive_int, default=8, help="number of depth layers (default 8)"),),
)
