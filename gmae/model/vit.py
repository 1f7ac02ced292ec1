"""The ViT pieces shared by GMAE, MAE and the fine-tuning classifier: patchify, masking, blocks,
encoder, and the optimizer's parameter groups (weight decay, layer-wise lr decay).

Parameter names follow timm's VisionTransformer (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, `norm`, ...) so the encoder
can be handed to timm-based tools without renaming.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import IMAGENET_MEAN, IMAGENET_STD, INPUT_NORMS


# --------------------------------------------------------------------------- patches


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); inverse of `patchify` for square grids."""
    B, N, _ = x.shape
    h = w = int(round(N**0.5))
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE's per-sample random masking by argsort of uniform noise.

    x: (B, N, D). Returns
      x_visible (B, n, D) with n = int(N * (1 - mask_ratio)),
      mask (B, N) with 0 = kept, 1 = masked, in the original patch order,
      ids_restore (B, N) which undoes the shuffle.
    `noise` (B, N) can be given so that masking is reproducible from a seed.
    """
    B, N, D = x.shape
    n_keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def masking_noise(seed: int, step: int, batch: int, num_patches: int) -> torch.Tensor:
    """The masking noise of one step, (B, N), a pure function of (seed, step): `random_masking`'s `noise`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(batch, num_patches, generator=g)


def sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE), shape (1 + N or N, dim)."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in MAE

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


# --------------------------------------------------------------------------- blocks


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT block without layer-scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and patch conv as a linear), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


# --------------------------------------------------------------------------- encoder


class InputNorm(nn.Module):
    """The encoder's input normalisation (gmae.config.INPUT_NORMS): [0, 1] images -> what the ViT was trained on.

    Its buffers stay out of the state dict, so checkpoints and timm exports keep timm's names and load either
    way; a classifier built from the encoder takes this module over with the others."""

    def __init__(self, input_norm: str = "none"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}; got {input_norm!r}")
        self.input_norm = input_norm
        if input_norm == "imagenet":
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, -1, 1, 1), persistent=False)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return (imgs - self.mean) / self.std if self.input_norm == "imagenet" else imgs


class ViTEncoder(nn.Module):
    """MAE's encoder: patch embedding + fixed sin-cos positions + cls token + blocks.

    With `mask_ratio > 0` it sees only the visible patches; with 0 it is a plain
    ViT feature extractor (used by probes and fine-tuning).
    """

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 input_norm: str = "none", patch_bias_init: str = "zero"):
        super().__init__()
        # The [0, 1] images every caller passes are normalised here, so that a checkpoint's every user
        # (fine-tuning, probes, readouts) feeds the encoder as it was trained.
        self.input_norm = input_norm
        self.normalize = InputNorm(input_norm)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A parameter (as in MAE and timm) so that state dicts match timm's names; never trained.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(embed_dim, int(n**0.5)).unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)
        drawn = self.patch_embed.proj.bias.detach().clone()  # nn.Conv2d's own U(±1/sqrt(fan_in)) draw
        init_weights(self)
        if patch_bias_init == "torch":
            # MAE and the GMAE authors re-draw only the patch embedding's weight, so its bias keeps the Conv2d
            # default (facebookresearch/mae models_mae.py lines 74-76 at efb2a80; tekotan/video-gmae
            # vidgmae/models/components/mae/models_mae.py lines 357-359 at c630810). gmae zeroes it (init_weights).
            with torch.no_grad():
                self.patch_embed.proj.bias.copy_(drawn)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) in [0, 1] -> latent (B, 1 + n, D), mask (B, N), ids_restore (B, N)."""
        x = self.patch_embed(self.normalize(imgs)) + self.pos_embed[:, 1:, :]  # (B, N, D)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, n, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + n, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore


# --------------------------------------------------------------------------- optimizer parameter groups

#: Parameters never weight-decayed besides the 1-d ones (norms, biases): the tokens and positions.
NO_WEIGHT_DECAY = ("cls_token", "mask_token", "query_embed", "pos_embed")


def layer_id(name: str, depth: int) -> int:
    """MAE's layer index of a ViT parameter (timm names): 0 embeddings, i + 1 block i, depth + 1 everything after."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of `model`'s trainable parameters (the role of nanoGPT's configure_optimizers).

    Weight decay on matrices only: not on norms, biases, or the cls/mask/query
    tokens (:data:`NO_WEIGHT_DECAY`). Without `layer_decay` (pre-training):
    two groups, [decay, no decay]. With it (MAE's ``param_groups_lrd``, for a
    ViT whose parameters have timm's names at the top, such as the fine-tuning
    classifier): one group per (layer, decay), in layer order, each with its
    ``layer_id`` (:func:`layer_id`) and ``lr_scale`` = layer_decay^(depth + 1 - layer):
    the head at the full lr, the deepest block at x decay, the embeddings at
    x decay^(depth + 1).
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = {name for name, p in trainable if p.ndim <= 1 or name.endswith(NO_WEIGHT_DECAY)}
    if layer_decay is None:
        return [
            {"params": [p for name, p in trainable if name not in no_decay], "weight_decay": weight_decay},
            {"params": [p for name, p in trainable if name in no_decay], "weight_decay": 0.0},
        ]
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in trainable:
        lid = layer_id(name, depth)
        group = groups.setdefault((lid, name in no_decay), {
            "params": [], "weight_decay": 0.0 if name in no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
