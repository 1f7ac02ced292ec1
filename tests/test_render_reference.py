"""The reference rasterizer against a literal per-pixel reading of the contract."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import gmae.render as render
from gmae.errors import GMAEError
from gmae.render import RenderSettings, reference

F64 = torch.float64


# --------------------------------------------------------------------------- #
# Oracle for the oracle: the contract, written as a per-pixel Python loop.
# --------------------------------------------------------------------------- #
def brute_force(means2d, conics, colors, opacities, depths, H, W, background=None, max_alpha=0.99):
    B, K, C = colors.shape
    image = torch.zeros(B, C, H, W, dtype=F64)
    alpha = torch.zeros(B, H, W, dtype=F64)
    for b in range(B):
        m, con, col = means2d[b].tolist(), conics[b].tolist(), colors[b].tolist()
        op, dep = opacities[b].tolist(), depths[b].tolist()
        order = sorted(range(K), key=lambda i: dep[i])  # Python's sort is stable
        if background is None:
            bg = [0.0] * C
        elif background.dim() == 1:
            bg = background.tolist()
        else:
            bg = background[b].tolist()
        for y in range(H):
            for x in range(W):
                T, out = 1.0, [0.0] * C
                for i in order:
                    a, bb, c = con[i]
                    values = [a, bb, c, *m[i], op[i]]
                    # Degenerate / non-finite Gaussians are culled.
                    if not all(math.isfinite(v) for v in values) or a <= 0 or a * c - bb * bb <= 0:
                        continue
                    dx, dy = x + 0.5 - m[i][0], y + 0.5 - m[i][1]
                    q = a * dx * dx + 2 * bb * dx * dy + c * dy * dy
                    al = min(max_alpha, op[i] * math.exp(-0.5 * q))
                    if al < 1.0 / 255.0:
                        continue
                    next_T = T * (1.0 - al)
                    if next_T < 1e-4:
                        break
                    for ch in range(C):
                        out[ch] += col[i][ch] * al * T
                    T = next_T
                for ch in range(C):
                    image[b, ch, y, x] = out[ch] + T * bg[ch]
                alpha[b, y, x] = 1.0 - T
    return image, alpha


def conics_from(sx, sy, theta):
    """Conic (a, b, c) of a Gaussian with stds sx, sy rotated by theta."""
    c, s = torch.cos(theta), torch.sin(theta)
    vxx = c * c * sx**2 + s * s * sy**2
    vyy = s * s * sx**2 + c * c * sy**2
    vxy = c * s * (sx**2 - sy**2)
    det = vxx * vyy - vxy**2
    return torch.stack([vyy / det, -vxy / det, vxx / det], dim=-1)


def random_scene(seed, B, K, H, W, C, smin=0.3, smax=6.0, omin=0.05, omax=1.0, margin=3.0):
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=F64)  # noqa: E731
    means = torch.stack(
        [u(B, K) * (W + 2 * margin) - margin, u(B, K) * (H + 2 * margin) - margin], dim=-1
    )
    sx, sy = smin + (smax - smin) * u(B, K), smin + (smax - smin) * u(B, K)
    conics = conics_from(sx, sy, u(B, K) * math.pi)
    colors = u(B, K, C)
    opac = omin + (omax - omin) * u(B, K)
    depths = u(B, K)
    return means, conics, colors, opac, depths


def render_torch(means, conics, colors, opac, depths, H, W, **kw):
    return render.rasterize(means, conics, colors, opac, depths, height=H, width=W, **kw, settings=RenderSettings(backend="torch"))


def assert_matches_brute(scene, H, W, **kw):
    img, alpha = render_torch(*scene, H, W, **kw)
    ref_img, ref_alpha = brute_force(*scene, H, W, **kw)
    torch.testing.assert_close(img, ref_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-6, rtol=0)
    return img, alpha


# --------------------------------------------------------------------------- #
# Agreement with the brute force
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed,C,K", [(0, 1, 12), (1, 3, 12), (2, 4, 9), (3, 3, 5)])
def test_random_scenes_match_brute_force(seed, C, K):
    scene = random_scene(seed, B=2, K=K, H=9, W=13, C=C)
    img, alpha = assert_matches_brute(scene, 9, 13)
    assert img.shape == (2, C, 9, 13) and alpha.shape == (2, 9, 13)
    assert alpha.max() > 0.3  # the scene is not empty


@pytest.mark.parametrize("bg_kind", ["none", "C", "BC"])
def test_background_variants(bg_kind):
    scene = random_scene(10, B=2, K=6, H=9, W=13, C=3, omax=0.8)
    bg = {"none": None, "C": torch.tensor([0.2, 0.5, 1.0], dtype=F64),
          "BC": torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.7, 0.3]], dtype=F64)}[bg_kind]
    img, alpha = assert_matches_brute(scene, 9, 13, background=bg)
    if bg is not None:
        # out = Σ cαT + T·bg, so the background term is exactly (1-alpha)·bg.
        img0, _ = render_torch(*scene, 9, 13)
        bgb = bg.expand(2, 3)
        torch.testing.assert_close(img - img0, (1 - alpha)[:, None] * bgb[:, :, None, None])


def test_non_multiple_of_tile_sizes_and_tile_crossing():
    # 17×35: three tiles across, two down; Gaussians straddle tile borders.
    scene = random_scene(4, B=1, K=8, H=17, W=35, C=3, smin=1.0, smax=7.0)
    assert_matches_brute(scene, 17, 35)


def test_huge_and_subpixel_gaussians():
    means = torch.tensor([[[6.3, 4.1], [2.0, 7.7], [10.2, 3.3], [6.5, 4.5]]], dtype=F64)
    std = torch.tensor([[200.0, 0.1, 0.05, 30.0]], dtype=F64)
    conics = conics_from(std, std * torch.tensor([[0.5, 1.0, 3.0, 0.2]], dtype=F64),
                         torch.tensor([[0.3, 0.0, 1.0, 2.0]], dtype=F64))
    colors = torch.rand(1, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    opac = torch.tensor([[0.4, 0.95, 0.9, 0.5]], dtype=F64)
    depths = torch.tensor([[0.5, 0.1, 0.2, 0.3]], dtype=F64)
    img, alpha = assert_matches_brute((means, conics, colors, opac, depths), 9, 13)
    # The huge Gaussian covers every pixel (α ≈ 0.4 everywhere).
    assert alpha.min() > 0.39


def test_off_screen_gaussians_contribute_nothing():
    means = torch.tensor([[[-40.0, 4.0], [60.0, 4.0], [6.0, -50.0], [6.0, 90.0]]], dtype=F64)
    conics = conics_from(torch.full((1, 4), 2.0, dtype=F64), torch.full((1, 4), 2.0, dtype=F64),
                         torch.zeros(1, 4, dtype=F64))
    scene = (means, conics, torch.ones(1, 4, 3, dtype=F64), torch.ones(1, 4, dtype=F64),
             torch.arange(4, dtype=F64)[None])
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    img, alpha = assert_matches_brute(scene, 9, 13, background=bg)
    assert torch.all(alpha == 0)
    torch.testing.assert_close(img, bg.view(1, 3, 1, 1).expand(1, 3, 9, 13))
    # And one partially on screen does reach in.
    means[0, 0] = torch.tensor([-2.0, 4.0])
    _, alpha = assert_matches_brute(scene, 9, 13, background=bg)
    assert alpha[0, 4, 0] > 0.3


def test_single_gaussian_closed_form():
    H, W = 9, 13
    mean = torch.tensor([[[5.2, 3.7]]], dtype=F64)
    conic = conics_from(torch.tensor([[2.0]], dtype=F64), torch.tensor([[1.5]], dtype=F64),
                        torch.tensor([[0.4]], dtype=F64))
    color = torch.tensor([[[0.3, 0.6]]], dtype=F64)
    o = torch.tensor([[0.8]], dtype=F64)
    img, alpha = render_torch(mean, conic, color, o, torch.zeros(1, 1, dtype=F64), H, W)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=F64) + 0.5, torch.arange(W, dtype=F64) + 0.5, indexing="ij")
    dx, dy = xs - 5.2, ys - 3.7
    a, b, c = conic[0, 0]
    expected = (0.8 * torch.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))).clamp_max(0.99)
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    torch.testing.assert_close(alpha[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(img[0], color[0, 0][:, None, None] * expected, atol=1e-12, rtol=0)


def test_zero_opacity_gives_background():
    scene = list(random_scene(5, B=2, K=7, H=9, W=13, C=3))
    scene[3] = torch.zeros(2, 7, dtype=F64)
    bg = torch.tensor([0.5, 0.25, 1.0], dtype=F64)
    img, alpha = render_torch(*scene, 9, 13, background=bg)
    assert torch.all(alpha == 0)
    torch.testing.assert_close(img, bg.view(1, 3, 1, 1).expand(2, 3, 9, 13))


def test_early_stop_with_full_opacity():
    # Five big opaque Gaussians stacked at the image centre. At the centre
    # α = 0.99 each: T goes 1 → 0.01 → 1e-4 (still ≥ 1e-4, kept) and the third
    # would bring it to 1e-6 < 1e-4, so it and all later ones are excluded.
    H, W, K = 9, 13, 5
    means = torch.tensor([[6.5, 4.5]], dtype=F64).expand(1, K, 2).clone()
    std = torch.full((1, K), 8.0, dtype=F64)
    conics = conics_from(std, std, torch.zeros(1, K, dtype=F64))
    colors = torch.rand(1, K, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    opac = torch.ones(1, K, dtype=F64)
    depths = torch.arange(K, dtype=F64)[None]
    img, alpha = assert_matches_brute((means, conics, colors, opac, depths), H, W)
    assert alpha[0, 4, 6] >= 1 - 1.0001e-4
    assert alpha.min() > 0.99
    # Later Gaussians contribute nothing at the centre: recolouring them is invisible there.
    recoloured = colors.clone()
    recoloured[0, 2:] = torch.tensor([5.0, -3.0, 7.0], dtype=F64)
    img2, _ = render_torch(means, conics, recoloured, opac, depths, H, W)
    torch.testing.assert_close(img2[0, :, 4, 6], img[0, :, 4, 6], atol=0, rtol=0)
    expected = colors[0, 0] * 0.99 + colors[0, 1] * 0.99 * (1 - 0.99)
    torch.testing.assert_close(img[0, :, 4, 6], expected, atol=1e-12, rtol=0)
    # ...but they do contribute near the corners where α < 0.99.
    assert not torch.equal(img2[0, :, 0, 0], img[0, :, 0, 0])


def test_identical_depths_lower_index_in_front():
    H, W = 9, 13
    means = torch.tensor([[[6.5, 4.5], [6.5, 4.5]]], dtype=F64)
    std = torch.full((1, 2), 3.0, dtype=F64)
    conics = conics_from(std, std, torch.zeros(1, 2, dtype=F64))
    colors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    opac = torch.full((1, 2), 0.9, dtype=F64)
    depths = torch.full((1, 2), 0.5, dtype=F64)
    img, _ = render_torch(means, conics, colors, opac, depths, H, W)
    # Index 0 (red) is in front: 0.9 red, then 0.9·0.1 green.
    torch.testing.assert_close(img[0, :, 4, 6], torch.tensor([0.9, 0.09], dtype=F64))
    img_swapped, _ = render_torch(means, conics, colors.flip(1), opac, depths, H, W)
    torch.testing.assert_close(img_swapped[0, :, 4, 6], torch.tensor([0.09, 0.9], dtype=F64))
    # Many ties in a random scene follow the stable order too.
    scene = list(random_scene(6, B=2, K=10, H=9, W=13, C=3))
    scene[4] = torch.tensor([[0.0, 1.0] * 5, [0.3] * 10], dtype=F64)
    assert_matches_brute(tuple(scene), 9, 13)


def _one_gaussian(mx, my, sx, sy):
    conics = conics_from(torch.tensor([[sx]], dtype=F64), torch.tensor([[sy]], dtype=F64), torch.zeros(1, 1, dtype=F64))
    return (torch.tensor([[[mx, my]]], dtype=F64), conics, torch.ones(1, 1, 1, dtype=F64),
            torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64))


def test_culling_is_opacity_aware_beyond_3_sigma():
    # Opacity 1: at 3.2σ, α = exp(-5.12) ≈ 0.00598 ≥ 1/255, so it must be drawn;
    # at 3.6σ, α = exp(-6.48) ≈ 0.00153 < 1/255 and it is skipped.
    at_3_2 = math.exp(-0.5 * 3.2**2)
    # σ = 10 px centred at x = 16.5: the 3.2σ pixel (x = 48) is the first pixel
    # of tile 3, while a 3σ(+1 px) box would end at 47.5, inside tile 2.
    _, alpha = render_torch(*_one_gaussian(16.5, 8.5, 10.0, 10.0), 20, 64)
    assert alpha[0, 8, 48] == pytest.approx(at_3_2, abs=1e-12)
    assert alpha[0, 8, 52] == 0.0  # 3.6σ
    # σ = 2.5 px: 3.2σ = 8 px, right and below, across tile borders.
    _, alpha = render_torch(*_one_gaussian(12.5, 8.5, 2.5, 2.5), 20, 40)
    assert alpha[0, 8, 20] == pytest.approx(at_3_2, abs=1e-12)
    assert alpha[0, 16, 12] == pytest.approx(at_3_2, abs=1e-12)
    assert alpha[0, 8, 21] == 0.0 and alpha[0, 8, 3] == 0.0  # 3.6σ either side
    # Anisotropic: the long axis (σy = 10) reaches 3.2σ = 32 px down, into tile row 2.
    _, alpha = render_torch(*_one_gaussian(6.5, 0.5, 1.0, 10.0), 40, 16)
    assert alpha[0, 32, 6] == pytest.approx(at_3_2, abs=1e-12)


def test_degenerate_and_nan_conics_are_culled():
    scene = list(random_scene(7, B=1, K=6, H=9, W=13, C=3))
    conics = scene[1].clone()
    conics[0, 0] = torch.tensor([1.0, 2.0, 1.0])  # det < 0
    conics[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # det = 0
    conics[0, 2] = torch.tensor([float("nan"), 0.0, 1.0])
    conics[0, 3] = torch.tensor([-1.0, 0.0, -1.0])  # negative definite
    scene[1] = conics
    img, alpha = assert_matches_brute(tuple(scene), 9, 13)
    assert torch.isfinite(img).all() and torch.isfinite(alpha).all()
    # Only Gaussians 4 and 5 remain.
    keep = [4, 5]
    img2, _ = render_torch(*(t[:, keep] for t in scene), 9, 13)
    torch.testing.assert_close(img, img2, atol=0, rtol=0)


def test_float32_matches_float64():
    scene = random_scene(8, B=2, K=12, H=20, W=24, C=3)
    img64, a64 = render_torch(*scene, 20, 24)
    img32, a32 = render_torch(*(t.float() for t in scene), 20, 24)
    assert img32.dtype == torch.float32
    torch.testing.assert_close(img32.double(), img64, atol=2e-5, rtol=0)
    torch.testing.assert_close(a32.double(), a64, atol=2e-5, rtol=0)


def test_no_gaussians():
    z = torch.zeros(2, 0, dtype=F64)
    img, alpha = render_torch(torch.zeros(2, 0, 2, dtype=F64), torch.zeros(2, 0, 3, dtype=F64),
                              torch.zeros(2, 0, 3, dtype=F64), z, z, 5, 7,
                              background=torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    assert torch.all(alpha == 0)
    torch.testing.assert_close(img[:, :, 2, 3], torch.tensor([[1.0, 0.5, 0.0]] * 2, dtype=F64))


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def test_gradcheck():
    # Smooth regime: big Gaussians (α ≫ 1/255 on every pixel), opacities
    # 0.3-0.7 so neither the clamp nor the early stop is near.
    H, W, K, C = 6, 7, 3, 2
    g = torch.Generator().manual_seed(0)
    means = (torch.rand(1, K, 2, generator=g, dtype=F64) * torch.tensor([W, H], dtype=F64)).requires_grad_()
    std = 4.0 + torch.rand(1, K, generator=g, dtype=F64)
    conics = conics_from(std, 0.8 * std, torch.rand(1, K, generator=g, dtype=F64) * 3).requires_grad_()
    colors = torch.rand(1, K, C, generator=g, dtype=F64).requires_grad_()
    opac = (0.3 + 0.4 * torch.rand(1, K, generator=g, dtype=F64)).requires_grad_()
    bg = torch.tensor([0.2, 0.9], dtype=F64, requires_grad=True)
    depths = torch.rand(1, K, generator=g, dtype=F64)

    def fn(m, con, col, o, b):
        img, alpha = render_torch(m, con, col, o, depths, H, W, background=b)
        return img, alpha

    assert torch.autograd.gradcheck(fn, (means, conics, colors, opac, bg), eps=1e-6, atol=1e-6)


def test_depths_not_differentiated():
    scene = list(random_scene(9, B=1, K=4, H=9, W=13, C=3))
    scene[0].requires_grad_()
    scene[4].requires_grad_()
    img, _ = render_torch(*scene, 9, 13)
    img.sum().backward()
    assert scene[0].grad is not None and scene[0].grad.abs().sum() > 0
    assert scene[4].grad is None


# --------------------------------------------------------------------------- #
# Memory bound: chunking
# --------------------------------------------------------------------------- #
def test_chunk_budget_does_not_change_results_and_bounds_work(monkeypatch):
    B, K, H, W = 2, 256, 224, 224
    torch.manual_seed(0)
    means = torch.rand(B, K, 2) * torch.tensor([W, H])
    std = 2.0 + 6.0 * torch.rand(B, K)
    conics = conics_from(std, std * (0.5 + 0.5 * torch.rand(B, K)), torch.rand(B, K) * 3)
    colors, opac, depths = torch.rand(B, K, 3), 0.1 + 0.9 * torch.rand(B, K), torch.rand(B, K)
    leaves = [t.clone().requires_grad_() for t in (means, conics, colors, opac)]

    def run():
        for t in leaves:
            t.grad = None
        img, alpha = render_torch(*leaves, depths, H, W)
        (img.square().sum() + alpha.sum()).backward()
        return img.detach(), alpha.detach(), [t.grad.clone() for t in leaves]

    big = run()

    sizes = []
    real = reference._composite_chunk

    def spy(means_, conics_, colors_, opac_, gid, present, px, py, max_alpha):
        sizes.append(gid.numel() * px.shape[1])
        return real(means_, conics_, colors_, opac_, gid, present, px, py, max_alpha)

    budget = 2**14
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(reference, "_composite_chunk", spy)
    small = run()
    # Every chunk stays under the budget (a single oversize tile cannot be split) and
    # nothing near B·K·H·W is ever evaluated at once.
    assert sizes and max(sizes) <= max(budget, 256 * K)
    assert len(sizes) > 10
    assert max(sizes) < B * K * H * W / 100
    for x, y in zip(big[:2], small[:2]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    for x, y in zip(big[2], small[2]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# API: validation and backend selection
# --------------------------------------------------------------------------- #
def test_shape_validation_messages():
    scene = list(random_scene(0, B=2, K=3, H=5, W=5, C=3))
    bad = list(scene)
    bad[1] = scene[1][..., :2]
    with pytest.raises(GMAEError, match=r"conics must have shape \(B, K, 3\)"):
        render_torch(*bad, 5, 5)
    bad = list(scene)
    bad[3] = scene[3][:, :2]
    with pytest.raises(GMAEError, match="opacities must have shape"):
        render_torch(*bad, 5, 5)
    with pytest.raises(GMAEError, match="background must be None or have shape"):
        render_torch(*scene, 5, 5, background=torch.zeros(4, dtype=F64))
    with pytest.raises(GMAEError, match="height must be a positive int"):
        render_torch(*scene, 0, 5)
    with pytest.raises(GMAEError, match="means2d must have shape"):
        render_torch(scene[0][0], *scene[1:], 5, 5)


def test_unknown_backend_lists_valid_names():
    scene = random_scene(0, B=1, K=2, H=5, W=5, C=3)
    with pytest.raises(GMAEError, match=r"unknown or unavailable render backend 'nope'; valid: auto, .*torch"):
        render.rasterize(*scene, height=5, width=5, settings=RenderSettings(backend="nope"))
    assert issubclass(GMAEError, ValueError)


def test_auto_backend_resolution_and_logging(monkeypatch, caplog):
    monkeypatch.setattr(render, "BACKENDS", {"torch": reference.rasterize_torch})
    monkeypatch.setattr(render, "_UNAVAILABLE", {"cpu"})
    monkeypatch.setattr(render, "_LOGGED", set())
    # registering a backend records what it implements: keep the real tables for the other tests
    monkeypatch.setattr(render, "DEPTH_GRAD_BACKENDS", set(render.DEPTH_GRAD_BACKENDS))
    monkeypatch.setattr(render, "WEIGHTED_BACKENDS", set(render.WEIGHTED_BACKENDS))
    monkeypatch.setattr(render, "TILE_CUT_BACKENDS", set(render.TILE_CUT_BACKENDS))
    with caplog.at_level(logging.INFO, logger="gmae.render"):
        assert render.resolve_backend("auto", "cpu") == "torch"
        assert render.resolve_backend("auto", "cpu") == "torch"
    assert sum("'torch'" in r.getMessage() for r in caplog.records) == 1

    calls = []

    def fake_cpu(*args, **kwargs):
        calls.append(kwargs)
        return reference.rasterize_torch(*args, **kwargs)

    render.register_backend("cpu", fake_cpu)
    assert render.resolve_backend("auto", "cpu") == "cpu"
    assert render.resolve_backend("auto", "meta") == "torch"
    scene = random_scene(0, B=1, K=2, H=5, W=5, C=3)
    render.rasterize(*scene, height=5, width=5, settings=RenderSettings(max_alpha=0.999))
    assert calls and calls[0]["settings"].max_alpha == 0.999
