"""MAE: a ViT encoder on the visible patches and a light decoder that predicts pixels.

This is the baseline and the scaffold GMAE builds on (`gmae.model.gmae.GMAE`
subclasses it and swaps the pixel head for Gaussians + splatting), so the two
share their encoder, decoder trunk and loss exactly and can be compared with one
switch (`ModelConfig.model`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import ModelConfig
from .loss import denormalize_patches, reconstruction_loss
from .vit import Block, ViTEncoder, init_weights, patchify, sincos_pos_embed, unpatchify


class Output(NamedTuple):
    loss: torch.Tensor  # scalar
    image: torch.Tensor  # (B, C, H, W) the model's reconstruction, in image space
    mask: torch.Tensor  # (B, N) 1 = masked patch
    gaussians: object = None  # GMAE only: the Gaussians that were rendered


class MAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
            input_norm=cfg.input_norm, patch_bias_init=cfg.patch_bias_init,
        )
        grid = cfg.img_size // cfg.patch_size
        d = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(d, grid).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(d, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        init_weights(self.decoder_embed)
        init_weights(self.decoder_blocks)
        nn.init.normal_(self.mask_token, std=0.02)
        self.build_head()

    # ------------------------------------------------------------------ head
    def build_head(self) -> None:
        """MAE's head: one linear map from a decoder token to its patch's pixels."""
        self.decoder_pred = nn.Linear(self.cfg.decoder_embed_dim, self.cfg.patch_size**2 * self.cfg.in_chans)
        init_weights(self.decoder_pred)

    # ------------------------------------------------------------------ decoder
    def run_decoder(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + n, D) -> predicted patches (B, N, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1 + n, d)
        B, n1, d = x.shape
        N = ids_restore.shape[1]
        # Put a mask token at every masked position and unshuffle to patch order.
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(B, N + 1 - n1, -1)], dim=1)  # (B, N, d)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed  # (B, 1 + N, d)
        x = self.run_decoder(x)
        return self.decoder_pred(x[:, 1:, :])  # drop cls

    # ------------------------------------------------------------------ forward
    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None,
                loss_scale: float = 1.0) -> Output:
        """imgs (B, C, H, W) in [0, 1]; noise (B, N) optional masking noise; mask_ratio overrides the config's;
        loss_scale multiplies the loss (gradient accumulation passes 1/K)."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, p*p*C)
        target = patchify(imgs, self.cfg.patch_size)
        loss = reconstruction_loss(pred, target, mask, self.cfg.loss) * loss_scale
        with torch.no_grad():  # back to image space for display
            if self.cfg.loss == "masked_normpix":
                pred_px = denormalize_patches(pred, target)
            else:
                pred_px = pred
            image = unpatchify(pred_px, self.cfg.patch_size, self.cfg.in_chans)
        return Output(loss, image, mask)

    def stats(self, out: Output) -> dict[str, float]:
        """Monitors logged beside the loss (GMAE: its Gaussians' collapse statistics; MAE: none)."""
        return {}


__all__ = ["MAE", "Output"]
