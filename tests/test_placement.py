"""The options that try to make the Gaussians' placement follow the image (docs/reports/layout.md,
"Mechanisms"): each changes what it names and nothing else at its default, its gradient reaches the parameters it
adds or scales, and its output depends on the input where it should. Also why permuting the queries per image is
no mechanism at all: the decoder is permutation-equivariant in its queries.
"""

from __future__ import annotations

import pytest
import torch

from gmae.config import ModelConfig, model_config
from gmae.model import build_model
from gmae.model.gmae import gaussians_from_raw
from gmae.readouts.layout import decode_in_query_order

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
             decoder_num_heads=2, num_gaussians=12, render_backend="torch")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed=0, **options):
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **SMALL, **options))


def _images(n=3, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_defaults_are_the_model_from_before():
    """ModelConfig's defaults (the paper's presets': positions from the head) are the model from before the options."""
    plain = _model(position_source=ModelConfig.position_source)
    spelled = _model(position_gain=1.0, query_noise=0.0, position_source="head")
    for (k, a), b in zip(plain.state_dict().items(), spelled.state_dict().values()):
        assert torch.equal(a, b), k
    imgs = _images()
    torch.testing.assert_close(decode_in_query_order(plain, imgs).means, decode_in_query_order(spelled, imgs).means,
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ position gain


def test_position_gain_scales_the_raw_positions_and_speeds_their_gradient():
    raw = torch.randn(2, 5, 14, requires_grad=True)
    g = gaussians_from_raw(raw, 1.0, 1.0, position_gain=4.0)
    torch.testing.assert_close(g.means[..., :2], 2 * (torch.sigmoid(4 * raw[..., :2]) - 0.5))
    torch.testing.assert_close(g.means[..., 2], 2 * (torch.sigmoid(raw[..., 2]) - 0.5))  # z untouched
    g.means[..., :2].sum().backward()
    slope = raw.grad[..., :2].clone()
    raw.grad = None
    gaussians_from_raw(raw, 1.0, 1.0).means[..., :2].sum().backward()
    x = raw.detach()[..., :2]
    torch.testing.assert_close(slope, 4 * 2 * torch.sigmoid(4 * x) * (1 - torch.sigmoid(4 * x)))
    assert not torch.allclose(slope, raw.grad[..., :2])


# ------------------------------------------------------------------------------------------- query noise


def test_query_noise_jitters_each_image_while_training_only():
    model = _model(query_noise=0.5).train()
    imgs = _images(2)
    torch.manual_seed(3)
    a = model.forward_decoder(*model.encoder(imgs, 0.0)[::2])
    b = model.forward_decoder(*model.encoder(imgs, 0.0)[::2])
    assert not torch.allclose(a.means, b.means)  # a new draw each forward
    model.eval()
    c, d = (decode_in_query_order(model, imgs) for _ in range(2))
    assert torch.equal(c.means, d.means)  # none at evaluation
    assert torch.equal(c.means, decode_in_query_order(_model(), imgs).means)  # the noise-free model's output
    out = model.train()(imgs)
    out.loss.backward()
    assert model.query_embed.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------- pointer


def test_the_pointer_places_queries_among_the_visible_patches_and_follows_the_image():
    model = _model(position_source="pointer").eval()
    imgs = _images(3)
    noise = torch.rand(3, model.cfg.num_patches, generator=torch.Generator().manual_seed(0))
    latent, mask, ids_restore = model.encoder(imgs, 0.75, noise)
    g = model.forward_decoder(latent, ids_restore)
    # each Gaussian within one patch (2 * 8 / 32 = 0.5 world units) of the convex hull of the visible centres
    grid = 4
    centre = (torch.arange(grid) + 0.5) * (2.0 / grid) - 1.0
    xy = torch.stack(torch.meshgrid(centre, centre, indexing="xy"), -1).reshape(-1, 2)
    for b in range(3):
        visible = xy[mask[b] == 0]
        lo, hi = visible.min(0).values - 0.5, visible.max(0).values + 0.5
        assert ((g.means[b, :, :2] >= lo - 1e-6) & (g.means[b, :, :2] <= hi + 1e-6)).all()
    # the same queries, other images: other places (the head's positions would move far less)
    a, b = (decode_in_query_order(model, im) for im in (imgs[:2], imgs[1:3]))
    assert (a.means[1, :, :2] - b.means[0, :, :2]).abs().max() == 0  # same image, same places
    assert (a.means[0, :, :2] - b.means[0, :, :2]).abs().max() > 0.05


def test_the_pointer_gets_gradient():
    model = _model(position_source="pointer").train()
    out = model(_images(2), mask_ratio=0.5)
    out.loss.backward()
    for name in ("pointer_query.weight", "pointer_key.weight"):
        assert dict(model.named_parameters())[name].grad.abs().max() > 0, name
    assert model.gaussian_head.weight.grad[0:2].abs().max() > 0  # the offsets too


# ------------------------------------------------------------------------------------------------ slots


def test_slots_share_out_the_patches_and_sit_at_the_centre_of_those_they_win(monkeypatch):
    """Slot attention's competition: every patch's attention sums to 1 over the slots; each slot's anchor is the
    weighted mean of the centres of the patches it won, so inside their hull; different images, other places."""
    from gmae.model import gmae as gmae_module

    model = _model(position_source="slots").eval()
    imgs = _images(3)
    shares = []
    softmax = torch.softmax

    def spy(t, dim):
        out = softmax(t, dim=dim)
        shares.append((out, dim))
        return out

    monkeypatch.setattr(gmae_module.torch, "softmax", spy)
    g = decode_in_query_order(model, imgs)
    monkeypatch.setattr(gmae_module.torch, "softmax", softmax)
    assert len(shares) == gmae_module.SLOT_ITERATIONS and all(dim == 1 for _, dim in shares)
    last = shares[-1][0]  # (B, q, n)
    torch.testing.assert_close(last.sum(1), torch.ones(3, model.cfg.num_patches))
    # anchors (offsets of at most a patch, 0.5 world units, around them) within the image and near the patch hull
    assert (g.means[..., :2].abs() <= 0.75 + 0.5 + 1e-6).all()
    a, b = (decode_in_query_order(model, im) for im in (imgs[:2], imgs[1:3]))
    assert (a.means[1, :, :2] - b.means[0, :, :2]).abs().max() < 1e-6
    assert (a.means[0, :, :2] - b.means[0, :, :2]).abs().max() > 0.01


def test_slots_get_gradient():
    model = _model(position_source="slots").train()
    model(_images(2), mask_ratio=0.5).loss.backward()
    for name in ("pointer_query.weight", "pointer_key.weight", "slot_value.weight", "slot_out.weight",
                 "slot_mlp.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().max() > 0, name


# ---------------------------------------------------------------------------------- permuted queries


def test_permuting_the_queries_permutes_the_gaussians_and_changes_no_render():
    """Why "queries permuted per image" is not tried as a mechanism: the decoder has no positions for its queries,
    so permuting their embeddings permutes its Gaussians and nothing else; the render, the loss and so every
    gradient are the same. The per-index layout figures would read it as movement; edge_follow would not."""
    model = _model().eval()
    imgs = _images(2)
    before = decode_in_query_order(model, imgs)
    perm = torch.randperm(model.cfg.num_queries, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.query_embed.copy_(model.query_embed[:, perm])
    after = decode_in_query_order(model, imgs)
    torch.testing.assert_close(after.means, before.means[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.render(after), model.render(before), atol=1e-5, rtol=1e-5)
