"""GMAE: MAE whose decoder emits k 3D Gaussians that are splatted into the image.

Differences from MAE (`gmae.model.mae`), all in the decoder:
  * no mask tokens for masked patches: the decoder sees [cls, visible tokens,
    k query tokens], each query = the shared mask token + its own embedding;
  * the query outputs go through a linear head to 14 numbers per Gaussian
    (position 3, scale 3, rotation 4, colour 3, opacity 1), see `gaussians_from_raw`;
    each of the q = k / m query tokens emits m Gaussians (`ModelConfig.gaussians_per_query`,
    default 1), whose positions are their own ("absolute") or offsets around a
    per-token anchor ("anchored"), see `GMAE.gaussians_from_tokens`;
  * the Gaussians are rendered with a fixed camera (`ModelConfig.camera`, see
    `gmae.render.camera`) and the loss is MSE between the render and the image
    on the masked patches' pixels;
  * optionally (`ModelConfig.depth_grad = "swap"`), the rasterizer gives the
    depths the depth-order gradient, for which the render needs the loss's
    per-pixel curvature (`gmae.model.loss.pixel_curvature`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss import denormalize_patches, pixel_curvature, reconstruction_loss
from ..render.camera import get_camera
from ..render.contract import RenderSettings
from ..render.gaussians import Gaussians, render_gaussians
from .mae import MAE, Output
from .vit import init_weights, patchify, unpatchify

# Initial std of each query's own embedding. Queries carry no position, so this
# random embedding is their only identity: at MAE's 0.02 every query reads the
# same attention average and all Gaussians take the image's mean colour (seen
# in practice); at unit scale, like the sin-cos positions that give MAE's mask
# tokens their identity, they differ from the start.
QUERY_INIT_STD = 1.0
# The pointer's attention logits are scaled by this over the usual 1/sqrt(d): at 1 a fresh model's queries attend
# almost evenly and every pointer starts at the image's centre; at 4 each starts near a few patches.
POINTER_SHARPNESS = 4.0
# Rounds of slot attention (position_source "slots"): Locatello et al. (2020) use 3.
SLOT_ITERATIONS = 3


def anchor_spread(num_queries: int) -> float:
    """Largest |x| or |y| offset (world units) of an anchored Gaussian from its token's anchor.

    The image spans 2 x 2 units, so q tokens have a cell of side 2 / sqrt(q) each
    if they tile it; offsets of up to that side (a box twice the cell's side) let
    neighbouring groups overlap, as anchors need not sit on a grid.
    """
    return 2.0 / math.sqrt(num_queries)


def uniform_quaternion(raw: torch.Tensor, order: str = "authors") -> torch.Tensor:
    """raw (..., 3) -> unit quaternions (..., 4) in gmae's (w, x, y, z) order: the GMAE authors' rotation.

    u = sigmoid(raw) in (0, 1)^3 goes through Shoemake's uniform-random-rotation formula
    A = (sqrt(1-u1) sin 2πu2, sqrt(1-u1) cos 2πu2, sqrt(u1) sin 2πu3, sqrt(u1) cos 2πu3).
    order "authors": the quaternion is A in that order, A[0] = w. The authors' code builds A
    (tekotan/video-gmae, vidgmae/models/components/mae/models_mae.py lines 555-564) and hands it to
    legacy gsplat, which reads the first component as w (gsplat v0.1.1, gsplat/cuda/csrc/helpers.cuh
    line 144: ``w = quat.x``). order "scalar-last": A read as Shoemake wrote it, (x, y, z, w), so
    w = A[3] (gmae's reading before the authors' code settled it: another rotation for the same u).
    Either way uniform u give uniformly distributed rotations, and the norm is 1 by construction.
    """
    # sqrt(u1) = exp(logsigmoid(r) / 2) and sqrt(1 - u1) = exp(logsigmoid(-r) / 2): the same values, but
    # sqrt(sigmoid(r)) would have an infinite derivative where the sigmoid underflows to 0 (r < -88 in float32),
    # a NaN gradient; this form's derivative stays finite (and small) there.
    near, far = torch.exp(0.5 * F.logsigmoid(raw[..., 0])), torch.exp(0.5 * F.logsigmoid(-raw[..., 0]))
    a, b = 2.0 * math.pi * torch.sigmoid(raw[..., 1]), 2.0 * math.pi * torch.sigmoid(raw[..., 2])
    A = [far * torch.sin(a), far * torch.cos(a), near * torch.sin(b), near * torch.cos(b)]
    return torch.stack(A if order == "authors" else [A[3], A[0], A[1], A[2]], dim=-1)


def gaussians_from_raw(raw: torch.Tensor, max_scale: float, scale_unit: float, depth: str = "bounded",
                       max_opacity: float = 1.0, rotation: str = "normalize", position_gain: float = 1.0) -> Gaussians:
    """raw (B, K, 11 + C) decoder outputs -> activated Gaussians (the activations of the authors' code).

    scale_unit: world units per unit of c, the camera's (`Camera.scale_unit`:
    c = 1 gives a largest on-screen std of about W/16 pixels on every camera).
    depth: "bounded" z = 2·(sigmoid − ½) like x and y (the authors'),
    "linear" z = raw (never saturates), or "centred" the bounded z of the raw
    depth minus its mean over the image's K Gaussians.
    max_opacity: opacity = max_opacity·sigmoid. Above 1 a Gaussian's α =
    min(0.99, o·G) saturates over a core and falls off in a rim that is thin
    next to its size (a flat-topped blob with a sharp edge; 1 = the authors').
    rotation: "normalize" the 4 numbers raw[..., 6:10] divided by their norm, "uniform" the authors'
    map of 3 sigmoids (`uniform_quaternion` of raw[..., 6:9], in the authors' component order) or
    "uniform-scalar-last" (the same, read scalar-last). The head keeps its 14 numbers per Gaussian
    either way, so the uniform maps leave raw[..., 9] unused (its gradient is zero): every other option,
    slice and checkpoint layout stays the same.
    position_gain: x, y = 2·(sigmoid(gain·raw) − ½): a gain g makes the positions g times as sensitive to the
    head's outputs, and under Adam moves them g times as fast (`ModelConfig.position_gain`; 1: the authors').
    """
    position = 2.0 * (torch.sigmoid(raw[..., 0:3]) - 0.5)  # (-1, 1)^3
    if position_gain != 1.0:
        position = torch.cat([2.0 * (torch.sigmoid(position_gain * raw[..., 0:2]) - 0.5), position[..., 2:]], -1)
    if depth == "linear":
        position = torch.cat([position[..., :2], raw[..., 2:3]], dim=-1)
    elif depth == "centred":
        # Why: the head's z is one linear read-out of the decoder, and under Adam a small but consistent
        # push on it (every Gaussian wanting to be larger, which under the authors' camera z also grants)
        # moves all K depths together onto the sigmoid's limit, where they tie and pass no gradient (the
        # collapse of docs/reports/depth.md). Subtracting the image's mean removes exactly that common mode:
        # only the order and relative sizes, which are all the readouts use, are learned.
        z = raw[..., 2:3]
        position = torch.cat([position[..., :2], 2.0 * (torch.sigmoid(z - z.mean(dim=-2, keepdim=True)) - 0.5)], -1)
    scale = max_scale * torch.sigmoid(raw[..., 3:6]) * scale_unit  # (0, c) scale units
    if rotation in ("uniform", "uniform-scalar-last"):
        quats = uniform_quaternion(raw[..., 6:9], "authors" if rotation == "uniform" else "scalar-last")
    else:
        quats = F.normalize(raw[..., 6:10], dim=-1, eps=1e-8)  # unit quaternion (w, x, y, z)
    color = torch.sigmoid(raw[..., 10:-1])  # [0, 1], like the target image
    opacity = max_opacity * torch.sigmoid(raw[..., -1])
    return Gaussians(position, scale, quats, color, opacity)


class GMAE(MAE):
    def build_head(self) -> None:
        cfg = self.cfg
        self.camera = get_camera(cfg.camera)
        d, m, per = cfg.decoder_embed_dim, cfg.gaussians_per_query, 11 + cfg.in_chans
        # Each query's own embedding; the shared part is MAE's mask token.
        self.query_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, d))
        if cfg.query_init == "uniform":  # the authors' code's U[0, 1): distinct queries too, all with a common mean 1/2
            nn.init.uniform_(self.query_embed, 0.0, 1.0)
        else:
            nn.init.normal_(self.query_embed, std=QUERY_INIT_STD)
        # m Gaussians per token (Gaussian j of token t is Gaussian t * m + j), then, when anchored, the
        # token's anchor (x, y).
        self.gaussian_head = nn.Linear(d, m * per + 2 * self.anchored, bias=cfg.head_bias)
        # head_init "torch" keeps nn.Linear's own U(±1/sqrt(d)) init, drawn by its constructor above, as the authors'
        # head does: their initialize_weights() runs before the head exists (models_mae.py lines 306 and 333-335).
        # At d = 512 its std is 0.0255, against xavier's 0.0616: the first raw outputs are 2.4x narrower.
        if cfg.head_init == "xavier":
            init_weights(self.gaussian_head)
        if m > 1 and cfg.head_init == "xavier":  # (m = 1 keeps the one-Gaussian initialisation, random stream included)
            # Each block of the head drawn as if it were its own one-Gaussian head (xavier over d -> 14):
            # xavier over the m-times wider output would shrink the weights, and with them the spread of
            # the starting positions and colours, as m grows.
            bound = math.sqrt(6.0 / (d + per))
            nn.init.uniform_(self.gaussian_head.weight, -bound, bound)
        # Every Gaussian starts at the size c = 1 starts at (sigmoid 1/2, half its largest std) whatever c is:
        # a larger c raises the ceiling, not the start. Started at half of c = 4, the Gaussians blend into the
        # image's mean colour and training never leaves it (seen: 1200 steps of flat renders; the paper notes
        # that large scales at the start make the optimisation harder). c <= 1 is unchanged.
        start = min(0.5, 0.5 / cfg.max_scale)
        # And a token's m Gaussians share what one Gaussian of a one-per-token head would cover: each starts at
        # 1/sqrt(m) of that size (std), so the starting coverage, and with it the render's cost, does not grow
        # with m (at m = 16 full-size Gaussians made rendering 41% of the tiny step: docs/reports/gaussians_per_query.md).
        start = start / math.sqrt(m)
        # Likewise every opacity starts at 1/2 whatever max_opacity is.
        opacity_start = 0.5 / cfg.max_opacity
        if cfg.head_bias:
            with torch.no_grad():
                blocks = self.gaussian_head.bias[: m * per].view(m, per)  # (the anchors' 2 biases, if any, stay 0)
                blocks[:, 3:6] = math.log(start / (1.0 - start))
                blocks[:, -1] = math.log(opacity_start / (1.0 - opacity_start))
        # else the authors' bias-free head: no bias sets the starting sizes and opacities, so every raw number is
        # centred on 0 and every scale on c·sigmoid(0) = c/2 whatever c and m are (not the size above), every
        # opacity on max_opacity/2 and, with m > 1 anchored, every anchor on the image's centre.
        self.register_buffer("background", torch.tensor(cfg.background, dtype=torch.float32), persistent=False)
        if cfg.position_source in ("pointer", "slots"):  # the attention that places each query's Gaussians
            self.pointer_query, self.pointer_key = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            init_weights(self.pointer_query)
            init_weights(self.pointer_key)
        if cfg.position_source == "slots":  # slot attention's value, update and refinement (see `group`)
            self.slot_value, self.slot_out = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.slot_norm_tokens, self.slot_norm_slots, self.slot_norm_mlp = (nn.LayerNorm(d) for _ in range(3))
            self.slot_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for module in (self.slot_value, self.slot_out, self.slot_mlp):
                init_weights(module)

    @property
    def anchored(self) -> bool:
        """Whether positions are offsets around a per-token anchor (only with m > 1: one Gaussian is its anchor)."""
        return self.cfg.position_param == "anchored" and self.cfg.gaussians_per_query > 1

    def gaussians_from_tokens(self, raw: torch.Tensor, pointer: torch.Tensor | None = None) -> Gaussians:
        """raw (B, q, m * (11 + C) [+ 2]) head outputs -> the k = q * m Gaussians of each image.

        Absolute: every Gaussian is `gaussians_from_raw` of its own 11 + C numbers, as with one
        Gaussian per token. Anchored: the token's last two numbers give its anchor, in (-1, 1)^2
        like an absolute position, and each Gaussian's x, y numbers an offset of at most
        `anchor_spread(q)` around it (tanh), so a token's Gaussians stay a local group; z,
        like everything else, stays each Gaussian's own (a group straddling an occlusion
        boundary needs both depths).

        pointer (B, q, 2): the tokens' anchors from `point` (``position_source="pointer"``): each Gaussian's
        x, y is then an offset of at most one patch (tanh) around its token's pointer.
        """
        cfg = self.cfg
        B, q, _ = raw.shape
        m, per = cfg.gaussians_per_query, 11 + cfg.in_chans
        own = raw[..., : m * per].reshape(B, q * m, per)
        g = gaussians_from_raw(own, cfg.max_scale, self.camera.scale_unit, cfg.depth_param, cfg.max_opacity,
                               cfg.rotation_param, cfg.position_gain)
        if pointer is not None or self.anchored:
            if pointer is not None:
                anchor, spread = pointer, 2.0 * cfg.patch_size / cfg.img_size  # one patch (the image spans 2)
            else:
                anchor, spread = 2.0 * (torch.sigmoid(raw[..., m * per:]) - 0.5), anchor_spread(q)  # (B, q, 2)
            offset = spread * torch.tanh(cfg.position_gain * own[..., 0:2].reshape(B, q, m, 2))
            xy = (anchor.unsqueeze(2) + offset).reshape(B, q * m, 2)
            g.means = torch.cat([xy, g.means[..., 2:]], dim=-1)
        return g

    def point(self, visible: torch.Tensor, queries: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Each query token's anchor as an attention-weighted place in the image (``position_source="pointer"``).

        visible (B, n, d), queries (B, q, d): the decoder's outputs at the visible patches and the queries;
        ids_keep (B, n): the visible patches' indices. -> (B, q, 2) world x, y: Σ_i softmax_i(a_qi)·c_i, the
        patch centres c_i of the visible patches weighted by the query's attention a_qi = ⟨W_q·query,
        W_k·patch⟩ / sqrt(d) · POINTER_SHARPNESS. Where a Gaussian sits is then a pointer into the image, not a
        free coordinate that each query can learn once for every image.
        """
        centres = self._patch_centres(ids_keep)  # (B, n, 2)
        logits = self.pointer_query(queries) @ self.pointer_key(visible).transpose(1, 2)  # (B, q, n)
        weights = torch.softmax(logits.float() * (POINTER_SHARPNESS / math.sqrt(visible.shape[-1])), dim=-1)
        return weights @ centres

    def group(self, visible: torch.Tensor, slots: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot attention over the visible patches (``position_source="slots"``; Locatello et al. 2020, Algorithm 1,
        with a residual update in place of its GRU): the query tokens compete for the patches.

        visible (B, n, d), slots (B, q, d): the decoder's outputs. Each of SLOT_ITERATIONS rounds normalises the
        attention over the slots (every patch is shared out among them), then over the patches (a weighted mean), and
        updates each slot from the mean of its patches' values. -> (the slots (B, q, d), which the Gaussian head
        reads; each slot's anchor (B, q, 2), the mean centre of the patches it won). Where a Gaussian sits is then the
        centre of the part of this image its slot took: a soft clustering of the image, not a place learned once.
        """
        centres = self._patch_centres(ids_keep)
        tokens = self.slot_norm_tokens(visible)
        keys, values = self.pointer_key(tokens), self.slot_value(tokens)
        scale = 1.0 / math.sqrt(visible.shape[-1])
        for _ in range(SLOT_ITERATIONS):
            logits = self.pointer_query(self.slot_norm_slots(slots)) @ keys.transpose(1, 2) * scale  # (B, q, n)
            share = torch.softmax(logits.float(), dim=1)  # each patch shared among the slots
            weights = share / (share.sum(-1, keepdim=True) + 1e-8)  # each slot's weighted mean of its patches
            slots = slots + self.slot_out((weights.to(values.dtype) @ values))
            slots = slots + self.slot_mlp(self.slot_norm_mlp(slots))
        return slots, weights @ centres

    def _patch_centres(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, n) patch indices -> (B, n, 2) their centres in world x, y (the image spans (-1, 1)^2)."""
        grid = self.cfg.img_size // self.cfg.patch_size
        cells = torch.arange(grid, device=ids_keep.device, dtype=torch.float32)
        centre = (cells + 0.5) * (2.0 / grid) - 1.0
        xy = torch.stack(torch.meshgrid(centre, centre, indexing="xy"), -1).reshape(-1, 2)  # (N, 2), row-major
        return xy[ids_keep]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> Gaussians:
        """latent (B, 1 + n, D) -> k Gaussians per image."""
        x = self.decoder_embed(latent)  # (B, 1 + n, d)
        B, n1, d = x.shape
        # Visible tokens keep their own patch positions (there are no tokens for
        # the masked patches, so gather the positions instead of unshuffling).
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : n1 - 1]
        pos = torch.gather(self.decoder_pos_embed[:, 1:, :].expand(B, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], x[:, 1:, :] + pos], dim=1)
        queries = (self.mask_token + self.query_embed).expand(B, -1, -1)  # (B, q, d)
        if self.training and self.cfg.query_noise > 0:
            # Every image sees its own jitter of each query: a query cannot be one fixed place for every image.
            queries = queries + self.cfg.query_noise * torch.randn_like(queries)
        x = self.run_decoder(torch.cat([x, queries], dim=1))  # (B, 1 + n + q, d)
        # Keep only the q query outputs; float32 even under bf16 autocast, where
        # positions would otherwise snap to steps of up to a pixel.
        slots, pointer = x[:, n1:, :], None
        if self.cfg.position_source == "pointer":
            pointer = self.point(x[:, 1:n1, :], slots, ids_keep)
        elif self.cfg.position_source == "slots":
            slots, pointer = self.group(x[:, 1:n1, :], slots, ids_keep)
        raw = self.gaussian_head(slots).float()  # (B, q, m * (11 + C) [+ 2])
        return self.gaussians_from_tokens(raw, pointer)

    @property
    def render_settings(self) -> RenderSettings:
        """How this model renders its images (`RenderSettings.from_config` of its config)."""
        return RenderSettings.from_config(self.cfg)

    @property
    def compositing(self) -> str:
        """How the rasterizer combines the Gaussians: "weighted" for depth_grad "weighted", else "sorted"."""
        return self.render_settings.compositing

    @property
    def depth_tau(self) -> float:
        """The rasterizer's depth-order temperature while training (0: no depth-order gradient)."""
        return self.cfg.depth_tau if self.cfg.depth_grad == "swap" else 0.0

    def render(self, gaussians: Gaussians, loss_curvature: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) render of `gaussians` on the configured background.

        loss_curvature (B, H, W): given while training with the depth-order
        gradient (see `gmae.model.loss.pixel_curvature`); None renders without it.
        """
        size = self.cfg.img_size
        settings = self.render_settings  # weighted compositing: its weights' temperature is part of the forward
        if settings.compositing == "sorted" and loss_curvature is not None and torch.is_grad_enabled():
            settings = replace(settings, depth_tau=self.depth_tau)  # the depth-order gradient, while training
        with torch.autocast(gaussians.means.device.type, enabled=False):  # splatting stays in float32
            image, _ = render_gaussians(gaussians, size, size, self.background, settings, loss_curvature)
        return image

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None,
                loss_scale: float = 1.0) -> Output:
        """imgs (B, C, H, W) in [0, 1]; noise (B, N) optional masking noise.

        loss_scale multiplies the loss (gradient accumulation passes 1/K), and
        with it the curvature the depth-order gradient uses, so the two stay consistent.
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encoder(imgs, ratio, noise)
        gaussians = self.forward_decoder(latent, ids_restore)
        p = self.cfg.patch_size
        curvature = None
        if self.depth_tau > 0:  # the loss's curvature per pixel, known before rendering (it only needs the mask)
            curvature = pixel_curvature(mask, self.cfg.loss, p, self.cfg.in_chans) * loss_scale
        image = self.render(gaussians, curvature)  # (B, C, H, W)
        pred, target = patchify(image, p), patchify(imgs, p)
        loss = reconstruction_loss(pred, target, mask, self.cfg.loss)
        if self.cfg.opacity_reg > 0:  # economy: every opaque Gaussian costs, so fewer and larger ones explain the image
            loss = loss + self.cfg.opacity_reg * gaussians.opacities.mean() / self.cfg.max_opacity
        loss = loss * loss_scale
        if self.cfg.loss == "masked_normpix":  # the render predicts normalised patches: show it in image space
            image = unpatchify(denormalize_patches(pred.detach(), target), p, self.cfg.in_chans)
        return Output(loss, image.detach(), mask, gaussians)

    def stats(self, out: Output) -> dict[str, float]:
        """Collapse monitors of a forward pass's Gaussians (see `gaussian_stats`)."""
        return gaussian_stats(out.gaussians, self.cfg.max_scale, self.camera.scale_unit)


@torch.no_grad()
def gaussian_stats(g: Gaussians, max_scale: float, scale_unit: float) -> dict[str, float]:
    """Collapse monitors of a batch of Gaussians (logged by `gmae pretrain` in metrics.jsonl).

    scale_at_cap: fraction of scale entries at >= 99% of their largest value c;
    depth_spread: std of z over each image's Gaussians, averaged over images;
    depth_at_limit: fraction of z within 1% of the bounded range's ends (|z| >= 0.99);
    opacity_mean: mean opacity.
    """
    z = g.means[..., 2].float()
    return {
        "scale_at_cap": (g.scales >= 0.99 * max_scale * scale_unit).float().mean().item(),
        "depth_spread": z.std(dim=1).mean().item() if z.shape[1] > 1 else 0.0,
        "depth_at_limit": (z.abs() >= 0.99).float().mean().item(),
        "opacity_mean": g.opacities.float().mean().item(),
    }
