#!/usr/bin/env python
"""The depth experiment of docs/reports/depth.md: train named configurations on dead-leaves and score them.

For each NAME given (see ``CONFIGS``; ``--list`` prints them) this runs, with the
``gmae`` command of this environment:

    gmae pretrain --out RUNS/NAME --quiet FLAGS...            (resumed if interrupted)
    gmae eval-zeroshot --checkpoint CKPT --json [--num-images N]
    gmae eval-zeroshot --checkpoint CKPT --random-init --json [--num-images N]

and writes RUNS/NAME/eval-trained.json and eval-init.json. Every command is
appended to RUNS/commands.txt as it was run. ``--table`` prints the markdown
table of every finished run (trained, then at initialisation), with the final
loss (mean of the last 50 logged steps), the collapse monitors at the end and
the training speed (median step time; only comparable between runs made on an
otherwise idle machine).

    python experiments/depth/depth_sweep.py ortho-off authors-off ortho-swap     # run these
    python experiments/depth/depth_sweep.py --table                              # the table so far
    python experiments/depth/depth_sweep.py --timing ortho-off ortho-swap ...    # training-step cost, side by side
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner import final_checkpoint, run, train  # noqa: E402  (experiments/runner.py, shared by the studies)

# name -> gmae pretrain flags. All on dead-leaves, tiny encoder/decoder (the preset), seed 0.
# the tiny preset as it was when these runs were made (64 px, patch 8, k = 128, 1200 steps of batch 16, the masked
# loss at 75%, positions from the head): spelled out, so that the names keep their meaning as the preset moves
P64 = ["--loss", "masked", "--mask-ratio", "0.75", "--position-source", "head"]
P128 = ["--img-size", "128", "--patch-size", "16", "-k", "256"]
CONFIGS: dict[str, list[str]] = {
    # the three cameras / mechanisms at the tiny preset (c = 1)
    "ortho-off": [*P64, "--camera", "orthographic", "--depth-grad", "off"],
    "authors-off": [*P64, "--camera", "authors", "--depth-grad", "off"],
    "ortho-swap": [*P64, "--camera", "orthographic", "--depth-grad", "swap"],
    "authors-swap": [*P64, "--camera", "authors", "--depth-grad", "swap"],
    # larger Gaussians allowed
    "ortho-off-c4": [*P64, "--camera", "orthographic", "--depth-grad", "off", "--max-scale", "4"],
    "ortho-swap-c2": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "2"],
    "ortho-swap-c4": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4"],
    "authors-swap-c4": [*P64, "--camera", "authors", "--depth-grad", "swap", "--max-scale", "4"],
    "authors-off-c4": [*P64, "--camera", "authors", "--depth-grad", "off", "--max-scale", "4"],
    # sharper renders: loss on all pixels, fewer masked patches
    "ortho-swap-c4-all25": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                            "--loss", "all", "--mask-ratio", "0.25"],
    "ortho-off-c4-all25": [*P64, "--camera", "orthographic", "--depth-grad", "off", "--max-scale", "4",
                           "--loss", "all", "--mask-ratio", "0.25"],
    "authors-swap-c4-all25": [*P64, "--camera", "authors", "--depth-grad", "swap", "--max-scale", "4",
                              "--loss", "all", "--mask-ratio", "0.25"],
    "ortho-swap-all25": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--loss", "all",
                         "--mask-ratio", "0.25"],
    "ortho-off-all25": [*P64, "--camera", "orthographic", "--depth-grad", "off", "--loss", "all", "--mask-ratio", "0.25"],
    "authors-off-all25": [*P64, "--camera", "authors", "--depth-grad", "off", "--loss", "all", "--mask-ratio", "0.25"],
    "authors-swap-all25": [*P64, "--camera", "authors", "--depth-grad", "swap", "--loss", "all", "--mask-ratio", "0.25"],
    "ortho-swap-c2-all25": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "2",
                            "--loss", "all", "--mask-ratio", "0.25"],
    "ortho-swap-all25-lin": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--loss", "all",
                             "--mask-ratio", "0.25", "--depth-param", "linear"],
    "ortho-swap-all25-tau03": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--loss", "all",
                               "--mask-ratio", "0.25", "--depth-tau", "0.3"],
    # flat-topped Gaussians: opacity up to 50 (alpha saturates over a core, thin rims)
    "ortho-swap-c4-all25-o50": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                                "--loss", "all", "--mask-ratio", "0.25", "--max-opacity", "50"],
    "ortho-off-c4-all25-o50": [*P64, "--camera", "orthographic", "--depth-grad", "off", "--max-scale", "4",
                               "--loss", "all", "--mask-ratio", "0.25", "--max-opacity", "50"],
    # economy: every opaque Gaussian costs (fewer, larger, amodal Gaussians)
    "ortho-swap-c4-all25-o50-sparse": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                                       "--loss", "all", "--mask-ratio", "0.25", "--max-opacity", "50",
                                       "--opacity-reg", "0.01"],
    "ortho-swap-c4-all25-sparse": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                                   "--loss", "all", "--mask-ratio", "0.25", "--opacity-reg", "0.01"],
    # 128 px (16 px patches, k = 256), 2000 steps
    "ortho-swap-all25-128": [*P128, "--steps", "2000", "--camera", "orthographic", "--depth-grad", "swap",
                             "--loss", "all", "--mask-ratio", "0.25"],
    "authors-off-128": [*P128, "--steps", "2000", "--camera", "authors", "--depth-grad", "off"],
    # the other mechanism: order-free weighted compositing (torch backend)
    "ortho-weighted": [*P64, "--camera", "orthographic", "--depth-grad", "weighted"],
    "ortho-weighted-all25": [*P64, "--camera", "orthographic", "--depth-grad", "weighted", "--loss", "all",
                             "--mask-ratio", "0.25"],
    # non-saturating depth
    "ortho-swap-c4-lin": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                          "--depth-param", "linear"],
    "ortho-swap-c4-tau03": [*P64, "--camera", "orthographic", "--depth-grad", "swap", "--max-scale", "4",
                            "--depth-tau", "0.3"],
}

# The depth experiment again, in the free regime (docs/reports/depth.md, "in the free regime"): the tiny default after the
# regime map (c = 3, centred z; spelled out so that the names keep their meaning if the default moves) on
# sprites and dead-leaves, for each depth mechanism and seed; `-4000` runs 4000 steps.
FREE = ["--max-scale", "3", "--depth-param", "centred"]
for _data in ("sprites", "deadleaves"):
    for _grad in ("off", "swap", "weighted"):
        for _seed in (0, 1, 2):
            for _steps in (1200, 4000):
                CONFIGS[f"free-{_data}-{_grad}-s{_seed}" + ("-4000" if _steps == 4000 else "")] = [
                    *FREE, "--data", _data, "--depth-grad", _grad, "--seed", str(_seed), "--steps", str(_steps),
                    *(["--checkpoint-every", "1000"] if _steps == 4000 else [])]


def eval_data(flags: list[str]) -> list[str]:
    """eval-zeroshot's --data for a run: the generated source it was trained on (its truth is exact), else dead-leaves."""
    data = flags[flags.index("--data") + 1] if "--data" in flags else "deadleaves"
    return ["--data", data if data in ("deadleaves", "sprites") else "deadleaves"]


def train_and_score(name: str, runs: Path, gmae: str, num_images: int | None, threads: list[str] = ()) -> None:
    run_dir = runs / name
    log = runs / "commands.txt"
    flags = CONFIGS[name]
    metrics = run_dir / "metrics.jsonl"
    done = run_dir / "eval-init.json"
    if done.exists():
        print(f"{name}: already scored")
        return
    train(gmae, run_dir, flags, log, threads)
    ckpt = final_checkpoint(run_dir)
    extra = [*eval_data(flags), *threads, *(["--num-images", str(num_images)] if num_images else [])]
    for initial, path in (([], run_dir / "eval-trained.json"), (["--random-init"], done)):
        with open(path, "w") as out:
            run([gmae, "eval-zeroshot", "--checkpoint", str(ckpt), *initial, "--json", *extra], log, stdout=out)
    assert metrics.exists()


def summary(run_dir: Path) -> dict | None:
    try:
        trained = json.loads((run_dir / "eval-trained.json").read_text())
        init = json.loads((run_dir / "eval-init.json").read_text())
    except (OSError, ValueError):
        return None
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-50:]
    return {
        "trained": trained, "init": init,
        "loss": statistics.mean(r["loss"] for r in last),
        "step_s": statistics.median(r["step_time"] for r in lines[10:]) if len(lines) > 10 else float("nan"),
        "monitors": {k: lines[-1].get(k) for k in ("scale_at_cap", "depth_spread", "depth_at_limit", "opacity_mean")},
    }


def fmt(x, digits=3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def table(runs: Path) -> str:
    head = ("| run | loss | ODS | OIS | AP | fig. IoU | depth ρ | pair acc | touching | prior ρ / pair / touching | "
            "scale@cap | depth spread | steps/s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in list(CONFIGS) + sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name not in CONFIGS):
        s = summary(runs / name)
        if s is None:
            continue
        for label, r in (("", s["trained"]), (" (init)", s["init"])):
            prior = r["baselines"].get("border prior", {})
            m = s["monitors"] if not label else {}
            rows.append(
                f"| {name}{label} | {fmt(s['loss'], 4) if not label else ''} | {fmt(r.get('edge_ods'))} | "
                f"{fmt(r.get('edge_ois'))} | {fmt(r.get('edge_ap'))} | {fmt(r.get('fg_iou'))} | "
                f"{fmt(r.get('depth_rank_spearman'))} | {fmt(r.get('depth_pair_acc'))} | "
                f"{fmt(r.get('depth_pair_acc_touching'))} | {fmt(prior.get('depth_rank_spearman'))} / "
                f"{fmt(prior.get('depth_pair_acc'))} / {fmt(prior.get('depth_pair_acc_touching'))} | "
                f"{fmt(m.get('scale_at_cap'), 2) if m else ''} | {fmt(m.get('depth_spread'), 2) if m else ''} | "
                f"{fmt(1 / s['step_s'], 1) if not label else ''} |")
    return "\n".join(rows)


def free_table(runs: Path, steps: str = "") -> str:
    """The free-regime runs (free-DATA-GRAD-sSEED[-4000]) as mean ± std over their seeds, beside the priors."""
    import re

    groups: dict[tuple[str, str], list[dict]] = {}
    for d in sorted(runs.iterdir()) if runs.exists() else []:
        m = re.fullmatch(rf"free-(\w+)-(off|swap|weighted)-s(\d+){steps}", d.name)
        if m and (d / "eval-init.json").exists():  # written last: the run is scored
            groups.setdefault((m[1], m[2]), []).append(json.loads((d / "eval-trained.json").read_text()))
    keys = ("depth_rank_spearman", "depth_pair_acc", "depth_pair_acc_touching", "depth_ooa", "fg_iou", "edge_ods")

    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None and v == v]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    head = "| data | depth-grad | seeds | ρ | pair | touching | OOA | fig. IoU | edge ODS |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for (data, grad), results in sorted(groups.items()):
        rows.append(f"| {data} | {grad} | {len(results)} | " + " | ".join(cell([r.get(k) for r in results]) for k in keys)
                    + " |")
        for prior in ("border prior", "size prior", "reverse size prior", "all figure", "sobel"):
            if any(prior in r["baselines"] for r in results):
                rows.append(f"| | *{prior}* | | " + " | ".join(
                    cell([r["baselines"].get(prior, {}).get(k) for r in results]) for k in keys) + " |")
    return "\n".join(rows)


def size_order(run_dirs: list[str], num_images: int = 32) -> str:
    """What the depth order follows: per image, Spearman of z against each Gaussian's log volume and its
    opacity (held-out dead-leaves or sprites, as trained), the mean over images. Negative with size: the
    nearest are the largest."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from gmae.data import build_dataset
    from gmae.evaluate.zeroshot import EVAL_SEED
    from gmae.readouts.core import gaussians_of
    from gmae.io.loader import load

    lines = []
    for run_dir in run_dirs:
        model, cfg, state = load(run_dir, "model")
        data = state.get("config", {}).get("train", {}).get("data", "deadleaves")
        source = build_dataset(data if data in ("deadleaves", "sprites") else "deadleaves", cfg.img_size, EVAL_SEED)
        g = gaussians_of(model, torch.stack([source.load(i) for i in range(num_images)]))
        z, size, opacity = g.means[..., 2].numpy(), g.scales.prod(-1).log().numpy(), g.opacities.numpy()
        with_size = np.mean([spearmanr(z[b], size[b])[0] for b in range(len(z))])
        with_opacity = np.mean([spearmanr(z[b], opacity[b])[0] for b in range(len(z))])
        lines.append(f"{run_dir}: Spearman(z, log size) {with_size:+.3f}, Spearman(z, opacity) {with_opacity:+.3f} "
                     f"({num_images} held-out {data} images)")
    return "\n".join(lines)


def timing(names: list[str], repeats: int = 15) -> str:
    """Median training-step time of each configuration, timed interleaved in this process, over the first's."""
    import time

    import torch

    from gmae.cli import build_parser
    from gmae.config import model_config
    from gmae.data import DeadLeaves
    from gmae.model import build_model
    from gmae.train import masking_noise

    parser = build_parser()
    models, batches = {}, {}
    for name in names:
        args = parser.parse_args(["pretrain", *CONFIGS[name]])
        cfg = model_config(args.preset, **{k: getattr(args, k) for k in (
            "img_size", "patch_size", "num_gaussians", "max_scale", "max_opacity", "opacity_reg", "mask_ratio",
            "loss", "camera", "depth_grad", "depth_tau", "depth_param")})
        torch.manual_seed(0)
        models[name] = build_model(cfg)
        source = DeadLeaves(cfg.img_size, seed=0)
        batches[name] = (torch.stack([source.load(i) for i in range(16)]), masking_noise(0, 0, 16, cfg.num_patches))
    times = {name: [] for name in names}
    for i in range(repeats + 2):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(*batches[name]).loss.backward()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    return "\n".join(f"{name:32s} {statistics.median(t) * 1e3:7.1f} ms/step  {statistics.median(t) / base:5.2f}x"
                     for name, t in times.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="configurations to run, in order")
    p.add_argument("--runs", default="runs/depth", help="folder of the runs (default runs/depth)")
    p.add_argument("--gmae", default="gmae", help="the gmae command (default: gmae on PATH)")
    p.add_argument("--num-images", type=int, default=None, help="evaluation images (default: eval-zeroshot's 200)")
    p.add_argument("--threads", type=int, default=None, help="threads of each gmae command (give 1 to parallel sweeps)")
    p.add_argument("--table", action="store_true", help="print the table of finished runs")
    p.add_argument("--size-order", nargs="+", metavar="RUN", help="what these runs' depth order follows (size, opacity)")
    p.add_argument("--free-table", action="store_true",
                   help="print the free-regime runs (free-*) as mean ± std over seeds, beside the priors")
    p.add_argument("--list", action="store_true", help="list the configurations")
    p.add_argument("--timing", action="store_true",
                   help="instead of running NAMEs, time their training steps side by side (batch 16, forward + backward)")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if args.list:
        for name, flags in CONFIGS.items():
            print(f"{name}: {shlex.join(flags)}")
    for name in args.names:
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r} (see --list)")
    if args.timing:
        print(timing(args.names))
        return 0
    for name in args.names:
        train_and_score(name, runs, args.gmae, args.num_images, ["--threads", str(args.threads)] if args.threads else [])
    if args.size_order:
        print(size_order(args.size_order))
        return 0
    if args.free_table:
        print(free_table(runs))
        print()
        print(free_table(runs, "-4000"))
    elif args.table or not args.names:
        print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
