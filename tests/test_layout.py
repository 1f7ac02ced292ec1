"""The layout monitor (does the geometry follow the image?) and the full-image fidelity figure.

Hand-made decoders: one whose Gaussians sit in the same place at the same depth for every image (the monitor must
call it image-independent, and its edge_follow must be exactly 0), one that puts its Gaussians on each image's own
edges with an image-dependent depth order (it must not), and one that only permutes a fixed layout per image
(the order-based figures pass it; edge_follow, which ignores the order, does not).
"""

from __future__ import annotations

import math

import pytest
import torch

from gmae.config import model_config
from gmae.model import build_model
from gmae.readouts.layout import (
    LAYOUT_RANK_CORR_MAX, LAYOUT_SPREAD_RATIO_MIN, decode_in_query_order, edge_maps, fidelity, judge_layout,
    layout_figures, layout_message, layout_monitor,
)
from gmae.render.gaussians import Gaussians

S, K, B = 32, 24, 6


def squares(n: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one bright square at a random place on black -> (images (n, 3, S, S), its corners (n, 4))."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, S, S)
    boxes = []
    for i in range(n):
        side = int(torch.randint(8, 14, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(2, S - side - 2, (2,), generator=g))
        images[i, :, y0:y0 + side, x0:x0 + side] = 1.0
        boxes.append([x0, y0, x0 + side, y0 + side])
    return images, torch.tensor(boxes, dtype=torch.float32)


def gaussians_at(xy_pixels: torch.Tensor, z: torch.Tensor) -> Gaussians:
    """(n, K, 2) pixel positions (orthographic camera: x = 2 px / S - 1) and (n, K) depths -> Gaussians."""
    n, k, _ = xy_pixels.shape
    means = torch.cat([2.0 * xy_pixels / S - 1.0, z[..., None]], -1)
    return Gaussians(means, torch.full((n, k, 3), 0.02), torch.tensor([1.0, 0, 0, 0]).expand(n, k, 4).clone(),
                     torch.full((n, k, 3), 0.5), torch.full((n, k), 0.8))


def on_edges(boxes: torch.Tensor, seed: int = 1) -> Gaussians:
    """K Gaussians spread along each image's square's outline, in an order and at depths drawn per image."""
    g = torch.Generator().manual_seed(seed)
    n = boxes.shape[0]
    t = torch.rand(n, K, generator=g) * 4.0  # position along the perimeter, side by side
    side = t.floor().long().clamp(max=3)
    f = t - side
    x0, y0, x1, y1 = boxes.unbind(-1)
    x0, y0, x1, y1 = (v[:, None].expand(n, K) for v in (x0, y0, x1, y1))
    x = torch.where(side == 0, x0 + f * (x1 - x0), torch.where(side == 1, x1, torch.where(side == 2, x1 - f * (x1 - x0), x0)))
    y = torch.where(side == 0, y0, torch.where(side == 1, y0 + f * (y1 - y0), torch.where(side == 2, y1, y1 - f * (y1 - y0))))
    return gaussians_at(torch.stack([x, y], -1), torch.rand(n, K, generator=g) * 2 - 1)


def grid(n: int) -> Gaussians:
    """The same K positions and depths for every image."""
    g = torch.Generator().manual_seed(2)
    xy = (torch.rand(K, 2, generator=g) * S).expand(n, K, 2)
    z = (torch.rand(K, generator=g) * 2 - 1).expand(n, K)
    return gaussians_at(xy.clone(), z.clone())


# --------------------------------------------------------------------------------------------- the figures


def test_a_fixed_layout_is_image_independent_and_its_edge_follow_is_zero():
    images, _ = squares()
    f = judge_layout(layout_figures(grid(B), images, "orthographic"))
    assert f["layout_spread"] == pytest.approx(0.0, abs=1e-6) and f["layout_spread_ratio"] < 1e-5
    assert f["depth_rank_corr"] == pytest.approx(1.0)
    assert f["edge_follow"] == pytest.approx(0.0, abs=1e-6)  # one density for every image: the two means are one
    assert f["image_independent"] and layout_message(f) is not None


def test_gaussians_on_each_images_edges_follow_the_image():
    images, boxes = squares()
    f = judge_layout(layout_figures(on_edges(boxes), images, "orthographic"))
    assert f["layout_spread_ratio"] > 0.6  # positions move with the square
    assert abs(f["depth_rank_corr"]) < 0.3  # depths drawn per image
    assert f["edge_corr"] > 0.5 and f["edge_follow"] > 0.3  # they sit on this image's edges, not the others'
    assert not f["image_independent"] and layout_message(f) is None


def test_gaussians_on_another_images_edges_follow_negatively():
    images, boxes = squares()
    f = layout_figures(on_edges(boxes.roll(1, 0)), images, "orthographic")
    assert f["edge_follow"] < -0.1


def test_a_permuted_fixed_layout_fools_the_order_figures_but_not_edge_follow():
    """Permuting a transformer decoder's queries permutes its outputs: the same set of Gaussians per image in
    another index order. The per-index figures read that as movement; edge_follow stays exactly 0."""
    images, _ = squares()
    fixed = grid(B)
    perms = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(i)) for i in range(B)])
    f = layout_figures(fixed.take(perms), images, "orthographic")
    assert f["layout_spread_ratio"] > 0.8 and abs(f["depth_rank_corr"]) < 0.3
    assert f["edge_follow"] == pytest.approx(0.0, abs=1e-6)


def test_the_thresholds_separate_the_hand_made_cases():
    """The guard's thresholds sit between a fixed layout (ratio 0, correlation 1) and an image-following one."""
    images, boxes = squares()
    fixed, follows = (layout_figures(g, images, "orthographic") for g in (grid(B), on_edges(boxes)))
    assert fixed["layout_spread_ratio"] < LAYOUT_SPREAD_RATIO_MIN < follows["layout_spread_ratio"]
    assert follows["depth_rank_corr"] < LAYOUT_RANK_CORR_MAX < fixed["depth_rank_corr"]


def test_edge_maps_peak_on_the_square_outline():
    images, boxes = squares(1)
    e = edge_maps(images, sigma=0.5)[0]  # the Sobel's 1 px and the blur's 2 px reach 3 px from an edge
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    assert e[(y0 + y1) // 2, (x0 + x1) // 2] < 1e-3  # flat in the middle (>= 4 px from every side)
    assert e[(y0 + y1) // 2, x0 - 1:x0 + 1].max() > 0.5 * e.max()  # strong on the left side


def test_the_figures_need_two_images():
    images, boxes = squares(1)
    with pytest.raises(ValueError, match="at least 2"):
        layout_figures(on_edges(boxes), images, "orthographic")


# --------------------------------------------------------------------------------- through a real model


def _model(**overrides):
    torch.manual_seed(0)
    cfg = model_config("tiny", img_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=2, num_gaussians=K, render_backend="torch",
                       camera="orthographic", **overrides)
    return build_model(cfg)


def test_the_monitor_reads_a_models_decoder_in_query_order(monkeypatch):
    """A GMAE whose decoder is replaced by the hand-made ones: the monitor goes through the model's own encoder
    call and decoder, with nothing masked, and keeps the query order."""
    model = _model()
    images, boxes = squares()
    seen = {}

    def fixed_decoder(latent, ids_restore):
        seen["tokens"] = latent.shape[1]
        return grid(latent.shape[0])

    monkeypatch.setattr(model, "forward_decoder", fixed_decoder)
    f = layout_monitor(model, images)
    assert seen["tokens"] == 1 + model.cfg.num_patches  # every patch visible
    assert judge_layout(f)["image_independent"] and f["edge_follow"] == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids: on_edges(boxes))
    assert not judge_layout(layout_monitor(model, images))["image_independent"]


def test_an_untrained_model_is_reported_image_independent():
    """At initialisation the decoder's positions barely depend on the image (the queries dominate)."""
    images, _ = squares()
    f = judge_layout(layout_monitor(_model(), images))
    assert f["layout_spread_ratio"] < LAYOUT_SPREAD_RATIO_MIN and f["image_independent"]


def test_decoding_does_not_touch_the_random_stream_or_the_training_mode():
    model = _model().train()
    images, _ = squares()
    state = torch.get_rng_state()
    a = decode_in_query_order(model, images)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    b = decode_in_query_order(model, images)
    assert torch.equal(a.means, b.means)


# ------------------------------------------------------------------------------------------- fidelity


def test_fidelity_of_a_half_black_half_white_image(monkeypatch):
    """The flat mean colour of a half-black, half-white image is grey 0.5: MSE 0.25, PSNR 10 log10(4) = 6.02 dB;
    a decoder that renders the image exactly (Gaussians can't, so the render is replaced) gains the difference."""
    model = _model()
    images = torch.zeros(2, 3, S, S)
    images[:, :, :, : S // 2] = 1.0
    f = fidelity(model, images)
    assert f["psnr_mean_colour"] == pytest.approx(10 * math.log10(4), abs=1e-4)
    assert f["psnr_gain"] == pytest.approx(f["psnr_full"] - f["psnr_mean_colour"])
    from gmae.readouts import core

    monkeypatch.setattr(core.Canvas, "render", lambda self, g: images.clone())
    assert fidelity(model, images)["psnr_full"] == pytest.approx(100.0)  # MSE clamped at 1e-10
