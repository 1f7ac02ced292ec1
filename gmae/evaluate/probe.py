"""Frozen-encoder probes: a linear classifier and a kNN classifier on the encoder's features.

Pre-training loss says how well a model reconstructs pixels, not how useful
its features are; the standard check (MAE, DINO) is to freeze the encoder and
measure how well its features classify a labelled data set:

* **linear probe** (MAE's recipe on cached features): BatchNorm1d without
  affine parameters, then one Linear layer (weights ~ N(0, 0.01), truncated),
  trained with cross-entropy. MAE uses LARS at batch 16384 for 90 epochs; on
  small data sets (thousands of images) plain SGD with momentum 0.9 at batch
  256 converges in far fewer steps, so that is what runs here: weight decay 0,
  lr = blr * batch / 256 with blr 0.1, 10-epoch linear warmup, cosine to 0,
  100 epochs, seeded shuffling and initialisation.
* **kNN** (DINO's weighted kNN): cosine similarity to every training
  feature, the k = 20 nearest vote with weight exp(similarity / T), T = 0.07.

Features are the cls token after the encoder's final norm (``pool="cls"``,
MAE's linear-probe feature), or the mean of the patch tokens after that norm
(``pool="avg"``). Images are fed as the encoder saw them in pre-training:
[0, 1] values, no mean/std normalisation.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import GMAEError
from ..model.vit import ViTEncoder
from ..threads import worker_init

POOLS = ("cls", "avg")


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
                     num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, D) float32 and labels (n,) int64 of ``dataset`` (in its order), on the CPU."""
    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=worker_init)
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


class LinearHead(nn.Sequential):
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps=1e-6) then Linear."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
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


# --------------------------------------------------------------------------- both


def probe(encoder: ViTEncoder, data: str | tuple[Dataset, Dataset, int] = "digits", img_size: int | None = None,
          batch_size: int = 256, device: str | torch.device = "cpu", pool: str = "cls", k: int = 20,
          T: float = 0.07, epochs: int = 100, seed: int = 0, progress: bool = True) -> dict:
    """Linear-probe and kNN accuracy of a frozen ``encoder`` on ``data``.

    ``data``: a spec for :func:`gmae.data.labelled.build_labelled` (images
    resized to ``img_size``, default the encoder's input size) or an already
    built ``(train, val, num_classes)``. Returns a dict with ``linear_acc``,
    ``knn_acc`` (in [0, 1]), ``num_train``, ``num_val``, ``num_classes``,
    ``feature`` (which feature was probed) and ``dim``.
    """
    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if isinstance(data, str):
        from ..data.labelled import build_labelled

        data = build_labelled(data, img_size or encoder.patch_embed.img_size, progress=progress)
    train, val, num_classes = data
    encoder = encoder.to(device)
    train_f, train_y = extract_features(encoder, train, batch_size, device, pool, progress, "train features")
    val_f, val_y = extract_features(encoder, val, batch_size, device, pool, progress, "val features")
    # Probes run where the encoder ran (the features are small next to the images).
    train_f, train_y, val_f, val_y = (t.to(device) for t in (train_f, train_y, val_f, val_y))
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        linear = linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs=epochs, seed=seed)
    knn = knn_accuracy(train_f, train_y, val_f, val_y, k=k, T=T, num_classes=num_classes)
    feature = "cls token after the final norm" if pool == "cls" else "mean of patch tokens after the final norm"
    return {"linear_acc": linear, "knn_acc": knn, "num_train": len(train_f), "num_val": len(val_f),
            "num_classes": int(num_classes), "pool": pool, "feature": feature, "dim": int(train_f.shape[1]),
            "k": int(k), "T": float(T), "linear_epochs": int(epochs), "seed": int(seed)}
