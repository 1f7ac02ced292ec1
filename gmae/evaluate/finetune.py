"""End-to-end fine-tuning of a pre-trained encoder as a classifier (MAE's recipe).

Probes measure frozen features; MAE's headline number is fine-tuning, where
every weight trains again but the pre-trained ones start where pre-training
left them. The recipe (MAE, ``main_finetune.py``):

* the classifier is MAE's global-pool ViT with stochastic depth
  (:class:`gmae.model.classifier.ViTClassifier`: the encoder's patch embedding,
  positions, cls token and blocks, the mean of the patch tokens, ``fc_norm``
  and a linear ``head``; parameter names are timm's);
* layer-wise lr decay (:func:`gmae.model.vit.param_groups` with ``layer_decay``):
  parameter group of layer l gets lr x decay^(L - l), with L = depth + 1;
  layer 0 = patch embedding, cls token and positions, layer i + 1 = block i,
  layer L = fc_norm and head. So the head trains at the full lr, the deepest
  block at x decay and the embeddings at x decay^(depth + 1);
* AdamW (betas 0.9, 0.999, weight decay 0.05, none on norms, biases and
  tokens), linear warmup (``warmup_steps``, or ``warmup_epochs`` as MAE gives
  it) then cosine (``gmae.io.runs.learning_rate``, as in pre-training);
* the loss: cross-entropy with label smoothing 0.1 (PyTorch's
  ``label_smoothing``, the same function as timm's
  ``LabelSmoothingCrossEntropy`` that MAE uses, ``main_finetune.py`` lines
  293-294); with mixup or cutmix on (``mixup``, ``cutmix``, ``mixup_prob``,
  ``mixup_switch_prob``, ``mixup_mode``), timm's ``Mixup`` with the label
  smoothing folded into its soft targets and timm's ``SoftTargetCrossEntropy``
  (lines 219-225, 290-292);
* augmentation: random resized crop + horizontal flip (digits: crops of
  50-100 % and no flip; scenes: a flip only), then, when asked, timm's
  RandAugment (``aa``; MAE: ``rand-m9-mstd0.5-inc1``) and random erasing
  (``reprob``, ``remode``, ``recount``; MAE: 0.25, pixel, 1), see
  :mod:`gmae.evaluate.augment`; evaluation: resize (+ centre crop for photos).
  The defaults leave mixup, cutmix, RandAugment and erasing off (no timm
  needed); MAE's ViT-B values are in :class:`gmae.config.FinetuneConfig`'s
  comments and docs/evaluation.md.

Runs write ``metrics.jsonl`` (step, loss, lr, and val_acc at eval points) and
atomic ``checkpoint-NNNNNNN.pt`` files that ``torch.load(weights_only=True)``
reads (format ``gmae-finetune``), and resume exactly: batches, augmentation
(timm's included), mixing and drop-path masks are functions of (seed, step).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..io.checkpoint import FINETUNE_FORMAT as FORMAT
from ..io.checkpoint import save_checkpoint, weights_line
from ..config import FINETUNE_RESUMABLE, FinetuneConfig, ModelConfig, as_dict, config_from_dict
from ..data import StepBatchSampler
from ..errors import GMAEError
from ..io.loader import load
from ..io.files import check_output_folder, checkpoint_path, run_lock
from ..model import ViTEncoder, build_classifier, param_groups
from ..io.runs import MetricsLog, autocast, learning_rate, prepare_metrics, refuse_changes, resume_from, resumed_config, say
from ..runtime.distributed import resolve_device
from ..runtime.stopping import StopGuard, Stopped
from ..runtime.threads import worker_init
from .augment import augmented, build_mixup, mix_batch, soft_target_loss


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
             changes: tuple[str, ...] = FINETUNE_RESUMABLE, given: dict[str, str] | None = None) -> dict:
    """Fine-tune as ``fcfg`` says; returns a summary dict with ``val_acc`` (final top-1 in [0, 1]).

    The model is ``encoder`` (with its ``mcfg``) if given, else loaded from
    ``fcfg.checkpoint`` (a fresh one of that architecture with
    ``random_init``). With ``resume`` (True, or "auto": only if there is a
    checkpoint), the newest readable checkpoint in ``fcfg.out`` is continued
    with its saved settings, except the ``changes`` fields (from
    FINETUNE_RESUMABLE), taken from ``fcfg``; ``given`` ({setting: flag}, the
    flags a command line typed) makes it refuse a typed setting that differs
    from the saved one, rather than ignore it. The folder is locked while the
    run writes it. SIGTERM, SIGUSR1 or SIGUSR2 stops it after the current step,
    with that step's checkpoint, by raising :class:`gmae.runtime.stopping.Stopped`.
    """
    with run_lock(check_output_folder(fcfg.out)):
        return _finetune(fcfg, resume, progress, encoder, mcfg, changes, given or {})


def _finetune(fcfg: FinetuneConfig, resume: bool | str, progress: bool, encoder: ViTEncoder | None,
              mcfg: ModelConfig | None, changes: tuple[str, ...], given: dict[str, str]) -> dict:
    from ..data.labelled import LabelledStream, build_labelled

    out = Path(fcfg.out)
    found = resume_from(out, resume, say, what="finetune-checkpoint")
    state = None if found is None else found[1]
    if state is not None:
        saved = state["config"]
        mcfg = config_from_dict(ModelConfig, saved["model"])
        saved_run = config_from_dict(FinetuneConfig, saved["finetune"])
        refuse_changes(given, FINETUNE_RESUMABLE, as_dict(fcfg), as_dict(saved_run))
        # steps, eval_every and checkpoint_every of 0 mean "not set" (resolved per epoch): the saved values stay
        changes = tuple(k for k in changes if getattr(fcfg, k) or k not in ("steps", "eval_every", "checkpoint_every"))
        fcfg = resumed_config(saved_run, fcfg, changes, FINETUNE_RESUMABLE)
        if fcfg.steps and fcfg.steps < state["step"]:
            raise GMAEError(f"--steps {fcfg.steps} is below the checkpoint's step {state['step']}; "
                            "give a larger --steps to extend the run")
    else:
        fcfg.check_warmup()
    if state is None and encoder is None:
        if not fcfg.checkpoint:
            raise GMAEError("fine-tuning needs a pre-trained model: give --checkpoint")
        encoder, mcfg = load(fcfg.checkpoint, "encoder", raw=fcfg.raw_weights, input_norm=fcfg.input_norm or None)
        if fcfg.random_init:
            encoder = None  # the architecture only
        elif line := weights_line(encoder.loaded_weights, fcfg.raw_weights):
            say(line)
    elif state is None and mcfg is None:
        raise GMAEError("finetune(encoder=...) needs the encoder's ModelConfig (mcfg=...)")

    train_ds, val_ds, num_classes = build_labelled(fcfg.data, mcfg.img_size, augment=True, progress=progress)
    fcfg = fcfg.resolved(len(train_ds))
    # timm's extras (None / the set itself when off, so that a run without them needs no timm)
    train_source = augmented(train_ds, mcfg.img_size, fcfg)
    mixup = build_mixup(fcfg, num_classes)
    soft_loss = soft_target_loss() if mixup is not None else None
    device = resolve_device(fcfg.device)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(fcfg.seed)  # the head's (and, with random_init, the encoder's) initial weights
    model = build_classifier(mcfg, num_classes, fcfg.drop_path, encoder if state is None else None,
                             fcfg.global_pool).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, fcfg.weight_decay, fcfg.layer_decay), lr=0.0,
                                  betas=fcfg.betas)
    start, best = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = state["step"], state.get("best_val_acc")
    amp = autocast(fcfg.precision, device)
    metrics_path = out / "metrics.jsonl"
    if state is not None:
        say(f"resumed from {found[0].name} (step {start})")
    prepare_metrics(metrics_path, start, warn=say)

    stream = LabelledStream(train_source, fcfg.seed)
    loader = DataLoader(stream, batch_sampler=StepBatchSampler(fcfg.batch_size, start, fcfg.steps - start),
                        num_workers=fcfg.num_workers, worker_init_fn=worker_init)
    classes = list(getattr(train_ds, "classes", range(num_classes)))
    run_config = {"model": as_dict(mcfg), "finetune": as_dict(fcfg), "num_classes": int(num_classes),
                  "classes": [str(c) for c in classes]}
    model.train()
    loss_value, val_acc = float("nan"), state.get("val_acc") if state else None
    bar = tqdm(total=fcfg.steps, initial=start, desc=f"finetune ({device.type})", disable=not progress,
               dynamic_ncols=True)
    # Log lines (an unreadable image skipped, ...) are printed above the bar, not into it.
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    with StopGuard(fcfg.stop_grace, fcfg.out) as guard, bar, redirect, MetricsLog(metrics_path) as metrics:
        for step, (imgs, labels) in enumerate(loader, start=start):
            t0 = time.perf_counter()
            lr = learning_rate(step, fcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            torch.manual_seed(fcfg.seed * 1_000_003 + step)  # drop-path masks: a function of (seed, step)
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                imgs, targets = mix_batch(mixup, imgs, labels, fcfg.seed, step)
            with amp:
                logits = model(imgs)
            if mixup is not None:  # label smoothing is in the soft targets already (MAE main_finetune.py line 291)
                loss = soft_loss(logits.float(), targets)
            else:
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
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            stop = guard.signum if done < fcfg.steps else 0
            if stop:
                guard.stopping()  # this step's checkpoint is written whatever signal comes next
            if stop or done % fcfg.checkpoint_every == 0 or done == fcfg.steps:
                save_checkpoint({
                    "format": FORMAT, "version": 1, "step": done, "config": run_config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": {"torch": torch.get_rng_state()}, "val_acc": val_acc, "best_val_acc": best,
                }, checkpoint_path(out, done), keep=fcfg.keep_checkpoints)
            if stop:
                raise Stopped(stop, done, fcfg.steps, str(checkpoint_path(out, done)))
    if val_acc is None:  # resumed a finished run: nothing trained, evaluate what is there
        val_acc = evaluate(model, val_ds, max(fcfg.batch_size, 128), device, amp)
    return {"val_acc": val_acc, "best_val_acc": best if best is not None else val_acc, "final_loss": loss_value,
            "steps": fcfg.steps, "steps_run": fcfg.steps - start, "num_train": len(train_ds),
            "num_val": len(val_ds), "num_classes": int(num_classes),
            "checkpoint": str(checkpoint_path(out, fcfg.steps)), "out": str(out)}
