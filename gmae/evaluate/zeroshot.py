"""`gmae eval-zeroshot`: every registered readout that has a scorer, scored against ground truth.

The readouts and how each is scored (its truth, its baselines, its metrics)
are records of :mod:`gmae.readouts`; this module supplies the scored images
and their truth, runs the model over them in batches, and gathers the scores:
edges (BSDS ODS/OIS/AP, beside Sobel and Canny), figure-ground (IoU, beside a
centred ellipse) and, on dead-leaves, the depth order (beside a border prior).

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
scored; the model sees it resized to its input size, and each readout's
prediction is resized back to the square (the soft edge map bilinearly, the
figure mask nearest), so predictions and baselines are scored at the ground
truth's resolution with the standard tolerance (0.0075 of the diagonal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GMAEError
from ..readouts import READOUTS
from ..readouts.core import Canvas, gaussians_of
from .depth import DepthTruth

EVAL_SEED = 2024  # dead-leaves images for evaluation; training's default seed is 0
DEFAULT_DEADLEAVES_IMAGES = 200


@dataclass
class Item:
    """One scored image: the square crop and its ground truth at the same resolution (each readout's
    scorer names the field it is scored against)."""

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


# --------------------------------------------------------------------------- evaluation


def scored_readouts() -> list:
    """The registered readouts that have a scorer, in registry order (the order of the scores)."""
    return [r for r in READOUTS.values() if r.scorer is not None]


@torch.no_grad()
def _model_gaussians(model, squares: list[torch.Tensor], mask_ratio: float):
    """The squares resized to the model's input, and the model's Gaussians of them (near to far) and canvas."""
    size = model.cfg.img_size
    device = next(model.parameters()).device
    batch = torch.stack([
        F.interpolate(s[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        for s in squares
    ]).clamp(0, 1).to(device)
    return gaussians_of(model, batch, mask_ratio), Canvas.of(model)


def evaluate_zeroshot(model, data: str = "deadleaves", num_images: int | None = None, batch_size: int = 16,
                      mask_ratio: float = 0.0, thresholds: int = 99, progress: bool = True) -> dict:
    """The scores of every scored readout of `model` and of its baselines on `data` (see the module
    docstring): edge ODS/OIS/AP, figure IoU and (dead-leaves) the depth metrics."""
    from tqdm import tqdm

    stream, n = items(data, model.cfg.img_size, num_images)
    scored = scored_readouts()
    # per readout: its predictions {method: [one per image]} and truths, for the images that have its truth
    predictions = {r.name: {"gmae": [], **{name: [] for name in r.scorer.baselines}} for r in scored}
    truths: dict[str, list] = {r.name: [] for r in scored}
    pending: list[Item] = []

    # The bar counts images whose readouts are done (a batch at a time), not images read.
    bar = tqdm(total=n, desc="zero-shot readouts", unit="img", disable=not progress, leave=False)

    def flush():
        squares = [it.image for it in pending]
        g, canvas = _model_gaussians(model, squares, mask_ratio)
        for r in scored:
            has = [getattr(it, r.scorer.truth) is not None for it in pending]
            if not any(has):
                continue
            with torch.no_grad():
                predicted = r.scorer.predict(g, canvas, [s.shape[-1] for s in squares])
            for it, prediction, wanted in zip(pending, predicted, has):
                if wanted:
                    truths[r.name].append(getattr(it, r.scorer.truth))
                    predictions[r.name]["gmae"].append(prediction)
                    for name, baseline in r.scorer.baselines.items():
                        predictions[r.name][name].append(baseline(it))
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
    methods: dict[str, dict] = {"gmae": {}}  # then each baseline, in the order the scorers name them
    for r in scored:
        if truths[r.name]:
            scores = r.scorer.score(predictions[r.name], truths[r.name], thresholds=thresholds, progress=progress)
            for method, values in scores.items():
                methods.setdefault(method, {}).update(values)
    results.update(methods.pop("gmae"))
    results["baselines"] = {name: scores for name, scores in methods.items() if scores}
    return results


def format_scores(results: dict, label: str = "gmae") -> str:
    """A small text table: one row per method, one column per score of the scored readouts (edge ODS / OIS / AP,
    figure IoU, depth Spearman, depth pair accuracy, ...)."""
    rows = [(label, results)] + list(results["baselines"].items())
    cols = [column for r in scored_readouts() for column in r.scorer.columns]
    cols = [c for c in cols if any(c[0] in r for _, r in rows)]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{results['data']}, {results['num_images']} images",
             "method".ljust(width) + "".join(title.rjust(12) for _, title in cols)]
    for name, r in rows:
        lines.append(name.ljust(width) + "".join((f"{r[key]:.3f}" if key in r else "-").rjust(12) for key, _ in cols))
    return "\n".join(lines)


__all__ = ["EVAL_SEED", "Item", "evaluate_zeroshot", "format_scores", "items", "scored_readouts"]
