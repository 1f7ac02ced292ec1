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

Runs train on the engine (:mod:`gmae.train.engine`), as pre-training does, so they write
``metrics.jsonl`` (step, loss, lr, and val_acc at eval points) and atomic ``checkpoint-NNNNNNN.pt`` files
that ``torch.load(weights_only=True)`` reads (format ``gmae-finetune``), stop on a signal, skip a
non-finite step, and resume exactly: batches, augmentation (timm's included), mixing and drop-path masks are
functions of (seed, step). Under torchrun every process trains its share of each global batch
(``batch_size`` is the global batch, MAE's ``batch_size x accum_iter x GPUs``), drop path draws its masks
for the global batch (:meth:`gmae.model.classifier.ViTClassifier.share_batch`) and the val accuracy is
all-reduced, so N processes train the one-process run (mixup and cutmix aside: timm pairs the images within
each process's batch, as MAE does).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..io.checkpoint import FINETUNE_FORMAT as FORMAT
from ..io.checkpoint import run_state, weights_line
from ..config import FINETUNE_RESUMABLE, FinetuneConfig, ModelConfig, as_dict, config_from_dict
from ..data import StepBatchSampler
from ..errors import GMAEError
from ..io.loader import load
from ..io.files import checkpoint_path
from ..model import ViTEncoder, build_classifier, param_groups
from ..io.runs import autocast, learning_rate, prepare_metrics, refuse_changes, resume_from, resumed_config, say
from ..runtime import distributed
from ..runtime.stopping import Stopped
from ..runtime.threads import resolve_workers, worker_init
from ..train.engine import Engine, Task, run_folder
from .augment import augmented, build_mixup, mix_batch, soft_target_loss


# --------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128, device: str | torch.device = "cpu",
             amp=None, ctx: distributed.Context | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``dataset`` (its deterministic transform). Under torchrun
    (``ctx``), each process scores every world_size-th image and the counts are summed over the processes."""
    was_training = model.training
    model.eval()
    if ctx is not None and ctx.distributed:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, total
    for imgs, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with amp or contextlib.nullcontext():
            logits = model(imgs.to(device))
        counts[0] += (logits.argmax(dim=1) == y.to(device)).sum()
        counts[1] += len(y)
    if ctx is not None:
        counts = distributed.sum_across(counts, ctx)
    model.train(was_training)
    correct, total = counts.tolist()
    return correct / max(1, total)


class FinetuneTask(Task):
    """Fine-tuning's step on the engine: cross-entropy (label smoothing, or timm's soft targets with mixup /
    cutmix) of the classifier; the val accuracy every ``eval_every`` steps and at the end."""

    def __init__(self, model, optimizer, fcfg: FinetuneConfig, ctx: distributed.Context, run_config: dict,
                 val_ds, amp, mixup, soft_loss, bar_write, best, val_acc):
        self.model, self.optimizer, self.fcfg, self.ctx, self.run_config = model, optimizer, fcfg, ctx, run_config
        self.val_ds, self.amp, self.mixup, self.soft_loss, self.bar_write = val_ds, amp, mixup, soft_loss, bar_write
        self.best, self.val_acc = best, val_acc
        self.batch_size = fcfg.batch_size

    def prepare(self, batch, step):
        imgs, labels = batch
        # Drop-path masks: a function of (seed, step), drawn for the global batch (ViTClassifier.share_batch).
        torch.manual_seed(self.fcfg.seed * 1_000_003 + step)
        imgs, labels = imgs.to(self.ctx.device, non_blocking=True), labels.to(self.ctx.device, non_blocking=True)
        if self.mixup is None:
            return imgs, labels
        # timm's Mixup pairs each image with its mirror in this process's batch, as MAE's (one per GPU).
        return mix_batch(self.mixup, imgs, labels, self.fcfg.seed, step)

    def loss(self, net, micro, scale):
        imgs, targets = micro
        logits = net(imgs)
        if self.mixup is not None:  # label smoothing is in the soft targets already (MAE main_finetune.py line 291)
            loss = self.soft_loss(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.fcfg.smoothing)
        return loss * scale, None

    def after_step(self, step, output, applied, lr):
        done = step + 1
        if done % self.fcfg.eval_every and done != self.fcfg.steps:
            return {}
        self.val_acc = evaluate(self.model, self.val_ds, max(self.fcfg.batch_size, 128), self.ctx.device, self.amp,
                                self.ctx)
        self.best = self.val_acc if self.best is None else max(self.best, self.val_acc)
        if self.ctx.is_main:
            self.bar_write(f"step {done}/{self.fcfg.steps}: val top-1 {100 * self.val_acc:.2f}%")
        return {"val_acc": self.val_acc}

    def state(self, step):
        return run_state(FORMAT, step, self.run_config, self.model, self.optimizer, val_acc=self.val_acc,
                         best_val_acc=self.best)


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
    with run_folder(fcfg.out, fcfg.dist_timeout):
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
    ctx = distributed.init(fcfg.device, fcfg.dist_timeout)
    device = ctx.device
    if fcfg.batch_size % (ctx.world_size * fcfg.accum_steps):
        raise GMAEError(f"batch size {fcfg.batch_size} must be a multiple of processes x accum-steps "
                        f"({ctx.world_size} x {fcfg.accum_steps})")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(fcfg.seed)  # the head's (and, with random_init, the encoder's) initial weights
    model = build_classifier(mcfg, num_classes, fcfg.drop_path, encoder if state is None else None,
                             fcfg.global_pool).to(device)
    model.share_batch(ctx.rank, ctx.world_size)  # drop-path masks as one process would draw them
    optimizer = torch.optim.AdamW(param_groups(model, fcfg.weight_decay, fcfg.layer_decay), lr=0.0,
                                  betas=fcfg.betas)
    start, best = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = state["step"], state.get("best_val_acc")
    net = nn.parallel.DistributedDataParallel(model) if ctx.distributed else model
    amp = autocast(fcfg.precision, device)
    if ctx.is_main:
        if state is not None:
            say(f"resumed from {found[0].name} (step {start})")
        prepare_metrics(out / "metrics.jsonl", start, warn=say)

    stream = LabelledStream(train_source, fcfg.seed)
    loader = DataLoader(stream, batch_sampler=StepBatchSampler(fcfg.batch_size, start, fcfg.steps - start, ctx.rank,
                                                               ctx.world_size),
                        num_workers=resolve_workers(fcfg.num_workers, train_ds, device), worker_init_fn=worker_init)
    classes = list(getattr(train_ds, "classes", range(num_classes)))
    run_config = {"model": as_dict(mcfg), "finetune": as_dict(fcfg), "num_classes": int(num_classes),
                  "classes": [str(c) for c in classes]}
    model.train()
    task = FinetuneTask(model, optimizer, fcfg, ctx, run_config, val_ds, amp, mixup, soft_loss,
                        tqdm.write if progress else (lambda line: None), best, state.get("val_acc") if state else None)
    engine = Engine(model, optimizer, fcfg, ctx, lambda step: learning_rate(step, fcfg), out, net=net, amp=amp,
                    progress=progress, desc="finetune")
    try:
        loss_value = engine.run(task, loader, start)
    except Stopped:
        distributed.shutdown(ctx)
        raise
    val_acc, best = task.val_acc, task.best
    if val_acc is None:  # resumed a finished run: nothing trained, evaluate what is there
        val_acc = evaluate(model, val_ds, max(fcfg.batch_size, 128), device, amp, ctx)
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    if not ctx.is_main:
        return None
    return {"val_acc": val_acc, "best_val_acc": best if best is not None else val_acc, "final_loss": loss_value,
            "steps": fcfg.steps, "steps_run": fcfg.steps - start, "num_train": len(train_ds),
            "num_val": len(val_ds), "num_classes": int(num_classes),
            "checkpoint": str(checkpoint_path(out, fcfg.steps)), "out": str(out)}
