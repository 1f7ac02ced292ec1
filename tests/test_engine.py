"""The training engine on a toy task (least squares): the schedule with each group's lr_scale, micro-batches,
the one rule for non-finite steps, checkpoints and metrics, the projected time of a slow CPU run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import gmae.train.engine as engine_module
from gmae.errors import GMAEError
from gmae.io.checkpoint import list_checkpoints, run_state
from gmae.runtime.distributed import Context
from gmae.train.engine import Engine, Task, projection_line


class LeastSquares(Task):
    """loss = mean((x w - y)^2); `poison` steps give a NaN loss (a bad batch)."""

    def __init__(self, model, optimizer, poison=()):
        self.model, self.optimizer, self.poison, self.batch_size = model, optimizer, set(poison), 8

    def prepare(self, batch, step):
        x, y = batch
        if step in self.poison:
            x = x * float("nan")
        return x, y

    def loss(self, net, micro, scale):
        x, y = micro
        return ((net(x) - y) ** 2).mean() * scale, None

    def log(self, step, output):
        return {"w0": round(self.model.weight[0, 0].item(), 6)}

    def state(self, step):
        return run_state("toy", step, {}, self.model, self.optimizer)


def batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps)]


def setup(**cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=0.0)
    run = SimpleNamespace(**{"steps": 4, "seed": 0, **cfg})
    return model, optimizer, run


def test_each_group_gets_the_lr_times_its_scale():
    model, optimizer, run = setup()
    eng = Engine(model, optimizer, run, Context(), lambda step: 0.1 * (step + 1), progress=False)
    assert eng.set_lr(2) == pytest.approx(0.3)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.15), pytest.approx(0.3)]


def test_micro_batches_give_the_full_batch_step():
    data = batches(3)
    results = []
    for accum in (1, 4):
        model, optimizer, run = setup(steps=3, accum_steps=accum)
        Engine(model, optimizer, run, Context(), lambda step: 0.1, progress=False).run(
            LeastSquares(model, optimizer), data)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_a_non_finite_step_is_skipped_and_too_many_in_a_row_end_the_run(tmp_path):
    model, optimizer, run = setup(steps=4, max_bad_steps=2)
    before = {}

    class Watch(LeastSquares):
        def prepare(self, batch, step):
            before[step] = model.weight.detach().clone()
            return super().prepare(batch, step)

    eng = Engine(model, optimizer, run, Context(), lambda step: 0.1, tmp_path, progress=False)
    eng.run(Watch(model, optimizer, poison={1}), batches(4))
    assert torch.equal(before[1], before[2])  # the poisoned step changed nothing
    assert not torch.equal(before[2], before[3])  # the next one trained
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert math.isnan(records[1]["loss"]) and records[1]["skipped"] is True and records[3]["skipped_total"] == 1
    assert "skipped" not in records[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000004.pt"]

    model, optimizer, run = setup(steps=4, max_bad_steps=2)
    eng = Engine(model, optimizer, run, Context(), lambda step: 0.1, progress=False)
    with pytest.raises(GMAEError, match="2 steps in a row had a non-finite loss or gradient \\(last at step 2\\)"):
        eng.run(LeastSquares(model, optimizer, poison={1, 2}), batches(4))


def test_a_slow_cpu_run_says_its_projected_time_once(monkeypatch, capsys):
    assert projection_line(1.0, 10, torch.device("cpu")) is None  # 10 s: nothing to say
    line = projection_line(40.0, 400, torch.device("cpu"))
    assert "step 1 took 40.0 s: the remaining 400 steps would take about 4.4 hours" in line
    assert "days" in projection_line(600.0, 100_000, torch.device("cpu"))
    assert projection_line(40.0, 400, torch.device("cuda")) is None  # only the CPU is a surprise
    assert "step 2 took 3.0 s" in projection_line(3.0, 4000, torch.device("cpu"), step=2)
    monkeypatch.setattr(engine_module, "SLOW_RUN_S", 0.0)
    for trusted, said in ((math.inf, "step 2 took"), (0.0, "step 1 took")):
        # a short first step may be mostly compilation: the second is timed; a long one is trusted at once
        monkeypatch.setattr(engine_module, "TRUSTED_FIRST_STEP_S", trusted)
        model, optimizer, run = setup(steps=3)
        Engine(model, optimizer, run, Context(), lambda step: 0.1, progress=False).run(
            LeastSquares(model, optimizer), batches(3))
        err = capsys.readouterr().err
        assert err.count("on the CPU, step") == 1 and said in err, err


def test_resuming_at_a_step_continues_the_uninterrupted_run(tmp_path):
    data = batches(4)
    model, optimizer, run = setup(steps=4)
    Engine(model, optimizer, run, Context(), lambda step: 0.1 / (step + 1), progress=False).run(
        LeastSquares(model, optimizer), data)
    full = [p.detach().clone() for p in model.parameters()]
    model, optimizer, run = setup(steps=4, checkpoint_every=2)
    half = SimpleNamespace(**{**vars(run), "steps": 2})
    Engine(model, optimizer, half, Context(), lambda step: 0.1 / (step + 1), tmp_path, progress=False).run(
        LeastSquares(model, optimizer), data[:2])
    state = torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)
    model, optimizer, run = setup(steps=4)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    Engine(model, optimizer, run, Context(), lambda step: 0.1 / (step + 1), progress=False).run(
        LeastSquares(model, optimizer), data[2:], start=2)
    assert all(torch.equal(a, b) for a, b in zip(full, model.parameters()))
