"""Degenerate Gaussians never crash a renderer or poison its image or gradients.

Policy (every CPU backend and the projection): a Gaussian with any non-finite
parameter (mean, conic, colour, opacity, depth; scale or rotation before
projection) is culled: it renders exactly like an invisible one and gets a zero
gradient. Finite extremes (0, 1e±30, negative opacities, zero scales, an
all-zero quaternion) give finite images, alpha in [0, 1] and finite gradients.
The scenes mix ordinary values with 0, ±inf, NaN, ±1e30 and ±1e-30 in any
parameter (hypothesis).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmae.render import RenderSettings, project_orthographic, rasterize

pytest.importorskip("numba")

BACKENDS = ("torch", "cpu")
H, W = 20, 36  # several tiles, neither side a multiple of 16
B, K = 2, 6
SPECIAL = [0.0, math.inf, -math.inf, math.nan, 1e30, -1e30, 1e-30, -1e-30]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def screen_scene(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Ordinary screen-space Gaussians: means2d, conics, colors, opacities, depths."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    means = torch.stack([u(B, K, lo=-4, hi=W + 4), u(B, K, lo=-4, hi=H + 4)], dim=-1)
    sx, sy, th = u(B, K, lo=1, hi=8), u(B, K, lo=1, hi=8), u(B, K, hi=math.pi)
    c, s = th.cos(), th.sin()
    # Σ = R diag(sx², sy²) Rᵀ, conic = Σ⁻¹
    a = c * c / sx**2 + s * s / sy**2
    b = c * s * (1 / sx**2 - 1 / sy**2)
    d = s * s / sx**2 + c * c / sy**2
    return {
        "means2d": means.to(dtype),
        "conics": torch.stack([a, b, d], dim=-1).to(dtype),
        "colors": u(B, K, 3).to(dtype),
        "opacities": u(B, K, lo=0.2, hi=1.0).to(dtype),
        "depths": u(B, K).to(dtype),
    }


def world_scene(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Ordinary 3D Gaussians: means, scales, quats, colors, opacities."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    return {
        "means": u(B, K, 3, lo=-1, hi=1).to(dtype),
        "scales": u(B, K, 3, lo=0.02, hi=0.3).to(dtype),
        "quats": torch.randn(B, K, 4, generator=g, dtype=torch.float64).to(dtype),
        "colors": u(B, K, 3).to(dtype),
        "opacities": u(B, K, lo=0.2, hi=1.0).to(dtype),
    }


def poke(scene: dict[str, torch.Tensor], pokes) -> dict[str, torch.Tensor]:
    """Copy of `scene` with scene[name].flatten()[i % numel] = value for each poke."""
    scene = {k: v.clone() for k, v in scene.items()}
    for name, index, value in pokes:
        if name == "zero_quat":  # an all-zero quaternion
            scene["quats"].view(-1, 4)[index % (B * K)] = 0.0
        else:
            flat = scene[name].view(-1)
            flat[index % flat.numel()] = value
    return scene


def pokes_for(names):
    return st.lists(
        st.tuples(st.sampled_from(names), st.integers(0, 10_000), st.sampled_from(SPECIAL)),
        min_size=1, max_size=12,
    )


def finite_gaussian(scene: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K) True where every parameter of the Gaussian is finite."""
    ok = torch.ones(B, K, dtype=torch.bool)
    for t in scene.values():
        ok &= torch.isfinite(t).reshape(B, K, -1).all(-1)
    return ok


def render_with_grads(scene, backend, background, grad_names):
    """Render, then backpropagate a fixed random weighting of image and alpha."""
    leaves = {k: v.clone().requires_grad_(k in grad_names) for k, v in scene.items()}
    image, alpha = rasterize(leaves["means2d"], leaves["conics"], leaves["colors"], leaves["opacities"], leaves["depths"], height=H, width=W, background=background, settings=RenderSettings(backend=backend))
    g = torch.Generator().manual_seed(123)
    w_img = torch.rand(image.shape, generator=g, dtype=torch.float64).to(image.dtype)
    w_alpha = torch.rand(alpha.shape, generator=g, dtype=torch.float64).to(alpha.dtype)
    ((image * w_img).sum() + (alpha * w_alpha).sum()).backward()
    return image.detach(), alpha.detach(), {k: leaves[k].grad for k in grad_names}


def check_image(image, alpha, colors, ok, background):
    assert torch.isfinite(image).all() and torch.isfinite(alpha).all()
    assert (alpha >= 0).all() and (alpha <= 1).all()
    # each pixel is a convex combination of the visible colours and the background
    # (or of the colours and 0 without a background)
    finite_colors = colors[ok]
    extra = background.reshape(-1, 3) if background is not None else torch.zeros(1, 3, dtype=colors.dtype)
    pool = torch.cat([finite_colors, extra.to(colors.dtype)]).double()
    lo, hi = pool.min(0).values, pool.max(0).values
    tol = 1e-4 + 1e-5 * pool.abs().max()
    img = image.double()
    assert (img >= lo[None, :, None, None] - tol).all() and (img <= hi[None, :, None, None] + tol).all()


backgrounds = st.sampled_from([None, "white", "random"])


def make_background(kind, dtype):
    if kind is None:
        return None
    if kind == "white":
        return torch.ones(3, dtype=dtype)
    return torch.rand(B, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- rasterize


SCREEN = ["means2d", "conics", "colors", "opacities", "depths"]
DIFFERENTIABLE = ["means2d", "conics", "colors", "opacities"]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=st.integers(0, 2**16), pokes=pokes_for(SCREEN), bg=backgrounds,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rasterize_degenerate_parameters(backend, seed, pokes, bg, dtype):
    clean = screen_scene(seed, dtype)
    scene = poke(clean, pokes)
    background = make_background(bg, dtype)
    ok = finite_gaussian(scene)
    image, alpha, grads = render_with_grads(scene, backend, background, DIFFERENTIABLE)
    check_image(image, alpha, scene["colors"], ok, background)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert (grad[~ok] == 0).all(), name  # culled: exactly no gradient

    # Not poisoned: a Gaussian with a non-finite parameter renders exactly like
    # one with opacity 0 (and finite, ordinary other parameters).
    invisible = {k: v.clone() for k, v in scene.items()}
    for name in SCREEN:
        invisible[name][~ok] = clean[name][~ok]
    invisible["opacities"][~ok] = 0.0
    image2, alpha2 = rasterize(*(invisible[k] for k in SCREEN), height=H, width=W, background=background, settings=RenderSettings(backend=backend))
    assert torch.equal(image, image2) and torch.equal(alpha, alpha2)


# --------------------------------------------------------------------------- project + rasterize


WORLD = ["means", "scales", "quats", "colors", "opacities"]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=st.integers(0, 2**16), pokes=pokes_for(WORLD + ["zero_quat"]), bg=backgrounds,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_project_and_rasterize_degenerate_parameters(backend, seed, pokes, bg, dtype):
    scene = poke(world_scene(seed, dtype), pokes)
    background = make_background(bg, dtype)
    ok = finite_gaussian(scene)
    leaves = {k: v.clone().requires_grad_() for k, v in scene.items()}
    means2d, conics, depths = project_orthographic(leaves["means"], leaves["scales"], leaves["quats"], H, W)
    for t in (means2d, conics, depths):
        assert torch.isfinite(t).all()
    # finite geometry (zero scales and zero quaternions included) gives a conic
    # with a positive diagonal; non-finite geometry the culled marker (zero conic)
    geometry = finite_gaussian({k: scene[k] for k in ("means", "scales", "quats")})
    a, b, c = conics.detach().unbind(-1)
    assert ((a > 0) & (c > 0))[geometry].all()
    assert (conics.detach()[~geometry] == 0).all()

    image, alpha = rasterize(means2d, conics, leaves["colors"], leaves["opacities"], depths, height=H, width=W, background=background, settings=RenderSettings(backend=backend))
    check_image(image.detach(), alpha.detach(), scene["colors"], ok, background)
    g = torch.Generator().manual_seed(7)
    w = torch.rand(image.shape, generator=g, dtype=torch.float64).to(dtype)
    ((image * w).sum() + alpha.sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), name
        assert (leaf.grad[~ok] == 0).all(), name


# --------------------------------------------------------------------------- explicit cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_scale_and_zero_quaternion_project_to_finite_conics(dtype):
    means = torch.zeros(1, 3, 3, dtype=dtype, requires_grad=True)
    scales = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.0, 0.2], [0.1, 0.1, 0.1]]], dtype=dtype, requires_grad=True)
    quats = torch.tensor([[[1.0, 0, 0, 0], [0.3, 0.1, 0.2, 0.4], [0.0, 0, 0, 0]]], dtype=dtype, requires_grad=True)
    means2d, conics, depths = project_orthographic(means, scales, quats, 16, 16)
    assert torch.isfinite(conics).all()
    # a zero-size Gaussian is the 0.3 px² dilation: conic = I / 0.3
    torch.testing.assert_close(conics[0, 0], torch.tensor([1 / 0.3, 0.0, 1 / 0.3], dtype=dtype))
    # a zero quaternion is the identity rotation
    _, ref, _ = project_orthographic(means[:, 2:], scales[:, 2:], torch.tensor([[[1.0, 0, 0, 0]]], dtype=dtype), 16, 16)
    torch.testing.assert_close(conics[0, 2], ref[0, 0])
    (means2d.sum() + conics.sum() + depths.sum()).backward()
    for t in (means, scales, quats):
        assert torch.isfinite(t.grad).all()


def test_huge_scale_covers_the_screen_instead_of_vanishing():
    """In float32 a scale of 1e30 would overflow Σ2; it is clamped and renders
    as a uniform layer of its opacity, like any scale far beyond the image."""
    for scale in (1e3, 1e30):
        means = torch.zeros(1, 1, 3)
        scales = torch.full((1, 1, 3), scale)
        quats = torch.tensor([[[1.0, 0.2, 0.0, 0.1]]])
        means2d, conics, depths = project_orthographic(means, scales, quats, 32, 32)
        for backend in BACKENDS:
            _, alpha = rasterize(means2d, conics, torch.ones(1, 1, 3), torch.full((1, 1), 0.5), depths, height=32, width=32, settings=RenderSettings(backend=backend))
            torch.testing.assert_close(alpha, torch.full((1, 32, 32), 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SCREEN)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_one_non_finite_parameter_culls_that_gaussian(backend, name, value):
    scene = screen_scene(3, torch.float32)
    # Gaussian 0 of image 0 covers the middle of the image
    scene["means2d"][0, 0] = torch.tensor([W / 2, H / 2])
    scene["opacities"][0, 0] = 0.9
    bad = {k: v.clone() for k, v in scene.items()}
    bad[name][0, 0] = value
    image, alpha, grads = render_with_grads(bad, backend, None, DIFFERENTIABLE)
    gone = {k: v.clone() for k, v in scene.items()}
    gone["opacities"][0, 0] = 0.0
    image2, alpha2 = rasterize(*(gone[k] for k in SCREEN), height=H, width=W, settings=RenderSettings(backend=backend))
    assert torch.equal(image, image2) and torch.equal(alpha, alpha2)
    for g in grads.values():
        assert torch.isfinite(g).all() and (g[0, 0] == 0).all()


def test_extreme_conics_do_not_leak_nan_into_gradients():
    """Finite but extreme conics make q overflow to inf away from the mean; those
    pixels have alpha 0 and must give a zero gradient, not 0·inf = NaN."""
    big = 3e37
    scene = screen_scene(4, torch.float32)
    scene["means2d"][0, 0] = torch.tensor([10.5, 10.5])
    scene["conics"][0, 0] = torch.tensor([big, 0.0, big])  # a point; q = inf off centre
    scene["means2d"][0, 1] = torch.tensor([20.5, 8.5])
    scene["conics"][0, 1] = torch.tensor([big, 0.0, 1e-6])  # a vertical line; q = inf off it
    scene["opacities"][0, :2] = 0.8
    scene["depths"][0, :2] = -1.0  # in front
    for backend in BACKENDS:
        image, alpha, grads = render_with_grads(scene, backend, torch.ones(3), DIFFERENTIABLE)
        assert torch.isfinite(image).all() and torch.isfinite(alpha).all()
        for name, g in grads.items():
            assert torch.isfinite(g).all(), (backend, name)
        # the point still lights the pixel whose centre it sits on, the line its column
        assert alpha[0, 10, 10] >= 0.8 - 1e-6 and (alpha[0, :, 20] >= 0.8 - 1e-6).all()
