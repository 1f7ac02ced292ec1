"""The dataset registry: a data set registered in one call is read by pre-training, the probe and eval-zeroshot,
and every built-in name keeps reading what it read."""

import json

import numpy as np
import pytest
import torch

from gmae.cli import main
from gmae.config.choices import SCENE_DATA
from gmae.data import DeadLeaves, Photos, Sprites, build_dataset
from gmae.data.labelled import ArrayImages, build_labelled
from gmae.data.registry import Dataset, Truth, find, register, scene_names, unregister
from gmae.errors import GMAEError
from gmae.io.loader import load

FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet", "--threads", "1"]
CLASSES = ["left", "top"]


def toy_arrays(n: int, size: int, seed: int):
    """n grey squares, each with a bright half: the left half (class 0) or the top half (class 1)."""
    labels = np.random.default_rng(seed).integers(0, 2, n)
    images = np.full((n, 3, size, size), 40, np.uint8)
    for image, label in zip(images, labels):
        (image[:, :, : size // 2] if label == 0 else image[:, : size // 2])[...] = 220
    return images, labels


def toy_truth(option, size, num_images):
    images, _ = toy_arrays(num_images or 4, size, 3)
    return (Truth(f"toy-{i}", torch.from_numpy(x / 255.0).float(), None, x[0] > 128)
            for i, x in enumerate(images)), len(images)


# The whole registration of the toy data set: its images, its labels and its zero-shot truth.
TOY = Dataset(
    "toy", "grey squares with a bright half",
    images=lambda image_size, **_: ArrayImages(*toy_arrays(16, image_size, 0), CLASSES, image_size),
    labelled=lambda option, size, augment, progress: (ArrayImages(*toy_arrays(24, size, 1), CLASSES, size, augment),
                                                      ArrayImages(*toy_arrays(12, size, 2), CLASSES, size), 2),
    truth=toy_truth)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def test_a_registered_data_set_is_pretrained_on_probed_and_scored_zero_shot(toy, tmp_path, capsys):
    out = tmp_path / "run"
    # its images know their classes, so the online probe reads them too
    assert main(["pretrain", *FAST, "--data", "toy", "--steps", "2", "--online-probe", "--out", str(out)]) == 0
    assert load(out, "state")["online_probe"]["classes"] == CLASSES
    assert main(["probe", "--checkpoint", str(out), "--data", "toy", "--epochs", "2", "--warmup-epochs", "1",
                 "--json", "--threads", "1"]) == 0
    probed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (probed["data"], probed["num_train"], probed["num_val"], probed["num_classes"]) == ("toy", 24, 12, 2)
    assert main(["eval-zeroshot", "--checkpoint", str(out), "--data", "toy", "--num-images", "3", "--json",
                 "--threads", "1"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["data"] == "toy" and scored["num_images"] == 3
    assert 0 <= scored["fg_iou"] <= 1 and "edge_ods" not in scored  # the toy's truth has figures but no edges
    assert scored["baselines"]["all figure"]["fg_iou"] == pytest.approx(0.5)  # half of each square is bright


def test_the_toy_images_are_the_ones_its_builder_gives(toy):
    source = build_dataset(" TOY ", 16)
    assert isinstance(source, ArrayImages) and len(source) == 16
    images, _ = toy_arrays(16, 16, 0)
    assert torch.equal(source.load(3), torch.from_numpy(images[3] / 255.0).float())
    train, val, n = build_labelled("toy", 16)
    assert (len(train), len(val), n) == (24, 12, 2)


def test_built_in_names_and_aliases_build_the_same_sources():
    assert type(build_dataset("dead-leaves", 16)) is DeadLeaves and type(build_dataset("Dead_Leaves", 16)) is DeadLeaves
    assert type(build_dataset("sprites", 16)) is Sprites and type(build_dataset("skimage", 16)) is Photos
    assert find("dead-leaves") is find("deadleaves") and find("imagenett") is None


def test_a_name_is_registered_once_and_scene_data_is_the_registrys():
    with pytest.raises(GMAEError, match="taken"):
        register(Dataset("other", aliases=("sprites",)))
    assert find("other") is None
    # The command line checks --data against SCENE_DATA before torch loads; it must name the registry's generators.
    assert scene_names() == SCENE_DATA


def test_a_data_set_without_a_use_says_which_ones_have_it(toy):
    with pytest.raises(GMAEError, match=r"unknown evaluation data 'photos': use deadleaves, sprites, bsds:ROOT, "
                                        r"masks:ROOT, toy"):
        from gmae.evaluate.zeroshot import items

        items("photos", 16)
    with pytest.raises(GMAEError, match=r"data 'digits:/x': write it as digits"):
        build_labelled("digits:/x", 16)
    with pytest.raises(GMAEError, match=r"data 'cifar10:': write it as cifar10:ROOT"):
        build_labelled("cifar10:", 16)
