"""Depth metrics (`gmae.evaluate.depth`) on hand-made scenes whose answers are known, and the
dead-leaves overlap truth they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmae.render import RenderSettings
from gmae.evaluate.depth import (
    DepthTruth,
    depth_metrics,
    object_depths,
    pair_counts,
    rank_spearman,
    TOUCH,
    scored_gaussians,
    touching,
    weighted_median,
)

S = 20


def two_leaves(far_leaf=True):
    """Background 0, leaf 1 = rows 2..17 x cols 2..11, leaf 2 (nearer) = rows 6..13 x cols 8..15 on top,
    and (far_leaf) a leaf 3 in the corner that overlaps only the background."""
    objects = np.zeros((S, S), int)
    objects[2:18, 2:12] = 1
    objects[6:14, 8:16] = 2
    n = 3
    if far_leaf:
        objects[17:20, 16:20] = 3
        n = 4
    overlaps = np.ones((n, n), bool)
    if far_leaf:
        overlaps[3, 1:3] = overlaps[1:3, 3] = False
    return DepthTruth(objects, overlaps)


def centres_on(truth, per_object=4, seed=0):
    """World means (K, 3) with z = 0, `per_object` centres inside the visible part of each object, and their ids."""
    rng = np.random.default_rng(seed)
    means, ids = [], []
    for obj in np.unique(truth.objects):
        ys, xs = np.nonzero(truth.objects == obj)
        pick = rng.choice(len(ys), per_object, replace=False)
        for y, x in zip(ys[pick], xs[pick]):
            means.append([(x + 0.5) / S * 2 - 1, (y + 0.5) / S * 2 - 1, 0.0])
            ids.append(obj)
    return np.array(means), np.array(ids)


def test_perfect_reversed_and_tied_orders():
    truth = two_leaves()
    means, ids = centres_on(truth)
    opac = np.ones(len(ids))
    means[:, 2] = -ids  # nearer objects (larger id) get smaller depth
    perfect = depth_metrics([(means, opac)], [truth])
    assert perfect["depth_rank_spearman"] == pytest.approx(1.0)
    assert perfect["depth_pair_acc"] == 1.0
    # scored pairs: Gaussians on different, overlapping objects. Leaf 3 touches only the background, so
    # the object pairs are (0,1), (0,2), (0,3), (1,2), each 4 x 4 Gaussian pairs.
    assert perfect["depth_pairs"] == 4 * 16
    means[:, 2] = ids
    reversed_ = depth_metrics([(means, opac)], [truth])
    assert reversed_["depth_rank_spearman"] == pytest.approx(-1.0)
    assert reversed_["depth_pair_acc"] == 0.0
    means[:, 2] = 0.5
    tied = depth_metrics([(means, opac)], [truth])
    assert np.isnan(tied["depth_rank_spearman"]) and tied["depth_pair_acc"] == 0.5


def test_pair_count_by_hand():
    truth = two_leaves()
    depth = np.array([0.0, 0.3, 0.2, 0.9])
    obj = np.array([2, 1, 3, 0])  # pairs: (2,1) ok, (2,3) not overlapping, (2,0) ok, (1,3) no, (1,0) ok, (3,0) ok
    correct, n = pair_counts(depth, obj, truth.overlaps)
    assert n == 4 and correct == 4
    depth[3] = 0.25  # the background now in front of leaves 1 (0.3) but still behind 2 (0.0) and 3 (0.2)
    assert pair_counts(depth, obj, truth.overlaps) == (3.0, 4)


def test_shuffled_depth_is_chance():
    rng = np.random.default_rng(1)
    truth = two_leaves()
    images = []
    for seed in range(150):
        means, _ = centres_on(truth, per_object=5, seed=seed)
        means[:, 2] = rng.random(len(means))
        images.append((means, np.ones(len(means))))
    m = depth_metrics(images, [truth] * len(images))
    assert m["depth_pair_acc"] == pytest.approx(0.5, abs=0.03)
    assert m["depth_rank_spearman"] == pytest.approx(0.0, abs=0.04)


def test_faint_and_off_image_gaussians_are_not_scored():
    truth = two_leaves()
    means, ids = centres_on(truth)
    means[:, 2] = -ids
    opac = np.ones(len(ids))
    clean = depth_metrics([(means, opac)], [truth])
    # add reversed-depth Gaussians that are faint or centred off the image: nothing changes
    extra = means.copy()
    extra[:, 2] = ids
    faint = np.full(len(ids), 0.29)
    off = extra.copy()
    off[:, 0] = 1.05
    both = depth_metrics([(np.concatenate([means, extra, off]), np.concatenate([opac, faint, opac]))], [truth])
    assert both == clean
    depth, obj, _, _ = scored_gaussians(np.concatenate([means, off]), np.concatenate([opac, opac]), truth)
    assert len(depth) == len(ids) and (obj == ids).all()


def test_touching_pairs_are_those_whose_footprints_meet():
    truth = two_leaves()
    means, ids = centres_on(truth)
    means[:, 2] = -ids
    means[ids == 0, 2] = -5.0  # background Gaussians wrongly in front of everything
    opac = np.ones(len(ids))
    means2d = (means[:, :2] + 1) / 2  # image-width units
    # Footprints that just miss / just reach: exp(-d^2 / (2 sigma^2)) > TOUCH for d < REACH * sigma, so an
    # isotropic sigma 10% short of the nearest centres' distance / REACH touches nothing, and 10% beyond the
    # farthest distance / REACH touches everything: a conic off by more than a factor 1.2^2 breaks the counts.
    d = np.linalg.norm(means2d[:, None] - means2d[None], axis=-1)[np.triu_indices(len(ids), 1)]
    reach = np.sqrt(2 * np.log(1 / TOUCH))
    tiny = np.tile([1.0, 0.0, 1.0], (len(ids), 1)) / (d.min() / reach / 1.1) ** 2
    huge = np.tile([1.0, 0.0, 1.0], (len(ids), 1)) / (d.max() / reach * 1.1) ** 2
    apart_pairs = ~np.eye(len(ids), dtype=bool)
    assert touching(means2d, tiny / 1.3)[apart_pairs].any()  # a conic off by 30% already changes the answer
    assert not touching(means2d, huge * 1.3)[apart_pairs].all()
    apart = depth_metrics([(means, opac, means2d, tiny)], [truth])
    assert apart["depth_pairs_touching"] == 0 and np.isnan(apart["depth_pair_acc_touching"])
    together = depth_metrics([(means, opac, means2d, huge)], [truth])
    assert together["depth_pairs_touching"] == together["depth_pairs"]
    assert together["depth_pair_acc_touching"] == together["depth_pair_acc"] == pytest.approx(1 / 4)
    # leaves 1 and 2 spread over everything, the background and leaf 3 are points: the touching pairs
    # are (1, 2) (right) and (0, 1), (0, 2) (wrong: the background is in front); (0, 3) never meet
    some = depth_metrics([(means, opac, means2d, np.where(np.isin(ids, [1, 2])[:, None], huge, tiny))], [truth])
    assert some["depth_pairs_touching"] == 3 * 16 and some["depth_pair_acc_touching"] == pytest.approx(1 / 3)
    assert "depth_pair_acc_touching" not in depth_metrics([(means, opac)], [truth])


def test_border_prior_is_scored_beside_the_model():
    truth = DepthTruth(np.zeros((S, S), int), np.ones((2, 2), bool))
    truth.objects[5:15, 5:15] = 1  # a centred leaf: the border prior gets it right
    means, ids = centres_on(truth, per_object=6)
    means[:, 2] = ids  # the model gets it wrong
    m = depth_metrics([(means, np.ones(len(ids)))], [truth])
    assert m["depth_pair_acc"] == 0.0 and m["border_prior"]["depth_pair_acc"] == 1.0
    assert m["border_prior"]["depth_rank_spearman"] > 0.5
    assert rank_spearman(np.array([1.0]), np.array([0])) != rank_spearman(np.array([1.0]), np.array([0]))  # NaN


def test_deadleaves_overlaps_are_the_whole_shapes():
    """overlaps[i, j] is whether the two objects' whole shapes share a pixel: painting each alone."""
    from gmae.data import DeadLeaves

    source = DeadLeaves(48, seed=3)
    sample = source.sample(0)
    p, _, _, shapes = source._render(0, whole_shapes=True)
    n = sample.num_objects
    whole = torch.from_numpy(shapes.reshape(n, 48, 48) > 0)
    assert whole[0].all()  # the background plane
    # every visible pixel of an object lies in its whole shape; hidden parts are in it too
    for i in range(n):
        assert whole[i][sample.objects == i].all()
    expected = (whole.flatten(1).float() @ whole.flatten(1).float().T) > 0
    assert torch.equal(sample.overlaps, expected) and torch.equal(sample.overlaps, sample.overlaps.T)
    # some leaf is partly hidden: its whole shape is larger than its visible part
    assert any(whole[i].sum() > (sample.objects == i).sum() for i in range(1, n))
    # and training's load() is unchanged by the extra truth
    assert torch.equal(source.load(0), sample.image)


# --------------------------------------------------------------------------- object ordering accuracy (OOA)
RED, GREEN, MAGENTA, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.0)


def painted(boxes, colors):
    """A plain-coloured scene painted in order over a white background: `boxes` (rows, cols) slices of each
    object's whole shape. Its DepthTruth with OOA weights from the whole shapes and colours."""
    from gmae.data import order_weights

    whole = np.zeros((len(boxes) + 1, S, S), bool)
    whole[0] = True
    objects = np.zeros((S, S), int)
    for i, box in enumerate(boxes, 1):
        whole[i][box] = True
        objects[box] = i
    flat = whole.reshape(len(whole), -1)
    overlaps = (flat.astype(int) @ flat.T.astype(int)) > 0
    weights = order_weights(flat, np.array([(1.0, 1.0, 1.0), *colors]))
    return DepthTruth(objects, overlaps, weights)


def four_sprites(c4=MAGENTA):
    """1: rows 2-11 x cols 2-11 red; 2 on top: rows 6-15 x cols 6-15 green (overlap with 1: 6 x 6 = 36 px,
    |red - green|^2 = 2, so w12 = 72); 3: rows 12-17 x cols 0-4, overlapping no object; 4 on top:
    rows 0-3 x cols 8-19 (overlap with 1: 2 x 4 = 8 px, |red - magenta|^2 = 1, so w14 = 8)."""
    boxes = [np.s_[2:12, 2:12], np.s_[6:16, 6:16], np.s_[12:18, 0:5], np.s_[0:4, 8:20]]
    return painted(boxes, [RED, GREEN, BLUE, c4])


def ooa_of(truth, object_z, per_object=4, opacity=1.0):
    """depth_metrics of Gaussians on every visible object, each object's at the depth object_z[id]."""
    means, ids = centres_on(truth, per_object=per_object)
    means[:, 2] = np.asarray(object_z, float)[ids]
    return depth_metrics([(means, np.full(len(ids), opacity))], [truth])


def test_ooa_weights_are_overlap_area_times_squared_colour_difference():
    w = four_sprites().weights
    assert w[1, 2] == w[2, 1] == pytest.approx(36 * 2) and w[1, 4] == pytest.approx(8 * 1)
    assert w[2, 4] == w[1, 3] == w[2, 3] == w[3, 4] == 0.0 and (np.diag(w) == 0).all()
    assert w[0, 3] == pytest.approx(30 * (0 + 1 + 1))  # object 3 (blue) on white: 30 px, |(1,1,0)|^2
    # per-pixel colours: one object half red, half green; the other plain red
    inside = np.ones((2, 4), bool)
    colour = np.array([[RED, RED, GREEN, GREEN], [RED] * 4])
    assert order_weights_of(inside, colour)[0, 1] == pytest.approx(2 * 2)


def order_weights_of(inside, colour):
    from gmae.data import order_weights

    return order_weights(inside, colour)


def test_ooa_perfect_reversed_and_tied():
    truth = four_sprites()
    perfect = ooa_of(truth, [9.0, 4.0, 3.0, 2.0, 1.0])  # later drawn = smaller depth
    assert perfect["depth_ooa"] == 1.0
    # the pairs with weight: (1, 2) and (1, 4); object 3 overlaps none, the background is not an object here
    assert perfect["depth_ooa_pairs"] == 2 and perfect["depth_ooa_pairs_skipped"] == 0
    assert perfect["depth_ooa_coverage"] == 1.0
    assert ooa_of(truth, [0.0, 1.0, 2.0, 3.0, 4.0])["depth_ooa"] == 0.0
    assert ooa_of(truth, [0.5] * 5)["depth_ooa"] == 0.5


def test_ooa_weights_one_right_one_wrong_pair():
    truth = four_sprites()
    # (1, 2) right, (1, 4) wrong: 72 / (72 + 8)
    assert ooa_of(truth, [9.0, 2.0, 1.0, 0.0, 3.0])["depth_ooa"] == pytest.approx(72 / 80)
    # (1, 2) wrong, (1, 4) right: 8 / 80
    assert ooa_of(truth, [9.0, 1.0, 2.0, 0.0, 0.5])["depth_ooa"] == pytest.approx(8 / 80)
    # (1, 2) tied, (1, 4) right: (36 + 8) / 80
    assert ooa_of(truth, [9.0, 1.0, 1.0, 0.0, 0.5])["depth_ooa"] == pytest.approx(44 / 80)


def test_ooa_pair_of_equal_colours_weighs_nothing():
    truth = four_sprites(c4=RED)  # 4 is red like 1: their order cannot show
    assert truth.weights[1, 4] == 0.0
    right, wrong = ooa_of(truth, [9.0, 2.0, 1.0, 0.0, 0.5]), ooa_of(truth, [9.0, 2.0, 1.0, 0.0, 3.0])
    assert right["depth_ooa"] == wrong["depth_ooa"] == 1.0 and wrong["depth_ooa_pairs"] == 1


def test_ooa_ignores_objects_that_do_not_overlap():
    truth = four_sprites()
    # object 3 overlaps only the background: from behind everything (even the background) to in front of all
    base = ooa_of(truth, [9.0, 2.0, 1.0, 10.0, 3.0])
    moved = ooa_of(truth, [9.0, 2.0, 1.0, -5.0, 3.0])
    assert base["depth_ooa"] == moved["depth_ooa"] == pytest.approx(72 / 80)
    assert base["depth_ooa_pairs"] == moved["depth_ooa_pairs"] == 2
    # and the pair metric does count (0, 3): it changes there
    assert base["depth_pair_acc"] != moved["depth_pair_acc"]


def test_ooa_skips_objects_without_gaussians_and_reports_coverage():
    truth = four_sprites()
    means, ids = centres_on(truth)
    means[:, 2] = np.array([9.0, 2.0, 1.0, 0.0, 3.0])[ids]  # (1, 4) would be wrong
    opac = np.where(ids == 4, 0.1, 1.0)  # ... but 4's Gaussians are too faint to be scored
    m = depth_metrics([(means, opac)], [truth])
    assert m["depth_ooa"] == 1.0 and m["depth_ooa_pairs"] == 1 and m["depth_ooa_pairs_skipped"] == 1
    assert m["depth_ooa_coverage"] == pytest.approx(72 / 80)


def test_object_depth_is_the_opacity_weighted_median():
    assert weighted_median(np.array([0.0, 0.0, 10.0]), np.ones(3)) == 0.0
    assert weighted_median(np.array([3.0, 1.0]), np.ones(2)) == 2.0  # even count: the midpoint
    assert weighted_median(np.array([0.0, 0.0, 10.0]), np.array([0.4, 0.4, 1.0])) == 10.0
    depth, obj = np.array([1.0, 2.0, 3.0, 7.0]), np.array([2, 2, 2, 0])
    assert object_depths(depth, obj, np.ones(4), 3).tolist()[::2] == [7.0, 2.0]
    assert np.isnan(object_depths(depth, obj, np.ones(4), 3)[1])
    # one Gaussian of object 2 far behind: the median keeps 2 in front of 1 (a mean would not)
    truth = four_sprites()
    means, ids = centres_on(truth)
    means[:, 2] = np.array([9.0, 2.0, 1.0, 0.0, 0.5])[ids]
    stray = np.flatnonzero(ids == 2)[0]
    means[stray, 2] = 50.0
    opac = np.ones(len(ids))
    assert depth_metrics([(means, opac)], [truth])["depth_ooa"] == 1.0
    opac[ids == 2] = 0.31
    opac[stray] = 1.0  # now it outweighs the other three of object 2 (1.0 > 3 x 0.31): 2 is behind 1
    assert depth_metrics([(means, opac)], [truth])["depth_ooa"] == pytest.approx(8 / 80)


def test_size_priors_on_a_scene_whose_larger_object_is_nearer():
    # 1: 6 x 6 red, far; 2: 12 x 12 green, near, hiding 3 x 3 of 1: visible areas 27 < 144 (< 229 background)
    truth = painted([np.s_[2:8, 2:8], np.s_[5:17, 5:17]], [RED, GREEN])
    means, ids = centres_on(truth)
    means[:, 2] = ids  # the model: reversed everywhere
    m = depth_metrics([(means, np.ones(len(ids)))], [truth])
    size, reverse = m["size_prior"], m["size_prior_reversed"]
    assert m["depth_ooa"] == 0.0
    assert size["depth_ooa"] == 1.0 and reverse["depth_ooa"] == 0.0
    # pairs (0, 1), (0, 2), (1, 2), 16 Gaussian pairs each: "larger nearer" puts the background in front
    assert size["depth_pair_acc"] == pytest.approx(1 / 3) and reverse["depth_pair_acc"] == pytest.approx(2 / 3)
    assert size["depth_rank_spearman"] == pytest.approx(-reverse["depth_rank_spearman"])
    assert "depth_ooa" in m["border_prior"]


def test_no_ooa_without_weights():
    truth = two_leaves()
    means, ids = centres_on(truth)
    m = depth_metrics([(means, np.ones(len(ids)))], [truth])
    assert "depth_ooa" not in m and "depth_ooa" not in m["size_prior"] and "depth_pair_acc" in m["size_prior"]


def test_deadleaves_order_weights_use_each_leafs_own_texture_where_the_shapes_overlap():
    """order_weights[i, j] = sum over the pixels of both whole shapes of |appearance_i - appearance_j|^2, where an
    object's appearance is what the generator paints there (without the zero-mean noise)."""
    from gmae.data import DeadLeaves
    from gmae.data.deadleaves import TEXTURES

    source = DeadLeaves(40, seed=3)
    sample = source.sample(1)
    p, _, _, shapes = source._render(1, whole_shapes=True)
    n, hw = sample.num_objects, 40 * 40
    looks = np.stack([source._appearance(p, np.full(hw, i), np.arange(hw)) for i in range(n)]).astype(np.float64)
    whole = shapes > 0
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            both = whole[i] & whole[j]
            expected[i, j] = 0.0 if i == j else ((looks[i, both] - looks[j, both]) ** 2).sum()
    np.testing.assert_allclose(sample.order_weights.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ((expected > 0) <= sample.overlaps.numpy()).all()
    # the appearance is the painted image wherever the object is visible (textures other than noise)
    image = sample.image.permute(1, 2, 0).reshape(hw, 3).numpy()
    visible = sample.objects.reshape(hw).numpy()
    textured = [i for i in range(n) if TEXTURES[int(sample.textures[i])] in ("gradient", "stripes")]
    assert textured, "this scene has textured leaves"
    for i in range(n):
        if TEXTURES[int(sample.textures[i])] != "noise" and (visible == i).any():
            np.testing.assert_allclose(looks[i, visible == i], image[visible == i], atol=1e-6)


def test_touching_is_decided_where_the_footprint_falls_to_touch():
    """Two centres 0.1 apart: footprints of sigma just above / below 0.1 / sqrt(2 ln(1 / TOUCH)) touch / do not."""
    means2d = np.array([[0.3, 0.4], [0.3 + 0.06, 0.4 + 0.08]])  # 0.1 apart
    sigma = 0.1 / np.sqrt(2 * np.log(1 / TOUCH))
    for factor, touches in ((1.02, True), (0.98, False)):
        conic = np.array([1.0, 0.0, 1.0]) / (factor * sigma) ** 2
        assert touching(means2d, np.stack([conic, conic]))[0, 1] == touches
    # one footprint is enough: a wide one reaching a point-like one
    wide, point = np.array([1.0, 0.0, 1.0]) / (1.02 * sigma) ** 2, np.array([1e4, 0.0, 1e4])
    assert touching(means2d, np.stack([wide, point]))[0, 1]


def test_the_gaussians_readout_gives_footprints_in_image_width_units():
    """`gmae eval-zeroshot`'s depth scorer reads screen means and conics in units of the image width: the same
    Gaussian gives the same numbers (up to the renderer's 0.3 px^2 dilation) on any canvas size, and the
    orthographic camera maps a world std s to s / 2 image widths (the image spans 2 world units)."""
    from gmae.readouts.core import Canvas
    from gmae.readouts.gaussians import READOUT
    from gmae.render.gaussians import Gaussians

    g = Gaussians(torch.tensor([[[0.2, -0.4, 0.1]]]), torch.tensor([[[0.1, 0.05, 0.3]]]),
                  torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), torch.rand(1, 1, 3), torch.tensor([[0.9]]))
    for size in (16, 48):
        means, opacities, means2d, conics = READOUT.scorer.predict(g, Canvas(size, size, None, RenderSettings(backend="torch")), [size])[0]
        np.testing.assert_allclose(means, [[0.2, -0.4, 0.1]]) and np.testing.assert_allclose(opacities, [0.9])
        np.testing.assert_allclose(means2d, [[0.6, 0.3]], rtol=1e-6)
        dilation = 0.3 / size**2  # 0.3 px^2 in width^2
        np.testing.assert_allclose(conics, [[1 / (0.05**2 + dilation), 0.0, 1 / (0.025**2 + dilation)]], rtol=1e-5)
        # a model rendering with legacy gsplat's pixel convention (--pixel-origin legacy) is read where it renders:
        # one pixel right and down
        legacy = RenderSettings(backend="torch", pixel_origin="legacy")
        shifted = READOUT.scorer.predict(g, Canvas(size, size, None, legacy), [size])[0][2]
        np.testing.assert_allclose(shifted, [[0.6 + 1 / size, 0.3 + 1 / size]], rtol=1e-6)
