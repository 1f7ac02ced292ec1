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

The same metrics are computed for a **border-distance prior**: depth = minus
the distance of the centre from the image border (nearer the centre = nearer).
Dead-leaves objects are placed uniformly, so the leaves on top are no more
central than others, but the background plane shows most near the border;
printing the prior beside the model keeps a spatial bias from being mistaken
for occlusion reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

MIN_OPACITY = 0.3
TOUCH = 0.1
#: Chance: the expected scores of a depth order drawn at random (Spearman 0; each pair ordered right with
#: probability 1/2). Every depth score is read against it.
RANDOM_ORDER = {"depth_rank_spearman": 0.0, "depth_pair_acc": 0.5, "depth_pair_acc_touching": 0.5}


@dataclass
class DepthTruth:
    """An image's ground truth for the depth metrics (from `gmae.data.DeadLeavesSample`)."""

    objects: np.ndarray  # (H, W) int, visible object id (0 = background plane, larger = nearer)
    overlaps: np.ndarray  # (n+1, n+1) bool, whole shapes share a pixel centre


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


def depth_metrics(gaussians: list[tuple], truths: list[DepthTruth]) -> dict:
    """Both metrics for the model's depths and for the border prior, over a list of images.

    gaussians: per image (means (K, 3), opacities (K,)), optionally followed by
    the screen footprints (means2d (K, 2), conics (K, 3)) in units of the image
    width (x, y in [0, 1]) for the touching-pairs accuracy. Returns
    {"depth_rank_spearman", "depth_pair_acc", "depth_pairs", ["depth_pair_acc_touching",
    "depth_pairs_touching"], "border_prior": {the same for the prior}}.
    """
    spearman = {"model": [], "prior": []}
    pairs = {key: [0.0, 0] for key in ("model", "prior", "model_touching", "prior_touching")}
    with_touch = all(len(g) == 4 for g in gaussians) and len(gaussians) > 0
    for g, truth in zip(gaussians, truths):
        means, opacities = np.asarray(g[0], np.float64), np.asarray(g[1])
        depth, obj, prior, keep = scored_gaussians(means, opacities, truth)
        touch = None
        if with_touch:
            W = truth.objects.shape[1]
            touch = touching(np.asarray(g[2], np.float64)[keep] * W, np.asarray(g[3], np.float64)[keep] / W**2)
        for name, d in (("model", depth), ("prior", prior)):
            spearman[name].append(rank_spearman(d, obj))
            for key, t in ((name, None), (name + "_touching", touch)):
                if key.endswith("_touching") and t is None:
                    continue
                correct, n = pair_counts(d, obj, truth.overlaps, t)
                pairs[key][0] += correct
                pairs[key][1] += n

    def acc(key: str) -> float:
        correct, n = pairs[key]
        return correct / n if n else float("nan")

    def summary(name: str) -> dict:
        rho = [r for r in spearman[name] if not np.isnan(r)]
        out = {"depth_rank_spearman": float(np.mean(rho)) if rho else float("nan"), "depth_pair_acc": acc(name)}
        if with_touch:
            out["depth_pair_acc_touching"] = acc(name + "_touching")
        return out

    result = {**summary("model"), "depth_pairs": pairs["model"][1], "border_prior": summary("prior")}
    if with_touch:
        result["depth_pairs_touching"] = pairs["model_touching"][1]
    return result


__all__ = ["MIN_OPACITY", "RANDOM_ORDER", "TOUCH", "DepthTruth", "depth_metrics", "pair_counts", "rank_spearman", "scored_gaussians",
           "touching"]
