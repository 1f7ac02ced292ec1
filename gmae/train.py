"""Pre-training: one loop for GMAE and MAE.

Every source of randomness is a pure function of (seed, step): the samples of
step s are global sample numbers s*B ... s*B + B - 1 of a `SeededStream`, and the
masking noise of step s comes from a generator seeded with (seed, s). So a run
resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path, configs_of, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig, as_dict
from .data import SeededStream, StepBatchSampler, build_dataset
from .errors import GMAEError
from .model import build_model
from .render import resolve_backend
from .viz import save_reconstruction_figure

KEEP_CHECKPOINTS = 3
FIGURE_IMAGES = 8


def learning_rate(step: int, tcfg: TrainConfig) -> float:
    """MAE's schedule: lr = blr * batch / 256, linear warmup, then half-cycle cosine to min_lr."""
    peak = tcfg.blr * tcfg.batch_size / 256
    if step < tcfg.warmup_steps:
        return peak * (step + 1) / tcfg.warmup_steps
    progress = (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps)
    return tcfg.min_lr + (peak - tcfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, or the cls/mask/query tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_token = name.endswith(("cls_token", "mask_token", "query_embed", "pos_embed"))
        (no_decay if p.ndim <= 1 or is_token else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def masking_noise(seed: int, step: int, batch: int, num_patches: int) -> torch.Tensor:
    """The masking noise of one step, (B, N), a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(batch, num_patches, generator=g)


def resolve_resume(out: Path) -> dict | None:
    """The newest readable checkpoint in `out`, falling back to older ones if it is damaged."""
    for path in reversed(list_checkpoints(out)):
        try:
            return load_checkpoint(path)
        except GMAEError as e:
            tqdm.write(f"warning: {e}; trying an older checkpoint")
    return None


def make_state(model, optimizer, step, mcfg, tcfg) -> dict:
    return {
        "format": "gmae-checkpoint",
        "version": 1,
        "step": step,
        "config": {"model": as_dict(mcfg), "train": as_dict(tcfg)},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


# What a resumed run may change: its length, where it runs, how often it saves.
RESUMABLE_CHANGES = ("steps", "device", "checkpoint_every", "num_workers")


def pretrain(mcfg: ModelConfig, tcfg: TrainConfig, resume: bool = False, progress: bool = True,
             changes: tuple[str, ...] = RESUMABLE_CHANGES) -> dict:
    """Pre-train `mcfg` as `tcfg` says; returns a summary dict. Writes into `tcfg.out`:

    checkpoint-NNNNNNN.pt (every `checkpoint_every` steps and at the end, newest
    3 kept), metrics.jsonl (one JSON object per step), reconstruction.png.
    With `resume`, the newest checkpoint's settings are used, except for the
    `changes` fields (a subset of RESUMABLE_CHANGES), which come from `tcfg`.
    """
    out = Path(tcfg.out)
    state = resolve_resume(out) if resume else None
    if resume and state is None:
        tqdm.write(f"no checkpoint in {out}; starting from scratch")
    if state is not None:
        mcfg, saved = configs_of(state)
        # The user may extend or relocate a run, not change what it trains.
        tcfg = replace(saved, out=tcfg.out, **{k: getattr(tcfg, k) for k in changes if k in RESUMABLE_CHANGES})
    device = torch.device(tcfg.device)
    if mcfg.model == "gmae":
        resolve_backend(mcfg.render_backend, device)  # a bad name fails now, not mid-run
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=0.0, betas=tcfg.betas)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]
    metrics_path = out / "metrics.jsonl"
    truncate_metrics(metrics_path, start)

    source = build_dataset(tcfg.data, mcfg.img_size, seed=tcfg.seed)
    stream = SeededStream(source, tcfg.seed)
    loader = DataLoader(
        stream, batch_sampler=StepBatchSampler(tcfg.batch_size, start, tcfg.steps - start),
        num_workers=tcfg.num_workers, persistent_workers=False,
    )
    model.train()
    last_loss = float("nan")
    bar = tqdm(total=tcfg.steps, initial=start, desc=f"pretrain {mcfg.model}", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    with bar, open(metrics_path, "a") as metrics:
        for step, imgs in enumerate(loader, start=start):
            t0 = time.perf_counter()
            lr = learning_rate(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            imgs = imgs.to(device, non_blocking=True)
            noise = masking_noise(tcfg.seed, step, imgs.shape[0], mcfg.num_patches).to(device)
            loss = model(imgs, noise).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss = loss.item()
            dt = time.perf_counter() - t0
            if not math.isfinite(last_loss):
                raise GMAEError(f"loss became {last_loss} at step {step}; lower the learning rate (--blr) and resume")
            if step % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                metrics.write(json.dumps({"step": step, "loss": last_loss, "lr": lr, "step_time": round(dt, 5),
                                          "imgs_per_s": round(imgs.shape[0] / dt, 2)}) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == tcfg.steps:
                save_checkpoint(make_state(model, optimizer, step + 1, mcfg, tcfg),
                                checkpoint_path(out, step + 1), keep=KEEP_CHECKPOINTS)
    elapsed = time.perf_counter() - t_start
    steps_done = tcfg.steps - start

    # A fixed set of images (the first of the stream) and masks for the figure.
    imgs = torch.stack([stream[i] for i in range(FIGURE_IMAGES)]).to(device)
    noise = masking_noise(tcfg.seed, -1, FIGURE_IMAGES, mcfg.num_patches).to(device)
    figure = save_reconstruction_figure(model, imgs, out / "reconstruction.png", noise)
    return {
        "steps": tcfg.steps, "steps_run": steps_done, "final_loss": last_loss,
        "steps_per_s": steps_done / elapsed if elapsed > 0 and steps_done else float("nan"),
        "figure": str(figure), "checkpoint": str(checkpoint_path(out, tcfg.steps)), "out": str(out),
    }


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines at or after `step` (left by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line from a killed run
    path.write_text("".join(k + "\n" for k in kept))
