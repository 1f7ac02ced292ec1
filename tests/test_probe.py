"""Labelled data (digits, CIFAR pickles, ImageFolder trees), safe CIFAR unpickling, kNN and linear probes, `gmae probe`."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.cli import main
from gmae.config import model_config
from gmae.data.labelled import LabelledStream, build_labelled
from gmae.errors import GMAEError
from gmae.evaluate.probe import (
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    probe,
    random_encoder,
)
from conftest import TINY, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- fixtures: the three layouts


def cifar_rows(labels, marker=None):
    """uint8 (n, 3072) rows in CIFAR's layout: 1024 R, 1024 G, 1024 B, each a row-major 32x32 plane.

    Row i is filled with 10 * i; `marker` = (i, channel, y, x, value) sets one pixel."""
    rows = np.repeat((10 * np.arange(len(labels), dtype=np.uint8))[:, None], 3072, axis=1)
    if marker is not None:
        i, c, y, x, v = marker
        rows[i, c * 1024 + y * 32 + x] = v
    return rows


def write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def cifar10_root(tmp_path):
    base = tmp_path / "c10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(3)]
        marker = (1, 0, 3, 5, 200) if b == 1 else None  # red at row 3, column 5 of the 2nd image
        write_pickle(base / f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": labels,
                                                b"data": cifar_rows(labels, marker),
                                                b"filenames": [b"x.png"] * 3})
    write_pickle(base / "test_batch", {b"labels": [0, 9], b"data": cifar_rows([0, 9], (0, 2, 31, 0, 77))})
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")]
    write_pickle(base / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return tmp_path / "c10"


@pytest.fixture
def cifar100_root(tmp_path):
    base = tmp_path / "c100" / "cifar-100-python"
    base.mkdir(parents=True)
    # protocol 2, as the real (Python 2) files; Python 3 writes bytes there as _codecs.encode(..., "latin1")
    write_pickle(base / "train", {b"fine_labels": [5, 99, 0], b"coarse_labels": [1, 2, 3],
                                  b"data": cifar_rows([5, 99, 0], (2, 1, 0, 31, 250))}, protocol=2)
    write_pickle(base / "test", {b"fine_labels": [42], b"coarse_labels": [0], b"data": cifar_rows([42])}, protocol=2)
    write_pickle(base / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                 b"coarse_label_names": [b"x"] * 20}, protocol=2)
    return tmp_path / "c100"


COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def write_folder(root, per_class=3, classes=tuple(COLOURS), val_classes=None):
    for split, n, names in (("train", per_class, classes), ("val", 1, val_classes or classes)):
        for name in names:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), COLOURS.get(name, (9, 9, 9))).save(d / f"{i}.png")
    return root


# --------------------------------------------------------------------------- data


def test_digits_split_is_stratified_fixed_and_scaled():
    train, val, n = build_labelled("digits", 16)
    assert n == 10 and (len(train), len(val)) == (1438, 359)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey -> 3 channels
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # 20 % of every class
    again, _, _ = build_labelled("DIGITS", 16)
    assert np.array_equal(again.targets, train.targets) and torch.equal(again[5][0], train[5][0])
    # the 8x8 image, upsampled: its mean brightness is kept
    from sklearn.datasets import load_digits

    assert abs(float(x.mean()) - float(train.images[0].mean()) / 16) < 0.02
    assert load_digits().images.shape[0] == len(train) + len(val)


def test_cifar10_pixels_labels_names_and_detection(cifar10_root):
    train, val, n = build_labelled(f"cifar10:{cifar10_root}", 32)
    assert n == 10 and len(train) == 15 and len(val) == 2
    assert train.classes[:2] == ["airplane", "automobile"]
    assert list(train.targets[:3]) == [1, 2, 3] and list(val.targets) == [0, 9]
    x, y = train[1]
    assert x.shape == (3, 32, 32) and y == 2
    assert x[0, 3, 5] == pytest.approx(200 / 255) and x[0, 3, 6] == pytest.approx(10 / 255)
    assert x[1, 3, 5] == pytest.approx(10 / 255)  # only the red plane was marked
    assert val[0][0][2, 31, 0] == pytest.approx(77 / 255)  # blue plane, last row, first column
    # a bare path (the parent or the pickle folder itself) is detected as CIFAR-10
    for spec in (str(cifar10_root), str(cifar10_root / "cifar-10-batches-py")):
        t, _, k = build_labelled(spec, 32)
        assert k == 10 and torch.equal(t[1][0], x)
    big, _, _ = build_labelled(str(cifar10_root), 48)
    assert big[1][0].shape == (3, 48, 48) and 0 <= big[1][0].min() and big[1][0].max() <= 1


def test_cifar100_fine_labels(cifar100_root):
    train, val, n = build_labelled(str(cifar100_root), 32)
    assert n == 100 and list(train.targets) == [5, 99, 0] and list(val.targets) == [42]
    assert train.classes[99] == "c99"
    assert train[2][0][1, 0, 31] == pytest.approx(250 / 255)


def test_image_folder_labels_and_transform(tmp_path):
    root = write_folder(tmp_path / "imgs")
    train, val, n = build_labelled(str(root), 24)
    assert n == 3 and train.classes == ["blue", "green", "red"]
    assert len(train) == 9 and len(val) == 3 and list(val.targets) == [0, 1, 2]
    x, y = val[2]
    assert x.shape == (3, 24, 24) and y == 2
    assert torch.allclose(x[:, 12, 12], torch.tensor([1.0, 0.0, 0.0]))
    assert build_labelled(f"folder:{root}", 24)[2] == 3


def test_augmented_stream_is_seeded_and_labelled(tmp_path):
    train, _, _ = build_labelled("digits", 16, augment=True)
    a, b = LabelledStream(train, seed=3), LabelledStream(train, seed=3)
    (xa, ya), (xb, yb) = a[7], b[7]
    assert torch.equal(xa, xb) and ya == yb == int(train.targets[a.index(7)])
    assert not torch.equal(xa, train[a.index(7)][0])  # augmented, unlike indexing
    root = write_folder(tmp_path / "imgs")
    ftrain, _, _ = build_labelled(str(root), 16, augment=True)
    x, y = LabelledStream(ftrain, seed=0)[4]
    assert x.shape == (3, 16, 16) and 0 <= y < 3


# --------------------------------------------------------------------------- errors


def _drop(path):
    os.remove(path)


@pytest.mark.parametrize("case", [
    "missing_val", "empty_class", "mismatched", "loose_file", "no_class_folders", "unknown", "missing_batch",
    "bad_shape", "bad_label", "not_a_pickle", "not_a_dict", "missing_root", "digits_with_path",
])
def test_bad_layouts_are_one_line_errors(case, tmp_path, cifar10_root):
    c10 = cifar10_root / "cifar-10-batches-py"
    spec = str(tmp_path / "imgs")
    if case == "missing_val":
        write_folder(tmp_path / "imgs")
        import shutil

        shutil.rmtree(tmp_path / "imgs" / "val")
        (tmp_path / "imgs" / "test").mkdir()
        spec = f"folder:{spec}"
    elif case == "empty_class":
        write_folder(tmp_path / "imgs")
        (tmp_path / "imgs" / "train" / "yellow").mkdir()
        (tmp_path / "imgs" / "val" / "yellow").mkdir()
    elif case == "mismatched":
        write_folder(tmp_path / "imgs", val_classes=("blue", "green", "violet"))
    elif case == "loose_file":
        write_folder(tmp_path / "imgs")
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "train" / "stray.png")
    elif case == "no_class_folders":
        (tmp_path / "imgs" / "train").mkdir(parents=True)
        (tmp_path / "imgs" / "val").mkdir()
    elif case == "unknown":
        spec = "imagenet-21k"
    elif case == "missing_batch":
        _drop(c10 / "data_batch_3")
        spec = f"cifar10:{cifar10_root}"
    elif case == "bad_shape":
        write_pickle(c10 / "data_batch_2", {b"labels": [1], b"data": np.zeros((1, 100), np.uint8)})
        spec = str(cifar10_root)
    elif case == "bad_label":
        write_pickle(c10 / "test_batch", {b"labels": [10], b"data": cifar_rows([0])})
        spec = str(cifar10_root)
    elif case == "not_a_pickle":
        (c10 / "data_batch_4").write_bytes(b"\x89PNG not a pickle")
        spec = str(cifar10_root)
    elif case == "not_a_dict":
        write_pickle(c10 / "data_batch_5", [1, 2, 3])
        spec = str(cifar10_root)
    elif case == "missing_root":
        spec = f"cifar100:{tmp_path / 'nowhere'}"
    elif case == "digits_with_path":
        spec = "digits:/tmp"
    with pytest.raises(GMAEError) as err:
        build_labelled(spec, 16)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


class RunsCode:
    """Unpickling this would call os.system (the classic malicious pickle)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_malicious_cifar_pickle_is_refused_without_running(payload, tmp_path, cifar10_root):
    marker = tmp_path / "pwned"
    evil = {"system": RunsCode(marker), "eval": RunsEval(),
            "nested": {b"data": cifar_rows([1]), b"labels": [RunsCode(marker)]}}[payload]
    write_pickle(cifar10_root / "cifar-10-batches-py" / "data_batch_1", evil if payload == "nested" else
                 {b"data": cifar_rows([1]), b"labels": [1], b"x": evil})
    with pytest.raises(GMAEError, match="refused") as err:
        build_labelled(str(cifar10_root), 32)
    assert "\n" not in str(err.value) and "data_batch_1" in str(err.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- kNN and linear probe


def clusters(n_per, centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.as_tensor(centers, dtype=torch.float32)
    y = torch.arange(len(c)).repeat_interleave(n_per)
    return c[y] + noise * torch.randn(len(y), c.shape[1], generator=g), y


def test_knn_on_clusters_is_perfect():
    centers = torch.eye(8)[:4] * 5
    tf, ty = clusters(30, centers, 0.3, 0)
    vf, vy = clusters(10, centers, 0.3, 1)
    assert knn_accuracy(tf, ty, vf, vy, k=20, T=0.07, num_classes=4) == 1.0


def test_temperature_weighting_can_overrule_the_majority():
    # query e0; one class-1 neighbour identical to it (cosine 1), three class-0
    # neighbours at cosine 0.8: weights e^(1/T) vs 3 e^(0.8/T)
    s = (1 - 0.8**2) ** 0.5
    train = torch.tensor([[1.0, 0, 0, 0], [0.8, s, 0, 0], [0.8, 0, s, 0], [0.8, 0, 0, s]])
    labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0, 0, 0]])
    assert knn_predict(train, labels, query, 2, k=4, T=0.07).item() == 1
    assert knn_predict(train, labels, query, 2, k=4, T=1000.0).item() == 0  # ~ majority vote
    assert knn_predict(train, labels, query, 2, k=1, T=1000.0).item() == 1


def test_linear_probe_separable_and_deterministic():
    centers = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 4
    tf, ty = clusters(40, centers, 0.5, 0)
    vf, vy = clusters(20, centers, 0.5, 1)
    assert linear_probe(tf, ty, vf, vy, 5, epochs=30) == 1.0
    # overlapping classes: not perfect, but the same seed gives the same answer
    tf, ty = clusters(40, centers / 6, 1.0, 2)
    vf, vy = clusters(40, centers / 6, 1.0, 3)
    runs = [linear_probe(tf, ty, vf, vy, 5, epochs=20, seed=s) for s in (7, 7)]
    assert runs[0] == runs[1] and 0.2 < runs[0] < 1.0
    torch.set_num_threads(2)  # the probe runs on one thread and gives the caller's setting back
    linear_probe(tf, ty, vf, vy, 5, epochs=1)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_extract_features_and_probe(cifar10_root):
    mcfg = model_config("tiny", **TINY)
    enc = random_encoder(mcfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(),
                                                   random_encoder(mcfg, seed=0).state_dict().values()))
    train, val, n = build_labelled(str(cifar10_root), 32)
    enc.train()
    f, y = extract_features(enc, train, batch_size=4, pool="cls", progress=False)
    assert f.shape == (15, 32) and torch.equal(y, torch.as_tensor(train.targets)) and enc.training
    f2, _ = extract_features(enc, train, batch_size=7, pool="cls", progress=False)
    assert torch.allclose(f, f2, atol=1e-5)  # batch size and masking noise do not matter
    fa, _ = extract_features(enc, train, batch_size=4, pool="avg", progress=False)
    assert fa.shape == f.shape and not torch.allclose(fa, f)
    result = probe(enc, (train, val, n), epochs=3, progress=False)
    assert {"linear_acc", "knn_acc", "num_train", "num_val", "feature"} <= set(result)
    assert result["num_train"] == 15 and result["num_val"] == 2 and 0 <= result["linear_acc"] <= 1
    assert result == probe(enc, str(cifar10_root), epochs=3, progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_probe_json_and_table(tmp_path, cifar10_root, capsys):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-0000001.pt")
    args = ["probe", "--checkpoint", str(ckpt), "--data", str(cifar10_root), "--epochs", "3"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"linear_acc", "knn_acc"} <= set(result) and result["random_init"] is False
    assert main([*args, "--json", "--random-init", "--pool", "avg"]) == 0
    assert json.loads(capsys.readouterr().out)["pool"] == "avg"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "linear_acc" in out and "knn_acc" in out
    assert main(["probe", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert main(["probe", "--checkpoint", str(ckpt), "--data", "nothing-here"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "error" in err


def test_cli_probe_reads_a_timm_pth_export_with_the_normalisation_given(tmp_path, cifar10_root, capsys):
    """A .pth timm export has no room for gmae's config: probed as it is, it is read as timm's and MAE's files
    (ImageNet-normalised); --normalize none gives back the model's own features, so the same probe results.
    A gmae checkpoint records its own normalisation, and another given for it is refused."""
    from gmae.io.export import export_checkpoint

    # one 64-wide head: the head count a file without config is read with (width // 64)
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-0000001.pt", embed_dim=64, num_heads=1)
    pth = export_checkpoint(ckpt, tmp_path / "vit.pth", fmt="timm")
    args = ["--data", str(cifar10_root), "--epochs", "3", "--json"]

    def probed(checkpoint, *extra):
        assert main(["probe", "--checkpoint", str(checkpoint), *args, *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        return result["input_norm"], (result["linear_acc"], result["knn_acc"], result["num_train"])

    own = probed(ckpt)
    assert own[0] == "none"
    assert probed(pth)[0] == "imagenet"
    assert probed(pth, "--normalize", "none") == own
    assert main(["probe", "--checkpoint", str(ckpt), *args, "--normalize", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records its own input normalisation (none)" in err
