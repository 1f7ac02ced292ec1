"""`gmae eval-zeroshot`: every registered readout that has a scorer, scored against ground truth.

The readouts and how each is scored (its truth, its baselines, its metrics)
are records of :mod:`gmae.readouts`; this module supplies the scored images
and their truth, runs the model over them in batches, and gathers the scores:
edges (BSDS ODS/OIS/AP, beside Sobel and Canny), figure-ground (IoU, beside a
centred ellipse) and, on generated data (dead-leaves, sprites), the depth order (beside border and size priors).
Each also has a trivial floor, scored alike: an all-zero edge map ("no
edges"), everything figure ("all figure") and a random depth order ("random
order": Spearman 0, pair accuracy and OOA 0.5).

Data (``--data``): any data set registered with a ``truth`` builder
(:mod:`gmae.data.registry`); the built-in ones:

* ``deadleaves``: generated images with exact ground truth, from a seed that
  training does not use by default (``EVAL_SEED``). Edge truth: occlusion
  boundaries (texture edges such as stripes are *not* boundaries). Figure
  truth: the pixels whose visible object is one of the nearer half of the
  leaves (draw-order id > n / 2 of n leaves) -- the generator's analogue of the
  readout's "nearest half of the Gaussians".
  Depth truth: which leaf is visible where, and which leaves' whole shapes
  overlap, for the depth metrics of `gmae.evaluate.depth` (the Gaussians'
  depth order against the occlusion order, beside border-distance and size priors).
* ``sprites``: 1-4 plain shapes over a plain background (:class:`gmae.data.Sprites`),
  the same truth from the same seed; figure truth: every shape.
* ``bsds:ROOT``: BSDS500 (edges; every annotator), ``masks:ROOT``: images with
  binary figure masks (figure-ground).

Geometry: each image's centred square (side = its shorter side) is what is
scored; the model sees it resized to its input size, and each readout's
prediction is resized back to the square (the soft edge map bilinearly, the
figure mask nearest), so predictions and baselines are scored at the ground
truth's resolution with the standard tolerance (0.0075 of the diagonal).

Beside the scores, ``collapse``: whether the model's depths on the scored
images have collapsed (:func:`gmae.readouts.core.depth_collapse`), in which
case every depth-ordered score measures the query-token order, not depth.
:func:`depth_check` computes the same figures on a few held-out images of a
run's data source (`gmae info`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GMAEError
from ..readouts import READOUTS
from ..data import EVAL_SEED, held_out_batch
from ..data.registry import names_with, spec_of
from ..readouts.layout import fidelity, judge_layout, layout_monitor
from ..readouts.core import Canvas, depth_collapse, gaussians_of, judge_collapse, require_gmae
from .depth import DepthTruth



@dataclass
class Item:
    """One scored image: the square crop and its ground truth at the same resolution (each readout's
    scorer names the field it is scored against)."""

    name: str
    image: torch.Tensor  # (3, S, S) in [0, 1]
    boundaries: list[np.ndarray] | None  # one (S, S) bool map per annotator
    figure: np.ndarray | None  # (S, S) bool
    depth: DepthTruth | None = None  # occlusion truth at (S, S) (generated data only)


def items(data: str, size: int, num_images: int | None = None) -> tuple[Iterator[Item], int]:
    """(the items of `data`, how many there are): the ``truth`` builder of the data set registered as `data`
    (``NAME`` or ``NAME:ROOT``, :mod:`gmae.data.registry`)."""
    dataset, option, colon = spec_of(data)
    if dataset is None or dataset.truth is None or colon != bool(dataset.truth_option) or (colon and not option):
        raise GMAEError(f"unknown evaluation data {data!r}: use {', '.join(names_with('truth'))}")
    truths, n = dataset.truth(option, size, num_images)
    return (Item(t.name, t.image, t.boundaries, t.figure, None if t.depth is None else DepthTruth(*t.depth))
            for t in truths), n


# --------------------------------------------------------------------------- evaluation


def scored_readouts() -> list:
    """The registered readouts that have a scorer, in registry order (the order of the scores)."""
    return [r for r in READOUTS.values() if r.scorer is not None]


def _model_batch(model, squares: list[torch.Tensor]) -> torch.Tensor:
    """The squares resized to the model's input, on its device."""
    size = model.cfg.img_size
    return torch.stack([
        F.interpolate(s[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        for s in squares
    ]).clamp(0, 1).to(next(model.parameters()).device)


@torch.no_grad()
def _model_gaussians(model, squares: list[torch.Tensor], mask_ratio: float):
    """The squares resized to the model's input, and the model's Gaussians of them (near to far) and canvas."""
    return gaussians_of(model, _model_batch(model, squares), mask_ratio), Canvas.of(model)


#: eval-zeroshot measures the layout and the fidelity on this many of its images (the first ones).
LAYOUT_IMAGES = 16


def evaluate_zeroshot(model, data: str = "deadleaves", num_images: int | None = None, batch_size: int = 16,
                      mask_ratio: float = 0.0, thresholds: int = 99, progress: bool = True) -> dict:
    """The scores of every scored readout of `model` and of its baselines on `data` (see the module
    docstring): edge ODS/OIS/AP, figure IoU and (generated data) the depth metrics; and under "collapse" the
    depth-collapse figures of the model's Gaussians on these images (:func:`depth_collapse`)."""
    from tqdm import tqdm

    require_gmae(model)  # an MAE has no Gaussians: say so before any image is read or bar shown
    stream, n = items(data, model.cfg.img_size, num_images)
    scored = scored_readouts()
    # per readout: its predictions {method: [one per image]} and truths, for the images that have its truth
    predictions = {r.name: {"gmae": [], **{name: [] for name in r.scorer.baselines}} for r in scored}
    truths: dict[str, list] = {r.name: [] for r in scored}
    pending: list[Item] = []
    read: list = []  # the Gaussians of every image, for the collapse check
    first: list = []  # the first LAYOUT_IMAGES images, for the layout and fidelity figures

    # The bar counts images whose readouts are done (a batch at a time), not images read.
    bar = tqdm(total=n, desc="zero-shot readouts", unit="img", disable=not progress, leave=False)

    def flush():
        squares = [it.image for it in pending]
        first.extend(squares[: LAYOUT_IMAGES - len(first)])
        g, canvas = _model_gaussians(model, squares, mask_ratio)
        read.append(g)
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

    results: dict = {"data": data, "num_images": n, "mask_ratio": mask_ratio,
                     "collapse": depth_collapse(read, model.cfg) if read else None, "layout": None, "fidelity": None}
    if len(first) >= 2:  # the layout figures compare images
        figures = judge_layout(layout_monitor(model, _model_batch(model, first)))
        fidelity_keys = ("psnr_full", "psnr_mean_colour", "psnr_gain")
        results["fidelity"] = {k: figures.pop(k) for k in fidelity_keys}
        results["layout"] = {**figures, "num_images": len(first)}
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
    if "depth_ooa_coverage" in results:
        lines.append(f"depth OOA: {results['depth_ooa_pairs']} object pairs scored, "
                     f"{results['depth_ooa_pairs_skipped']} skipped (an object without a scored Gaussian), "
                     f"coverage {results['depth_ooa_coverage']:.3f} of the weight")
    if results.get("collapse"):
        lines.append(f"{label} depth: {collapse_figures(results['collapse'])}")
    if results.get("layout"):
        lines.append(f"{label} layout on the first {results['layout']['num_images']} images: "
                     f"{layout_line(results['layout'])}")
        f = results["fidelity"]
        lines.append(f"{label} full render (mask 0): PSNR {f['psnr_full']:.2f} dB, the flat mean colour "
                     f"{f['psnr_mean_colour']:.2f} dB ({f['psnr_gain']:+.2f})")
    return "\n".join(lines)


def collapse_figures(collapse: dict) -> str:
    """One line of :func:`depth_collapse`'s figures, with its verdict."""
    verdict = "collapsed: the depth order is the query-token order" if collapse["collapsed"] else "not collapsed"
    return (f"{collapse['depth_at_limit']:.0%} of z at a limit, spread {collapse['depth_spread']:.3g}, "
            f"{collapse['scale_at_cap']:.0%} of scales at the cap ({verdict})")


DEPTH_CHECK_IMAGES = 8
#: The data every checkpoint's full-image fidelity is measured on (`gmae info`): two generated sources and photos.
FIDELITY_DATA = ("deadleaves", "sprites", "photos")


@torch.no_grad()
def depth_check(model, data: str, seed: int = 0, num_images: int = DEPTH_CHECK_IMAGES) -> tuple[dict, str]:
    """:func:`depth_collapse` of `model` on a fixed batch of the data source `data` (a run's ``TrainConfig.data``;
    :func:`gmae.data.held_out_batch`: held-out images of a generated source, else its first images):
    -> (the figures, where they come from)."""
    batch, where = held_out_batch(data, model.cfg.img_size, num_images, seed)
    g = gaussians_of(model, batch.to(next(model.parameters()).device))
    return depth_collapse(g, model.cfg), where


@torch.no_grad()
def layout_check(model, data: str, seed: int = 0, num_images: int = DEPTH_CHECK_IMAGES) -> dict:
    """Does `model`'s geometry follow the image? :func:`gmae.readouts.layout.layout_monitor` (the layout figures and
    the fidelity) on the fixed batch :func:`depth_check` reads, judged by :func:`judge_layout`; "source" says
    which images."""
    batch, where = held_out_batch(data, model.cfg.img_size, num_images, seed)
    return {**judge_layout(layout_monitor(model, batch.to(next(model.parameters()).device))), "source": where}


@torch.no_grad()
def fidelity_table(model, num_images: int = DEPTH_CHECK_IMAGES) -> dict[str, dict]:
    """{data: :func:`gmae.readouts.layout.fidelity`} on held-out images of each of :data:`FIDELITY_DATA`."""
    device = next(model.parameters()).device
    return {data: fidelity(model, held_out_batch(data, model.cfg.img_size, num_images)[0].to(device))
            for data in FIDELITY_DATA}


def layout_line(layout: dict) -> str:
    """One line of :func:`layout_check`'s figures, with its verdict."""
    verdict = "image-independent: a fixed layout" if layout["image_independent"] else "follows the image"
    return (f"spread ratio {layout['layout_spread_ratio']:.2f}, depth-rank correlation {layout['depth_rank_corr']:.2f}, "
            f"edge follow {layout['edge_follow']:+.3f} ({verdict})")


def fidelity_line(table: dict[str, dict]) -> str:
    """`gmae info`'s fidelity figures: per data, the full render's PSNR against the flat mean colour's."""
    return ", ".join(f"{data} {f['psnr_full']:.1f} vs {f['psnr_mean_colour']:.1f} dB ({f['psnr_gain']:+.1f})"
                     for data, f in table.items())


def logged_collapse(run: str | Path, cfg) -> tuple[dict, str] | None:
    """The verdict of :func:`judge_collapse` on the last collapse monitors a run logged in its metrics.jsonl
    (`run`: a run folder or a checkpoint in one) -> (the figures, where they come from); None if none."""
    from ..io.runs import metric_lines

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    for line in reversed(metric_lines(folder / "metrics.jsonl")):
        try:
            record = json.loads(line)
            return ({**judge_collapse(record, cfg), "num_images": None},
                    f"the last monitors logged in {folder / 'metrics.jsonl'} (step {record['step']}, a training batch)")
        except (ValueError, KeyError, TypeError):
            continue  # a torn line, or one without the monitors (an MAE run)
    return None


def checkpoint_collapse(model, train_cfg, path: str | Path) -> dict:
    """`gmae info`'s depth figures of a GMAE checkpoint: :func:`depth_check` on its run's data source
    (dead-leaves for an export, which does not say), or, when that data cannot be read here, the run's
    last logged monitors (:func:`logged_collapse`). -> the figures and "source", where they come from."""
    data = "deadleaves" if train_cfg is None else train_cfg.data
    try:
        figures, where = depth_check(model, data, 0 if train_cfg is None else train_cfg.seed)
    except GMAEError as e:
        logged = logged_collapse(path, model.cfg)
        if logged is None:
            raise GMAEError(f"cannot check the depths of {path}: its data {data!r} cannot be read here ({e}) "
                            "and it has no metrics.jsonl beside it") from None
        figures, where = logged
        where += f"; its data {data!r} cannot be read here"
    if train_cfg is None:
        where += " (an export does not say what it was trained on)"
    return {**figures, "source": where}


def checkpoint_layout(model, train_cfg, fidelity_too: bool = True) -> dict:
    """`gmae info`'s layout and fidelity figures of a GMAE checkpoint: {"layout": :func:`layout_check` on its run's
    data (dead-leaves when the run's data cannot be read here, or for an export, which does not say),
    "fidelity": :func:`fidelity_table` (None without `fidelity_too`)}."""
    layout = model_layout(model, None if train_cfg is None else train_cfg.data, 0 if train_cfg is None else train_cfg.seed)
    return {"layout": layout, "fidelity": fidelity_table(model) if fidelity_too else None}


def model_layout(model, data: str | None, seed: int = 0) -> dict:
    """:func:`layout_check` on the data a model was trained on (None: not recorded), dead-leaves when that is not
    recorded or cannot be read here (the "source" says so)."""
    if data is None:
        return layout_check(model, "deadleaves")
    try:
        return layout_check(model, data, seed)
    except GMAEError as e:
        layout = layout_check(model, "deadleaves")
        layout["source"] += f" (its data {data!r} cannot be read here: {e})"
        return layout


__all__ = ["DEPTH_CHECK_IMAGES", "EVAL_SEED", "FIDELITY_DATA", "LAYOUT_IMAGES", "Item", "checkpoint_collapse", "checkpoint_layout",
           "collapse_figures", "depth_check", "fidelity_line", "fidelity_table", "layout_check", "layout_line", "model_layout",
           "evaluate_zeroshot", "format_scores", "items", "logged_collapse", "scored_readouts"]
