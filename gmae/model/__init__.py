"""Models: the shared ViT encoder, the MAE baseline, GMAE, the fine-tuning classifier, and their parameter groups."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from .classifier import ViTClassifier, build_classifier
from .gmae import GMAE, gaussians_from_raw
from .mae import MAE, Output
from .vit import ViTEncoder, masking_noise, param_groups, patchify, random_masking, unpatchify


def build_model(cfg: ModelConfig) -> MAE:
    """GMAE or MAE as `cfg.model` says; both share encoder, decoder trunk and loss."""
    return {"gmae": GMAE, "mae": MAE}[cfg.model](cfg)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "GMAE", "MAE", "Output", "ViTClassifier", "ViTEncoder", "build_classifier", "build_model", "count_parameters",
    "gaussians_from_raw", "masking_noise", "param_groups", "patchify", "random_masking", "unpatchify",
]
