"""What every readout starts from: a GMAE model's Gaussians far to near, and renders of subsets of them.

Order convention. The renderer composites in ascending z (nearest first, on
top). The readouts list Gaussians *far to near* -- the paper's "inverse-depth
ordering" -- so index 0 is the farthest: partial renders show the background
first and the objects last, and layer l - 1 is the nearest.

Every readout renders subsets of the same Gaussians. A subset is rendered by
giving the left-out Gaussians zero opacity, which the rasterizer skips exactly
(alpha < 1/255), so all subsets of a batch go through one `rasterize` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GMAEError
from ..render.gaussians import Gaussians, render_gaussians

__all__ = ["RENDER_CHUNK", "Canvas", "far_to_near", "gaussians_of", "group_ids", "render_subsets", "require_gmae"]

# Images rendered per rasterize call: bounds memory at B * subsets * C * H * W floats.
RENDER_CHUNK = 64


@dataclass
class Canvas:
    """Where Gaussians are rendered: the model's image size, background, backend and camera."""

    height: int
    width: int
    background: torch.Tensor | None = None  # (C,), None = black
    backend: str = "auto"
    camera: str = "orthographic"  # a name in gmae.render.CAMERAS: the one the model was trained with
    compositing: str = "sorted"  # and how it composited ("weighted": with depth weights of temperature depth_tau)
    depth_tau: float = 0.0

    @classmethod
    def of(cls, model) -> Canvas:
        require_gmae(model)
        size = model.cfg.img_size
        weighted = model.compositing == "weighted"
        return cls(size, size, model.background, model.cfg.render_backend, model.cfg.camera, model.compositing,
                   model.cfg.depth_tau if weighted else 0.0)


def require_gmae(model) -> None:
    if getattr(model.cfg, "model", None) != "gmae":
        raise GMAEError("zero-shot readouts need a GMAE checkpoint (this one is an MAE: it has no Gaussians)")


@torch.no_grad()
def gaussians_of(model, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None) -> Gaussians:
    """The k Gaussians a GMAE model decodes for imgs (B, C, H, W), far to near.

    noise (B, N): the masking noise when mask_ratio > 0 (default: seeded, fixed).

    mask_ratio 0 (default) lets the encoder see the whole image; the decoder
    was trained on a quarter of the patches but reads all of them well (the
    readouts are about the image, not about filling holes).
    """
    require_gmae(model)
    model.eval()
    if noise is None:
        # A readout must not depend on a random draw: with nothing masked, keep
        # the tokens in image order (masking shuffles them by its noise, which
        # changes float rounding); otherwise use a fixed seed.
        B, N = imgs.shape[0], model.cfg.num_patches
        if mask_ratio == 0:
            noise = torch.arange(N, dtype=torch.float32).expand(B, N)
        else:
            noise = torch.rand(B, N, generator=torch.Generator().manual_seed(0))
        noise = noise.to(imgs.device)
    latent, _, ids_restore = model.encoder(imgs, mask_ratio, noise)
    return far_to_near(model.forward_decoder(latent, ids_restore))


def far_to_near(g: Gaussians) -> Gaussians:
    """The same Gaussians ordered farthest (largest z) first; ties in index order."""
    return g.sorted_by_depth(far_first=True)


def group_ids(k: int, num_groups: int, device=None) -> torch.Tensor:
    """(k,) group of each position in a far-to-near list cut into num_groups equal consecutive groups."""
    if not 1 <= num_groups <= k:
        raise GMAEError(f"number of layers must be between 1 and the number of Gaussians ({k}); got {num_groups}")
    return torch.arange(k, device=device) * num_groups // k


def render_subsets(g: Gaussians, keep: torch.Tensor, canvas: Canvas) -> tuple[torch.Tensor, torch.Tensor]:
    """Render, for each image, S subsets of its Gaussians.

    keep (B, S, K) or (S, K) bool -> images (B, S, C, H, W), alpha (B, S, H, W).
    """
    B, K = g.opacities.shape
    keep = keep.expand(B, -1, -1) if keep.dim() == 2 else keep
    S = keep.shape[1]

    def repeat(t: torch.Tensor) -> torch.Tensor:  # (B, K, ...) -> (B * S, K, ...)
        return t.unsqueeze(1).expand(B, S, *t.shape[1:]).flatten(0, 1)

    # Every subset holds all K Gaussians; the left-out ones get zero opacity.
    opacities = (g.opacities.unsqueeze(1) * keep.to(g.opacities.dtype)).flatten(0, 1)  # (B * S, K)
    means, scales, quats, colors = (repeat(t) for t in (g.means, g.scales, g.quats, g.colors))
    images, alphas = [], []
    for start in range(0, B * S, RENDER_CHUNK):
        rows = slice(start, start + RENDER_CHUNK)
        sub = Gaussians(means[rows], scales[rows], quats[rows], colors[rows], opacities[rows])
        image, alpha = render_gaussians(sub, canvas.height, canvas.width, canvas.background, canvas.backend,
                                        camera=canvas.camera, compositing=canvas.compositing,
                                        depth_tau=canvas.depth_tau)
        images.append(image)
        alphas.append(alpha)
    image, alpha = torch.cat(images), torch.cat(alphas)
    return image.view(B, S, *image.shape[1:]), alpha.view(B, S, *alpha.shape[1:])
