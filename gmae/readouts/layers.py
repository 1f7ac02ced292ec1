"""Readout `layers`: renders of the K farthest Gaussians, and each depth layer alone (the paper's Figs. 4-5).

Rule (the paper gives it in words only): the far-to-near list is cut into
``l`` equal consecutive groups (sizes differ by at most one when l does not
divide k); layer 0 is the farthest. Partial renders add the Gaussians far to
near: the first K of the list for each K of :data:`PARTIAL_COUNTS` below k,
then all k.

Like every readout module, nothing here imports torch until it computes (see
:mod:`gmae.readouts.record`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..choices import positive_int
from .record import Flag, Readout

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from ..render.gaussians import Gaussians
    from .core import Canvas

__all__ = ["PARTIAL_COUNTS", "READOUT", "layers", "layers_figure", "partial_renders"]

PARTIAL_COUNTS = (32, 64, 128, 256, 512, 1024)  # the paper's K; "all" is always added


def partial_renders(g: Gaussians, canvas: Canvas, counts=PARTIAL_COUNTS) -> tuple[list[int], torch.Tensor]:
    """Renders of the first K far-to-near Gaussians for each K in counts below k, then all k.

    -> (the K used, images (B, len(K), C, H, W)).
    """
    import torch

    from .core import render_subsets

    k = g.num
    used = [c for c in counts if 0 < c < k] + [k]
    keep = torch.arange(k, device=g.means.device) < torch.tensor(used, device=g.means.device).unsqueeze(1)
    return used, render_subsets(g, keep, canvas)[0]


def layers(g: Gaussians, canvas: Canvas, num_layers: int = 8, cumulative: bool = False):
    """Each of num_layers equal far-to-near groups rendered alone (or groups 0..i when cumulative).

    -> images (B, l, C, H, W), alpha (B, l, H, W); layer 0 is the farthest.
    """
    import torch

    from .core import group_ids, render_subsets

    group = group_ids(g.num, num_layers, g.means.device)
    layer = torch.arange(num_layers, device=g.means.device).unsqueeze(1)
    keep = group <= layer if cumulative else group == layer  # (l, K)
    return render_subsets(g, keep, canvas)


def layers_figure(image: torch.Tensor, counts: list[int], partial: torch.Tensor, layer_images: torch.Tensor,
                  cell: float = 1.6) -> Figure:
    """Top: the input, then renders of the K farthest Gaussians (nearer ones added left to right);
    bottom: each depth layer alone, far (left) to near (right). Only panels with a picture are drawn.

    image (C, H, W); partial (len(counts), C, H, W); layer_images (l, C, H, W), farthest first.
    """
    from matplotlib.figure import Figure

    from ..viz import picture_row, to_numpy_image

    k, l = counts[-1], layer_images.shape[0]
    columns = max(len(counts) + 1, l)
    fig = Figure(figsize=(cell * columns, 2 * cell + 1.0), dpi=100, layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    top.suptitle(f"partial renders: the K farthest of the {k} Gaussians", fontsize=10)
    picture_row(top, [to_numpy_image(image)] + [to_numpy_image(x) for x in partial],
                ["input"] + [f"farthest {c}" if c < k else f"all {k}" for c in counts], columns)
    bottom.suptitle(f"each of {l} depth layers alone ({k // l if k % l == 0 else f'~{k // l}'} Gaussians each), "
                    "far \u2192 near", fontsize=10)
    names = [f"{i + 1} (far)" if i == 0 else f"{i + 1} (near)" if i == l - 1 else f"{i + 1}" for i in range(l)]
    picture_row(bottom, [to_numpy_image(x) for x in layer_images], [f"layer {n}" for n in names], columns)
    return fig


def _compute(g: Gaussians, canvas: Canvas, options):
    counts, partial = partial_renders(g, canvas)
    layer_images, _ = layers(g, canvas, min(options.layers, g.num))
    return counts, partial, layer_images


def _save(image, computed, path):
    from ..viz import save_figure

    counts, partial, layer_images = computed
    return save_figure(layers_figure(image, counts, partial[0], layer_images[0]), path)


READOUT = Readout(
    name="layers",
    summary="partial renders (first K far-to-near Gaussians) and each depth layer alone",
    compute=_compute,
    save=_save,
    flags=(Flag("--layers", type=positive_int, default=8, help="number of depth layers (default 8)"),),
)
