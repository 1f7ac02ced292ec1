#!/usr/bin/env python
"""Detection transfer at small scale: GMAE vs MAE vs random init, 3 seeds, on sprites and dead-leaves instances.

The paper's COCO row (ViTDet's Mask R-CNN; AP^box / AP^mask, GMAE about equal to MAE) at CPU scale. This

1. pre-trains GMAE and MAE with the tiny preset's defaults (``gmae pretrain`` with no flags: 1200 steps on
   dead-leaves at 64 px; GMAE with the all-pixel loss at mask ratio 0.25 and pointer positions):

       gmae pretrain --out RUNS/pretrain-gmae --quiet --threads 1
       gmae pretrain --out RUNS/pretrain-mae --quiet --threads 1 --model mae

2. fine-tunes a detector on each encoder (and on a random one), on each data set, with each seed:

       gmae detect --checkpoint RUNS/pretrain-gmae --data sprites --seed 0 --threads 1 --json --quiet \\
           --out RUNS/sprites-gmae-s0 --resume=auto
       gmae detect --random-init --data sprites --seed 0 ...

   up to ``--jobs`` at a time (one thread each); a run cut short continues, a finished one is left alone;

3. ``--table`` prints AP^box, AP50^box, AP^mask and AP50^mask as mean ± std over the seeds, and the mean
   training time (the sum of metrics.jsonl's step times), as markdown.

Every command is appended to RUNS/commands.txt.

    python experiments/detection/detect_table.py --runs runs/detection --jobs 2
    python experiments/detection/detect_table.py --runs runs/detection --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner import run, train  # noqa: E402  (experiments/runner.py, shared by the studies)

DATA = ("sprites", "deadleaves")
ENCODERS = ("gmae", "mae", "random")
PRETRAIN = {"gmae": [], "mae": ["--model", "mae"]}


def detect(gmae: str, runs: Path, data: str, encoder: str, seed: int, args) -> None:
    out = runs / f"{data}-{encoder}-s{seed}"
    if (out / "results.json").exists():
        print(f"{out.name}: already measured", flush=True)
        return
    source = ["--random-init"] if encoder == "random" else ["--checkpoint", str(runs / f"pretrain-{encoder}")]
    with open(runs / f"{out.name}.log", "w") as log:
        run([gmae, "detect", *source, "--data", data, "--seed", str(seed), *args.extra, "--threads", "1", "--json",
             "--quiet", "--out", str(out), "--resume=auto"], runs / "commands.txt", stdout=log)
    print(f"{out.name}: done", flush=True)


def table(runs: Path, seeds: list[int]) -> str:
    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    def minutes(run: Path) -> float:
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return sum(r["step_time"] for r in steps) / 60

    lines = ["| data | encoder | AP^box | AP50^box | AP^mask | AP50^mask | training (min) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for data in DATA:
        for encoder in ENCODERS:
            done = [run for s in seeds if ((run := runs / f"{data}-{encoder}-s{s}") / "results.json").exists()]
            if not done:
                continue
            found = [json.loads((run / "results.json").read_text()) for run in done]
            lines.append(f"| {data} | {encoder} | {cell([r['bbox']['AP'] for r in found])} | "
                         f"{cell([r['bbox']['AP50'] for r in found])} | {cell([r['segm']['AP'] for r in found])} | "
                         f"{cell([r['segm']['AP50'] for r in found])} | "
                         f"{statistics.mean(minutes(run) for run in done):.1f} | {len(found)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/detection"))
    p.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    p.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--gmae", default=str(Path(sys.executable).parent / "gmae"), help="the gmae command")
    p.add_argument("--table", action="store_true", help="print the table of the runs in --runs and stop")
    p.add_argument("extra", nargs="*", help="further gmae detect flags, after -- (default: none, gmae detect's own "
                   "recipe: 600 steps of batch 8 at lr 1e-3)")
    args = p.parse_args()
    if args.table:
        print(table(args.runs, args.seeds))
        return
    gmae = args.gmae
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "commands.txt"
    pretrained = [e for e in args.encoders if e in PRETRAIN]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda e: train(gmae, args.runs / f"pretrain-{e}", PRETRAIN[e], log), pretrained))
    grid = [(d, e, s) for s in args.seeds for d in args.data for e in args.encoders]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: detect(gmae, args.runs, *job, args), grid))
    print(table(args.runs, args.seeds))


if __name__ == "__main__":
    main()
