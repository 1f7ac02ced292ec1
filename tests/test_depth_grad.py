"""The depth-order gradient (``depth_tau > 0``): the torch oracle against a brute-force per-pixel
loop, the loss change it is built from against the renderer with the pair swapped, the numba kernel against
the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import DEPTH_GRAD_BACKENDS, RenderSettings, rasterize, resolve_backend
from gmae.render.contract import ALPHA_MIN, T_MIN

F64 = torch.float64
BACKGROUND = torch.tensor([1.0, 1.0, 1.0], dtype=F64)


def scene(seed, B=1, K=7, H=13, W=11, dtype=F64, std=(1.5, 4.0)):
    """Random screen-space Gaussians, overlapping a lot (so every pixel has several contributors)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(B, K, 2, generator=g, dtype=F64) * torch.tensor([W, H], dtype=F64)
    sd = std[0] + (std[1] - std[0]) * torch.rand(B, K, 2, generator=g, dtype=F64)
    theta = math.pi * torch.rand(B, K, generator=g, dtype=F64)
    c, s = theta.cos(), theta.sin()
    vx, vy = sd[..., 0] ** 2, sd[..., 1] ** 2
    sxx, syy, sxy = c * c * vx + s * s * vy, s * s * vx + c * c * vy, c * s * (vx - vy)
    det = sxx * syy - sxy * sxy
    conics = torch.stack([syy / det, -sxy / det, sxx / det], -1)
    colors = torch.rand(B, K, 3, generator=g, dtype=F64)
    opacities = 0.3 + 0.7 * torch.rand(B, K, generator=g, dtype=F64)
    depths = torch.rand(B, K, generator=g, dtype=F64)
    target = torch.rand(B, 3, H, W, generator=g, dtype=F64)
    weight = torch.rand(B, H, W, generator=g, dtype=F64)  # a per-pixel loss weight, as a mask would give
    return [t.to(dtype) for t in (means, conics, colors, opacities, depths)], target.to(dtype), weight.to(dtype)


def loss_of(image, target, weight):
    """L = Σ w (image − target)²: ∂L/∂image = 2w(image − target), ∂²L/∂image² = 2w."""
    return (weight[:, None] * (image - target) ** 2).sum()


def backend_grads(backend, params, target, weight, tau, background=BACKGROUND):
    leaves = [p.clone().requires_grad_() for p in params]
    H, W = target.shape[-2:]
    bg = None if background is None else background.to(params[0].dtype)
    image, alpha = rasterize(*leaves, height=H, width=W, background=bg, loss_curvature=2 * weight, settings=RenderSettings(backend=backend, depth_tau=tau))
    (loss_of(image, target, weight) + alpha.sum()).backward()
    return image.detach(), alpha.detach(), [leaf.grad for leaf in leaves]


def assert_matches_torch(backend, params, target, weight, tau=0.1, background=BACKGROUND):
    """`backend` == the torch oracle with the depth-order gradient on: image, alpha and the gradients wrt means2d,
    conics, colors, opacities and depths (each relative to its largest entry). Returns both backends' results."""
    ref = backend_grads("torch", params, target, weight, tau, background)
    fast = backend_grads(backend, params, target, weight, tau, background)
    tol = dict(rtol=1e-9, atol=1e-12) if params[0].dtype == F64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[0], ref[0], **tol)
    torch.testing.assert_close(fast[1], ref[1], **tol)
    for name, a, b in zip(["means2d", "conics", "colors", "opacities", "depths"], fast[2], ref[2]):
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=name)
    return ref, fast


# --------------------------------------------------------------------------- brute force


def pixel_contributors(params, b, x, y, max_alpha=0.99):
    """[(k, alpha, T before)] of pixel (x, y) of image b, by the contract, front to back; and T final."""
    means, conics, colors, opacities, depths = params
    order = sorted(range(means.shape[1]), key=lambda k: (depths[b, k].item(), k))
    T, out = 1.0, []
    for k in order:
        dx, dy = x + 0.5 - means[b, k, 0].item(), y + 0.5 - means[b, k, 1].item()
        a, bb, c = conics[b, k].tolist()
        alpha = min(max_alpha, opacities[b, k].item() * math.exp(-0.5 * (a * dx * dx + 2 * bb * dx * dy + c * dy * dy)))
        if alpha < ALPHA_MIN:
            continue
        if T * (1 - alpha) < T_MIN:
            break
        out.append((k, alpha, T))
        T *= 1 - alpha
    return out, T


def composite(contribs, colors, b, T_final, background):
    return sum(colors[b, k] * alpha * T for k, alpha, T in contribs) + T_final * background


def brute_force_pairs(params, target, weight, background=BACKGROUND):
    """Every (image, k_front, k_behind, ΔC, δL) of consecutive contributors, δL = L(C+ΔC) − L(C) exactly."""
    colors = params[2]
    B, _, H, W = target.shape
    pairs = []
    for b in range(B):
        for y in range(H):
            for x in range(W):
                contribs, T_final = pixel_contributors(params, b, x, y)
                C = composite(contribs, colors, b, T_final, background)
                t = target[b, :, y, x]
                w = weight[b, y, x]
                for (i, a_i, T_i), (j, a_j, _) in zip(contribs, contribs[1:]):
                    delta = T_i * a_i * a_j * (colors[b, j] - colors[b, i])
                    change = w * (((C + delta - t) ** 2).sum() - ((C - t) ** 2).sum())
                    pairs.append((b, i, j, delta, change))
    return pairs


# --------------------------------------------------------------------------- tests


def test_swap_change_is_exactly_the_re_rendered_pixel():
    """ΔC = T_i α_i α_j (c_j − c_i) is what compositing the pair the other way round gives."""
    params, target, weight = scene(0)
    colors = params[2]
    checked = 0
    for y in range(0, 13, 3):
        for x in range(0, 11, 3):
            contribs, T_final = pixel_contributors(params, 0, x, y)
            C = composite(contribs, colors, 0, T_final, BACKGROUND)
            for n in range(len(contribs) - 1):
                (i, a_i, T_i), (j, a_j, _) = contribs[n], contribs[n + 1]
                swapped = list(contribs)
                swapped[n], swapped[n + 1] = (j, a_j, T_i), (i, a_i, T_i * (1 - a_j))
                # the Gaussians after the pair see the same transmittance either way
                C_swapped = composite(swapped, colors, 0, T_final, BACKGROUND)
                delta = T_i * a_i * a_j * (colors[0, j] - colors[0, i])
                torch.testing.assert_close(C_swapped, C + delta)
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_matches_brute_force(seed):
    tau = 0.15
    params, target, weight = scene(seed, B=2)
    _, _, grads = backend_grads("torch", params, target, weight, tau)
    pairs = brute_force_pairs(params, target, weight)
    assert len(pairs) > 100
    # brute force: +σ'δL to the front member, −σ'δL to the one behind
    expected = torch.zeros_like(params[4])
    depths = params[4]
    for b, i, j, _, change in pairs:
        p = torch.sigmoid((depths[b, j] - depths[b, i]) / tau)
        expected[b, i] += p * (1 - p) / tau * change
        expected[b, j] -= p * (1 - p) / tau * change
    torch.testing.assert_close(grads[4], expected, rtol=1e-9, atol=1e-12)
    assert grads[4].abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("seed", [6, 7])
def test_the_pairs_loss_change_is_the_renderers_when_the_pair_swaps(seed):
    """δL, the loss change the gradient is built from, against the renderer itself: with two Gaussians every
    pixel both reach has them consecutive, so rendering them with their depths exchanged changes the loss by
    the sum of the pairs' δL (and the gradient is σ'/τ times that sum, + to the front one, − to the other)."""
    params, target, weight = scene(seed, K=2, H=9, W=9, std=(2.0, 4.0))
    means, conics, colors, opacities, depths = params
    pairs = brute_force_pairs(params, target, weight)
    assert len(pairs) > 20 and {(i, j) for _, i, j, _, _ in pairs} == {tuple(torch.argsort(depths[0]).tolist())}

    def loss(z):
        image, _ = rasterize(means, conics, colors, opacities, z, height=9, width=9, background=BACKGROUND, settings=RenderSettings(backend="torch"))
        return loss_of(image, target, weight)

    total = sum(change for *_, change in pairs)
    torch.testing.assert_close(loss(depths.flip(-1)) - loss(depths), total, rtol=1e-9, atol=1e-12)
    assert abs(total) > 1e-3
    tau = 0.2
    _, _, grads = backend_grads("torch", params, target, weight, tau)
    front, back = torch.argsort(depths[0]).tolist()
    p = torch.sigmoid((depths[0, back] - depths[0, front]) / tau)
    torch.testing.assert_close(grads[4][0, front], p * (1 - p) / tau * total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[4][0, back], -p * (1 - p) / tau * total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("background", ["shared", "per-image", None])
@pytest.mark.parametrize("seed", [0, 3])
def test_cpu_kernel_matches_torch(dtype, background, seed):
    # 40 x 36 pixels: several tiles, Gaussians crossing tile borders
    params, target, weight = scene(seed, B=2, K=60, H=40, W=36, dtype=dtype, std=(1.0, 6.0))
    bg = {"shared": BACKGROUND, "per-image": torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.3, 0.9]], dtype=F64),
          None: None}[background]
    ref, _ = assert_matches_torch("cpu", params, target, weight, 0.1, bg)
    assert ref[2][4].abs().max() > 0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_flat_topped_gaussians_render_alike_in_both_backends(dtype):
    """Opacities above 1 (`--max-opacity`): α = min(0.99, o·G) saturates over a core; the kernel's
    culling, skip and clamp rules, values and gradients still match the oracle's."""
    params, target, weight = scene(4, B=2, K=40, H=36, W=36, dtype=dtype, std=(1.0, 5.0))
    params[3] = params[3] * 30.0
    ref = backend_grads("torch", params, target, weight, 0.1)
    cpu = backend_grads("cpu", params, target, weight, 0.1)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cpu[0], ref[0], **tol)
    for a, b in zip(cpu[2], ref[2]):
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, **tol)
    assert (ref[1] > 0.98).float().mean() > 0.3  # large saturated cores


def test_cpu_kernel_depth_gradient_is_deterministic():
    params, target, weight = scene(5, B=2, K=80, H=48, W=48, dtype=torch.float32, std=(1.0, 6.0))
    first = backend_grads("cpu", params, target, weight, 0.1)[2][4]
    for _ in range(2):
        assert torch.equal(backend_grads("cpu", params, target, weight, 0.1)[2][4], first)


@pytest.mark.parametrize("backend", sorted(DEPTH_GRAD_BACKENDS & {"torch", "cpu"}))
def test_forward_and_other_gradients_do_not_change(backend):
    """The depth-order gradient only adds ∂/∂z: the image and every other gradient are those without it."""
    params, target, weight = scene(2, B=2, K=30, H=20, W=20)
    off = backend_grads(backend, params, target, weight, 0.0)
    on = backend_grads(backend, params, target, weight, 0.2)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    for a, b in zip(on[2][:4], off[2][:4]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert off[2][4] is None  # no depth gradient at all when off, as in 3DGS
    assert on[2][4].abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_an_occluded_gaussian_that_should_be_in_front_is_pulled_forward(backend):
    """A small red Gaussian behind a big opaque blue one, on a red target: the swap would fix the
    pixels, so gradient descent moves red forward (z down) and blue back (z up)."""
    S = 16
    means = torch.tensor([[[8.0, 8.0], [8.0, 8.0]]], dtype=F64)
    conics = torch.tensor([[[1 / 100, 0.0, 1 / 100], [1 / 4, 0.0, 1 / 4]]], dtype=F64)  # blue σ 10 px, red σ 2 px
    colors = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], dtype=F64)
    opacities = torch.tensor([[0.99, 0.99]], dtype=F64)
    depths = torch.tensor([[0.0, 0.05]], dtype=F64)  # blue in front
    target = torch.zeros(1, 3, S, S, dtype=F64)
    target[:, 2] = 1.0
    target[:, :, 6:10, 6:10] = torch.tensor([1.0, 0.0, 0.0], dtype=F64).view(1, 3, 1, 1)
    weight = torch.ones(1, S, S, dtype=F64)
    _, _, grads = backend_grads(backend, [means, conics, colors, opacities, depths], target, weight, 0.1)
    assert grads[4][0, 1] > 0 and grads[4][0, 0] < 0
    torch.testing.assert_close(grads[4].sum(), torch.zeros((), dtype=F64), atol=1e-12, rtol=0)


def test_depth_gradient_needs_the_loss_curvature_and_a_backend_that_has_it():
    params, target, weight = scene(0)
    with pytest.raises(GMAEError, match="loss_curvature"):
        rasterize(*params, height=13, width=11, settings=RenderSettings(depth_tau=0.1))
    with pytest.raises(GMAEError, match=r"\(B, H, W\)"):
        rasterize(*params, height=13, width=11, loss_curvature=weight[0], settings=RenderSettings(depth_tau=0.1))
    with pytest.raises(GMAEError, match="depth_tau"):
        rasterize(*params, height=13, width=11, loss_curvature=weight, settings=RenderSettings(depth_tau=-1.0))
    from gmae.render import register_backend, BACKENDS
    from gmae.render.reference import rasterize_torch

    register_backend("no-depth-grad", rasterize_torch)
    try:
        with pytest.raises(GMAEError, match="no depth-order gradient"):
            rasterize(*params, height=13, width=11, loss_curvature=weight, settings=RenderSettings(backend="no-depth-grad", depth_tau=0.1))
        assert resolve_backend("auto", "cpu", depth_grad=True) in DEPTH_GRAD_BACKENDS
    finally:
        BACKENDS.pop("no-depth-grad")
