"""GMAE: MAE whose decoder emits k 3D Gaussians that are splatted into the image.

Differences from MAE (`gmae.model.mae`), all in the decoder:
  * no mask tokens for masked patches: the decoder sees [cls, visible tokens,
    k query tokens], each query = the shared mask token + its own embedding;
  * the k query outputs go through a linear head to 14 numbers each
    (position 3, scale 3, rotation 4, colour 3, opacity 1), see `gaussians_from_raw`;
  * the Gaussians are rendered with a fixed orthographic camera and the loss is
    MSE between the render and the image on the masked patches' pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loss import denormalize_patches, reconstruction_loss
from ..render.gaussians import Gaussians, render_gaussians
from .mae import MAE, Output
from .vit import init_weights, patchify, unpatchify

# The image spans 2 world units (x, y in (-1, 1)), so a world-unit scale s has an
# on-screen standard deviation of s * W / 2 pixels. The authors' camera makes
# c = 1 correspond to a largest standard deviation of about W / 16 pixels, so
# one unit of c is 1/8 of a world unit.
SCALE_UNIT = 1.0 / 8.0

# Initial std of each query's own embedding. Queries carry no position, so this
# random embedding is their only identity: at MAE's 0.02 every query reads the
# same attention average and all Gaussians take the image's mean colour (seen
# in practice); at unit scale, like the sin-cos positions that give MAE's mask
# tokens their identity, they differ from the start.
QUERY_INIT_STD = 1.0


def gaussians_from_raw(raw: torch.Tensor, max_scale: float) -> Gaussians:
    """raw (B, K, 11 + C) decoder outputs -> activated Gaussians (the activations of the authors' code)."""
    position = 2.0 * (torch.sigmoid(raw[..., 0:3]) - 0.5)  # (-1, 1)^3
    scale = max_scale * torch.sigmoid(raw[..., 3:6]) * SCALE_UNIT  # (0, c/8) world units
    rotation = F.normalize(raw[..., 6:10], dim=-1, eps=1e-8)  # unit quaternion (w, x, y, z)
    color = torch.sigmoid(raw[..., 10:-1])  # [0, 1], like the target image
    opacity = torch.sigmoid(raw[..., -1])
    return Gaussians(position, scale, rotation, color, opacity)


class GMAE(MAE):
    def build_head(self) -> None:
        cfg = self.cfg
        d = cfg.decoder_embed_dim
        # Each query's own embedding; the shared part is MAE's mask token.
        self.query_embed = nn.Parameter(torch.zeros(1, cfg.num_gaussians, d))
        nn.init.normal_(self.query_embed, std=QUERY_INIT_STD)
        self.gaussian_head = nn.Linear(d, 11 + cfg.in_chans)
        init_weights(self.gaussian_head)
        self.register_buffer("background", torch.tensor(cfg.background, dtype=torch.float32), persistent=False)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> Gaussians:
        """latent (B, 1 + n, D) -> k Gaussians per image."""
        x = self.decoder_embed(latent)  # (B, 1 + n, d)
        B, n1, d = x.shape
        # Visible tokens keep their own patch positions (there are no tokens for
        # the masked patches, so gather the positions instead of unshuffling).
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : n1 - 1]
        pos = torch.gather(self.decoder_pos_embed[:, 1:, :].expand(B, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], x[:, 1:, :] + pos], dim=1)
        queries = (self.mask_token + self.query_embed).expand(B, -1, -1)  # (B, k, d)
        x = self.run_decoder(torch.cat([x, queries], dim=1))  # (B, 1 + n + k, d)
        # Keep only the k query outputs; float32 even under bf16 autocast, where
        # positions would otherwise snap to steps of up to a pixel.
        raw = self.gaussian_head(x[:, n1:, :]).float()  # (B, k, 11 + C)
        return gaussians_from_raw(raw, self.cfg.max_scale)

    def render(self, gaussians: Gaussians) -> torch.Tensor:
        """(B, C, H, W) render of `gaussians` on the configured background."""
        size = self.cfg.img_size
        with torch.autocast(gaussians.means.device.type, enabled=False):  # splatting stays in float32
            image, _ = render_gaussians(gaussians, size, size, self.background, self.cfg.render_backend)
        return image

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None) -> Output:
        """imgs (B, C, H, W) in [0, 1]; noise (B, N) optional masking noise."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encoder(imgs, ratio, noise)
        gaussians = self.forward_decoder(latent, ids_restore)
        image = self.render(gaussians)  # (B, C, H, W)
        p = self.cfg.patch_size
        pred, target = patchify(image, p), patchify(imgs, p)
        loss = reconstruction_loss(pred, target, mask, self.cfg.loss)
        if self.cfg.loss == "masked_normpix":  # the render predicts normalised patches: show it in image space
            image = unpatchify(denormalize_patches(pred.detach(), target), p, self.cfg.in_chans)
        return Output(loss, image.detach(), mask, gaussians)
