"""Scenes and the render-and-differentiate helper that the render backends' tests share.

Kept apart from the backends' test modules so that importing them needs only torch: tests/test_render_triton.py
(run on a GPU machine, which may have no numba) imports them without tests/test_render_cpu.py and numba.
"""

from __future__ import annotations

import math

import torch

from gmae.render import RenderSettings


def make_scene(batch=2, k=64, height=40, width=56, channels=3, seed=0,
               dtype=torch.float32, std=(0.5, 6.0), opacity=(0.0, 1.0)):
    """Random rotated anisotropic Gaussians, some partly off-screen.

    Returns means2d (B,K,2), conics (B,K,3), colors (B,K,C), opacities (B,K),
    depths (B,K).
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    size = torch.tensor([width, height], dtype=torch.float64)
    means = (rand(batch, k, 2) * 1.2 - 0.1) * size
    sd = std[0] + (std[1] - std[0]) * rand(batch, k, 2)
    theta = math.pi * rand(batch, k)
    cos, sin = theta.cos(), theta.sin()
    vx, vy = sd[..., 0] ** 2, sd[..., 1] ** 2
    sxx, syy, sxy = cos**2 * vx + sin**2 * vy, sin**2 * vx + cos**2 * vy, cos * sin * (vx - vy)
    det = sxx * syy - sxy**2
    conics = torch.stack([syy / det, -sxy / det, sxx / det], -1)
    colors = rand(batch, k, channels)
    opac = opacity[0] + (opacity[1] - opacity[0]) * rand(batch, k)
    depths = rand(batch, k)
    return [t.to(dtype) for t in (means, conics, colors, opac, depths)]


def conic_of(sx, sy, theta=0.0):
    """(a, b, c) of a Gaussian with standard deviations sx, sy rotated by theta."""
    cos, sin = math.cos(theta), math.sin(theta)
    sxx = cos**2 * sx**2 + sin**2 * sy**2
    syy = sin**2 * sx**2 + cos**2 * sy**2
    sxy = cos * sin * (sx**2 - sy**2)
    det = sxx * syy - sxy**2
    return [syy / det, -sxy / det, sxx / det]


def render_and_grad(fn, scene, height, width, background=None, max_alpha=0.99, seed=123, tile_cut="alpha"):
    """Image, alpha and the gradients of a random weighted sum of both with
    respect to (means2d, conics, colors, opacities[, background]), rendered by backend `fn` with this max_alpha
    and tile_cut."""
    inputs = [t.detach().clone().requires_grad_(i < 4) for i, t in enumerate(scene)]
    wrt = inputs[:4]
    if background is not None:
        background = background.detach().clone().requires_grad_(True)
        wrt = wrt + [background]
    image, alpha = fn(*inputs, height=height, width=width, background=background,
                      settings=RenderSettings(max_alpha=max_alpha, tile_cut=tile_cut))
    g = torch.Generator().manual_seed(seed)
    w_img = torch.randn(image.shape, generator=g, dtype=torch.float64).to(image.dtype)
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=torch.float64).to(alpha.dtype)
    loss = (image * w_img).sum() + (alpha * w_alpha).sum()
    # allow_unused: when everything is culled the reference has no graph
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return image.detach(), alpha.detach(), grads
