"""Reliability of `gmae pretrain` and the CLI: exact resume after kill -9,
fallback past a corrupt checkpoint, leftover temporary files, and one-line
errors (exit status 2) for bad user input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.io.checkpoint import list_checkpoints

from gmae.io.loader import load
from gmae.cli import main

# The brief's small run: dead-leaves (the default data), cpu renderer (auto on CPU).
FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet"]
STEPS = 12
TIMEOUT = 120.0  # seconds for any one subprocess wait


def metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by the kill
            pass
    return rows


def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out)]


def identity(path: Path) -> tuple[int, int]:
    """(inode, mtime): changes whenever the file is rewritten, even with the same bytes."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# --------------------------------------------------------------------------- kill -9


def pretrain_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gmae", "pretrain", *FAST, "--steps", str(STEPS),
            "--checkpoint-every", "2", "--out", str(out), *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)


def wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT} s:\n{log.read_text()}")
    assert rc == 0, f"exit status {rc}:\n{log.read_text()}"


def kill_mid_run(out: Path, log: Path) -> tuple[int, int] | None:
    """Start the run, SIGKILL it once a checkpoint exists and 3 more steps are logged.

    Returns (newest checkpoint step, metric lines) at the kill; None if the run
    finished before it could be killed (the caller retries).
    """
    proc = start(pretrain_cmd(out), log)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                return None
            ckpts = list_checkpoints(out)
            if ckpts:
                first = int(ckpts[0].name[11:18])
                if len(metrics(out)) >= first + 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:  # only on failure: never leave the child running
            proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    newest = list_checkpoints(out)[-1]
    return int(newest.name[11:18]), len(metrics(out))


def test_resume_after_kill_9_is_bitwise_exact(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = None
    try:
        for attempt in range(3):  # alone on the cores while it is watched for the moment to kill it
            killed = kill_mid_run(run_dir, tmp_path / "killed.log")
            if killed is not None:
                break
            shutil.rmtree(run_dir)  # finished before the kill: try again
        else:
            pytest.fail("the run always finished before it could be killed")
        at_step, lines = killed
        assert at_step < STEPS and lines < STEPS, "the kill must land mid-run"

        ref = start(pretrain_cmd(ref_dir), tmp_path / "ref.log")  # the uninterrupted run, alongside the resume
        log = tmp_path / "resume.log"
        wait(start(pretrain_cmd(run_dir, "--resume"), log), log)
        assert "starting from scratch" not in log.read_text()
    finally:
        if ref is not None:
            wait(ref, tmp_path / "ref.log")

    expected = step_losses(ref_dir)
    assert [s for s, _ in expected] == list(range(STEPS))
    got = step_losses(run_dir)
    assert [s for s, _ in got] == list(range(STEPS)), "a step is missing or duplicated"
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, expected))
    print(f"kill -9 at step {at_step} and resume: worst loss difference over {STEPS} steps {worst!r}")
    for (step, a), (_, b) in zip(got, expected):
        assert a == b, f"step {step}: loss {a!r} after kill -9 and resume, {b!r} uninterrupted"
    # the resumed run's last checkpoint reads and is at the end
    assert load(list_checkpoints(run_dir)[-1], "checkpoint")["step"] == STEPS


# --------------------------------------------------------------------------- damaged files


SHORT = [*FAST, "--steps", "6", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4, 6 (copied by each test)."""
    out = tmp_path_factory.mktemp("short")
    assert main(["pretrain", *SHORT, "--out", str(out)]) == 0
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-000000{s}.pt" for s in (2, 4, 6)]
    return out


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(short_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    expected = step_losses(short_run)
    newest = out / "checkpoint-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn by a crash (or a bad disk)
    previous = identity(out / "checkpoint-0000004.pt")
    capsys.readouterr()

    assert main(["pretrain", *SHORT, "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    warnings = [line for line in said.splitlines() if "checkpoint-0000006.pt" in line and "warning" in line.lower()]
    assert len(warnings) == 1, said
    assert "starting from scratch" not in said
    assert identity(out / "checkpoint-0000004.pt") == previous  # resumed from it, not from scratch
    assert step_losses(out) == expected  # bitwise, no missing or duplicated steps
    assert load(newest, "checkpoint")["step"] == 6  # rewritten whole


def test_leftover_tmp_file_is_ignored(short_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    expected = step_losses(short_run)
    # checkpoint 6 was being written when the process died: only its .tmp exists
    newest = out / "checkpoint-0000006.pt"
    tmp = out / "checkpoint-0000006.pt.tmp"
    tmp.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    newest.unlink()
    # and an older run's stray temporary file with a higher step
    (out / "checkpoint-0000008.pt.tmp").write_bytes(os.urandom(1000))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    previous = identity(out / "checkpoint-0000004.pt")
    capsys.readouterr()

    assert main(["pretrain", *SHORT, "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert ".tmp" not in said and "warning" not in said.lower(), said
    assert identity(out / "checkpoint-0000004.pt") == previous
    assert step_losses(out) == expected
    assert load(newest, "checkpoint")["step"] == 6
    assert not tmp.exists()  # replaced by the completed write


# --------------------------------------------------------------------------- bad input


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status of `gmae ARGV` (returned or raised as SystemExit) and its stderr lines."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's way out
        code = e.code
    err = capsys.readouterr().err
    return code, err.splitlines()


def assert_one_line_error(argv, capsys, *needles):
    code, lines = run_cli(argv, capsys)
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


def test_empty_image_folder(tmp_path, out, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(["pretrain", *FAST, "--steps", "1", "--data", str(empty), "--out", out], capsys, "empty")


def test_folder_with_only_a_non_image_file(tmp_path, out, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    assert_one_line_error(["pretrain", *FAST, "--steps", "1", "--data", str(folder), "--out", out], capsys, "docs")


def test_folder_with_only_an_unreadable_image(tmp_path, out, capsys):
    # (the real CLI also logs "skipping unreadable image ..." through logging
    # first; pytest captures log records apart from stderr)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert_one_line_error(["pretrain", *FAST, "--steps", "1", "--data", str(folder), "--out", out], capsys, "broken")


def test_zero_gaussians(out, capsys):
    assert_one_line_error(["pretrain", *FAST, "--steps", "1", "-k", "0", "--out", out], capsys, "0")


@pytest.mark.parametrize("flag,value", [
    ("--mask-ratio", "1.0"),
    ("--img-size", "30"),
    ("--blr", "-1"),
])
def test_bad_settings(flag, value, out, capsys):
    argv = ["pretrain", *FAST, "--steps", "1", "--out", out]
    i = argv.index(flag) if flag in argv else None
    if i is not None:
        argv[i + 1] = value
    else:
        argv[1:1] = [flag, value]
    assert_one_line_error(argv, capsys, value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(["pretrain", *FAST, "--steps", "1", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return list_checkpoints(out)[-1]


def bad_checkpoints(tmp_path):
    folder = tmp_path / "ckpt-dir.pt"
    folder.mkdir()
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    return {"directory": folder, "random bytes": noise, "foreign torch file": other}


# what the one line must say for each (besides the file name)
SAYS = {"directory": "folder", "random bytes": "cannot be read", "foreign torch file": "not a gmae checkpoint"}


@pytest.mark.parametrize("kind", ["directory", "random bytes", "foreign torch file"])
def test_bad_checkpoint_info(kind, tmp_path, capsys):
    path = bad_checkpoints(tmp_path)[kind]
    assert_one_line_error(["info", str(path)], capsys, path.name, SAYS[kind])


@pytest.mark.parametrize("kind", ["directory", "random bytes", "foreign torch file"])
def test_bad_checkpoint_reconstruct(kind, tmp_path, capsys):
    path = bad_checkpoints(tmp_path)[kind]
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert_one_line_error(["reconstruct", str(img), "--checkpoint", str(path), "--out", str(tmp_path / "f")],
                          capsys, path.name, SAYS[kind])


def test_reconstruct_truncated_jpeg(checkpoint, tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    rgb = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photo, quality=90)
    data = photo.read_bytes()
    photo.write_bytes(data[: len(data) // 2])
    assert_one_line_error(["reconstruct", str(photo), "--checkpoint", str(checkpoint),
                           "--out", str(tmp_path / "figs")], capsys, "photo.jpg")
    assert not (tmp_path / "figs" / "photo_reconstruction.png").exists()
