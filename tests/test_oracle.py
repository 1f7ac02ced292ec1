"""An oracle end to end: Gaussians built from the generators' ground truth, fed to `gmae eval-zeroshot` in
place of a model's output, score near-perfectly through the real readouts and scorers; reversed or
shuffled depths score as they must. Breaking the path from the model's output to the scorers (a flipped,
transposed or mis-scaled prediction) makes these tests fail.

The oracle: one small Gaussian per pixel at the pixel's centre, of its visible object's colour, at a depth
set by the object's draw order (the nearer the object, the smaller z), plus one image-wide backdrop in the
background's colour. The Gaussians are laid out so that the readouts' cuts of the near-to-far list fall
between objects, never inside one: the nearest half of the list is exactly the figure's objects (padded
with invisible, zero-opacity Gaussians), and each object fills one block of k/32 places (the finest
layer of the edge readout). Colours come from 8 corners of a small cube, 0.12 apart in a channel, chosen
so that touching objects differ: a pixel's own Gaussian changes it by ~0.12 (more than the edge readout's
change thresholds 0.05 and 0.1; its 0.2 maps stay empty), while the tails of nearer neighbours (alpha
<= ~0.41 together at a concave corner) change it by < 0.05, so layer-index edges land on the truth's pixels.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gmae.render import RenderSettings
from gmae.config import model_config
from gmae.evaluate.zeroshot import evaluate_zeroshot, items
from gmae.render.gaussians import Gaussians

S = 16  # the generated images' side (the model's input size: truth and prediction share it)
K = 4096  # Gaussians per image; the edge readout's finest layer holds K / 32 = 128, more than any object shows
BLOCK = K // 32
PALETTE = 0.3 + 0.12 * np.array(list(itertools.product((0, 1), repeat=3)), dtype=np.float64)
FIELDS = ("means", "scales", "quats", "colors", "opacities")


def colouring(objects: np.ndarray, m: int) -> np.ndarray:
    """(m,) palette index of each object such that objects that touch (8-neighbours) differ (greedy)."""
    touch = np.zeros((m, m), bool)
    H, W = objects.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = objects[max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
        b = objects[max(0, dy):, max(0, dx):W + min(0, dx)][: a.shape[0], : a.shape[1]]
        touch[a.ravel(), b.ravel()] = True
    touch |= touch.T
    colour = np.full(m, -1)
    for i in range(m):
        used = set(colour[touch[i] & (colour >= 0)])
        colour[i] = next(c for c in range(len(PALETTE)) if c not in used)
    return colour


def half(objects: np.ndarray, ids: list[int], z: np.ndarray) -> list[tuple[int, float]]:
    """K/2 places (pixel index, or -1 for an invisible filler, or -2 for the backdrop; z) for the objects
    `ids`, near to far: each object starts a block of BLOCK places (spread over the half when they fit)."""
    flat = objects.ravel()
    pixels = [list(np.nonzero(flat == i)[0]) + ([-2] if i == 0 else []) for i in ids]
    blocks = [-(-len(p) // BLOCK) for p in pixels]
    free = K // 2 // BLOCK - sum(blocks)
    assert free >= 0, "the scene has more objects than the layout holds"
    places: list[tuple[int, float]] = []
    for n, (i, p, b) in enumerate(zip(ids, pixels, blocks)):
        gap = free // len(ids) if n else 0  # spread the objects over the half, so coarse layers split them too
        places += [(-1, z[i])] * (gap * BLOCK)
        places += [(q, z[i] + (1e-3 if q == -2 else 0.0)) for q in p]  # the backdrop behind its pixels
        places += [(-1, z[i])] * (b * BLOCK - len(p))
    last = places[-1][1] if places else 0.0
    return places + [(-1, last)] * (K // 2 - len(places))


def oracle_gaussians(objects: np.ndarray, figure: np.ndarray, m: int, depth: str = "true",
                     seed: int = 0) -> Gaussians:
    """The oracle's K Gaussians of one image (1, K, ...), in a shuffled index order (the readouts sort them).

    depth: "true" (z by draw order, nearer = smaller), "reversed", or "shuffled" (each Gaussian's z drawn
    at random, so no order is left)."""
    H, W = objects.shape
    rng = np.random.default_rng(seed)
    z = 0.9 - 1.8 * (np.arange(m) + 0.5) / m  # object m - 1 (drawn last) is the nearest
    near = [i for i in range(m - 1, -1, -1) if (figure & (objects == i)).any()]
    far = [i for i in range(m - 1, -1, -1) if (~figure & (objects == i)).any()]
    assert not set(near) & set(far), "the figure truth is a set of whole objects"
    places = half(objects, near, z) + half(objects, far, z)
    colour = PALETTE[colouring(objects, m)]
    means, scales = np.zeros((K, 3)), np.full((K, 3), 1e-4)
    colors, opacities = np.zeros((K, 3)), np.zeros(K)
    for n, (p, zz) in enumerate(places):
        r, c = divmod(int(p), W) if p >= 0 else (0, 0)
        means[n] = ((c + 0.5) / W * 2 - 1, (r + 0.5) / H * 2 - 1, zz)
        if p >= 0:
            colors[n], opacities[n] = colour[objects[r, c]], 1.0
        elif p == -2:  # the backdrop: the background's colour over the whole image, centred off it (unscored)
            means[n, :2], scales[n], colors[n], opacities[n] = -1.5, 100.0, colour[0], 1.0
    if depth == "reversed":
        means[:, 2] = -means[:, 2]
    elif depth == "shuffled":
        means[:, 2] = rng.permutation(means[:, 2])
    # A shuffled index order that keeps each object's pixels in raster order (Gaussians of equal z stay in
    # index order under the readouts' stable sort, and an object's block must not be cut inside).
    key = rng.permutation(K)[np.searchsorted(np.unique(means[:, 2]), means[:, 2])]
    order = np.lexsort((np.arange(K), key)) if depth == "true" else rng.permutation(K)

    def t(a):
        return torch.tensor(a[order], dtype=torch.float32)[None]

    quats = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, K, 4).clone()
    return Gaussians(t(means), t(scales), quats, t(colors), t(opacities))


class OracleModel(torch.nn.Module):
    """Stands in for a GMAE model in `evaluate_zeroshot`: its "encoder" passes the images through and its
    decoder emits, for each image, the oracle Gaussians of the generated scene it shows (found by its
    pixels), so that everything between a model's output and the scores runs as for a real model."""

    def __init__(self, scenes: list, depth: str = "true"):
        """scenes: the items (:class:`gmae.evaluate.zeroshot.Item`, with depth truth) whose images it will see."""
        super().__init__()
        self.cfg = model_config("tiny", img_size=S, patch_size=8, num_gaussians=K, render_backend="cpu")
        self.register_buffer("background", torch.zeros(3))
        self.render_settings = RenderSettings.from_config(self.cfg)  # how a GMAE of this config renders
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))  # evaluate_zeroshot reads the device from it
        self.scenes = scenes
        self.gaussians = [oracle_gaussians(it.depth.objects, it.figure, len(it.depth.overlaps), depth, seed=n)
                          for n, it in enumerate(self.scenes)]
        self.encoder = lambda imgs, mask_ratio, noise: (imgs, None, None)

    def forward_decoder(self, imgs: torch.Tensor, ids_restore) -> Gaussians:
        which = [int(torch.stack([(im - it.image).abs().amax() for it in self.scenes]).argmin()) for im in imgs]
        return Gaussians(*(torch.cat([getattr(self.gaussians[i], f) for i in which]) for f in FIELDS))


def scenes_of(data: str, n: int) -> list:
    return list(items(data, S, n)[0])


def scores(data: str, depth: str = "true", n: int = 4) -> dict:
    return evaluate_zeroshot(OracleModel(scenes_of(data, n), depth), data, n, batch_size=2, progress=False)


def touching_pairs(scene) -> int:
    """The pairs the touching-pairs accuracy must score for the oracle: its pixel Gaussians' footprints
    (std ~0.55 px, from the renderer's 0.3 px^2 dilation) touch their 4 neighbours' centres (exp(-1/0.6) =
    0.19 > TOUCH), not their diagonal ones' (exp(-2/0.6) = 0.036 < TOUCH); scored when the two objects differ
    and their whole shapes overlap."""
    o, overlaps = scene.depth.objects, scene.depth.overlaps
    return int(sum((overlaps[a, b] & (a != b)).sum() for a, b in ((o[:, :-1], o[:, 1:]), (o[:-1], o[1:]))))


@pytest.mark.parametrize("data", ["sprites", "deadleaves"])
def test_the_oracle_scores_near_perfectly_through_eval_zeroshot(data, one_thread):
    """Depth pairs, touching pairs, OOA and rank correlation 1; figure IoU ~1; edge ODS at its ceiling: that of
    the truth's own boundary map scored as a prediction (below 1 because the BSDS protocol thins predictions,
    and thinning drops the corner pixels of the truth's 4-connected staircases; 0.83 on these sprites)."""
    from gmae.evaluate.boundaries import evaluate_boundaries

    r = scores(data)
    assert r["depth_pair_acc"] == 1.0 and r["depth_pair_acc_touching"] == 1.0 and r["depth_ooa"] == 1.0
    assert r["depth_rank_spearman"] == pytest.approx(1.0)
    # every Gaussian on the image is scored (all pairs of Gaussians on different, overlapping objects), and the
    # touching pairs are exactly the 4-neighbour pixel pairs: the footprints reached the scorer in the right units
    expected_pairs = 0
    for scene in scenes_of(data, 4):
        ids = scene.depth.objects.ravel()
        counts = np.bincount(ids, minlength=len(scene.depth.overlaps))
        between = np.triu(scene.depth.overlaps, 1) * np.outer(counts, counts)
        expected_pairs += int(between.sum())
    assert r["depth_pairs"] == expected_pairs
    assert r["depth_pairs_touching"] == sum(touching_pairs(s) for s in scenes_of(data, 4)) > 0
    assert r["depth_ooa_pairs"] > 0
    assert r["fg_iou"] >= (0.999 if data == "sprites" else 0.98)
    truths = [s.boundaries for s in scenes_of(data, 4)]
    ceiling = evaluate_boundaries([t[0].astype(np.float64) for t in truths], truths, progress=False)["ods"]
    sobel, canny = r["baselines"]["sobel"]["edge_ods"], r["baselines"]["canny"]["edge_ods"]
    assert r["edge_ods"] >= ceiling - 0.01 and ceiling > 0.7, (r["edge_ods"], ceiling)
    assert r["edge_ods"] > max(sobel, canny) + 0.2, (r["edge_ods"], sobel, canny)
    assert r["edge_ois"] >= r["edge_ods"] - 1e-9 and r["collapse"]["collapsed"] is False


@pytest.mark.parametrize("data", ["sprites", "deadleaves"])
def test_reversed_and_shuffled_oracle_depths_score_as_they_must(data, one_thread):
    reversed_ = scores(data, "reversed")
    assert reversed_["depth_pair_acc"] == 0.0 and reversed_["depth_pair_acc_touching"] == 0.0
    assert reversed_["depth_ooa"] == 0.0 and reversed_["depth_rank_spearman"] == pytest.approx(-1.0)
    # reversed, the nearest half is the ground: its IoU with the figure is at most the "all figure" floor's
    assert reversed_["fg_iou"] <= reversed_["baselines"]["all figure"]["fg_iou"] + 1e-9
    shuffled = scores(data, "shuffled")
    assert shuffled["depth_pair_acc"] == pytest.approx(0.5, abs=0.05)
    assert shuffled["depth_pair_acc_touching"] == pytest.approx(0.5, abs=0.1)
    assert shuffled["depth_rank_spearman"] == pytest.approx(0.0, abs=0.06)
    assert shuffled["fg_iou"] < 0.5 and shuffled["edge_ods"] < 0.5


def test_the_oracle_figure_survives_the_resize_to_a_larger_non_square_truth(tmp_path, one_thread):
    """Mask data (`masks:ROOT`): a 2S x 3S image whose centre square is a sprite scene at twice the model's
    size. The model sees the square shrunk to S; its figure mask must come back to 2S, upright, to score."""
    from PIL import Image

    scenes = scenes_of("sprites", 3)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for n, scene in enumerate(scenes):
        twice = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)  # noqa: E731
        image = np.zeros((2 * S, 3 * S, 3), np.uint8)
        image[:, S // 2: S // 2 + 2 * S] = twice((scene.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        mask = np.zeros((2 * S, 3 * S), np.uint8)
        mask[:, S // 2: S // 2 + 2 * S] = twice(scene.figure.astype(np.uint8) * 255)
        mask[:, : S // 2] = 255  # outside the centre square: never scored
        Image.fromarray(image).save(tmp_path / "images" / f"{n}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{n}.png")
    r = evaluate_zeroshot(OracleModel(scenes), f"masks:{tmp_path}", progress=False)
    assert r["num_images"] == 3 and "edge_ods" not in r and "depth_pair_acc" not in r
    assert r["fg_iou"] >= 0.999 and r["baselines"]["all figure"]["fg_iou"] < 0.3


def test_nearest_and_farthest_renders_of_an_unsorted_scene_show_the_front_object_and_the_background(one_thread):
    """A sprite scene's oracle Gaussians in shuffled order: the partial render of the K nearest (K = the
    front object's pixels) shows exactly the front object, and the last layer (the farthest) only the background."""
    from gmae.readouts.core import Canvas, from_far_end, near_to_far, render_subsets
    from gmae.readouts.layers import partial_renders

    scene = next(s for s in scenes_of("sprites", 8) if len(s.depth.overlaps) >= 3)
    objects = scene.depth.objects
    front = int(objects.max())  # the last shape drawn: nearest
    g = oracle_gaussians(objects, objects > 0, len(scene.depth.overlaps), "true", seed=1)
    # compact the list: the K visible Gaussians only, still unsorted, plus nothing (no fillers)
    visible = g.opacities[0] > 0
    g = Gaussians(*(getattr(g, f)[:, visible] for f in FIELDS))
    assert not torch.equal(g.means[0, :, 2], g.means[0, :, 2].sort().values)  # index order is not depth order
    canvas = Canvas(S, S, torch.zeros(3), RenderSettings(backend="cpu"))
    ordered = near_to_far(g)
    n_front = int((objects == front).sum())
    counts, partial = partial_renders(ordered, canvas, counts=(n_front,))
    assert counts == [n_front, g.num]
    # exactly the front object: the render of the Gaussians on its pixels, chosen by object, not by depth
    W = objects.shape[1]
    px = ((g.means[0, :, 0] + 1) / 2 * W).long().clamp(0, W - 1)
    py = ((g.means[0, :, 1] + 1) / 2 * W).long().clamp(0, W - 1)
    on_front = torch.from_numpy(objects == front)[py, px] & (g.means[0, :, 0].abs() < 1)
    assert int(on_front.sum()) == n_front
    alone = render_subsets(g, on_front[None, None], canvas)[0][0, 0]
    torch.testing.assert_close(partial[0, 0], alone, atol=1e-6, rtol=0)
    assert (alone.amax(dim=0) > 0.29).numpy()[objects == front].all()
    # the K farthest (K = the background's pixels and its backdrop), read from the far end as the edges do:
    # the background's colour over the whole image, nothing of any shape
    n_back = int((objects == 0).sum()) + 1
    counts, farthest = partial_renders(from_far_end(ordered), canvas, counts=(n_back,))
    colour = PALETTE[colouring(objects, len(scene.depth.overlaps))][0]
    expected = torch.tensor(colour * 0.99, dtype=torch.float32).view(3, 1, 1).expand(3, S, S)
    torch.testing.assert_close(farthest[0, 0], expected, atol=2e-3, rtol=0)
    # and one more Gaussian (the farthest of a shape) is no longer only the background
    _, more = partial_renders(from_far_end(ordered), canvas, counts=(n_back + 1,))
    assert (more[0, 0] - expected).abs().max() > 0.1
