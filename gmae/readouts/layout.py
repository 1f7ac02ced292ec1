"""Does the geometry follow the image? The layout monitor and the full-image fidelity figure.

The paper's spatial claims rest on the decoder *placing* its Gaussians according to the image ("Gaussians are
positioned dynamically based on the image", GMAE paper, Fig. 7's caption). A model can train, and its loss fall,
while every query token puts its Gaussian in the same place and at the same depth for every image, and only
colour, opacity and size carry the image. These figures tell the two apart on a batch of images, read with
nothing masked and the Gaussians in query-token order (not sorted by depth):

* ``layout_spread_ratio``: the std over images of each Gaussian's on-screen position (x, y), averaged over the
  k Gaussians, divided by the std over the k Gaussians within one image, averaged over images (positions in
  image-width units; the std of a 2-d point set is the root of its two variances summed). 0: every Gaussian in
  the same place for every image; ~1: each as scattered over images as the layout is over the image.
* ``depth_rank_corr``: Spearman's correlation of the k depths between every pair of images, averaged. 1: one
  depth order for every image (so every depth readout is a function of the query order, not of the image).
* ``edge_follow``: whether the Gaussians' density follows *this* image's edges more than other images' edges.
  For images i, j: corr(D_i, E_j), the Pearson correlation over pixels of the density of i's Gaussian centres
  and the edge strength of image j (luminance Sobel magnitude), both blurred by a Gaussian of W/16 px; the
  figure is the mean over i of corr(D_i, E_i) minus the mean over i != j. A layout that does not depend on the
  image gives exactly 0 (each image's density is the same, so the two means are one mean); > 0: the
  Gaussians gather where their own image has edges. It counts centres, not opacities: it measures where the
  Gaussians are, which colour and opacity cannot change. ``edge_corr`` is the first mean alone.

The first two are the figures a run's metrics log and the guard judges (:func:`judge_layout`); both read the
Gaussians by their index, so a decoder that merely permuted its Gaussians per image would pass them; the third
does not depend on the order (permuting queries permutes a transformer decoder's outputs and nothing else).

The fidelity figure (:func:`fidelity`): PSNR of the model's full render at mask ratio 0 against the image, beside
the PSNR of painting each image its own mean colour, the floor any model of the image should clear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..render.camera import project
from ..render.gaussians import Gaussians
from .core import Canvas

__all__ = ["LAYOUT_RANK_CORR_MAX", "LAYOUT_SPREAD_RATIO_MIN", "decode_in_query_order", "edge_maps", "fidelity",
           "judge_layout", "layout_figures", "layout_message", "layout_monitor"]

#: The guard calls a layout image-independent when its spread ratio is below this ...
LAYOUT_SPREAD_RATIO_MIN = 0.3
#: ... or its depth-rank correlation between images above this (docs/reports/layout.md,
#: "How it is measured", says how the two were calibrated).
LAYOUT_RANK_CORR_MAX = 0.9


@torch.no_grad()
def decode_in_query_order(model, imgs: torch.Tensor) -> Gaussians:
    """The k Gaussians a GMAE model decodes for imgs (B, C, H, W) with nothing masked, in query-token order.

    The tokens keep their image order (masking noise 0..N-1), so the result does not depend on a random draw."""
    was_training = model.training
    model.eval()
    try:
        B, N = imgs.shape[0], model.cfg.num_patches
        noise = torch.arange(N, dtype=torch.float32, device=imgs.device).expand(B, N)
        latent, _, ids_restore = model.encoder(imgs, 0.0, noise)
        return model.forward_decoder(latent, ids_restore)
    finally:
        model.train(was_training)


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """maps (B, H, W) blurred by a Gaussian of std sigma px (separable, zero padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(maps[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]


def edge_maps(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, H, W) edge strength: the Sobel magnitude of the luminance (the channels'
    mean), blurred by sigma px (default W/16)."""
    gray = images.float().mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy)[:, 0]
    return _blur(magnitude, sigma if sigma is not None else images.shape[-1] / 16.0)


def _density_maps(centres: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """centres (B, K, 2) in pixels -> (B, H, W): each on-screen centre's unit mass split bilinearly over the four
    nearest pixel centres, then blurred by sigma px. Centres off the screen count nowhere."""
    B, K, _ = centres.shape
    maps = torch.zeros(B, height * width, dtype=torch.float32, device=centres.device)
    x, y = centres[..., 0].float() - 0.5, centres[..., 1].float() - 0.5  # pixel i's centre at i + 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height) & torch.isfinite(w)
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()
            maps.scatter_add_(1, index, torch.where(inside, w, torch.zeros_like(w)))
    return _blur(maps.view(B, height, width), sigma)


def _pearson_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (n, P), b (m, P) -> (n, m) Pearson correlations of the rows (0 where a row is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """(n, K) -> (n, K) ranks 0..K-1 along K (a stable sort: ties in index order, as the renderer breaks them)."""
    order = torch.argsort(values, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    return ranks.float()


@torch.no_grad()
def layout_figures(g: Gaussians, images: torch.Tensor, camera: str, pixel_origin: str = "centre") -> dict[str, float]:
    """The layout figures of the module docstring for Gaussians g (B, K, ...) in query order, decoded from
    images (B, C, H, W) and seen through `camera`. Needs B >= 2 (they compare images)."""
    B, K = g.opacities.shape
    if B < 2:
        raise ValueError("the layout figures compare images: give at least 2")
    H, W = images.shape[-2:]
    means2d, _, depths = project(camera, g.means.float(), g.scales.float(), g.quats.float(), H, W,
                                 pixel_origin=pixel_origin)
    xy = means2d / means2d.new_tensor([W, W])  # image-width units
    over_images = torch.sqrt(xy.var(dim=0, unbiased=False).sum(-1)).mean()  # per Gaussian, then averaged
    over_queries = torch.sqrt(xy.var(dim=1, unbiased=False).sum(-1)).mean()  # per image, then averaged
    ranks = _ranks(depths)
    corr = _pearson_matrix(ranks, ranks)
    off = ~torch.eye(B, dtype=torch.bool, device=corr.device)
    sigma = W / 16.0
    follow = _pearson_matrix(_density_maps(means2d, H, W, sigma).flatten(1), edge_maps(images, sigma).flatten(1))
    return {
        "layout_spread": float(over_images),
        "layout_spread_across": float(over_queries),
        "layout_spread_ratio": float(over_images / over_queries.clamp_min(1e-12)),
        "depth_rank_corr": float(corr[off].mean()) if K > 1 else 1.0,
        "edge_corr": float(follow.diagonal().mean()),
        "edge_follow": float(follow.diagonal().mean() - follow[off].mean()),
    }


def judge_layout(figures: dict) -> dict:
    """figures (:func:`layout_figures`, or a run's logged ones) with the verdict "image_independent": the spread
    ratio below :data:`LAYOUT_SPREAD_RATIO_MIN` or the depth-rank correlation above :data:`LAYOUT_RANK_CORR_MAX`."""
    independent = (figures["layout_spread_ratio"] < LAYOUT_SPREAD_RATIO_MIN
                   or figures["depth_rank_corr"] > LAYOUT_RANK_CORR_MAX)
    return {**figures, "image_independent": bool(independent)}


def layout_message(layout: dict) -> str | None:
    """The one line the readouts print when `layout` (:func:`judge_layout`) says image-independent; else None."""
    if not layout.get("image_independent"):
        return None
    return (f"layout does not follow the image: each Gaussian's position varies {layout['layout_spread_ratio']:.2f}x "
            f"as much over images as over the layout (< {LAYOUT_SPREAD_RATIO_MIN}) or its depth order correlates "
            f"{layout['depth_rank_corr']:.2f} between images (> {LAYOUT_RANK_CORR_MAX}): these readouts show the "
            "model's fixed layout more than this image")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


@torch.no_grad()
def fidelity(model, images: torch.Tensor, g: Gaussians | None = None) -> dict[str, float]:
    """PSNR (dB, averaged over images) of the full render at mask ratio 0, of each image's flat mean colour, and
    the gain of the first over the second. g: the Gaussians of images (:func:`decode_in_query_order`), if at hand."""
    g = decode_in_query_order(model, images) if g is None else g
    render = Canvas.of(model).render(g).clamp(0, 1)
    flat = images.float().mean(dim=(-2, -1), keepdim=True).expand_as(images)
    ours, floor = _psnr(render, images).mean(), _psnr(flat, images).mean()
    return {"psnr_full": float(ours), "psnr_mean_colour": float(floor), "psnr_gain": float(ours - floor)}


@torch.no_grad()
def layout_monitor(model, images: torch.Tensor) -> dict[str, float]:
    """The layout figures and the fidelity of a GMAE model on images (B >= 2), from one decode."""
    g = decode_in_query_order(model, images)
    return {**layout_figures(g, images, model.cfg.camera, model.cfg.pixel_origin), **fidelity(model, images, g)}
