"""`gmae ablate`: the paper's ablations (c, mask ratio, loss, k) and MAE, at small scale, one command.

Every variant pre-trains the `tiny` preset from the same seed on the same data
for the same number of steps and batch (equal images seen; larger k costs more
time, reported per run), changing one setting of the base run (c = 1, r = 0.75,
masked loss, k = 128). Each run is then scored with

* a linear probe and a kNN probe of its frozen encoder (`gmae.evaluate.probe`,
  default data: scikit-learn's digits), and
* masked-region PSNR: the reconstruction against the image on the masked
  patches of held-out dead-leaves images, at one fixed mask ratio (0.75) and
  the same masks for every run, so runs trained at other ratios are compared
  on the same task. PSNR = 10 log10(1 / MSE) over all masked pixels of the set.
  Not given for the norm-pix loss: its render is of normalised patches, and
  mapping it back to pixels takes the hidden patches' own mean and variance.

Runs live in ``OUT/NAME``; a finished run is not trained again, an interrupted
one resumes, and scores are cached in ``OUT/NAME/scores.json``, so the command
can be re-run (or extended with new variants) at no cost for what is done.
The table is written to ``OUT/table.md`` and ``OUT/results.json``; it has one
more row, the base architecture at its initial weights (what every
pre-training must beat).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

# No torch at import: the command line reads VARIANTS to build `gmae ablate --help`.
from ..config.choices import SCENE_DATA, SCENE_IMAGES, SCENE_TASKS
from ..config import as_dict, model_config, train_config
from ..errors import GMAEError

PSNR_MASK_RATIO = 0.75
PSNR_IMAGES = 256
PSNR_SEED = 7  # masking noise of the PSNR images


@dataclass
class Variant:
    name: str
    setting: str  # the row label: what differs from the base run
    overrides: dict = field(default_factory=dict)  # ModelConfig fields
    paper: tuple[float | None, float | None] = (None, None)  # ImageNet ViT-B/16 fine-tune / linear, from the paper


# The paper's base, which its ablation varies around: c = 1, the authors' bounded z, the masked loss at 75% and
# positions from the head. The tiny preset's own default has moved (c = 3, centred z: docs/reports/depth.md; the all-pixel
# loss at 25% with pointer positions: docs/reports/layout.md); the grid keeps the paper's base so that its rows stay the
# paper's.
PAPER_BASE = {"max_scale": 1.0, "depth_param": "bounded", "loss": "masked", "mask_ratio": 0.75, "position_source": "head"}

# The paper's figures (ViT-B/16, 400 epochs; the paper's ablation tables). The paper gives no numbers for k.
GRID = [
    Variant("base", "GMAE base: c=1, r=0.75, masked loss, k=128", {}, (83.2, 61.9)),
    Variant("c0.5", "c = 0.5", {"max_scale": 0.5}, (82.7, 61.1)),
    Variant("c2", "c = 2", {"max_scale": 2.0}, (83.1, 60.9)),
    Variant("mask0.70", "r = 0.70", {"mask_ratio": 0.70}, (82.6, 60.2)),
    Variant("mask0.80", "r = 0.80", {"mask_ratio": 0.80}, (82.4, 61.9)),
    Variant("loss-all", "loss on all pixels", {"loss": "all"}, (81.8, 57.4)),
    Variant("loss-normpix", "masked loss, per-patch normalised target", {"loss": "masked_normpix"}, (76.9, 31.7)),
    Variant("k64", "k = 64", {"num_gaussians": 64}),
    Variant("k256", "k = 256", {"num_gaussians": 256}),
    Variant("k512", "k = 512", {"num_gaussians": 512}),
    Variant("mae", "MAE (pixel decoder), masked loss", {"model": "mae"}, (83.0, None)),
]
VARIANTS = {v.name: v for v in GRID}


def _check_same_run(out: Path, state: dict, mcfg, tcfg) -> None:
    """Refuse to reuse a run folder that holds a different run (other data, seed, setting or length)."""
    from ..io.checkpoint import configs_of

    saved_m, saved_t = configs_of(state)
    saved_m.render_backend = mcfg.render_backend
    wanted = {"model": as_dict(mcfg), "data": tcfg.data, "seed": tcfg.seed, "steps": tcfg.steps,
              "batch_size": tcfg.batch_size}
    have = {"model": as_dict(saved_m), "data": saved_t.data, "seed": saved_t.seed, "steps": saved_t.steps,
            "batch_size": saved_t.batch_size}
    differ = [key for key in wanted if wanted[key] != have[key]]
    if differ:
        raise GMAEError(f"{out} holds another run (its {', '.join(differ)} differ); "
                        "give a new --out or delete the folder")


def pretrain_variant(variant: Variant, out: Path, steps: int | None, seed: int, data: str, progress: bool) -> Path:
    """Train (or finish) one variant; returns its final checkpoint."""
    from ..io.loader import find_latest
    from ..io.files import checkpoint_path
    from ..train import pretrain

    mcfg = model_config("tiny", **{**PAPER_BASE, **variant.overrides})
    tcfg = train_config("tiny", out=str(out), seed=seed, data=data, steps=steps)
    found = find_latest(out, warn=print)  # a damaged newest checkpoint falls back to the one before
    if found is not None:
        state = found[1]
        _check_same_run(out, state, mcfg, tcfg)
        if state["step"] >= tcfg.steps:
            return checkpoint_path(out, state["step"])
    return Path(pretrain(mcfg, tcfg, resume="auto", progress=progress)["checkpoint"])


def masked_psnr(model, images: int = PSNR_IMAGES, batch_size: int = 32) -> float:
    """PSNR of the reconstruction on the masked patches of held-out dead-leaves images (see module doc)."""
    import torch

    from ..data import DeadLeaves
    from .zeroshot import EVAL_SEED
    from ..model.vit import patchify

    cfg = model.cfg
    # images and masks are made on the CPU, the same on any device, then moved to the model's
    device = next(model.parameters(), torch.empty(0)).device
    source = DeadLeaves(cfg.img_size, seed=EVAL_SEED)
    generator = torch.Generator().manual_seed(PSNR_SEED)
    squared, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, images, batch_size):
            imgs = torch.stack([source.load(i) for i in range(start, min(images, start + batch_size))])
            noise = torch.rand(imgs.shape[0], cfg.num_patches, generator=generator)
            imgs, noise = imgs.to(device), noise.to(device)
            out = model(imgs, noise, mask_ratio=PSNR_MASK_RATIO)
            # (B, N, p*p*C)
            err = (patchify(out.image.clamp(0, 1), cfg.patch_size) - patchify(imgs, cfg.patch_size)) ** 2
            squared += float((err.mean(-1) * out.mask).sum())
            count += float(out.mask.sum())
    return 10.0 * math.log10(1.0 / (squared / count))


@functools.lru_cache(maxsize=None)
def _scene_labels(data: str, img_size, patch_size: int, images: tuple[int, int]) -> tuple:
    """The scene probes' (train, val) labels of ``images`` (train, val) scenes, made once per process: every run of
    the grid is probed on the same held-out scenes (their seeds are the probes', not the run's), and making them
    costs about as much as a probe."""
    from ..data.scenes import scene_labels

    return tuple(scene_labels(data, split, img_size, patch_size, n, progress=False)
                 for split, n in zip(("train", "val"), images))


def score_variant(checkpoint: Path, probe_data: str, seed: int, initial: bool = False,
                  progress: bool = False) -> dict:
    """Probe accuracies and masked PSNR of a run's final weights (or, `initial`, of the weights it started from).

    ``probe_data`` deadleaves or sprites runs the scene probes (gmae.evaluate.scene): ``TASK_linear`` and
    ``TASK_knn`` per task instead of ``linear_acc`` / ``knn_acc``.
    """
    from ..io.loader import load

    model, mcfg, state = load(checkpoint, "model", initial=initial)
    if probe_data in SCENE_DATA:
        from .scene import scene_probe

        embed = model.encoder.patch_embed
        labels = _scene_labels(probe_data, embed.img_size, embed.patch_size, (SCENE_IMAGES["train"], SCENE_IMAGES["val"]))
        tasks = scene_probe(model.encoder, probe_data, labels=labels, seed=seed, progress=progress)
        scores = {"linear_acc": None, "knn_acc": None,
                  **{f"{t}_{key}": r[f"{key}_acc"] for t, r in tasks.items() for key in ("linear", "knn")}}
    else:
        from .probe import probe

        found = probe(model.encoder, probe_data, seed=seed, progress=progress)
        scores = {"linear_acc": found["linear_acc"], "knn_acc": found["knn_acc"]}
    # A norm-pix model predicts normalised patches; showing them in image space needs the hidden
    # patches' own mean and variance, i.e. part of the answer, so its PSNR is not comparable.
    psnr = None if mcfg.loss == "masked_normpix" else masked_psnr(model)
    metrics = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines() if line]
    return {
        **scores, "psnr": psnr,
        "final_loss": None if initial or not metrics else metrics[-1]["loss"],
        "train_minutes": 0.0 if initial else sum(m.get("step_time", 0.0) for m in metrics) / 60.0,
        "step": 0 if initial else state["step"], "checkpoint": str(checkpoint),
    }


def _cached_scores(run: Path, checkpoint: Path, probe_data: str, seed: int, initial: bool = False,
                   progress: bool = False) -> dict:
    cache = run / ("scores-init.json" if initial else "scores.json")
    key = {"checkpoint": str(checkpoint), "probe_data": probe_data, "seed": seed}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") != key:
        cached = {"key": key, "scores": score_variant(checkpoint, probe_data, seed, initial, progress)}
        cache.write_text(json.dumps(cached, indent=1))
    return cached["scores"]


def run_ablation(out: str | Path = "runs/ablate", names: list[str] | None = None, steps: int | None = None,
                 seed: int = 0, data: str = "deadleaves", probe_data: str = "digits", evaluate: bool = True,
                 progress: bool = True, seeds: int = 1) -> list[dict]:
    """Pre-train and score each variant (all of GRID by default); returns one row per variant.

    ``seeds`` > 1 trains every variant from seeds ``seed .. seed + seeds - 1`` (runs ``OUT/NAME-sSEED``) and
    each row holds the mean over them, with ``KEY_std`` (sample standard deviation) beside every score;
    one seed trains ``OUT/NAME``.
    """
    unknown = [n for n in names or [] if n not in VARIANTS]
    if unknown:
        raise GMAEError(f"unknown ablation variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if seeds < 1:
        raise GMAEError(f"seeds must be at least 1; got {seeds}")
    out = Path(out)
    rows = []
    variants = [VARIANTS[n] for n in names] if names else GRID
    run_seeds = [seed + i for i in range(seeds)]
    # One bar over the runs; each run's training and feature extraction draw their own below it.
    bar = tqdm([(v, s) for v in variants for s in run_seeds], desc="ablate", unit="run", disable=not progress,
               dynamic_ncols=True)
    done: dict[str, list[tuple[dict, dict | None]]] = {}
    for variant, s in bar:
        run = out / (variant.name if seeds == 1 else f"{variant.name}-s{s}")
        start = time.time()
        bar.set_postfix_str(f"{run.name}: pre-training")
        checkpoint = pretrain_variant(variant, run, steps, s, data, progress)
        scores = init = None
        if evaluate:
            bar.set_postfix_str(f"{run.name}: probes and PSNR")
            scores = _cached_scores(run, checkpoint, probe_data, s, progress=progress)
            if variant.name == "base":  # the floor every pre-training must beat
                bar.set_postfix_str(f"{run.name} at initialisation: probes and PSNR")
                init = _cached_scores(run, checkpoint, probe_data, s, initial=True, progress=progress)
        if progress:
            bar.write(f"{run.name}: done in {time.time() - start:.0f} s")
        done.setdefault(variant.name, []).append((scores, init))
    for variant in variants:
        row = {"name": variant.name, "setting": variant.setting, "paper_ft": variant.paper[0],
               "paper_lin": variant.paper[1], "seeds": seeds}
        runs = done[variant.name]
        if evaluate:
            row.update(_over_seeds([scores for scores, _ in runs]))
        rows.append(row)
        if evaluate and variant.name == "base":
            rows.append({"name": "init", "setting": "base architecture at initialisation (no pre-training)",
                         "paper_ft": None, "paper_lin": None, "seeds": seeds,
                         **_over_seeds([init for _, init in runs])})
    if evaluate:
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(format_table(rows) + "\n")
    return rows


def _over_seeds(runs: list[dict]) -> dict:
    """One seed's scores as they are; several: the mean of each number and its sample std as KEY_std."""
    if len(runs) == 1:
        return runs[0]
    import statistics

    merged = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(first, (int, float)) and not isinstance(first, bool) and None not in values:
            merged[key] = statistics.mean(values)
            if key not in ("step",):
                merged[f"{key}_std"] = statistics.stdev(values)
        else:
            merged[key] = values  # e.g. the checkpoints, or scores some runs lack
    return merged


def format_table(rows: list[dict]) -> str:
    """Markdown table: our figures (mean ± std over seeds when there are several) next to the paper's column.

    Digit probes show linear and kNN accuracy; scene probes the linear accuracy of each task.
    """
    def cell(r, key, fmt):
        value = r.get(key)
        if value is None or isinstance(value, list):
            return "–"
        std = r.get(f"{key}_std")
        return format(value, fmt) + ("" if std is None else f" ± {format(std, fmt)}")

    scene = [t for t in SCENE_TASKS if any(f"{t}_linear" in r for r in rows)]
    probes = [(f"{t}_linear", f"{t} (linear)") for t in scene] or [("linear_acc", "linear acc"), ("knn_acc", "kNN acc")]
    lines = ["| variant | " + " | ".join(h for _, h in probes) +
             " | masked PSNR (dB) | train min | paper ft / lin (ViT-B, IN-1k) |",
             "|---|" + "---:|" * len(probes) + "---:|---:|---|"]
    for r in rows:
        paper = f"{cell(r, 'paper_ft', '.1f')} / {cell(r, 'paper_lin', '.1f')}"
        probe_cells = " | ".join(cell(r, key, ".3f") for key, _ in probes)
        lines.append(f"| {r['setting']} | {probe_cells} | {cell(r, 'psnr', '.2f')} | "
                     f"{cell(r, 'train_minutes', '.1f')} | {paper} |")
    return "\n".join(lines)


__all__ = ["GRID", "PAPER_BASE", "VARIANTS", "Variant", "format_table", "masked_psnr", "run_ablation"]
