"""Does the Gaussians' depth follow occlusion? Depth metrics against dead-leaves ground truth.

Each image's Gaussians are matched to the scene through their centres: a
Gaussian *sits on* the object visible at the pixel under its centre. Only
Gaussians that can matter are scored: opacity > ``MIN_OPACITY`` and centre
inside the image.

* ``depth_rank_spearman``: per image, the Spearman correlation between the
  Gaussians' depths (smaller = nearer) and the true depth rank of the object
  each sits on (0 = nearest leaf; the background plane is the farthest);
  averaged over the images where it is defined (at least two Gaussians on
  objects of different ranks, and depths that are not all equal). 1 = depth
  follows occlusion exactly, 0 = unrelated, -1 = reversed.
* ``depth_pair_acc``: over every pair of such Gaussians that sit on two
  different objects whose whole shapes overlap (one occludes the other), the
  fraction whose depth order is the objects' (the later-drawn object is
  nearer); equal depths count one half. Pooled over all pairs of all images.
  0.5 = chance. This asks for a *global* layering: two Gaussians that never
  meet on screen are scored too, although the image cannot tell their order.
* ``depth_pair_acc_touching`` (when footprints are given): the same over the
  pairs whose screen footprints touch (either Gaussian's exp(-q/2) at the
  other's centre > ``TOUCH``): the pairs whose order changes the render, so
  the *local* order a reconstruction loss can teach at all.

* ``depth_ooa`` (when the truth has order weights): **object ordering
  accuracy** (Yuan et al., ICML 2019, "Generative Modeling of Infinite
  Occluded Objects for Compositional Scene Representation"). Each object gets
  one depth, the opacity-weighted median z of the scored Gaussians that sit on
  it (:func:`object_depths`); then over every pair of objects (i, j), the
  background plane excluded, whose whole shapes overlap, the pair is ordered
  right when the later-drawn one has the smaller depth (equal depths: one
  half), weighted by w_ij = the sum over the pixels of the overlap of the
  squared colour difference between the two objects' appearances there
  (``DepthTruth.weights``; for plain objects |overlap| * |c_i - c_j|^2), so a
  pair whose order the image cannot show counts for nothing.
  OOA = sum w_ij [right] / sum w_ij, pooled over all pairs of all images.
  A pair of which an object has no scored Gaussian (hidden, or no Gaussian on
  it) is skipped: ``depth_ooa_pairs`` counts the scored pairs (w > 0),
  ``depth_ooa_pairs_skipped`` the skipped ones, ``depth_ooa_coverage`` the
  share of the total weight that was scored.

The same metrics are computed on the same Gaussians for priors that know
nothing of depth:

* a **border-distance prior**: depth = minus the distance of the centre from
  the image border (nearer the centre = nearer). Dead-leaves objects are
  placed uniformly, so the leaves on top are no more central than others, but
  the background plane shows most near the border; printing the prior beside
  the model keeps a spatial bias from being mistaken for occlusion reasoning.
* a **size prior**: depth = minus the visible area of the object the Gaussian
  sits on (larger visible area = nearer), and its **reverse** (smaller visible
  area = nearer). An occluder keeps its whole area while what it hides loses
  some, so visible area alone carries order information.

For OOA each prior's object depth is the same opacity-weighted median of its
per-Gaussian values (for the size priors: the object's own area).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

MIN_OPACITY = 0.3
TOUCH = 0.1
#: Chance: the expected scores of a depth order drawn at random (Spearman 0; each pair ordered right with
#: probability 1/2). Every depth score is read against it.
RANDOM_ORDER = {"depth_rank_spearman": 0.0, "depth_pair_acc": 0.5, "depth_pair_acc_touching": 0.5, "depth_ooa": 0.5}


@dataclass
class DepthTruth:
    """An image's ground truth for the depth metrics (from `gmae.data.DeadLeavesSample`)."""

    objects: np.ndarray  # (H, W) int, visible object id (0 = background plane, larger = nearer)
    overlaps: np.ndarray  # (n+1, n+1) bool, whole shapes share a pixel centre
    weights: np.ndarray | None = None  # (n+1, n+1) OOA weights (`gmae.data.order_weights`); None: no OOA


def scored_gaussians(means: np.ndarray, opacities: np.ndarray, truth: DepthTruth):
    """(depth, object id, border-prior depth, kept mask) of the Gaussians that are scored.

    means (K, 3) world coordinates (x, y in (-1, 1) span the image, z = depth); opacities (K,).
    """
    H, W = truth.objects.shape
    px = (means[:, 0] + 1.0) / 2.0 * W
    py = (means[:, 1] + 1.0) / 2.0 * H
    keep = (opacities > MIN_OPACITY) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
    px, py = px[keep], py[keep]
    obj = truth.objects[np.floor(py).astype(int), np.floor(px).astype(int)]
    border = np.minimum.reduce([px, W - px, py, H - py])
    return means[keep, 2], obj, -border, keep


def touching(means2d: np.ndarray, conics: np.ndarray) -> np.ndarray:
    """(K, K) bool: footprints touch, i.e. either Gaussian's exp(-q/2) at the other's centre > TOUCH.

    means2d (K, 2), conics (K, 3) in any one pixel unit (e.g. the model's image)."""
    d = means2d[:, None, :] - means2d[None, :, :]  # d[i, j] = centre i - centre j
    a, b, c = (conics[None, :, n] for n in range(3))
    g = np.exp(-0.5 * (a * d[..., 0] ** 2 + 2 * b * d[..., 0] * d[..., 1] + c * d[..., 1] ** 2))  # j's at i
    return (g > TOUCH) | (g.T > TOUCH)


def rank_spearman(depth: np.ndarray, obj: np.ndarray) -> float:
    """Spearman correlation of depth with the objects' depth rank (NaN when undefined)."""
    if len(depth) < 2 or np.all(obj == obj[0]) or np.all(depth == depth[0]):
        return float("nan")
    # rank = n - obj: nearer objects have larger ids, so the rank is decreasing in the id
    return float(spearmanr(depth, -obj).statistic)


def pair_counts(depth: np.ndarray, obj: np.ndarray, overlaps: np.ndarray,
                touch: np.ndarray | None = None) -> tuple[float, int]:
    """(pairs ordered as their objects, with ties counting 1/2; number of scored pairs).

    touch (K, K) bool, optional: score only the pairs it marks."""
    i, j = np.triu_indices(len(depth), k=1)
    scored = (obj[i] != obj[j]) & overlaps[obj[i], obj[j]]
    if touch is not None:
        scored &= touch[i, j]
    i, j = i[scored], j[scored]
    # correct when the Gaussian on the nearer object (larger id) has the smaller depth
    near_first = np.where(obj[i] > obj[j], depth[j] - depth[i], depth[i] - depth[j])
    correct = (near_first > 0).sum() + 0.5 * (near_first == 0).sum()
    return float(correct), int(len(i))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted median: the value where the sorted values' cumulative weight reaches half the total
    (the mean of the two values on either side when it reaches exactly half, as the plain median does)."""
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    half = cw[-1] / 2.0
    k = int(np.searchsorted(cw, half * (1 - 1e-12)))
    if k + 1 < len(v) and np.isclose(cw[k], half, rtol=1e-9, atol=0.0):
        return float((v[k] + v[k + 1]) / 2.0)
    return float(v[k])


def object_depths(depth: np.ndarray, obj: np.ndarray, opacities: np.ndarray, num_objects: int) -> np.ndarray:
    """(num_objects,) each object's depth: the opacity-weighted median depth of the scored Gaussians that sit
    on it (:func:`scored_gaussians`); NaN for an object no scored Gaussian sits on."""
    out = np.full(num_objects, np.nan)
    for i in np.unique(obj):
        on = obj == i
        out[i] = weighted_median(depth[on], opacities[on])
    return out


def ooa_counts(object_depth: np.ndarray, weights: np.ndarray, overlaps: np.ndarray) -> tuple[float, float, int, float, int]:
    """Object ordering accuracy's sums over one image's object pairs (see the module docstring).

    object_depth (m,) (NaN: no Gaussian on it); weights, overlaps (m, m). The background plane (object 0) is
    not an object here. Returns (weight of the pairs ordered right, ties counting half; weight of the scored
    pairs; number of scored pairs; weight of the skipped pairs; number of skipped pairs), over the pairs
    of objects whose whole shapes overlap and whose weight is > 0.
    """
    i, j = np.triu_indices(len(object_depth), k=1)  # i < j: j is drawn later, so nearer
    keep = (i > 0) & overlaps[i, j] & (weights[i, j] > 0)
    i, j = i[keep], j[keep]
    w = weights[i, j]
    seen = ~(np.isnan(object_depth[i]) | np.isnan(object_depth[j]))
    near_first = object_depth[i][seen] - object_depth[j][seen]  # > 0: the nearer object has the smaller depth
    right = (w[seen] * ((near_first > 0) + 0.5 * (near_first == 0))).sum()
    return float(right), float(w[seen].sum()), int(seen.sum()), float(w[~seen].sum()), int((~seen).sum())


#: The priors scored beside the model: key of their results -> what they say.
PRIORS = {"border_prior": "nearer the image centre = nearer",
          "size_prior": "larger visible area = nearer",
          "size_prior_reversed": "smaller visible area = nearer"}


def depth_metrics(gaussians: list[tuple], truths: list[DepthTruth]) -> dict:
    """The metrics for the model's depths and for each prior of :data:`PRIORS`, over a list of images.

    gaussians: per image (means (K, 3), opacities (K,)), optionally followed by
    the screen footprints (means2d (K, 2), conics (K, 3)) in units of the image
    width (x, y in [0, 1]) for the touching-pairs accuracy. OOA is computed
    when every truth has weights. Returns
    {"depth_rank_spearman", "depth_pair_acc", "depth_pairs", ["depth_pair_acc_touching",
    "depth_pairs_touching"], ["depth_ooa", "depth_ooa_pairs", "depth_ooa_pairs_skipped", "depth_ooa_coverage"],
    and for each prior "border_prior", "size_prior", "size_prior_reversed": {the same scores, without the counts}}.
    """
    names = ("model", *PRIORS)
    spearman = {name: [] for name in names}
    pairs = {key: [0.0, 0] for name in names for key in (name, name + "_touching")}
    ooa = {name: np.zeros(5) for name in names}
    with_touch = all(len(g) == 4 for g in gaussians) and len(gaussians) > 0
    with_ooa = all(t.weights is not None for t in truths) and len(truths) > 0
    for g, truth in zip(gaussians, truths):
        means, opacities = np.asarray(g[0], np.float64), np.asarray(g[1])
        depth, obj, border, keep = scored_gaussians(means, opacities, truth)
        m = len(truth.overlaps)
        area = np.bincount(truth.objects.ravel(), minlength=m)[obj].astype(np.float64)
        touch = None
        if with_touch:
            W = truth.objects.shape[1]
            touch = touching(np.asarray(g[2], np.float64)[keep] * W, np.asarray(g[3], np.float64)[keep] / W**2)
        values = {"model": depth, "border_prior": border, "size_prior": -area, "size_prior_reversed": area}
        for name, d in values.items():
            spearman[name].append(rank_spearman(d, obj))
            for key, t in ((name, None), (name + "_touching", touch)):
                if key.endswith("_touching") and t is None:
                    continue
                correct, n = pair_counts(d, obj, truth.overlaps, t)
                pairs[key][0] += correct
                pairs[key][1] += n
            if with_ooa:
                ooa[name] += ooa_counts(object_depths(d, obj, opacities[keep], m), truth.weights, truth.overlaps)

    def acc(key: str) -> float:
        correct, n = pairs[key]
        return correct / n if n else float("nan")

    def summary(name: str) -> dict:
        rho = [r for r in spearman[name] if not np.isnan(r)]
        out = {"depth_rank_spearman": float(np.mean(rho)) if rho else float("nan"), "depth_pair_acc": acc(name)}
        if with_touch:
            out["depth_pair_acc_touching"] = acc(name + "_touching")
        if with_ooa:
            right, scored = ooa[name][:2]
            out["depth_ooa"] = float(right / scored) if scored > 0 else float("nan")
        return out

    result = {**summary("model"), "depth_pairs": pairs["model"][1]}
    if with_touch:
        result["depth_pairs_touching"] = pairs["model_touching"][1]
    if with_ooa:
        _, scored, n_scored, skipped, n_skipped = ooa["model"]
        result.update(depth_ooa_pairs=int(n_scored), depth_ooa_pairs_skipped=int(n_skipped),
                      depth_ooa_coverage=float(scored / (scored + skipped)) if scored + skipped > 0 else float("nan"))
    result.update({name: summary(name) for name in PRIORS})
    return result


__all__ = ["MIN_OPACITY", "PRIORS", "RANDOM_ORDER", "TOUCH", "DepthTruth", "depth_metrics", "object_depths",
           "ooa_counts", "pair_counts", "rank_spearman", "scored_gaussians", "touching", "weighted_median"]
