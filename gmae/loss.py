"""The reconstruction loss shared by GMAE (on its render) and MAE (on its pixels)."""

from __future__ import annotations

import torch


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mode: str = "masked") -> torch.Tensor:
    """Mean squared error per patch, averaged as `mode` says.

    pred    (B, N, p*p*C)  predicted patches (GMAE: its render, patchified)
    target  (B, N, p*p*C)  the image's patches, un-normalised, in [0, 1]
    mask    (B, N)         1 = masked patch, 0 = visible
    mode    "masked": mean over masked patches (the paper's best);
            "all": mean over every patch;
            "masked_normpix": masked, against a per-patch normalised target
            (MAE's norm_pix_loss; for GMAE, whose colours live in [0, 1], this
            is the paper's much worse ablation, kept for reproducing it).
    """
    if mode == "masked_normpix":
        target = normalize_patches(target)
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    if mode == "all":
        return per_patch.mean()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance (MAE's norm_pix target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def denormalize_patches(normalized: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo `normalize_patches` with the statistics of `reference` (for showing norm-pix predictions)."""
    return normalized * (reference.var(dim=-1, keepdim=True) + eps) ** 0.5 + reference.mean(dim=-1, keepdim=True)
