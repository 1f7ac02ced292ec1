"""Fast differentiable CPU rasterizer (backend "cpu"): tiled splatting in numba.

The structure follows the 3DGS / gsplat rasterizer:

1. `_preprocess`: per Gaussian, the exact pixel bounding box of the set where
   its alpha can reach 1/255 (opacity-aware, not a fixed 3 sigma); degenerate
   Gaussians are culled here.
2. `_bin`: the intersection list. Gaussians are visited per image in stable
   depth order and emitted into every 16x16 tile their box touches; a counting
   sort over tiles makes each tile's list ascending in depth (ties by index)
   in O(n_isect).
3. `_forward_kernel`: one (image, tile) pair per parallel task. Tiles walk their
   list front to back; each Gaussian only visits the pixels of its ellipse
   (row spans), so the work grows with the Gaussians' footprint, not with k*H*W.
   Per pixel only the final transmittance and the number of list entries up to
   the last contributor are kept.
4. `_backward_kernel`: the same tiles walked back to front, transmittance
   rebuilt by division as in 3DGS. Gradients are accumulated per intersection
   (each intersection is owned by one tile, hence one thread) and
   `_reduce_grads` sums them per Gaussian in a fixed order: no races, and the
   result is bitwise reproducible run to run.

Semantics are those of the rendering contract (see `gmae.render.contract`):
alpha_i = min(max_alpha, o_i exp(-q_i/2)); alpha_i < 1/255 is skipped; a pixel
stops before the Gaussian that would bring its transmittance below 1e-4.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from numba import njit, prange

# The contract's constants (tile side, 1/255 skip, 1e-4 early stop) and input checks, shared by every backend.
from .contract import ALPHA_MIN, T_MIN, TILE, RenderSettings, sigma3_tile_box, validate_inputs

__all__ = ["rasterize_cpu"]

# Packed per-Gaussian parameter row (dtype of the computation), then colours.
P_MX, P_MY, P_A, P_B, P_C, P_O = range(6)
N_GEOM = 6  # columns before the colours

# Culling slack. The kernels evaluate alpha in float32; near the 1/255 boundary
# rounding can make alpha >= 1/255 slightly outside the exact ellipse q <= t.
# Inflating t by a small multiple of the magnitude of the terms of q (bounded by
# 4 t a c / det inside the box) keeps culling conservative; extra pixels only
# cost a test, missing ones would change the image.
_CULL_REL = 1e-5
_CULL_PIX = 1e-3  # pixels added to every half-extent / row span


def _prefer_workqueue_threads() -> None:
    """Use numba's own "workqueue" thread pool unless the user chose a layer.

    numba otherwise picks OpenMP (GNU libgomp, the one torch loads): with its
    default spin-then-sleep waiting, every kernel launch measured ~12 ms on a
    busy 2-core machine, vs ~0.07 ms for workqueue (and ~0.01 ms for OpenMP
    with OMP_WAIT_POLICY=passive, which must be set before torch is imported). Our
    kernels are launched from one Python thread at a time (they hold the GIL),
    which is all workqueue needs. Only done before numba has started any
    threads, and never over NUMBA_THREADING_LAYER or an explicit
    numba.config.THREADING_LAYER.
    """
    from numba.np.ufunc import parallel

    if ("NUMBA_THREADING_LAYER" not in os.environ
            and numba.config.THREADING_LAYER == "default"
            and not getattr(parallel, "_is_initialized", True)):
        numba.config.THREADING_LAYER = "workqueue"


_prefer_workqueue_threads()


# --------------------------------------------------------------------------
# 1. per-Gaussian preprocessing
# --------------------------------------------------------------------------


@njit(cache=True, fastmath=False)
def _preprocess(means, conics, colors, opacities, depths, height, width):
    """Pack, cull and bound every Gaussian.

    means (N, 2), conics (N, 3), colors (N, C), opacities (N,), one float dtype;
    depths (N,) float64 (only checked: a Gaussian with any non-finite
    parameter, colour or depth included, is culled, so that it is in no tile
    list and can reach neither the image nor any gradient).
    Returns
      params (N, 6+C) in that dtype: (mx, my, a, b, c, o, colours...), the
        rows the kernels read (one cache line per Gaussian instead of four);
      geo (N, 5) float64 = (mx, my, b/a, t_cull/a, det/a^2), the ellipse
        q <= t_cull in the form `_row_span` traces row by row;
      box (N, 4) int32 = (x_lo, x_hi, y_lo, y_hi), the inclusive pixel
        bounding box clipped to the image; x_lo > x_hi marks a culled Gaussian.
    Geometry is done in float64 whatever the dtype (it is per Gaussian, cheap).
    """
    n = means.shape[0]
    n_ch = colors.shape[1]
    params = np.empty((n, N_GEOM + n_ch), means.dtype)
    geo = np.zeros((n, 5), np.float64)
    box = np.empty((n, 4), np.int32)
    for i in range(n):
        params[i, P_MX] = means[i, 0]
        params[i, P_MY] = means[i, 1]
        params[i, P_A] = conics[i, 0]
        params[i, P_B] = conics[i, 1]
        params[i, P_C] = conics[i, 2]
        params[i, P_O] = opacities[i]
        for ch in range(n_ch):
            params[i, N_GEOM + ch] = colors[i, ch]
        box[i, 0] = 1  # culled unless proven visible below
        box[i, 1] = 0
        box[i, 2] = 1
        box[i, 3] = 0
        mx = np.float64(means[i, 0])
        my = np.float64(means[i, 1])
        a = np.float64(conics[i, 0])
        b = np.float64(conics[i, 1])
        c = np.float64(conics[i, 2])
        o = np.float64(opacities[i])
        det = a * c - b * b
        # not-(x > 0) also rejects NaN; a <= 0 with det > 0 would be negative
        # definite (alpha growing away from the mean): not a Gaussian.
        if not (det > 0.0 and a > 0.0 and o * 255.0 >= 1.0):
            continue
        if not (math.isfinite(mx) and math.isfinite(my) and math.isfinite(det)
                and math.isfinite(a) and math.isfinite(b) and math.isfinite(c)
                and math.isfinite(o) and math.isfinite(depths[i])):
            continue
        finite_colors = True
        for ch in range(n_ch):
            if not math.isfinite(colors[i, ch]):
                finite_colors = False
        if not finite_colors:
            continue
        # alpha >= 1/255  <=>  q <= t = 2 ln(255 o)
        t = 2.0 * math.log(255.0 * o)
        t_cull = t * (1.0 + _CULL_REL) + _CULL_REL * (4.0 * t * a * c / det + 1.0)
        # Exact half-extents of the ellipse q <= t_cull: sqrt(t Sigma_xx) etc.,
        # with Sigma the inverse of the conic.
        rx = math.sqrt(t_cull * c / det) + _CULL_PIX
        ry = math.sqrt(t_cull * a / det) + _CULL_PIX
        # pixel i has its centre at i + 0.5; clamp in float before any int cast
        x_lo = max(math.ceil(min(max(mx - rx - 0.5, -1.0), width + 1.0)), 0)
        x_hi = min(math.floor(min(max(mx + rx - 0.5, -1.0), width + 1.0)), width - 1)
        y_lo = max(math.ceil(min(max(my - ry - 0.5, -1.0), height + 1.0)), 0)
        y_hi = min(math.floor(min(max(my + ry - 0.5, -1.0), height + 1.0)), height - 1)
        if x_lo > x_hi or y_lo > y_hi:
            continue  # off-screen
        w = b / a
        u = t_cull / a
        v = (det / a) / a  # not det / (a * a): a * a can underflow
        if not (math.isfinite(w) and math.isfinite(u) and math.isfinite(v)):
            continue  # absurdly elongated (ratio of axes beyond ~1e150)
        box[i, 0] = x_lo
        box[i, 1] = x_hi
        box[i, 2] = y_lo
        box[i, 3] = y_hi
        geo[i, 0] = mx
        geo[i, 1] = my
        geo[i, 2] = w
        geo[i, 3] = u
        geo[i, 4] = v
    return params, geo, box


@njit(cache=True, fastmath=False)
def _row_span(geo, g, py, x_lo, x_hi):
    """Inclusive pixel range [lo, hi] of row centre py inside Gaussian g's ellipse.

    a dx^2 + 2 b dx dy + c dy^2 <= t solved for dx:
    dx = -(b/a) dy +- sqrt(t/a - (det/a^2) dy^2), hence the geo layout (one
    sqrt, no division per row). Clipped to [x_lo, x_hi]; lo > hi: empty row.
    """
    dy = py - geo[g, 1]
    disc = geo[g, 3] - geo[g, 4] * dy * dy
    if not disc >= 0.0:
        return 1, 0
    half = math.sqrt(disc) + _CULL_PIX
    cx = geo[g, 0] - geo[g, 2] * dy - 0.5  # minus 0.5: pixel x has centre x + 0.5
    lo = math.ceil(min(max(cx - half, x_lo - 1.0), x_hi + 1.0))
    hi = math.floor(min(max(cx + half, x_lo - 1.0), x_hi + 1.0))
    return max(lo, x_lo), min(hi, x_hi)


# --------------------------------------------------------------------------
# 2. binning
# --------------------------------------------------------------------------


@njit(cache=True, fastmath=False)
def _bin(order, box, tiles_x, tiles_y):
    """Intersection list sorted by (image, tile, depth rank).

    order (B, K) int64: per image, Gaussian indices in stable ascending depth.
    box (B*K, 4) int32 from `_preprocess`.
    Returns tile_start (B*T + 1,) int64, where tile bt = b*T + ty*tiles_x + tx
    owns entries tile_start[bt]:tile_start[bt+1], and gid (n_isect,) int32,
    the global Gaussian index b*K + k of each entry.
    """
    n_img, k = order.shape
    n_tiles = tiles_x * tiles_y
    counts = np.zeros(n_img * n_tiles + 1, np.int64)
    # counting pass
    for b in range(n_img):
        base = b * n_tiles + 1
        for r in range(k):
            g = b * k + order[b, r]
            if box[g, 0] > box[g, 1]:
                continue
            for ty in range(box[g, 2] // TILE, box[g, 3] // TILE + 1):
                for tx in range(box[g, 0] // TILE, box[g, 1] // TILE + 1):
                    counts[base + ty * tiles_x + tx] += 1
    tile_start = np.cumsum(counts)
    gid = np.empty(tile_start[-1], np.int32)
    # fill pass, in the same depth order: each tile's slice ends up sorted
    for b in range(n_img):
        cursor = tile_start[b * n_tiles:(b + 1) * n_tiles].copy()
        for r in range(k):
            g = b * k + order[b, r]
            if box[g, 0] > box[g, 1]:
                continue
            for ty in range(box[g, 2] // TILE, box[g, 3] // TILE + 1):
                for tx in range(box[g, 0] // TILE, box[g, 1] // TILE + 1):
                    t = ty * tiles_x + tx
                    gid[cursor[t]] = g
                    cursor[t] += 1
    return tile_start, gid


# --------------------------------------------------------------------------
# 3. forward
# --------------------------------------------------------------------------


@njit(cache=True, fastmath=False)
def _gauss(dx, dy, a, b2, c, half):
    """exp(-q/2), q = a dx^2 + 2b dx dy + c dy^2 (b2 = 2b), in the inputs' dtype.

    Written exactly as the reference does, and shared by the forward and the
    backward kernels so that both take identical skip / stop decisions.
    """
    return math.exp(-half * (a * dx * dx + b2 * dx * dy + c * dy * dy))


@njit(cache=True, fastmath=False)
def _tile_bounds(bt, n_tiles, tiles_x, height, width):
    """Task bt of the (image, tile) grid -> image b and the tile's pixel box [y0, y1) x [x0, x1)."""
    b = bt // n_tiles
    y0 = ((bt % n_tiles) // tiles_x) * TILE
    x0 = (bt % tiles_x) * TILE
    return b, y0, x0, min(y0 + TILE, height), min(x0 + TILE, width)


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(params, geo, box, gid, tile_start, consts, xs, ys, bg,
                    tiles_x, tiles_y, image, alpha_out, trans, count):
    """Composite every (image, tile) pair.

    params (N, 6+C) dtype; consts = (1/2, 1/255, 1e-4, max_alpha, 1) in dtype,
    so float32 stays float32 throughout; xs (W,), ys (H,) pixel centres;
    bg (B, C). Writes image (B, C, H, W), alpha_out (B, H, W) = 1 - trans,
    trans (B, H, W) = final transmittance, count (B, H, W) int32 = number of
    tile-list entries up to and including the pixel's last contributor.
    """
    half = consts[0]
    alpha_min = consts[1]
    t_min = consts[2]
    max_alpha = consts[3]
    one = consts[4]
    n_ch = params.shape[1] - N_GEOM
    height = ys.shape[0]
    width = xs.shape[0]
    n_tiles = tiles_x * tiles_y
    for bt in prange(bg.shape[0] * n_tiles):
        b, y0, x0, y1, x1 = _tile_bounds(bt, n_tiles, tiles_x, height, width)
        n_pix = (y1 - y0) * (x1 - x0)
        # tile-local state, pixel p = (y - y0) * TILE + (x - x0)
        t_tile = np.ones(TILE * TILE, params.dtype)
        col = np.zeros((n_ch, TILE * TILE), params.dtype)
        last = np.zeros(TILE * TILE, np.int32)
        done = np.zeros(TILE * TILE, np.bool_)
        n_done = 0
        start = tile_start[bt]
        for j in range(start, tile_start[bt + 1]):
            if n_done == n_pix:
                break  # every pixel of the tile has saturated
            g = gid[j]
            mx = params[g, P_MX]
            my = params[g, P_MY]
            a = params[g, P_A]
            b2 = params[g, P_B] + params[g, P_B]
            c = params[g, P_C]
            o = params[g, P_O]
            for y in range(max(y0, box[g, 2]), min(y1 - 1, box[g, 3]) + 1):
                lo, hi = _row_span(geo, g, y + 0.5, max(x0, box[g, 0]), min(x1 - 1, box[g, 1]))
                dy = ys[y] - my
                row = (y - y0) * TILE - x0
                for x in range(lo, hi + 1):
                    p = row + x
                    if done[p]:
                        continue
                    alpha = min(max_alpha, o * _gauss(xs[x] - mx, dy, a, b2, c, half))
                    if not alpha >= alpha_min:
                        continue  # too faint: T unchanged
                    t = t_tile[p]
                    t_next = t * (one - alpha)
                    if t_next < t_min:
                        done[p] = True  # stop before this Gaussian
                        n_done += 1
                        continue
                    w = alpha * t
                    for ch in range(n_ch):
                        col[ch, p] += w * params[g, N_GEOM + ch]
                    t_tile[p] = t_next
                    last[p] = j - start + 1
        for y in range(y0, y1):
            for x in range(x0, x1):
                p = (y - y0) * TILE + (x - x0)
                trans[b, y, x] = t_tile[p]
                alpha_out[b, y, x] = one - t_tile[p]
                count[b, y, x] = last[p]
        for ch in range(n_ch):  # channel-outer: contiguous writes
            bg_ch = bg[b, ch]
            for y in range(y0, y1):
                for x in range(x0, x1):
                    p = (y - y0) * TILE + (x - x0)
                    image[b, ch, y, x] = col[ch, p] + t_tile[p] * bg_ch


# --------------------------------------------------------------------------
# 4. backward
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _backward_kernel(params, geo, box, gid, tile_start, consts, xs, ys, bg,
                     tiles_x, tiles_y, trans, count, grad_image, grad_alpha, buf,
                     depths, curvature, tau):
    """Per-intersection gradients, one (image, tile) pair per task.

    grad_image (B, C, H, W), grad_alpha (B, H, W) in dtype. Writes buf
    (n_isect, 6+C+1) float64 (zero-initialised), laid out like params and
    then the depth: d/d(mx, my, a, b, c, o, colours, depth). Each row is
    written by the single task owning its tile, so no atomics and a fixed
    summation order.

    Going back to front from the last contributor, with R the colour
    "behind" Gaussian i (R starts at the background) and T_i = T_{i+1}/(1-a_i):
      dout/dalpha_i   = T_i (c_i - R),   R <- a_i c_i + (1 - a_i) R
      dalpha_out/da_i = T_final / (1 - a_i)
    and alpha_i = o G, G = exp(-q/2): d/do = G, d/dq = -alpha/2 (unless clamped).

    With tau > 0 (depths (N,) float64, curvature (B, H, W) the loss's second
    derivative per pixel), the depth-order gradient of the torch oracle
    (`gmae.render.reference.depth_pair_gradient`): the walk meets each pixel's
    contributors back to front, so the previous one met at a pixel is the
    next contributor j behind the current i; for that pair
    dC = T_i a_i a_j (c_j - c_i), dL = g.dC + h |dC|^2 / 2, p = sigmoid((z_j - z_i)/tau)
    and z_i += p (1 - p) dL / tau, z_j -= the same (j's row is in this tile's list).
    """
    half = consts[0]
    alpha_min = consts[1]
    max_alpha = consts[3]
    one = consts[4]
    zero = one - one
    n_ch = params.shape[1] - N_GEOM
    z_col = N_GEOM + n_ch
    height = ys.shape[0]
    width = xs.shape[0]
    n_tiles = tiles_x * tiles_y
    for bt in prange(bg.shape[0] * n_tiles):
        b, y0, x0, y1, x1 = _tile_bounds(bt, n_tiles, tiles_x, height, width)
        # tile-local state of the backward walk, pixel p = (y-y0)*TILE + (x-x0)
        t_run = np.ones(TILE * TILE, params.dtype)  # T after the current Gaussian
        behind = np.zeros((n_ch, TILE * TILE), params.dtype)  # R
        g_out = np.zeros((n_ch, TILE * TILE), params.dtype)  # dL/dout
        g_a_t = np.zeros(TILE * TILE, params.dtype)  # dL/dalpha_out * T_final
        cnt = np.zeros(TILE * TILE, np.int32)
        pair_j = np.full(TILE * TILE, -1, np.int32)  # list slot of the contributor behind, -1: none yet
        pair_a = np.zeros(TILE * TILE, params.dtype)  # its alpha
        n_last = 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                p = (y - y0) * TILE + (x - x0)
                t_run[p] = trans[b, y, x]
                g_a_t[p] = grad_alpha[b, y, x] * trans[b, y, x]
                cnt[p] = count[b, y, x]
                n_last = max(n_last, cnt[p])
                for ch in range(n_ch):
                    behind[ch, p] = bg[b, ch]
                    g_out[ch, p] = grad_image[b, ch, y, x]
        g_col = np.empty(n_ch, np.float64)
        start = tile_start[bt]
        for jj in range(n_last - 1, -1, -1):
            j = start + jj
            g = gid[j]
            mx = params[g, P_MX]
            my = params[g, P_MY]
            a = params[g, P_A]
            bb = params[g, P_B]
            b2 = bb + bb
            c = params[g, P_C]
            o = params[g, P_O]
            # float64 per-intersection accumulators
            g_mx = 0.0
            g_my = 0.0
            g_a = 0.0
            g_b = 0.0
            g_c = 0.0
            g_o = 0.0
            g_z = 0.0
            g_col[:] = 0.0
            for y in range(max(y0, box[g, 2]), min(y1 - 1, box[g, 3]) + 1):
                lo, hi = _row_span(geo, g, y + 0.5, max(x0, box[g, 0]), min(x1 - 1, box[g, 1]))
                dy = ys[y] - my
                row = (y - y0) * TILE - x0
                for x in range(lo, hi + 1):
                    p = row + x
                    if jj >= cnt[p]:
                        continue  # behind this pixel's last contributor
                    dx = xs[x] - mx
                    gauss = _gauss(dx, dy, a, b2, c, half)
                    raw = o * gauss
                    alpha = min(max_alpha, raw)
                    if not alpha >= alpha_min:
                        continue
                    one_m = one - alpha
                    t = t_run[p] / one_m  # T before this Gaussian
                    t_run[p] = t
                    if tau > 0.0:
                        if pair_j[p] >= 0:
                            j_row = start + pair_j[p]
                            gj = gid[j_row]
                            w_pair = t * alpha * pair_a[p]
                            d_lin = 0.0
                            d_sq = 0.0
                            for ch in range(n_ch):
                                dc = w_pair * (params[gj, N_GEOM + ch] - params[g, N_GEOM + ch])
                                d_lin += g_out[ch, p] * dc
                                d_sq += dc * dc
                            change = d_lin + 0.5 * curvature[b, y, x] * d_sq
                            u = min(max((depths[gj] - depths[g]) / tau, -60.0), 60.0)
                            pz = 1.0 / (1.0 + math.exp(-u))
                            s_pair = pz * (1.0 - pz) / tau * change
                            g_z += s_pair
                            buf[j_row, z_col] -= s_pair
                        pair_j[p] = jj
                        pair_a[p] = alpha
                    d_alpha = zero
                    for ch in range(n_ch):
                        go = g_out[ch, p]
                        col = params[g, N_GEOM + ch]
                        r = behind[ch, p]
                        g_col[ch] += alpha * t * go
                        d_alpha += (col - r) * go
                        behind[ch, p] = alpha * col + one_m * r
                    d_alpha = d_alpha * t + g_a_t[p] / one_m
                    if raw <= max_alpha:  # a clamped alpha is constant
                        g_o += d_alpha * gauss
                        d_q = -half * alpha * d_alpha
                        # q = a dx^2 + 2b dx dy + c dy^2 with dx = px - mx
                        g_mx -= d_q * (a * dx + bb * dy) * 2.0
                        g_my -= d_q * (bb * dx + c * dy) * 2.0
                        g_a += d_q * dx * dx
                        g_b += d_q * dx * dy * 2.0
                        g_c += d_q * dy * dy
            buf[j, P_MX] = g_mx
            buf[j, P_MY] = g_my
            buf[j, P_A] = g_a
            buf[j, P_B] = g_b
            buf[j, P_C] = g_c
            buf[j, P_O] = g_o
            for ch in range(n_ch):
                buf[j, N_GEOM + ch] = g_col[ch]
            buf[j, z_col] += g_z  # += : pairs nearer in the list add to this row later


@njit(cache=True, fastmath=False)
def _reduce_grads(buf, gid, n_gauss, n_ch, dtype_like):
    """Sum per-intersection rows into per-Gaussian gradients.

    buf (n_isect, 6+C+1) float64, gid (n_isect,). Returns d_means (N, 2),
    d_conics (N, 3), d_colors (N, C), d_opacities (N,), d_depths (N,) in
    dtype_like's dtype.
    Serial on purpose: the fixed list order makes the sums bitwise
    reproducible, and this O(n_isect) pass is cheap next to the kernels.
    """
    acc = np.zeros((n_gauss, buf.shape[1]), np.float64)
    for j in range(gid.shape[0]):
        g = gid[j]
        for p in range(buf.shape[1]):
            acc[g, p] += buf[j, p]
    dt = dtype_like.dtype
    d_means = np.empty((n_gauss, 2), dt)
    d_conics = np.empty((n_gauss, 3), dt)
    d_colors = np.empty((n_gauss, n_ch), dt)
    d_opac = np.empty(n_gauss, dt)
    d_depth = np.empty(n_gauss, dt)
    for g in range(n_gauss):
        d_depth[g] = acc[g, N_GEOM + n_ch]
        d_means[g, 0] = acc[g, P_MX]
        d_means[g, 1] = acc[g, P_MY]
        d_conics[g, 0] = acc[g, P_A]
        d_conics[g, 1] = acc[g, P_B]
        d_conics[g, 2] = acc[g, P_C]
        d_opac[g] = acc[g, P_O]
        for ch in range(n_ch):
            d_colors[g, ch] = acc[g, N_GEOM + ch]
    return d_means, d_conics, d_colors, d_opac, d_depth


# --------------------------------------------------------------------------
# 5. torch wrapper
# --------------------------------------------------------------------------


def _numpy(x: torch.Tensor, dtype) -> np.ndarray:
    """Detached CPU C-contiguous numpy array of x in numpy dtype.

    Conversions are done by numpy, single-threaded, on purpose: on a busy
    machine every multi-threaded torch op can pay a long OpenMP wake-up, and
    these arrays are small. No copy when x is already right.
    """
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
        x = x.float()
    return np.ascontiguousarray(x.numpy(), dtype=dtype)


def _dtypes(*tensors) -> tuple[torch.dtype, type]:
    """(output dtype, compute numpy dtype): the output follows torch type
    promotion over the floating inputs, as the reference does; the kernels run
    in float64 when that is float64 (e.g. gradcheck), float32 otherwise."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return out, (np.float64 if out == torch.float64 else np.float32)


class _RasterizeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, background,
                height, width, max_alpha, depth_tau, loss_curvature, tile_cut):
        n_img, k, n_ch = colors.shape
        n = n_img * k
        out_dtype, dt = _dtypes(means2d, conics, colors, opacities, background)
        tiles_x = -(-width // TILE)
        tiles_y = -(-height // TILE)

        # 1-2: pack, cull, bound; stable depth order; bin into tiles
        depths64 = _numpy(depths, np.float64)
        params, geo, box = _preprocess(
            _numpy(means2d, dt).reshape(n, 2), _numpy(conics, dt).reshape(n, 3),
            _numpy(colors, dt).reshape(n, n_ch), _numpy(opacities, dt).reshape(n),
            depths64.reshape(n), height, width)
        if tile_cut == "3sigma":
            packed = torch.from_numpy(params)  # (mx, my, a, b, c, ...) in the compute dtype, as the kernels read them
            _cut_to_sigma3_tiles(box, packed[:, P_MX:P_MY + 1], packed[:, P_A:P_C + 1], tiles_x, tiles_y)
        # numpy's stable sort orders ties by index and NaN last, like torch's
        order = np.argsort(depths64, axis=1, kind="stable")
        tile_start, gid = _bin(order, box, tiles_x, tiles_y)

        # 3: composite
        if background is None:
            bg = np.zeros((n_img, n_ch), dt)
        else:
            # a writable copy: numba compiles read-only arrays separately
            bg = np.array(np.broadcast_to(_numpy(background, dt), (n_img, n_ch)), order="C")
        consts = np.array([0.5, ALPHA_MIN, T_MIN, max_alpha, 1.0], dt)
        xs = np.arange(width, dtype=dt) + dt(0.5)
        ys = np.arange(height, dtype=dt) + dt(0.5)
        # every pixel is written by its tile's task
        image = np.empty((n_img, n_ch, height, width), dt)
        alpha = np.empty((n_img, height, width), dt)
        trans = np.empty((n_img, height, width), dt)
        count = np.empty((n_img, height, width), np.int32)
        _forward_kernel(params, geo, box, gid, tile_start, consts, xs, ys, bg,
                        tiles_x, tiles_y, image, alpha, trans, count)

        ctx.kernel_args = (params, geo, box, gid, tile_start, consts, xs, ys, bg,
                           tiles_x, tiles_y, trans, count)
        # the depth-order gradient's extra inputs (unused when depth_tau is 0)
        ctx.depth_tau = depth_tau
        ctx.depth_args = ((depths64.reshape(n), _numpy(loss_curvature, dt)) if depth_tau > 0
                          else (np.zeros(1), np.zeros((1, 1, 1), dt)))
        ctx.shared_bg = background is not None and background.dim() == 1
        ctx.in_dtypes = [t.dtype if t is not None else None
                         for t in (means2d, conics, colors, opacities, depths, background)]
        device = colors.device
        return (torch.from_numpy(image).to(device, out_dtype),
                torch.from_numpy(alpha).to(device, out_dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image, grad_alpha):
        args = ctx.kernel_args
        params, gid, bg, trans = args[0], args[3], args[8], args[11]
        n_img, n_ch = bg.shape
        dt = params.dtype.type
        g_img = _numpy(grad_image, dt)
        grads = [None] * 12
        tau = ctx.depth_tau if ctx.needs_input_grad[4] else 0.0

        if any(ctx.needs_input_grad[:4]) or tau > 0:
            buf = np.zeros((gid.shape[0], params.shape[1] + 1), np.float64)
            _backward_kernel(*args, g_img, _numpy(grad_alpha, dt), buf, *ctx.depth_args, float(tau))
            d_means, d_conics, d_colors, d_opac, d_depth = _reduce_grads(
                buf, gid, params.shape[0], n_ch, params)
            k = params.shape[0] // n_img
            grads[:4] = [torch.from_numpy(d_means).view(n_img, k, 2),
                         torch.from_numpy(d_conics).view(n_img, k, 3),
                         torch.from_numpy(d_colors).view(n_img, k, n_ch),
                         torch.from_numpy(d_opac).view(n_img, k)]
            if tau > 0:
                grads[4] = torch.from_numpy(d_depth).view(n_img, k)
        if ctx.needs_input_grad[5]:
            # d out / d bg = T_final, summed over pixels (and images if shared)
            g_bg = np.einsum("bhw,bchw->bc", trans, g_img, dtype=np.float64)
            grads[5] = torch.from_numpy(g_bg.sum(0) if ctx.shared_bg else g_bg)
        device = grad_image.device
        return tuple(
            g.to(device, dtype) if g is not None else None
            for g, dtype in zip(grads, ctx.in_dtypes + [None] * 6)
        )


def _cut_to_sigma3_tiles(box: np.ndarray, means2d: torch.Tensor, conics: torch.Tensor, tiles_x: int,
                         tiles_y: int) -> None:
    """tile_cut "3sigma": narrow each pixel box (N, 4) of `_preprocess` to the pixels of legacy gsplat's 3-sigma
    tiles (`gmae.render.contract.sigma3_tile_box`), in place; a box left empty marks its Gaussian culled."""
    x0, x1, y0, y1 = (t.numpy() for t in sigma3_tile_box(means2d, conics, tiles_x, tiles_y))
    box[:, 0] = np.maximum(box[:, 0], x0 * TILE)
    box[:, 1] = np.minimum(box[:, 1], x1 * TILE + TILE - 1)
    box[:, 2] = np.maximum(box[:, 2], y0 * TILE)
    box[:, 3] = np.minimum(box[:, 3], y1 * TILE + TILE - 1)
    empty = (box[:, 0] > box[:, 1]) | (box[:, 2] > box[:, 3])
    box[empty, 0], box[empty, 1] = 1, 0  # _bin reads x_lo > x_hi as culled


def rasterize_cpu(means2d, conics, colors, opacities, depths, *, height, width, background=None,
                  settings=RenderSettings(), loss_curvature=None):
    """Tiled, differentiable CPU splatting of 2D Gaussians (3DGS conventions).

    means2d (B, K, 2) pixel coordinates, x right, y down, pixel centres at i + 0.5;
    conics (B, K, 3) upper triangle (a, b, c) of the inverse 2D covariance;
    colors (B, K, C); opacities (B, K); depths (B, K), ascending = front first,
    ties in index order; background None, (C,) or (B, C).
    Returns image (B, C, H, W) and alpha (B, H, W) = 1 - final transmittance.
    Differentiable in means2d, conics, colors, opacities and background; the
    depths only order the Gaussians, and get the depth-order gradient when
    settings.depth_tau > 0 (with loss_curvature (B, H, W); see `gmae.render.rasterize`). settings: a
    `gmae.render.RenderSettings` with sorted compositing (its max_alpha, depth_tau and tile_cut are used).
    """
    validate_inputs(means2d, conics, colors, opacities, depths, height, width, background, settings, loss_curvature)
    return _RasterizeCPU.apply(means2d, conics, colors, opacities, depths, background, height, width,
                               float(settings.max_alpha), float(settings.depth_tau), loss_curvature, settings.tile_cut)
