"""The experiments behind docs/reports/gaussians_per_query.md: several Gaussians per query token.

Two commands (run from the repository root; each writes into --out and prints a markdown table):

  positions  absolute vs anchored positions at equal steps: tiny runs of each layout for each
             position parametrisation and seed, all launched at once (meant for one GPU), stopped
             at --deadline seconds (a second call continues them: `gmae pretrain --resume`); each
             layout's runs are then scored at the newest step all of them reached (masked PSNR on
             held-out dead-leaves, `gmae.evaluate.ablate.masked_psnr`).
  quality    k = 256 x 1, 64 x 4, 256 x 4 and 256 x 16 at equal wall time, one run at a time:
             first one interleaved benchmark of their training steps, then each run gets the steps
             that fit the wall time `--base-steps` steps of 256 x 1 take; scored by masked PSNR,
             `gmae probe --json` (digits) and `gmae eval-zeroshot --json` (dead-leaves: edges,
             figure-ground, depth order).

Every run is a plain `gmae pretrain` (the command is printed), so any row can be reproduced alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GMAE = [sys.executable, "-m", "gmae"]
# The tiny preset's loss and positions when these runs were made (docs/reports/layout.md moved the default since).
BEFORE_LAYOUT_MAP = ["--loss", "masked", "--mask-ratio", "0.75", "--position-source", "head"]
# (label, k, m): the layouts of the quality check (docs/reports/gaussians_per_query.md)
QUALITY = [("256x1", 256, 1), ("64x4", 256, 4), ("256x4", 1024, 4), ("256x16", 4096, 16)]
POSITION_LAYOUTS = [("64x4", 256, 4), ("256x16", 4096, 16)]


def pretrain_command(out: Path, k: int, m: int, position: str, seed: int, steps: int, extra: list[str]) -> list[str]:
    return [*GMAE, "pretrain", "-k", str(k), "--gaussians-per-query", str(m), "--position-param", position,
            "--seed", str(seed), "--steps", str(steps), "--out", str(out), "--quiet", *BEFORE_LAYOUT_MAP, *extra]


def newest_step(run: Path) -> int:
    from gmae.io.files import list_checkpoints

    found = list_checkpoints(run)
    return int(found[-1].stem.split("-")[1]) if found else 0


def psnr_at(run: Path, step: int, device: str) -> float:
    from gmae.evaluate.ablate import masked_psnr
    from gmae.io.loader import load

    model, _, _ = load(run / f"checkpoint-{step:07d}.pt", "model", device)
    return masked_psnr(model)


# --------------------------------------------------------------------------- positions


def positions(args) -> None:
    out = Path(args.out)
    extra = ["--device", args.device, "--render-backend", args.render_backend, "--precision", "fp32",
             "--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", "100"]
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, k, m in POSITION_LAYOUTS:
        for position in ("absolute", "anchored"):
            for seed in args.seeds:
                name = f"{label}-{position}-s{seed}"
                command = pretrain_command(out / name, k, m, position, seed, args.steps, [*extra, "--resume=auto"])
                print(" ".join(command[2:]), flush=True)
                with open(out / f"{name}.log", "w") as log:
                    runs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.time()
    while time.time() - start < args.deadline and any(p.poll() is None for p in runs.values()):
        time.sleep(5)
    for p in runs.values():  # checkpoints are written atomically: a stopped run keeps the ones it finished
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
    print(f"stopped after {time.time() - start:.0f} s", flush=True)
    rows = []
    for label, _, _ in POSITION_LAYOUTS:  # each layout at the newest step all of its runs reached
        names = [name for name in runs if name.startswith(f"{label}-")]
        step = min(newest_step(out / name) for name in names)
        for name in names:
            _, position, seed = name.rsplit("-", 2)
            rows.append({"layout": label, "position": position, "seed": int(seed[1:]), "step": step,
                         "psnr": psnr_at(out / name, step, args.device)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "positions.json").write_text(json.dumps(rows, indent=1))
    print("| layout | position | seed | step | masked PSNR (dB) |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['position']} | {r['seed']} | {r['step']} | {r['psnr']:.2f} |")


# --------------------------------------------------------------------------- quality


def step_times(batch_size: int, repeats: int, position: str) -> dict[str, float]:
    """Median seconds of one training step of each QUALITY layout, interleaved, on dead-leaves images."""
    import torch

    from gmae.bench.suite import timed_interleaved
    from gmae.config import model_config
    from gmae.data import DeadLeaves
    from gmae.model import build_model, masking_noise, param_groups

    source = DeadLeaves(64, seed=0)
    imgs = torch.stack([source.load(i) for i in range(batch_size)])
    steps = {}
    for label, k, m in QUALITY:
        cfg = model_config("tiny", num_gaussians=k, gaussians_per_query=m, position_param=position)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
        noise = masking_noise(0, 0, batch_size, cfg.num_patches)

        def step(model=model, opt=opt, noise=noise):
            loss = model(imgs, noise).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[label] = step
    return timed_interleaved(steps, repeats, warmup=2)


def quality(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing_file = out / "step_times.json"
    if timing_file.is_file():  # measured once: a re-run resumes with the same budgets
        times = json.loads(timing_file.read_text())
    else:
        load = os.getloadavg()
        times = {"step_s": step_times(16, args.repeats, args.position), "load_before": load,
                 "load_after": os.getloadavg(), "threads": os.environ.get("OMP_NUM_THREADS")}
        timing_file.write_text(json.dumps(times, indent=1))
    budget = args.base_steps * times["step_s"]["256x1"]
    print(f"step times (s): {times['step_s']}; budget {budget:.0f} s of steps per run", flush=True)
    rows = []
    for label, k, m in QUALITY:
        steps = max(1, round(budget / times["step_s"][label]))
        run = out / label
        command = pretrain_command(run, k, m, args.position, 0, steps, ["--resume=auto"])
        print(" ".join(command[2:]), flush=True)
        if newest_step(run) < steps:
            subprocess.run(command, check=True)
        scores_file = run / "scores.json"
        if not scores_file.is_file():
            probe = json.loads(subprocess.run([*GMAE, "probe", "--checkpoint", str(run), "--json"], check=True,
                                              capture_output=True, text=True).stdout)
            zero = json.loads(subprocess.run([*GMAE, "eval-zeroshot", "--checkpoint", str(run), "--json"],
                                             check=True, capture_output=True, text=True).stdout)
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            scores_file.write_text(json.dumps({
                "psnr": psnr_at(run, steps, "cpu"), "linear_acc": probe["linear_acc"], "knn_acc": probe["knn_acc"],
                "train_minutes": sum(r["step_time"] for r in metrics) / 60, "final_loss": metrics[-1]["loss"],
                **{key: zero[key] for key in ("edge_ods", "fg_iou", "depth_rank_spearman", "depth_pair_acc",
                                              "depth_pair_acc_touching")},
            }, indent=1))
        rows.append({"layout": label, "k": k, "m": m, "queries": k // m, "steps": steps,
                     "step_ms": 1e3 * times["step_s"][label], **json.loads(scores_file.read_text())})
        print(json.dumps(rows[-1]), flush=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    print("| queries x m = k | step (ms) | steps | train min | masked PSNR (dB) | linear | kNN | edge ODS | "
          "figure IoU | depth rho | depth pairs | touching pairs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
          "---:|---:|---:|")
    for r in rows:
        print(f"| {r['queries']} x {r['m']} = {r['k']} | {r['step_ms']:.0f} | {r['steps']} | "
              f"{r['train_minutes']:.1f} | {r['psnr']:.2f} | {r['linear_acc']:.3f} | {r['knn_acc']:.3f} | "
              f"{r['edge_ods']:.3f} | {r['fg_iou']:.3f} | {r['depth_rank_spearman']:.3f} | "
              f"{r['depth_pair_acc']:.3f} | {r['depth_pair_acc_touching']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("positions", help="absolute vs anchored positions at equal steps")
    p.add_argument("--out", default="runs/positions")
    p.add_argument("--device", default="cuda")
    p.add_argument("--render-backend", default="torch")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--deadline", type=float, default=420.0, help="seconds before the runs are stopped")
    p.set_defaults(func=positions)
    q = sub.add_parser("quality", help="the four layouts at equal wall time, scored")
    q.add_argument("--out", default="runs/gaussians_per_query")
    q.add_argument("--position", default="anchored", help="position parametrisation of the m > 1 runs")
    q.add_argument("--base-steps", type=int, default=1200, help="steps of 256 x 1; the others get its wall time")
    q.add_argument("--repeats", type=int, default=5)
    q.set_defaults(func=quality)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
