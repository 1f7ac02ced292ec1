#!/usr/bin/env python
"""The readouts re-measured on a regime of the layout map (docs/reports/layout.md), on sprites and dead-leaves, 3 seeds.

For each REGIME (a name of experiments/layout/layout_map.py's CONFIGS, whose flags it takes, less any --data), each data set
(sprites, dead-leaves) and each seed, this runs

    gmae pretrain --out RUNS/REGIME-DATA-sSEED --quiet --threads 1 --data DATA --seed SEED FLAGS...
    gmae eval-zeroshot --checkpoint RUN --data DATA --json --num-images N --threads 1
    gmae probe --checkpoint RUN --data DATA --json --threads 1          (the scene probes)

and writes RUN/readouts.json. ``--table`` prints mean ± std over the seeds of each run's scores: depth pair
accuracy and OOA against the border and size priors, edge ODS against Sobel, figure IoU against "all figure", the
layout figures, and the scene probes (count, shape, front, figure). Every command is appended to
RUNS/commands.txt.

    python experiments/layout/layout_readouts.py all25-pointer --seeds 0 1 2 --runs runs/readouts
    python experiments/layout/layout_readouts.py --table default all25-pointer --runs runs/readouts
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layout_map import CONFIGS, flags  # noqa: E402
from runner import run, train  # noqa: E402  (experiments/runner.py, shared by the studies)

DATA = ("sprites", "deadleaves")


def without_data(flags: list[str]) -> list[str]:
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f == "--data":
            skip = True
            continue
        out.append(f)
    return out


def measure(regime: str, data: str, seed: int, runs: Path, gmae: str, num_images: int) -> None:
    name = f"{regime}-{data}-s{seed}"
    out = runs / name
    if (out / "readouts.json").exists():
        print(f"{name}: already measured")
        return
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "commands.txt"
    train(gmae, out, ["--data", data, "--seed", str(seed), *without_data(flags(regime))], log)
    zeroshot = json.loads(run([gmae, "eval-zeroshot", "--checkpoint", str(out), "--data", data, "--json",
                               "--num-images", str(num_images), "--threads", "1"], log, capture=True))
    probes = json.loads(run([gmae, "probe", "--checkpoint", str(out), "--data", data, "--json", "--threads", "1"],
                            log, capture=True))
    (out / "readouts.json").write_text(json.dumps({"zeroshot": zeroshot, "probes": probes}, indent=1))
    print(f"{name}: done")


def _scores(r: dict) -> dict[str, float]:
    z, b = r["zeroshot"], r["zeroshot"]["baselines"]
    scores = {
        "pair": z.get("depth_pair_acc"), "pair (border prior)": b.get("border prior", {}).get("depth_pair_acc"),
        "OOA": z.get("depth_ooa"), "OOA (border prior)": b.get("border prior", {}).get("depth_ooa"),
        "OOA (size prior)": b.get("size prior", {}).get("depth_ooa"),
        "edge ODS": z.get("edge_ods"), "edge ODS (Sobel)": b.get("sobel", {}).get("edge_ods"),
        "figure IoU": z.get("fg_iou"), "figure IoU (all figure)": b.get("all figure", {}).get("fg_iou"),
        "spread ratio": z["layout"]["layout_spread_ratio"], "depth-rank corr": z["layout"]["depth_rank_corr"],
        "edge follow": z["layout"]["edge_follow"], "PSNR gain": z["fidelity"]["psnr_gain"],
    }
    for task, value in _probe_accuracies(r["probes"]).items():
        scores[f"probe {task}"] = value
    return {k: v for k, v in scores.items() if v is not None}


def _probe_accuracies(probes: dict) -> dict[str, float]:
    """{task: the linear probe's accuracy} of `gmae probe --json` on scene data (its "tasks")."""
    return {task: float(row["linear_acc"]) for task, row in probes.get("tasks", {}).items() if "linear_acc" in row}


def table(regimes: list[str], runs: Path) -> str:
    lines = []
    for data in DATA:
        rows = {}
        for regime in regimes:
            found = [json.loads(p.read_text()) for p in sorted(runs.glob(f"{regime}-{data}-s*/readouts.json"))]
            if found:
                rows[regime] = ([_scores(r) for r in found], len(found))
        if not rows:
            continue
        keys = list(next(iter(rows.values()))[0][0])
        lines.append(f"\n{data}\n\n| score | " + " | ".join(f"{r} ({n} seeds)" for r, (_, n) in rows.items()) + " |")
        lines.append("|---|" + "---|" * len(rows))
        for key in keys:
            cells = []
            for scores, _ in rows.values():
                values = [s[key] for s in scores if key in s]
                if not values:
                    cells.append("-")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.3f}")
                else:
                    cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("regimes", nargs="+", help="names of experiments/layout/layout_map.py's CONFIGS")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    p.add_argument("--runs", default="runs/readouts")
    p.add_argument("--num-images", type=int, default=64, help="eval-zeroshot images per run (default 64)")
    p.add_argument("--gmae", default=str(Path(sys.executable).parent / "gmae"))
    p.add_argument("--table", action="store_true", help="print the table of the finished runs, run nothing")
    args = p.parse_args(argv)
    unknown = [r for r in args.regimes if r not in CONFIGS]
    if unknown:
        p.error(f"unknown regime(s) {', '.join(unknown)}: see experiments/layout/layout_map.py --list")
    runs = Path(args.runs)
    if args.table:
        print(table(args.regimes, runs))
        return 0
    for regime in args.regimes:
        for data in args.data:
            for seed in args.seeds:
                measure(regime, data, seed, runs, args.gmae, args.num_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
