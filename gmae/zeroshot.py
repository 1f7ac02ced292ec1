"""Zero-shot readouts from depth-sorted Gaussians: partial renders, layers, edges, figure-ground.

Nothing here is trained. A GMAE decoder gives k Gaussians per image; sorting
them by depth and rendering subsets is all the paper does (its Figs. 4-7).

Order convention. The renderer composites in ascending z (nearest first, on
top). The readouts list Gaussians *far to near* -- the paper's "inverse-depth
ordering" -- so index 0 is the farthest: partial renders show the background
first and the objects last, and layer l - 1 is the nearest.

Every readout renders subsets of the same Gaussians. A subset is rendered by
giving the left-out Gaussians zero opacity, which the rasterizer skips exactly
(alpha < 1/255), so all subsets of a batch go through one `rasterize` call.

Rules (the paper describes them in words only; these are our exact versions):

* layers: the far-to-near list is cut into ``l`` equal consecutive groups
  (sizes differ by at most one when l does not divide k).
* edges: render groups 0..i cumulatively for i = 0..l-1 (each new, nearer
  group composited over the farther ones). A pixel's *layer index* is the last
  i whose group changed it by more than ``threshold`` (max over channels,
  images in [0, 1]); -1 if none did. Edges are where a pixel's index differs
  from its right or lower neighbour (the dead-leaves ground truth's
  convention). ``soft_edges`` averages the binary maps over levels l = 4, 8,
  16, 32 and thresholds 0.05, 0.1, 0.2, so that strong, coarse discontinuities
  score near 1 and fine or faint ones lower: a map that can be scored at every
  threshold (ODS/OIS/AP).
* figure-ground: a pixel is *figure* where the nearest ``near_fraction`` of the
  Gaussians (default 1/2), rendered alone, cover it with alpha >= 0.5 -- i.e.
  the near layers support it more than they let the far layers through. The
  one parameter is ``near_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.deadleaves import occlusion_boundaries
from .errors import GMAEError
from .render.gaussians import Gaussians, render_gaussians

EDGE_LEVELS = (32, 16, 8, 4)  # the paper's l@32 ... l@4
EDGE_THRESHOLDS = (0.05, 0.1, 0.2)
EDGE_THRESHOLD = 0.1  # the single threshold of the binary edge maps
PARTIAL_COUNTS = (32, 64, 128, 256, 512, 1024)  # the paper's K; "all" is always added
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


# --------------------------------------------------------------------------- readouts


def partial_renders(g: Gaussians, canvas: Canvas, counts=PARTIAL_COUNTS) -> tuple[list[int], torch.Tensor]:
    """Renders of the first K far-to-near Gaussians for each K in counts below k, then all k.

    -> (the K used, images (B, len(K), C, H, W)).
    """
    k = g.num
    used = [c for c in counts if 0 < c < k] + [k]
    keep = torch.arange(k, device=g.means.device) < torch.tensor(used, device=g.means.device).unsqueeze(1)
    return used, render_subsets(g, keep, canvas)[0]


def layers(g: Gaussians, canvas: Canvas, num_layers: int = 8, cumulative: bool = False):
    """Each of num_layers equal far-to-near groups rendered alone (or groups 0..i when cumulative).

    -> images (B, l, C, H, W), alpha (B, l, H, W); layer 0 is the farthest.
    """
    group = group_ids(g.num, num_layers, g.means.device)
    layer = torch.arange(num_layers, device=g.means.device).unsqueeze(1)
    keep = group <= layer if cumulative else group == layer  # (l, K)
    return render_subsets(g, keep, canvas)


def layer_index(cumulative: torch.Tensor, background: torch.Tensor | None, threshold: float = EDGE_THRESHOLD):
    """cumulative (B, l, C, H, W) renders of groups 0..i -> (B, H, W) long layer index (-1: none).

    The index of a pixel is the last group whose addition changed it by more than threshold.
    """
    B, L, C, H, W = cumulative.shape
    if background is None:
        before = cumulative.new_zeros(B, C, H, W)
    else:
        before = background.to(cumulative).view(1, C, 1, 1).expand(B, C, H, W)
    index = torch.full((B, H, W), -1, dtype=torch.long, device=cumulative.device)
    for i in range(L):
        changed = (cumulative[:, i] - before).abs().amax(dim=1) > threshold
        index[changed] = i
        before = cumulative[:, i]
    return index


def edges(g: Gaussians, canvas: Canvas, num_layers: int = 16, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """(B, H, W) bool edges at one level: where neighbouring pixels' layer indices differ."""
    cumulative, _ = layers(g, canvas, num_layers, cumulative=True)
    return occlusion_boundaries(layer_index(cumulative, canvas.background, threshold))


def soft_edges(g: Gaussians, canvas: Canvas, levels=EDGE_LEVELS, thresholds=EDGE_THRESHOLDS):
    """-> (soft, per_level): soft (B, H, W) float in [0, 1], the binary edge maps averaged over
    levels x thresholds (levels above k are left out; if all are, l = k is used).

    per_level is {level: (B, H, W) bool edges at EDGE_THRESHOLD} when that threshold is among
    `thresholds` (the paper's per-level figures), else an empty dict.
    """
    levels = [int(level) for level in levels if level <= g.num] or [g.num]
    total, per_level = None, {}
    for level in levels:
        cumulative, _ = layers(g, canvas, level, cumulative=True)
        for t in thresholds:
            e = occlusion_boundaries(layer_index(cumulative, canvas.background, t))
            total = e.float() if total is None else total + e.float()
            if t == EDGE_THRESHOLD:
                per_level[level] = e
    return total / (len(levels) * len(thresholds)), per_level


def figure_ground(g: Gaussians, canvas: Canvas, near_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Figure mask (B, H, W) bool: alpha >= 0.5 of the nearest near_fraction of the Gaussians.

    Also returns that near render (B, C, H, W) for display.
    """
    if not 0.0 < near_fraction < 1.0:
        raise GMAEError(f"near fraction must be in (0, 1); got {near_fraction}")
    k = g.num
    first_near = k - max(1, round(near_fraction * k))  # far-to-near position where the near part starts
    keep = (torch.arange(k, device=g.means.device) >= first_near).unsqueeze(0)  # (1, K)
    image, alpha = render_subsets(g, keep, canvas)
    return alpha[:, 0] >= 0.5, image[:, 0]


__all__ = [
    "EDGE_LEVELS",
    "EDGE_THRESHOLDS",
    "Canvas",
    "edges",
    "far_to_near",
    "figure_ground",
    "gaussians_of",
    "group_ids",
    "layer_index",
    "layers",
    "partial_renders",
    "render_subsets",
    "soft_edges",
]
