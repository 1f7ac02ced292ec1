#!/usr/bin/env python
"""The scene-probe comparison of docs/evaluation.md: GMAE vs MAE vs random init, 3 seeds, on their own data.

For each data source D (dead-leaves, sprites), model M (gmae, mae) and seed S
this runs, with the ``gmae`` command of this environment:

    gmae pretrain --model M --data D --seed S --steps STEPS --out RUNS/M-D-sS --quiet --resume=auto
    gmae probe --checkpoint CKPT --data D --json [--baseline]      > RUNS/M-D-sS/scene-probe.json

(``--baseline`` for the GMAE runs only: the random-init encoder of seed S is
the same weights for both models, the encoder being built first from the same
seed.) Every command is appended to RUNS/commands.txt as it was run, and a
finished step is not run again. The probe settings are `gmae probe`'s
defaults, fixed before any result was seen: 2000 train / 1000 val images,
cls token, linear probe 100 epochs, kNN k = 20, T = 0.07.

    python experiments/probes/scene_probes.py --threads 1          # train and probe what is missing
    python experiments/probes/scene_probes.py --table              # mean ± std over the seeds, markdown
    python experiments/probes/scene_probes.py --runs runs/probe-4000 --steps 4000 --seeds 1 --data sprites   # longer
    python experiments/probes/scene_probes.py --finetune count --data sprites   # fine-tune on an image-level task instead

``--finetune TASK`` (count or shape) fine-tunes each finished run's encoder,
and the random-init one of its seed, with `gmae finetune`'s default recipe
(5 epochs of batch 32, layer decay 0.75, flips only) on ``D:TASK``:

    gmae finetune --checkpoint CKPT --data D:TASK --seed S --out RUNS/M-D-sS/ft-TASK[-init] --json [--random-init]

and ``--table`` then also prints the final val accuracy as mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner import final_checkpoint, run  # noqa: E402  (experiments/runner.py, shared by the studies)

DATA = ("deadleaves", "sprites")
MODELS = ("gmae", "mae")
TASKS = ("count", "shape", "front", "figure")

# The tiny preset's loss and positions when these runs were made (docs/reports/layout.md moved the default since).
BEFORE_LAYOUT_MAP = ["--loss", "masked", "--mask-ratio", "0.75", "--position-source", "head"]

def train_and_probe(runs: Path, gmae: str, model: str, data: str, seed: int, steps: int, threads: list[str]) -> None:
    run_dir = runs / f"{model}-{data}-s{seed}"
    result = run_dir / "scene-probe.json"
    if result.exists():
        return
    log = runs / "commands.txt"
    ckpt = final_checkpoint(run_dir)
    if ckpt is None or int(ckpt.stem.split("-")[1]) < steps:
        run([gmae, "pretrain", "--model", model, "--data", data, "--seed", str(seed), "--steps", str(steps),
             "--out", str(run_dir), "--quiet", "--resume=auto", *BEFORE_LAYOUT_MAP, *threads], log)
        ckpt = final_checkpoint(run_dir)
    partial = result.with_suffix(".part")
    with partial.open("w") as out:
        run([gmae, "probe", "--checkpoint", str(ckpt), "--data", data, "--json", *threads,
             *(["--baseline"] if model == "gmae" else [])], log, stdout=out)
    partial.replace(result)


def finetune(runs: Path, gmae: str, model: str, data: str, seed: int, task: str, steps: int,
             threads: list[str]) -> None:
    run_dir = runs / f"{model}-{data}-s{seed}"
    ckpt = final_checkpoint(run_dir)
    if ckpt is None or int(ckpt.stem.split("-")[1]) < steps:  # not pre-trained (yet)
        print(f"{run_dir.name}: not pre-trained to step {steps}; skipped")
        return
    for init in ([False, True] if model == "gmae" else [False]):  # random init: the same weights for both models
        out = run_dir / (f"ft-{task}" + ("-init" if init else ""))
        result = out.with_suffix(".json")
        if result.exists():
            continue
        partial = result.with_suffix(".part")
        with partial.open("w") as f:
            run([gmae, "finetune", "--checkpoint", str(ckpt), "--data", f"{data}:{task}", "--seed", str(seed),
                 "--out", str(out), "--json", *threads, *(["--random-init"] if init else [])], runs / "commands.txt",
                stdout=f)
        partial.replace(result)


def finetune_table(runs: Path) -> str:
    lines = ["| data | task (fine-tuned) | GMAE | MAE | random init | seeds |", "|---|---|---:|---:|---:|---:|"]
    for data in DATA:
        for task in ("count", "shape"):
            acc = {name: [json.loads(p.read_text())["val_acc"] for p in sorted(runs.glob(pattern))]
                   for name, pattern in (("gmae", f"gmae-{data}-s*/ft-{task}.json"),
                                         ("mae", f"mae-{data}-s*/ft-{task}.json"),
                                         ("init", f"gmae-{data}-s*/ft-{task}-init.json"))}
            if any(acc.values()):
                cells = " | ".join(mean_std(acc[n]) for n in ("gmae", "mae", "init"))
                lines.append(f"| {data} | {task} | {cells} | {len(acc['gmae'])}/{len(acc['mae'])}/{len(acc['init'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def mean_std(values) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(runs: Path) -> str:
    """Markdown: per data and task, linear / kNN accuracy (%) as mean ± std over seeds, and chance."""
    lines = ["| data | task | probe | GMAE | MAE | random init | chance | seeds |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for data in DATA:
        found = {m: [json.loads(p.read_text()) for p in sorted(runs.glob(f"{m}-{data}-s*/scene-probe.json"))]
                 for m in MODELS}
        for task in TASKS:
            for key, name in (("linear_acc", "linear"), ("knn_acc", "kNN")):
                gm = [r["encoders"]["pre-trained"][task][key] for r in found["gmae"]]
                rnd = [r["encoders"]["random init"][task][key] for r in found["gmae"]]
                ma = [r["tasks"][task][key] for r in found["mae"]]
                first = found["gmae"][0]["encoders"]["random init"][task] if found["gmae"] else None
                chance = f"{100 * first['chance']:.1f}" if first else "–"
                lines.append(f"| {data} | {task} ({first['kind'] if first else ''}) | {name} | {mean_std(gm)} | "
                             f"{mean_std(ma)} | {mean_std(rnd)} | {chance} | {len(gm)}/{len(ma)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/probe", help="folder of the runs (default runs/probe)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: FIRST .. FIRST + SEEDS - 1 (default 0)")
    p.add_argument("--steps", type=int, default=1200, help="pre-training steps (default 1200, the tiny preset's)")
    p.add_argument("--data", nargs="+", choices=DATA, default=list(DATA), help="data sources (default both)")
    p.add_argument("--threads", default=None, help="passed to every gmae command")
    p.add_argument("--finetune", choices=("count", "shape"), default=None,
                   help="fine-tune every finished run (and its seed's random init) on this image-level task")
    p.add_argument("--table", action="store_true", help="print the table of what is finished, and stop")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if args.table:
        print(table(runs))
        print(finetune_table(runs))
        return 0
    runs.mkdir(parents=True, exist_ok=True)
    gmae = str(Path(sys.executable).with_name("gmae"))
    threads = ["--threads", args.threads] if args.threads else []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for data in args.data:
            for model in MODELS:
                if args.finetune:
                    finetune(runs, gmae, model, data, seed, args.finetune, args.steps, threads)
                else:
                    train_and_probe(runs, gmae, model, data, seed, args.steps, threads)
    print(table(runs))
    print(finetune_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
