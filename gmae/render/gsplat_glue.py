"""The arguments gmae gives gsplat's tile intersection (`isect_tiles`, `isect_offset_encode`), without gsplat.

Kept apart from :mod:`gmae.render.cuda`, which imports gsplat, so that they can
be tested on a CPU against gsplat's own pure-torch `_isect_tiles` and
`_isect_offset_encode` (tests/test_gsplat_glue.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contract import TILE, footprint

__all__ = ["isect_inputs"]


def isect_inputs(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, height: int,
                 width: int) -> tuple[Tensor, Tensor, int, int, int]:
    """(radii, sort_keys, tile_size, tiles_x, tiles_y) for ``isect_tiles(means2d, radii, sort_keys, tile_size,
    tiles_x, tiles_y)`` and ``isect_offset_encode(isect_ids, B, tiles_x, tiles_y)``.

    * radii (B, K, 2) int32, (x, y) half-extents in pixels: gmae's opacity-aware
      ``footprint`` rounded up, not gsplat's 3-sigma radii, so that no
      contribution with alpha >= 1/255 is dropped; 0 (gsplat's "culled") for
      the Gaussians ``footprint`` culls, non-finite colours and depths
      included, so that they never reach the kernel.
    * sort_keys (B, K) float32: each Gaussian's depth *rank* + 1. gsplat sorts
      by the float bits of the depth, which order positive numbers only; ranks
      of a stable sort are positive, exact below 2**24, and keep ties in index
      order as the contract says.
    """
    B, K = depths.shape
    with torch.no_grad():
        rx, ry, keep = footprint(conics, opacities, means2d, colors, depths)
        radii = torch.stack([rx, ry], dim=-1).ceil().clamp_max(1e6)
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii)).int()  # 0 = culled
        order = torch.argsort(depths.detach(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(K, device=order.device).expand(B, K))
        sort_keys = rank.float() + 1.0
    return radii, sort_keys, TILE, math.ceil(width / TILE), math.ceil(height / TILE)
