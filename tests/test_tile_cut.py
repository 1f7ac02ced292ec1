"""tile_cut="3sigma": legacy gsplat's tile culling, the render option the authors' model needs.

The 3σ tile box is checked against legacy gsplat's integer arithmetic written out per Gaussian; the torch oracle
with the cut against a dense render that zeroes each Gaussian outside its box; the cpu and triton backends
against the oracle (values and every gradient); and a backend without the cut refuses it in one line.
"""

from __future__ import annotations

import math

import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import BACKENDS, TILE_CUT_BACKENDS, RenderSettings, rasterize, register_backend, resolve_backend
from gmae.render.contract import TILE, sigma3_tile_box
from gmae.render.cpu import rasterize_cpu
from gmae.render.reference import rasterize_torch
from render_scenes import make_scene, render_and_grad

F64 = torch.float64


def legacy_box(mx: float, my: float, conic, tiles_x: int, tiles_y: int):
    """gsplat v0.1.1 helpers.cuh lines 11-68 for one Gaussian, in Python floats and ints: (x0, x1, y0, y1) inclusive."""
    a, b, c = conic
    det = a * c - b * b
    sxx, syy, sxy = c / det, a / det, -b / det  # the covariance gsplat starts from
    half = 0.5 * (sxx + syy)
    v1 = half + math.sqrt(max(0.1, half * half - (sxx * syy - sxy * sxy)))
    radius = math.ceil(3.0 * math.sqrt(v1))
    cx, cy = (mx - 0.5) / TILE, (my - 0.5) / TILE  # gsplat's own frame: pixel i at i
    r = radius / TILE
    lo_x, hi_x = min(max(0, int(cx - r)), tiles_x), min(max(0, int(cx + r + 1)), tiles_x)
    lo_y, hi_y = min(max(0, int(cy - r)), tiles_y), min(max(0, int(cy + r + 1)), tiles_y)
    return lo_x, hi_x - 1, lo_y, hi_y - 1


def opaque_scene(seed=0, k=24, height=48, width=64, dtype=F64):
    """Opaque Gaussians of 2-9 px: their alpha >= 1/255 reaches past 3 sigma, so the cut changes pixels."""
    return make_scene(batch=2, k=k, height=height, width=width, seed=seed, dtype=dtype, std=(2.0, 9.0),
                      opacity=(0.9, 1.0))


def test_the_box_is_legacy_gsplats():
    means, conics, *_ = make_scene(batch=1, k=200, height=70, width=90, seed=4, dtype=F64, std=(0.2, 30.0))
    tiles_x, tiles_y = math.ceil(90 / TILE), math.ceil(70 / TILE)
    x0, x1, y0, y1 = sigma3_tile_box(means[0], conics[0], tiles_x, tiles_y)
    for i in range(200):
        expected = legacy_box(float(means[0, i, 0]), float(means[0, i, 1]), conics[0, i].tolist(), tiles_x, tiles_y)
        assert (int(x0[i]), int(x1[i]), int(y0[i]), int(y1[i])) == expected, i


def test_the_oracle_with_the_cut_is_the_dense_render_of_each_gaussian_in_its_box():
    means, conics, colors, opac, depths = opaque_scene(k=10)
    B, K = opac.shape
    H, W = 48, 64
    image, alpha = rasterize_torch(means, conics, colors, opac, depths, H, W, settings=RenderSettings(tile_cut="3sigma"))
    # dense: every Gaussian at every pixel, its alpha zeroed outside its 3-sigma tiles
    x0, x1, y0, y1 = sigma3_tile_box(means, conics, math.ceil(W / TILE), math.ceil(H / TILE))
    ys, xs = torch.meshgrid(torch.arange(H, dtype=F64) + 0.5, torch.arange(W, dtype=F64) + 0.5, indexing="ij")
    tx, ty = (xs // TILE).reshape(1, 1, -1), (ys // TILE).reshape(1, 1, -1)
    inside = (tx >= x0[..., None]) & (tx <= x1[..., None]) & (ty >= y0[..., None]) & (ty <= y1[..., None])
    order = torch.argsort(depths, dim=1, stable=True)
    take = lambda t: torch.gather(t, 1, order.view(B, K, *[1] * (t.dim() - 2)).expand_as(t))
    m, cn, col, o, ins = take(means), take(conics), take(colors), take(opac), take(inside)
    dx, dy = xs.reshape(1, 1, -1) - m[..., 0:1], ys.reshape(1, 1, -1) - m[..., 1:2]
    q = cn[..., 0:1] * dx * dx + 2 * cn[..., 1:2] * dx * dy + cn[..., 2:3] * dy * dy
    a = (o[..., None] * torch.exp(-0.5 * q)).clamp_max(0.99)
    a = torch.where((a >= 1 / 255) & ins, a, torch.zeros_like(a))
    a = torch.where(torch.cumprod(1 - a, 1) >= 1e-4, a, torch.zeros_like(a))
    t_incl = torch.cumprod(1 - a, 1)
    t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], 1)
    dense = torch.einsum("bkp,bkc->bcp", a * t_excl, col).reshape(B, -1, H, W)
    torch.testing.assert_close(image, dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha, (1 - t_incl[:, -1]).reshape(B, H, W), atol=1e-12, rtol=0)
    full, _ = rasterize_torch(means, conics, colors, opac, depths, H, W)
    assert (full - image).abs().max() > 1e-3  # the cut matters in this scene


def _assert_parity(fn, scene, tol):
    H, W = 48, 64
    fast = render_and_grad(fn, scene, H, W, tile_cut="3sigma")
    ref = render_and_grad(rasterize_torch, scene, H, W, tile_cut="3sigma")
    torch.testing.assert_close(fast[0], ref[0], **tol)
    torch.testing.assert_close(fast[1], ref[1], **tol)
    for name, g, g_r in zip(["means2d", "conics", "colors", "opacities"], fast[2], ref[2]):
        scale = max(1.0, g_r.abs().max().item())
        torch.testing.assert_close(g, g_r, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale,
                                   msg=lambda m: f"d/d{name}: {m}")
    plain = render_and_grad(rasterize_torch, scene, H, W)
    assert (plain[0] - ref[0]).abs().max() > 1e-3  # a scene where the cut changes the image


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cpu_backend_cuts_as_the_oracle(dtype):
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == F64 else dict(atol=1e-5, rtol=1e-5)
    _assert_parity(rasterize_cpu, opaque_scene(seed=1, dtype=dtype), tol)


def test_triton_backend_cuts_as_the_oracle():
    triton_raster = pytest.importorskip("gmae.render.triton_raster", reason="needs triton")
    if not triton_raster.INTERPRETED:
        pytest.skip("CPU tensors need Triton's interpreter")
    _assert_parity(triton_raster.rasterize_triton, opaque_scene(seed=2, k=8, dtype=F64), dict(atol=1e-10, rtol=1e-10))


def test_a_backend_without_the_cut_refuses_it_by_name():
    assert {"torch", "cpu", "triton"} <= TILE_CUT_BACKENDS and "gsplat" not in TILE_CUT_BACKENDS
    register_backend("plain_test", rasterize_torch)
    try:
        scene = opaque_scene(k=4)
        with pytest.raises(GMAEError, match="plain_test.*3-sigma tile cut"):
            rasterize(*scene, height=48, width=64, settings=RenderSettings(backend="plain_test", tile_cut="3sigma"))
        assert resolve_backend("auto", "cpu", tile_cut=True) in TILE_CUT_BACKENDS
        with pytest.raises(GMAEError, match="tile_cut must be one of alpha, 3sigma"):
            rasterize(*scene, height=48, width=64, settings=RenderSettings(backend="torch", tile_cut="5sigma"))
    finally:
        BACKENDS.pop("plain_test")
