"""What every readout starts from: a GMAE model's Gaussians near to far, and renders of subsets of them.

Order convention (:func:`near_to_far`, the one place that defines it). Smaller
z is nearer: every camera (:mod:`gmae.render.camera`) looks down +z and the
renderer composites in ascending z, the lower index first on ties
(:mod:`gmae.render.contract`). The readouts list each image's Gaussians *near
to far* in exactly that compositing order -- ascending z, a stable sort, so
Gaussians of equal z keep their index (query-token) order -- as the authors'
code does (``limit_gaussian_z`` sorts z ascending and keeps the first K):
index 0 is the nearest, partial renders are the K nearest, layer 1 is the
nearest group. A readout that builds up from the back (edges) reads the same
list from its far end (:func:`from_far_end`).

When the depths have collapsed (all z at a limit, or no spread), the sort has
nothing to order and the list is the query-token order: :func:`depth_collapse`
measures that on the Gaussians actually read, and the commands and the API say
so (:func:`collapse_message`).

Every readout renders subsets of the same Gaussians. A subset is rendered by
giving the left-out Gaussians zero opacity, which the rasterizer skips exactly
(alpha < 1/255), so all subsets of a batch go through one `rasterize` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GMAEError
from ..render.contract import RenderSettings
from ..render.gaussians import Gaussians, render_gaussians

__all__ = ["COLLAPSE_AT_LIMIT", "COLLAPSE_SPREAD", "RENDER_CHUNK", "Canvas", "collapse_message", "depth_collapse",
           "from_far_end", "gaussians_of", "group_ids", "judge_collapse", "near_to_far", "render_subsets",
           "require_gmae"]

# Images rendered per rasterize call: bounds memory at B * subsets * C * H * W floats.
RENDER_CHUNK = 64


@dataclass
class Canvas:
    """Where Gaussians are rendered: the model's image size and background, and how it renders
    (:class:`gmae.render.RenderSettings`: its backend, camera, compositing, alpha clamp, pixel convention and tile
    culling)."""

    height: int
    width: int
    background: torch.Tensor | None = None  # (C,), None = black
    settings: RenderSettings = RenderSettings()

    @classmethod
    def of(cls, model) -> Canvas:
        """The canvas of a GMAE model: its render settings without the depth-order gradient (a training-only
        setting that leaves the image as it is)."""
        require_gmae(model)
        size = model.cfg.img_size
        return cls(size, size, model.background, model.render_settings)

    def render(self, g: Gaussians) -> torch.Tensor:
        """(B, C, H, W): all of g rendered as the model renders (no gradient-only settings)."""
        return render_gaussians(g, self.height, self.width, self.background, self.settings)[0]


def require_gmae(model) -> None:
    if getattr(model.cfg, "model", None) != "gmae":
        raise GMAEError("zero-shot readouts need a GMAE checkpoint (this one is an MAE: it has no Gaussians)")


@torch.no_grad()
def gaussians_of(model, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None) -> Gaussians:
    """The k Gaussians a GMAE model decodes for imgs (B, C, H, W), near to far (:func:`near_to_far`).

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
    return near_to_far(model.forward_decoder(latent, ids_restore))


def near_to_far(g: Gaussians) -> Gaussians:
    """The readouts' order: the same Gaussians nearest (smallest z) first.

    A stable sort: Gaussians of equal z keep their index order, which is the
    order of the query tokens that emitted them, and the order in which the
    renderer composites ties (the lower index in front). So where depths have
    collapsed onto one value, this order is the query-token order, not depth.
    """
    return g.sorted_by_depth()


def from_far_end(g: Gaussians) -> Gaussians:
    """A :func:`near_to_far` list read from its far end: farthest first, ties in reverse index order
    (back to front, exactly the reverse of the renderer's compositing order)."""
    B, k = g.opacities.shape
    return g.take(torch.arange(k - 1, -1, -1, device=g.means.device).expand(B, k))


def group_ids(k: int, num_groups: int, device=None) -> torch.Tensor:
    """(k,) group of each position in a depth-ordered list cut into num_groups equal consecutive groups
    (group 0 is the first positions: the nearest of a near-to-far list)."""
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
        image, alpha = render_gaussians(sub, canvas.height, canvas.width, canvas.background, canvas.settings)
        images.append(image)
        alphas.append(alpha)
    image, alpha = torch.cat(images), torch.cat(alphas)
    return image.view(B, S, *image.shape[1:]), alpha.view(B, S, *alpha.shape[1:])


# --------------------------------------------------------------------------- the collapse guard

#: Depths have collapsed when more than this share of z sits at a limit of the bounded range (|z| >= 0.99)...
COLLAPSE_AT_LIMIT = 0.5
#: ... or when z's spread over an image's Gaussians (std, averaged over images) is below this, in world units
#: (the image spans 2; 0.01 is 1/200 of the bounded range and, under the authors' camera, a ~0.1% change of
#: on-screen size): too little for the sort to order anything but noise.
COLLAPSE_SPREAD = 0.01


@torch.no_grad()
def depth_collapse(gaussians: Gaussians | list[Gaussians], cfg) -> dict:
    """Whether the depth sort of these Gaussians (of the images a readout reads) orders depth at all.

    gaussians: one batch, or a list of batches of the same model; cfg: its ModelConfig.
    -> {"depth_at_limit", "depth_spread", "scale_at_cap", "num_images", "collapsed"}:
    the collapse monitors that `gmae pretrain` logs (:func:`gmae.model.gmae.gaussian_stats`) over all
    the images, and the verdict ``collapsed``: depth_at_limit > :data:`COLLAPSE_AT_LIMIT` or
    depth_spread < :data:`COLLAPSE_SPREAD`.

    Why these: a collapsed run puts (nearly) every z on the sigmoid's limit (depth_at_limit ~1, spread
    ~0.001: docs/reports/depth.md), where z values tie or differ by float noise, so :func:`near_to_far` gives the
    query-token order; a healthy one spreads z over the range (random init: spread ~0.5, at_limit ~0; a
    run with 4 Gaussians per query at step 300: at_limit 0.19, spread 0.056 -- both pass). With
    ``depth_param "linear"`` z is unbounded: nothing is at a limit (depth_at_limit is 0) and only the
    spread counts. scale_at_cap is reported, not judged: capped scales alone leave the depth order free.
    """
    from ..model.gmae import gaussian_stats
    from ..render.camera import get_camera

    batches = [gaussians] if isinstance(gaussians, Gaussians) else list(gaussians)
    g = Gaussians(*(torch.cat([getattr(b, name) for b in batches]) for name in
                    ("means", "scales", "quats", "colors", "opacities")))
    stats = gaussian_stats(g, cfg.max_scale, get_camera(cfg.camera).scale_unit)
    return {**judge_collapse(stats, cfg), "num_images": g.means.shape[0]}


def judge_collapse(monitors: dict, cfg) -> dict:
    """The verdict of :func:`depth_collapse` on collapse monitors (as :func:`gmae.model.gmae.gaussian_stats`
    computes and `gmae pretrain` logs them) of a model with ModelConfig cfg.

    -> {"depth_at_limit", "depth_spread", "scale_at_cap", "collapsed"}; depth_at_limit is 0 for
    ``depth_param "linear"`` (unbounded z has no limit).
    """
    at_limit = 0.0 if cfg.depth_param == "linear" else float(monitors["depth_at_limit"])
    spread = float(monitors["depth_spread"])
    return {"depth_at_limit": at_limit, "depth_spread": spread, "scale_at_cap": float(monitors["scale_at_cap"]),
            "collapsed": bool(at_limit > COLLAPSE_AT_LIMIT or spread < COLLAPSE_SPREAD)}


def collapse_message(collapse: dict) -> str | None:
    """The one line the readouts print when `collapse` (:func:`depth_collapse`) says collapsed; None when healthy."""
    if not collapse["collapsed"]:
        return None
    n = collapse.get("num_images")
    on = "" if n is None else f" (on {n} image{'' if n == 1 else 's'})"
    return (f"depth collapsed: {collapse['depth_at_limit']:.0%} of z at a limit, spread {collapse['depth_spread']:.3g}"
            f"{on} -- the depth order of these readouts is the query-token order, not depth")
