import torch

from gmae.render import project_orthographic, rasterize
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


def test_render_gaussians_is_projection_then_rasterize():
    g = random_gaussians()
    bg = torch.tensor([1.0, 1.0, 1.0])
    image, alpha = render_gaussians(g, 20, 24, bg, backend="torch")
    means2d, conics, depths = project_orthographic(g.means, g.scales, g.quats, 20, 24)
    ref_image, ref_alpha = rasterize(means2d, conics, g.colors, g.opacities, depths, height=20, width=24,
                                     background=bg, backend="torch")
    assert image.shape == (2, 3, 20, 24)
    assert torch.equal(image, ref_image) and torch.equal(alpha, ref_alpha)
    # depth order matters: rendering the sorted set gives the same image
    image_sorted, _ = render_gaussians(g.sorted_by_depth(), 20, 24, bg, backend="torch")
    assert torch.allclose(image, image_sorted, atol=1e-6)
