"""Readout `edges`: occlusion edges from depth-layer discontinuities, binary per level and soft (the paper's Fig. 6).

Rule (the paper gives it in words only): edges build up from the **far end**.
The near-to-far list (:func:`gmae.readouts.core.near_to_far`) is read from
its far end (:func:`gmae.readouts.core.from_far_end`) and cut into l groups;
groups 0..i (the i + 1 farthest) are rendered cumulatively for i = 0..l-1,
each new, nearer group composited over the farther ones
(:func:`gmae.readouts.layers.layers`). A pixel's *layer index* (counted from
the far end) is the last i whose group changed it by more than ``threshold``
(max over channels, images in [0, 1]) -- the nearest layer that visibly
changes the pixel; -1 if none did. Edges are
where a pixel's index differs from its right or lower neighbour (the
dead-leaves ground truth's convention, :func:`gmae.data.deadleaves.occlusion_boundaries`).
:func:`soft_edges` averages the binary maps over levels l = 32, 16, 8, 4 and
thresholds 0.05, 0.1, 0.2, so that strong, coarse discontinuities score near 1
and fine or faint ones lower: a map that can be scored at every threshold.

Scored by `gmae eval-zeroshot` with the BSDS500 protocol (ODS, OIS, AP;
:mod:`gmae.evaluate.boundaries`) against occlusion boundaries, beside Sobel
(gradient magnitude in [0, 1], one global threshold sweep) and Canny
(scikit-image, default hysteresis; the soft map is the mean of the maps at
sigma 1, 2, 3, 4) computed on the same images, and an all-zero map (:func:`no_edges`, the
floor: an edge score at or below it finds nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.choices import positive_int
from .layers import layers
from .record import Flag, Readout, Scorer

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from ..render.gaussians import Gaussians
    from .core import Canvas

__all__ = ["EDGE_LEVELS", "EDGE_THRESHOLD", "EDGE_THRESHOLDS", "READOUT", "canny_edges", "edges", "edges_figure",
           "layer_index", "no_edges", "sobel_edges", "soft_edges"]

EDGE_LEVELS = (32, 16, 8, 4)  # the paper's l@32 ... l@4
EDGE_THRESHOLDS = (0.05, 0.1, 0.2)
EDGE_THRESHOLD = 0.1  # the single threshold of the binary edge maps
CANNY_SIGMAS = (1.0, 2.0, 3.0, 4.0)


def layer_index(cumulative: torch.Tensor, background: torch.Tensor | None, threshold: float = EDGE_THRESHOLD):
    """cumulative (B, l, C, H, W) renders of groups 0..i -> (B, H, W) long layer index (-1: none).

    The index of a pixel is the last group whose addition changed it by more than threshold (with
    the groups added from the far end, as :func:`edges` does: the nearest group that shows there).
    """
    import torch

    B, L, C, H, W = cumulative.shape
    if background is None:
        before = cumulative.new_zeros(B, C, H, W)
    else:
        before = background.to(cumulative).view(1, C, 1, 1).expand(B, C, H, W)
    index = torch.full((B, H, W), -1, dtype=torch.long, device=cumulative.device)
    for i in range(L):
        changed = (cumulative[:, i] - before).abs().amax(dim=1) > threshold
        index[changed] = i
        before = cumulative[:, i]
    return index


def edges(g: Gaussians, canvas: Canvas, num_layers: int = 16, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """(B, H, W) bool edges at one level: where neighbouring pixels' layer indices differ.

    g near to far (:func:`gmae.readouts.core.gaussians_of`); the layers are added from its far end.
    """
    from ..data.deadleaves import occlusion_boundaries
    from .core import from_far_end

    cumulative, _ = layers(from_far_end(g), canvas, num_layers, cumulative=True)
    return occlusion_boundaries(layer_index(cumulative, canvas.background, threshold))


def soft_edges(g: Gaussians, canvas: Canvas, levels=EDGE_LEVELS, thresholds=EDGE_THRESHOLDS):
    """-> (soft, per_level): soft (B, H, W) float in [0, 1], the binary edge maps averaged over
    levels x thresholds (levels above k are left out; if all are, l = k is used).

    per_level is {level: (B, H, W) bool edges at EDGE_THRESHOLD} when that threshold is among
    `thresholds` (the paper's per-level figures), else an empty dict.
    """
    from ..data.deadleaves import occlusion_boundaries
    from .core import from_far_end

    levels = [int(level) for level in levels if level <= g.num] or [g.num]
    total, per_level = None, {}
    far_first = from_far_end(g)
    for level in levels:
        cumulative, _ = layers(far_first, canvas, level, cumulative=True)
        for t in thresholds:
            e = occlusion_boundaries(layer_index(cumulative, canvas.background, t))
            total = e.float() if total is None else total + e.float()
            if t == EDGE_THRESHOLD:
                per_level[level] = e
    return total / (len(levels) * len(thresholds)), per_level


def edges_figure(image: torch.Tensor, per_level: dict[int, torch.Tensor], soft: torch.Tensor,
                 cell: float = 1.6) -> Figure:
    """Input, the binary edges with the Gaussians cut into l depth layers for each level l (black on
    white), and the soft edge map (their mean over levels and change thresholds)."""
    from matplotlib.figure import Figure

    from ..viz.figures import picture_row, to_numpy_image

    pictures = [to_numpy_image(image)] + [1.0 - e.float().cpu().numpy() for e in per_level.values()]
    pictures.append(1.0 - soft.float().cpu().numpy())
    titles = ["input"] + [f"{level} layers" for level in per_level] + ["soft: mean of all"]
    fig = Figure(figsize=(cell * len(pictures), cell + 0.6), dpi=100, layout="constrained")
    fig.suptitle("edges (layers added far \u2192 near): where the nearest depth layer that changes a pixel "
                 "differs from its neighbour's",
                 fontsize=10)
    picture_row(fig, pictures, titles)
    return fig


# --------------------------------------------------------------------------- baselines


def _grey(image: torch.Tensor) -> np.ndarray:
    import numpy as np
    from skimage.color import rgb2gray

    return rgb2gray(image.permute(1, 2, 0).numpy().astype(np.float64))


def sobel_edges(image: torch.Tensor) -> np.ndarray:
    """Sobel gradient magnitude of image (3, H, W) in [0, 1] (scikit-image), clipped to [0, 1]."""
    import numpy as np
    from skimage.filters import sobel

    return np.clip(sobel(_grey(image)), 0.0, 1.0)


def canny_edges(image: torch.Tensor) -> np.ndarray:
    """The mean of scikit-image's Canny edges of image (3, H, W) at sigma 1, 2, 3, 4."""
    import numpy as np
    from skimage.feature import canny

    grey = _grey(image)
    return np.mean([canny(grey, sigma=s) for s in CANNY_SIGMAS], axis=0)


def no_edges(shape: tuple[int, int]) -> np.ndarray:
    """An all-zero edge map: the trivial baseline, scored by the same protocol as every other map."""
    import numpy as np

    return np.zeros(shape)


# --------------------------------------------------------------------------- the record


def _compute(g: Gaussians, canvas: Canvas, options):
    return soft_edges(g, canvas, levels=options.levels)


def _save(image, computed, path):
    from ..viz.figures import save_figure

    soft, per_level = computed
    return save_figure(edges_figure(image, {k: v[0] for k, v in per_level.items()}, soft[0]), path)


def _predict(g: Gaussians, canvas: Canvas, sides: list[int]) -> list[np.ndarray]:
    """The soft edge map of each image, resized (bilinear) to its truth's square."""
    import torch.nn.functional as F

    soft, _ = soft_edges(g, canvas)
    return [F.interpolate(soft[i][None, None].float().cpu(), size=(side, side), mode="bilinear",
                          align_corners=False)[0, 0].clamp(0, 1).numpy() for i, side in enumerate(sides)]


def _score(predictions: dict[str, list], truths: list, thresholds: int = 99, progress: bool = True, **_) -> dict:
    from ..evaluate.boundaries import evaluate_boundaries

    scores = {}
    for method, maps in predictions.items():
        s = evaluate_boundaries(maps, truths, thresholds=thresholds, progress=progress,
                                desc=f"edges of {method} vs truth")
        scores[method] = {"edge_ods": s["ods"], "edge_ois": s["ois"], "edge_ap": s["ap"]}
    return scores


READOUT = Readout(
    name="edges",
    summary="edges from depth-layer discontinuities at l = 32, 16, 8, 4 and a soft edge map",
    compute=_compute,
    save=_save,
    flags=(Flag("--levels", type=positive_int, nargs="+", default=[32, 16, 8, 4],
                help="numbers of layers l of the binary edge maps (default 32 16 8 4)"),),
    scorer=Scorer(
        truth="boundaries",
        predict=_predict,
        score=_score,
        baselines={"sobel": lambda item: sobel_edges(item.image), "canny": lambda item: canny_edges(item.image),
                   "no edges": lambda item: no_edges(item.boundaries[0].shape)},
        columns=(("edge_ods", "edge ODS"), ("edge_ois", "edge OIS"), ("edge_ap", "edge AP")),
    ),
)
