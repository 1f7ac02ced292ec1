"""Backend "gsplat": gsplat's CUDA tile rasterizer behind gmae's contract.

Install with `pip install gmae[cuda]` on a machine with CUDA (gsplat compiles
its kernels on first use, so nvcc and ninja must be present). Uses gsplat's
low-level pipeline, `isect_tiles` -> `isect_offset_encode` ->
`rasterize_to_pixels`, which has its own CUDA backward. The arguments of the
first two come from :func:`gmae.render.gsplat_glue.isect_inputs`, which is
tested on the CPU against gsplat's pure-torch versions.

Building it: gsplat 1.5.3 (the newest release) ships no CUDA binaries; its
kernels compile on first use (2 to over 12 minutes), and its prebuilt wheels
cover Python 3.10 with torch 2.0-2.4 only. CUDA 13 moved the CCCL headers
(`cub/`, `thrust/`) to `$CUDA_HOME/include/cccl`, which 1.5.3's build does not
look in (the fix is on gsplat's unreleased main). What helps:
`CPATH=$CUDA_HOME/include/cccl` (the moved headers), `TORCH_CUDA_ARCH_LIST`
set to the GPU's architecture only (e.g. `9.0` for H100/H200) and `MAX_JOBS`
to the cores (parallel compilation). The triton backend needs none of this.

Two things are adapted so the result matches the torch reference:
  * culling radii are gmae's opacity-aware per-axis extents (`footprint`), not
    gsplat's 3-sigma radii, so no contribution with alpha >= 1/255 is dropped;
  * gsplat sorts by the float bits of the depth, which only orders positive
    numbers, so it is given each Gaussian's depth *rank* + 1 instead: front-to-
    back order, with ties kept in index order as the contract says.

Not supported: ``tile_cut="3sigma"`` (legacy gsplat's tile culling, for the authors' model): gsplat lists a
Gaussian in the tiles of a box centred on its mean, which cannot be narrowed to legacy gsplat's box;
`gmae.render.rasterize` refuses it here and points to triton, which has it.

Known difference: gsplat 1.5.3 clamps alpha at 0.999 (3DGS and the contract's
default use 0.99). Compare with the reference at `max_alpha=0.999`.
"""

from __future__ import annotations

import logging

import gsplat  # noqa: F401  (ModuleNotFoundError here marks the backend unavailable)
import torch
from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels
from torch import Tensor

from ..errors import GMAEError
from .contract import RenderSettings, expand_background
from .gsplat_glue import isect_inputs

GSPLAT_MAX_ALPHA = 0.999
logger = logging.getLogger("gmae.render")
_warned = False


def rasterize_gsplat(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, height: int,
                     width: int, background: Tensor | None = None, settings: RenderSettings = RenderSettings(),
                     loss_curvature: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `gmae.render.rasterize`; CUDA float32 tensors only; no depth-order gradient, no weighted
    compositing, no 3-sigma tile cut, and alpha clamped at GSPLAT_MAX_ALPHA whatever settings.max_alpha."""
    global _warned
    max_alpha = settings.max_alpha
    if settings.depth_tau > 0:
        raise GMAEError("the gsplat backend has no depth-order gradient (depth_tau > 0); use render backend "
                        "triton or torch on CUDA (cpu on the CPU), or turn the depth gradient off")
    if means2d.device.type != "cuda":
        raise GMAEError("the gsplat backend needs CUDA tensors; use render backend cpu or torch on the CPU")
    if max_alpha != GSPLAT_MAX_ALPHA and not _warned:
        _warned = True
        logger.warning("gsplat clamps alpha at %.3f; max_alpha=%s is ignored by this backend", GSPLAT_MAX_ALPHA, max_alpha)
    B, K, C = colors.shape
    means2d, conics, colors, opacities = (t.float().contiguous() for t in (means2d, conics, colors, opacities))
    radii, sort_keys, tile, tiles_x, tiles_y = isect_inputs(means2d, conics, colors, opacities, depths, height, width)
    with torch.no_grad():
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, sort_keys, tile, tiles_x, tiles_y)
        offsets = isect_offset_encode(isect_ids, B, tiles_x, tiles_y)

    bg = expand_background(background, B, C, torch.float32, means2d.device)
    image, alpha = rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, tile, offsets, flatten_ids,
        backgrounds=None if bg is None else bg.contiguous(),
    )
    return image.permute(0, 3, 1, 2), alpha[..., 0]
