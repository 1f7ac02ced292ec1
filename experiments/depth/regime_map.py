#!/usr/bin/env python
"""The regime map of docs/reports/depth.md: where the Gaussians' depth and scale collapse, and where they stay free.

For each NAME given (see ``CONFIGS``; ``--list`` prints them) this runs

    gmae pretrain --out RUNS/NAME --quiet --threads 1 FLAGS...      (resumed if interrupted)

and scores the final checkpoint with the masked-region PSNR of `gmae ablate`
(held-out dead-leaves, 75% masked; ``gmae.evaluate.ablate.masked_psnr``), written to
RUNS/NAME/regime.json. ``--table`` prints the markdown table of every finished
run and ``--plot PNG`` the monitors' trajectories. Every command is appended to
RUNS/commands.txt as it was run.

The collapse monitors are those `gmae pretrain` logs in metrics.jsonl
(`gmae.model.gmae.gaussian_stats`): ``depth_at_limit`` (fraction of z with
|z| >= 0.99), ``scale_at_cap`` (fraction of scale entries at >= 99% of c),
``depth_spread`` (std of z over an image's Gaussians). "end" is the mean over
the last 5% of steps; "spread trend" is the end spread over the spread at 75%
of the run (mean of 5% of steps around it): below 1 the spread is shrinking
over the last quarter of training.

    python experiments/depth/regime_map.py previous-default c2 c3  # train these (one thread each: run two at once)
    python experiments/depth/regime_map.py --table                # the table so far
    python experiments/depth/regime_map.py --plot docs/reports/figures/regime_map.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner import final_checkpoint, train  # noqa: E402  (experiments/runner.py, shared by the studies)

# name -> gmae pretrain flags after PREVIOUS; everything else is the tiny preset (64 px, patch 8, k = 128, masked
# loss at 75%, blr 1.6e-2, 1200 steps of batch 16) with the default camera (authors) on dead-leaves, seed 0.
L4000 = ["--steps", "4000", "--checkpoint-every", "1000"]
P128 = ["--img-size", "128", "--patch-size", "16", "-k", "256"]
# Every configuration starts from the tiny default as it was before this map (c = 1, the authors' bounded z),
# spelled out so that the names keep their meaning now that the preset has moved (to c3-centred).
PREVIOUS = ["--max-scale", "1", "--depth-param", "bounded", "--loss", "masked", "--mask-ratio", "0.75",
            "--position-source", "head"]
CONFIGS: dict[str, list[str]] = {
    "previous-default": [],
    # Gaussians per pixel area: k / HW = 0.031 (default), 0.125 (512 = 128 tokens x 4)
    "k512m4": ["-k", "512", "--gaussians-per-query", "4"],
    # the size cap c
    "c2": ["--max-scale", "2"],
    "c3": ["--max-scale", "3"],
    "c4": ["--max-scale", "4"],
    # the loss: all pixels, a quarter masked
    "all25": ["--loss", "all", "--mask-ratio", "0.25"],
    "c2-all25": ["--max-scale", "2", "--loss", "all", "--mask-ratio", "0.25"],
    # the learning rate (blr 4e-3: lr 2.5e-4 at batch 16, a quarter of the default)
    "lr4": ["--blr", "4e-3"],
    "c2-lr4": ["--max-scale", "2", "--blr", "4e-3"],
    # z relative to the image's mean (--depth-param centred: no common drift)
    "centred": ["--depth-param", "centred"],
    "c3-centred": ["--max-scale", "3", "--depth-param", "centred"],
    "all25-centred": ["--loss", "all", "--mask-ratio", "0.25", "--depth-param", "centred"],
    "k512m4-centred": ["-k", "512", "--gaussians-per-query", "4", "--depth-param", "centred"],
    "c3-centred-4000": ["--max-scale", "3", "--depth-param", "centred", *L4000],
    # image size
    "128": P128,
    "c2-128": [*P128, "--max-scale", "2"],
    # length
    "previous-default-4000": L4000,
    "c2-4000": ["--max-scale", "2", *L4000],
    "c3-4000": ["--max-scale", "3", *L4000],
    # contrast: z not coupled to size (the orthographic camera), with a depth mechanism
    "ortho-swap": ["--camera", "orthographic", "--depth-grad", "swap"],
    "ortho-weighted": ["--camera", "orthographic", "--depth-grad", "weighted"],
}

MONITORS = ("depth_at_limit", "scale_at_cap", "depth_spread", "opacity_mean")


def train_and_score(name: str, runs: Path, gmae: str, psnr_images: int) -> None:
    run_dir = runs / name
    done = run_dir / "regime.json"
    if done.exists():
        print(f"{name}: already scored")
        return
    runs.mkdir(parents=True, exist_ok=True)
    train(gmae, run_dir, [*PREVIOUS, *CONFIGS[name]], runs / "commands.txt")
    from gmae.evaluate.ablate import masked_psnr
    from gmae.io.loader import load

    model = load(final_checkpoint(run_dir), "model")[0]
    summary = trajectory_summary(read_metrics(run_dir))
    summary["psnr"] = masked_psnr(model, images=psnr_images)
    summary["flags"] = CONFIGS[name]
    done.write_text(json.dumps(summary, indent=1))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def window_mean(lines: list[dict], key: str, centre: float, width: float = 0.05) -> float:
    """Mean of `key` over the logged steps within width/2 of the fraction `centre` of the run."""
    n = len(lines)
    lo, hi = int(n * (centre - width / 2)), int(n * (centre + width / 2))
    lo, hi = max(0, min(lo, n - 1)), max(1, min(hi, n))
    values = [r[key] for r in lines[lo:hi] if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def trajectory_summary(lines: list[dict]) -> dict:
    end = {k: window_mean(lines, k, 0.975) for k in MONITORS}
    spread_75 = window_mean(lines, "depth_spread", 0.75)
    return {
        "steps": lines[-1]["step"] + 1 if lines else 0,
        "end": end,
        "spread_trend": end["depth_spread"] / spread_75 if spread_75 > 0 else float("nan"),
        "loss": window_mean(lines, "loss", 0.975),
        "step_s": statistics.median(r["step_time"] for r in lines[10:]) if len(lines) > 10 else float("nan"),
        "curves": {k: [r.get(k) for r in lines[:: max(1, len(lines) // 200)]] for k in ("step", *MONITORS)},
    }


def fmt(x, digits=3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def finished(runs: Path) -> list[tuple[str, dict]]:
    names = list(CONFIGS) + sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name not in CONFIGS)
    out = []
    for name in names:
        try:
            out.append((name, json.loads((runs / name / "regime.json").read_text())))
        except (OSError, ValueError):
            continue
    return out


def table(runs: Path) -> str:
    head = ("| run | flags | steps | depth@limit | scale@cap | depth spread | spread trend | opacity | loss | "
            "masked PSNR (dB) | collapsed? |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in finished(runs):
        e = s["end"]
        free = e["depth_at_limit"] <= 0.10 and e["scale_at_cap"] <= 0.30 and s["spread_trend"] >= 0.95
        verdict = "free" if free else ", ".join(
            w for w, bad in (("depth", e["depth_at_limit"] > 0.10), ("scale", e["scale_at_cap"] > 0.30),
                             ("spread shrinking", s["spread_trend"] < 0.95)) if bad)
        rows.append(f"| {name} | `{' '.join(s['flags']) or '(c = 1, bounded z)'}` | {s['steps']} | "
                    f"{fmt(e['depth_at_limit'], 2)} | {fmt(e['scale_at_cap'], 2)} | {fmt(e['depth_spread'])} | "
                    f"{fmt(s['spread_trend'], 2)} | {fmt(e['opacity_mean'], 2)} | {fmt(s['loss'], 4)} | "
                    f"{fmt(s['psnr'], 2)} | {verdict} |")
    return "\n".join(rows)


def plot(runs: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = finished(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, s in done:
        c = s["curves"]
        for ax, key in zip(axes, ("depth_at_limit", "scale_at_cap", "depth_spread")):
            ax.plot(c["step"], c[key], label=name, lw=1.2)
    for ax, key in zip(axes, ("depth_at_limit", "scale_at_cap", "depth_spread")):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_xscale("symlog", linthresh=100)
    axes[0].axhline(0.10, color="k", ls=":", lw=0.8)
    axes[1].axhline(0.30, color="k", ls=":", lw=0.8)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="configurations to run, in order")
    p.add_argument("--runs", default="runs/regime", help="folder of the runs (default runs/regime)")
    p.add_argument("--gmae", default="gmae", help="the gmae command (default: gmae on PATH)")
    p.add_argument("--psnr-images", type=int, default=128, help="held-out images for the masked PSNR (default 128)")
    p.add_argument("--table", action="store_true", help="print the table of finished runs")
    p.add_argument("--plot", metavar="PNG", help="plot the monitors of finished runs to PNG")
    p.add_argument("--list", action="store_true", help="list the configurations")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if args.list:
        for name, flags in CONFIGS.items():
            print(f"{name:16s} {' '.join(flags)}")
        return 0
    unknown = [n for n in args.names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
    for name in args.names:
        train_and_score(name, runs, args.gmae, args.psnr_images)
    if args.table:
        print(table(runs))
    if args.plot:
        plot(runs, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
