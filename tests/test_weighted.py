"""Weighted (order-free) compositing, ``compositing="weighted"``: against a brute-force per-pixel formula,
gradcheck (depths included), order independence, and the backends that have it."""

from __future__ import annotations

import math

import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import RenderSettings, rasterize, resolve_backend
from gmae.render.contract import ALPHA_MIN

from test_depth_grad import scene

F64 = torch.float64


def brute_force(params, H, W, tau, background):
    """colour = Σ cαw / Σ αw · (1 − Π(1 − α)) + Π(1 − α)·bg, w = exp(−z/τ), α by the contract without early stop."""
    means, conics, colors, opacities, depths = params
    B, K, C = colors.shape
    image = torch.zeros(B, C, H, W, dtype=F64)
    alpha_out = torch.zeros(B, H, W, dtype=F64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                num, den, T = torch.zeros(C, dtype=F64), 0.0, 1.0
                for k in range(K):
                    dx, dy = x + 0.5 - means[b, k, 0].item(), y + 0.5 - means[b, k, 1].item()
                    a, bb, c = conics[b, k].tolist()
                    alpha = min(0.99, opacities[b, k].item() * math.exp(-0.5 * (a * dx * dx + 2 * bb * dx * dy + c * dy * dy)))
                    if alpha < ALPHA_MIN:
                        continue
                    w = math.exp(-depths[b, k].item() / tau)
                    num += colors[b, k] * alpha * w
                    den += alpha * w
                    T *= 1 - alpha
                image[b, :, y, x] = (num / den * (1 - T) if den > 0 else 0) + T * background
                alpha_out[b, y, x] = 1 - T
    return image, alpha_out


def render(params, H, W, tau=0.2, background=None, backend="torch"):
    return rasterize(*params, height=H, width=W, background=background, settings=RenderSettings(backend=backend, compositing="weighted", depth_tau=tau))


def test_matches_the_per_pixel_formula():
    params, _, _ = scene(0, B=2, K=9, H=13, W=11)
    bg = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    image, alpha = render(params, 13, 11, 0.2, bg)
    ref_image, ref_alpha = brute_force(params, 13, 11, 0.2, bg)
    torch.testing.assert_close(image, ref_image)
    torch.testing.assert_close(alpha, ref_alpha)


def test_gradcheck_including_depths():
    params, _, _ = scene(1, B=1, K=4, H=8, W=8)
    leaves = [p.clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *t: render(t, 8, 8, 0.3, torch.ones(3, dtype=F64)), leaves)


def test_order_free_and_the_nearest_wins_as_tau_shrinks():
    params, _, _ = scene(2, B=1, K=12, H=16, W=16)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = [p[:, perm] for p in params]
    torch.testing.assert_close(render(params, 16, 16)[0], render(shuffled, 16, 16)[0])
    # two opaque Gaussians at one spot: with a small tau the colour is the nearer one's
    means = torch.tensor([[[8.0, 8.0], [8.0, 8.0]]], dtype=F64)
    conics = torch.full((1, 2, 3), 0.05, dtype=F64)
    conics[..., 1] = 0.0
    colors = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)
    opacities = torch.tensor([[0.99, 0.99]], dtype=F64)
    depths = torch.tensor([[0.3, -0.3]], dtype=F64)  # blue nearer
    image, alpha = render([means, conics, colors, opacities, depths], 16, 16, tau=0.01)
    torch.testing.assert_close(image[0, :, 8, 8], torch.tensor([0.0, 0.0, alpha[0, 8, 8].item()], dtype=F64),
                               atol=1e-9, rtol=0)


def test_coverage_is_that_of_sorted_compositing():
    """With faint Gaussians (no early stop anywhere) the alpha output is the sorted one's."""
    params, _, _ = scene(3, B=1, K=10, H=12, W=12)
    params[3] = params[3] * 0.2
    _, alpha = render(params, 12, 12)
    _, sorted_alpha = rasterize(*params, height=12, width=12, settings=RenderSettings(backend="torch"))
    torch.testing.assert_close(alpha, sorted_alpha)


def test_only_backends_with_weighted_compositing_take_it():
    params, _, _ = scene(0)
    with pytest.raises(GMAEError, match="no weighted compositing"):
        render(params, 13, 11, backend="cpu")
    assert resolve_backend("auto", "cpu", weighted=True) == "torch"
    with pytest.raises(GMAEError, match="needs depth_tau > 0"):
        rasterize(*params, height=13, width=11, settings=RenderSettings(compositing="weighted"))
    with pytest.raises(GMAEError, match="compositing must be one of"):
        rasterize(*params, height=13, width=11, settings=RenderSettings(compositing="additive"))
