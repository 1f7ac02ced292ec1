"""Training-loop features: data-parallel parity, gradient accumulation, bad-step handling, clipping."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gmae.config import model_config, train_config
from gmae.errors import GMAEError
from gmae.io.runs import learning_rate
from gmae.train import pretrain

FAST_MODEL = dict(img_size=32, patch_size=8, num_gaussians=32)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def run(out, steps=3, batch=4, **train):
    return pretrain(model_config("tiny", **FAST_MODEL),
                    train_config("tiny", steps=steps, batch_size=batch, out=str(out), warmup_steps=1, **train),
                    progress=False)


def test_learning_rate_schedule():
    cfg = train_config("tiny", steps=100, warmup_steps=10, blr=2.56e-2, batch_size=10)
    peak = 2.56e-2 * 10 / 256
    assert learning_rate(0, cfg) == pytest.approx(peak / 10)
    assert learning_rate(9, cfg) == pytest.approx(peak)
    assert learning_rate(10, cfg) == pytest.approx(peak)  # cosine starts at the peak
    assert learning_rate(55, cfg) == pytest.approx(peak / 2)  # half-way through the cosine
    assert learning_rate(99, cfg) < peak * 0.01


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    run(tmp_path / "full", accum_steps=1)
    run(tmp_path / "accum", accum_steps=2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "accum")), torch.tensor(losses(tmp_path / "full")),
                               rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_the_full_batch_with_the_depth_order_gradient(tmp_path):
    """The depth-order gradient's curvature is scaled like the loss, so accumulation still matches."""
    def run_depth(out, accum):
        return pretrain(model_config("tiny", **FAST_MODEL, depth_grad="swap", max_scale=4.0),
                        train_config("tiny", steps=3, batch_size=4, out=str(out), warmup_steps=1, accum_steps=accum),
                        progress=False)

    run_depth(tmp_path / "full", 1)
    run_depth(tmp_path / "accum", 2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "accum")), torch.tensor(losses(tmp_path / "full")),
                               rtol=1e-5, atol=1e-6)


def test_metrics_carry_the_collapse_monitors(tmp_path):
    run(tmp_path / "gmae", steps=2)
    with open(tmp_path / "gmae" / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    for key in ("scale_at_cap", "depth_spread", "depth_at_limit", "opacity_mean"):
        assert key in record
    assert 0 <= record["scale_at_cap"] <= 1 and 0 < record["opacity_mean"] < 1 and record["depth_spread"] > 0


def test_auto_backend_falls_back_to_one_with_the_depth_gradient_and_says_so(tmp_path, monkeypatch, capsys):
    import gmae.render as render

    monkeypatch.setattr(render, "DEPTH_GRAD_BACKENDS", {"torch"})  # as if the fast kernel lacked it
    pretrain(model_config("tiny", **FAST_MODEL, depth_grad="swap"),
             train_config("tiny", steps=1, batch_size=2, out=str(tmp_path / "a"), warmup_steps=1), progress=False)
    out = capsys.readouterr()
    assert "render backend: torch, because cpu has no depth-order gradient" in out.out + out.err
    with pytest.raises(GMAEError, match="render backend 'cpu' has no depth-order gradient"):
        pretrain(model_config("tiny", **FAST_MODEL, depth_grad="swap", render_backend="cpu"),
                 train_config("tiny", steps=1, batch_size=2, out=str(tmp_path / "b"), warmup_steps=1), progress=False)


def test_non_finite_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    from gmae.model.gmae import GMAE

    original = GMAE.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 2 else out

    monkeypatch.setattr(GMAE, "forward", flaky)
    summary = run(tmp_path / "skip", steps=4)
    assert summary["skipped_steps"] == 1
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r.get("skipped", False) for r in records] == [False, True, False, False]
    assert records[-1]["skipped_total"] == 1

    # a finite loss whose gradient is not finite is skipped too (no --clip-grad needed)
    calls["n"] = 0

    def bad_gradient(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            out.loss.register_hook(lambda g: g * float("inf"))
        return out

    monkeypatch.setattr(GMAE, "forward", bad_gradient)
    summary = run(tmp_path / "grad", steps=2)
    assert summary["skipped_steps"] == 1 and all(l == l and abs(l) != float("inf") for l in losses(tmp_path / "grad"))

    monkeypatch.setattr(GMAE, "forward", lambda self, *a, **k: (lambda o: o._replace(loss=o.loss * float("inf")))(
        original(self, *a, **k)))
    with pytest.raises(GMAEError, match="3 steps in a row"):
        run(tmp_path / "stop", steps=6, max_bad_steps=3)


def test_gradient_clipping_bounds_the_update(tmp_path):
    from gmae.io.loader import load

    run(tmp_path / "free", steps=1, blr=1.0)
    run(tmp_path / "clipped", steps=1, blr=1.0, clip_grad=1e-6)
    free = load(tmp_path / "free" / "checkpoint-0000001.pt", "checkpoint")["optimizer"]["state"]
    clipped = load(tmp_path / "clipped" / "checkpoint-0000001.pt", "checkpoint")["optimizer"]["state"]
    # Adam's second moment sees the clipped gradient: tiny when clipped to norm 1e-6
    v_free = sum(float(s["exp_avg_sq"].sum()) for s in free.values())
    v_clip = sum(float(s["exp_avg_sq"].sum()) for s in clipped.values())
    assert v_clip < v_free * 1e-6


def test_bf16_autocast_trains(tmp_path):
    summary = run(tmp_path, steps=2, precision="bf16")
    assert summary["skipped_steps"] == 0 and all(l == l for l in losses(tmp_path))


def test_impossible_batch_split_is_refused(tmp_path):
    with pytest.raises(GMAEError, match="multiple of accum-steps"):
        run(tmp_path, batch=4, accum_steps=3)


def test_two_process_gloo_run_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) reproduces the 1-process losses at the same global batch, the two
    processes accumulating micro-batches of 1 (--micro-batch: 2 each, DDP syncing on the last)."""
    args = ["-m", "gmae", "pretrain", "--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4",
            "--steps", "3", "--warmup-steps", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *args, "--micro-batch", "1", "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 3
    worst = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    print(f"DDP parity: worst relative loss difference {worst:.2e}")
    assert worst < 1e-5
    # only rank 0 wrote files: one metrics line per step, one set of checkpoints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    from gmae.io.loader import load

    assert load(tmp_path / "two" / "checkpoint-0000003.pt", "checkpoint")["config"]["train"]["accum_steps"] == 2


def test_torch_compile_matches_eager(tmp_path):
    """--compile runs (the numba renderer stays opaque to dynamo) and gives the eager losses."""
    run(tmp_path / "eager", steps=2)
    run(tmp_path / "compiled", steps=2, compile=True)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "compiled")), torch.tensor(losses(tmp_path / "eager")),
                               rtol=1e-4, atol=1e-5)


def test_bf16_losses_stay_within_two_percent_of_fp32(tmp_path, one_thread):
    """bf16 autocast on the CPU: the same short run's losses within 2% of fp32's (the Gaussians and the render stay
    float32; only the transformer's matmuls round), and not identical (bf16 really ran)."""
    run(tmp_path / "fp32", steps=4, precision="fp32")
    run(tmp_path / "bf16", steps=4, precision="bf16")
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 4 and fp32 != bf16
    for a, b in zip(bf16, fp32):
        assert a == pytest.approx(b, rel=0.02)


def test_resume_with_non_default_settings_is_bitwise_exact(tmp_path, one_thread):
    """The swap depth-order gradient, gradient accumulation (to an effective batch, by micro-batches), ImageNet
    input normalisation, two loader workers, 4 Gaussians per query, an EMA of the weights and the online probe (on
    sprites, whose labels it needs): a run stopped at step 2 and resumed ends with the weights, optimizer state,
    EMA, probe heads and probe optimizer of the uninterrupted run, bit for bit, and logs the same probe accuracies."""
    from gmae.io.loader import load

    mcfg = model_config("tiny", **FAST_MODEL, depth_grad="swap", gaussians_per_query=4, input_norm="imagenet")
    settings = dict(batch_size=4, warmup_steps=1, micro_batch=2, num_workers=2, checkpoint_every=2, ema=0.9,
                    data="sprites", online_probe=True)
    pretrain(mcfg, train_config("tiny", steps=4, out=str(tmp_path / "whole"), **settings), progress=False)
    pretrain(mcfg, train_config("tiny", steps=2, out=str(tmp_path / "split"), **settings), progress=False)
    pretrain(mcfg, train_config("tiny", steps=4, out=str(tmp_path / "split"), **settings), resume=True, progress=False)
    whole = load(tmp_path / "whole" / "checkpoint-0000004.pt", "checkpoint")
    split = load(tmp_path / "split" / "checkpoint-0000004.pt", "checkpoint")
    assert whole["config"]["model"]["depth_grad"] == "swap" and whole["config"]["train"]["accum_steps"] == 2
    assert whole["config"]["train"]["micro_batch"] == 2 and whole["config"]["model"]["input_norm"] == "imagenet"
    assert whole["model"].keys() == split["model"].keys()
    for name, value in whole["model"].items():
        assert torch.equal(value, split["model"][name]), name
    assert whole["ema"].keys() == split["ema"].keys() == whole["model"].keys()
    for name, value in whole["ema"].items():
        assert torch.equal(value, split["ema"][name]), name
    a, b = whole["optimizer"]["state"], split["optimizer"]["state"]
    assert a.keys() == b.keys() and len(a) > 0
    for i in a:
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]), (i, key)
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    for part in ("heads", "optimizer"):
        a, b = whole["online_probe"][part], split["online_probe"][part]
        a, b = (a["state"], b["state"]) if part == "optimizer" else ({0: a}, {0: b})
        assert a.keys() == b.keys() and len(a) > 0
        for i in a:
            assert a[i].keys() == b[i].keys()
            for key, value in a[i].items():
                assert torch.equal(value, b[i][key]), (part, i, key)

    def probe_accuracies(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k.startswith("online_probe/")} for line in f]

    assert probe_accuracies(tmp_path / "whole") == probe_accuracies(tmp_path / "split")
    assert len(probe_accuracies(tmp_path / "whole")[0]) == 12  # 6 blocks: accuracy and loss
