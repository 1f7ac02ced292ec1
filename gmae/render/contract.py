"""The rendering contract: what every rasterize backend computes, and the checks they share.

Every backend (``torch``, the oracle in :mod:`gmae.render.reference`; ``cpu``, the numba
kernel; ``gsplat`` on CUDA) imports its constants and checks from here, so they all
reject the same inputs, cull the same Gaussians and composite by the same rules.

Semantics (3D Gaussian Splatting conventions), per pixel with centre p:

* Gaussians are composited front to back in ascending depth; ties keep the
  input order (stable sort), so the lower index is in front.
* d = p - mean, q = dᵀ Σ⁻¹ d = a·dx² + 2b·dx·dy + c·dy² with conic (a, b, c),
  and αᵢ = min(max_alpha, oᵢ · exp(-q/2)).
* A contribution with αᵢ < :data:`ALPHA_MIN` (1/255) is skipped (it leaves T
  unchanged); every contribution with αᵢ ≥ 1/255 is included.
* Early stop: if T·(1-αᵢ) < :data:`T_MIN` (1e-4), Gaussian i and all later ones are excluded.
* out = Σ cᵢ αᵢ Tᵢ + T_final · background, alpha = 1 - T_final
  (:func:`expand_background`: None, (C,) or (B, C)).
* A Gaussian that can never reach α ≥ 1/255 anywhere, or has a non-finite
  parameter, is culled (:func:`footprint`).
* ``tile_cut="3sigma"`` (legacy gsplat's culling, for the authors' model) departs
  from the rule above on purpose: a Gaussian is then drawn only in the 16×16 tiles
  its box of ceil(3σ) pixels touches (:func:`sigma3_tile_box`), so the tails of
  opaque Gaussians beyond 3σ that still reach α ≥ 1/255 are cut at tile borders.

How a render is made -- backend, camera, compositing, depth temperature, alpha clamp, pixel convention, tile
culling -- is one :class:`RenderSettings`, built once from the model's config (:meth:`RenderSettings.from_config`)
and handed on whole: the model, :func:`gmae.render.gaussians.render_gaussians`, :func:`gmae.render.rasterize`, the
backends and the readouts' :class:`gmae.readouts.core.Canvas` all take it.

A backend is a function with the signature of :class:`RasterizeBackend`,
registered with :func:`gmae.render.register_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..errors import GMAEError

__all__ = [
    "ALPHA_MIN",
    "COMPOSITING",
    "CULL_MARGIN",
    "RasterizeBackend",
    "RenderSettings",
    "TILE",
    "TILE_CUTS",
    "T_MIN",
    "expand_background",
    "footprint",
    "sigma3_tile_box",
    "validate_inputs",
]

#: How contributions are combined: "sorted" (3DGS front-to-back alpha compositing, the contract) or
#: "weighted" (order-free weighted blending with depth weights; the torch backend's `_weighted_chunk`).
COMPOSITING = ("sorted", "weighted")
#: Side of a square screen tile, in pixels (as in 3DGS / gsplat).
TILE = 16
#: Which tiles list a Gaussian: "alpha" (the contract: every tile where its α can reach 1/255) or "3sigma"
#: (legacy gsplat's: the tiles its ceil(3σ) box touches; :func:`sigma3_tile_box`).
TILE_CUTS = ("alpha", "3sigma")
#: Contributions with α below this are skipped (3DGS: 1/255).
ALPHA_MIN = 1.0 / 255.0
#: A pixel stops before the Gaussian that would bring T below this.
T_MIN = 1e-4
#: Extra pixels added to the exact α ≥ 1/255 bounding box, so that rounding
#: in the box computation can never cull a contribution that counts.
CULL_MARGIN = 1.0


@dataclass(frozen=True)
class RenderSettings:
    """How Gaussians become an image: everything about a render except the Gaussians, the image size, the background
    and (for the depth-order gradient) the loss's curvature.

    backend: "auto" or a name in :data:`gmae.render.BACKENDS`; camera: a name in :data:`gmae.render.CAMERAS`
    (used by :func:`gmae.render.gaussians.render_gaussians`, which projects); compositing: one of
    :data:`COMPOSITING`; depth_tau: the depth-order gradient's temperature with sorted compositing (0: none; then
    the depths only order), the depth weights' with weighted compositing; max_alpha: the clamp on each α (0.99 as
    3DGS); pixel_origin: where pixel i is sampled (:data:`gmae.render.camera.PIXEL_ORIGIN_SHIFT`); tile_cut: one of
    :data:`TILE_CUTS`. :func:`validate_inputs` checks the values.
    """

    backend: str = "auto"
    camera: str = "orthographic"
    compositing: str = "sorted"
    depth_tau: float = 0.0
    max_alpha: float = 0.99
    pixel_origin: str = "centre"
    tile_cut: str = "alpha"

    @classmethod
    def from_config(cls, cfg) -> RenderSettings:
        """How a GMAE of ModelConfig `cfg` renders its images: its backend, camera, alpha clamp, pixel convention
        and tile culling, and weighted compositing for depth_grad "weighted" (whose temperature is part of the
        image). The depth-order gradient (depth_grad "swap") is a training-only setting that leaves the image as it
        is: it is off here, and `gmae.model.gmae.GMAE.render` turns it on while training."""
        weighted = cfg.depth_grad == "weighted"
        return cls(backend=cfg.render_backend, camera=cfg.camera, compositing="weighted" if weighted else "sorted",
                   depth_tau=cfg.depth_tau if weighted else 0.0, max_alpha=cfg.max_alpha,
                   pixel_origin=cfg.pixel_origin, tile_cut=cfg.tile_cut)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_inputs(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, height: int,
                    width: int, background: Tensor | None = None, settings: RenderSettings = RenderSettings(),
                    loss_curvature: Tensor | None = None) -> None:
    """Check the rasterizer inputs and their :class:`RenderSettings`, and raise :class:`GMAEError` with a clear message.

    Shapes: means2d (B, K, 2), conics (B, K, 3), colors (B, K, C) with C ≥ 1,
    opacities (B, K), depths (B, K), background None, (C,) or (B, C);
    with sorted compositing and depth_tau > 0, loss_curvature (B, H, W).
    Shared by every backend so they all reject the same inputs the same way.
    """
    if not isinstance(settings, RenderSettings):
        raise GMAEError(f"settings must be a gmae.render.RenderSettings; got {type(settings).__name__}")
    max_alpha, depth_tau, compositing, tile_cut = settings.max_alpha, settings.depth_tau, settings.compositing, \
        settings.tile_cut
    named = {
        "means2d": means2d,
        "conics": conics,
        "colors": colors,
        "opacities": opacities,
        "depths": depths,
    }
    if background is not None:
        named["background"] = background
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise GMAEError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise GMAEError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise GMAEError(
            "all rasterizer inputs must be on one device; got "
            + ", ".join(f"{n} on {t.device}" for n, t in named.items())
        )

    if means2d.dim() != 3 or means2d.shape[-1] != 2:
        raise GMAEError(f"means2d must have shape (B, K, 2); got {_shape(means2d)}")
    B, K = means2d.shape[:2]
    if _shape(conics) != (B, K, 3):
        raise GMAEError(
            f"conics must have shape (B, K, 3) matching means2d (B, K, 2) = "
            f"{_shape(means2d)}; got {_shape(conics)}"
        )
    if colors.dim() != 3 or colors.shape[:2] != (B, K) or colors.shape[-1] < 1:
        raise GMAEError(
            f"colors must have shape (B, K, C) with C >= 1 matching means2d (B, K, 2) = "
            f"{_shape(means2d)}; got {_shape(colors)}"
        )
    for name, t in (("opacities", opacities), ("depths", depths)):
        if _shape(t) != (B, K):
            raise GMAEError(
                f"{name} must have shape (B, K) matching means2d (B, K, 2) = "
                f"{_shape(means2d)}; got {_shape(t)}"
            )
    C = colors.shape[-1]
    if background is not None and _shape(background) not in {(C,), (B, C)}:
        raise GMAEError(
            f"background must be None or have shape (C,) = ({C},) or (B, C) = ({B}, {C}); "
            f"got {_shape(background)}"
        )
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GMAEError(f"{name} must be a positive int; got {v!r}")
    if not isinstance(max_alpha, (int, float)) or not (0.0 < float(max_alpha) <= 1.0):
        raise GMAEError(f"max_alpha must be a number in (0, 1]; got {max_alpha!r}")
    if isinstance(depth_tau, bool) or not isinstance(depth_tau, (int, float)) or not float(depth_tau) >= 0.0:
        raise GMAEError(f"depth_tau must be a number >= 0 (0 = no depth-order gradient); got {depth_tau!r}")
    if tile_cut not in TILE_CUTS:
        raise GMAEError(f"tile_cut must be one of {', '.join(TILE_CUTS)}; got {tile_cut!r}")
    if compositing not in COMPOSITING:
        raise GMAEError(f"compositing must be one of {', '.join(COMPOSITING)}; got {compositing!r}")
    if compositing == "weighted" and not depth_tau > 0:
        raise GMAEError("weighted compositing needs depth_tau > 0, the temperature of its depth weights exp(-z/tau)")
    if compositing == "sorted" and depth_tau > 0:
        if loss_curvature is None:
            raise GMAEError("the depth-order gradient (depth_tau > 0) needs loss_curvature (B, H, W), the loss's "
                            "second derivative per pixel and channel (2 x the pixel's weight for an MSE)")
        if not isinstance(loss_curvature, Tensor) or not loss_curvature.is_floating_point():
            raise GMAEError("loss_curvature must be a floating-point torch.Tensor")
        if _shape(loss_curvature) != (B, height, width):
            raise GMAEError(f"loss_curvature must have shape (B, H, W) = ({B}, {height}, {width}); "
                            f"got {_shape(loss_curvature)}")
        if loss_curvature.device != means2d.device:
            raise GMAEError(f"loss_curvature is on {loss_curvature.device}, the Gaussians on {means2d.device}")


def expand_background(
    background: Tensor | None, batch: int, channels: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Return the background as (B, C) (or None when there is no background term)."""
    if background is None:
        return None
    background = background.to(dtype=dtype, device=device)
    return background.expand(batch, channels) if background.dim() == 1 else background


def footprint(
    conics: Tensor,
    opacities: Tensor,
    means: Tensor | None = None,
    colors: Tensor | None = None,
    depths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Opacity-aware screen half-extents of each Gaussian, for culling.

    conics (..., 3), opacities (...), optional means (..., 2), colors (..., C)
    and depths (...). Returns rx, ry (...): half-widths in pixels (CULL_MARGIN
    included) of the box holding every pixel where α can reach 1/255, and
    ``keep`` (...) bool, False for Gaussians that can never contribute (not
    positive definite, opacity < 1/255) or must not (any non-finite parameter,
    colour and depth included: a NaN colour or depth would otherwise poison
    the pixels it covers). Shared by the backends so that they all cull alike.
    """
    with torch.no_grad():
        a, b, c = conics.unbind(-1)
        det = a * c - b * b
        keep = (
            torch.isfinite(conics).all(-1)
            & torch.isfinite(opacities)
            # A degenerate (det ≤ 0) or negative-definite conic has no bounded
            # footprint; treat it as culled instead of crashing or lighting the
            # whole screen.
            & (a > 0)
            & (det > 0)
            # α ≤ o, so o < 1/255 can never contribute.
            & (opacities >= ALPHA_MIN)
        )
        if means is not None:
            keep &= torch.isfinite(means).all(-1)
        if colors is not None:
            keep &= torch.isfinite(colors).all(-1)
        if depths is not None:
            keep &= torch.isfinite(depths)
        one = torch.ones_like(det)
        det = torch.where(keep, det, one)
        a = torch.where(keep, a, one)
        c = torch.where(keep, c, one)
        # α ≥ 1/255  ⇔  o·exp(-q/2) ≥ 1/255  ⇔  q ≤ t = 2·ln(255·o).
        o = torch.where(keep, opacities, one)
        t = (2.0 * torch.log(255.0 * o)).clamp_min(0.0)
        # The ellipse dᵀΣ⁻¹d ≤ t has half-extents sqrt(t·Σxx), sqrt(t·Σyy) with
        # Σ = (Σ⁻¹)⁻¹: Σxx = c/det, Σyy = a/det.
        rx = torch.sqrt(t * c / det) + CULL_MARGIN
        ry = torch.sqrt(t * a / det) + CULL_MARGIN
    return rx, ry, keep


def sigma3_tile_box(means2d: Tensor, conics: Tensor, tiles_x: int, tiles_y: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Legacy gsplat's tile box of each Gaussian: inclusive tile ranges x0, x1, y0, y1 (...), empty when x0 > x1.

    means2d (..., 2) in the contract's pixel coordinates, conics (..., 3). As gsplat v0.1.1 does it
    (gsplat/cuda/csrc/helpers.cuh lines 11-68, forward.cu lines 69-85 and 116-118): the screen covariance is
    the inverse of the conic; its larger eigenvalue v1 = b + sqrt(max(0.1, b² - det)) with b the half trace
    gives the radius r = ceil(3·sqrt(v1)) pixels; the box spans tiles (int)(c/16 - r/16) to (int)(c/16 + r/16 + 1)
    (exclusive), clamped to the grid, around the centre c in gsplat's own pixel frame, where pixel i is sampled at
    i (the contract's i + 0.5, so c = means2d - 0.5). (int) truncates towards zero; after the clamp at 0 that is
    floor.
    """
    with torch.no_grad():
        a, b, c = conics.unbind(-1)
        det = a * c - b * b
        # Σ = conic⁻¹: (c, -b, a) / det (a non-positive det is culled by footprint; keep the arithmetic finite)
        safe = torch.where(det > 0, det, torch.ones_like(det))
        sxx, syy, sxy = c / safe, a / safe, -b / safe
        half = 0.5 * (sxx + syy)
        root = torch.sqrt(torch.clamp(half * half - (sxx * syy - sxy * sxy), min=0.1))
        radius = torch.ceil(3.0 * torch.sqrt(half + root))
        radius = torch.where(torch.isfinite(radius), radius, torch.zeros_like(radius)).clamp_max(1e7)
        cx, cy = (means2d[..., 0] - 0.5) / TILE, (means2d[..., 1] - 0.5) / TILE
        r = radius / TILE

        def span(centre: Tensor, n: int) -> tuple[Tensor, Tensor]:
            lo = torch.floor(centre - r).clamp(0, n)
            hi = torch.floor(centre + r + 1.0).clamp(0, n)  # exclusive
            return lo.long(), hi.long() - 1

        x0, x1 = span(torch.nan_to_num(cx, nan=-1e9), tiles_x)
        y0, y1 = span(torch.nan_to_num(cy, nan=-1e9), tiles_y)
    return x0, x1, y0, y1


class RasterizeBackend(Protocol):
    """The signature of a rasterize backend, as :func:`gmae.render.rasterize` calls it.

    means2d (B, K, 2), conics (B, K, 3), colors (B, K, C), opacities (B, K), depths (B, K) ->
    image (B, C, H, W), alpha (B, H, W), following the contract above, rendered as ``settings`` says
    (its backend and camera are already chosen and applied). A backend is handed only what it implements:
    sorted compositing with ``depth_tau > 0`` (and ``loss_curvature``) only if it is in
    :data:`gmae.render.DEPTH_GRAD_BACKENDS`, weighted compositing only in :data:`gmae.render.WEIGHTED_BACKENDS`,
    ``tile_cut="3sigma"`` only in :data:`gmae.render.TILE_CUT_BACKENDS` (:func:`gmae.render.resolve_backend`).
    """

    def __call__(self, means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, depths: Tensor, *,
                 height: int, width: int, background: Tensor | None = None,
                 settings: RenderSettings = RenderSettings(),
                 loss_curvature: Tensor | None = None) -> tuple[Tensor, Tensor]: ...
