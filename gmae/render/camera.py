"""Cameras: 3D Gaussians (means, scales, quats) -> screen space (means2d, conics, depths).

One registry, :data:`CAMERAS`, the way gsplat's ``rasterization(camera_model=...)``
chooses a camera by name. A camera is one small function, ``screen``, that maps
world means to pixel centres and depths and gives the 2×3 Jacobian J of that
map (the EWA linearisation); :func:`project` does the rest for every camera
alike: Σ2 = J Σ3 Jᵀ + eps2d·I with Σ3 = R diag(s²) Rᵀ, its inverse (the
conic), and the guard that turns degenerate Gaussians into finite, culled
ones. Adding a camera is writing one ``screen`` function and registering it.

World units: x, y in (-1, 1) span the image (x right, y down), z is depth
(ascending depth is drawn first, i.e. smaller z = nearer).

Cameras here (see each function):

* ``orthographic`` -- centres and covariances projected orthographically;
  z only orders the Gaussians. **Depth gets no gradient through this
  projection** (sorting has no derivative): with it, z learns only from a
  depth-order gradient in the rasterizer (``depth_tau``), never from the
  projection.
* ``authors`` -- the GMAE authors' code path (legacy gsplat ``ProjectGaussians``
  with projmat = viewmat = identity rotation and t_z = 8, fov 90°, focal W/2):
  centres orthographic, covariance with the perspective EWA Jacobian at
  (x, y, z + 8). z reaches the image through the Gaussians' on-screen size.
* ``pinhole`` -- a true perspective camera at the same distance, with the
  focal length that makes the z = 0 plane span the image: centres move with z
  too (parallax towards the image centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import GMAEError

__all__ = [
    "CAMERAS",
    "MAX_SCALE",
    "PIXEL_ORIGIN_SHIFT",
    "Camera",
    "get_camera",
    "project",
    "project_authors",
    "project_orthographic",
    "project_pinhole",
    "quat_to_rotmat",
    "register_camera",
]

#: Largest |scale| (world units; the image is 2 units across) used by the
#: projection. Beyond it a Gaussian is already a uniform layer over any image,
#: and the clamp keeps its covariance from overflowing (in float32 it would
#: otherwise turn into inf/NaN and vanish instead of covering the screen).
MAX_SCALE = 1e4

#: Distance of the authors' camera from the z = 0 plane (their viewmat's t_z).
AUTHORS_DISTANCE = 8.0
#: legacy gsplat clamps t_x/t_z (and t_y/t_z) of the EWA Jacobian to 1.3·tan(fov/2).
AUTHORS_FOV_CLAMP = 1.3
#: legacy gsplat culls Gaussians whose camera-space depth is not beyond this.
NEAR_PLANE = 0.01
#: legacy gsplat divides projected centres by (w + 1e-6), with w = 1 for projmat = viewmat.
AUTHORS_W_EPS = 1e-6

#: Where pixel i is sampled, as a shift of every projected centre in the contract's pixel coordinates (pixel
#: centres at i + 0.5): "centre" the contract's own (gsplat >= 0.1.2's); "legacy" legacy gsplat v0.1.0/v0.1.1's,
#: the API the GMAE authors' code calls: its ``ndc2pix`` is 0.5·W·x + 0.5 + cx (gsplat/cuda/csrc/helpers.cuh line 8
#: at tag v0.1.1) and it samples pixel i at i, not i + 0.5 (forward.cu lines 275-276), so relative to the pixel grid
#: every Gaussian sits one pixel further right and down than the contract's (x + 1)·W/2 puts it.
PIXEL_ORIGIN_SHIFT = {"centre": 0.0, "legacy": 1.0}

# screen(means (B,K,3), height, width) -> (means2d (B,K,2), depths (B,K), J (B,K,2,3), valid (B,K) bool | None)
ScreenFn = Callable[[Tensor, int, int], "tuple[Tensor, Tensor, Tensor, Tensor | None]"]


@dataclass(frozen=True)
class Camera:
    """A registered camera.

    screen: the projection of centres (see ``ScreenFn`` above); valid=False
        marks Gaussians the camera cannot see (behind its near plane).
    scale_unit: world units of one unit of c, chosen per camera so that
        c = 1 gives a largest on-screen standard deviation of about W/16
        pixels (what the authors' camera gives) whatever the camera.
    depth_through_projection: whether depth changes the projected Gaussian
        (so z gets a gradient from the image without any help from the
        rasterizer). False only for ``orthographic``.
    """

    name: str
    screen: ScreenFn
    scale_unit: float
    depth_through_projection: bool
    summary: str


CAMERAS: dict[str, Camera] = {}


def register_camera(camera: Camera) -> Camera:
    """Add (or replace) a camera under ``camera.name``."""
    CAMERAS[camera.name] = camera
    return camera


def get_camera(name: str) -> Camera:
    if name not in CAMERAS:
        raise GMAEError(f"unknown camera {name!r}; choose one of {', '.join(CAMERAS)}")
    return CAMERAS[name]


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from quaternions (w, x, y, z).

    Args:
        quats: (..., 4); normalised here, so any non-zero scale is fine.

    Returns:
        (..., 3, 3) rotation matrices R (applied as R @ v).
    """
    if quats.shape[-1:] != (4,):
        raise GMAEError(f"quats must have shape (..., 4) in (w, x, y, z) order; got {tuple(quats.shape)}")
    # Large quaternions are first brought to at most unit max-norm (the
    # rotation is scale invariant, so a constant divisor changes neither the
    # result nor its gradient) so that |q|² cannot overflow; clamp_min keeps a
    # zero quaternion finite (it then maps to the identity, with zero gradient).
    big = quats.detach().abs().amax(dim=-1, keepdim=True)
    big = torch.where(torch.isfinite(big) & (big > 1.0), big, torch.ones_like(big))
    q = quats / big
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


# --------------------------------------------------------------------------- the cameras


def _orthographic_screen(means: Tensor, height: int, width: int):
    """px = (x+1)/2·W, py = (y+1)/2·H (x = -1: left edge of pixel 0), depth = z, J = diag(W/2, H/2) on x, y."""
    x, y, z = means.unbind(-1)
    sx, sy = width / 2.0, height / 2.0
    means2d = torch.stack([(x + 1.0) * sx, (y + 1.0) * sy], dim=-1)
    J = means.new_tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]).expand(*means.shape[:-1], 2, 3)
    return means2d, z, J, None


def _perspective_jacobian(t: Tensor, fx: float, fy: float, lim_x: float, lim_y: float) -> Tensor:
    """EWA Jacobian of (fx·tx/tz, fy·ty/tz) at camera-space t (..., 3), as legacy gsplat builds it:
    tx/tz and ty/tz clamped to ±lim first. -> (..., 2, 3)."""
    tx, ty, tz = t.unbind(-1)
    tx = tz * (tx / tz).clamp(-lim_x, lim_x)
    ty = tz * (ty / tz).clamp(-lim_y, lim_y)
    rz = 1.0 / tz
    rz2 = rz * rz
    zero = torch.zeros_like(tz)
    return torch.stack([
        torch.stack([fx * rz, zero, -fx * tx * rz2], dim=-1),
        torch.stack([zero, fy * rz, -fy * ty * rz2], dim=-1),
    ], dim=-2)


def _authors_screen(means: Tensor, height: int, width: int):
    """The GMAE authors' camera (legacy gsplat ``ProjectGaussians(means, scales, 1, quats, viewmat,
    viewmat, focal, focal, W/2, H/2, ...)``, viewmat = [I | (0, 0, 8)], focal = W/2, i.e. fov 90°).

    Because projmat = viewmat, the homogeneous w of a centre is 1: centres are
    projected orthographically, px = (x/(1+1e-6) + 1)·W/2 (gsplat's 1e-6 kept),
    but the 2D covariance uses the perspective EWA Jacobian at t = (x, y, z + 8),
    J = [[f/t_z, 0, -f·t_x/t_z²], [0, f/t_z, -f·t_y/t_z²]] with f = W/2 for both
    axes (t_x/t_z, t_y/t_z clamped to ±1.3·tan(fov/2)); depth = t_z = z + 8.
    Gaussians with t_z <= 0.01 are culled (gsplat's near plane).
    """
    x, y, z = means.unbind(-1)
    rw = 1.0 / (1.0 + AUTHORS_W_EPS)
    means2d = torch.stack([(x * rw + 1.0) * (width / 2.0), (y * rw + 1.0) * (height / 2.0)], dim=-1)
    t = torch.stack([x, y, z + AUTHORS_DISTANCE], dim=-1)
    focal = width / 2.0
    tan_x, tan_y = 0.5 * width / focal, 0.5 * height / focal
    J = _perspective_jacobian(t, focal, focal, AUTHORS_FOV_CLAMP * tan_x, AUTHORS_FOV_CLAMP * tan_y)
    return means2d, t[..., 2], J, t[..., 2] > NEAR_PLANE


def _pinhole_screen(means: Tensor, height: int, width: int):
    """A true pinhole camera at distance 8 looking down +z, focal lengths 8·W/2 and 8·H/2 so that the
    z = 0 plane spans the image exactly as the orthographic camera does: px = fx·x/t_z + W/2,
    py = fy·y/t_z + H/2 with t_z = z + 8. Nearer Gaussians look bigger and further from the centre."""
    x, y, z = means.unbind(-1)
    tz = z + AUTHORS_DISTANCE
    fx, fy = AUTHORS_DISTANCE * width / 2.0, AUTHORS_DISTANCE * height / 2.0
    means2d = torch.stack([fx * x / tz + width / 2.0, fy * y / tz + height / 2.0], dim=-1)
    # No clamp of t_x/t_z: with |x| < 1 and t_z > 7 it is far inside the field of view.
    J = _perspective_jacobian(torch.stack([x, y, tz], dim=-1), fx, fy, float("inf"), float("inf"))
    return means2d, tz, J, tz > NEAR_PLANE


register_camera(Camera(
    "orthographic", _orthographic_screen, scale_unit=1.0 / 8.0, depth_through_projection=False,
    summary="x, y onto the image, z only sorts (no depth gradient from the projection)"))
register_camera(Camera(
    "authors", _authors_screen, scale_unit=1.0, depth_through_projection=True,
    summary="the GMAE authors' legacy-gsplat camera: orthographic centres, perspective covariance at z + 8"))
register_camera(Camera(
    "pinhole", _pinhole_screen, scale_unit=1.0 / 8.0, depth_through_projection=True,
    summary="true perspective at distance 8 (centres and sizes change with z)"))


# --------------------------------------------------------------------------- projection


def project(
    camera: str | Camera,
    means: Tensor,
    scales: Tensor,
    quats: Tensor,
    height: int,
    width: int,
    eps2d: float = 0.3,
    pixel_origin: str = "centre",
) -> tuple[Tensor, Tensor, Tensor]:
    """Project 3D Gaussians onto an H×W image with a registered camera.

    Pixel convention matches :func:`gmae.render.rasterize` (pixel centres at
    i + 0.5); ``pixel_origin="legacy"`` puts every centre where legacy gsplat
    (v0.1.0/v0.1.1) does, one pixel further right and down
    (:data:`PIXEL_ORIGIN_SHIFT`). The screen covariance is Σ2 = J Σ3 Jᵀ + eps2d·I, with
    Σ3 = R·diag(s²)·Rᵀ and J the camera's Jacobian at each centre; eps2d is
    gsplat's 0.3-pixel low-pass dilation, which keeps sub-pixel Gaussians
    visible and Σ2 invertible.

    Args:
        camera: a name in :data:`CAMERAS` or a :class:`Camera`.
        means: (B, K, 3) world positions.
        scales: (B, K, 3) standard deviations along the local axes (world units).
        quats: (B, K, 4) rotations (w, x, y, z), normalised inside.
        height, width: image size in pixels.
        eps2d: isotropic variance (pixels²) added to Σ2.

    Returns:
        means2d (B, K, 2), conics (B, K, 3) = upper triangle (a, b, c) of Σ2⁻¹,
        depths (B, K).

    Degenerate inputs never give non-finite outputs or gradients: zero scales
    and an all-zero quaternion (taken as the identity) project normally;
    |scales| are clamped at :data:`MAX_SCALE`; a Gaussian with a NaN/inf
    mean, scale or quaternion, one the camera cannot see, or one whose Σ2
    overflows gets means2d = 0, depth = 0 and conic = 0, which every
    rasterizer culls, and zero gradients.
    """
    cam = camera if isinstance(camera, Camera) else get_camera(camera)
    if pixel_origin not in PIXEL_ORIGIN_SHIFT:
        raise GMAEError(f"pixel_origin must be one of {', '.join(PIXEL_ORIGIN_SHIFT)}; got {pixel_origin!r}")
    if means.dim() != 3 or means.shape[-1] != 3:
        raise GMAEError(f"means must have shape (B, K, 3); got {tuple(means.shape)}")
    B, K = means.shape[:2]
    if tuple(scales.shape) != (B, K, 3):
        raise GMAEError(
            f"scales must have shape (B, K, 3) matching means {tuple(means.shape)}; got {tuple(scales.shape)}"
        )
    if tuple(quats.shape) != (B, K, 4):
        raise GMAEError(
            f"quats must have shape (B, K, 4) matching means {tuple(means.shape)}; got {tuple(quats.shape)}"
        )

    # A Gaussian with a non-finite parameter, one the camera cannot see, or one
    # whose screen covariance overflows gets the finite "culled" marker (conic
    # 0, which no backend renders: not positive definite). Its inputs are then
    # swapped for harmless values *before* the arithmetic (torch.where, not a
    # multiply), so that its gradients are exact zeros instead of 0·inf = NaN.
    # The common case (all fine) costs one check.
    means2d, conics, z, det, valid = _project(cam, means, scales, quats, height, width, eps2d)
    with torch.no_grad():
        ok = (torch.isfinite(means).all(-1) & torch.isfinite(scales).all(-1) & torch.isfinite(quats).all(-1)
              & torch.isfinite(means2d).all(-1) & torch.isfinite(z)
              # finite conics whose gradient (∂conic/∂det = -conic/det) is finite too
              & torch.isfinite(conics).all(-1) & torch.isfinite(conics / det[..., None]).all(-1))
        if valid is not None:
            ok &= valid
    if not bool(ok.all()):
        keep = ok[..., None]
        identity = torch.zeros_like(quats)
        identity[..., 0] = 1.0
        means2d, conics, z, _, _ = _project(
            cam,
            torch.where(keep, means, torch.zeros_like(means)),
            torch.where(keep, scales, torch.ones_like(scales)),
            torch.where(keep, quats, identity),
            height, width, eps2d,
        )
        means2d = torch.where(keep, means2d, torch.zeros_like(means2d))
        conics = torch.where(keep, conics, torch.zeros_like(conics))
        z = torch.where(ok, z, torch.zeros_like(z))
    if PIXEL_ORIGIN_SHIFT[pixel_origin]:
        means2d = means2d + PIXEL_ORIGIN_SHIFT[pixel_origin]
    return means2d, conics, z


def _project(cam: Camera, means: Tensor, scales: Tensor, quats: Tensor, height: int, width: int,
             eps2d: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The projection arithmetic (see :func:`project`); also returns det Σ2 and the camera's valid mask."""
    means2d, depth, J, valid = cam.screen(means, height, width)
    rot = quat_to_rotmat(quats)  # (B, K, 3, 3)
    s = scales.clamp(-MAX_SCALE, MAX_SCALE)
    # The screen covariance before dilation is A Aᵀ, where the rows of
    # A = J R diag(s) are a1 and a2.
    A = (J @ rot) * s[..., None, :]  # (B, K, 2, 3)
    a1, a2 = A.unbind(-2)
    n1 = (a1 * a1).sum(-1)
    n2 = (a2 * a2).sum(-1)
    cxx = n1 + eps2d
    cxy = (a1 * a2).sum(-1)
    cyy = n2 + eps2d
    # det(A Aᵀ + eps·I) = |a1 × a2|² + eps·(|a1|² + |a2|²) + eps² (Lagrange's
    # identity): a sum of non-negative terms, so no cancellation, and ≥ eps² > 0:
    # Σ2 is invertible even for zero or needle-thin scales.
    x1, y1, z1 = a1.unbind(-1)
    x2, y2, z2 = a2.unbind(-1)
    cross = torch.stack([y1 * z2 - z1 * y2, z1 * x2 - x1 * z2, x1 * y2 - y1 * x2], dim=-1)
    det = (cross * cross).sum(-1) + eps2d * (n1 + n2) + eps2d * eps2d
    conics = torch.stack([cyy / det, -cxy / det, cxx / det], dim=-1)
    return means2d, conics, depth, det, valid


def project_orthographic(means: Tensor, scales: Tensor, quats: Tensor, height: int, width: int,
                         eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`project` with the ``orthographic`` camera (z only orders; no depth gradient)."""
    return project("orthographic", means, scales, quats, height, width, eps2d)


def project_authors(means: Tensor, scales: Tensor, quats: Tensor, height: int, width: int,
                    eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`project` with the ``authors`` camera (legacy gsplat's, see :func:`_authors_screen`)."""
    return project("authors", means, scales, quats, height, width, eps2d)


def project_pinhole(means: Tensor, scales: Tensor, quats: Tensor, height: int, width: int,
                    eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`project` with the ``pinhole`` camera (true perspective, see :func:`_pinhole_screen`)."""
    return project("pinhole", means, scales, quats, height, width, eps2d)
