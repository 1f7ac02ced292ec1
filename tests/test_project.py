"""Orthographic projection of 3D Gaussians against explicit per-Gaussian numpy math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import project_orthographic, quat_to_rotmat, rasterize

F64 = torch.float64


def textbook_rotmat(q):
    """Rotation matrix of a unit quaternion (w, x, y, z) — the usual formula."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
    ])


def random_gaussians(seed, B=2, K=5):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(B, K, 3, generator=g, dtype=F64) * 2 - 1
    scales = 0.01 + 0.2 * torch.rand(B, K, 3, generator=g, dtype=F64)
    quats = torch.randn(B, K, 4, generator=g, dtype=F64) * 3  # deliberately not unit
    return means, scales, quats


def test_rotmat_is_orthonormal_and_matches_textbook():
    _, _, quats = random_gaussians(0)
    R = quat_to_rotmat(quats)
    eye = torch.eye(3, dtype=F64).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=F64))
    for b in range(2):
        for k in range(5):
            np.testing.assert_allclose(R[b, k].numpy(), textbook_rotmat(quats[b, k].numpy()), atol=1e-12)
    # 90° about z: x axis -> y axis.
    q = torch.tensor([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)], dtype=F64)
    torch.testing.assert_close(quat_to_rotmat(q) @ torch.tensor([1.0, 0, 0], dtype=F64),
                               torch.tensor([0.0, 1, 0], dtype=F64))


@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)])
def test_projection_matches_numpy(H, W):
    means, scales, quats = random_gaussians(1)
    m2, con, dep = project_orthographic(means, scales, quats, H, W)
    assert m2.shape == (2, 5, 2) and con.shape == (2, 5, 3) and dep.shape == (2, 5)
    J = np.array([[W / 2, 0, 0], [0, H / 2, 0]])
    for b in range(2):
        for k in range(5):
            R = textbook_rotmat(quats[b, k].numpy())
            cov3 = R @ np.diag(scales[b, k].numpy() ** 2) @ R.T
            cov2 = J @ cov3 @ J.T + 0.3 * np.eye(2)
            inv = np.linalg.inv(cov2)
            np.testing.assert_allclose(con[b, k].numpy(), [inv[0, 0], inv[0, 1], inv[1, 1]], rtol=1e-10)
            x, y, z = means[b, k].numpy()
            np.testing.assert_allclose(m2[b, k].numpy(), [(x + 1) / 2 * W, (y + 1) / 2 * H], rtol=1e-12)
            assert dep[b, k].item() == pytest.approx(z)


def test_axis_aligned_pixel_std_and_edges():
    H, W, s = 48, 64, 0.05
    means = torch.tensor([[[-1.0, -1.0, 0.2], [1.0, 1.0, 0.1]]], dtype=F64)
    scales = torch.tensor([[[s, 2 * s, 0.3], [s, s, s]]], dtype=F64)
    quats = torch.tensor([[[1.0, 0, 0, 0], [2.0, 0, 0, 0]]], dtype=F64)
    m2, con, dep = project_orthographic(means, scales, quats, H, W)
    # x = -1 / y = -1 is the top-left corner, x = y = 1 the bottom-right one.
    torch.testing.assert_close(m2[0], torch.tensor([[0.0, 0.0], [W, H]], dtype=F64))
    torch.testing.assert_close(dep[0], torch.tensor([0.2, 0.1], dtype=F64))
    # Pixel std = s·W/2 along x and 2s·H/2 along y, plus the 0.3 px² dilation.
    a, b, c = con[0, 0]
    assert b.item() == pytest.approx(0.0, abs=1e-15)
    assert 1 / a.item() == pytest.approx((s * W / 2) ** 2 + 0.3)
    assert 1 / c.item() == pytest.approx((2 * s * H / 2) ** 2 + 0.3)
    # No dilation when eps2d = 0.
    _, con0, _ = project_orthographic(means, scales, quats, H, W, eps2d=0.0)
    assert 1 / con0[0, 0, 0].item() == pytest.approx((s * W / 2) ** 2)


def test_quaternion_normalised_inside():
    means, scales, quats = random_gaussians(2)
    out1 = project_orthographic(means, scales, quats, 32, 32)
    out3 = project_orthographic(means, scales, 3 * quats, 32, 32)
    outn = project_orthographic(means, scales, quats / quats.norm(dim=-1, keepdim=True), 32, 32)
    for x, y, z in zip(out1, out3, outn):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)


def test_gradients_flow():
    means, scales, quats = (t.clone().requires_grad_() for t in random_gaussians(3, B=1, K=3))
    assert torch.autograd.gradcheck(
        lambda m, s, q: project_orthographic(m, s, q, 16, 24)[:2], (means, scales, quats)
    )


def test_projected_gaussian_peaks_at_expected_pixel():
    H, W = 32, 48
    # x = 0.25 -> px = 30 (the border between pixels 29 and 30); shift by half a
    # pixel to land on pixel 30's centre: x = 2·30.5/W - 1.
    x, y = 2 * 30.5 / W - 1, 2 * 9.5 / H - 1
    means = torch.tensor([[[x, y, 0.5]]], dtype=F64)
    scales = torch.tensor([[[0.08, 0.05, 0.1]]], dtype=F64)
    quats = torch.tensor([[[0.9, 0.1, 0.2, 0.3]]], dtype=F64)
    m2, con, dep = project_orthographic(means, scales, quats, H, W)
    img, alpha = rasterize(m2, con, torch.ones(1, 1, 1, dtype=F64), torch.full((1, 1), 0.8, dtype=F64),
                           dep, height=H, width=W, backend="torch")
    peak = divmod(int(alpha[0].argmax()), W)
    assert peak == (9, 30)
    assert alpha[0, 9, 30].item() == pytest.approx(0.8)
    assert alpha[0].sum() > 5 * 0.8  # spread over several pixels, not a dot


def test_shape_errors():
    means, scales, quats = random_gaussians(0)
    with pytest.raises(GMAEError, match="scales must have shape"):
        project_orthographic(means, scales[..., :2], quats, 8, 8)
    with pytest.raises(GMAEError, match="quats must have shape"):
        project_orthographic(means, scales, quats[..., :3], 8, 8)
