"""Depth metrics (`gmae.evaluate.depth`) on hand-made scenes whose answers are known, and the
dead-leaves overlap truth they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmae.evaluate.depth import DepthTruth, depth_metrics, pair_counts, rank_spearman, scored_gaussians

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
    tiny = np.tile([1e6, 0.0, 1e6], (len(ids), 1))  # point-like: no two footprints meet
    huge = np.tile([1e-6, 0.0, 1e-6], (len(ids), 1))  # every footprint meets every other
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
