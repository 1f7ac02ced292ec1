"""A batch of 3D Gaussians and the one call that turns them into an image.

The decoder emits `Gaussians`; training renders all of them, the zero-shot
readouts render depth-sorted subsets. Both go through `render_gaussians`, which
is the model's camera (`gmae.render.camera.project`) followed by the
rasterizer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .camera import project
from .contract import RenderSettings
from . import rasterize


@dataclass
class Gaussians:
    """k Gaussians per image, world units (the image spans x, y in (-1, 1)).

    means      (B, K, 3)  x right, y down, z depth (smaller z = nearer, drawn first)
    scales     (B, K, 3)  standard deviations along the Gaussian's own axes
    quats      (B, K, 4)  rotation as a quaternion (w, x, y, z)
    colors     (B, K, C)  in [0, 1]
    opacities  (B, K)     in [0, 1]
    """

    means: torch.Tensor
    scales: torch.Tensor
    quats: torch.Tensor
    colors: torch.Tensor
    opacities: torch.Tensor

    @property
    def num(self) -> int:
        return self.means.shape[1]

    def take(self, index: torch.Tensor) -> "Gaussians":
        """Select Gaussians per image: index (B, K') of positions along K."""
        def gather(t: torch.Tensor) -> torch.Tensor:
            idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
            return torch.gather(t, 1, idx)

        return Gaussians(**{f.name: gather(getattr(self, f.name)) for f in fields(self)})

    def sorted_by_depth(self) -> "Gaussians":
        """The same Gaussians ordered front (small z) to back, ties kept in index order: the renderer's
        compositing order (the readouts' order, :func:`gmae.readouts.core.near_to_far`)."""
        z = self.means[..., 2]
        order = torch.sort(z, dim=1, stable=True).indices
        return self.take(order)

    def detach(self) -> "Gaussians":
        return Gaussians(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


def render_gaussians(
    g: Gaussians,
    height: int,
    width: int,
    background: torch.Tensor | None = None,
    settings: RenderSettings = RenderSettings(),
    loss_curvature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project with `settings.camera` and splat: image (B, C, H, W), alpha (B, H, W).

    settings: how to render (:class:`gmae.render.RenderSettings`; a model's is
    `RenderSettings.from_config(model.cfg)`): the camera and pixel_origin project, the rest rasterizes. With
    sorted compositing, settings.depth_tau > 0 turns on the rasterizer's depth-order gradient, which needs
    `loss_curvature`; weighted compositing uses depth_tau as its weights' temperature (see
    :func:`gmae.render.rasterize`).
    """
    means2d, conics, depths = project(settings.camera, g.means, g.scales, g.quats, height, width,
                                      pixel_origin=settings.pixel_origin)
    return rasterize(means2d, conics, g.colors, g.opacities, depths, height=height, width=width,
                     background=background, settings=settings, loss_curvature=loss_curvature)
