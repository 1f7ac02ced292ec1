"""The numba CPU rasterizer (backend "cpu") against the PyTorch reference.

Values and gradients must match `gmae.render.reference.rasterize_torch` (the
oracle) to float tolerance on random scenes and on the edge cases of the
rendering contract; a dense per-pixel formula with no culling at all checks
that the tile/ellipse culling never drops a contribution; gradcheck checks the
hand-written backward in float64; two runs must agree bitwise.
"""

from __future__ import annotations

import math

import numba
import pytest
import torch

from gmae.render import RenderSettings
from gmae.render.cpu import rasterize_cpu
from gmae.render.reference import rasterize_torch
from render_scenes import conic_of, make_scene, render_and_grad

F32 = dict(atol=1e-5, rtol=1e-5)
F64 = dict(atol=1e-10, rtol=1e-10)


def assert_parity(scene, height, width, background=None, max_alpha=0.99):
    """cpu backend == reference, values and gradients."""
    tol = F64 if scene[0].dtype == torch.float64 else F32
    img, alpha, grads = render_and_grad(rasterize_cpu, scene, height, width, background, max_alpha)
    img_r, alpha_r, grads_r = render_and_grad(rasterize_torch, scene, height, width, background,
                                              max_alpha)
    assert img.shape == img_r.shape and alpha.shape == alpha_r.shape
    assert img.dtype == img_r.dtype
    torch.testing.assert_close(img, img_r, **tol)
    torch.testing.assert_close(alpha, alpha_r, **tol)
    names = ["means2d", "conics", "colors", "opacities", "background"]
    for name, g, g_r in zip(names, grads, grads_r):
        # gradients are sums over many pixels: compare relative to their scale
        scale = max(1.0, g_r.abs().max().item())
        torch.testing.assert_close(g, g_r, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale,
                                   msg=lambda m: f"d/d{name}: {m}")
    return img, alpha


def dense_oracle(means2d, conics, colors, opacities, depths, height, width, background=None,
                 max_alpha=0.99):
    """The contract evaluated at every pixel for every Gaussian (no culling)."""
    order = torch.argsort(depths, dim=1, stable=True)
    take = lambda t: torch.gather(t, 1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand_as(t))
    means2d, conics, colors, opacities = map(take, (means2d, conics, colors, opacities))
    dt = means2d.dtype
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dt) + 0.5,
                            torch.arange(width, dtype=dt) + 0.5, indexing="ij")
    dx = xs.reshape(1, 1, -1) - means2d[..., 0:1]
    dy = ys.reshape(1, 1, -1) - means2d[..., 1:2]
    a, b, c = (conics[..., i:i + 1] for i in range(3))
    q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
    alpha = (opacities[..., None] * torch.exp(-0.5 * q)).clamp_max(max_alpha)
    alpha = torch.where(alpha >= 1.0 / 255.0, alpha, torch.zeros_like(alpha))
    included = torch.cumprod(1.0 - alpha, dim=1) >= 1e-4
    alpha = torch.where(included, alpha, torch.zeros_like(alpha))
    t_incl = torch.cumprod(1.0 - alpha, dim=1)
    t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
    image = torch.einsum("bkp,bkc->bcp", alpha * t_excl, colors)
    t_final = t_incl[:, -1]
    if background is not None:
        image = image + t_final[:, None] * background.reshape(-1, colors.shape[-1], 1)
    shape = (means2d.shape[0], height, width)
    return image.reshape(shape[0], -1, height, width), (1.0 - t_final).reshape(shape)


# --------------------------------------------------------------------------
# parity with the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_scenes_match_reference(seed, dtype):
    scene = make_scene(seed=seed, dtype=dtype)
    background = [None, torch.rand(3, dtype=dtype), torch.rand(2, 3, dtype=dtype)][seed]
    assert_parity(scene, 40, 56, background=background)


@pytest.mark.parametrize(
    "case",
    [
        dict(channels=1, batch=1, height=23, width=37),  # C=1, B=1, odd sizes
        dict(channels=4, height=16, width=48, background="shared"),  # C=4, whole tiles
        dict(channels=3, height=70, width=17, background="batch", max_alpha=0.999),
        dict(channels=3, k=1, height=33, width=33),  # one Gaussian
        dict(channels=2, k=200, std=(0.1, 0.6), height=30, width=30),  # sub-pixel
        dict(channels=3, k=8, std=(40.0, 200.0), height=24, width=40),  # bigger than image
        dict(channels=3, k=96, opacity=(0.9, 1.0), max_alpha=0.999),  # saturating
    ],
    ids=["C1_B1_odd", "C4_tiles", "tall_bgB_0999", "one", "subpixel", "huge", "saturating"],
)
def test_edge_cases_match_reference(case):
    case = dict(case)
    height, width = case.pop("height", 40), case.pop("width", 56)
    background, max_alpha = case.pop("background", None), case.pop("max_alpha", 0.99)
    scene = make_scene(height=height, width=width, seed=7, **case)
    b, c = scene[2].shape[0], scene[2].shape[2]
    background = {None: None, "shared": torch.rand(c), "batch": torch.rand(b, c)}[background]
    assert_parity(scene, height, width, background=background, max_alpha=max_alpha)


def test_opacity_one_everywhere_stops_early():
    scene = make_scene(k=48, std=(3.0, 8.0), opacity=(1.0, 1.0))
    img, alpha = assert_parity(scene, 40, 56)
    # pixels covered by >= 2 clamped Gaussians stop with T ~ 1e-4
    assert alpha.max() > 0.999


def test_identical_depths_keep_index_order():
    scene = make_scene(k=32, std=(3.0, 8.0), opacity=(0.5, 1.0))
    # four depth levels, many ties in each: index order decides within a level
    scene[4] = torch.floor(scene[4] * 4)
    assert_parity(scene, 40, 56, background=torch.tensor([1.0, 1.0, 1.0]))
    scene[4] = torch.zeros_like(scene[4])  # all tied
    assert_parity(scene, 40, 56)
    # swapping two Gaussians' indices (same depth) changes the picture
    means, conics, colors, opac, depths = scene
    a = dict(height=40, width=56)
    img1, _ = rasterize_cpu(means, conics, colors, opac, depths, **a)
    perm = torch.arange(32).flip(0)
    img2, _ = rasterize_cpu(means[:, perm], conics[:, perm], colors[:, perm], opac[:, perm],
                            depths[:, perm], **a)
    assert not torch.allclose(img1, img2)


def test_zero_opacity_and_offscreen_render_background_only():
    means, conics, colors, opac, depths = make_scene()
    bg = torch.tensor([0.2, 0.5, 0.9])
    for m, o in [(means, torch.zeros_like(opac)),  # invisible
                 (means + 1000.0, opac),  # all far right/below
                 (means - 1000.0, opac)]:  # all far left/above
        img, alpha = assert_parity([m, conics, colors, o, depths], 40, 56, background=bg)
        assert torch.equal(alpha, torch.zeros_like(alpha))
        assert torch.equal(img, bg.view(1, 3, 1, 1).expand_as(img))


def test_no_gaussians():
    scene = [torch.zeros(2, 0, 2), torch.zeros(2, 0, 3), torch.zeros(2, 0, 3),
             torch.zeros(2, 0), torch.zeros(2, 0)]
    bg = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    img, alpha = rasterize_cpu(*scene, height=5, width=7, background=bg)
    assert torch.equal(img, bg.detach().view(1, 3, 1, 1).expand(2, 3, 5, 7))
    assert torch.equal(alpha, torch.zeros(2, 5, 7))
    (img.sum() + alpha.sum()).backward()
    assert torch.equal(bg.grad, torch.full((3,), 70.0))


# --------------------------------------------------------------------------
# culling: exact, opacity-aware ellipses
# --------------------------------------------------------------------------


def test_culling_is_opacity_aware_and_exact():
    """No culling at all (dense formula) must give the same picture: thin,
    rotated, opaque Gaussians whose alpha >= 1/255 region reaches well past
    3 sigma, and a faint one that barely reaches 1/255."""
    conics = torch.tensor([[conic_of(1.0, 1.0), conic_of(0.6, 9.0, 0.7),
                            conic_of(12.0, 0.4, 2.0), conic_of(5.0, 5.0),
                            conic_of(2.0, 0.3, 1.2)]], dtype=torch.float64)
    means = torch.tensor([[[20.5, 20.5], [37.3, 20.1], [30.0, 8.7], [10.2, 30.9],
                           [45.0, 33.0]]], dtype=torch.float64)
    opac = torch.tensor([[1.0, 0.97, 0.8, 0.0045, 1.0]], dtype=torch.float64)
    colors = torch.rand(1, 5, 3, dtype=torch.float64)
    depths = torch.arange(5.0, dtype=torch.float64)[None]
    scene = [means, conics, colors, opac, depths]
    img, alpha = rasterize_cpu(*scene, height=40, width=56)
    img_d, alpha_d = dense_oracle(*scene, 40, 56)
    torch.testing.assert_close(img, img_d, **F64)
    torch.testing.assert_close(alpha, alpha_d, **F64)
    # a unit Gaussian with o = 1 still counts 3.3 sigma away (exp(-3.3^2/2) > 1/255),
    # a fixed 3-sigma cut would drop it; 4.3 sigma away it is skipped
    one = [torch.tensor([[[20.2, 20.5]]]), torch.tensor([[[1.0, 0.0, 1.0]]]),
           torch.ones(1, 1, 1), torch.ones(1, 1), torch.zeros(1, 1)]
    _, alpha = rasterize_cpu(*one, height=40, width=56)
    assert alpha[0, 20, 23].item() == pytest.approx(math.exp(-3.3**2 / 2), rel=1e-5)
    assert alpha[0, 20, 24] == 0 and alpha[0, 20, 16] == 0
    # float32: the same (up to float tolerance) on many random thin ellipses
    scene32 = make_scene(batch=2, k=64, std=(0.3, 12.0), seed=11)
    img, alpha = rasterize_cpu(*scene32, height=40, width=56)
    img_d, alpha_d = dense_oracle(*scene32, 40, 56)
    torch.testing.assert_close(img, img_d, **F32)
    torch.testing.assert_close(alpha, alpha_d, **F32)


def test_degenerate_gaussians_are_culled_not_crashing():
    means, conics, colors, opac, depths = make_scene(k=12, std=(2.0, 6.0), opacity=(0.5, 1.0))
    nan, inf = float("nan"), float("inf")
    conics[0, 0] = torch.tensor([nan, 0.0, 1.0])  # NaN conic
    conics[0, 1] = torch.tensor([1.0, 2.0, 1.0])  # det < 0
    conics[0, 2] = torch.tensor([-1.0, 0.0, -1.0])  # negative definite
    conics[0, 3] = torch.tensor([1.0, 1.0, 1.0])  # det = 0
    means[0, 4] = torch.tensor([inf, 3.0])  # non-finite mean
    means[0, 5] = torch.tensor([1e30, -1e30])  # absurdly far away
    conics[0, 6] = torch.tensor([1e-12, 0.0, 1e-12])  # enormous (covers all)
    conics[0, 7] = torch.tensor([1e12, 0.0, 1e12])  # vanishing
    opac[0, 8] = nan
    conics[1, 0] = torch.tensor([inf, 0.0, 1.0])
    scene = [means, conics, colors, opac, depths]
    img, alpha, grads = render_and_grad(rasterize_cpu, scene, 40, 56,
                                        background=torch.rand(3))
    for t in (img, alpha, *grads):
        assert torch.isfinite(t).all()
    # the culled ones get exactly zero gradient
    for i in (0, 1, 2, 3, 4, 5, 8):
        for g in grads[:4]:
            assert torch.all(g[0, i] == 0)
    # and the valid ones still match the reference (which culls the same set)
    assert_parity(scene, 40, 56)


# --------------------------------------------------------------------------
# gradients and determinism
# --------------------------------------------------------------------------


def test_gradcheck_float64():
    """Smooth scene: low opacities (no clamp, no early stop) and footprints
    that extend past the image (no 1/255 edge for the finite differences)."""
    g = torch.Generator().manual_seed(3)
    k, height, width = 3, 12, 18
    means = torch.tensor([[[4.0, 5.0], [10.0, 7.0], [13.0, 3.5]]], dtype=torch.float64)
    conics = torch.tensor([[conic_of(9.0, 12.0, 0.3), conic_of(14.0, 8.0, 1.1),
                            conic_of(10.0, 10.0)]], dtype=torch.float64)
    colors = torch.rand(1, k, 2, generator=g, dtype=torch.float64)
    opac = torch.tensor([[0.3, 0.5, 0.4]], dtype=torch.float64)
    depths = torch.tensor([[0.5, 0.1, 0.9]], dtype=torch.float64)
    bg = torch.rand(2, generator=g, dtype=torch.float64)

    def fn(means, conics, colors, opac, bg):
        return rasterize_cpu(means, conics, colors, opac, depths, height=height, width=width,
                             background=bg)

    inputs = [t.clone().requires_grad_(True) for t in (means, conics, colors, opac, bg)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_subset_and_noncontiguous_inputs():
    means, conics, colors, opac, depths = make_scene(batch=2, k=16)
    # non-contiguous views of the same values
    colors_t = colors.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    means_nc = torch.cat([means, means], -1)[..., :2]
    assert not colors_t.is_contiguous() and not means_nc.is_contiguous()
    img, alpha = rasterize_cpu(means_nc, conics, colors_t, opac, depths, height=40, width=56)
    img_r, _ = rasterize_torch(means, conics, colors, opac, depths, height=40, width=56)
    torch.testing.assert_close(img, img_r, **F32)
    (g,) = torch.autograd.grad(img.sum(), [colors_t])  # only colours need grad
    colors_r = colors.clone().requires_grad_(True)
    img_r, _ = rasterize_torch(means, conics, colors_r, opac, depths, height=40, width=56)
    (g_r,) = torch.autograd.grad(img_r.sum(), [colors_r])
    torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-4)
    # depths get no gradient, and nothing at all needs one: still works
    with torch.no_grad():
        img2, _ = rasterize_cpu(means, conics, colors, opac, depths, height=40, width=56)
    torch.testing.assert_close(img2, img_r.detach(), **F32)


def test_deterministic_bitwise():
    scene = make_scene(batch=2, k=256, height=64, width=80, std=(1.0, 8.0), seed=5)
    bg = torch.rand(2, 3)
    runs = [render_and_grad(rasterize_cpu, scene, 64, 80, background=bg) for _ in range(2)]
    # per-tile work and a serial reduction: the thread count cannot matter either
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        runs.append(render_and_grad(rasterize_cpu, scene, 64, 80, background=bg))
    finally:
        numba.set_num_threads(threads)
    img1, alpha1, grads1 = runs[0]
    for img2, alpha2, grads2 in runs[1:]:
        assert torch.equal(img1, img2) and torch.equal(alpha1, alpha2)
        for g1, g2 in zip(grads1, grads2):
            assert torch.equal(g1, g2)


def test_dispatch_through_rasterize():
    from gmae.render import rasterize

    scene = make_scene(batch=1, k=8)
    img, alpha = rasterize(*scene, height=40, width=56, settings=RenderSettings(backend="cpu"))
    img_r, alpha_r = rasterize_cpu(*scene, height=40, width=56)
    assert torch.equal(img, img_r) and torch.equal(alpha, alpha_r)
