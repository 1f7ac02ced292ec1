"""Readout `segment`: figure-ground from the nearest Gaussians (the paper's Fig. 7).

Rule (the paper gives it in words only): figure-ground starts from the **near
end**. A pixel is *figure* where the nearest ``near_fraction`` of the
Gaussians (default 1/2: the first half of the near-to-far list,
:func:`gmae.readouts.core.near_to_far`), rendered alone, cover it with alpha
>= 0.5 -- i.e. the near layers support it more than they let the far layers
through. The one parameter is ``near_fraction``.

Scored by `gmae eval-zeroshot` as the mean IoU with the figure masks
(:func:`gmae.evaluate.boundaries.mean_iou`), beside a centred ellipse with the
image's aspect covering half of it (:func:`ellipse_prior`), and the trivial
"everything is figure" mask (its IoU is the share of figure pixels in the truth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .record import Flag, Readout, Scorer

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from ..render.gaussians import Gaussians
    from .core import Canvas

__all__ = ["ELLIPSE_AREA", "FIGURE_TINT", "GROUND_DIM", "READOUT", "ellipse_prior", "figure_ground", "segment_figure"]

FIGURE_TINT = (1.0, 0.45, 0.0)  # the figure-ground overlay's colour for "figure"
GROUND_DIM = 0.3  # ground pixels keep this share of their brightness
ELLIPSE_AREA = 0.5


def figure_ground(g: Gaussians, canvas: Canvas, near_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Figure mask (B, H, W) bool: alpha >= 0.5 of the nearest near_fraction of the Gaussians.

    g near to far (:func:`gmae.readouts.core.gaussians_of`): the near part is the first
    max(1, round(near_fraction * k)) of the list. Also returns that near render (B, C, H, W) for display.
    """
    import torch

    from ..errors import GMAEError
    from .core import render_subsets

    if not 0.0 < near_fraction < 1.0:
        raise GMAEError(f"near fraction must be in (0, 1); got {near_fraction}")
    k = g.num
    num_near = max(1, round(near_fraction * k))  # the near part: the first num_near of the near-to-far list
    keep = (torch.arange(k, device=g.means.device) < num_near).unsqueeze(0)  # (1, K)
    image, alpha = render_subsets(g, keep, canvas)
    return alpha[:, 0] >= 0.5, image[:, 0]


def segment_figure(image: torch.Tensor, figure: torch.Tensor, near_render: torch.Tensor, cell: float = 1.8) -> Figure:
    """Input, the nearest Gaussians rendered alone, and the figure mask over the input: figure tinted
    orange, ground dimmed, with a legend saying so."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..viz.figures import picture_row, to_numpy_image

    tint = np.array(FIGURE_TINT)
    img = to_numpy_image(image)
    fg = figure.cpu().numpy().astype(bool)
    overlay = np.clip(np.where(fg[..., None], 0.55 * img + 0.45 * tint, GROUND_DIM * img), 0, 1)
    fig = Figure(figsize=(cell * 3, cell + 0.8), dpi=100, layout="constrained")
    picture_row(fig, [img, to_numpy_image(near_render), overlay],
                ["input", "nearest Gaussians alone", f"figure: {fg.mean():.0%} of the image"])
    fig.legend(handles=[Patch(facecolor=0.55 + 0.45 * tint, edgecolor="black", label="figure (tinted)"),
                        Patch(facecolor=(GROUND_DIM / 2,) * 3, edgecolor="black", label="ground (dimmed)")],
               loc="lower right", ncol=2, fontsize=8, frameon=False)
    return fig


def ellipse_prior(height: int, width: int, area: float = ELLIPSE_AREA) -> np.ndarray:
    """Centred ellipse with the image's aspect ratio covering `area` of it."""
    import numpy as np

    y = (np.arange(height) + 0.5) / height - 0.5
    x = (np.arange(width) + 0.5) / width - 0.5
    r2 = area / np.pi  # (x / 1)^2 + (y / 1)^2 <= r^2 in unit-square coordinates has area pi r^2
    return (x[None, :] ** 2 + y[:, None] ** 2) <= r2


# --------------------------------------------------------------------------- the record


def _compute(g: Gaussians, canvas: Canvas, options):
    return figure_ground(g, canvas, options.near_fraction)


def _save(image, computed, path):
    from ..viz.figures import save_figure

    figure, near = computed
    return save_figure(segment_figure(image, figure[0], near[0]), path)


def _predict(g: Gaussians, canvas: Canvas, sides: list[int]) -> list[np.ndarray]:
    """The figure mask of each image, resized (nearest) to its truth's square."""
    import torch.nn.functional as F

    figure, _ = figure_ground(g, canvas)
    return [F.interpolate(figure[i][None, None].float().cpu(), size=(side, side), mode="nearest")[0, 0].numpy() > 0.5
            for i, side in enumerate(sides)]


def _score(predictions: dict[str, list], truths: list, **_) -> dict:
    from ..evaluate.boundaries import mean_iou

    return {method: {"fg_iou": mean_iou(masks, truths)} for method, masks in predictions.items()}


READOUT = Readout(
    name="segment",
    summary="figure-ground: where the nearest Gaussians cover the image",
    compute=_compute,
    save=_save,
    flags=(Flag("--near-fraction", type=float, default=0.5,
                help="share of the Gaussians, nearest first, that make the figure (default 0.5)"),),
    scorer=Scorer(
        truth="figure",
        predict=_predict,
        score=_score,
        baselines={"ellipse": lambda item: ellipse_prior(*item.figure.shape),
                   "all figure": lambda item: item.figure | True},  # every pixel figure
        columns=(("fg_iou", "figure IoU"),),
    ),
)
