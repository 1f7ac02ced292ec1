#!/usr/bin/env python
"""Fine-tuning recipes at small scale (docs/evaluation.md): gmae's default vs MAE's ViT-B recipe scaled down.

For each encoder (GMAE and MAE pre-trained on dead-leaves by experiments/probes/scene_probes.py, and the random init
of the same architecture), seed S and recipe R this runs, with the ``gmae`` command of this environment:

    gmae finetune --checkpoint CKPT --data digits --seed S --out RUNS/ENC-sS-R --json [--random-init] FLAGS(R)

The recipes (both 5 epochs of batch 32 at lr 1e-3, so that they differ only in what MAE adds):

* ``default``: `gmae finetune`'s defaults (layer decay 0.75, drop path 0.1, label smoothing 0.1, one
  warmup epoch, crops only);
* ``mae-b``: ``--recipe mae-finetune-vit-b`` (layer decay 0.65, drop path 0.1, smoothing 0.1, mixup 0.8,
  cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, average pooling) scaled down:
  ``--epochs 5 --batch-size 32 --blr 8e-3 --warmup-epochs 0.25`` (MAE warms up for 5 of 100 epochs: 5%).

Every command is appended to RUNS/commands.txt as it was run, and a finished run is not run again (nor one
whose RUN.part exists: another process is writing it).

    python experiments/probes/finetune_recipes.py --threads 2      # run what is missing
    python experiments/probes/finetune_recipes.py --threads 1 --first-seed 2 --seeds 1   # a second process, beside it
    python experiments/probes/finetune_recipes.py --table          # final val accuracy, mean ± std over the seeds
    python experiments/probes/finetune_recipes.py --seeds 1 --encoders gmae --recipes mae-b-none mae-b-mix mae-b-aa mae-b-erase
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner import final_checkpoint, run  # noqa: E402  (experiments/runner.py)
from scene_probes import mean_std  # noqa: E402

_MAE_B = ["--recipe", "mae-finetune-vit-b", "--epochs", "5", "--batch-size", "32", "--blr", "8e-3",
          "--warmup-epochs", "0.25"]
_OFF = {"mix": ["--mixup", "0", "--cutmix", "0"], "aa": ["--aa", ""], "erase": ["--reprob", "0"]}
RECIPES: dict[str, list[str]] = {
    "default": [],
    "mae-b": _MAE_B,
    # Diagnostics (--recipes): the scaled MAE recipe with its regularisers off, or with only one of them on.
    "mae-b-none": [*_MAE_B, *_OFF["mix"], *_OFF["aa"], *_OFF["erase"]],
    **{f"mae-b-{only}": [*_MAE_B, *(flag for name, flags in _OFF.items() if name != only for flag in flags)]
       for only in _OFF},
}
# encoder name -> (pre-training run folder pattern, --random-init)
ENCODERS = {"gmae": ("gmae-deadleaves-s{seed}", False), "mae": ("mae-deadleaves-s{seed}", False),
            "random init": ("gmae-deadleaves-s{seed}", True)}


def finetune(runs: Path, pretrained: Path, gmae: str, encoder: str, seed: int, recipe: str,
             threads: list[str]) -> None:
    pattern, init = ENCODERS[encoder]
    ckpt = final_checkpoint(pretrained / pattern.format(seed=seed))
    if ckpt is None:
        print(f"{pattern.format(seed=seed)}: no checkpoint in {pretrained}; skipped")
        return
    out = runs / f"{encoder.replace(' ', '-')}-s{seed}-{recipe}"
    result = out.with_suffix(".json")
    if result.exists():
        return
    partial = result.with_suffix(".part")
    if partial.exists():  # another process runs it (or one was killed: delete the .part to run it again)
        print(f"{partial}: being written by another run; skipped")
        return
    with partial.open("w") as f:
        run([gmae, "finetune", "--checkpoint", str(ckpt), "--data", "digits", "--seed", str(seed), "--out", str(out),
             "--json", "--quiet", *threads, *(["--random-init"] if init else []), *RECIPES[recipe]],
            runs / "commands.txt", stdout=f)
    partial.replace(result)


def table(runs: Path) -> str:
    lines = ["| recipe | GMAE | MAE | random init | seeds |", "|---|---:|---:|---:|---:|"]
    for recipe in RECIPES:
        acc = {enc: [json.loads(p.read_text())["val_acc"]
                     for p in sorted(runs.glob(f"{enc.replace(' ', '-')}-s*-{recipe}.json"))] for enc in ENCODERS}
        if any(acc.values()):
            lines.append(f"| {recipe} | " + " | ".join(mean_std(acc[e]) for e in ENCODERS) + " | "
                         + "/".join(str(len(acc[e])) for e in ENCODERS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/ft-recipes", help="folder of the fine-tuning runs (default runs/ft-recipes)")
    p.add_argument("--pretrained", default="runs/probe",
                   help="folder of experiments/probes/scene_probes.py's pre-training runs (default runs/probe)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: FIRST .. FIRST + SEEDS - 1 (default 0)")
    p.add_argument("--threads", default=None, help="passed to every gmae command")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["default", "mae-b"],
                   help="recipes to run (default: default mae-b; the others are diagnostics)")
    p.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    p.add_argument("--table", action="store_true", help="print the table of what is finished, and stop")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not args.table:
        runs.mkdir(parents=True, exist_ok=True)
        gmae = str(Path(sys.executable).with_name("gmae"))
        threads = ["--threads", args.threads] if args.threads else []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for recipe in args.recipes:
                for encoder in args.encoders:
                    finetune(runs, Path(args.pretrained), gmae, encoder, seed, recipe, threads)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
