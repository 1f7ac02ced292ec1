"""`gmae plot`: the training curves of one or more runs on shared axes.

One panel per metric, all sharing the step axis: the loss first (raw, faint,
and a moving average on top; log scale), then the learning rate, then every
other number the runs logged in metrics.jsonl (fine-tuning's ``val_acc``, any
collapse statistics), so a GMAE run and its MAE baseline are compared at a
glance. Each run keeps one colour in every panel. Per-block metrics
(``NAME_block0``, ``NAME_block1``, ...: the online probe's
``online_probe/acc_blockI``) share one panel ``NAME``, a line per block, fainter
for shallower blocks and each marked with its block number at its end. Needs
matplotlib, not torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API needs no display backend

from ..errors import GMAEError

#: Fields of metrics.jsonl that are bookkeeping, not curves.
NOT_PLOTTED = ("step", "step_time", "imgs_per_s", "skipped", "skipped_total")
FIRST = ("loss", "lr")
#: A per-block metric: its panel's name and the block's number.
BLOCK_KEY = re.compile(r"^(?P<panel>.+)_block(?P<block>\d+)$")


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (`run` is the folder or the file); torn lines are skipped."""
    run = Path(run)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise GMAEError(f"{run} has no metrics.jsonl; give a run folder of gmae pretrain or finetune "
                        "(or its metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line of a killed run
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise GMAEError(f"{path} holds no metric lines yet; plot it once the run has logged a step")
    return records


def run_labels(runs: list[str | Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    folders = [Path(r).parent if Path(r).suffix == ".jsonl" else Path(r) for r in runs]
    names = [f.name or str(f) for f in folders]
    return [name if names.count(name) == 1 else str(folder) for name, folder in zip(names, folders)]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start), same length as `values`."""
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    end = np.arange(1, len(values) + 1)
    begin = np.maximum(0, end - max(1, window))
    return (sums[end] - sums[begin]) / (end - begin)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curves_figure(runs: list[str | Path], smooth: int | None = None) -> Figure:
    """The curves of `runs` (folders or metrics.jsonl files): one panel per metric, one colour per run.

    `smooth`: the loss's moving-average window, in logged steps (default: 1/50 of the longest run).
    """
    logs = [read_metrics(run) for run in runs]
    labels = run_labels(runs)
    found = {key for records in logs for r in records for key, value in r.items() if _is_number(value)}
    # Each panel: its name and its keys (one, or a per-block metric's blocks in block order).
    members: dict[str, list[tuple[int, str]]] = {}
    for key in found - set(NOT_PLOTTED):
        block = BLOCK_KEY.match(key)
        members.setdefault(block["panel"] if block else key, []).append((int(block["block"]) if block else -1, key))
    keys = [k for k in FIRST if k in members] + sorted(set(members) - set(FIRST))
    if not keys:
        raise GMAEError(f"the metrics of {', '.join(map(str, runs))} hold no curves (no loss, lr or other number)")
    if smooth is None:
        smooth = max(1, max(len(records) for records in logs) // 50)
    fig = Figure(figsize=(8, 1.2 + 2.4 * len(keys)), dpi=100)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(len(logs))]
    for ax, key in zip(axes, keys):
        if len(members[key]) > 1 or members[key][0][0] >= 0:
            _plot_blocks(ax, logs, labels, colours, sorted(members[key]))
        for records, label, colour in zip(logs, labels, colours):
            if key not in found:  # a per-block panel, drawn above
                break
            steps, values = _series(records, key)
            if not len(steps):
                continue
            if key == "loss" and smooth > 1:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.7)
                ax.plot(steps, moving_average(values, smooth), color=colour, linewidth=1.6, label=label)
            else:
                marker = "o" if len(steps) <= 50 else None  # sparse metrics (val_acc per epoch) as points
                ax.plot(steps, values, color=colour, linewidth=1.4, marker=marker, markersize=3, label=label)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        if key == "loss" and all((_series(r, key)[1] > 0).all() for r in logs):
            ax.set_yscale("log")
    title = "loss" + (f" (faint: each step; line: mean of {smooth})" if smooth > 1 and "loss" in keys else "")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


def _plot_blocks(ax, logs, labels, colours, blocks: list[tuple[int, str]]) -> None:
    """One line per block and run: the run's colour, more opaque for deeper blocks, the block number at its end."""
    for records, label, colour in zip(logs, labels, colours):
        for rank, (block, key) in enumerate(blocks):
            steps, values = _series(records, key)
            if not len(steps):
                continue
            alpha = 0.3 + 0.7 * (rank + 1) / len(blocks)
            ax.plot(steps, values, color=colour, alpha=alpha, linewidth=1.2, label=f"{label} block {block}")
            ax.annotate(str(block), (steps[-1], values[-1]), xytext=(3, 0), textcoords="offset points",
                        fontsize=7, color=colour, va="center")


def figure_path(out: str | Path) -> Path:
    """The file a figure asked for as `out` is written to: `out` itself when its extension names a format
    matplotlib writes (.png, .pdf, .svg, ...), `out` + ".png" when it has none. Any other extension is a
    GMAEError: matplotlib would otherwise write `out` + ".png" under a name nobody was told."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out)
    kind = out.suffix.lower().lstrip(".")
    if not kind:
        return out.with_name(out.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if kind not in formats:
        raise GMAEError(f"--out {out}: .{kind} is not an image format matplotlib writes; give a name ending in "
                        f".png (or one of .{', .'.join(sorted(formats))})")
    return out


def plot_runs(runs: list[str | Path], out: str | Path, smooth: int | None = None) -> Path:
    """:func:`curves_figure` of `runs` written to `out` (see :func:`figure_path`: .png is added when `out`
    has no extension); returns the path written."""
    out = figure_path(out)
    fig = curves_figure(runs, smooth)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


__all__ = ["curves_figure", "figure_path", "moving_average", "plot_runs", "read_metrics", "run_labels"]
