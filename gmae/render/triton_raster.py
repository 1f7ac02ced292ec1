"""Triton tile rasterizer (backend "triton"): the GPU path that needs no CUDA compiler.

Triton ships with every CUDA build of PyTorch and compiles these kernels in
seconds on first use. With ``TRITON_INTERPRET=1`` set before this module is
imported, the same kernels run on the CPU through Triton's interpreter (slowly):
that is how CI tests them against the torch oracle.

Design (the structure of gsplat's rasterizer, in Triton):

1. Binning and sorting stay in torch and are the oracle's own code
   (:func:`gmae.render.reference.sort_and_bin`): stable depth order, the
   contract's opacity-aware culling (:func:`gmae.render.contract.footprint`),
   per-tile lists ascending in depth with ties in index order.
2. `_forward_kernel`: one program per (image, 16x16 tile); the tile's 256
   pixels are the lanes of one block. The program walks its list front to
   back, FORWARD_CHUNK (16) entries at a time, as gsplat's threads take a
   batch of Gaussians into shared memory: the chunk's parameters are loads
   that every lane shares (independent, so they are in flight together), its
   alphas one (16, 256) block, T after each entry a product scan down the
   block (with the T carried in as its first factor, so that the factors are
   multiplied in list order, one at a time), and the stop (T would fall below
   1e-4) a comparison with the scanned T, which only falls. It keeps per
   pixel T, the colour (C x 256) and the number of list entries up to the
   pixel's last contributor, and stops when every pixel of the tile has
   stopped (one check per chunk: a reduction over the block, whose barriers
   the chunk shares). Arithmetic and accumulation are fp32 (bf16/fp16 inputs
   are cast); float64 inputs run in float64, which the tests use to compare
   with the oracle at 1e-10 (see Numerics).
3. `_backward_kernel`: the same lists walked back to front from each tile's
   last contributor; T is rebuilt by division (T_i = T_{i+1} / (1 - a_i), as in
   3DGS) and the colour behind each Gaussian is carried per pixel. Gradients
   are per-intersection partial sums: for each list entry the program reduces
   its 256 lanes and writes one row (d/d mean, conic, opacity, colours, depth)
   that no other program writes. No atomics. The row's columns are the rows
   of one (16, 256) block: one reduction over the pixels (a reduction over a
   tile's pixels crosses the warps, through shared memory and barriers) and
   one store per entry.
4. The depth-order gradient (``depth_tau > 0``: the swap gradient with the
   loss curvature, as the cpu backend has it; see
   :func:`gmae.render.reference.depth_pair_gradient`): for each pixel's
   consecutive contributors i (in front) and j, s = sigma'(dz/tau)/tau *
   (g.dC + h|dC|^2/2) goes +s to z_i and -s to z_j. The back-to-front walk
   meets i with j as its per-pixel partner and adds +s to i's row;
   `_depth_back_kernel`, a front-to-back walk, meets j with i as partner and
   adds -s to j's row. The partner differs from lane to lane, so adding to
   the partner would be a scatter with atomics; two walks keep every write a
   per-entry reduction.
5. `_reduce_kernel`: per Gaussian, the sum of its rows in a fixed order (the
   intersections stably sorted by Gaussian), so the gradients are bitwise
   reproducible run to run (float atomics would sum in a varying order on a
   GPU). A Gaussian has a handful of rows (one per tile it touches): one warp
   sums those of several Gaussians side by side, each row's columns in lanes. The background's gradient, sum over pixels of T_final * dL/dimage, is
   one torch einsum.

Semantics are the rendering contract's (:mod:`gmae.render.contract`).

Numerics: what a compiled kernel computes, which the interpreter runs as numpy.

* Float parameters (max_alpha, tau) are read from a tensor in the compute
  dtype, and the thresholds 1/255 and 1e-4 are built in it (``tl.full``):
  triton passes a Python float argument as fp32, so a compiled float64 kernel
  would clamp at 0.99000000953 and stop pixels early, where the interpreter
  keeps the double (the tests emulate the compiler's fp32 arguments and
  read the float64 PTX).
* exp where the result meets a threshold (alpha, against 1/255, and through T
  against 1e-4) is libdevice's, CUDA's accurate expf, which torch's exp on
  CUDA also is: so the kept or skipped decision is the oracle's. ``tl.exp``
  compiles to the approximate ex2 (a few ulp), which near alpha = 1/255 flips
  pixel/Gaussian pairs, each moving the pixel by up to T/255 and the
  gradients of every Gaussian behind it; parity tests that accept a bounded
  number of such flips could bound the image but not those gradients, so
  the kernels use the accurate exp instead. (Triton builds libdevice with
  flush-to-zero, torch without: they differ only for subnormal results, far
  below 1/255.) The interpreter has no libdevice and uses numpy's exp,
  accurate but not bitwise CUDA's; float32 tests compare at 1e-5.
* No threshold depends on anything else that compiles approximately:
  divisions (T rebuilt in the backward, the sigmoid's 1/(1 + e), /tau: fp32
  ``div.full``, 2 ulp) and the sigmoid's exp (``tl.exp``) move gradients by a
  few ulp, within the tests' tolerances; float64 is IEEE in both.
* No fused multiply-adds (`LAUNCH`): the forward and the backward, compiled
  apart, round alpha alike and take the same skip and stop decisions, and
  alpha rounds as torch's separate multiplies and adds do.
* T is the product of the factors (1 - alpha) in list order, one at a time,
  as the oracle's cumprod along the list multiplies them on the CPU (the
  interpreter's scan is numpy's cumprod; compiled, a chunk's entries are
  in each thread's registers and scanned in order). Were torch's cumprod on
  CUDA to multiply in another order, a pixel whose T lands within an ulp of
  1e-4 could stop one Gaussian apart from the oracle's (the parity test at
  GMAE's shapes would show it).

Tested (tests/test_render_triton.py) in the interpreter against the oracle,
values and every gradient; every kernel variant is also compiled for sm_90
(H100/H200) without a GPU, with triton's own ptxas (no spills with triton
3.9; ``python tools/triton_sass.py`` prints each variant's registers and
the SASS instructions and barriers of its loop, docs/gpu.md has them). Not
yet run on a GPU: its speed is unmeasured (tools/gpu_check.sh).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # a broken install (no driver library, ...) counts as missing: the backend is unavailable
    if isinstance(exc, ModuleNotFoundError):
        raise
    raise ModuleNotFoundError(f"triton does not import: {exc}", name="triton") from exc

from ..errors import GMAEError
from .contract import ALPHA_MIN, T_MIN, TILE, RenderSettings, expand_background, validate_inputs
from .reference import sort_and_bin

__all__ = ["INTERPRETED", "rasterize_triton"]

_ALPHA_MIN = tl.constexpr(ALPHA_MIN)
_T_MIN = tl.constexpr(T_MIN)
#: Columns of a per-intersection gradient row before the colours: d/d(mx, my, a, b, c, o).
N_GEOM = 6
_N_GEOM = tl.constexpr(N_GEOM)
#: Values per Gaussian in the kernels' geometry rows: mx, my, a, b, c, opacity, depth, padding (32 bytes in fp32).
GEOM = tl.constexpr(8)
#: Launch options on a GPU (the interpreter ignores them): 4 warps per tile program (256 lanes: 2 per thread); no
#: fused multiply-adds, so that the forward and the backward kernels, compiled apart, round alpha alike and take the
#: same skip and stop decisions (see Numerics in the module docstring).
LAUNCH = dict(num_warps=4, enable_fp_fusion=False)
#: List entries the forward composites per step (an (entries, 256) block of alphas).
FORWARD_CHUNK = 16
#: The per-Gaussian sums: one warp per program, over GB Gaussians x DP columns of about this many lanes (a Gaussian
#: has a handful of rows: the lanes are its columns and its neighbours in the sort, not one list walked by 4 warps).
REDUCE_LANES = 256
REDUCE_LAUNCH = dict(LAUNCH, num_warps=1)


@triton.jit
def _tile_pixels(bt, n_tiles, tiles_x, H, W, TILE: tl.constexpr, DT: tl.constexpr):
    """Program bt of the (image, tile) grid -> image b, lanes inside the image, their offset in an image plane and
    pixel centres."""
    b = bt // n_tiles
    t = bt % n_tiles
    lane = tl.arange(0, TILE * TILE)
    x = (t % tiles_x) * TILE + lane % TILE
    y = (t // tiles_x) * TILE + lane // TILE
    inside = (x < W) & (y < H)
    # a tile row's 16 pixels are consecutive in memory: told, the compiler gives the lanes of a warp consecutive
    # pixels (and every (rows, pixels) block the same layout) instead of spreading a warp over channels
    pix = tl.max_contiguous(y * W + x, TILE)
    return b.to(tl.int64), inside, pix, x.to(DT) + 0.5, y.to(DT) + 0.5


@triton.jit
def _exp(x):
    """exp(x) where the result meets a threshold: CUDA's own expf (libdevice's, as torch's exp on CUDA), not the
    approximate ex2 that tl.exp compiles to in fp32; numpy's exp in the interpreter, which has no libdevice."""
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _minus_half_q(a, b, c, dx, dy):
    """-q/2 = -(a dx^2 + 2b dx dy + c dy^2)/2 with the -1/2 taken into the coefficients: scaling by a power of two
    is exact, so this rounds as the oracle's -0.5 * (a*dx*dx + 2.0*b*dx*dy + c*dy*dy), in one multiply less."""
    return (-0.5 * a) * dx * dx + (-b) * dx * dy + (-0.5 * c) * dy * dy


@triton.jit
def _gaussian(geom, g, px, py, max_alpha):
    """Gaussian g at the lanes' pixels: dx, dy, the conic (a, b, c), exp(-q/2), o exp(-q/2) and the contract's alpha
    (NaN stays NaN, so a non-finite q never counts)."""
    row = geom + GEOM * g
    dx = px - tl.load(row)
    dy = py - tl.load(row + 1)
    a = tl.load(row + 2)
    b = tl.load(row + 3)
    c = tl.load(row + 4)
    gauss = _exp(_minus_half_q(a, b, c, dx, dy))
    raw = tl.load(row + 5) * gauss
    return dx, dy, a, b, c, gauss, raw, tl.where(raw > max_alpha, max_alpha, raw)


@triton.jit
def _swap_term(colors, geom, gids, start, partner, has_pair, weight, col, z, g_out, curv, tau,
               SIGN: tl.constexpr, C: tl.constexpr, CP: tl.constexpr):
    """Per lane, s = sigma'(dz/tau)/tau * (g.dC + h|dC|^2/2) of the pair (this Gaussian, its partner at list slot
    `partner`); weight = T_front a_front a_back; SIGN = 1 when this Gaussian is the front one, -1 when the back."""
    ch = tl.arange(0, CP)[:, None]
    gp = tl.load(gids + start + partner, mask=has_pair, other=0)
    col_p = tl.zeros_like(g_out)  # the partners' colours, a channel at a time (a (CP, P) gather would spread a
    for c in tl.static_range(C):  # warp over the channels, and need another layout)
        col_p = tl.where(ch == c, tl.load(colors + gp * C + c, mask=has_pair, other=0.0)[None, :], col_p)
    z_p = tl.load(geom + GEOM * gp + 6, mask=has_pair, other=0.0)
    delta = (SIGN * weight)[None, :] * (col_p - col[:, None])  # T_i a_i a_j (c_j - c_i), (CP, P)
    change = tl.sum(g_out * delta, axis=0) + 0.5 * curv * tl.sum(delta * delta, axis=0)
    u = tl.minimum(tl.maximum(SIGN * (z_p - z) / tau, -60.0), 60.0)
    p = 1.0 / (1.0 + tl.exp(-u))
    return tl.where(has_pair, p * (1.0 - p) / tau * change, 0.0)


@triton.jit
def _forward_kernel(geom, colors, gids, starts, counts, bg, image, trans, last_out,
                    H, W, tiles_x, n_tiles, params,
                    C: tl.constexpr, CP: tl.constexpr, HAS_BG: tl.constexpr, TILE: tl.constexpr, DT: tl.constexpr,
                    NB: tl.constexpr):
    """Composite one (image, tile): image (B, C, H, W), trans (B, H, W) = final T, last_out (B, H, W) int32 = list
    entries up to and including the pixel's last contributor. NB list entries at a time: their alpha as one
    (NB, P) block, T after each by a product scan down the block, one "all stopped" check per block."""
    bt = tl.program_id(0)
    b, inside, pix, px, py = _tile_pixels(bt, n_tiles, tiles_x, H, W, TILE, DT)
    max_alpha = tl.load(params)
    alpha_min = tl.full([], _ALPHA_MIN, DT)
    t_min = tl.full([], _T_MIN, DT)
    ch = tl.arange(0, CP)
    ch_ok = ch < C
    tile_list = gids + tl.load(starts + bt)
    n = tl.load(counts + bt).to(tl.int32)
    T = tl.full([TILE * TILE], 1.0, DT)
    color = tl.zeros([CP, TILE * TILE], DT)
    last = tl.zeros([TILE * TILE], tl.int32)
    done = inside == 0
    slot = tl.arange(0, NB)
    row = slot[:, None]
    # the row before: t_before[i] = t_after[i - 1], as a sum over j of one term and -0.0s, which adds exactly
    before = (slot[:, None, None] == slot[None, :, None] + 1)
    n_left = tl.sum(inside.to(tl.int32), axis=0)
    base = 0
    while (base < n) & (n_left > 0):
        jj = base + slot
        # past the list's end, the last entry again with opacity 0 (no masks): a Gaussian's index fits in int32
        g = tl.load(tile_list + tl.minimum(jj, n - 1)).to(tl.int32)
        row_g = geom + GEOM * g
        dx = px[None, :] - tl.load(row_g)[:, None]
        dy = py[None, :] - tl.load(row_g + 1)[:, None]
        a = tl.load(row_g + 2)[:, None]
        bq = tl.load(row_g + 3)[:, None]
        c = tl.load(row_g + 4)[:, None]
        gauss = _exp(_minus_half_q(a, bq, c, dx, dy))
        raw = tl.where(jj < n, tl.load(row_g + 5), 0.0)[:, None] * gauss
        al = tl.where(raw > max_alpha, max_alpha, raw)
        valid = al >= alpha_min
        factor = tl.where(valid, 1.0 - al, 1.0)
        # T (0 for a pixel that has stopped: nothing counts) enters as the first factor, so that the scan multiplies
        # in list order, one factor at a time, as a walk one entry at a time does (and the oracle's cumprod)
        t_start = tl.where(done, 0.0, T)[None, :]
        t_after = tl.cumprod(tl.where(row == 0, t_start * factor, factor), axis=0)
        t_before = tl.where(row == 0, t_start, tl.sum(tl.where(before, t_after[None, :, :], -0.0), axis=1))
        # an entry counts until T would fall below 1e-4, and T only falls: the first entry that would is the stop
        take = valid & (t_after >= t_min)
        weight = tl.where(take, al * t_before, 0.0)
        for k in tl.static_range(C):
            col = tl.load(colors + g * C + k)
            color = tl.where(ch[:, None] == k, color + tl.sum(col[:, None] * weight, axis=0)[None, :], color)
        T = tl.min(tl.where(take, t_after, T[None, :]), axis=0)
        last = tl.maximum(last, tl.max(tl.where(take, jj[:, None] + 1, 0), axis=0))
        done = done | (tl.sum(tl.where(row == NB - 1, t_after, -0.0), axis=0) < t_min)
        n_left = tl.sum((done == 0).to(tl.int32), axis=0)
        base += NB
    plane = b * H * W + pix
    tl.store(trans + plane, T, mask=inside)
    tl.store(last_out + plane, last, mask=inside)
    if HAS_BG:
        color += tl.load(bg + b * C + ch, mask=ch_ok, other=0.0)[:, None] * T[None, :]
    tl.store(image + (b * C + ch)[:, None] * (H * W) + pix[None, :], color, mask=ch_ok[:, None] & inside[None, :])


@triton.jit
def _backward_tile(bt, starts, last_in, grad_image, n_tiles, tiles_x, H, W, C: tl.constexpr, CP: tl.constexpr,
                   TILE: tl.constexpr, DT: tl.constexpr):
    """What both backward walks of program bt start from: lanes inside the image, pixel centres, channel lanes,
    the tile's first list slot, the lanes' offsets in an image plane (b*H*W + pixel), their entry counts and
    dL/dimage (CP, P)."""
    b, inside, pix, px, py = _tile_pixels(bt, n_tiles, tiles_x, H, W, TILE, DT)
    ch = tl.arange(0, CP)
    ch_ok = ch < C
    plane = b * H * W + pix
    cnt = tl.load(last_in + plane, mask=inside, other=0)
    g_out = tl.load(grad_image + (b * C + ch)[:, None] * (H * W) + pix[None, :],
                    mask=ch_ok[:, None] & inside[None, :], other=0.0)
    return b, inside, px, py, ch, ch_ok, tl.load(starts + bt), plane, cnt, g_out


@triton.jit
def _backward_kernel(geom, colors, gids, starts, bg, trans, last_in, grad_image, grad_alpha,
                     curvature, buf, H, W, tiles_x, n_tiles, params,
                     C: tl.constexpr, CP: tl.constexpr, HAS_BG: tl.constexpr, DEPTH: tl.constexpr,
                     TILE: tl.constexpr, DT: tl.constexpr, DP: tl.constexpr):
    """One (image, tile) back to front: writes buf[j] = d/d(mx, my, a, b, c, o, colours, z_front) of each list
    entry j it owns (rows of width 6 + C + 2; the last column is `_depth_back_kernel`'s). Each entry's columns are
    stacked as the rows of one (DP, P) block, summed over the pixels in one reduction and stored at once."""
    D: tl.constexpr = _N_GEOM + C + 2
    b, inside, px, py, ch, ch_ok, start, plane, cnt, g_out = _backward_tile(
        tl.program_id(0), starts, last_in, grad_image, n_tiles, tiles_x, H, W, C, CP, TILE, DT)
    k = tl.arange(0, DP)[:, None]  # the column of the gradient row that a block row holds
    colour = (k >= _N_GEOM) & (k < _N_GEOM + C)
    # dL/dimage with channel c at block row 6 + c (for the colour columns; the geometry's use g_out)
    pix = plane - b * H * W
    g_out_k = tl.load(grad_image + (b * C + k - _N_GEOM) * (H * W) + pix[None, :], mask=colour & inside[None, :],
                      other=0.0)
    max_alpha = tl.load(params)
    tau = tl.load(params + 1)
    alpha_min = tl.full([], _ALPHA_MIN, DT)
    T = tl.load(trans + plane, mask=inside, other=1.0)  # T after the current Gaussian
    g_a_t = tl.load(grad_alpha + plane, mask=inside, other=0.0) * T  # dL/dalpha_out * T_final
    behind = tl.zeros([CP, TILE * TILE], DT)  # the colour behind the current Gaussian
    if HAS_BG:
        behind += tl.load(bg + b * C + ch, mask=ch_ok, other=0.0)[:, None]
    curv = tl.zeros([TILE * TILE], DT)
    if DEPTH:
        curv = tl.load(curvature + plane, mask=inside, other=0.0)
    partner = tl.full([TILE * TILE], -1, tl.int32)  # list slot of the contributor behind, -1: none yet
    partner_a = tl.zeros([TILE * TILE], DT)
    n_last = tl.max(cnt, axis=0)
    for t in range(0, n_last):
        jj = n_last - 1 - t
        g = tl.load(gids + start + jj)
        dx, dy, a, bq, c, gauss, raw, al = _gaussian(geom, g, px, py, max_alpha)
        valid = (jj < cnt) & (al >= alpha_min)
        one_m = 1.0 - al
        T = tl.where(valid, T / one_m, T)  # T before this Gaussian
        col = tl.load(colors + g * C + ch, mask=ch_ok, other=0.0)
        swap = tl.zeros([TILE * TILE], DT)
        if DEPTH:
            has_pair = valid & (partner >= 0)
            swap = _swap_term(colors, geom, gids, start, partner, has_pair, T * al * partner_a, col,
                              tl.load(geom + GEOM * g + 6), g_out, curv, tau, 1.0, C, CP)
            partner = tl.where(valid, jj, partner)
            partner_a = tl.where(valid, al, partner_a)
        d_alpha = tl.sum((col[:, None] - behind) * g_out, axis=0) * T + g_a_t / one_m
        behind = tl.where(valid[None, :], al[None, :] * col[:, None] + one_m[None, :] * behind, behind)
        free = valid & (raw <= max_alpha)  # a clamped alpha is constant
        d_q = tl.where(free, -0.5 * al * d_alpha, 0.0)
        block = tl.where(k == 0, (-2.0 * d_q * (a * dx + bq * dy))[None, :],
                tl.where(k == 1, (-2.0 * d_q * (bq * dx + c * dy))[None, :],
                tl.where(k == 2, (d_q * dx * dx)[None, :],
                tl.where(k == 3, (2.0 * d_q * dx * dy)[None, :],
                tl.where(k == 4, (d_q * dy * dy)[None, :],
                tl.where(k == 5, tl.where(free, d_alpha * gauss, 0.0)[None, :],
                tl.where(colour, g_out_k * tl.where(valid, al * T, 0.0)[None, :],
                tl.where(k == _N_GEOM + C, swap[None, :], 0.0))))))))
        tl.store(buf + (start + jj) * D + k, tl.sum(block, axis=1, keep_dims=True),
                 mask=k < _N_GEOM + C + DEPTH)


@triton.jit
def _depth_back_kernel(geom, colors, gids, starts, last_in, grad_image, curvature, buf,
                       H, W, tiles_x, n_tiles, params,
                       C: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, DT: tl.constexpr):
    """One (image, tile) front to back: buf[j, 6 + C + 1] = -sum of s over the pairs in which entry j is the back
    member (see the module docstring, 4)."""
    D: tl.constexpr = _N_GEOM + C + 2
    b, inside, px, py, ch, ch_ok, start, plane, cnt, g_out = _backward_tile(
        tl.program_id(0), starts, last_in, grad_image, n_tiles, tiles_x, H, W, C, CP, TILE, DT)
    max_alpha = tl.load(params)
    tau = tl.load(params + 1)
    alpha_min = tl.full([], _ALPHA_MIN, DT)
    curv = tl.load(curvature + plane, mask=inside, other=0.0)
    T = tl.full([TILE * TILE], 1.0, DT)
    partner = tl.full([TILE * TILE], -1, tl.int32)  # list slot of the contributor in front, -1: none yet
    partner_a = tl.zeros([TILE * TILE], DT)
    partner_t = tl.zeros([TILE * TILE], DT)  # T before it
    n_last = tl.max(cnt, axis=0)
    for jj in range(0, n_last):
        g = tl.load(gids + start + jj)
        dx, dy, a, bq, c, gauss, raw, al = _gaussian(geom, g, px, py, max_alpha)
        valid = (jj < cnt) & (al >= alpha_min)
        col = tl.load(colors + g * C + ch, mask=ch_ok, other=0.0)
        s = _swap_term(colors, geom, gids, start, partner, valid & (partner >= 0), partner_t * partner_a * al,
                       col, tl.load(geom + GEOM * g + 6), g_out, curv, tau, -1.0, C, CP)
        tl.store(buf + (start + jj) * D + _N_GEOM + C + 1, -tl.sum(s, axis=0))
        partner = tl.where(valid, jj, partner)
        partner_a = tl.where(valid, al, partner_a)
        partner_t = tl.where(valid, T, partner_t)
        T = tl.where(valid, T * (1.0 - al), T)


@triton.jit
def _reduce_kernel(buf, perm, seg, out, n, D: tl.constexpr, DP: tl.constexpr, GB: tl.constexpr, DT: tl.constexpr):
    """out[g] = sum of the rows buf[perm[seg[g]:seg[g + 1]]], in that order, for the GB Gaussians g of this program
    (one warp: GB x DP lanes)."""
    g = tl.program_id(0).to(tl.int64) * GB + tl.arange(0, GB)
    ok = g < n
    lo = tl.load(seg + g, mask=ok, other=0)
    cnt = tl.load(seg + g + 1, mask=ok, other=0) - lo
    cols = tl.arange(0, DP)
    col_ok = (cols < D)[None, :]
    acc = tl.zeros([GB, DP], DT)
    for r in range(0, tl.max(cnt, axis=0)):
        has = r < cnt
        row = tl.load(perm + lo + r, mask=has, other=0)
        acc += tl.load(buf + row[:, None] * D + cols[None, :], mask=has[:, None] & col_ok, other=0.0)
    tl.store(out + g[:, None] * D + cols[None, :], acc, mask=ok[:, None] & col_ok)


#: True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = not isinstance(_forward_kernel, JITFunction)
#: Whether `_exp` calls libdevice (compiled kernels; read when a kernel is compiled, after this line has run).
_LIBDEVICE = tl.constexpr(not INTERPRETED)


def _dtypes(*tensors) -> tuple[torch.dtype, torch.dtype, object]:
    """(output dtype, compute dtype, its Triton type): the output follows torch type promotion over the floating
    inputs, as the reference does; the kernels run in float64 when that is float64, in float32 otherwise."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return (out, torch.float64, tl.float64) if out == torch.float64 else (out, torch.float32, tl.float32)


class _RasterizeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, background, height, width, max_alpha, depth_tau,
                loss_curvature, tile_cut):
        B, K, C = colors.shape
        out_dtype, dt, tdt = _dtypes(means2d, conics, colors, opacities, background)
        device = colors.device
        tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
        with torch.no_grad():
            order, flat, gids, starts, counts = sort_and_bin(means2d.detach(), conics.detach(), colors.detach(),
                                                             opacities.detach(), depths.detach(), dt, tiles_x, tiles_y,
                                                             tile_cut)
        means, conics_s, colors_s, opac, depths_s = (t.to(dt) for t in flat)
        # one row of GEOM values per Gaussian: a list entry's parameters share a base address (and a cache line)
        geom = torch.cat([means, conics_s, opac[:, None], depths_s[:, None],
                          torch.zeros_like(opac)[:, None]], 1).contiguous()
        colors_s = colors_s.contiguous()
        bg = expand_background(background, B, C, dt, device)
        bg = torch.zeros(1, dtype=dt, device=device) if bg is None else bg.detach().contiguous()
        image = torch.empty(B, C, height, width, dtype=dt, device=device)
        trans = torch.empty(B, height, width, dtype=dt, device=device)
        last = torch.empty(B, height, width, dtype=torch.int32, device=device)
        common = dict(C=C, CP=triton.next_power_of_2(C), TILE=TILE, DT=tdt)
        grid = (B * tiles_x * tiles_y,)
        _forward_kernel[grid](geom, colors_s, gids, starts, counts, bg, image, trans, last,
                              height, width, tiles_x, tiles_x * tiles_y, _params(max_alpha, 0.0, dt, device),
                              HAS_BG=background is not None, NB=FORWARD_CHUNK, **LAUNCH, **common)
        curvature = (loss_curvature.detach().to(dt).contiguous() if depth_tau > 0
                     else torch.zeros(1, dtype=dt, device=device))
        ctx.save_for_backward(geom, colors_s, gids, starts, bg, trans, last, order,
                              curvature)
        ctx.args = (height, width, tiles_x, tiles_y, float(max_alpha), float(depth_tau), common, grid)
        ctx.has_bg = background is not None
        ctx.shared_bg = background is not None and background.dim() == 1
        ctx.in_dtypes = [t.dtype if t is not None else None
                         for t in (means2d, conics, colors, opacities, depths, background)]
        return image.to(out_dtype), (1.0 - trans).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image, grad_alpha):
        geom, colors, gids, starts, bg, trans, last, order, curvature = ctx.saved_tensors
        height, width, tiles_x, tiles_y, max_alpha, depth_tau, common, grid = ctx.args
        B, K = order.shape
        C, dt = common["C"], trans.dtype
        g_img = grad_image.to(dt).contiguous()
        tau = depth_tau if ctx.needs_input_grad[4] else 0.0
        grads = [None] * 12
        if any(ctx.needs_input_grad[:4]) or tau > 0:
            D = N_GEOM + C + 2
            buf = torch.zeros(gids.numel(), D, dtype=dt, device=g_img.device)
            n_tiles = tiles_x * tiles_y
            params = _params(max_alpha, tau, dt, g_img.device)
            if gids.numel():
                _backward_kernel[grid](geom, colors, gids, starts, bg, trans, last, g_img,
                                       grad_alpha.to(dt).contiguous(), curvature, buf, height, width, tiles_x,
                                       n_tiles, params, HAS_BG=ctx.has_bg, DEPTH=tau > 0,
                                       DP=triton.next_power_of_2(N_GEOM + C + 1), **LAUNCH, **common)
                if tau > 0:
                    _depth_back_kernel[grid](geom, colors, gids, starts, last, g_img,
                                             curvature, buf, height, width, tiles_x, n_tiles, params,
                                             **LAUNCH, **common)
            flat = _sum_rows(buf, gids, B * K, common["DT"])  # (B*K, D) in depth order
            per_image = torch.empty_like(flat).view(B, K, D).scatter_(
                1, order[..., None].expand(B, K, D), flat.view(B, K, D))  # back to the input order
            grads[:4] = [per_image[..., 0:2], per_image[..., 2:5], per_image[..., N_GEOM:N_GEOM + C],
                         per_image[..., 5]]
            if tau > 0:
                grads[4] = per_image[..., N_GEOM + C] + per_image[..., N_GEOM + C + 1]
        if ctx.needs_input_grad[5]:
            # d out / d bg = T_final, summed over pixels (and images if shared)
            g_bg = torch.einsum("bhw,bchw->bc", trans, g_img)
            grads[5] = g_bg.sum(0) if ctx.shared_bg else g_bg
        return tuple(g.to(dtype) if g is not None else None
                     for g, dtype in zip(grads, ctx.in_dtypes + [None] * 6))


def _params(max_alpha: float, tau: float, dt: torch.dtype, device) -> Tensor:
    """max_alpha and tau as the kernels read them: a tensor in their compute dtype. A Python float argument would
    reach a compiled kernel as fp32 (triton types it so), where the interpreter keeps the double."""
    params = torch.full((2,), tau, dtype=dt, device=device)  # filled on the device: a copy from the host would sync
    params[0] = max_alpha
    return params


def _sum_rows(buf: Tensor, gids: Tensor, n: int, tdt) -> Tensor:
    """(n, D): row g = the sum of the rows of buf whose gids is g, each in list order (bitwise reproducible)."""
    D = buf.shape[1]
    out = torch.zeros(n, D, dtype=buf.dtype, device=buf.device)
    if n == 0 or gids.numel() == 0:
        return out
    perm = torch.argsort(gids, stable=True)
    seg = torch.searchsorted(gids[perm], torch.arange(n + 1, device=buf.device))  # no host sync, unlike bincount
    DP = triton.next_power_of_2(D)
    GB = max(1, REDUCE_LANES // DP)
    _reduce_kernel[(triton.cdiv(n, GB),)](buf, perm, seg, out, n, D=D, DP=DP, GB=GB, DT=tdt, **REDUCE_LAUNCH)
    return out


def rasterize_triton(means2d, conics, colors, opacities, depths, *, height, width, background=None,
                     settings=RenderSettings(), loss_curvature=None):
    """Tiled, differentiable splatting of 2D Gaussians in Triton (3DGS conventions; see `gmae.render.rasterize`).

    CUDA tensors; CPU tensors only when the kernels run in Triton's interpreter
    (``TRITON_INTERPRET=1``). Differentiable in means2d, conics, colors,
    opacities and background; the depths get the depth-order gradient when
    settings.depth_tau > 0 (with loss_curvature (B, H, W)). settings: a `gmae.render.RenderSettings` with sorted
    compositing (its max_alpha, depth_tau and tile_cut are used).
    """
    validate_inputs(means2d, conics, colors, opacities, depths, height, width, background, settings, loss_curvature)
    if means2d.device.type != "cuda" and not INTERPRETED:
        raise GMAEError("the triton backend needs CUDA tensors (on the CPU it runs only in Triton's interpreter, "
                        "TRITON_INTERPRET=1 set before gmae imports it: slow, for tests); use render backend cpu")
    return _RasterizeTriton.apply(means2d, conics, colors, opacities, depths, background, height, width,
                                  float(settings.max_alpha), float(settings.depth_tau), loss_curvature,
                                  settings.tile_cut)
