"""Run infrastructure: what the training loops (`gmae pretrain`, `gmae finetune`) share.

* the schedule: :func:`learning_rate` (MAE's: linear warmup, then half-cycle cosine);
* ``metrics.jsonl``: :func:`prepare_metrics` (what a run keeps when it starts or
  resumes) and :class:`MetricsLog` (one JSON object per line, each flushed);
* the resume policy: :func:`resume_from` (which checkpoint a run into a folder
  continues, or a fresh start), :func:`refuse_changes` (a flag typed on the
  command line that contradicts the saved settings is an error, not ignored)
  and :func:`resumed_config` (the saved settings, except those a resume may change);
* checkpoint discovery: checkpoints are named by :func:`gmae.io.files.checkpoint_path`
  and listed by :func:`gmae.io.files.list_checkpoints`; the newest readable one is
  :func:`gmae.io.loader.find_latest`, and any model file is read by
  :func:`gmae.io.loader.load`;
* :func:`autocast` (the loops' precision setting) and :func:`say` (a line above
  the progress bar).

Everything here imports downward (checkpoint and export formats, models,
configs); the loops import it, never each other.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import GMAEError
from .files import list_checkpoints
from .loader import find_latest

__all__ = ["MetricsLog", "autocast", "learning_rate", "metric_lines", "prepare_metrics",
           "refuse_changes", "resume_from", "resumed_config", "say"]


def say(message: str) -> None:
    """A line for the user on stderr, above the progress bar rather than inside it."""
    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- schedule


def learning_rate(step: int, cfg) -> float:
    """MAE's schedule: lr = blr * batch / 256, linear warmup, then half-cycle cosine to min_lr.

    `cfg` is a run's config (`TrainConfig` or `FinetuneConfig`): blr, batch_size, warmup_steps, steps, min_lr.
    """
    peak = cfg.blr * cfg.batch_size / 256
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast(precision: str, device: torch.device):
    """The loops' precision: bf16 autocast for "bf16", and for "auto" on CUDA; else a disabled autocast (fp32)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# --------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """A run's ``metrics.jsonl`` opened for appending: :meth:`write` adds one JSON object as one line and
    flushes it, so a run killed at any moment leaves every line it logged (the last one possibly torn)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> MetricsLog:
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def metric_lines(path: str | Path) -> list[str]:
    """The lines of a run's metrics.jsonl ([] when there is none)."""
    path = Path(path)
    return path.read_text().splitlines() if path.is_file() else []


def prepare_metrics(path: str | Path, start: int, warn: Callable[[str], None]) -> None:
    """Make `path` (a run's metrics.jsonl) hold exactly the steps before `start`, where the run (re)starts.

    Resuming (start > 0): a run killed after its last checkpoint left lines of
    steps that checkpoint does not cover; they are dropped, and `warn` says how
    many (the resumed run writes those steps again, with the same values).
    A fresh start (start = 0) in a folder whose metrics.jsonl holds the lines
    of an earlier run that wrote no checkpoint: that file is kept, renamed
    to metrics.old-N.jsonl, never erased.
    """
    path = Path(path)
    lines = [line for line in metric_lines(path) if line.strip()]
    if not lines:
        return
    if start == 0:
        n = 1
        while (aside := path.with_name(f"{path.stem}.old-{n}{path.suffix}")).exists():
            n += 1
        os.replace(path, aside)
        warn(f"{path} held {_lines(len(lines))} of an earlier run that wrote no checkpoint; "
             f"kept as {aside.name}, starting afresh")
        return
    kept, dropped = [], []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped.append(None)  # a torn last line from a killed run
            continue
        if step < start:
            kept.append(line)
        else:
            dropped.append(step)
    if not dropped:
        return
    steps = [s for s in dropped if s is not None]
    span = f" (steps {min(steps)}-{max(steps)})" if steps else ""
    warn(f"dropped {_lines(len(dropped))} of {path.name}{span} written after the checkpoint; "
         "this run writes those steps again")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def _lines(n: int) -> str:
    return "1 line" if n == 1 else f"{n} lines"


# --------------------------------------------------------------------------- resume


def resume_from(out: str | Path, resume: bool | str, warn=print,
                what: str = "checkpoint") -> tuple[Path, dict] | None:
    """(path, state) of the checkpoint a run into `out` continues, or None for a fresh start: the newest
    file :func:`gmae.io.loader.load` reads as `what` ("checkpoint" or "finetune-checkpoint").

    resume False: a fresh run, refused if `out` holds checkpoints (it would
    prune them). True: the newest readable checkpoint, and a GMAEError if
    there is none -- resuming with nothing to resume from is a mistake, not a
    reason to start over. "auto": that checkpoint if there is one, else a
    fresh start (said through `warn` when checkpoints exist but none reads).
    Nothing in `out` is touched here.
    """
    existing = list_checkpoints(out)
    if not resume:
        if existing:
            raise GMAEError(f"{out} already holds checkpoints of another run; add --resume to continue it "
                            "or choose a new --out")
        return None
    found = find_latest(out, warn, what)
    if found is None and resume == "auto":
        if existing:
            warn(f"none of the {len(existing)} checkpoints in {out} can be read; starting afresh")
        return None
    if found is None:
        if existing:
            raise GMAEError(f"--resume: none of the {len(existing)} checkpoints in {out} can be read; "
                            "move them away to start a new run there")
        lines = len(metric_lines(Path(out) / "metrics.jsonl"))
        why = (f" (its metrics.jsonl has {lines} lines of a run stopped before its first checkpoint)" if lines
               else "" if Path(out).is_dir() else " (the folder does not exist)")
        raise GMAEError(f"--resume: there is no checkpoint in {out} to continue{why}; run without --resume to "
                        "start a new run there, or with --resume=auto to continue only when there is one")
    return found


def refuse_changes(given: dict[str, str], resumable: tuple[str, ...], now: dict, saved: dict) -> None:
    """Refuse a resume whose command line contradicts the checkpoint it continues.

    given: {setting: flag} of the flags the user typed; now and saved: {setting: value} of the command
    line's and the checkpoint's settings. A typed flag that a resume may not change (not in
    `resumable`, not ``out``) and whose value differs from the saved one is named, with both values,
    in one GMAEError; nothing is refused when they agree.
    """
    conflicts = [f"{flag} (saved {_shown(saved.get(key))}, given {_shown(now[key])})" for key, flag in given.items()
                 if key in now and key not in resumable and key != "out" and now[key] != saved.get(key)]
    if conflicts:
        raise GMAEError(f"--resume continues the checkpoint's settings, and the command line contradicts them: "
                        f"{', '.join(conflicts)}; drop {'this flag' if len(conflicts) == 1 else 'these flags'} "
                        "to continue, or give a new --out to start another run")


def _shown(value) -> str:
    return "none" if value is None else str(value)


def resumed_config(saved, given, changes: tuple[str, ...], resumable: tuple[str, ...]):
    """The config a resumed run continues with: `saved` (the checkpoint's), with `given`'s output folder and
    `given`'s values of the `changes` fields that are `resumable` (what the command line set)."""
    return replace(saved, out=given.out, **{k: getattr(given, k) for k in changes if k in resumable})
