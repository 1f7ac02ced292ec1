"""Cameras: each projection against explicit per-Gaussian numpy math (J Σ3 Jᵀ in float64), gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import CAMERAS, project, project_authors, project_orthographic, quat_to_rotmat, rasterize

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


# --------------------------------------------------------------------------- every camera


def numpy_projection(camera, mean, scale, quat, H, W):
    """(means2d, conic, depth) of one Gaussian from the camera's textbook definition."""
    x, y, z = mean
    R = textbook_rotmat(quat)
    cov3 = R @ np.diag(scale**2) @ R.T
    if camera == "orthographic":
        J = np.array([[W / 2, 0, 0], [0, H / 2, 0]])
        m2, depth = [(x + 1) / 2 * W, (y + 1) / 2 * H], z
    elif camera == "authors":
        # legacy gsplat: projmat = viewmat = [I | (0, 0, 8)], focal W/2 for both axes, so w = 1 and
        # ndc2pix(x) = 0.5·W·x/(1 + 1e-6) + W/2 - 0.5 with pixel centres at integers (+0.5 here)
        t = np.array([x, y, z + 8.0])
        f = W / 2
        lim_x, lim_y = 1.3 * (0.5 * W / f), 1.3 * (0.5 * H / f)
        tx = t[2] * np.clip(t[0] / t[2], -lim_x, lim_x)
        ty = t[2] * np.clip(t[1] / t[2], -lim_y, lim_y)
        J = np.array([[f / t[2], 0, -f * tx / t[2] ** 2], [0, f / t[2], -f * ty / t[2] ** 2]])
        m2 = [0.5 * W * x / (1 + 1e-6) + W / 2, 0.5 * H * y / (1 + 1e-6) + H / 2]
        depth = z + 8.0
    else:  # pinhole at distance 8 with focal 8·W/2, 8·H/2
        tz = z + 8.0
        fx, fy = 8 * W / 2, 8 * H / 2
        J = np.array([[fx / tz, 0, -fx * x / tz**2], [0, fy / tz, -fy * y / tz**2]])
        m2, depth = [fx * x / tz + W / 2, fy * y / tz + H / 2], tz
    cov2 = J @ cov3 @ J.T + 0.3 * np.eye(2)
    inv = np.linalg.inv(cov2)
    return np.array(m2), np.array([inv[0, 0], inv[0, 1], inv[1, 1]]), depth


@pytest.mark.parametrize("camera", sorted(CAMERAS))
@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)])
def test_every_camera_matches_its_textbook_definition(camera, H, W):
    means, scales, quats = random_gaussians(4)
    m2, con, dep = project(camera, means, scales, quats, H, W)
    for b in range(2):
        for k in range(5):
            em2, econ, edep = numpy_projection(camera, means[b, k].numpy(), scales[b, k].numpy(),
                                               quats[b, k].numpy(), H, W)
            np.testing.assert_allclose(m2[b, k].numpy(), em2, rtol=1e-12)
            np.testing.assert_allclose(con[b, k].numpy(), econ, rtol=1e-10)
            assert dep[b, k].item() == pytest.approx(edep, rel=1e-12)


def test_authors_camera_clamps_the_jacobian_like_legacy_gsplat():
    """Far off-axis centres (|t_x/t_z| > 1.3) use the clamped Jacobian: legacy gsplat's lim_x."""
    means = torch.tensor([[[12.0, -11.0, 0.0]]], dtype=F64)  # t_x/t_z = 1.5, t_y/t_z = -1.375
    scales = torch.tensor([[[0.3, 0.2, 0.5]]], dtype=F64)
    quats = torch.tensor([[[0.8, 0.1, -0.3, 0.2]]], dtype=F64)
    _, con, _ = project_authors(means, scales, quats, 32, 32)
    _, econ, _ = numpy_projection("authors", means[0, 0].numpy(), scales[0, 0].numpy(), quats[0, 0].numpy(), 32, 32)
    np.testing.assert_allclose(con[0, 0].numpy(), econ, rtol=1e-10)
    unclamped = project("pinhole", means, scales, quats, 32, 32)[1]  # a different J: the clamp matters here
    assert not torch.allclose(unclamped, con)


def test_authors_camera_c1_gives_a_largest_std_of_w_over_16():
    """With the authors' scale unit (1 world unit per unit of c), scale 1 at z = 0 is a W/16-pixel std."""
    W = 64
    means = torch.zeros(1, 1, 3, dtype=F64)
    scales = torch.tensor([[[CAMERAS["authors"].scale_unit, 1e-6, 1e-6]]], dtype=F64)
    quats = torch.tensor([[[1.0, 0, 0, 0]]], dtype=F64)
    _, con, _ = project_authors(means, scales, quats, W, W)
    assert (1 / con[0, 0, 0].item() - 0.3) ** 0.5 == pytest.approx(W / 16, rel=1e-5)
    for name in ("orthographic", "pinhole"):
        scales[..., 0] = CAMERAS[name].scale_unit
        _, con, _ = project(name, means, scales, quats, W, W)
        assert (1 / con[0, 0, 0].item() - 0.3) ** 0.5 == pytest.approx(W / 16, rel=1e-5)


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_every_camera_passes_gradcheck_including_depth(camera):
    means, scales, quats = (t.clone().requires_grad_() for t in random_gaussians(5, B=1, K=3))
    assert torch.autograd.gradcheck(lambda m, s, q: project(camera, m, s, q, 16, 24), (means, scales, quats))


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_depth_reaches_the_screen_gaussian_unless_orthographic(camera):
    """z changes the projected Gaussian (so the image can teach depth) for every camera but the
    orthographic one, whose z only sorts: documented as `depth_through_projection`."""
    means, scales, quats = (t.clone() for t in random_gaussians(6, B=1, K=4))
    means.requires_grad_()
    m2, con, _ = project(camera, means, scales, quats, 32, 32)
    (m2.sum() + con.sum()).backward()
    z_grad = means.grad[..., 2]
    if CAMERAS[camera].depth_through_projection:
        assert (z_grad.abs() > 0).all()
    else:
        assert (z_grad == 0).all()


def test_behind_the_camera_is_culled_with_finite_gradients():
    means = torch.tensor([[[0.0, 0.0, -9.0], [0.1, 0.2, 0.3]]], dtype=F64, requires_grad=True)
    scales = torch.full((1, 2, 3), 0.1, dtype=F64)
    quats = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]], dtype=F64)
    for camera in ("authors", "pinhole"):
        m2, con, dep = project(camera, means, scales, quats, 16, 16)
        assert (con[0, 0] == 0).all() and (con[0, 1] != 0).any()
        (m2.sum() + con.sum() + dep.sum()).backward()
        assert torch.isfinite(means.grad).all() and (means.grad[0, 0] == 0).all()
        means.grad = None


def test_unknown_camera_is_refused():
    means, scales, quats = random_gaussians(0)
    with pytest.raises(GMAEError, match="unknown camera 'fisheye'; choose one of"):
        project("fisheye", means, scales, quats, 8, 8)
