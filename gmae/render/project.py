"""Projection of 3D Gaussians to screen space (plain, differentiable PyTorch).

The default GMAE camera is orthographic: world x, y in (-1, 1) map onto the
whole image and z is only used for depth ordering. Projection is per Gaussian
(not per pixel), so autograd is cheap here and no custom backward is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmae.errors import GMAEError

__all__ = ["project_orthographic", "quat_to_rotmat"]


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from quaternions (w, x, y, z).

    Args:
        quats: (..., 4); normalised here, so any non-zero scale is fine.

    Returns:
        (..., 3, 3) rotation matrices R (applied as R @ v).
    """
    if quats.shape[-1:] != (4,):
        raise GMAEError(f"quats must have shape (..., 4) in (w, x, y, z) order; got {tuple(quats.shape)}")
    # clamp_min keeps a zero quaternion finite (it then maps to the identity).
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
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

    rot = quat_to_rotmat(quats)  # (B, K, 3, 3)
    # Σ3 = (R·diag(s)) (R·diag(s))ᵀ: scaling the columns of R by s.
    m = rot * scales[..., None, :]
    cov3 = m @ m.transpose(-1, -2)
    # J is diagonal in x, y, so J Σ3 Jᵀ only rescales the top-left 2×2 block.
    sx, sy = width / 2.0, height / 2.0
    cxx = sx * sx * cov3[..., 0, 0] + eps2d
    cxy = sx * sy * cov3[..., 0, 1]
    cyy = sy * sy * cov3[..., 1, 1] + eps2d
    det = cxx * cyy - cxy * cxy
    conics = torch.stack([cyy / det, -cxy / det, cxx / det], dim=-1)
    x, y, z = means.unbind(-1)
    means2d = torch.stack([(x + 1.0) * sx, (y + 1.0) * sy], dim=-1)
    return means2d, conics, z
