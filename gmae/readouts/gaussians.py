"""Readout `gaussians`: the Gaussians themselves -- their xy centres, sized and coloured by opacity, and their render.

Scored by `gmae eval-zeroshot` on generated data (dead-leaves, sprites) by the
depth metrics (:mod:`gmae.evaluate.depth`): does each Gaussian's depth follow
the occlusion order of the object it sits on, and do the objects' depths
(object ordering accuracy, OOA)? Beside them, the same metrics for priors
computed on the same Gaussians: border distance, and visible size (larger
nearer, and reversed), and chance: the
expected scores of a depth order drawn at random
(:data:`gmae.evaluate.depth.RANDOM_ORDER`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .record import Readout, Scorer

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from ..render.gaussians import Gaussians
    from .core import Canvas

__all__ = ["OPACITY_SPREAD", "READOUT", "gaussians_figure"]

OPACITY_SPREAD = 0.05  # opacities within this of each other encode nothing worth a colour scale


def gaussians_figure(image: torch.Tensor, means: torch.Tensor, opacities: torch.Tensor, render: torch.Tensor,
                     colors: torch.Tensor | None = None, cell: float = 2.4) -> Figure:
    """Input, the xy centres of the Gaussians, their render.

    The centres are sized and coloured by opacity; when all opacities are
    within OPACITY_SPREAD of each other that says nothing, so the panel says
    so instead and colours each centre by its Gaussian's colour (if given).
    means (K, 3) world units (x, y in (-1, 1), y down); opacities (K,); colors (K, 3).
    """
    from matplotlib.figure import Figure

    from ..viz.figures import show, to_numpy_image

    fig = Figure(figsize=(cell * 3 + 0.6, cell + 0.5), dpi=100)
    ax_in, ax_sc, ax_re = fig.subplots(1, 3)
    show(ax_in, to_numpy_image(image), "input")
    show(ax_re, to_numpy_image(render), "render")
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


# --------------------------------------------------------------------------- the record


def _compute(g: Gaussians, canvas: Canvas, options):
    """The Gaussians and their render, all of them."""
    import torch

    from .core import render_subsets

    return g, render_subsets(g, torch.ones(1, g.num, dtype=torch.bool, device=g.means.device), canvas)[0]


def _save(image, computed, path):
    from ..viz.figures import save_figure

    g, render = computed
    return save_figure(gaussians_figure(image, g.means[0], g.opacities[0], render[0, 0], g.colors[0]), path)


def _predict(g: Gaussians, canvas: Canvas, sides: list[int]) -> list[tuple]:
    """Each image's Gaussians as numpy: means (K, 3), opacities (K,), and screen means (K, 2) and conics (K, 3) in
    units of the image width, so that they fit any square alike."""
    from ..render.camera import project

    size = canvas.width
    # Where the renderer puts them: with the model's pixel convention too (legacy gsplat's is one pixel off).
    means2d, conics, _ = project(canvas.settings.camera, g.means, g.scales, g.quats, canvas.height, size,
                                 pixel_origin=canvas.settings.pixel_origin)
    return [(g.means[i].float().cpu().numpy(), g.opacities[i].float().cpu().numpy(),
             (means2d[i] / size).float().cpu().numpy(), (conics[i] * size**2).float().cpu().numpy())
            for i in range(len(sides))]


#: The depth metrics' priors (keys of `gmae.evaluate.depth.depth_metrics`) -> their rows in eval-zeroshot.
PRIOR_ROWS = {"border_prior": "border prior", "size_prior": "size prior", "size_prior_reversed": "reverse size prior"}


def _score(predictions: dict[str, list], truths: list, **_) -> dict:
    from ..evaluate.depth import RANDOM_ORDER, depth_metrics

    depth = depth_metrics(predictions["gmae"], truths)
    priors = {row: depth.pop(key) for key, row in PRIOR_ROWS.items()}
    chance = {key: value for key, value in RANDOM_ORDER.items() if key in depth}
    return {"gmae": depth, **priors, "random order": chance}



READOUT = Readout(
    name="gaussians",
    summary="scatter of the Gaussians' xy centres, sized and coloured by opacity",
    compute=_compute,
    save=_save,
    scorer=Scorer(
        truth="depth",
        predict=_predict,
        score=_score,
        columns=(("depth_rank_spearman", "depth rho"), ("depth_pair_acc", "depth pairs"),
                 ("depth_pair_acc_touching", "touching"), ("depth_ooa", "depth OOA")),
    ),
)
