"""Gaussian splatting: projection of 3D Gaussians and differentiable rasterization.

Public entry points:

* :func:`project` (and :data:`CAMERAS`) — 3D Gaussians (means, scales, quats)
  to screen-space (means2d, conics, depths) with a camera chosen by name
  (``orthographic``, ``authors``, ``pinhole``; see :mod:`gmae.render.camera`).
* :func:`rasterize` — alpha-composite screen-space Gaussians into images, with
  a choice of backend. Every backend implements the same contract
  (:mod:`gmae.render.contract`: the compositing rules, culling and input
  checks, and the backend signature :class:`RasterizeBackend`); the torch
  backend (:mod:`gmae.render.reference`) is the oracle the others are tested against.

  How it renders is one :class:`RenderSettings` (backend, compositing, depth_tau, max_alpha, tile_cut; and
  for :func:`gmae.render.gaussians.render_gaussians`, camera and pixel_origin).

  ``depth_tau > 0`` asks for the depth-order gradient (see
  :func:`gmae.render.reference.depth_pair_gradient`); the backends in
  :data:`DEPTH_GRAD_BACKENDS` have it, the others refuse it.

Backends live in :data:`BACKENDS`. ``"torch"`` (the pure-PyTorch reference) is
always there; optional ones (``"cpu"``, a numba kernel in
``gmae.render.cpu``; ``"triton"``, Triton kernels for CUDA in
``gmae.render.triton_raster``; and ``"gsplat"``, CUDA, in ``gmae.render.cuda``) are imported the first time they are
asked for, so an optional backend that is missing never breaks ``import gmae.render``.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import Tensor

from ..errors import GMAEError
from .camera import (
    CAMERAS, Camera, get_camera, project, project_authors, project_orthographic, project_pinhole, quat_to_rotmat,
    register_camera,
)
from .contract import RasterizeBackend, RenderSettings, validate_inputs
from .reference import rasterize_torch

__all__ = [
    "BACKENDS",
    "CAMERAS",
    "Camera",
    "DEPTH_GRAD_BACKENDS",
    "RasterizeBackend",
    "RenderSettings",
    "TILE_CUT_BACKENDS",
    "WEIGHTED_BACKENDS",
    "get_camera",
    "is_available",
    "project",
    "project_authors",
    "project_orthographic",
    "project_pinhole",
    "register_camera",
    "quat_to_rotmat",
    "rasterize",
    "rasterize_torch",
    "register_backend",
    "resolve_backend",
]

logger = logging.getLogger("gmae.render")

#: Registered backends, name -> rasterize function (:class:`RasterizeBackend`).
BACKENDS: dict[str, RasterizeBackend] = {"torch": rasterize_torch}

#: Backends imported on first use: name -> (module, function name).
_OPTIONAL_BACKENDS: dict[str, tuple[str, str]] = {
    "cpu": ("gmae.render.cpu", "rasterize_cpu"),
    "triton": ("gmae.render.triton_raster", "rasterize_triton"),
    "gsplat": ("gmae.render.cuda", "rasterize_gsplat"),
}
_UNAVAILABLE: set[str] = set()
_LOGGED: set[tuple[str, str, bool]] = set()

#: Backends that implement the depth-order gradient (sorted compositing with ``depth_tau > 0``).
DEPTH_GRAD_BACKENDS: set[str] = {"torch", "cpu", "triton"}
#: Backends that implement ``compositing="weighted"``.
WEIGHTED_BACKENDS: set[str] = {"torch"}
#: Backends that implement ``tile_cut="3sigma"`` (legacy gsplat's tile culling; gsplat's own lists cannot be cut so).
TILE_CUT_BACKENDS: set[str] = {"torch", "cpu", "triton"}


def register_backend(name: str, fn: RasterizeBackend, depth_grad: bool = False, weighted: bool = False,
                     tile_cut: bool = False) -> None:
    """Add (or replace) a rasterize backend under ``name``; ``depth_grad``: it implements ``depth_tau > 0``;
    ``weighted``: it implements ``compositing="weighted"``; ``tile_cut``: it implements ``tile_cut="3sigma"``."""
    if name == "auto":
        raise GMAEError("'auto' is reserved and cannot name a render backend")
    BACKENDS[name] = fn
    for has, table in ((depth_grad, DEPTH_GRAD_BACKENDS), (weighted, WEIGHTED_BACKENDS),
                       (tile_cut, TILE_CUT_BACKENDS)):
        (table.add if has else table.discard)(name)


def _available(name: str) -> bool:
    """True if backend ``name`` is registered, importing optional ones on demand."""
    if name in BACKENDS:
        return True
    if name not in _OPTIONAL_BACKENDS or name in _UNAVAILABLE:
        return False
    module_name, fn_name = _OPTIONAL_BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself or a third-party dependency (e.g. numba) is absent:
        # the backend is simply unavailable. A missing *gmae* module imported
        # from inside it is a bug and must surface.
        missing = exc.name or ""
        if missing != module_name and missing.startswith("gmae"):
            raise
        logger.debug("render backend %r unavailable: %s", name, exc)
        _UNAVAILABLE.add(name)
        return False
    # Compiled kernels (numba, Triton, CUDA) are opaque to torch.compile: it runs them
    # as they are instead of trying to trace their Python.
    BACKENDS.setdefault(name, torch.compiler.disable(getattr(module, fn_name)))
    return True


def is_available(name: str) -> bool:
    """True if render backend ``name`` is registered or, for an optional one, imports (it is then registered)."""
    return _available(name)


def _valid_names() -> list[str]:
    names = set(BACKENDS) | {n for n in _OPTIONAL_BACKENDS if _available(n)}
    return ["auto", *sorted(names)]


def resolve_backend(backend: str, device: torch.device | str = "cpu", depth_grad: bool = False,
                    weighted: bool = False, tile_cut: bool = False) -> str:
    """Map a backend request to a registered backend name.

    ``"auto"`` picks, on CUDA, ``"triton"`` if triton imports, then ``"gsplat"``
    if it imports; on CPU ``"cpu"`` if available; else ``"torch"``; with ``depth_grad`` (the depth-order
    gradient) or ``weighted`` (weighted compositing) only backends that have
    it qualify (:data:`DEPTH_GRAD_BACKENDS`, :data:`WEIGHTED_BACKENDS`, and
    :data:`TILE_CUT_BACKENDS` with ``tile_cut``; ``"torch"`` has everything). The choice is logged once (logger
    ``"gmae.render"``). Unknown names, and a named backend without what is
    asked for, raise :class:`GMAEError`.
    """
    device = torch.device(device)

    wanted = [(depth_grad, DEPTH_GRAD_BACKENDS, "no depth-order gradient"),
              (weighted, WEIGHTED_BACKENDS, "no weighted compositing"),
              (tile_cut, TILE_CUT_BACKENDS, "no 3-sigma tile cut (legacy gsplat's culling)")]

    def has(name: str) -> bool:
        return all(not asked or name in table for asked, table, _ in wanted)

    if backend == "auto":
        # fastest first; "torch" runs everywhere and has everything
        preferred = {"cuda": ("triton", "gsplat"), "cpu": ("cpu",)}.get(device.type, ())
        name = next((n for n in preferred if _available(n) and has(n)), "torch")
        key = (name, device.type, depth_grad, weighted)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info("render backend 'auto' -> %r for %s tensors", name, device.type)
        return name
    if isinstance(backend, str) and _available(backend):
        if not has(backend):
            what, table = next((what, table) for asked, table, what in wanted if asked and backend not in table)
            raise GMAEError(f"render backend {backend!r} has {what}; use one of {', '.join(sorted(table))} "
                            f"(or auto)")
        return backend
    raise GMAEError(
        f"unknown or unavailable render backend {backend!r}; valid: {', '.join(_valid_names())}"
    )


def rasterize(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
    settings: RenderSettings = RenderSettings(),
    loss_curvature: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Render screen-space Gaussians front to back.

    Args:
        means2d: (B, K, 2) pixel coordinates, x right, y down, pixel centres
            at i + 0.5.
        conics: (B, K, 3) upper triangle (a, b, c) of the inverse 2D
            covariance: q = a·dx² + 2b·dx·dy + c·dy².
        colors: (B, K, C) any C ≥ 1.
        opacities: (B, K) in [0, 1].
        depths: (B, K), ascending = front to back; ties keep index order.
        height, width: image size.
        background: None (no background term), (C,) or (B, C).
        settings: how to render (:class:`RenderSettings`; its camera and pixel_origin are the projection's, and
            unused here). Its fields:
        backend: "auto", "torch", or another name in :data:`BACKENDS`.
        max_alpha: clamp on each α (0.99 as in 3DGS).
        depth_tau: 0 (default): depths only order the Gaussians and get no
            gradient, as in 3DGS. > 0: depths get the depth-order gradient
            (for each pixel's consecutive contributors, the gradient of the
            loss change their swap would cause, with the order relaxed as
            σ(Δz/depth_tau); see :func:`gmae.render.reference.depth_pair_gradient`).
            The forward pass is unchanged.
        loss_curvature: (B, H, W), ∂²L/∂image² per pixel (the same for every
            channel; 2·w for a loss Σ w·(image − target)²); needed with depth_tau > 0.
        compositing: "sorted" (default; 3DGS alpha compositing in depth order,
            the contract above) or "weighted" (order-free weighted blending:
            colour = Σcᵢαᵢwᵢ/Σαᵢwᵢ · (1 − Π(1−αᵢ)) with wᵢ = exp(−zᵢ/depth_tau),
            the depths differentiable through the weights; backends in
            :data:`WEIGHTED_BACKENDS`; see :func:`gmae.render.reference._weighted_chunk`).
        tile_cut: "alpha" (default; every contribution with α ≥ 1/255 is drawn) or
            "3sigma" (legacy gsplat's culling: a Gaussian is drawn only in the tiles
            its ceil(3σ) box touches, :func:`gmae.render.contract.sigma3_tile_box`;
            backends in :data:`TILE_CUT_BACKENDS`).

    Returns:
        image (B, C, H, W) = Σ cᵢαᵢTᵢ + T_final·background and
        alpha (B, H, W) = 1 - T_final. Differentiable in means2d, conics,
        colors, opacities and background, and in depths when depth_tau > 0.
    """
    validate_inputs(means2d, conics, colors, opacities, depths, height, width, background, settings, loss_curvature)
    weighted = settings.compositing == "weighted"
    name = resolve_backend(settings.backend, means2d.device, depth_grad=settings.depth_tau > 0 and not weighted,
                           weighted=weighted, tile_cut=settings.tile_cut != "alpha")
    return BACKENDS[name](means2d, conics, colors, opacities, depths, height=height, width=width,
                          background=background, settings=settings,
                          loss_curvature=loss_curvature if settings.depth_tau > 0 else None)
