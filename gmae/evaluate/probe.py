"""Frozen-encoder probes: a linear classifier and a kNN classifier on the encoder's features.

Pre-training loss says how well a model reconstructs pixels, not how useful
its features are; the standard check (MAE, DINO) is to freeze the encoder and
measure how well its features classify a labelled data set:

* **linear probe**, one of two protocols (``protocol``); both train MAE's head,
  BatchNorm1d without affine parameters (eps 1e-6) then one Linear layer
  (weights ~ N(0, 0.01) truncated, bias 0; MAE ``main_linprobe.py`` lines 218
  and 222), with cross-entropy, lr = blr * batch / 256, weight decay 0, linear
  warmup then half-cycle cosine to 0:

  ``cached`` (the default; fast): the features of the un-augmented images are
  computed once and the head trains on them with plain SGD (momentum 0.9) at
  batch 256 for 100 epochs, blr 0.1, 10 warmup epochs. On small data sets
  (thousands of images) this converges in far fewer steps than MAE's.

  ``mae`` (MAE's ``main_linprobe.py``): the encoder runs on every training
  batch, through the data set's training crop + flip (photos: MAE's
  RandomResizedCrop (0.08, 1) + flip, lines 132-134; digits and scenes:
  their own, see :mod:`gmae.data.labelled`), with no gradient; the head
  trains with :class:`LARS` (MAE ``util/lars.py``), weight decay 0 (line
  55), 90 epochs (line 46), 10 warmup epochs (line 66), the schedule per
  iteration in fractional epochs (``util/lr_sched.py`` lines 9-15), full
  batches only (drop_last, line 178). MAE's batch is 16384 (512 x 32 GPUs)
  at blr 0.1 (line 60), so lr 6.4; here the batch defaults to 256 (never more
  than the train set) and blr to 6.4, which keeps MAE's lr per step (see
  :data:`gmae.config.choices.PROBE_DEFAULTS` for why). Val images: the deterministic
  evaluation transform (resize, + centre crop for photos, as lines 137-139).
* **kNN** (DINO's weighted kNN): cosine similarity to every training
  feature, the k = 20 nearest vote with weight exp(similarity / T), T = 0.07.

Features are the cls token after the encoder's final norm (``pool="cls"``,
MAE's linear-probe feature: ``main_linprobe.py`` lines 72-73 leave
``global_pool`` off, ``models_vit.py`` lines 49-51), or the mean of the patch
tokens after that norm (``pool="avg"``; MAE's ``--global_pool`` would instead
put a fresh, frozen LayerNorm on the mean of the un-normalised tokens). Images
are fed as the encoder saw them in pre-training: [0, 1] values, no mean/std
normalisation.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config.choices import PROBE_DEFAULTS, PROBE_PROTOCOLS
from ..config import ModelConfig
from ..errors import GMAEError
from ..model.vit import ViTEncoder
from ..runtime import distributed
from ..runtime.threads import resolve_workers, worker_init
from ..train.engine import Engine, Task

POOLS = ("cls", "avg")
#: The linear-probe protocols and their default settings (kept in gmae.config.choices for the command line; why the mae
#: protocol's blr is 6.4 is said there).
PROTOCOLS, PROTOCOL_DEFAULTS = PROBE_PROTOCOLS, PROBE_DEFAULTS


def random_encoder(mcfg: ModelConfig, seed: int = 0) -> ViTEncoder:
    """The encoder of architecture ``mcfg`` at its pre-training initialisation (seeded), in eval mode.

    The same weights as the encoder of ``build_model(mcfg)`` right after
    ``torch.manual_seed(seed)`` (the encoder is built first), i.e. the start
    of a ``gmae pretrain --seed SEED`` run. The caller's RNG state is kept.
    """
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        encoder = ViTEncoder(mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.embed_dim, mcfg.depth,
                             mcfg.num_heads, mcfg.mlp_ratio, input_norm=mcfg.input_norm)
    return encoder.eval()


def encode_tokens(encoder: ViTEncoder, imgs: torch.Tensor) -> torch.Tensor:
    """imgs (B, C, H, W) in [0, 1] -> every token (B, 1 + N, D) after the final norm, no masking.

    Row 0 is the cls token, rows 1.. the patch tokens in row-major patch order.
    """
    B = imgs.shape[0]
    N = encoder.patch_embed.num_patches
    # Ascending noise keeps every patch in its own order (no global RNG is drawn).
    noise = torch.arange(N, device=imgs.device, dtype=torch.float32).expand(B, N)
    latent, _, _ = encoder(imgs, 0.0, noise)
    return latent


def pool_tokens(latent: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """(B, 1 + N, D) tokens -> (B, D): the cls token or the mean of the patch tokens."""
    if pool == "cls":
        return latent[:, 0]
    if pool == "avg":
        return latent[:, 1:].mean(dim=1)
    raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")


def encode(encoder: ViTEncoder, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """imgs (B, C, H, W) in [0, 1] -> features (B, D), no masking."""
    return pool_tokens(encode_tokens(encoder, imgs), pool)


@torch.no_grad()
def extract_features(encoder: ViTEncoder, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
                     pool: str = "cls", progress: bool = True, desc: str = "features",
                     num_workers: int | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, D) float32 and labels (n,) int64 of ``dataset`` (in its order), on the CPU; `num_workers` as
    gmae.runtime.threads.resolve_workers (the order, and so the result, is the same with any number)."""
    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=resolve_workers(num_workers, dataset, device), worker_init_fn=worker_init)
    feats, labels = [], []
    for imgs, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        feats.append(encode(encoder, imgs.to(device, non_blocking=True), pool).float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------- kNN


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, num_classes: int,
                k: int = 20, T: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted kNN: predicted class (m,) of each val feature.

    train_f (n, D), train_y (n,), val_f (m, D). Cosine similarities s of the
    k nearest training features; class c scores sum over those neighbours of
    class c of exp(s / T). T -> inf is a majority vote; small T trusts the
    closest neighbours most.
    """
    k = min(int(k), len(train_f))
    train_n = F.normalize(train_f.float(), dim=1)
    preds = []
    for start in range(0, len(val_f), chunk):
        sim = F.normalize(val_f[start : start + chunk].float(), dim=1) @ train_n.T  # (m, n)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / T).exp()
        votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_y[top_idx], weights)  # (m, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 k: int = 20, T: float = 0.07, num_classes: int | None = None) -> float:
    """Top-1 accuracy (in [0, 1]) of :func:`knn_predict`."""
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_f, train_y, val_f, num_classes, k=k, T=T)
    return (pred == val_y).float().mean().item()


# --------------------------------------------------------------------------- linear probe


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block with ``n`` intra-op CPU threads, then restore the previous number."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class BatchNormAcross(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the global batch's: with a multi-process `ctx` (torchrun) the
    sums are all-reduced, so N processes with B/N images each normalise exactly as one process with all B.

    MAE's probe runs a per-GPU BatchNorm (``main_linprobe.py`` line 222), whose statistics depend on how many
    GPUs share the batch; here the run does not. The statistics are taken without a gradient: the probe's
    inputs are a frozen encoder's features, which get none anyway. One process: BatchNorm1d itself.
    """

    ctx: distributed.Context | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not self.training or ctx is None or not ctx.distributed:
            return super().forward(x)
        with torch.no_grad():
            count = distributed.sum_across(x.new_tensor([float(x.shape[0])]), ctx)
            mean = distributed.sum_across(x.sum(0), ctx) / count
            var = distributed.sum_across(((x - mean) ** 2).sum(0), ctx) / count  # biased, as BatchNorm normalises
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * count / (count - 1), alpha=m)  # unbiased, as BatchNorm keeps
            self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps)


class LinearHead(nn.Sequential):
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps=1e-6) then Linear."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__(BatchNormAcross(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01, generator=generator)
        nn.init.zeros_(self[1].bias)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, batch_size: int = 256, blr: float = 0.1,
                 warmup_epochs: int = 10, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 progress: bool = False) -> float:
    """Train a :class:`LinearHead` on frozen features; top-1 val accuracy in [0, 1].

    SGD (momentum 0.9, lr = blr * batch / 256, per-step linear warmup of
    ``warmup_epochs`` (at most half the epochs) then cosine to 0), mini-batches
    drawn by a generator seeded with ``seed``, so the same inputs give the
    same accuracy. Runs on the features' device.
    """
    device = train_f.device
    # Many tiny ops: one CPU thread is as fast on an idle machine and far faster on a busy one.
    with cpu_threads(1) if device.type == "cpu" else contextlib.nullcontext():
        return _linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs, batch_size, blr,
                             warmup_epochs, momentum, weight_decay, seed, progress)


def _linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs, batch_size, blr, warmup_epochs, momentum,
                  weight_decay, seed, progress) -> float:
    device = train_f.device
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(train_f.shape[1], num_classes, generator=g).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.0, momentum=momentum, weight_decay=weight_decay)
    n = len(train_f)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total, warmup = epochs * steps_per_epoch, min(warmup_epochs, epochs // 2) * steps_per_epoch
    peak = blr * batch_size / 256
    train_f, train_y = train_f.float(), train_y.to(device)
    head.train()
    step = 0
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            lr = peak * (step + 1) / warmup if step < warmup else \
                peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        pred = head(val_f.float().to(device)).argmax(dim=1)
    return (pred == val_y.to(device)).float().mean().item()


# --------------------------------------------------------------------------- MAE's protocol


class LARS(torch.optim.Optimizer):
    """MAE's LARS (``util/lars.py`` lines 14-47, from MoCo v3): SGD with momentum whose step for each
    parameter of more than one dimension is rescaled by the trust ratio.

    For p.ndim > 1: d = grad + weight_decay * p, then d *= trust_coefficient * ||p|| / ||d|| (1 when either
    norm is 0); parameters with ndim <= 1 (BatchNorm's, biases) take the plain gradient: no weight decay and
    no trust ratio. Then mu = momentum * mu + d (mu starts at 0) and p -= lr * mu.

    Not timm's ``timm.optim.Lars``: that one divides by ||grad|| + weight_decay * ||p|| + eps rather than
    by ||grad + weight_decay * p||, adapts only groups with weight decay unless ``always_adapt``, and has
    no exclusion by dimension (its callers build parameter groups for that); at weight decay 0 with
    ``always_adapt`` on the matrices and eps 0 the two agree (tests/test_probe_mae.py checks it).
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # not a normalisation's gamma / beta or a bias
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def mae_learning_rate(epoch: float, peak: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """MAE's ``util/lr_sched.py`` (lines 9-15) at a fractional ``epoch``: linear warmup from 0, then half-cycle
    cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


class _ProbeTask(Task):
    """MAE's linear probe on the engine: the frozen encoder's features of each batch, the head's cross-entropy."""

    def __init__(self, encoder: ViTEncoder, pool: str, batch_size: int, device: torch.device):
        self.encoder, self.pool, self.batch_size, self.device = encoder, pool, batch_size, device

    def prepare(self, batch, step):
        imgs, labels = batch
        with torch.no_grad():  # the frozen encoder: no graph, no gradient
            feats = encode(self.encoder, imgs.to(self.device), self.pool).float()
        return feats, labels.to(self.device)

    def loss(self, net, micro, scale):
        feats, labels = micro
        return F.cross_entropy(net(feats), labels) * scale, None  # main_linprobe.py line 256


def mae_linear_probe(encoder: ViTEncoder, train: Dataset, val: Dataset, num_classes: int, pool: str = "cls",
                     epochs: int = 90, batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0,
                     warmup_epochs: float = 10, seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, val_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ctx: distributed.Context | None = None) -> dict:
    """MAE's linear probe (``main_linprobe.py``, see the module docstring) of a frozen ``encoder``.

    ``train`` is a labelled set with ``load(index, rng)`` (its training augmentation; built with
    ``augment=True``) and ``targets``; ``val`` is read through ``__getitem__`` (or ``val_features``, its
    (features, labels) already extracted with ``pool``). Batches, augmentation and the head's initial weights
    are functions of ``seed``. Under torchrun (``ctx``, gmae.runtime.distributed.init) each process takes its
    share of every batch and the head is data-parallel: N processes train the head one process would, to float
    rounding (:class:`BatchNormAcross`). The encoder gets no gradient and is left as it was. ``warmup_epochs`` is capped
    at half the epochs (as the cached probe's). Returns ``linear_acc`` (top-1 in [0, 1]), ``linear_batch``,
    ``linear_lr`` (the peak lr), ``linear_steps``, ``linear_warmup_epochs`` and ``head`` (the trained head, on
    the CPU).
    """
    from ..data import StepBatchSampler
    from ..data.labelled import LabelledStream

    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if warmup_epochs < 0:
        raise GMAEError(f"warmup epochs must be >= 0; got {warmup_epochs}")
    warmup_epochs = min(warmup_epochs, epochs / 2)  # at most half the run, as the cached protocol's
    if not blr > 0 or weight_decay < 0:
        raise GMAEError(f"blr must be positive and weight decay >= 0; got {blr}, {weight_decay}")
    n = len(train)
    batch_size = min(int(batch_size), n)
    if batch_size < 2:
        raise GMAEError(f"MAE's linear probe needs at least 2 training images per batch (BatchNorm); got {n} images")
    per_epoch = n // batch_size  # full batches only: MAE's drop_last=True (main_linprobe.py line 178)
    total = epochs * per_epoch
    peak = blr * batch_size / 256  # main_linprobe.py lines 239-240
    ctx = ctx or distributed.Context(device=torch.device(device))
    if batch_size % ctx.world_size:
        raise GMAEError(f"MAE's linear probe: batch {batch_size} must be a multiple of the {ctx.world_size} processes")
    was_training = encoder.training
    encoder.eval()
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(encoder.cls_token.shape[-1], num_classes, generator=g).to(device)
    head[0].ctx = ctx
    opt = LARS(head.parameters(), lr=0.0, weight_decay=weight_decay)  # main_linprobe.py line 252
    loader = DataLoader(LabelledStream(train, seed),
                        batch_sampler=StepBatchSampler(batch_size, 0, total, ctx.rank, ctx.world_size))
    head.train()
    # The encoder is frozen and the same in every process: only the head is data-parallel.
    net = nn.parallel.DistributedDataParallel(head, broadcast_buffers=False) if ctx.distributed else head
    run = SimpleNamespace(steps=total, batch_size=batch_size, seed=seed)  # the engine's defaults for the rest
    engine = Engine(head, opt, run, ctx, lambda step: mae_learning_rate(step / per_epoch, peak, warmup_epochs, epochs),
                    net=net, progress=progress, desc="linear probe (MAE)")  # engine_finetune.py line 47: per step
    engine.run(_ProbeTask(encoder, pool, batch_size, ctx.device), loader)
    encoder.train(was_training)
    head.eval()
    val_f, val_y = val_features if val_features is not None else \
        extract_features(encoder, val, batch_size, device, pool, progress, "val features")
    with torch.no_grad():
        pred = head(val_f.float().to(device)).argmax(dim=1)
    acc = (pred == val_y.to(device)).float().mean().item()
    return {"linear_acc": acc, "linear_batch": batch_size, "linear_lr": peak, "linear_steps": total,
            "linear_warmup_epochs": warmup_epochs, "head": head.cpu()}


# --------------------------------------------------------------------------- both


def linear_settings(protocol: str, **given) -> dict:
    """``protocol``'s linear-probe settings (epochs, batch_size, blr, weight_decay, warmup_epochs): its
    :data:`PROTOCOL_DEFAULTS` with the ``given`` values that are not None."""
    if protocol not in PROTOCOLS:
        raise GMAEError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    unknown = set(given) - set(PROTOCOL_DEFAULTS[protocol])
    if unknown:
        raise TypeError(f"unknown linear-probe settings {sorted(unknown)}")
    return {**PROTOCOL_DEFAULTS[protocol], **{k: v for k, v in given.items() if v is not None}}


def probe(encoder: ViTEncoder, data: str | tuple[Dataset, Dataset, int] = "digits", img_size: int | None = None,
          batch_size: int = 256, device: str | torch.device = "cpu", pool: str = "cls", k: int = 20,
          T: float = 0.07, epochs: int | None = None, seed: int = 0, progress: bool = True,
          protocol: str = "cached", linear_batch: int | None = None, blr: float | None = None,
          weight_decay: float | None = None, warmup_epochs: float | None = None) -> dict:
    """Linear-probe and kNN accuracy of a frozen ``encoder`` on ``data``.

    ``data``: a spec for :func:`gmae.data.labelled.build_labelled` (images
    resized to ``img_size``, default the encoder's input size) or an already
    built ``(train, val, num_classes)`` (for ``protocol="mae"`` built with
    ``augment=True``: the train set's ``load(index, rng)`` augments).
    ``batch_size``: the feature-extraction batch. ``protocol``, ``epochs``,
    ``linear_batch``, ``blr``, ``weight_decay``, ``warmup_epochs``: the
    linear probe's (None: the protocol's :data:`PROTOCOL_DEFAULTS`). Returns a dict with ``linear_acc``,
    ``knn_acc`` (in [0, 1]), ``protocol``, the linear settings used, ``num_train``, ``num_val``,
    ``num_classes``, ``feature`` (which feature was probed) and ``dim``.
    """
    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    settings = linear_settings(protocol, epochs=epochs, batch_size=linear_batch, blr=blr, weight_decay=weight_decay,
                               warmup_epochs=warmup_epochs)
    if isinstance(data, str):
        from ..data.labelled import build_labelled

        data = build_labelled(data, img_size or encoder.patch_embed.img_size, augment=protocol == "mae",
                              progress=progress)
    train, val, num_classes = data
    # MAE's protocol trains on every process of a torchrun job (each on its GPU); the cached one is one process's.
    ctx = distributed.init(str(device)) if protocol == "mae" else None
    device = device if ctx is None else ctx.device
    encoder = encoder.to(device)
    train_f, train_y = extract_features(encoder, train, batch_size, device, pool, progress, "train features")
    val_f, val_y = extract_features(encoder, val, batch_size, device, pool, progress, "val features")
    # Probes run where the encoder ran (the features are small next to the images).
    train_f, train_y, val_f, val_y = (t.to(device) for t in (train_f, train_y, val_f, val_y))
    extra = {}
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        if protocol == "cached":
            linear = linear_probe(train_f, train_y, val_f, val_y, num_classes, seed=seed, **settings)
        else:
            out = mae_linear_probe(encoder, train, val, num_classes, pool, seed=seed, device=device,
                                   progress=progress, val_features=(val_f, val_y), ctx=ctx, **settings)
            linear = out["linear_acc"]
            settings["batch_size"] = out["linear_batch"]  # at most the train set
            settings["warmup_epochs"] = out["linear_warmup_epochs"]  # at most half the epochs
            extra = {"linear_lr": out["linear_lr"], "linear_steps": out["linear_steps"]}
    knn = knn_accuracy(train_f, train_y, val_f, val_y, k=k, T=T, num_classes=num_classes)
    feature = "cls token after the final norm" if pool == "cls" else "mean of patch tokens after the final norm"
    return {"linear_acc": linear, "knn_acc": knn, "protocol": protocol, "num_train": len(train_f),
            "num_val": len(val_f), "num_classes": int(num_classes), "pool": pool, "feature": feature,
            "dim": int(train_f.shape[1]), "k": int(k), "T": float(T), "linear_epochs": int(settings["epochs"]),
            "linear_batch": int(settings["batch_size"]), "blr": float(settings["blr"]),
            "weight_decay": float(settings["weight_decay"]), "warmup_epochs": float(settings["warmup_epochs"]),
            **extra, "seed": int(seed)}


def format_probe(results: dict[str, dict], source: str, data: str) -> str:
    """`gmae probe`'s table of :func:`probe` results ({encoder label: result}, e.g. the pre-trained weights and
    the random-init baseline): a line naming the data and the feature, then the linear and kNN accuracy of
    each encoder, one column each, with how each was measured."""
    result = next(iter(results.values()))
    lines = [f"{source} ({' vs '.join(results)}), {data}: {result['num_train']} train / {result['num_val']} val "
             f"images, {result['num_classes']} classes; feature: {result['feature']} ({result['dim']}-d)"]
    if len(results) > 1:
        lines.append(" " * 10 + "".join(f"{label:>14}" for label in results))
    linear_how = f"BatchNorm + linear, SGD on cached features, {result['linear_epochs']} epochs" \
        if result["protocol"] == "cached" else \
        f"MAE's protocol: BatchNorm + linear, LARS, batch {result['linear_batch']}, {result['linear_epochs']} epochs"
    for key, how in (("linear_acc", linear_how), ("knn_acc", f"cosine, k={result['k']}, T={result['T']}")):
        cells = "".join(f"{100 * r[key]:13.2f}%" for r in results.values())
        lines.append(f"{key:<10}{cells}   ({how})")
    return "\n".join(lines)
