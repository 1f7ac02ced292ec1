"""Cameras: each projection against explicit per-Gaussian numpy math (J Σ3 Jᵀ in float64), gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmae.errors import GMAEError
from gmae.render import CAMERAS, RenderSettings, project, project_authors, project_orthographic, quat_to_rotmat, rasterize

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
    img, alpha = rasterize(m2, con, torch.ones(1, 1, 1, dtype=F64), torch.full((1, 1), 0.8, dtype=F64), dep, height=H, width=W, settings=RenderSettings(backend="torch"))
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
        m2, conic, depth, _ = legacy_gsplat_authors(*(torch.tensor(np.asarray(a)[None, None], dtype=F64)
                                                      for a in (mean, scale, quat)), H, W)
        return m2[0, 0].numpy(), conic[0, 0].numpy(), depth[0, 0].item()
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


# --------------------------------------------------------------------------- legacy gsplat, from its formulas


def quat_rotate(q, v):
    """v rotated by the unit quaternion q (w, x, y, z): the vector part of q v q*, by quaternion products."""
    def mul(a, b):
        aw, ax, ay, az = a.unbind(-1)
        bw, bx, by, bz = b.unbind(-1)
        return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)

    conj = q * q.new_tensor([1.0, -1.0, -1.0, -1.0])
    return mul(mul(q, torch.cat([torch.zeros_like(v[..., :1]), v], -1)), conj)[..., 1:]


def legacy_gsplat_project(means, scales, quats, viewmat, projmat, fx, fy, cx, cy, H, W, clip_thresh=0.01,
                          clamp=1.3):
    """Legacy gsplat's ``project_gaussians`` (v0.1, ``_torch_impl.py`` / ``forward.cu``) in float64, written
    from its formulas: t = W_view·mean + p; J = [[fx/tz, 0, -fx·tx'/tz²], [0, fy/tz, -fy·ty'/tz²]] with
    tx' = tz·clamp(tx/tz, ±1.3·tan_fovx), tan_fovx = W / (2 fx) (and y alike); cov2d = (J W_view) Σ3
    (J W_view)ᵀ + 0.3·I, Σ3 = M Mᵀ, M = R·diag(s); conic = cov2d⁻¹; centre: ndc2pix of projmat·[mean, 1]
    divided by (w + 1e-6), ndc2pix(x, W) = ((x + 1)·W − 1) / 2 (pixel centres at integers: gsplat v0.1.2's
    0.5·W·x + cx − 0.5 with cx = W/2, the contract's ``pixel_origin="centre"``; v0.1.0/v0.1.1's ndc2pix puts
    every centre one pixel further, ``pixel_origin="legacy"``, checked in tests/test_authors_parity.py); depth = tz;
    culled when tz < clip_thresh. cx, cy enter only through that formula; clamp: the 1.3 (infinite: no clamp).
    -> means2d (pixel centres at i + 0.5, this package's convention), conic (a, b, c), depth, valid."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    R = torch.stack([quat_rotate(q, torch.eye(3, dtype=F64)[i].expand_as(means)) for i in range(3)], -1)
    M = R * scales[..., None, :]
    cov3 = M @ M.transpose(-1, -2)
    Wv, p = viewmat[:3, :3], viewmat[:3, 3]
    t = means @ Wv.T + p
    tan_fovx, tan_fovy = 0.5 * W / fx, 0.5 * H / fy
    tz = t[..., 2]
    tx = tz * torch.clamp(t[..., 0] / tz, -clamp * tan_fovx, clamp * tan_fovx)
    ty = tz * torch.clamp(t[..., 1] / tz, -clamp * tan_fovy, clamp * tan_fovy)
    zero = torch.zeros_like(tz)
    J = torch.stack([torch.stack([fx / tz, zero, -fx * tx / tz**2], -1),
                     torch.stack([zero, fy / tz, -fy * ty / tz**2], -1)], -2)
    T = J @ Wv
    cov2 = T @ cov3 @ T.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=F64)
    det = cov2[..., 0, 0] * cov2[..., 1, 1] - cov2[..., 0, 1] ** 2
    conic = torch.stack([cov2[..., 1, 1] / det, -cov2[..., 0, 1] / det, cov2[..., 0, 0] / det], -1)
    hom = torch.cat([means, torch.ones_like(means[..., :1])], -1) @ projmat.T
    ndc = hom[..., :3] / (hom[..., 3:] + 1e-6)
    pix = torch.stack([0.5 * ((ndc[..., 0] + 1) * W - 1), 0.5 * ((ndc[..., 1] + 1) * H - 1)], -1)
    return pix + 0.5, conic, tz, tz >= clip_thresh


def legacy_gsplat_authors(means, scales, quats, H, W, clamp=1.3):
    """The GMAE authors' call: ProjectGaussians(means, scales, 1, quats, viewmat, viewmat, W/2, W/2, W/2, H/2, H, W)
    with viewmat = [I | (0, 0, 8)] (projmat = viewmat)."""
    viewmat = torch.eye(4, dtype=F64)
    viewmat[2, 3] = 8.0
    return legacy_gsplat_project(means, scales, quats, viewmat, viewmat, W / 2, W / 2, W / 2, H / 2, H, W, clamp=clamp)


def clamp_and_near_plane_gaussians(seed=7, K=12):
    """Centres near the camera (tz = z + 8 in 0.02 ... 0.6) and off axis: |tx/tz| up to 50, far past the clamp."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(1, K, 2, generator=g, dtype=F64) * 1.8 - 0.9
    tz = 0.02 + 0.58 * torch.rand(1, K, 1, generator=g, dtype=F64)
    means = torch.cat([xy, tz - 8.0], -1)
    scales = 0.002 + 0.01 * torch.rand(1, K, 3, generator=g, dtype=F64)
    quats = torch.randn(1, K, 4, generator=g, dtype=F64)
    return means, scales, quats


@pytest.mark.parametrize("H,W", [(32, 32), (24, 40)])
def test_authors_camera_is_legacy_gsplat_in_the_clamp_region_and_near_the_near_plane(H, W):
    means, scales, quats = clamp_and_near_plane_gaussians()
    ratio = (means[..., :2] / (means[..., 2:] + 8.0)).abs()
    assert (ratio[..., 0] > 1.3).sum() >= 6 and (ratio[..., 1] > 1.3 * H / W).sum() >= 6  # clamped on both axes
    # and two just either side of the near plane (tz = 0.012: seen; tz = 0.008: culled)
    means = torch.cat([means, torch.tensor([[[0.1, -0.2, 0.012 - 8.0], [0.1, -0.2, 0.008 - 8.0]]], dtype=F64)], 1)
    scales = torch.cat([scales, torch.full((1, 2, 3), 0.004, dtype=F64)], 1)
    quats = torch.cat([quats, torch.tensor([[[0.9, 0.1, 0.2, 0.3]] * 2], dtype=F64)], 1)
    m2, con, dep = project_authors(means, scales, quats, H, W)
    em2, econ, edep, valid = legacy_gsplat_authors(means, scales, quats, H, W)
    assert valid[0, :-1].all() and not valid[0, -1]
    torch.testing.assert_close(m2[valid], em2[valid], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(con[valid], econ[valid], rtol=1e-9, atol=0)
    torch.testing.assert_close(dep[valid], edep[valid], rtol=1e-12, atol=0)
    assert (con[~valid] == 0).all()  # culled: the zero conic no rasterizer draws
    # the clamp matters here: without it the conics differ
    unclamped = legacy_gsplat_authors(means, scales, quats, H, W, clamp=float("inf"))[1]
    assert not torch.allclose(unclamped[valid], econ[valid], rtol=1e-3)


def test_authors_camera_gradients_are_legacy_gsplats_in_the_clamp_region():
    """The clamp branch's gradients: the same as autograd through the legacy formulas, and gradcheck."""
    means, scales, quats = clamp_and_near_plane_gaussians(seed=8, K=6)
    weights = torch.randn(3, 1, 6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def loss(project_fn, m, s, q):
        m2, con, dep = project_fn(m, s, q)[:3]
        return (weights[0, ..., :2] * m2).sum() + (weights[1] * con * 1e-4).sum() + (weights[2, ..., 0] * dep).sum()

    grads = []
    for fn in (lambda m, s, q: project_authors(m, s, q, 24, 40), lambda m, s, q: legacy_gsplat_authors(m, s, q, 24, 40)):
        leaves = [t.clone().requires_grad_() for t in (means, scales, quats)]
        loss(fn, *leaves).backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    assert grads[0][0][..., 2].abs().min() > 0  # depth reaches the conic through 1/tz even where x is clamped
    leaves = [t[:, :3].clone().requires_grad_() for t in (means, scales, quats)]
    assert torch.autograd.gradcheck(lambda m, s, q: project_authors(m, s, q, 24, 40), leaves)
