"""Backend "gsplat": gsplat's CUDA tile rasterizer behind gmae's contract.

Install with `pip install gmae[cuda]` on a machine with CUDA (gsplat compiles
its kernels on first use, so nvcc and ninja must be present). Uses gsplat's
low-level pipeline, `isect_tiles` -> `isect_offset_encode` ->
`rasterize_to_pixels`, which has its own CUDA backward.

Two things are adapted so the result matches the torch reference:
  * culling radii are gmae's opacity-aware per-axis extents (`footprint`), not
    gsplat's 3-sigma radii, so no contribution with alpha >= 1/255 is dropped;
  * gsplat sorts by the float bits of the depth, which only orders positive
    numbers, so it is given each Gaussian's depth *rank* + 1 instead: front-to-
    back order, with ties kept in index order as the contract says.

Known difference: gsplat 1.5.3 clamps alpha at 0.999 (3DGS and the contract's
default use 0.99). Compare with the reference at `max_alpha=0.999`.
"""

from __future__ import annotations

import logging
import math

import gsplat  # noqa: F401  (ModuleNotFoundError here marks the backend unavailable)
import torch
from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels
from torch import Tensor

from ..errors import GMAEError
from .contract import TILE, expand_background, footprint

GSPLAT_MAX_ALPHA = 0.999
logger = logging.getLogger("gmae.render")
_warned = False


def rasterize_gsplat(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, height: int,
                     width: int, background: Tensor | None = None, max_alpha: float = 0.99, depth_tau: float = 0.0,
                     loss_curvature: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `gmae.render.rasterize`; CUDA float32 tensors only; no depth-order gradient."""
    global _warned
    if depth_tau > 0:
        raise GMAEError("the gsplat backend has no depth-order gradient (depth_tau > 0); use render backend "
                        "torch on CUDA (or cpu on the CPU), or turn the depth gradient off")
    if means2d.device.type != "cuda":
        raise GMAEError("the gsplat backend needs CUDA tensors; use render backend cpu or torch on the CPU")
    if max_alpha != GSPLAT_MAX_ALPHA and not _warned:
        _warned = True
        logger.warning("gsplat clamps alpha at %.3f; max_alpha=%s is ignored by this backend", GSPLAT_MAX_ALPHA, max_alpha)
    B, K, C = colors.shape
    means2d, conics, colors, opacities = (t.float().contiguous() for t in (means2d, conics, colors, opacities))
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)

    with torch.no_grad():
        # culls non-finite colours and depths too, so that they never reach the kernel
        rx, ry, keep = footprint(conics, opacities, means2d, colors, depths)
        radii = torch.stack([rx, ry], dim=-1).ceil().clamp_max(1e6)
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii)).int()  # 0 = culled
        order = torch.argsort(depths.detach(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(K, device=order.device).expand(B, K))
        sort_keys = rank.float() + 1.0  # positive, exact below 2**24, ties already broken
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, sort_keys, TILE, tiles_x, tiles_y)
        offsets = isect_offset_encode(isect_ids, B, tiles_x, tiles_y)

    bg = expand_background(background, B, C, torch.float32, means2d.device)
    image, alpha = rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, TILE, offsets, flatten_ids,
        backgrounds=None if bg is None else bg.contiguous(),
    )
    return image.permute(0, 3, 1, 2), alpha[..., 0]
