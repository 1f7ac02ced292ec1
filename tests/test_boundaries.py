"""Tests for the BSDS500 boundary benchmark, mask IoU and the BSDS500 / mask-folder readers.

The boundary cases are small hand-made maps whose scores follow from the
protocol by hand.  Images are 60 x 80 (diagonal 100 px), so ``max_dist=0.02``
is a 2-pixel tolerance.
"""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

import gmae.evaluate.boundaries as B
from gmae.data.benchmarks import BSDS500, MaskFolder
from gmae.errors import GMAEError
from gmae.evaluate.boundaries import (
    evaluate_boundaries,
    mask_iou,
    match_boundaries,
    mean_iou,
    thin,
)

H, W = 60, 80  # diagonal 100


def line(row: int, c0: int = 10, c1: int = 70, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[row, c0:c1] = True
    return m


def score(pred, gts, **kw) -> dict:
    return evaluate_boundaries([np.asarray(pred, dtype=float)], [gts], max_dist=kw.pop("max_dist", 0.02), **kw)


# ------------------------------------------------------------------ matching
def test_thin_keeps_a_line_and_thins_a_band():
    assert np.array_equal(thin(line(30)), line(30))
    band = line(29) | line(30) | line(31)
    t = thin(band)
    assert t.sum() < band.sum() / 2 and np.all(t <= band)


def test_match_is_one_to_one():
    gt = np.zeros((10, 10), bool)
    gt[5, 5] = True
    pred = np.zeros((10, 10), bool)
    pred[5, 5] = pred[5, 6] = True
    m1, m2 = match_boundaries(pred, gt, 2.0)
    assert m1.sum() == 1 and m2.sum() == 1 and m1[5, 5]  # the coincident pixel (distance 0) wins


def test_match_is_optimal_not_greedy():
    # Greedy nearest-first takes the distance-0 pair P1-G1 and then nothing else fits (1 match);
    # the optimal assignment is P1-G2 and P2-G1 (2 matches, each at distance 2).
    gt = np.zeros((10, 10), bool)
    pred = np.zeros((10, 10), bool)
    gt[5, 5] = gt[5, 7] = True
    pred[5, 5] = pred[5, 3] = True
    m1, m2 = match_boundaries(pred, gt, 2.0)
    assert m1.sum() == 2 and m2.sum() == 2


def test_match_minimises_distance_among_maximum_matchings():
    # preds (0,0), (0,1); GT (1,0), (1,1): straight pairs (1 + 1) beat crossed ones (2 x sqrt 2).
    pred, gt = np.zeros((2, 2), bool), np.zeros((2, 2), bool)
    pred[0] = gt[1] = True
    i, j = B._match_pairs(*B._candidate_pairs(pred, gt, 1.5), 150.0)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 0), (1, 1)]


def test_match_equals_brute_force_assignment():
    """Exact: same cardinality and cost as a dense assignment with one outlier node per pixel."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(3, 10, 2)
        md = float(rng.choice([1.0, 1.5, 2.0, 3.0]))
        pred, gt = rng.random((h, w)) < rng.uniform(0.1, 0.5), rng.random((h, w)) < rng.uniform(0.1, 0.5)
        c = B.OUTLIER_COST * md
        p, g = np.argwhere(pred), np.argwhere(gt)
        n1, n2 = len(p), len(g)
        d = np.sqrt(((p[:, None] - g[None]) ** 2).sum(-1))
        cost = np.full((n1 + n2, n2 + n1), 1e9)
        cost[:n1, :n2] = np.where(d <= md + 1e-9, d, 1e9)
        cost[np.arange(n1), n2 + np.arange(n1)] = c
        cost[n1 + np.arange(n2), np.arange(n2)] = c
        cost[n1:, n2:] = 0
        r, k = linear_sum_assignment(cost)
        best_n, best_cost = int(((r < n1) & (k < n2)).sum()), cost[r, k].sum()
        i, j = B._match_pairs(*B._candidate_pairs(pred, gt, md), c)
        assert len(set(i.tolist())) == len(i) and len(set(j.tolist())) == len(j)
        dist = np.sqrt(((p[i] - g[j]) ** 2).sum(-1))
        assert np.all(dist <= md + 1e-9)
        assert len(i) == best_n
        assert dist.sum() + c * (n1 + n2 - 2 * len(i)) == pytest.approx(best_cost)


def test_match_errors_and_empty():
    z = np.zeros((5, 5), bool)
    m1, m2 = match_boundaries(z, line(2, 0, 5, (5, 5)), 1.0)
    assert not m1.any() and not m2.any()
    with pytest.raises(ValueError, match="shape"):
        match_boundaries(z, np.zeros((5, 6), bool), 1.0)


# ------------------------------------------------------------------ the benchmark
def test_perfect_binary_prediction():
    r = score(line(30), [line(30)])
    assert r["ods"] == r["ois"] == 1.0
    assert r["ods_threshold"] == pytest.approx(0.01)  # the first (every threshold ties)
    assert r["ap"] == 0.0  # BSDS: a single recall value has no PR curve
    assert len(r["thresholds"]) == len(r["precision"]) == len(r["recall"]) == 99
    assert all(isinstance(v, float) for v in (r["ods"], r["ois"], r["ap"], r["ods_threshold"]))


def test_perfect_ramp_prediction_ap():
    # A 100-pixel line with values (k + 0.5) / 100: at t = i/100 the top 100 - i pixels are on,
    # P = 1 and R = (100 - i) / 100, so the curve covers R in [0.01, 0.99] at P = 1: AP = 0.99.
    gt = line(10, 10, 110, (20, 120))
    pred = np.zeros((20, 120))
    pred[10, 10:110] = (np.arange(100) + 0.5) / 100
    r = evaluate_boundaries([pred], [[gt]])
    assert r["ap"] == pytest.approx(0.99)
    assert r["precision"] == [1.0] * 99
    assert r["recall"] == pytest.approx([(100 - i) / 100 for i in range(1, 100)])
    assert r["ods"] == r["ois"] == pytest.approx(2 * 0.99 / 1.99)
    assert r["ods_threshold"] == pytest.approx(0.01)


def test_empty_prediction_scores_zero():
    r = score(np.zeros((H, W)), [line(30)])
    assert r["ods"] == r["ois"] == r["ap"] == 0.0
    assert r["precision"] == [0.0] * 99 and r["recall"] == [0.0] * 99  # BSDS: P = 0 when nothing is predicted


def test_no_ground_truth_and_no_prediction():
    empty = np.zeros((H, W))
    r = score(empty, [np.zeros((H, W), bool)])
    assert r["ods"] == r["ois"] == r["ap"] == 0.0
    # such an image adds nothing to a dataset
    r = evaluate_boundaries([line(30).astype(float), empty], [[line(30)], [np.zeros((H, W), bool)]], max_dist=0.02)
    assert r["ods"] == r["ois"] == 1.0


@pytest.mark.parametrize("dy, dx, max_dist, f", [
    (1, 0, 0.02, 1.0), (1, 1, 0.02, 1.0), (2, 0, 0.02, 1.0),  # within 2 px (inclusive)
    (3, 0, 0.02, 0.0), (2, 0, 0.015, 0.0), (1, 0, 0.015, 1.0),  # beyond the tolerance
])
def test_shift_tolerance(dy, dx, max_dist, f):
    r = score(np.roll(line(30), (dy, dx), axis=(0, 1)), [line(30)], max_dist=max_dist)
    assert r["ods"] == pytest.approx(f)


def test_spurious_line_halves_precision():
    r = score(line(30) | line(5), [line(30)])
    assert r["precision"][0] == 0.5 and r["recall"][0] == 1.0
    assert r["ods"] == pytest.approx(2 / 3)


def test_annotators_recall_sums_and_precision_takes_any():
    # recall counts every annotator's pixels: matching one of two gives R = 0.5
    r = score(line(30), [line(30), line(10)])
    assert r["recall"][0] == 0.5 and r["precision"][0] == 1.0
    assert r["ods"] == pytest.approx(2 / 3)
    # a predicted pixel is correct if it matches any annotator
    r = score(line(30) | line(10), [line(30), line(10)])
    assert r["recall"][0] == 1.0 and r["precision"][0] == 1.0


def test_best_threshold_found():
    # correct line at 0.805, spurious line at 0.405: t <= 0.40 -> F = 2/3, 0.41..0.80 -> F = 1, above -> 0
    pred = line(30) * 0.805 + line(5) * 0.405
    r = score(pred, [line(30)])
    assert r["ods"] == 1.0 and r["ods_threshold"] == pytest.approx(0.41)
    assert r["precision"][39] == 0.5 and r["precision"][40] == 1.0 and r["recall"][80] == 0.0


def test_ois_uses_each_images_best_threshold():
    # A: correct line 0.9 + spurious 0.5 (best t = 0.75); B: correct line 0.5 only (best t = 0.25).
    # Dataset: t=0.25: R = 120/120, P = 120/180 -> F = 0.8; t=0.75: R = 60/120, P = 1 -> F = 2/3.
    # OIS: both images perfect at their own threshold -> 1.
    a = line(30) * 0.9 + line(5) * 0.5
    b = line(30) * 0.5
    preds, gts = [a, b], [[line(30)], [line(30)]]
    r = evaluate_boundaries(preds, gts, thresholds=[0.75, 0.25], max_dist=0.02)
    assert r["thresholds"] == [0.25, 0.75]
    assert r["recall"] == [1.0, 0.5] and r["precision"] == pytest.approx([2 / 3, 1.0])
    assert r["ods"] == pytest.approx(0.8) and r["ods_threshold"] == 0.25
    assert r["ois"] == 1.0 > r["ods"]
    # AP: P falls linearly from 1 at R = 0.5 to 2/3 at R = 1 -> 0.01 * sum over R = 0.50..1.00 = 0.425
    assert r["ap"] == pytest.approx(0.425)
    # BSDS's interpolated maxF: F(d) = (8 - 2 d^2) / (10 - d) along the segment, d on linspace(0, 1, 100)
    ri = evaluate_boundaries(preds, gts, thresholds=[0.25, 0.75], max_dist=0.02, interpolate=True)
    d = np.linspace(0, 1, 100)
    k = int(np.argmax((8 - 2 * d**2) / (10 - d)))
    assert ri["ods"] == pytest.approx((8 - 2 * d[k] ** 2) / (10 - d[k])) and ri["ods"] > 0.808
    assert ri["ods_threshold"] == pytest.approx(0.25 + 0.5 * d[k])
    assert ri["ois"] == r["ois"] and ri["ap"] == r["ap"]


def test_identical_binarisations_are_evaluated_once(monkeypatch):
    calls = []
    real = B.thin
    monkeypatch.setattr(B, "thin", lambda m: calls.append(1) or real(m))
    pred = line(30) * 0.8 + line(5) * 0.4 + line(50) * 0.2
    score(pred, [line(30)])
    assert len(calls) == 3  # 99 thresholds, 3 distinct maps (the empty one needs no thinning)


def test_thresholds_argument():
    assert score(line(30), [line(30)], thresholds=1)["thresholds"] == [0.5]
    assert score(line(30), [line(30)], thresholds=4)["thresholds"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    for bad in (0, -3, 2.5, []):
        with pytest.raises(ValueError):
            score(line(30), [line(30)], thresholds=bad)


def test_inputs_checked_and_gt_forms():
    with pytest.raises(ValueError, match="shape"):
        score(np.zeros((H, W + 1)), [line(30)])
    with pytest.raises(ValueError):
        evaluate_boundaries([], [])
    # a single (H, W) map or an (n, H, W) stack is accepted as GT
    assert evaluate_boundaries([line(30) * 1.0], [line(30)], max_dist=0.02)["ods"] == 1.0
    assert evaluate_boundaries([line(30) * 1.0], [np.stack([line(30), line(10)])], max_dist=0.02)["recall"][0] == 0.5


def test_workers_give_the_same_result():
    preds = [line(30) * 0.9 + line(5) * 0.5, line(30) * 0.5]
    gts = [[line(30)], [line(31), line(10)]]
    assert evaluate_boundaries(preds, gts, thresholds=9, workers=2) == evaluate_boundaries(preds, gts, thresholds=9)


# ------------------------------------------------------------------ masks
def test_mask_iou():
    z = np.zeros((4, 4), bool)
    assert mask_iou(z, z) == 1.0
    a, b = z.copy(), z.copy()
    a[0, :2] = True
    b[0, 1:3] = True
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, ~a) == 0.0 and mask_iou(a, a) == 1.0
    assert mean_iou([a, a], [a, ~a]) == 0.5
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        mean_iou([], [])


# ------------------------------------------------------------------ BSDS500 reader
def _gt_cell(boundaries: list[np.ndarray]) -> np.ndarray:
    cell = np.empty((1, len(boundaries)), dtype=object)
    for k, b in enumerate(boundaries):
        cell[0, k] = {"Segmentation": np.ones(b.shape, np.uint16), "Boundaries": b.astype(np.uint8)}
    return cell


def make_bsds(base, names=("2018", "3096"), h=12, w=16, split="test"):
    (base / "images" / split).mkdir(parents=True)
    (base / "groundTruth" / split).mkdir(parents=True)
    (base / "images" / split / "Thumbs.db").write_bytes(b"x")  # the official archive has these
    maps = {}
    for k, name in enumerate(names):
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(base / "images" / split / f"{name}.jpg")
        b1, b2 = np.zeros((h, w), bool), np.zeros((h, w), bool)
        b1[k + 2] = True
        b2[:, k + 3] = True
        scipy.io.savemat(base / "groundTruth" / split / f"{name}.mat", {"groundTruth": _gt_cell([b1, b2])})
        maps[name] = (b1, b2)
    return maps


@pytest.mark.parametrize("nested", [False, True])
def test_bsds500_reads_both_layouts(tmp_path, nested):
    base = tmp_path / "BSR" / "BSDS500" / "data" if nested else tmp_path / "bsds"
    maps = make_bsds(base)
    ds = BSDS500(tmp_path / "BSR" if nested else base)
    assert len(ds) == 2 and ds.names == ["2018", "3096"]
    name, image, gts = ds[1]
    assert name == "3096"
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (3, 12, 16)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert len(gts) == 2 and all(g.dtype == bool and g.shape == (12, 16) for g in gts)
    assert np.array_equal(gts[0], maps["3096"][0]) and np.array_equal(gts[1], maps["3096"][1])


def test_bsds500_single_annotator_and_struct_array(tmp_path):
    base = tmp_path / "d"
    make_bsds(base)
    b = np.eye(12, 16, dtype=bool)
    scipy.io.savemat(base / "groundTruth" / "test" / "2018.mat", {"groundTruth": _gt_cell([b])})
    _, _, gts = BSDS500(base)[0]
    assert len(gts) == 1 and np.array_equal(gts[0], b)
    s = np.array([[(np.ones((12, 16), np.uint16), b.astype(np.uint8))] * 2],
                 dtype=[("Segmentation", object), ("Boundaries", object)])
    scipy.io.savemat(base / "groundTruth" / "test" / "2018.mat", {"groundTruth": s})
    _, _, gts = BSDS500(base)[0]
    assert len(gts) == 2 and np.array_equal(gts[1], b)


def test_bsds500_errors(tmp_path):
    with pytest.raises(GMAEError, match="does not exist"):
        BSDS500(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GMAEError, match="not a BSDS500 folder"):
        BSDS500(tmp_path / "empty")
    base = tmp_path / "d"
    make_bsds(base)
    with pytest.raises(GMAEError, match="no val split"):
        BSDS500(base, split="val")
    with pytest.raises(GMAEError, match="split must be"):
        BSDS500(base, split="testing")
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(base / "images" / "test" / "5555.jpg")
    with pytest.raises(GMAEError, match="5555 has no ground truth"):
        BSDS500(base)
    (base / "images" / "test" / "5555.jpg").unlink()
    ds = BSDS500(base)
    scipy.io.savemat(base / "groundTruth" / "test" / "2018.mat", {"other": np.zeros(3)})
    with pytest.raises(GMAEError, match="no 'groundTruth'"):
        ds[0]
    scipy.io.savemat(base / "groundTruth" / "test" / "2018.mat", {"groundTruth": np.zeros((1, 2))})
    with pytest.raises(GMAEError, match="not a cell array"):
        ds[0]
    (base / "groundTruth" / "test" / "2018.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(GMAEError, match="cannot read BSDS500 ground truth .*2018.mat"):
        ds[0]
    scipy.io.savemat(base / "groundTruth" / "test" / "2018.mat", {"groundTruth": _gt_cell([np.zeros((5, 5))])})
    with pytest.raises(GMAEError, match=r"2018 is 12x16 \(HxW\) but its ground truth is 5x5"):
        ds[0]


# ------------------------------------------------------------------ mask folder reader
def make_masks(root, modes=("L", "1", "RGBA")):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    truth = {}
    for k, mode in enumerate(modes):
        Image.fromarray(np.full((10, 14, 3), 30 * k, np.uint8)).save(root / "images" / f"im{k}.{'png' if k else 'jpg'}")
        m = np.zeros((10, 14), bool)
        m[2:6, k:k + 5] = True
        img = Image.fromarray(np.where(m, 200, 20).astype(np.uint8)).convert(mode, dither=Image.Dither.NONE)
        img.save(root / "masks" / f"im{k}.png")
        truth[f"im{k}"] = m
    return truth


def test_mask_folder_reads(tmp_path):
    truth = make_masks(tmp_path / "m")
    ds = MaskFolder(tmp_path / "m")
    assert len(ds) == 3 and ds.names == ["im0", "im1", "im2"]
    for i in range(3):
        name, image, mask = ds[i]
        assert image.shape == (3, 10, 14) and image.dtype == torch.float32
        assert mask.dtype == bool and np.array_equal(mask, truth[name])


def test_mask_folder_errors(tmp_path):
    with pytest.raises(GMAEError, match="does not exist"):
        MaskFolder(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(GMAEError, match="no images/"):
        MaskFolder(tmp_path / "bare")
    root = tmp_path / "m"
    make_masks(root, modes=("L",))
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / "images" / "lonely.png")
    with pytest.raises(GMAEError, match="lonely has no mask"):
        MaskFolder(root)
    (root / "images" / "lonely.png").unlink()
    Image.fromarray(np.zeros((11, 14), np.uint8)).save(root / "masks" / "im0.png")
    with pytest.raises(GMAEError, match=r"im0.png is 11x14 \(HxW\) but its image is 10x14"):
        MaskFolder(root)[0]
