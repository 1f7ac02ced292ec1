"""Projection of 3D Gaussians to screen space (plain, differentiable PyTorch).

The default GMAE camera is orthographic: world x, y in (-1, 1) map onto the
whole image and z is only used for depth ordering. Projection is per Gaussian
(not per pixel), so autograd is cheap here and no custom backward is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmae.errors import GMAEError

__all__ = ["MAX_SCALE", "project_orthographic", "quat_to_rotmat"]


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


def project_orthographic(
    means: Tensor,
    scales: Tensor,
    quats: Tensor,
    height: int,
    width: int,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Orthographic projection of 3D Gaussians onto an H×W image.

    Pixel convention matches :func:`gmae.render.rasterize`: px = (x+1)/2·W,
    py = (y+1)/2·H, so x = -1 is the left edge of pixel 0 and y = -1 the top
    edge (y points down); depth = z.

    The 3D covariance is Σ3 = R·diag(s²)·Rᵀ; with the orthographic Jacobian
    J = [[W/2, 0, 0], [0, H/2, 0]] the screen covariance is
    Σ2 = J Σ3 Jᵀ + eps2d·I (gsplat's 0.3-pixel low-pass dilation, which keeps
    sub-pixel Gaussians visible and Σ2 invertible).

    Args:
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
    mean, scale or quaternion (or whose Σ2 overflows) gets means2d = 0,
    depth = 0 and conic = 0, which every rasterizer culls, and zero gradients.
    """
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

    # A Gaussian with a non-finite parameter, or whose screen covariance
    # overflows, gets the finite "culled" marker (conic 0, which no backend
    # renders: not positive definite). Its inputs are then swapped for harmless
    # values *before* the arithmetic (torch.where, not a multiply), so that its
    # gradients are exact zeros instead of 0·inf = NaN. The common case (all
    # fine) costs one check.
    means2d, conics, z, det = _project(means, scales, quats, height, width, eps2d)
    with torch.no_grad():
        ok = (torch.isfinite(means).all(-1) & torch.isfinite(scales).all(-1) & torch.isfinite(quats).all(-1)
              & torch.isfinite(means2d).all(-1) & torch.isfinite(z)
              # finite conics whose gradient (∂conic/∂det = -conic/det) is finite too
              & torch.isfinite(conics).all(-1) & torch.isfinite(conics / det[..., None]).all(-1))
    if not bool(ok.all()):
        keep = ok[..., None]
        identity = torch.zeros_like(quats)
        identity[..., 0] = 1.0
        means2d, conics, z, _ = _project(
            torch.where(keep, means, torch.zeros_like(means)),
            torch.where(keep, scales, torch.ones_like(scales)),
            torch.where(keep, quats, identity),
            height, width, eps2d,
        )
        means2d = torch.where(keep, means2d, torch.zeros_like(means2d))
        conics = torch.where(keep, conics, torch.zeros_like(conics))
        z = torch.where(ok, z, torch.zeros_like(z))
    return means2d, conics, z


#: Largest |scale| (world units; the image is 2 units across) used by the
#: projection. Beyond it a Gaussian is already a uniform layer over any image,
#: and the clamp keeps its covariance from overflowing (in float32 it would
#: otherwise turn into inf/NaN and vanish instead of covering the screen).
MAX_SCALE = 1e4


def _project(means: Tensor, scales: Tensor, quats: Tensor, height: int, width: int,
             eps2d: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The projection arithmetic (see :func:`project_orthographic`); also returns det Σ2."""
    rot = quat_to_rotmat(quats)  # (B, K, 3, 3)
    s = scales.clamp(-MAX_SCALE, MAX_SCALE)
    # With J = diag(W/2, H/2) on x, y, the screen covariance before dilation is
    # A Aᵀ where the rows of A = J_xy R diag(s) are a1 and a2.
    sx, sy = width / 2.0, height / 2.0
    a1 = sx * rot[..., 0, :] * s
    a2 = sy * rot[..., 1, :] * s
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
    x, y, z = means.unbind(-1)
    means2d = torch.stack([(x + 1.0) * sx, (y + 1.0) * sy], dim=-1)
    return means2d, conics, z, det
