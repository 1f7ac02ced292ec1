"""End-to-end fine-tuning of a pre-trained encoder as a classifier (MAE's recipe).

Probes measure frozen features; MAE's headline number is fine-tuning, where
every weight trains again but the pre-trained ones start where pre-training
left them. The recipe (MAE, ``main_finetune.py``):

* the classifier is MAE's global-pool ViT: the encoder's patch embedding,
  positions, cls token and blocks, then the mean of the patch tokens,
  ``fc_norm`` (a fresh LayerNorm, replacing the encoder's final norm) and a
  linear ``head`` (weights ~ N(0, 2e-5)); parameter names are timm's;
* stochastic depth ("drop path") in every block, rate rising linearly from 0
  to ``drop_path`` with depth. The encoder's ``Block`` has none, so
  :class:`ViTClassifier` runs each block's two residual branches itself and
  passes them through :class:`DropPath`: no wrapper modules, so the state
  dict keeps the encoder's (and timm's) names;
* layer-wise lr decay: parameter group of layer l gets lr x decay^(L - l),
  with L = depth + 1; layer 0 = patch embedding, cls token and positions,
  layer i + 1 = block i, layer L = fc_norm and head. So the head trains at the
  full lr, the deepest block at x decay and the embeddings at x decay^(depth + 1);
* AdamW (betas 0.9, 0.999, weight decay 0.05, none on norms, biases and
  tokens), linear warmup then cosine (``gmae.train.learning_rate``),
  cross-entropy with label smoothing 0.1; mixup/cutmix are left out;
* augmentation: random resized crop + horizontal flip (digits: crops of
  50-100 % and no flip); evaluation: resize (+ centre crop for photos).

Runs write ``metrics.jsonl`` (step, loss, lr, and val_acc at eval points) and
atomic ``checkpoint-NNNNNNN.pt`` files that ``torch.load(weights_only=True)``
reads (format ``gmae-finetune``), and resume exactly: batches, augmentation
and drop-path masks are functions of (seed, step).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import checkpoint_path, load_checkpoint, resume_from, save_checkpoint
from ..config import FinetuneConfig, ModelConfig, as_dict, config_from_dict
from ..data import StepBatchSampler
from ..errors import GMAEError
from ..files import check_output_folder, prepare_metrics, run_lock
from ..model.vit import ViTEncoder
from ..threads import worker_init
from ..train import learning_rate, say

FORMAT = "gmae-finetune"

# What --resume may change: where it runs and how it loads data; the rest is the saved run's.
RESUMABLE_CHANGES = ("device", "num_workers", "keep_checkpoints")


# --------------------------------------------------------------------------- model


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for whole samples with probability ``p``.

    Training: (B, ...) -> branch x mask / (1 - p), mask ~ Bernoulli(1 - p) per
    sample (the expected value is unchanged). Eval, or p = 0: identity.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class ViTClassifier(nn.Module):
    """MAE's global-pool fine-tuning ViT built from a (pre-trained) :class:`ViTEncoder`.

    Takes over the encoder's modules (not copies). imgs (B, C, H, W) in [0, 1]
    -> logits (B, num_classes).
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, drop_path: float = 0.1):
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.cls_token = encoder.cls_token
        self.pos_embed = encoder.pos_embed
        self.blocks = encoder.blocks
        dim = self.cls_token.shape[-1]
        depth = len(self.blocks)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # 0 ... drop_path
        self.drop_paths = nn.ModuleList(DropPath(r) for r in rates)  # no parameters: not in the state dict
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W) -> pooled, normalised features (B, D)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (B, N, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        for block, drop in zip(self.blocks, self.drop_paths):
            # gmae.model.vit.Block's forward with drop path on both residual branches.
            x = x + drop(block.attn(block.norm1(x)))
            x = x + drop(block.mlp(block.norm2(x)))
        return self.fc_norm(x[:, 1:, :].mean(dim=1))  # (B, D)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))  # (B, num_classes)


def build_classifier(mcfg: ModelConfig, num_classes: int, drop_path: float = 0.1,
                     encoder: ViTEncoder | None = None) -> ViTClassifier:
    """A classifier for ``mcfg``'s encoder: ``encoder`` if given, else freshly initialised."""
    if encoder is None:
        encoder = ViTEncoder(mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.embed_dim, mcfg.depth,
                             mcfg.num_heads, mcfg.mlp_ratio)
    return ViTClassifier(encoder, num_classes, drop_path)


def layer_id(name: str, depth: int) -> int:
    """MAE's layer index of a parameter: 0 embeddings, i + 1 block i, depth + 1 everything after."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: ViTClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with an ``lr_scale`` = layer_decay^(depth + 1 - layer) each (MAE's param_groups_lrd).

    No weight decay on 1-d parameters (norms, biases) and tokens.
    """
    num_layers = model.depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        lid = layer_id(name, model.depth)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers - lid), "layer_id": lid,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- checkpoints


def load_finetune_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A fine-tuning checkpoint, read with ``weights_only=True``; one-line GMAEError if it cannot be."""
    return load_checkpoint(path, map_location, fmt=FORMAT, kind="gmae fine-tune")


def load_finetuned(path: str | Path, map_location: str | torch.device = "cpu"):
    """(classifier in eval mode, ModelConfig, checkpoint dict) from a fine-tuning checkpoint."""
    state = load_finetune_checkpoint(path, map_location)
    mcfg = config_from_dict(ModelConfig, state["config"]["model"])
    model = build_classifier(mcfg, state["config"]["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), mcfg, state


# --------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128, device: str | torch.device = "cpu",
             amp=None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``dataset`` (its deterministic transform)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for imgs, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with amp or contextlib.nullcontext():
            logits = model(imgs.to(device))
        correct += (logits.argmax(dim=1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(1, total)


def finetune(fcfg: FinetuneConfig, resume: bool | str = False, progress: bool = True,
             encoder: ViTEncoder | None = None, mcfg: ModelConfig | None = None,
             changes: tuple[str, ...] = RESUMABLE_CHANGES) -> dict:
    """Fine-tune as ``fcfg`` says; returns a summary dict with ``val_acc`` (final top-1 in [0, 1]).

    The model is ``encoder`` (with its ``mcfg``) if given, else loaded from
    ``fcfg.checkpoint`` (a fresh one of that architecture with
    ``random_init``). With ``resume`` (True, or "auto": only if there is a
    checkpoint), the newest readable checkpoint in ``fcfg.out`` is continued
    with its saved settings, except the ``changes`` fields (from
    RESUMABLE_CHANGES), taken from ``fcfg``. The folder is locked while the
    run writes it.
    """
    with run_lock(check_output_folder(fcfg.out)):
        return _finetune(fcfg, resume, progress, encoder, mcfg, changes)


def _finetune(fcfg: FinetuneConfig, resume: bool | str, progress: bool, encoder: ViTEncoder | None,
              mcfg: ModelConfig | None, changes: tuple[str, ...]) -> dict:
    from ..data.labelled import LabelledStream, build_labelled
    from .probe import load_encoder

    out = Path(fcfg.out)
    found = resume_from(out, resume, say, load=load_finetune_checkpoint)
    state = None if found is None else found[1]
    if state is not None:
        saved = state["config"]
        mcfg = config_from_dict(ModelConfig, saved["model"])
        fcfg = replace(config_from_dict(FinetuneConfig, saved["finetune"]), out=fcfg.out,
                       **{k: getattr(fcfg, k) for k in changes if k in RESUMABLE_CHANGES})
    elif encoder is None:
        if not fcfg.checkpoint:
            raise GMAEError("fine-tuning needs a pre-trained model: give --checkpoint")
        encoder, mcfg = load_encoder(fcfg.checkpoint)
        if fcfg.random_init:
            encoder = None  # the architecture only
    elif mcfg is None:
        raise GMAEError("finetune(encoder=...) needs the encoder's ModelConfig (mcfg=...)")

    train_ds, val_ds, num_classes = build_labelled(fcfg.data, mcfg.img_size, augment=True)
    fcfg = fcfg.resolved(len(train_ds))
    try:
        device = torch.device(fcfg.device)
    except RuntimeError:
        raise GMAEError(f"unknown device {fcfg.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GMAEError(f"device {fcfg.device!r} asked for but CUDA is not available here; use --device cpu")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(fcfg.seed)  # the head's (and, with random_init, the encoder's) initial weights
    model = build_classifier(mcfg, num_classes, fcfg.drop_path, encoder if state is None else None).to(device)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, fcfg.weight_decay, fcfg.layer_decay), lr=0.0,
                                  betas=fcfg.betas)
    start, best = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = state["step"], state.get("best_val_acc")
    bf16 = fcfg.precision == "bf16" or (fcfg.precision == "auto" and device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    metrics_path = out / "metrics.jsonl"
    if state is not None:
        say(f"resumed from {found[0].name} (step {start})")
    prepare_metrics(metrics_path, start, warn=say)

    stream = LabelledStream(train_ds, fcfg.seed)
    loader = DataLoader(stream, batch_sampler=StepBatchSampler(fcfg.batch_size, start, fcfg.steps - start),
                        num_workers=fcfg.num_workers, worker_init_fn=worker_init)
    classes = list(getattr(train_ds, "classes", range(num_classes)))
    run_config = {"model": as_dict(mcfg), "finetune": as_dict(fcfg), "num_classes": int(num_classes),
                  "classes": [str(c) for c in classes]}
    model.train()
    loss_value, val_acc = float("nan"), state.get("val_acc") if state else None
    bar = tqdm(total=fcfg.steps, initial=start, desc="finetune", disable=not progress, dynamic_ncols=True)
    # Log lines (an unreadable image skipped, ...) are printed above the bar, not into it.
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    with bar, redirect, open(metrics_path, "a") as metrics:
        for step, (imgs, labels) in enumerate(loader, start=start):
            t0 = time.perf_counter()
            lr = learning_rate(step, fcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            torch.manual_seed(fcfg.seed * 1_000_003 + step)  # drop-path masks: a function of (seed, step)
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with amp:
                logits = model(imgs)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=fcfg.smoothing)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise GMAEError(f"the loss is not finite at step {step}; lower --blr (now {fcfg.blr}) or use --clip-grad")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fcfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), fcfg.clip_grad)
            optimizer.step()
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_value, "lr": lr, "step_time": round(dt, 5),
                      "imgs_per_s": round(len(imgs) / dt, 2)}
            done = step + 1
            if done % fcfg.eval_every == 0 or done == fcfg.steps:
                val_acc = evaluate(model, val_ds, max(fcfg.batch_size, 128), device, amp)
                best = val_acc if best is None else max(best, val_acc)
                record["val_acc"] = val_acc
                if progress:
                    bar.write(f"step {done}/{fcfg.steps}: val top-1 {100 * val_acc:.2f}%")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if done % fcfg.checkpoint_every == 0 or done == fcfg.steps:
                save_checkpoint({
                    "format": FORMAT, "version": 1, "step": done, "config": run_config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": {"torch": torch.get_rng_state()}, "val_acc": val_acc, "best_val_acc": best,
                }, checkpoint_path(out, done), keep=fcfg.keep_checkpoints)
    if val_acc is None:  # resumed a finished run: nothing trained, evaluate what is there
        val_acc = evaluate(model, val_ds, max(fcfg.batch_size, 128), device, amp)
    return {"val_acc": val_acc, "best_val_acc": best if best is not None else val_acc, "final_loss": loss_value,
            "steps": fcfg.steps, "steps_run": fcfg.steps - start, "num_train": len(train_ds),
            "num_val": len(val_ds), "num_classes": int(num_classes),
            "checkpoint": str(checkpoint_path(out, fcfg.steps)), "out": str(out)}
