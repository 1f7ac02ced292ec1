"""The online probe (`gmae pretrain --online-probe`): it leaves the model's training exactly as it was, its heads
learn, its labels are those of the very images trained on, it resumes exactly, and data without labels is refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.io.loader import load
from gmae.config import model_config, train_config
from gmae.data import SeededStream, Sprites, build_dataset, source_labels
from gmae.errors import GMAEError
from gmae.train import pretrain

from conftest import TINY

FAST_MODEL = dict(img_size=32, patch_size=8, num_gaussians=32)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(out, steps=3, batch=4, model=FAST_MODEL, **train):
    return pretrain(model_config("tiny", **model),
                    train_config("tiny", steps=steps, batch_size=batch, out=str(out), warmup_steps=1, **train),
                    progress=False)


def test_the_probe_leaves_the_model_training_exactly_as_without_it(tmp_path, one_thread):
    """Same seed, with and without the probe (gradient accumulation on, so the hooks see two micro-batches a step):
    the model's weights, its optimizer state, the saved RNG and every logged loss are equal bit for bit."""
    settings = dict(steps=3, data="digits", accum_steps=2)
    run(tmp_path / "plain", **settings)
    run(tmp_path / "probed", online_probe=True, **settings)
    plain = load(tmp_path / "plain" / "checkpoint-0000003.pt", "checkpoint")
    probed = load(tmp_path / "probed" / "checkpoint-0000003.pt", "checkpoint")
    assert "online_probe" not in plain and probed["online_probe"]["classes"] == [str(d) for d in range(10)]
    assert plain["model"].keys() == probed["model"].keys()  # no head in the model's state dict
    for name, value in plain["model"].items():
        assert torch.equal(value, probed["model"][name]), name
    a, b = plain["optimizer"]["state"], probed["optimizer"]["state"]
    assert a.keys() == b.keys() and len(a) > 0
    for i in a:
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]), (i, key)
    assert torch.equal(plain["rng"]["torch"], probed["rng"]["torch"])
    assert [r["loss"] for r in records(tmp_path / "plain")] == [r["loss"] for r in records(tmp_path / "probed")]
    # the heads did train: their weights moved from the initial std-0.01 draw, and Adam holds their moments
    heads = probed["online_probe"]["heads"]
    assert sorted(heads) == sorted(f"heads.{i}.1.{p}" for i in range(6) for p in ("weight", "bias"))
    assert all(len(s) for s in probed["online_probe"]["optimizer"]["state"].values())
    assert heads["heads.5.1.bias"].abs().max() > 0  # initialised at 0


def test_heads_learn_the_digits_and_every_block_is_logged(tmp_path, one_thread):
    """40 steps of 32 digits on a 2-block model: the last block's probe ends far above chance (0.1) and its loss has
    fallen; every step logs each block's accuracy in [0, 1] and its loss.

    The encoder sees every patch here (mask ratio 0): the pooled features of 4 visible patches of this tiny, barely
    trained encoder hold little of the digit (a logistic regression fitted offline on them reaches 22% on held-out
    digits, against 38% with every patch), and this test is about the probe learning, not about them. Seeds 0, 1, 2
    end at 40%, 44%, 32% accuracy over the last 10 steps (loss 2.29 -> 1.76, 1.66, 1.94).
    """
    steps = 40
    # (the masked loss with nothing masked leaves the encoder as it starts: the figures above are of the probe)
    run(tmp_path, steps=steps, batch=32, model=dict(TINY, mask_ratio=0.0, loss="masked", position_source="head"),
        data="digits", online_probe=True, blr=0.5)
    logged = records(tmp_path)
    assert len(logged) == steps
    keys = {f"online_probe/{what}_block{i}" for what in ("acc", "loss") for i in range(2)}
    for r in logged:
        assert keys <= r.keys() and not any(k.startswith("online_probe/") and k not in keys for k in r)
        assert all(0.0 <= r[f"online_probe/acc_block{i}"] <= 1.0 for i in range(2))
        assert all(r[f"online_probe/acc_block{i}"] * 32 == round(r[f"online_probe/acc_block{i}"] * 32) for i in range(2))
    acc = [r["online_probe/acc_block1"] for r in logged]
    loss = [r["online_probe/loss_block1"] for r in logged]
    print(f"last block's online probe: accuracy {np.mean(acc[:5]):.3f} over the first 5 steps, "
          f"{np.mean(acc[-10:]):.3f} over the last 10; loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-10:]):.3f}")
    # chance is 0.1; over 320 images its spread is 0.017, so 0.2 is far out of its reach
    assert np.mean(acc[-10:]) > 0.2
    assert np.mean(loss[-10:]) < np.mean(loss[:5]) - 0.15


def test_labels_come_with_the_very_image_and_leave_the_image_stream_unchanged(tmp_path, monkeypatch):
    """Each source's labelled stream gives, for sample g, the unlabelled stream's image bit for bit and the truth of
    that image: the digit, the visible shapes of a sprite image (counted here from its object map), the count bin of
    dead-leaves (the scene probe's bins), the class folder of the file actually read."""
    from gmae.config.choices import SCENE_IMAGES
    from gmae.data.scenes import CountClasses, scene_labels, task_targets

    # The scene probes' train split, cut to 300 images for both routes below (its 2000 only cost time here).
    monkeypatch.setitem(SCENE_IMAGES, "train", 300)

    digits = build_dataset("digits", 16)
    labels = source_labels(digits, "digits", 16)
    plain, labelled = SeededStream(digits, 3), SeededStream(digits, 3, labels=labels)
    for g in (0, 1, 1437, 1438, 5000):  # across an epoch's end: a new permutation
        image, label = labelled[g]
        assert torch.equal(image, plain[g]) and label == digits.targets[plain.index(g)]
    assert labels.names == [str(d) for d in range(10)]

    sprites = build_dataset("sprites", 16, seed=4)
    labels = source_labels(sprites, "sprites", 16)
    assert labels.names == ["1", "2", "3", "4"]
    plain, labelled = SeededStream(sprites, 4), SeededStream(sprites, 4, labels=labels)
    seen = set()
    for g in range(40):
        image, label = labelled[g]
        objects = sprites.sample(plain.index(g)).objects
        assert torch.equal(image, plain[g]) and label == len(torch.unique(objects[objects > 0])) - 1
        seen.add(label)
    assert len(seen) >= 3  # the check ran over several classes

    leaves = build_dataset("deadleaves", 16, seed=5)
    labels = source_labels(leaves, "deadleaves", 16)
    # the scene probe's count classes at this size, from its own (slower) route
    train, val = (scene_labels("deadleaves", split, 16, 16, images=n, progress=False)
                  for split, n in (("train", None), ("val", 10)))
    assert task_targets("count", train, val)[3] == labels.names and len(labels.names) >= 3
    bins = CountClasses.fit("deadleaves", train.count)
    plain, labelled = SeededStream(leaves, 5), SeededStream(leaves, 5, labels=labels)
    for g in range(20):
        image, label = labelled[g]
        objects = leaves.sample(plain.index(g)).objects
        assert torch.equal(image, plain[g]) and label == bins(len(torch.unique(objects[objects > 0])))

    # a class tree whose second file is unreadable: its slot gets the next file's image, and that file's class
    rng = np.random.default_rng(0)
    for name in ("a/0.png", "a/1.png", "b/0.png", "b/1.png"):
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "tree" / name)
    (tmp_path / "tree" / "a" / "1.png").write_bytes(b"not a png")
    folder = build_dataset(str(tmp_path / "tree"), 16)
    labels = source_labels(folder, str(tmp_path / "tree"), 16)
    assert labels.names == ["a", "b"]
    image, label = labels.load(1, np.random.default_rng(7))
    assert label == 1 and torch.equal(image, folder.load(1, np.random.default_rng(7)))
    assert torch.equal(image, folder.load(2, np.random.default_rng(7)))
    assert [labels.load(i, np.random.default_rng(0))[1] for i in (0, 2, 3)] == [0, 1, 1]


def test_data_without_labels_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    from gmae.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(flat / "x.png")
    one_class = tmp_path / "one" / "cats"
    one_class.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(one_class / "x.png")
    for data, said in (("photos", "--data photos has none"), (str(flat), "x.png lies directly in"),
                       (str(tmp_path / "one"), "1 class folder(s)")):
        out = tmp_path / "run"
        args = ["pretrain", "--data", data, "--img-size", "32", "--patch-size", "8", "-k", "32", "--steps", "1",
                "--batch-size", "2", "--online-probe", "--quiet", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "digits" in err and "sprites" in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    with pytest.raises(GMAEError, match="at least 2 images per process"):
        run(tmp_path / "single", steps=1, batch=1, data="digits", online_probe=True)


def test_two_process_run_with_the_probe_trains_the_model_as_one_process_and_logs_global_accuracy(tmp_path, one_thread):
    """torchrun with 2 CPU processes and the probe: the model's losses are the 1-process run's (the probe's own
    all-reduce does not disturb DDP's), and the logged losses and accuracies are over all 8 images of each global
    batch: the 3-step heads, initialised near 0, still give a cross-entropy near ln 10 = 2.30 per image, which one
    process's 4 images summed over 8 would halve."""
    args = ["-m", "gmae", "pretrain", "--data", "digits", "--img-size", "32", "--patch-size", "8", "-k", "32",
            "--batch-size", "8", "--steps", "3", "--warmup-steps", "1", "--quiet", "--online-probe"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    run(tmp_path / "one", steps=3, batch=8, data="digits", online_probe=True)  # the same run, in one process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(r1) == len(r2) == 3
    assert max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(r1, r2)) < 1e-5
    eighths = [r[f"online_probe/acc_block{i}"] * 8 for r in r2 for i in range(6)]
    assert all(e == round(e) for e in eighths), eighths
    probe_losses = [r[f"online_probe/loss_block{i}"] for r in r2 for i in range(6)]
    assert all(2.0 < v < 2.7 for v in probe_losses), probe_losses
    assert "online_probe" in load(tmp_path / "two" / "checkpoint-0000003.pt", "checkpoint")


PROBE_LINES = [{"step": s, "loss": 0.3 - 0.1 * s, "lr": 1e-3, "opacity_mean": 0.5,
                **{f"online_probe/{what}_block{i}": 0.1 * (s + i) for what in ("acc", "loss") for i in (0, 1, 10)}}
               for s in range(3)]


def test_plot_draws_each_per_block_metric_in_one_panel(tmp_path):
    from gmae.viz.plot import curves_figure

    lines = PROBE_LINES
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    fig = curves_figure([run_dir], smooth=1)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "online_probe/acc", "online_probe/loss",
                                                    "opacity_mean"]
    acc = fig.axes[2]
    assert [line.get_label() for line in acc.get_lines()] == ["run block 0", "run block 1", "run block 10"]
    assert list(acc.get_lines()[2].get_ydata()) == pytest.approx([1.0, 1.1, 1.2])
    assert [t.get_text() for t in acc.texts] == ["0", "1", "10"]


def test_tensorboard_shows_the_online_probe_as_a_section_of_its_own():
    """Board.log's tags (the writer stubbed: tensorboard is an optional extra): train/NAME, but a name that already
    names a section keeps it."""
    from gmae.viz.board import Board

    class Writer:
        tags: list = []

        def add_scalar(self, tag, value, step):
            self.tags.append((tag, step))

    board = Board.__new__(Board)  # without its SummaryWriter
    board.writer = Writer()
    board.log(PROBE_LINES[1])
    tags = dict(board.writer.tags)
    assert tags["train/loss"] == 1 and tags["online_probe/acc_block10"] == 1 and "train/online_probe/acc_block10" not in tags
    assert len(tags) == 3 + 6


def test_resume_refuses_a_folder_whose_classes_changed(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a/0.png", "a/1.png", "b/0.png", "b/1.png", "c/0.png"):
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "tree" / name)
    c = tmp_path / "tree" / "c"
    c.rename(tmp_path / "c")  # the run starts with classes a and b
    settings = dict(batch=2, model=TINY, data=str(tmp_path / "tree"), online_probe=True)
    run(tmp_path / "run", steps=1, **settings)
    (tmp_path / "c").rename(c)
    with pytest.raises(GMAEError, match=r"classes \['a', 'b'\].*now has \['a', 'b', 'c'\] \(3\); resume with the data"):
        pretrain(model_config("tiny", **TINY), train_config("tiny", steps=2, batch_size=2, out=str(tmp_path / "run"),
                 warmup_steps=1, data=str(tmp_path / "tree"), online_probe=True), resume=True, progress=False)
