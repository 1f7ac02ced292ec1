"""Pure-PyTorch reference rasterizer (backend ``"torch"``).

This module is the *oracle*: every fast backend (numba CPU kernel, gsplat) is
tested against it, and, with the contract it implements
(:mod:`gmae.render.contract`: the compositing rules, culling, input checks), it
is the place to read to learn what "rendering" means in gmae. It favours
clarity over speed, but it is still vectorised and memory-bounded, so it can be
used for real training at small sizes. It also holds the torch implementations
of the depth-order gradient (:func:`depth_pair_gradient`) and of the order-free
weighted compositing (:func:`_weighted_chunk`), and :func:`rasterize_dense`,
the naive every-Gaussian-at-every-pixel renderer that `gmae bench` compares with.

Algorithm (why it is shaped like this): a dense B×K×H×W evaluation is far too
big at 224² with hundreds of Gaussians, so we do what the CUDA rasterizers do,
in tensor form:

1. sort each image's Gaussians by depth;
2. give each Gaussian a conservative screen bounding box of the region where
   α can reach 1/255 (opacity aware, *not* a fixed 3σ) and cull the rest;
3. bin Gaussians into 16×16 pixel tiles, keeping depth order inside a tile;
4. evaluate tiles in chunks of (tiles × M Gaussians × 256 pixels) whose size
   stays under :data:`CHUNK_ELEMENTS`; under autograd each chunk is
   checkpointed so the backward pass is memory-bounded too;
5. scatter the tiles back into (B, C, H, W) and crop the padding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .contract import (
    ALPHA_MIN, T_MIN, TILE, RenderSettings, expand_background, footprint, sigma3_tile_box, validate_inputs,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "depth_pair_gradient",
    "rasterize_dense",
    "rasterize_torch",
    "sort_and_bin",
]

#: Upper bound on the number of elements of one (tiles × M × pixels) working
#: tensor. A module constant so tests can shrink it; results must not depend
#: on it. (A single tile whose list alone exceeds it is still processed.)
#: 2**20 (4 MiB per float32 tensor) measured as fast as larger chunks on CPU
#: while keeping the peak memory of forward + backward low.
CHUNK_ELEMENTS = 2**20


def tile_ranges(
    means: Tensor,
    conics: Tensor,
    opacities: Tensor,
    tiles_x: int,
    tiles_y: int,
    colors: Tensor | None = None,
    depths: Tensor | None = None,
    tile_cut: str = "alpha",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Opacity-aware tile bounding boxes.

    Inputs are flat: means (N, 2), conics (N, 3), opacities (N,), optional
    colors (N, C) and depths (N,) (only checked for being finite).
    Returns x0, x1, y0, y1 (N,) inclusive tile ranges (clamped to the grid) and
    ``keep`` (N,) bool: False for culled Gaussians (see :func:`footprint`, or
    entirely off-screen). tile_cut "3sigma" narrows each range to legacy
    gsplat's 3σ tile box (:func:`sigma3_tile_box`).
    """
    rx, ry, keep = footprint(conics, opacities, means, colors, depths)
    with torch.no_grad():
        mx, my = means.unbind(-1)
        # A pixel centre p in [m - r, m + r] lies in tile floor(p / TILE); clamp
        # in float first so huge (or inf) radii cannot overflow the int cast.
        x0 = torch.floor((mx - rx) / TILE).clamp(-1, tiles_x).long()
        x1 = torch.floor((mx + rx) / TILE).clamp(-1, tiles_x).long()
        y0 = torch.floor((my - ry) / TILE).clamp(-1, tiles_y).long()
        y1 = torch.floor((my + ry) / TILE).clamp(-1, tiles_y).long()
        keep &= (x1 >= 0) & (x0 < tiles_x) & (y1 >= 0) & (y0 < tiles_y)
        x0, y0 = x0.clamp_min(0), y0.clamp_min(0)
        x1, y1 = x1.clamp_max(tiles_x - 1), y1.clamp_max(tiles_y - 1)
        if tile_cut == "3sigma":
            sx0, sx1, sy0, sy1 = sigma3_tile_box(means, conics, tiles_x, tiles_y)
            x0, x1, y0, y1 = torch.maximum(x0, sx0), torch.minimum(x1, sx1), torch.maximum(y0, sy0), torch.minimum(y1, sy1)
            keep &= (x0 <= x1) & (y0 <= y1)
    return x0, x1, y0, y1, keep


def bin_into_tiles(
    x0: Tensor, x1: Tensor, y0: Tensor, y1: Tensor, keep: Tensor, per_image: int, tiles_x: int, tiles_y: int, batch: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Build the per-tile, depth-ordered Gaussian lists.

    The flat Gaussian index g = b·K + rank is already in depth order inside
    each image, so a *stable* sort of (Gaussian, tile) pairs by global tile id
    leaves every tile's list in depth order.

    Returns ``gids`` (P,) flat Gaussian indices grouped by tile, and
    ``starts``/``counts`` (B·T,) giving each tile's slice of ``gids``.
    """
    device = x0.device
    n_tiles = batch * tiles_x * tiles_y
    span_x = x1 - x0 + 1
    n = torch.where(keep, span_x * (y1 - y0 + 1), torch.zeros_like(x0))
    # The lists' length is the one value the host must wait for (it sizes them); nothing below waits on the device.
    gid = torch.repeat_interleave(torch.arange(n.numel(), device=device), n, output_size=int(n.sum()))
    # Enumerate each Gaussian's tiles: local index -> (tx, ty) in its box.
    first = torch.cumsum(n, 0) - n
    local = torch.arange(gid.numel(), device=device) - first[gid]
    tx = x0[gid] + local % span_x[gid]
    ty = y0[gid] + torch.div(local, span_x[gid], rounding_mode="floor")
    image = torch.div(gid, per_image, rounding_mode="floor")
    tile = (image * tiles_y + ty) * tiles_x + tx
    tile, perm = torch.sort(tile, stable=True)
    gids = gid[perm]
    bounds = torch.searchsorted(tile, torch.arange(n_tiles + 1, device=device))  # tile t: gids[bounds[t]:bounds[t+1]]
    return gids, bounds[:-1], bounds[1:] - bounds[:-1]


def _sort_flat(order: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, K, ...) -> (B·K, ...) in dtype, each image's rows in the depth order ``order`` (B, K)."""
    B, K = order.shape
    t = t.to(dtype)
    idx = order.view(B, K, *([1] * (t.dim() - 2))).expand_as(t)
    return torch.gather(t, 1, idx).reshape(B * K, *t.shape[2:])


def sort_and_bin(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor,
                 dtype: torch.dtype, tiles_x: int, tiles_y: int,
                 tile_cut: str = "alpha") -> tuple[Tensor, tuple[Tensor, ...], Tensor, Tensor, Tensor]:
    """Steps 1-3 of the tile rasterizer: depth order, culling and the per-tile lists.

    1. Depth order (stable: equal depths keep index order), then flatten so
       that flat index b·K + rank is in front-to-back order within image b.
    2-3. Cull (any non-finite parameter, depth and colour included) and bin
       into tiles. Culled Gaussians are in no tile list, so their values
       (NaN included) are never read and their gradients are exactly zero.

    Returns ``order`` (B, K), the flat sorted (means (N, 2), conics (N, 3),
    colors (N, C), opacities (N,) in dtype, differentiable; depths (N,),
    detached), and the lists of :func:`bin_into_tiles` (``gids``, ``starts``,
    ``counts``). Shared by the torch and triton backends.
    """
    B, K = depths.shape
    order = torch.argsort(depths.detach(), dim=1, stable=True)  # (B, K)
    means_s, conics_s, colors_s, opac_s = (_sort_flat(order, t, dtype) for t in (means2d, conics, colors, opacities))
    depths_s = torch.gather(depths.detach(), 1, order).reshape(B * K)
    x0, x1, y0, y1, keep = tile_ranges(means_s, conics_s, opac_s, tiles_x, tiles_y, colors_s, depths_s, tile_cut)
    gids, starts, counts = bin_into_tiles(x0, x1, y0, y1, keep, K, tiles_x, tiles_y, B)
    return order, (means_s, conics_s, colors_s, opac_s, depths_s), gids, starts, counts


def contributions(
    means: Tensor,
    conics: Tensor,
    opacities: Tensor,
    gid: Tensor,
    present: Tensor,
    px: Tensor,
    py: Tensor,
    max_alpha: float,
    early_stop: bool = True,
) -> tuple[Tensor, Tensor]:
    """The contract's α of every tile-list entry at every pixel of a chunk of tiles.

    means (N, 2), conics (N, 3), opacities (N,) are the flat, depth-sorted
    Gaussians; gid (n, M) the depth-ordered list of each tile (padded), present
    (n, M) marks real entries; px, py (n, P) pixel centres.
    Returns alpha (n, M, P), zero wherever an entry does not contribute
    (skipped, padding, or cut by the early stop, which the order-free weighted
    compositing has not), and the inclusive transmittance T after each entry (n, M, P).
    """
    mean = means[gid]  # (n, M, 2)
    conic = conics[gid]  # (n, M, 3)
    dx = px[:, None, :] - mean[..., 0:1]  # (n, M, P)
    dy = py[:, None, :] - mean[..., 1:2]
    a, b, c = (conic[..., i : i + 1] for i in range(3))

    def quad(dx: Tensor, dy: Tensor) -> Tensor:
        return a * dx * dx + 2.0 * b * dx * dy + c * dy * dy

    q = quad(dx, dy)
    # Extreme (finite) conics can overflow q to inf or inf - inf = NaN far from
    # the mean. Such a lane has α = 0, but its backward would multiply a zero
    # gradient by the inf intermediates (0·inf = NaN). So where q is not
    # finite, q is recomputed from dx = dy = 0 and the lane masked below: its
    # gradient is then an exact zero. (Rare; the common case costs one check.)
    finite_q = torch.isfinite(q)
    if not bool(finite_q.all()):
        zero = torch.zeros_like(dx)
        q = quad(torch.where(finite_q, dx, zero), torch.where(finite_q, dy, zero))
    alpha = (opacities[gid][..., None] * torch.exp(-0.5 * q)).clamp_max(max_alpha)
    # Skip rule: α < 1/255 leaves T untouched; padding entries never count.
    # torch.where (not a multiply) so that nothing from masked lanes leaks.
    counts = present[..., None] & finite_q & (alpha >= ALPHA_MIN)
    alpha = torch.where(counts, alpha, torch.zeros_like(alpha))
    # Early stop: Gaussian i is excluded if T·(1-αᵢ) < 1e-4. The inclusive
    # transmittance is non-increasing, so the kept set is a prefix of the list
    # and "exclude i and everything after" is just this elementwise mask.
    if early_stop:
        with torch.no_grad():
            included = torch.cumprod(1.0 - alpha, dim=1) >= T_MIN
        alpha = torch.where(included, alpha, torch.zeros_like(alpha))
    return alpha, torch.cumprod(1.0 - alpha, dim=1)


def exclusive_transmittance(t_incl: Tensor) -> Tensor:
    """Tᵢ, the transmittance *before* entry i, from the inclusive one (an exclusive cumprod)."""
    return torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)


def _composite_chunk(
    means: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    gid: Tensor,
    present: Tensor,
    px: Tensor,
    py: Tensor,
    max_alpha: float,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite a chunk of tiles (inputs as :func:`contributions`, colors (N, C)).

    Returns color (n, C, P) = Σ cᵢαᵢTᵢ and T_final (n, P).
    """
    alpha, t_incl = contributions(means, conics, opacities, gid, present, px, py, max_alpha)
    weights = alpha * exclusive_transmittance(t_incl)  # (n, M, P)
    color = torch.einsum("nmp,nmc->ncp", weights, colors[gid])
    return color, t_incl[:, -1]


def _weighted_chunk(
    means: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    gid: Tensor,
    present: Tensor,
    px: Tensor,
    py: Tensor,
    max_alpha: float,
    tau: float,
) -> tuple[Tensor, Tensor]:
    """Order-free weighted compositing of a chunk of tiles (``compositing="weighted"``).

    Weighted blended order-independent transparency (McGuire & Bavoil 2013; the
    sort-free Gaussian splatting of Hou et al. 2024 is of this family): with the
    contract's αᵢ (no early stop: there is no order) and weights
    wᵢ = exp(−zᵢ/τ), nearer = heavier,
        colour = (Σ cᵢ αᵢ wᵢ / Σ αᵢ wᵢ) · (1 − Π(1 − αᵢ)),  T_final = Π(1 − αᵢ),
    so the coverage (and the alpha output) is exactly that of sorted
    compositing, the background stays behind everything, and the colour is a
    depth-weighted average in which the depths are differentiable. τ → 0 lets
    the nearest Gaussian at a pixel take its colour.

    Inputs as :func:`_composite_chunk`, plus depths (N,). Returns color (n, C, P), T_final (n, P).
    """
    alpha, t_incl = contributions(means, conics, opacities, gid, present, px, py, max_alpha, early_stop=False)
    logw = (-depths[gid] / tau).unsqueeze(-1).expand_as(alpha)  # (n, M, P)
    contributes = alpha > 0
    # per-pixel shift by the nearest contributor, so that exp() neither overflows nor underflows
    shift = torch.where(contributes, logw, torch.full_like(logw, -math.inf)).amax(dim=1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = alpha * torch.exp(torch.where(contributes, logw - shift, torch.zeros_like(logw)))  # (n, M, P)
    total = weights.sum(dim=1)  # (n, P)
    coverage = 1.0 - t_incl[:, -1]
    scale = torch.where(total > 0, coverage / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    color = torch.einsum("nmp,nmc->ncp", weights, colors[gid]) * scale[:, None, :]
    return color, t_incl[:, -1]


def rasterize_dense(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, height: int,
                    width: int, background: Tensor | None = None, max_alpha: float = 0.99) -> tuple[Tensor, Tensor]:
    """Every Gaussian evaluated at every pixel (k*H*W work): the naive renderer `gmae bench` compares with.

    The tile compositor applied to one "tile" per image that is the whole
    image, so it has exactly the contract's semantics (``background`` is
    accepted for the common signature and not drawn).
    """
    B, K, C = colors.shape
    order = torch.argsort(depths, dim=1, stable=True) + torch.arange(B)[:, None] * K  # (B, K) flat ids
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    px, py = xs.reshape(1, -1).expand(B, -1), ys.reshape(1, -1).expand(B, -1)
    color, t_final = _composite_chunk(
        means2d.reshape(B * K, 2), conics.reshape(B * K, 3), colors.reshape(B * K, C), opacities.reshape(B * K),
        order, torch.ones(B, K, dtype=torch.bool), px, py, max_alpha,
    )
    return color.reshape(B, C, height, width), (1 - t_final).reshape(B, height, width)


def depth_pair_gradient(
    alpha: Tensor, t_before: Tensor, colors: Tensor, depths: Tensor, grad: Tensor, curvature: Tensor, tau: float
) -> Tensor:
    """The depth-order gradient of one pixel list per (tile, pixel): the oracle of every backend's.

    For each pixel and each two consecutive contributors i (in front) and j,
    swapping them would change the pixel by ΔC = Tᵢ αᵢ αⱼ (cⱼ − cᵢ) (T after
    both is unchanged, so nothing else moves). Their order is relaxed as
    p = σ((zⱼ − zᵢ)/τ), and z receives the gradient of the exact relaxed loss
    change (1 − p)·[L(C + ΔC) − L(C)] with everything but p held fixed; for a
    loss quadratic in the pixel, L(C + ΔC) − L(C) = g·ΔC + ½ h |ΔC|² with
    g = ∂L/∂C and h = ∂²L/∂C² (the |ΔC|² term is what keeps a pair from
    hedging: the plain straight-through gradient of C + (1 − p)ΔC drops it).

    Args (n lists of M entries in front-to-back order, P pixels each):
        alpha: (n, M, P) contract α, zero where an entry does not contribute.
        t_before: (n, M, P) transmittance before each entry.
        colors: (n, M, C); depths: (n, M).
        grad: (n, C, P) ∂L/∂image; curvature: (n, P) ∂²L/∂image² (same for every channel).
        tau: the relaxation's temperature, in depth units.

    Returns:
        (n, M) ∂/∂z of Σ over pairs of (1 − p)·[L(C + ΔC) − L(C)], per entry:
        +σ'·δL for the front member of a pair and −σ'·δL for the one behind.
    """
    n, M, P = alpha.shape
    C = colors.shape[-1]
    contrib = alpha > 0
    slot = torch.arange(M, device=alpha.device).view(1, M, 1).expand(n, M, P)
    # j(i) = the next contributor behind entry i at the same pixel (M if none):
    # the first contributor at or after m, shifted by one.
    first_from = torch.where(contrib, slot, torch.full_like(slot, M)).flip(1).cummin(1).values.flip(1)
    nxt = torch.cat([first_from[:, 1:], torch.full_like(first_from[:, :1], M)], dim=1)
    pair = contrib & (nxt < M)
    j = nxt.clamp_max(M - 1)
    col = colors.unsqueeze(-1).expand(n, M, C, P)
    delta = (t_before * alpha * alpha.gather(1, j)).unsqueeze(2) * (col.gather(1, j.unsqueeze(2).expand(n, M, C, P)) - col)
    change = (grad.unsqueeze(1) * delta).sum(2) + 0.5 * curvature.unsqueeze(1) * (delta * delta).sum(2)  # (n, M, P)
    z = depths.unsqueeze(-1).expand(n, M, P)
    p = torch.sigmoid((z.gather(1, j) - z) / tau)
    s = torch.where(pair, p * (1.0 - p) / tau * change, torch.zeros_like(change))
    return s.sum(-1) - torch.zeros_like(s).scatter_add_(1, j, s).sum(-1)


class _DepthOrderGradient(torch.autograd.Function):
    """Identity on the image; in the backward, the depths receive ``pass_fn(grad_image)``.

    The rendered image does not depend on depth except through the (non
    differentiable) order, so the depth-order gradient is a separate pass that
    only needs ∂L/∂image: it is attached to the image here, not mixed into the
    compositing's autograd graph.
    """

    @staticmethod
    def forward(ctx, image, depths, pass_fn):
        ctx.pass_fn = pass_fn
        ctx.depth_dtype = depths.dtype
        return image.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        grad_depths = ctx.pass_fn(grad_image).to(ctx.depth_dtype) if ctx.needs_input_grad[1] else None
        return grad_image, grad_depths, None


def to_tiles(x: Tensor, tiles_x: int, tiles_y: int) -> Tensor:
    """(B, C, H, W) -> (B·T, C, TILE²) in the tile order of the compositor (padding with zeros)."""
    B, C, H, W = x.shape
    x = torch.nn.functional.pad(x, (0, tiles_x * TILE - W, 0, tiles_y * TILE - H))
    x = x.view(B, C, tiles_y, TILE, tiles_x, TILE).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * tiles_y * tiles_x, C, TILE * TILE)


def rasterize_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
    settings: RenderSettings = RenderSettings(),
    loss_curvature: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference tile rasterizer in plain PyTorch (differentiable by autograd).

    Args:
        means2d: (B, K, 2) pixel coordinates, x right, y down, pixel centres
            at i + 0.5.
        conics: (B, K, 3) upper triangle (a, b, c) of the inverse 2D covariance.
        colors: (B, K, C) any C ≥ 1.
        opacities: (B, K) in [0, 1].
        depths: (B, K) ordering; differentiated only through the depth-order
            gradient (depth_tau > 0).
        height, width: image size in pixels.
        background: None (no background term), (C,) or (B, C).
        settings: how to render (:class:`gmae.render.contract.RenderSettings`); it uses:
        max_alpha: upper clamp of each α (3DGS 0.99, gsplat 0.999).
        depth_tau: > 0 gives the depths the depth-order gradient of
            :func:`depth_pair_gradient` with this temperature; 0 (default):
            depths get no gradient, as in 3DGS.
        loss_curvature: (B, H, W) ∂²L/∂image² per pixel (needed when depth_tau > 0).
        compositing: "sorted" (the contract) or "weighted" (order-free, see
            :func:`_weighted_chunk`; depth_tau is then its weights' temperature,
            and the depths are differentiable through the weights).
        tile_cut: "alpha" (the contract) or "3sigma" (legacy gsplat's tile culling,
            :func:`gmae.render.contract.sigma3_tile_box`).

    Returns:
        image (B, C, H, W) and alpha (B, H, W) = 1 - final transmittance.
    """
    validate_inputs(means2d, conics, colors, opacities, depths, height, width, background, settings, loss_curvature)
    max_alpha, depth_tau, tile_cut = settings.max_alpha, settings.depth_tau, settings.tile_cut
    weighted = settings.compositing == "weighted"
    tensors = [means2d, conics, colors, opacities] + ([background] if background is not None else [])
    tensors += [depths] if weighted else []
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = means2d.device
    B, K, C = colors.shape
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    n_tiles = B * tiles_x * tiles_y
    pixels = TILE * TILE
    bg = expand_background(background, B, C, dtype, device)

    # 1-3. Depth order, cull and bin into tiles (shared with the triton backend).
    order, (means_s, conics_s, colors_s, opac_s, depths_s), gids, starts, counts = sort_and_bin(
        means2d, conics, colors, opacities, depths, dtype, tiles_x, tiles_y, tile_cut)

    # 4. Composite the non-empty tiles, busiest first, so that each chunk is
    #    padded only to its own (first = largest) list length.
    tiles = torch.argsort(counts, descending=True, stable=True)
    tiles = tiles[: int((counts > 0).sum())]
    counts_sorted = counts[tiles].tolist()
    lin = torch.arange(pixels, device=device)
    in_tile_x = (lin % TILE).to(dtype) + 0.5
    in_tile_y = torch.div(lin, TILE, rounding_mode="floor").to(dtype) + 0.5

    def chunks():
        """(tile ids, gid, present, px, py) of each chunk of tiles (see `contributions`)."""
        i = 0
        while i < len(counts_sorted):
            m = counts_sorted[i]
            n = max(1, CHUNK_ELEMENTS // (m * pixels))
            chunk = tiles[i : i + n]
            slot = torch.arange(m, device=device)
            present = slot < counts[chunk][:, None]  # (n, M)
            index = (starts[chunk][:, None] + slot).clamp_max(gids.numel() - 1)
            within = chunk % (tiles_x * tiles_y)
            tx = (within % tiles_x).to(dtype)
            ty = torch.div(within, tiles_x, rounding_mode="floor").to(dtype)
            # padded lanes point at a real Gaussian (gids[index]); `present` masks them
            yield chunk, gids[index], present, tx[:, None] * TILE + in_tile_x, ty[:, None] * TILE + in_tile_y
            i += n

    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outputs: list[Tensor] = []
    depth_values = _sort_flat(order, depths, dtype) if weighted else None  # weighted: the depths enter the weights, differentiably
    for _, gid, present, px, py in chunks():
        if weighted:
            composite = _weighted_chunk
            args = (means_s, conics_s, colors_s, opac_s, depth_values, gid, present, px, py, max_alpha,
                    float(depth_tau))
        else:
            composite = _composite_chunk
            args = (means_s, conics_s, colors_s, opac_s, gid, present, px, py, max_alpha)
        if use_checkpoint:
            # Save only the inputs; recompute the (n, M, 256) tensors in backward.
            color, t_final = checkpoint(composite, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            color, t_final = composite(*args)
        outputs.append(torch.cat([color, t_final[:, None, :]], dim=1))  # (n, C+1, P)

    # 5. Scatter tiles (channels 0..C-1: colour, channel C: T) into the grid;
    #    empty tiles keep colour 0 and transmittance 1.
    grid = torch.cat(
        [torch.zeros(n_tiles, C, pixels, dtype=dtype, device=device),
         torch.ones(n_tiles, 1, pixels, dtype=dtype, device=device)],
        dim=1,
    )
    if outputs:
        grid = grid.index_copy(0, tiles, torch.cat(outputs, dim=0))
    grid = grid.view(B, tiles_y, tiles_x, C + 1, TILE, TILE)
    grid = grid.permute(0, 3, 1, 4, 2, 5).reshape(B, C + 1, tiles_y * TILE, tiles_x * TILE)
    grid = grid[:, :, :height, :width]
    image, transmittance = grid[:, :C], grid[:, C]
    if bg is not None:
        image = image + transmittance[:, None] * bg[:, :, None, None]

    if not weighted and depth_tau > 0 and torch.is_grad_enabled() and depths.requires_grad:
        means_d, conics_d, colors_d, opac_d = (t.detach() for t in (means_s, conics_s, colors_s, opac_s))
        depths_d = depths_s.to(dtype)
        curvature = to_tiles(loss_curvature.detach().to(dtype)[:, None], tiles_x, tiles_y)[:, 0]

        def depth_pass(grad_image: Tensor) -> Tensor:
            """∂/∂depths (B, K) of the relaxed swap loss, chunk by chunk (see `depth_pair_gradient`)."""
            g = to_tiles(grad_image.to(dtype), tiles_x, tiles_y)
            flat = torch.zeros(B * K, dtype=dtype, device=device)
            with torch.no_grad():
                for chunk, gid, present, px, py in chunks():
                    alpha, t_incl = contributions(means_d, conics_d, opac_d, gid, present, px, py, max_alpha)
                    dz = depth_pair_gradient(alpha, exclusive_transmittance(t_incl), colors_d[gid], depths_d[gid],
                                             g[chunk], curvature[chunk], float(depth_tau))
                    flat.index_add_(0, gid.reshape(-1), dz.reshape(-1))
            return torch.zeros(B, K, dtype=dtype, device=device).scatter_(1, order, flat.view(B, K))

        image = _DepthOrderGradient.apply(image, depths, depth_pass)
    return image, 1.0 - transmittance
