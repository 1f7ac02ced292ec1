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


def pixel_curvature(mask: torch.Tensor, mode: str, patch_size: int, channels: int) -> torch.Tensor:
    """∂²L/∂image² of `reconstruction_loss` for every pixel (the same for each channel): (B, H, W).

    The loss is a weighted sum of squared errors, so its Hessian in the
    rendered image is diagonal: 2 × the weight of each pixel element (MSE per
    patch over p·p·C elements, then averaged over the masked patches, or over
    all of them for "all"). The rasterizer's depth-order gradient needs it to
    evaluate the exact loss change of a swap (see `gmae.render.rasterize`).

    mask (B, N) 1 = masked patch, as `reconstruction_loss` gets it.
    """
    B, N = mask.shape
    if mode == "all":
        weight = torch.full_like(mask, 1.0 / (B * N))
    else:
        weight = mask / mask.sum().clamp_min(1)
    per_patch = 2.0 * weight / (patch_size * patch_size * channels)  # (B, N)
    grid = int(round(N**0.5))
    return per_patch.view(B, grid, grid).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance (MAE's norm_pix target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def denormalize_patches(normalized: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo `normalize_patches` with the statistics of `reference` (for showing norm-pix predictions)."""
    return normalized * (reference.var(dim=-1, keepdim=True) + eps) ** 0.5 + reference.mean(dim=-1, keepdim=True)
