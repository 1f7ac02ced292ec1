import pytest
import torch

from gmae.render import RenderSettings
from gmae.render.gaussians import Gaussians, render_gaussians


def random_gaussians(B=2, K=6, C=3, seed=0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.rand(B, K, 3, generator=g) * 2 - 1,
        scales=torch.rand(B, K, 3, generator=g) * 0.1 + 0.02,
        quats=torch.randn(B, K, 4, generator=g),
        colors=torch.rand(B, K, C, generator=g),
        opacities=torch.rand(B, K, generator=g) * 0.8 + 0.1,
    )


def test_take_selects_per_image():
    g = random_gaussians()
    index = torch.tensor([[5, 0], [1, 1]])
    sub = g.take(index)
    assert sub.num == 2
    assert torch.equal(sub.means[0, 0], g.means[0, 5]) and torch.equal(sub.colors[1, 1], g.colors[1, 1])
    assert torch.equal(sub.opacities[0], g.opacities[0, [5, 0]])


def test_sorted_by_depth_is_stable_and_ascending():
    g = random_gaussians()
    g.means[0, :, 2] = torch.tensor([0.5, -0.2, 0.5, 0.1, -0.2, 0.9])
    s = g.sorted_by_depth()
    assert torch.all(s.means[..., 2][:, 1:] >= s.means[..., 2][:, :-1])
    # ties keep index order: the two -0.2 Gaussians (indices 1 and 4) stay in that order
    assert torch.equal(s.colors[0, 0], g.colors[0, 1]) and torch.equal(s.colors[0, 1], g.colors[0, 4])


def analytic_pixel_std(camera, x, y, z, s, W):
    """On-screen std (pixels, before the 0.3 px^2 dilation) of an axis-aligned Gaussian of world std s at
    (x, y, z) = (0, 0, z), and its centre, from each camera's definition (the image spans x, y in (-1, 1))."""
    if camera == "orthographic":
        return s * W / 2, ((x + 1) * W / 2, (y + 1) * W / 2)
    if camera == "authors":  # perspective size at distance z + 8 with focal W/2; centre orthographic
        return s * (W / 2) / (z + 8), ((x / (1 + 1e-6) + 1) * W / 2, (y / (1 + 1e-6) + 1) * W / 2)
    f = 8 * W / 2  # pinhole: focal 8 W / 2 at distance z + 8
    return s * f / (z + 8), (f * x / (z + 8) + W / 2, f * y / (z + 8) + W / 2)


@pytest.mark.parametrize("camera", ["orthographic", "authors", "pinhole"])
def test_render_gaussians_composites_two_gaussians_as_their_formula(camera):
    """Two overlapping axis-aligned Gaussians on the image's centre line, at known depths, rendered with each camera,
    against the image computed from their closed form: alpha = o exp(-(dx^2/sx^2 + dy^2/sy^2) / 2) (dilated
    variances), the nearer (smaller z) composited first, over the background."""
    W = 20
    zs, sx, sy = (0.5, -0.3), (0.10, 0.05), (0.04, 0.12)  # the second is nearer
    xy = ((0.0, 0.0), (0.0, 0.0)) if camera != "orthographic" else ((0.1, -0.05), (-0.1, 0.1))
    colors = torch.tensor([[[1.0, 0.2, 0.0], [0.0, 0.3, 1.0]]], dtype=torch.float64)
    opacities = torch.tensor([[0.9, 0.7]], dtype=torch.float64)
    g = Gaussians(torch.tensor([[[*xy[k], zs[k]] for k in range(2)]], dtype=torch.float64),
                  torch.tensor([[[sx[k], sy[k], 0.2] for k in range(2)]], dtype=torch.float64),
                  torch.tensor([[[1.0, 0.0, 0.0, 0.0]] * 2], dtype=torch.float64), colors, opacities)
    bg = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    image, alpha = render_gaussians(g, W, W, bg, settings=RenderSettings(backend="torch", camera=camera))
    c = torch.arange(W, dtype=torch.float64) + 0.5
    alphas = []
    for k in range(2):
        stdx, (cx, cy) = analytic_pixel_std(camera, *xy[k], zs[k], sx[k], W)
        stdy, _ = analytic_pixel_std(camera, *xy[k], zs[k], sy[k], W)
        q = (c[None, :] - cx) ** 2 / (stdx**2 + 0.3) + (c[:, None] - cy) ** 2 / (stdy**2 + 0.3)
        a = (opacities[0, k] * torch.exp(-0.5 * q)).clamp(max=0.99)
        alphas.append(torch.where(a < 1 / 255, torch.zeros_like(a), a))
    front, back = alphas[1], alphas[0]
    expected = (colors[0, 1].view(3, 1, 1) * front + colors[0, 0].view(3, 1, 1) * back * (1 - front)
                + bg.view(3, 1, 1) * (1 - front) * (1 - back))
    torch.testing.assert_close(image[0], expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(alpha[0], 1 - (1 - front) * (1 - back), atol=1e-9, rtol=0)
    # the order matters: the other one in front draws another image
    swapped = Gaussians(g.means * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), g.scales, g.quats, colors,
                        opacities)
    if camera == "orthographic":  # (the other cameras change sizes with z too; the order alone is checked here)
        assert (render_gaussians(swapped, W, W, bg, settings=RenderSettings(backend="torch", camera=camera))[0] - image).abs().max() > 0.1
