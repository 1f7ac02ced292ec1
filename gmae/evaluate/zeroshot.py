"""`gmae eval-zeroshot`: score the zero-shot edges and figure-ground against ground truth.

Data (``--data``):

* ``deadleaves``: generated images with exact ground truth, from a seed that
  training does not use by default (``EVAL_SEED``). Edge truth: occlusion
  boundaries (texture edges such as stripes are *not* boundaries). Figure
  truth: the pixels whose visible object is one of the nearer half of the
  leaves (draw-order id > n / 2 of n leaves) -- the generator's analogue of the
  readout's "nearest half of the Gaussians".
  Depth truth: which leaf is visible where, and which leaves' whole shapes
  overlap, for the depth metrics of `gmae.evaluate.depth` (the Gaussians'
  depth order against the occlusion order, beside a border-distance prior).
* ``bsds:ROOT``: BSDS500 (edges; every annotator), ``masks:ROOT``: images with
  binary figure masks (figure-ground).

Geometry: each image's centred square (side = its shorter side) is what is
scored; the model sees it resized to its input size, and its soft edge map
(bilinear) and figure mask (nearest) are resized back to the square, so
predictions and baselines are scored at the ground truth's resolution with the
standard tolerance (0.0075 of the diagonal).

Baselines, computed on the same squares and scored the same way: Sobel
gradient magnitude (scikit-image; in [0, 1], one global threshold sweep),
Canny (scikit-image, default hysteresis; the soft map is the mean of the maps
at sigma 1, 2, 3, 4), and for figure-ground a centred ellipse with the image's
aspect covering half of the square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import zeroshot
from ..errors import GMAEError
from .boundaries import evaluate_boundaries, mean_iou
from ..render.camera import project
from .depth import DepthTruth, depth_metrics

EVAL_SEED = 2024  # dead-leaves images for evaluation; training's default seed is 0
DEFAULT_DEADLEAVES_IMAGES = 200
CANNY_SIGMAS = (1.0, 2.0, 3.0, 4.0)
ELLIPSE_AREA = 0.5


@dataclass
class Item:
    """One scored image: the square crop and its ground truth at the same resolution."""

    name: str
    image: torch.Tensor  # (3, S, S) in [0, 1]
    boundaries: list[np.ndarray] | None  # one (S, S) bool map per annotator
    figure: np.ndarray | None  # (S, S) bool
    depth: DepthTruth | None = None  # occlusion truth at (S, S) (dead-leaves only)


def _centre_square(image: torch.Tensor, *maps: np.ndarray):
    H, W = image.shape[-2:]
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    crop = (slice(top, top + s), slice(left, left + s))
    return image[:, crop[0], crop[1]], [None if m is None else m[crop] for m in maps]


def items(data: str, size: int, num_images: int | None = None) -> tuple[Iterator[Item], int]:
    """(the items of `data`, how many there are)."""
    kind, _, root = data.partition(":")
    if kind in ("deadleaves", "dead-leaves"):
        from ..data import DeadLeaves

        n = num_images or DEFAULT_DEADLEAVES_IMAGES
        source = DeadLeaves(size, seed=EVAL_SEED)

        def generate():
            for i in range(n):
                s = source.sample(i)
                leaves = s.num_objects - 1
                yield Item(f"deadleaves-{i}", s.image, [s.boundaries.numpy()], (s.objects > leaves / 2).numpy(),
                           DepthTruth(s.objects.numpy(), s.overlaps.numpy()))

        return generate(), n
    if kind in ("bsds", "masks") and root:
        from ..data.benchmarks import BSDS500, MaskFolder

        dataset = BSDS500(root) if kind == "bsds" else MaskFolder(root)
        n = len(dataset) if num_images is None else min(num_images, len(dataset))

        def read():
            for i in range(n):
                name, image, truth = dataset[i]
                if kind == "bsds":
                    image, truth = _centre_square(image, *truth)
                    yield Item(name, image, truth, None)
                else:
                    image, (mask,) = _centre_square(image, truth)
                    yield Item(name, image, None, mask)

        return read(), n
    raise GMAEError(f"unknown evaluation data {data!r}: use deadleaves, bsds:ROOT (BSDS500) or masks:ROOT")


# --------------------------------------------------------------------------- baselines


def _grey(image: torch.Tensor) -> np.ndarray:
    from skimage.color import rgb2gray

    return rgb2gray(image.permute(1, 2, 0).numpy().astype(np.float64))


def sobel_edges(image: torch.Tensor) -> np.ndarray:
    from skimage.filters import sobel

    return np.clip(sobel(_grey(image)), 0.0, 1.0)


def canny_edges(image: torch.Tensor) -> np.ndarray:
    from skimage.feature import canny

    grey = _grey(image)
    return np.mean([canny(grey, sigma=s) for s in CANNY_SIGMAS], axis=0)


def ellipse_prior(height: int, width: int, area: float = ELLIPSE_AREA) -> np.ndarray:
    """Centred ellipse with the image's aspect ratio covering `area` of it."""
    y = (np.arange(height) + 0.5) / height - 0.5
    x = (np.arange(width) + 0.5) / width - 0.5
    r2 = area / np.pi  # (x / 1)^2 + (y / 1)^2 <= r^2 in unit-square coordinates has area pi r^2
    return (x[None, :] ** 2 + y[:, None] ** 2) <= r2


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _model_readouts(model, squares: list[torch.Tensor], mask_ratio: float):
    """Soft edges and figure masks of the model, each resized back to its square's size, and the
    Gaussians' (means (K, 3), opacities (K,), screen means (K, 2) and conics (K, 3) in units of the
    image width) as numpy: in those units they fit any square alike."""
    size = model.cfg.img_size
    device = next(model.parameters()).device
    batch = torch.stack([
        F.interpolate(s[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        for s in squares
    ]).clamp(0, 1).to(device)
    canvas = zeroshot.Canvas.of(model)
    g = zeroshot.gaussians_of(model, batch, mask_ratio)
    soft, _ = zeroshot.soft_edges(g, canvas)
    figure, _ = zeroshot.figure_ground(g, canvas)
    means2d, conics, _ = project(canvas.camera, g.means, g.scales, g.quats, size, size)
    out = []
    for i, s in enumerate(squares):
        side = s.shape[-1]
        e = F.interpolate(soft[i][None, None].float().cpu(), size=(side, side), mode="bilinear", align_corners=False)
        m = F.interpolate(figure[i][None, None].float().cpu(), size=(side, side), mode="nearest")
        out.append((e[0, 0].clamp(0, 1).numpy(), m[0, 0].numpy() > 0.5,
                    (g.means[i].float().cpu().numpy(), g.opacities[i].float().cpu().numpy(),
                     (means2d[i] / size).float().cpu().numpy(), (conics[i] * size**2).float().cpu().numpy())))
    return out


def evaluate_zeroshot(model, data: str = "deadleaves", num_images: int | None = None, batch_size: int = 16,
                      mask_ratio: float = 0.0, thresholds: int = 99, progress: bool = True) -> dict:
    """Edge ODS/OIS/AP, figure IoU and (dead-leaves) the depth metrics of `model` and of the baselines
    on `data` (see the module docstring)."""
    from tqdm import tqdm

    stream, n = items(data, model.cfg.img_size, num_images)
    preds = {"gmae": [], "sobel": [], "canny": []}
    figures = {"gmae": [], "ellipse": []}
    edge_truth, figure_truth = [], []
    gaussians, depth_truth = [], []
    pending: list[Item] = []

    # The bar counts images whose readouts are done (a batch at a time), not images read.
    bar = tqdm(total=n, desc="zero-shot readouts", unit="img", disable=not progress, leave=False)

    def flush():
        readouts = _model_readouts(model, [it.image for it in pending], mask_ratio)
        for it, (soft, figure, g) in zip(pending, readouts):
            if it.depth is not None:
                depth_truth.append(it.depth)
                gaussians.append(g)
            if it.boundaries is not None:
                edge_truth.append(it.boundaries)
                preds["gmae"].append(soft)
                preds["sobel"].append(sobel_edges(it.image))
                preds["canny"].append(canny_edges(it.image))
            if it.figure is not None:
                figure_truth.append(it.figure)
                figures["gmae"].append(figure)
                figures["ellipse"].append(ellipse_prior(*it.figure.shape))
        bar.update(len(pending))
        pending.clear()

    with bar:
        for it in stream:
            pending.append(it)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()

    results: dict = {"data": data, "num_images": n, "mask_ratio": mask_ratio}
    methods: dict[str, dict] = {"gmae": {}, "sobel": {}, "canny": {}, "ellipse": {}}  # + "border prior" (depth)
    if edge_truth:
        for name, maps in preds.items():
            scores = evaluate_boundaries(maps, edge_truth, thresholds=thresholds, progress=progress,
                                         desc=f"edges of {name} vs truth")
            methods[name].update(edge_ods=scores["ods"], edge_ois=scores["ois"], edge_ap=scores["ap"])
    if figure_truth:
        for name, masks in figures.items():
            methods[name]["fg_iou"] = mean_iou(masks, figure_truth)
    if depth_truth:
        depth = depth_metrics(gaussians, depth_truth)
        methods["border prior"] = depth.pop("border_prior")
        methods["gmae"].update(depth)
    results.update(methods.pop("gmae"))
    results["baselines"] = {name: scores for name, scores in methods.items() if scores}
    return results


def format_table(results: dict, label: str = "gmae") -> str:
    """A small text table: one row per method, ODS / OIS / AP / figure IoU / depth Spearman / depth pair accuracy."""
    rows = [(label, results)] + list(results["baselines"].items())
    cols = [("edge_ods", "edge ODS"), ("edge_ois", "edge OIS"), ("edge_ap", "edge AP"), ("fg_iou", "figure IoU"),
            ("depth_rank_spearman", "depth rho"), ("depth_pair_acc", "depth pairs"),
            ("depth_pair_acc_touching", "touching")]
    cols = [c for c in cols if any(c[0] in r for _, r in rows)]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{results['data']}, {results['num_images']} images",
             "method".ljust(width) + "".join(title.rjust(12) for _, title in cols)]
    for name, r in rows:
        lines.append(name.ljust(width) + "".join((f"{r[key]:.3f}" if key in r else "-").rjust(12) for key, _ in cols))
    return "\n".join(lines)


__all__ = ["EVAL_SEED", "evaluate_zeroshot", "format_table", "items", "sobel_edges", "canny_edges", "ellipse_prior"]
