"""The training engine: the one loop that pre-training, fine-tuning and MAE's linear probe run on.

A run is a model, its optimizer and a :class:`Task` (what one step computes: the loss of a micro-batch,
what to log, what a checkpoint holds). The engine owns everything else, the same way for all of them:

* the schedule: the lr of step s from ``lr_at(s)``, times each parameter group's ``lr_scale`` (layer-wise
  decay; 1 where a group has none);
* micro-batches: this process's share of a step is split into ``accum_steps`` parts whose gradients add up,
  and DDP all-reduces once, on the last (``no_sync`` before it);
* the gradient: its norm is always taken (clipped to ``clip_grad`` when that is set);
* non-finite steps, one rule: a step whose loss (averaged over the processes) or gradient norm is not
  finite is skipped on every process alike (the weights and the optimizer keep their values), and
  ``max_bad_steps`` such steps in a row end the run with a GMAEError. One bad batch in a long run costs a
  step, not the run; a run that has diverged stops instead of skipping forever;
* the EMA of the weights (when the task has one), updated after each applied step;
* metrics: the first process writes one JSON line per logged step (``log_every``) to ``metrics.jsonl``, with
  step, loss, lr, step_time and imgs_per_s of the global batch, plus what the task adds;
* the signal stop (gmae.runtime.stopping): a stop signal on any process stops every process after the same
  step, the checkpoint of that step is written and :class:`gmae.runtime.stopping.Stopped` is raised;
* atomic checkpoints (gmae.io.checkpoint.save_checkpoint) every ``checkpoint_every`` steps and at the end,
  the newest ``keep_checkpoints`` kept; what they hold is the task's (one layout for every task:
  gmae.io.checkpoint.run_state);
* the projected time: on the CPU, a run whose first step (or, when that one was short enough to be mostly
  kernel compilation, its second) says it would take more than an hour prints that once, so a ViT-B recipe
  started on a laptop says so instead of silently grinding.

Exact resume needs nothing more from the engine: the data of step s and every random draw of the task are
functions of (seed, step), so a run restarted at step s continues as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import GMAEError
from ..io.checkpoint import save_checkpoint
from ..io.files import check_output_folder, checkpoint_path, run_lock
from ..io.runs import MetricsLog, say
from ..runtime import distributed
from ..runtime.stopping import StopGuard, Stopped

__all__ = ["Engine", "Task", "projection_line", "run_folder", "SLOW_RUN_S", "TRUSTED_FIRST_STEP_S"]

#: On the CPU, a run whose first steps project past this many seconds says so once (projection_line).
SLOW_RUN_S = 3600.0
#: A first step at least this long is trusted for the projection: compiling kernels (numba's, on a fresh clone)
#: cannot account for most of it. A shorter one may be mostly compilation, so the second step is timed instead.
TRUSTED_FIRST_STEP_S = 60.0


class Task:
    """What one kind of training computes; the engine runs it. Override what applies."""

    #: The global batch (all processes, all micro-batches): imgs_per_s in the metrics.
    batch_size: int = 1

    def prepare(self, batch, step: int) -> tuple[torch.Tensor, ...]:
        """This process's share of step `step` from the loader's `batch`, on the device: tensors with the
        batch first (or lists, one entry per sample: a detector's images and targets), which the engine
        slices into micro-batches."""
        raise NotImplementedError

    def loss(self, net, micro: tuple[torch.Tensor, ...], scale: float):
        """(loss, output) of one micro-batch; the loss is already multiplied by `scale` (1 / micro-batches)."""
        raise NotImplementedError

    def after_step(self, step: int, output, applied: bool, lr: float) -> dict:
        """Work of every process after the optimizer step (an online probe, an evaluation); returns entries for
        the step's metrics record."""
        return {}

    def log(self, step: int, output) -> dict:
        """The first process's extra metrics at a logged step (monitors computed from the last output)."""
        return {}

    def logged(self, record: dict) -> None:
        """A metrics record the first process has just written (to pass on: TensorBoard)."""

    def state(self, step: int) -> dict:
        """The checkpoint written after `step` steps (gmae.io.checkpoint.run_state)."""
        raise NotImplementedError


@contextlib.contextmanager
def run_folder(out: str | Path, dist_timeout: float):
    """The block of a run that writes `out` (checked first): the first process holds the folder's lock (under
    torchrun the others write nothing), so a second run into it is refused; a collective that times out ends the
    block with one line naming the rank (gmae.runtime.distributed.rank_named_timeouts). Yields `out` as a Path."""
    out = check_output_folder(out)
    lock = run_lock(out) if distributed.rank_from_env() == 0 else contextlib.nullcontext()
    with lock, distributed.rank_named_timeouts(dist_timeout):
        yield out


class _Unguarded:
    """StopGuard's stand-in for a run without checkpoints: no signal is caught, so none is ever pending."""

    signum = 0

    def __enter__(self) -> _Unguarded:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stopping(self) -> None:
        pass


def projection_line(step_s: float, steps_left: int, device: torch.device, step: int = 1) -> str | None:
    """What a run on the CPU says after its `step`-th step (of this start) when the rest would take more than
    SLOW_RUN_S."""
    total = step_s * steps_left
    if device.type != "cpu" or total <= SLOW_RUN_S:
        return None
    hours = total / 3600
    span = f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.1f} days"
    return (f"on the CPU, step {step} took {step_s:.1f} s: the remaining {steps_left} steps would take about "
            f"{span}; a GPU (--device cuda) or a smaller model/recipe runs it in less")


class Engine:
    """One run's loop; see the module docstring. `cfg` is the run's config: steps, batch_size, seed and the
    engine's knobs (accum_steps, clip_grad, max_bad_steps, log_every, checkpoint_every, keep_checkpoints,
    stop_grace; a config without one gets the engine's default). `out` None writes nothing (no metrics, no
    checkpoints: MAE's probe run as a function)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, ctx: distributed.Context,
                 lr_at: Callable[[int], float], out: str | Path | None = None, *, net=None, amp=None, ema=None,
                 progress: bool = True, desc: str = "train"):
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.net = model if net is None else net  # what runs the forward: DDP's wrapper, a compiled model
        self.lr_at, self.amp, self.ema = lr_at, amp or contextlib.nullcontext(), ema
        self.out = None if out is None else Path(out)
        self.progress, self.desc = progress, desc
        self.steps = int(cfg.steps)
        self.accum = int(getattr(cfg, "accum_steps", 1))
        self.clip = float(getattr(cfg, "clip_grad", 0.0) or 0.0)
        self.max_bad = int(getattr(cfg, "max_bad_steps", 10))
        self.log_every = int(getattr(cfg, "log_every", 1))
        self.checkpoint_every = int(getattr(cfg, "checkpoint_every", 0)) or self.steps
        self.keep = int(getattr(cfg, "keep_checkpoints", 2))
        self.grace = float(getattr(cfg, "stop_grace", 60.0))
        self.loss_value, self.skipped = float("nan"), 0

    # ------------------------------------------------------------------ one step

    def set_lr(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        return lr

    def step(self, task: Task, parts: tuple[torch.Tensor, ...]):
        """One optimizer step over this process's share: (global mean loss, applied, last micro-batch's output)."""
        self.optimizer.zero_grad(set_to_none=True)
        n = len(parts[0])
        if n % self.accum:
            raise GMAEError(f"this process's batch of {n} does not split into {self.accum} micro-batches")
        micro = n // self.accum
        loss_sum = torch.zeros((), device=self.ctx.device)
        out = None
        for i in range(self.accum):
            # DDP all-reduces the gradients once, on the last micro-batch.
            last = i == self.accum - 1
            sync = self.net.no_sync() if self.ctx.distributed and not last and hasattr(self.net, "no_sync") \
                else contextlib.nullcontext()
            with sync:
                with self.amp:
                    loss, out = task.loss(self.net, tuple(p[i * micro:(i + 1) * micro] for p in parts),
                                          1.0 / self.accum)
                loss.backward()
            loss_sum += loss.detach().float()
        loss_value = distributed.mean_across(loss_sum, self.ctx).item()
        # The norm is taken even without clipping, so that a finite loss with an inf/NaN gradient is caught too
        # (clipping to inf multiplies by 1.0: the gradients are unchanged).
        ok = math.isfinite(loss_value)
        if ok:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip or math.inf)
            ok = math.isfinite(norm.item())
        if ok:
            self.optimizer.step()
        return loss_value, ok, out

    # ------------------------------------------------------------------ the loop

    def run(self, task: Task, loader, start: int = 0) -> float:
        """Train steps `start` .. cfg.steps - 1 on `loader`'s batches (one per step); returns the last loss.
        Raises Stopped after a stop signal (its step's checkpoint written), GMAEError after max_bad_steps."""
        ctx, main = self.ctx, self.ctx.is_main
        write = main and self.out is not None
        bad_in_a_row, stopped, projected = 0, None, False
        bar = tqdm(total=self.steps, initial=start, desc=f"{self.desc} ({ctx.device.type})",
                   disable=not (self.progress and main), dynamic_ncols=True)
        where = "" if self.out is None else str(self.out)
        # Log lines (an unreadable image skipped, ...) are printed above the bar, not into it. The stop signals
        # are caught from the first step until the run ends; before it, they end the process as ever.
        # A run that writes nothing has no checkpoint to stop at: signals end it as they end any process.
        with (StopGuard(self.grace, where) if self.out is not None else _Unguarded() as guard, bar,
              logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext(),
              MetricsLog(self.out / "metrics.jsonl") if write else contextlib.nullcontext() as metrics):
            for step, batch in enumerate(loader, start=start):
                t0 = time.perf_counter()
                lr = self.set_lr(step)
                parts = task.prepare(batch, step)
                self.loss_value, applied, output = self.step(task, parts)
                if applied and self.ema is not None:
                    self.ema.update(self.model)
                extra = task.after_step(step, output, applied, lr)
                bad_in_a_row = 0 if applied else bad_in_a_row + 1
                self.skipped += not applied
                if bad_in_a_row >= self.max_bad:
                    raise GMAEError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                                    f"{step}); lower the learning rate (--blr) or clip gradients (--clip-grad) and "
                                    "--resume")
                dt = time.perf_counter() - t0
                done = step + 1
                # The projected time, once: after the first step if it took long enough to trust, else the second.
                if main and (step == start + 1 or (step == start and dt >= TRUSTED_FIRST_STEP_S)) and not projected:
                    projected = True
                    if line := projection_line(dt, self.steps - done, ctx.device, step - start + 1):
                        say(line)
                if write and (step % self.log_every == 0 or done == self.steps):
                    record = {"step": step, "loss": self.loss_value, "lr": lr, "step_time": round(dt, 5),
                              "imgs_per_s": round(task.batch_size / dt, 2)}
                    record.update(task.log(step, output))
                    if self.skipped:
                        record.update(skipped=not applied, skipped_total=self.skipped)
                    record.update(extra)
                    metrics.write(record)
                    task.logged(record)
                bar.set_postfix(loss=f"{self.loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                # A stop signal on any process: all stop after this step (the last step just finishes).
                stop = distributed.max_across(guard.signum, ctx) if done < self.steps else 0
                if stop:
                    guard.stopping()  # this step's checkpoint is written whatever signal comes next
                if write and (stop or done % self.checkpoint_every == 0 or done == self.steps):
                    save_checkpoint(task.state(done), checkpoint_path(self.out, done), keep=self.keep)
                if stop:  # only a run with `out` catches signals (StopGuard), so there is a checkpoint to name
                    stopped = Stopped(stop, done, self.steps, str(checkpoint_path(self.out, done)), ctx.rank,
                                      ctx.world_size)
                    break
            if stopped is not None:
                distributed.barrier(ctx)  # no process leaves before the checkpoint is written
        if stopped is not None:
            raise stopped
        return self.loss_value
