"""Boundary (edge) and mask metrics for zero-shot evaluation.

The boundary metrics are the BSDS500 benchmark of Martin, Fowlkes & Malik (the
``bench`` code of the BSDS500 release, also used by HED, RCF and pdollar's
``edgesEvalDir``), re-implemented with numpy/scipy/scikit-image:

* a soft edge map ``pb`` in [0, 1] is binarised at each threshold with
  ``pb >= t`` (BSDS's convention) and thinned (``skimage.morphology.thin``: Guo &
  Hall's algorithm, the one MATLAB's ``bwmorph(.., 'thin', inf)`` uses); ground truth is not
  thinned;
* the thinned map is matched one-to-one against each annotator separately
  (:func:`match_boundaries`, BSDS's ``correspondPixels``), with a tolerance of
  ``max_dist`` = 0.0075 x the image diagonal;
* per threshold: ``cntR`` / ``sumR`` = GT pixels matched / GT pixels, summed
  over annotators; ``cntP`` = predicted pixels matched to *any* annotator,
  ``sumP`` = predicted pixels.  R = cntR / sumR and P = cntP / sumP, each 0 when
  its denominator is 0 (BSDS's ``x ./ (n + (n==0))``; so an empty prediction
  has P = R = F = 0), F = 2PR / (P + R), 0 when P + R = 0;
* ODS: the best F of the dataset-summed counts over thresholds (the first on
  ties).  BSDS's ``maxF`` additionally interpolates R, P and t linearly (100
  steps) between neighbouring thresholds, which raises ODS slightly (F is
  concave); ``interpolate=True`` reproduces that, the default reports F at an
  evaluated threshold so ``ods_threshold`` can be used to binarise;
* OIS: F of the counts taken at each image's own best threshold (first argmax
  of the image's F, no interpolation), summed over images, as BSDS's
  ``collect_eval_bdry``;
* AP: exactly BSDS's "Area_PR": the distinct dataset recalls (first occurrence
  in threshold order, as MATLAB's ``unique``) and their precisions are linearly
  interpolated at R = 0, 0.01, ..., 1; points outside the recall range count
  0; AP = 0.01 x the sum of the 101 values.  So AP is 0 when the curve has a
  single recall value (e.g. a binary prediction, even a perfect one), and a
  curve with P = 1 for R in [0.01, 0.99] has AP = 0.99.

Matching: BSDS solves a min-cost assignment (Goldberg's CSA) where a match
costs its distance and an unmatched pixel costs ``100 * max_dist``, on a graph
whose outlier edges are *randomly* sparsified (hence BSDS's run-to-run
differences of ~0.001).  Here the same objective is solved exactly and
deterministically with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``
(LAPJVsp) on the sparse graph of pixel pairs within ``max_dist`` plus one dummy
partner per pixel (see :func:`_match_pairs`).  As leaving a pair unmatched costs
200 x max_dist, this is a maximum-cardinality matching of minimum total distance
unless raising the cardinality needs an augmenting path of over 199 pairs.
pyEdgeEval (the maintained Python port of the BSDS code, on PyPI) was not used:
it ships only an sdist (a Cython/C++ build at install time, no wheels) and keeps
BSDS's random sparsification.

Speed: a binary map is thinned and matched once per distinct binarisation (the
thresholds between which no pixel changes share their counts), so maps with few
distinct values are fast.  A continuous map pays BSDS's full price: per
threshold one thinning and one matching per annotator, ~0.05-0.3 s each on a
481 x 321 image, i.e. about a minute per BSDS image at 99 thresholds; use
``workers`` to spread images over processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from skimage.morphology import thin as _sk_thin
from tqdm import tqdm

__all__ = ["MAX_DIST", "OUTLIER_COST", "evaluate_boundaries", "mask_iou", "match_boundaries", "mean_iou", "thin"]

#: BSDS's matching tolerance, as a fraction of the image diagonal.
MAX_DIST = 0.0075
#: BSDS's cost of an unmatched pixel, in units of the tolerance.
OUTLIER_COST = 100.0


def thin(edge: np.ndarray) -> np.ndarray:
    """Thin a binary edge map to 1-pixel-wide curves (MATLAB ``bwmorph thin inf``)."""
    return _sk_thin(np.asarray(edge, dtype=bool))


def _candidate_pairs(pred: np.ndarray, gt: np.ndarray, max_dist: float):
    """(pred index, gt index, distance) of every pair within ``max_dist`` pixels;
    indices into ``np.nonzero(pred)`` / ``np.nonzero(gt)`` order."""
    py, px = np.nonzero(pred)
    gy, gx = np.nonzero(gt)
    r = math.floor(max_dist + 1e-9)
    gid = np.full((gt.shape[0] + 2 * r, gt.shape[1] + 2 * r), -1, dtype=np.int64)
    gid[gy + r, gx + r] = np.arange(gy.size)
    ii, jj, dd = [], [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            d2 = dy * dy + dx * dx
            if d2 > max_dist * max_dist + 1e-9:
                continue
            j = gid[py + dy + r, px + dx + r]
            i = np.nonzero(j >= 0)[0]
            ii.append(i)
            jj.append(j[i])
            dd.append(np.full(i.size, math.sqrt(d2)))
    if not ii:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0),)
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)


def _match_pairs(i: np.ndarray, j: np.ndarray, d: np.ndarray, outlier: float):
    """Exact min-cost one-to-one matching: a match costs its distance, an
    unmatched node ``outlier``.  Returns the matched (i, j) index arrays.

    Cost = sum(d over M) + outlier x (n1 + n2 - 2|M|), so it is the same to give
    each node of the smaller side its own dummy partner of cost 2 x outlier and
    find the cheapest matching that saturates that side (rows: the smaller side;
    columns: the other side + the dummies; LAPJVsp is fastest this way round).
    A constant is added to all weights (LAPJVsp needs non-zero weights; such a
    matching has a fixed number of edges).
    """
    if i.size == 0:
        return i, j
    ui, ki = np.unique(i, return_inverse=True)
    uj, kj = np.unique(j, return_inverse=True)
    swap = ui.size > uj.size
    if swap:
        ki, kj = kj, ki
    a, b = (uj.size, ui.size) if swap else (ui.size, uj.size)
    rows = np.concatenate([ki, np.arange(a)])
    cols = np.concatenate([kj, b + np.arange(a)])
    w = np.concatenate([d, np.full(a, 2.0 * outlier)]) + 1.0
    r, c = min_weight_full_bipartite_matching(csr_array((w, (rows, cols)), shape=(a, a + b)))
    real = c < b
    r, c = r[real], c[real]
    return (ui[c], uj[r]) if swap else (ui[r], uj[c])


def match_boundaries(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """BSDS's ``correspondPixels``: one-to-one matching of boundary pixels.

    A predicted and a GT pixel may match if their Euclidean distance is at most
    ``max_dist`` pixels; the matching minimises total distance plus
    ``OUTLIER_COST * max_dist`` per unmatched pixel (= maximum cardinality,
    then minimum distance), solved exactly.  Returns boolean maps of the
    matched predicted and matched GT pixels.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt must be 2-D of one shape, got {pred.shape} and {gt.shape}")
    m1, m2 = np.zeros_like(pred), np.zeros_like(gt)
    if max_dist < 0 or not pred.any() or not gt.any():
        return m1, m2
    i, j = _match_pairs(*_candidate_pairs(pred, gt, max_dist), OUTLIER_COST * max(max_dist, 1e-3))
    py, px = np.nonzero(pred)
    gy, gx = np.nonzero(gt)
    m1[py[i], px[i]] = True
    m2[gy[j], gx[j]] = True
    return m1, m2


def _fmeasure(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    s = p + r
    return 2.0 * p * r / np.where(s == 0, 1.0, s)


def _ratio(cnt: np.ndarray, tot: np.ndarray) -> np.ndarray:
    return cnt / np.where(tot == 0, 1.0, tot)


def _thresholds(thresholds) -> np.ndarray:
    if np.ndim(thresholds) == 0:
        n = int(thresholds)
        if n < 1 or n != thresholds:
            raise ValueError(f"thresholds must be a positive integer or an array, got {thresholds!r}")
        return np.array([0.5]) if n == 1 else np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)
    t = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    if t.size == 0 or not np.isfinite(t).all():
        raise ValueError("thresholds must be a non-empty array of finite values")
    return t


def _image_counts(pred: np.ndarray, gts: Sequence[np.ndarray], thr: np.ndarray, max_dist: float) -> np.ndarray:
    """(len(thr), 4) int array of cntR, sumR, cntP, sumP for one image."""
    sum_r = sum(int(g.sum()) for g in gts)
    # The binary maps are nested in t, so the number of pixels >= t identifies the map.
    n_on = pred.size - np.searchsorted(np.sort(pred.ravel()), thr, side="left")
    out = np.zeros((thr.size, 4), dtype=np.int64)
    cache: dict[int, tuple[int, int, int, int]] = {}
    for k, t in enumerate(thr):
        key = int(n_on[k])
        if key not in cache:
            bmap = thin(pred >= t) if key else np.zeros(pred.shape, bool)
            acc_p = np.zeros(pred.shape, dtype=bool)
            cnt_r = 0
            if bmap.any():
                for g in gts:
                    m1, m2 = match_boundaries(bmap, g, max_dist)
                    acc_p |= m1
                    cnt_r += int(m2.sum())
            cache[key] = (cnt_r, sum_r, int(acc_p.sum()), int(bmap.sum()))
        out[k] = cache[key]
    return out


def _best_f(thr: np.ndarray, r: np.ndarray, p: np.ndarray, interpolate: bool) -> tuple[float, float]:
    """(best F, its threshold); BSDS's ``maxF`` when ``interpolate``."""
    f = _fmeasure(r, p)
    k = int(np.argmax(f))
    if not interpolate or thr.size < 2:
        return float(f[k]), float(thr[k])
    d = np.linspace(0.0, 1.0, 100)[None, :]
    ti = thr[1:, None] * d + thr[:-1, None] * (1 - d)
    fi = _fmeasure(r[1:, None] * d + r[:-1, None] * (1 - d), p[1:, None] * d + p[:-1, None] * (1 - d))
    m = int(np.argmax(fi))
    if fi.flat[m] > f[0]:
        return float(fi.flat[m]), float(ti.flat[m])
    return float(f[0]), float(thr[0])


def _average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """BSDS's Area_PR (see the module docstring)."""
    ru, idx = np.unique(r, return_index=True)
    if ru.size < 2:
        return 0.0
    ri = np.arange(101) / 100.0
    pi = np.interp(ri, ru, p[idx])
    pi[(ri < ru[0]) | (ri > ru[-1])] = 0.0
    return float(pi.sum() * 0.01)


def _gt_list(gt) -> list:
    if isinstance(gt, np.ndarray):
        return [gt] if gt.ndim == 2 else list(gt)
    return list(gt)


def _image_job(args) -> np.ndarray:
    pred, gt, thr, max_dist = args
    pred = np.nan_to_num(np.asarray(pred, dtype=np.float64), nan=0.0)
    gt = [np.asarray(g, dtype=bool) for g in _gt_list(gt)]
    return _image_counts(pred, gt, thr, max_dist * math.hypot(*pred.shape))


def evaluate_boundaries(preds: Sequence[np.ndarray], gts: Sequence[Sequence[np.ndarray]], thresholds=99,
                        max_dist: float = MAX_DIST, interpolate: bool = False, progress: bool = False,
                        workers: int = 1, desc: str = "boundaries") -> dict:
    """The BSDS500 boundary benchmark of soft edge maps (see the module docstring).

    Args:
        preds: per image, an (H, W) edge map in [0, 1] (NaN counts as 0).
        gts: per image, a list of (H, W) boolean GT boundary maps, one per
            annotator (a single (H, W) or (n, H, W) array is accepted too).
        thresholds: n (BSDS's ``linspace(1/(n+1), 1-1/(n+1), n)``; n = 1: 0.5)
            or an array of thresholds (sorted here).
        max_dist: matching tolerance as a fraction of the image diagonal.
        interpolate: ODS as BSDS's ``maxF`` (interpolated between thresholds).
        progress: show a tqdm bar over images, labelled `desc`.
        workers: > 1: evaluate images in that many processes (a continuous
            map costs ~99 x (thin + one matching per annotator), ~0.1 s each).

    Returns:
        ``{"ods", "ods_threshold", "ois", "ap", "precision", "recall",
        "thresholds"}``: floats, and per-threshold dataset precision/recall lists.
    """
    if len(preds) != len(gts) or len(preds) == 0:
        raise ValueError(f"need as many GT lists as predictions (> 0), got {len(preds)} and {len(gts)}")
    thr = _thresholds(thresholds)
    for n, (pred, gt) in enumerate(zip(preds, gts)):  # fail before the long part
        shapes = [np.shape(g) for g in _gt_list(gt)]
        if len(np.shape(pred)) != 2 or any(sh != np.shape(pred) for sh in shapes):
            raise ValueError(f"image {n}: prediction {np.shape(pred)} and GT {shapes} differ in shape")
    jobs = ((pred, gt, thr, max_dist) for pred, gt in zip(preds, gts))
    total = np.zeros((thr.size, 4), dtype=np.int64)
    best = np.zeros(4, dtype=np.int64)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(preds) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(preds)), mp_context=get_context("spawn")))
            results = pool.map(_image_job, jobs)
        else:
            results = map(_image_job, jobs)
        for counts in tqdm(results, total=len(preds), desc=desc, disable=not progress):
            total += counts
            f = _fmeasure(_ratio(counts[:, 0], counts[:, 1]), _ratio(counts[:, 2], counts[:, 3]))
            best += counts[int(np.argmax(f))]
    r, p = _ratio(total[:, 0], total[:, 1]), _ratio(total[:, 2], total[:, 3])
    ods, ods_t = _best_f(thr, r, p, interpolate)
    ois = float(_fmeasure(_ratio(best[0], best[1]), _ratio(best[2], best[3])))
    return {"ods": ods, "ods_threshold": ods_t, "ois": ois, "ap": _average_precision(r, p),
            "precision": p.tolist(), "recall": r.tolist(), "thresholds": thr.tolist()}


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} and {gt.shape}")
    union = int(np.count_nonzero(pred | gt))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & gt)) / union


def mean_iou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Mean of :func:`mask_iou` over image pairs."""
    if len(preds) != len(gts) or len(preds) == 0:
        raise ValueError(f"need as many GT masks as predictions (> 0), got {len(preds)} and {len(gts)}")
    return float(np.mean([mask_iou(p, g) for p, g in zip(preds, gts)]))
