"""MAE's fine-tuning classifier: a (pre-trained) ViT encoder, a pooled feature and a linear head.

The recipe (MAE, ``main_finetune.py``): the encoder's patch embedding,
positions, cls token and blocks, then the pooled feature and a linear
``head`` (weights ~ N(0, 2e-5)). Pooling (``global_pool``, MAE
``models_vit.py`` lines 46-51): ``"avg"`` (MAE's fine-tuning default,
``main_finetune.py`` lines 114-115), the mean of the patch tokens through
``fc_norm``, a fresh LayerNorm that replaces the encoder's final norm; or
``"cls"`` (MAE's ``--cls_token``), the cls token through the encoder's
(pre-trained) final ``norm``. Parameter names are timm's, so
:func:`gmae.model.vit.param_groups` gives it MAE's layer-wise lr decay.
Stochastic depth ("drop path") in every block, rate rising linearly from 0
to ``drop_path`` with depth. The encoder's ``Block`` has none, so
:class:`ViTClassifier` runs each block's two residual branches itself and
passes them through :class:`DropPath`: no wrapper modules, so the state
dict keeps the encoder's (and timm's) names.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GLOBAL_POOLS, ModelConfig
from ..errors import GMAEError
from .vit import ViTEncoder

__all__ = ["GLOBAL_POOLS", "DropPath", "ViTClassifier", "build_classifier"]


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for whole samples with probability ``p``.

    Training: (B, ...) -> branch x mask / (1 - p), mask ~ Bernoulli(1 - p) per
    sample (the expected value is unchanged). Eval, or p = 0: identity.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        self.share = (0, 1)  # (rank, processes): this process's slice of the global batch (ViTClassifier.share_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        rank, world = self.share
        # Drawn for the whole global batch and sliced as the samples are (gmae.data.stream.global_batch takes
        # [rank::world]), so that each sample gets the mask it would get in one process: the run does not
        # depend on how many processes share it.
        mask = x.new_empty((x.shape[0] * world,) + (1,) * (x.ndim - 1)).bernoulli_(keep)[rank::world]
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class ViTClassifier(nn.Module):
    """MAE's fine-tuning ViT built from a (pre-trained) :class:`ViTEncoder`.

    Takes over the encoder's modules (not copies). imgs (B, C, H, W) in [0, 1]
    -> logits (B, num_classes). ``global_pool``: "avg" (``fc_norm`` of the
    patch-token mean) or "cls" (the encoder's ``norm`` of the cls token).
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, drop_path: float = 0.1, global_pool: str = "avg"):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise GMAEError(f"global pool must be one of {', '.join(GLOBAL_POOLS)}; got {global_pool!r}")
        self.global_pool = global_pool
        self.patch_embed = encoder.patch_embed
        # The encoder's input normalisation (gmae.config.INPUT_NORMS) goes with it: fine-tuning feeds [0, 1] images.
        self.normalize = encoder.normalize
        self.cls_token = encoder.cls_token
        self.pos_embed = encoder.pos_embed
        self.blocks = encoder.blocks
        dim = self.cls_token.shape[-1]
        depth = len(self.blocks)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # 0 ... drop_path
        self.drop_paths = nn.ModuleList(DropPath(r) for r in rates)  # no parameters: not in the state dict
        if global_pool == "avg":
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)  # the encoder's norm is dropped, as MAE's `del self.norm`
        else:
            self.norm = encoder.norm  # timm's name for it, so a cls-pool state dict loads in timm too
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def share_batch(self, rank: int, world_size: int) -> None:
        """Train as process `rank` of `world_size`, each with its [rank::world_size] slice of every batch:
        drop path then draws the masks one process would (every process seeds alike)."""
        for drop in self.drop_paths:
            drop.share = (int(rank), int(world_size))

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W) in [0, 1] -> every token (B, 1 + N, D) after the last block (cls first), before any norm."""
        x = self.patch_embed(self.normalize(imgs)) + self.pos_embed[:, 1:, :]  # (B, N, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        for block, drop in zip(self.blocks, self.drop_paths):
            # gmae.model.vit.Block's forward with drop path on both residual branches.
            x = x + drop(block.attn(block.norm1(x)))
            x = x + drop(block.mlp(block.norm2(x)))
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W) -> pooled, normalised features (B, D)."""
        x = self.forward_tokens(imgs)
        if self.global_pool == "avg":
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # global pool without the cls token
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))  # (B, num_classes)


def build_classifier(mcfg: ModelConfig, num_classes: int, drop_path: float = 0.1,
                     encoder: ViTEncoder | None = None, global_pool: str = "avg") -> ViTClassifier:
    """A classifier for ``mcfg``'s encoder: ``encoder`` if given, else freshly initialised."""
    if encoder is None:
        encoder = ViTEncoder(mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.embed_dim, mcfg.depth,
                             mcfg.num_heads, mcfg.mlp_ratio, input_norm=mcfg.input_norm)
    return ViTClassifier(encoder, num_classes, drop_path, global_pool)
