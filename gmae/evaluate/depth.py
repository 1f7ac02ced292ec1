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
  0.5 = chance.

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


@dataclass
class DepthTruth:
    """An image's ground truth for the depth metrics (from `gmae.data.DeadLeavesSample`)."""

    objects: np.ndarray  # (H, W) int, visible object id (0 = background plane, larger = nearer)
    overlaps: np.ndarray  # (n+1, n+1) bool, whole shapes share a pixel centre


def scored_gaussians(means: np.ndarray, opacities: np.ndarray, truth: DepthTruth):
    """(depth, object id, border-prior depth) of the Gaussians that are scored.

    means (K, 3) world coordinates (x, y in (-1, 1) span the image, z = depth); opacities (K,).
    """
    H, W = truth.objects.shape
    px = (means[:, 0] + 1.0) / 2.0 * W
    py = (means[:, 1] + 1.0) / 2.0 * H
    keep = (opacities > MIN_OPACITY) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
    px, py = px[keep], py[keep]
    obj = truth.objects[np.floor(py).astype(int), np.floor(px).astype(int)]
    border = np.minimum.reduce([px, W - px, py, H - py])
    return means[keep, 2], obj, -border


def rank_spearman(depth: np.ndarray, obj: np.ndarray) -> float:
    """Spearman correlation of depth with the objects' depth rank (NaN when undefined)."""
    if len(depth) < 2 or np.all(obj == obj[0]) or np.all(depth == depth[0]):
        return float("nan")
    # rank = n - obj: nearer objects have larger ids, so the rank is decreasing in the id
    return float(spearmanr(depth, -obj).statistic)


def pair_counts(depth: np.ndarray, obj: np.ndarray, overlaps: np.ndarray) -> tuple[float, int]:
    """(pairs ordered as their objects, with ties counting 1/2; number of scored pairs)."""
    i, j = np.triu_indices(len(depth), k=1)
    scored = (obj[i] != obj[j]) & overlaps[obj[i], obj[j]]
    i, j = i[scored], j[scored]
    # correct when the Gaussian on the nearer object (larger id) has the smaller depth
    near_first = np.where(obj[i] > obj[j], depth[j] - depth[i], depth[i] - depth[j])
    correct = (near_first > 0).sum() + 0.5 * (near_first == 0).sum()
    return float(correct), int(len(i))


def depth_metrics(gaussians: list[tuple[np.ndarray, np.ndarray]], truths: list[DepthTruth]) -> dict:
    """Both metrics for the model's depths and for the border prior, over a list of images.

    gaussians: per image (means (K, 3), opacities (K,)). Returns
    {"depth_rank_spearman", "depth_pair_acc", "depth_pairs", "border_prior": {the two metrics}}.
    """
    spearman = {"model": [], "prior": []}
    pairs = {"model": [0.0, 0], "prior": [0.0, 0]}
    for (means, opacities), truth in zip(gaussians, truths):
        depth, obj, prior = scored_gaussians(np.asarray(means, np.float64), np.asarray(opacities), truth)
        for name, d in (("model", depth), ("prior", prior)):
            spearman[name].append(rank_spearman(d, obj))
            correct, n = pair_counts(d, obj, truth.overlaps)
            pairs[name][0] += correct
            pairs[name][1] += n

    def summary(name: str) -> dict:
        rho = [r for r in spearman[name] if not np.isnan(r)]
        correct, n = pairs[name]
        return {"depth_rank_spearman": float(np.mean(rho)) if rho else float("nan"),
                "depth_pair_acc": correct / n if n else float("nan")}

    return {**summary("model"), "depth_pairs": pairs["model"][1], "border_prior": summary("prior")}


__all__ = ["MIN_OPACITY", "DepthTruth", "depth_metrics", "pair_counts", "rank_spearman", "scored_gaussians"]
