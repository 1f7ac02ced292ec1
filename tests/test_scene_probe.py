"""Scene probes (gmae.evaluate.scene, `gmae probe --data deadleaves|sprites --task ...`): labels read from the
generators' ground truth, features gathered at the marked points, probes that reach 100% on perfect features."""

import json

import numpy as np
import pytest
import torch

from gmae.cli import main
from gmae.config import model_config
from gmae.data import DeadLeaves, Sprites
from gmae.errors import GMAEError
from gmae.evaluate.probe import encode, encode_tokens, random_encoder
from gmae.data.scenes import SPLIT_SEEDS, patch_cover, scene_labels, task_targets
from gmae.evaluate.scene import probe_task, scene_features
from gmae.evaluate.zeroshot import EVAL_SEED
from conftest import TINY
from conftest import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = {"sprites": Sprites, "deadleaves": DeadLeaves}


def patch_pixels(objects: torch.Tensor, patch: int, p: int) -> torch.Tensor:
    """The object ids of patch ``patch`` (row-major) of an (H, W) id map, as a flat tensor."""
    gw = objects.shape[1] // p
    r, c = divmod(patch, gw)
    return objects[r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)


def majority(ids: torch.Tensor) -> tuple[int, float]:
    values, counts = ids.unique(return_counts=True)
    i = int(counts.argmax())
    return int(values[i]), float(counts[i]) / len(ids)


@pytest.mark.parametrize("data", ["sprites", "deadleaves"])
def test_labels_match_the_generators_ground_truth(data):
    n, size, p = 40, 32, 8
    labels = scene_labels(data, "val", size, p, n, progress=False)
    source = SOURCES[data](size, seed=SPLIT_SEEDS["val"])
    fronts = figures = 0
    for i in range(n):
        s = source.sample(i)
        ids, area = s.objects.unique(return_counts=True)
        leaves = ids[ids > 0]
        assert labels.count[i] == len(leaves)
        largest = int(ids[1:][area[1:].argmax()]) if ids[0] == 0 else int(ids[area.argmax()])
        assert labels.shape[i] == int(s.shapes[largest])
        if labels.front[i] >= 0:
            fronts += 1
            a, fa = majority(patch_pixels(s.objects, int(labels.front_points[i, 0]), p))
            b, fb = majority(patch_pixels(s.objects, int(labels.front_points[i, 1]), p))
            assert fa > 0.5 and fb > 0.5 and a != b and a > 0 and b > 0
            assert bool(s.overlaps[a, b])
            # in front = nearer = smaller depth rank
            assert labels.front[i] == int(s.depth_rank[s.objects == a][0] < s.depth_rank[s.objects == b][0])
        if labels.figure[i] >= 0:
            figures += 1
            ids_at = patch_pixels(s.objects, int(labels.figure_point[i]), p)
            obj, frac = majority(ids_at)
            assert frac > 0.5
            assert labels.figure[i] == int(s.figure[s.objects == obj][0])
    assert fronts >= n // 4 and figures == n
    # both answers occur, for the binary tasks
    assert set(labels.front[labels.front >= 0]) == {0, 1} and set(labels.figure) == {0, 1}


def test_labels_are_deterministic_and_on_their_own_seeds():
    a = scene_labels("sprites", "train", 32, 8, 12, progress=False)
    b = scene_labels("sprites", "train", 32, 8, 12, progress=False)
    for key in ("count", "shape", "front", "front_points", "figure", "figure_point"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    seeds = set(SPLIT_SEEDS.values())
    assert len(seeds) == 2 and EVAL_SEED not in seeds and not seeds & set(range(100))
    # a sprite image with one visible shape has no pair to order
    one = np.flatnonzero(a.count == 1)
    assert one.size and (a.front[one] == -1).all()


def test_patch_cover_counts_each_patchs_pixels():
    objects = np.zeros((16, 16), np.int64)
    objects[:8, :8] = 1  # patch 0 wholly object 1
    objects[8:, 8:12] = 2  # half of patch 3
    cover = patch_cover(objects, 3, 8)
    np.testing.assert_allclose(cover[:, 0], [0, 1, 0])
    np.testing.assert_allclose(cover[:, 3], [0.5, 0, 0.5])
    np.testing.assert_allclose(cover.sum(0), 1)
    with pytest.raises(GMAEError, match="patches"):
        patch_cover(np.zeros((10, 16), np.int64), 1, 8)


def test_deadleaves_count_bins_are_balanced_and_shared_by_both_splits():
    train = scene_labels("deadleaves", "train", 32, 8, 120, progress=False)
    val = scene_labels("deadleaves", "val", 32, 8, 60, progress=False)
    ty, vy, classes, names = task_targets("count", train, val)
    assert classes == len(names) == 4
    freq = np.bincount(ty, minlength=classes) / len(ty)
    assert freq.min() > 0.1
    # monotone in the count: a larger count never lands in a lower bin, on either split
    both_c, both_y = np.concatenate([train.count, val.count]), np.concatenate([ty, vy])
    order = np.argsort(both_c, kind="stable")
    assert (np.diff(both_y[order]) >= 0).all()


@pytest.mark.parametrize("task", ["count", "shape", "front", "figure"])
def test_probe_on_the_true_labels_features_reaches_100_percent(task):
    train = scene_labels("sprites", "train", 32, 8, 200, progress=False)
    val = scene_labels("sprites", "val", 32, 8, 100, progress=False)
    ty, vy, classes, _ = task_targets(task, train, val)

    def perfect(y):  # one-hot of the label (zeros where the task does not apply), plus a little noise
        f = torch.zeros(len(y), classes + 3)
        ok = torch.from_numpy(y >= 0)
        f[ok, torch.from_numpy(y[y >= 0])] = 1.0
        return f + 0.01 * torch.randn(f.shape, generator=torch.Generator().manual_seed(len(y)))

    r = probe_task(task, perfect(ty), perfect(vy), train, val, epochs=30)
    assert r["linear_acc"] == 1.0 and r["knn_acc"] == 1.0
    assert r["num_val"] == int((vy >= 0).sum()) and r["num_classes"] == classes
    # chance: always answering the train split's commonest class
    common = np.bincount(ty[ty >= 0]).argmax()
    assert r["chance"] == pytest.approx(float(np.mean(vy[vy >= 0] == common)))
    # features that say nothing are not learnable: far from 100%
    g = torch.Generator().manual_seed(1)
    noise = probe_task(task, torch.randn(len(ty), 8, generator=g), torch.randn(len(vy), 8, generator=g), train, val,
                       epochs=30)
    assert noise["linear_acc"] < 0.8 and noise["knn_acc"] < 0.8


def test_features_are_the_tokens_at_the_marked_points():
    mcfg = model_config("tiny", **TINY)
    encoder = random_encoder(mcfg, 0)
    labels = scene_labels("sprites", "train", 32, 8, 10, progress=False)
    feats = scene_features(encoder, labels, pool="avg", batch_size=4, progress=False)
    imgs = torch.stack([labels.source().load(i) for i in range(10)])
    with torch.no_grad():
        tokens = encode_tokens(encoder, imgs)[:, 1:]
        torch.testing.assert_close(feats["count"], encode(encoder, imgs, "avg"))
    assert feats["shape"] is feats["count"]
    for i in range(10):
        torch.testing.assert_close(feats["figure"][i], tokens[i, labels.figure_point[i]])
        if labels.front[i] >= 0:
            a, b = labels.front_points[i]
            torch.testing.assert_close(feats["front"][i], torch.cat([tokens[i, a], tokens[i, b]]))
    with pytest.raises(GMAEError, match="64 px"):
        scene_features(encoder, scene_labels("sprites", "val", 64, 8, 2, progress=False), progress=False)


def test_cli_scene_probe(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    args = ["probe", "--checkpoint", str(ckpt), "--data", "sprites", "--train-images", "40", "--val-images", "20",
            "--epochs", "5", "--threads", "1"]
    assert main([*args, "--task", "front", "--task", "figure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["tasks"]) == ["front", "figure"]
    assert out["tasks"]["figure"]["num_val"] == 20 and out["tasks"]["figure"]["num_classes"] == 2
    assert out["split_seeds"] == SPLIT_SEEDS
    assert main([*args, "--baseline"]) == 0
    table = capsys.readouterr().out
    for task in ("count", "shape", "front", "figure"):
        assert task in table
    assert "random init" in table and "chance" in table
    assert main(["probe", "--checkpoint", str(ckpt), "--task", "count"]) == 2
    assert "--task is for the scene probes" in capsys.readouterr().err


def test_ablate_scores_scene_probes_over_seeds(tmp_path, monkeypatch):
    import statistics

    from gmae.evaluate import ablate

    from gmae.config import choices

    monkeypatch.setitem(choices.SCENE_IMAGES, "train", 24)
    monkeypatch.setitem(choices.SCENE_IMAGES, "val", 12)
    monkeypatch.setattr(ablate, "masked_psnr", lambda model: 10.0)  # tested in test_ablate; slow at 256 images
    # The held-out scenes' labels are made once for the whole grid (4 scorings here: 2 seeds, trained and initial).
    from gmae.data import scenes

    made = []
    monkeypatch.setattr(scenes, "scene_labels", lambda *a, **kw: made.append(a) or scene_labels(*a, **kw))
    ablate._scene_labels.cache_clear()
    out = tmp_path / "ablate"
    rows = ablate.run_ablation(out, names=["base"], steps=1, probe_data="sprites", seeds=2, progress=False)
    assert sorted((a[0], a[1], a[4]) for a in made) == [("sprites", "train", 24), ("sprites", "val", 12)]
    assert ablate._scene_labels.cache_info()[:2] == (3, 1)  # (hits, misses)
    assert [r["name"] for r in rows] == ["base", "init"] and rows[0]["seeds"] == 2
    per_seed = [json.loads((out / f"base-s{s}" / "scores.json").read_text())["scores"] for s in (0, 1)]
    assert [p["step"] for p in per_seed] == [1, 1]
    for task in ("count", "shape", "front", "figure"):
        values = [p[f"{task}_linear"] for p in per_seed]
        assert rows[0][f"{task}_linear"] == pytest.approx(statistics.mean(values))
        assert rows[0][f"{task}_linear_std"] == pytest.approx(statistics.stdev(values))
    assert rows[0]["linear_acc"] == [None, None]
    table = (out / "table.md").read_text()
    assert "count (linear)" in table and "figure (linear)" in table and " ± " in table
    assert "linear acc" not in table


def test_image_level_scene_tasks_as_labelled_data_for_finetuning(tmp_path, monkeypatch, capsys):
    from gmae.config import choices
    from gmae.data.labelled import build_labelled

    monkeypatch.setitem(choices.SCENE_IMAGES, "train", 16)
    monkeypatch.setitem(choices.SCENE_IMAGES, "val", 8)
    train, val, classes = build_labelled("sprites:count", 32, augment=True)
    labels = scene_labels("sprites", "val", 32, 8, 8, progress=False)
    assert classes == 4 and len(train) == 16 and len(val) == 8
    np.testing.assert_array_equal(val.targets, labels.count - 1)  # 1..4 visible shapes -> classes 0..3
    source = Sprites(32, seed=SPLIT_SEEDS["val"])
    for i in (0, 5):
        image, y = val[i]
        assert y == labels.count[i] - 1
        torch.testing.assert_close(image, source.load(i), atol=0.5 / 255 + 1e-6, rtol=0)
    # the fine-tuning augmentation is the image or its mirror, never a crop
    raw = train.load(3)
    seen = {bool(torch.equal(train.load(3, np.random.default_rng(s)), raw)) for s in range(12)}
    assert seen == {True, False}
    assert torch.equal(train.load(3, np.random.default_rng(0)).flip(-1), raw) or \
        torch.equal(train.load(3, np.random.default_rng(0)), raw)
    with pytest.raises(GMAEError, match="gmae probe --data sprites --task front"):
        build_labelled("sprites:front", 32)

    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    assert main(["finetune", "--checkpoint", str(ckpt), "--data", "deadleaves:shape", "--steps", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "ft"), "--threads", "1", "--json"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_acc" in m for m in metrics)
