"""Fine-tuning and MAE's linear probe on many processes (torchrun, 2 CPU processes over gloo): the same run
as one process with the whole batch, a stop signal to one rank stopping both after the same step, and a
worker killed with SIGKILL resumed bitwise by torchrun's restart. A few tiny steps each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmae.io.checkpoint import list_checkpoints
from gmae.io.loader import load
from test_cluster import (ENV, assert_bitwise_equal, finish, kill_rank_1_and_restart, launch, stop_rank_1, torchrun,
                          weights)
from test_reliability import metrics

STEPS = 6


def finetune_cmd(ckpt: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    # Drop path on, so that the masks' independence of the process layout is part of what is compared.
    return [sys.executable, *launcher, "-m", "gmae", "finetune", "--checkpoint", str(ckpt), "--data", "digits",
            "--steps", str(STEPS), "--batch-size", "8", "--blr", "2e-2", "--eval-every", "3", "--drop-path", "0.3",
            "--device", "cpu", "--quiet", "--out", str(out), *extra]


def run(command: list[str], log: Path) -> str:
    status = finish(launch(command, log), log)
    text = log.read_text()
    assert status == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, ckpt):
    """An uninterrupted 2-process fine-tune of STEPS steps, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("ft2") / "ref"
    run(finetune_cmd(ckpt, out, "--checkpoint-every", "2", launcher=torchrun()), out.parent / "ref.log")
    return out


def test_finetune_on_two_processes_is_the_one_process_run(tmp_path, ckpt, two_process_run):
    one = tmp_path / "one"
    run(finetune_cmd(ckpt, one), tmp_path / "one.log")
    a, b = weights(one / f"checkpoint-{STEPS:07d}.pt"), weights(two_process_run / f"checkpoint-{STEPS:07d}.pt")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"finetune, 1 process x batch 8 vs 2 x 4: worst weight difference {worst:.1e}")
    assert worst < 1e-5
    m1, m2 = metrics(one), metrics(two_process_run)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(STEPS))  # rank 0 alone writes
    torch.testing.assert_close(torch.tensor([r["loss"] for r in m2]), torch.tensor([r["loss"] for r in m1]),
                               rtol=1e-5, atol=1e-6)
    # the val accuracy is all-reduced: each process scores half the images, the counts are summed
    assert [r.get("val_acc") for r in m2] == [r.get("val_acc") for r in m1]
    assert load(two_process_run / f"checkpoint-{STEPS:07d}.pt", "finetune-checkpoint")["step"] == STEPS


def test_a_signal_to_one_rank_stops_both_and_the_resume_is_bitwise(tmp_path, ckpt, two_process_run):
    out, log = tmp_path / "run", tmp_path / "run.log"
    stop = stop_rank_1(finetune_cmd(ckpt, out, "--checkpoint-every", "100", launcher=torchrun()), out, log)
    assert stop < STEPS
    assert [load(p, "finetune-checkpoint")["step"] for p in list_checkpoints(out)] == [stop]
    run(finetune_cmd(ckpt, out, "--resume", launcher=torchrun()), tmp_path / "resume.log")
    assert_bitwise_equal(two_process_run / f"checkpoint-{STEPS:07d}.pt", out / f"checkpoint-{STEPS:07d}.pt")


def test_a_worker_killed_with_sigkill_resumes_bitwise_under_max_restarts(tmp_path, ckpt, two_process_run):
    out, log = tmp_path / "run", tmp_path / "run.log"
    kill_rank_1_and_restart(finetune_cmd(ckpt, out, "--checkpoint-every", "2", "--resume=auto",
                                         launcher=torchrun("--max-restarts", "1")), out, log)
    assert_bitwise_equal(two_process_run / f"checkpoint-{STEPS:07d}.pt", out / f"checkpoint-{STEPS:07d}.pt")


PROBE_SCRIPT = """
import sys, torch
from gmae.config import model_config
from gmae.data.labelled import build_labelled
from gmae.evaluate.probe import mae_linear_probe, random_encoder
from gmae.runtime import distributed
ctx = distributed.init("cpu")
encoder = random_encoder(model_config("tiny", img_size=32, patch_size=8), seed=3)
train, val, classes = build_labelled("digits", 32, augment=True, progress=False)
out = mae_linear_probe(encoder, train, val, classes, epochs=2, batch_size=16, seed=1, ctx=ctx)
if ctx.is_main:
    torch.save({"acc": out["linear_acc"], "steps": out["linear_steps"], "head": out["head"].state_dict()}, sys.argv[1])
"""


def test_mae_probe_on_two_processes_is_the_one_process_probe(tmp_path):
    """The head N processes train (batch norm over the global batch, DDP on the head) is one process's."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    heads = {}
    for name, launcher in (("one", ()), ("two", torchrun())):
        run([sys.executable, *launcher, str(script), str(tmp_path / f"{name}.pt")], tmp_path / f"{name}.log")
        heads[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    one, two = heads["one"], heads["two"]
    assert one["steps"] == two["steps"] > 0
    worst = max((two["head"][k].double() - v.double()).abs().max().item() for k, v in one["head"].items())
    print(f"MAE probe, 1 process x batch 16 vs 2 x 8: worst head difference {worst:.1e}")
    assert worst < 1e-5
    assert int(two["head"]["0.num_batches_tracked"]) == one["steps"]
    assert abs(one["acc"] - two["acc"]) <= 0.01  # the same head to float rounding: a flip or two at most


def test_mae_probe_command_under_torchrun_reports_once(tmp_path, ckpt):
    proc = subprocess.run([sys.executable, *torchrun(), "-m", "gmae", "probe", "--checkpoint", str(ckpt), "--data",
                           "digits", "--protocol", "mae", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                           "--json"], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-2000:]  # the first process reports; the other trains and stays quiet
    assert lines[0]["protocol"] == "mae" and lines[0]["linear_batch"] == 32 and 0 <= lines[0]["linear_acc"] <= 1


def test_finetune_batch_must_split_over_the_processes(tmp_path, ckpt):
    log = tmp_path / "odd.log"
    status = finish(launch(finetune_cmd(ckpt, tmp_path / "odd", "--batch-size", "7", launcher=torchrun()), log), log)
    assert status != 0
    assert "batch size 7 must be a multiple of processes x accum-steps (2 x 1)" in log.read_text()


def test_submit_takes_a_multi_task_finetune_and_probe(tmp_path, capsys):
    from gmae.cli import main, parse_args
    from gmae.runtime.cluster import job_command

    args = parse_args(["submit", "--gpus-per-node", "2", "--nodes", "2", "finetune", "--checkpoint", "x"])
    assert args.job_args.command == "finetune"
    assert job_command(args.job)[-1] == "--resume=auto"  # a requeue continues the newest checkpoint
    probe = ["probe", "--checkpoint", "x", "--protocol", "mae"]
    args = parse_args(["submit", "--nodes", "4", "--gpus-per-node", "8", "--folder", str(tmp_path), *probe])
    assert args.job_args.command == "probe" and job_command(args.job) == probe  # no checkpoints: it starts over
    assert main(["submit", "--nodes", "2", *probe]) == 2  # the probe has no --out for the job's files
    assert "gmae probe has no --out: give submit's --folder" in capsys.readouterr().err
