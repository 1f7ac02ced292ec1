"""Number for number: gmae's `authors-code` model against the GMAE authors' forward maths, written out here.

The reference below is written from reading the authors' image model (tekotan/video-gmae at c630810,
vidgmae/models/components/mae/models_mae.py lines 548-645) and the legacy gsplat release whose API it calls
(nerfstudio-project/gsplat v0.1.1, gsplat/cuda/csrc/{helpers.cuh, forward.cu}); no code of theirs is copied.
For raw 14-number head outputs it computes, in float64:

1. the activations (lines 548-567 and 641-642): means 2·(σ − ½), scales c·σ, Shoemake's formula of the first
   three of σ(raw[6:10]) in the order the authors stack it, colours and opacities σ;
2. legacy gsplat's ``ProjectGaussians`` with projmat = viewmat = [I | (0, 0, 8)], focal W/2 (fov 90°):
   quaternion read with its first component as w (helpers.cuh line 144), EWA covariance with t/t_z clamped to
   1.3·tan(fov/2) (forward.cu lines 401-405), the 0.3 low-pass (line 440), the conic and its radius
   ceil(3σ) (helpers.cuh lines 52-66), centres by ``ndc2pix`` = 0.5·W·x + 0.5 + cx after dividing by
   w + 1e-6 (helpers.cuh lines 7-9, 110-115), depth t_z, and the tile box of that radius (helpers.cuh 11-43);
3. legacy gsplat's rasterizer, one pixel at a time: pixel j sampled at j (forward.cu lines 275-276), only the
   Gaussians whose tile box holds the pixel's tile, in ascending depth; σ = ½(a dx² + c dy²) + b dx dy,
   α = min(0.999, o·e^(−σ)), skipped below 1/255, stop when T(1 − α) ≤ 1e-4 (forward.cu lines 334-356, the three-channel kernel the authors' call runs), and a
   white background (the authors pass none).

gmae's model built from the `authors-code` recipe must agree with it stage by stage (Gaussians, projected
centres, conics, depths, pixels) and in the gradient of the loss with respect to the raw outputs. The cases are
chosen so that each of the four options the recipe sets for parity (quaternion order, legacy pixel origin,
3σ tile cut, the head's and patch bias's initialisation) changes the result: the tests that flip them one at a
time show the parity test would fail if any came back.
"""

import dataclasses
import math

import pytest
import torch

from gmae.config import ModelConfig, as_dict, config_from_dict
from gmae.model import build_model
from gmae.config.recipes import RECIPES
from gmae.render.camera import project

SIZE = 64  # 4 x 4 tiles of 16 px
C_MAX = 1.0
WHITE = torch.ones(3, dtype=torch.float64)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ----------------------------------------------------------------------------------- the authors' maths


def authors_activations(raw: torch.Tensor, c: float = C_MAX):
    """raw (K, 14) -> means (K, 3), scales (K, 3), quats (K, 4) as the authors stack them, rgb (K, 3), opac (K,)."""
    s = torch.sigmoid
    means = 2.0 * (s(raw[:, 0:3]) - 0.5)
    scales = c * s(raw[:, 3:6])
    u = s(raw[:, 6:10])
    au, av, aw = u[:, 0], u[:, 1], u[:, 2]
    two_pi = 2.0 * math.pi
    quats = torch.stack([torch.sqrt(1.0 - au) * torch.sin(two_pi * av), torch.sqrt(1.0 - au) * torch.cos(two_pi * av),
                         torch.sqrt(au) * torch.sin(two_pi * aw), torch.sqrt(au) * torch.cos(two_pi * aw)], dim=-1)
    return means, scales, quats, s(raw[:, 10:13]), s(raw[:, 13])


def _rotation(q: torch.Tensor) -> torch.Tensor:
    """3x3 rotation of one quaternion read as legacy gsplat reads it: (w, x, y, z) = (q0, q1, q2, q3), normalised."""
    q = q / q.norm()
    w, x, y, z = q
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
    ])


def legacy_project(means, scales, quats, size: int = SIZE, pixel_frame_shift: float = 0.5, quat_order=(0, 1, 2, 3)):
    """Legacy gsplat ProjectGaussians for the authors' camera -> xys (K, 2) in gsplat's pixel frame (pixel j at j),
    conics (K, 3), depths (K,), radii (K,), tile boxes (K, 4) = (x0, x1, y0, y1), exclusive ends.

    pixel_frame_shift is ndc2pix's + 0.5 (legacy); quat_order reorders the quaternion before it is read (a way to
    show what a different component order does)."""
    W = H = size
    focal = 0.5 * W / math.tan(0.5 * (math.pi / 2.0))
    tan_fov = 0.5 * W / focal
    lim = 1.3 * tan_fov
    tiles = (W + 15) // 16
    xys, conics, depths, radii, boxes = [], [], [], [], []
    for i in range(means.shape[0]):
        x, y, z = means[i]
        t = torch.stack([x, y, z + 8.0])  # viewmat = [I | (0, 0, 8)]
        assert t[2] > 0.01  # never near-culled at |z| < 1
        R = _rotation(quats[i][list(quat_order)])
        M = R @ torch.diag(scales[i])
        cov3d = M @ M.T
        tx = t[2] * torch.clamp(t[0] / t[2], -lim, lim)
        ty = t[2] * torch.clamp(t[1] / t[2], -lim, lim)
        rz = 1.0 / t[2]
        zero = torch.zeros((), dtype=means.dtype)
        J = torch.stack([torch.stack([focal * rz, zero, -focal * tx * rz * rz]),
                         torch.stack([zero, focal * rz, -focal * ty * rz * rz])])
        cov = J @ cov3d @ J.T
        a, b, c = cov[0, 0] + 0.3, cov[0, 1], cov[1, 1] + 0.3
        det = a * c - b * b
        conics.append(torch.stack([c / det, -b / det, a / det]))
        half = 0.5 * (a + c)
        v1 = half + torch.sqrt(torch.clamp(half * half - det, min=0.1))
        v2 = half - torch.sqrt(torch.clamp(half * half - det, min=0.1))
        radius = math.ceil(3.0 * math.sqrt(max(float(v1.detach()), float(v2.detach()))))
        rw = 1.0 / (1.0 + 1e-6)  # p_hom.w = 1 for projmat = viewmat
        centre = torch.stack([0.5 * W * (x * rw) + pixel_frame_shift + W / 2.0,
                              0.5 * H * (y * rw) + pixel_frame_shift + H / 2.0])
        cx, cy = float(centre[0].detach()) / 16.0, float(centre[1].detach()) / 16.0
        r = radius / 16.0
        box = [min(max(0, int(cx - r)), tiles), min(max(0, int(cx + r + 1)), tiles),
               min(max(0, int(cy - r)), tiles), min(max(0, int(cy + r + 1)), tiles)]
        xys.append(centre)
        depths.append(t[2])
        radii.append(radius)
        boxes.append(box)
    return torch.stack(xys), torch.stack(conics), torch.stack(depths), radii, boxes


def legacy_rasterize(xys, conics, depths, boxes, rgb, opac, size: int = SIZE, cut_tiles: bool = True,
                     background=WHITE) -> torch.Tensor:
    """Legacy gsplat's forward for every pixel at once -> image (3, H, W): each pixel walks the Gaussians in
    ascending depth exactly as forward.cu's loop does (one Gaussian at a time, the decisions per pixel).
    cut_tiles=False draws every Gaussian in every tile (what gmae's opacity-aware culling amounts to)."""
    order = sorted(range(len(depths)), key=lambda g: float(depths[g].detach()))
    jj, ii = torch.meshgrid(torch.arange(size, dtype=xys.dtype), torch.arange(size, dtype=xys.dtype), indexing="xy")
    tile_x, tile_y = (jj // 16).long(), (ii // 16).long()
    T = torch.ones(size, size, dtype=xys.dtype)
    out = torch.zeros(3, size, size, dtype=xys.dtype)
    done = torch.zeros(size, size, dtype=torch.bool)  # the pixel has broken out of its loop
    for g in order:
        x0, x1, y0, y1 = boxes[g]
        listed = ((tile_x >= x0) & (tile_x < x1) & (tile_y >= y0) & (tile_y < y1)) if cut_tiles else ~done | done
        dx, dy = xys[g, 0] - jj, xys[g, 1] - ii  # pixel j sampled at j
        a, b, c = conics[g]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp(opac[g] * torch.exp(-sigma), max=0.999)
        use = listed & ~done & (sigma >= 0) & (alpha >= 1.0 / 255.0)
        next_T = T * (1.0 - alpha)
        stop = use & (next_T <= 1e-4)
        done = done | stop
        use = use & ~stop
        out = out + torch.where(use, alpha * T, torch.zeros_like(T)) * rgb[g][:, None, None]
        T = torch.where(use, next_T, T)
    return out + T * background[:, None, None]


def authors_render(raw: torch.Tensor, **variant) -> torch.Tensor:
    """The authors' whole forward for one image's raw outputs (K, 14) -> (3, H, W)."""
    means, scales, quats, rgb, opac = authors_activations(raw)
    xys, conics, depths, _, boxes = legacy_project(means, scales, quats, **{k: v for k, v in variant.items()
                                                                             if k != "cut_tiles"})
    return legacy_rasterize(xys, conics, depths, boxes, rgb, opac, cut_tiles=variant.get("cut_tiles", True))


# ----------------------------------------------------------------------------------------------- gmae


def authors_config(**changes) -> ModelConfig:
    """The `authors-code` recipe's model settings, at a small size, rendered by the torch oracle."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in RECIPES["authors-code"].settings().items() if k in fields}
    values.update(img_size=SIZE, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                  decoder_depth=1, decoder_num_heads=2, num_gaussians=8, render_backend="torch")
    values.update(changes)
    return ModelConfig(**values)


def gmae_stages(raw: torch.Tensor, **changes):
    """gmae's authors-code model on raw (K, 14): its Gaussians, projection and render (B = 1)."""
    torch.manual_seed(0)
    model = build_model(authors_config(**changes)).double()
    g = model.gaussians_from_tokens(raw[None])
    means2d, conics, depths = project(model.cfg.camera, g.means, g.scales, g.quats, SIZE, SIZE,
                                      pixel_origin=model.cfg.pixel_origin)
    image = model.render(g)[0]
    return g, means2d[0], conics[0], depths[0], image


def cases() -> torch.Tensor:
    """Raw outputs (8, 14): random ones, plus hand-set Gaussians that make each option visible.

    Gaussian 0 is small, elongated and rotated, so that the quaternion's component order and a one-pixel shift
    each move many pixels. Gaussian 1 is opaque, dark and as large as c = 1 allows (world scale ~1: an on-screen
    std of sqrt((W/16)² + 0.3) = 4.04 px at 64 px, radius ceil(3·4.08) = 13), centred at x = 2.8 px in gsplat's
    frame: its tile box is tile column 0 only ((2.8 + 13) / 16 + 1 < 2), while its α reaches 1/255 up to
    2.8 + 13.4 = 16.2 px, so pixel column 16 (tile 1) gets α = 0.0047 from it that the 3σ cut drops."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(8, 14, generator=gen, dtype=torch.float64) * 1.5
    raw[:, 3:6] -= 2.5  # mostly small Gaussians: details a shift can move
    raw[:, 13] += 1.0
    # Gaussian 0: near the centre, needle-like, rotated
    raw[0, 0:3] = torch.tensor([_logit(0.47), _logit(0.55), _logit(0.5)])
    raw[0, 3:6] = torch.tensor([_logit(0.6), _logit(0.05), _logit(0.1)])
    raw[0, 6:10] = torch.tensor([_logit(0.3), _logit(0.15), _logit(0.6), 0.0])
    raw[0, 13] = _logit(0.95)
    # Gaussian 1: legacy centre x = 0.5·W·x·rw + 0.5 + W/2 = 2.8 px, y = 40 px; z = 0
    rw = 1.0 / (1.0 + 1e-6)
    x_world, y_world = (2.8 - 0.5 - SIZE / 2.0) / (SIZE / 2.0) / rw, (40.0 - 0.5 - SIZE / 2.0) / (SIZE / 2.0) / rw
    raw[1, 0:3] = torch.tensor([_logit((x_world + 1.0) / 2.0), _logit((y_world + 1.0) / 2.0), 0.0])
    raw[1, 3:6] = _logit(0.9999)
    raw[1, 10:13] = -4.0
    raw[1, 13] = _logit(0.995)
    return raw


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    return cases()


# ------------------------------------------------------------------------------------------- the parity


def test_the_recipe_sets_the_four_parity_options():
    settings = RECIPES["authors-code"].settings()
    assert settings["rotation_param"] == "uniform"
    assert settings["pixel_origin"] == "legacy"
    assert settings["tile_cut"] == "3sigma"
    assert settings["head_init"] == "torch" and settings["patch_bias_init"] == "torch"


def test_gaussians_match_the_authors_activations(raw):
    g, *_ = gmae_stages(raw)
    means, scales, quats, rgb, opac = authors_activations(raw)
    for ours, theirs in ((g.means[0], means), (g.scales[0], scales), (g.quats[0], quats), (g.colors[0], rgb),
                         (g.opacities[0], opac)):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-9)


def test_projection_matches_legacy_gsplat(raw):
    _, means2d, conics, depths, _ = gmae_stages(raw)
    means, scales, quats, _, _ = authors_activations(raw)
    xys, theirs_conics, theirs_depths, _, _ = legacy_project(means, scales, quats)
    # gsplat samples pixel j at j, the contract at j + 0.5: the same place on the pixel grid is 0.5 apart
    torch.testing.assert_close(means2d - 0.5, xys, atol=1e-5, rtol=0)
    torch.testing.assert_close(conics, theirs_conics, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(depths, theirs_depths, atol=1e-5, rtol=0)


def test_render_matches_the_authors_pixels(raw):
    *_, image = gmae_stages(raw)
    theirs = authors_render(raw)
    torch.testing.assert_close(image, theirs, atol=1e-5, rtol=0)


def test_loss_gradient_matches_through_the_torch_backend(raw):
    """d(all-pixel MSE)/d(raw) of both pipelines, the authors' loss (averaged: their sum over the batch is a bug)."""
    target = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours_raw = raw.clone().requires_grad_(True)
    *_, image = gmae_stages(ours_raw)
    ((image - target) ** 2).mean().backward()
    theirs_raw = raw.clone().requires_grad_(True)
    ((authors_render(theirs_raw) - target) ** 2).mean().backward()
    assert theirs_raw.grad.abs().max() > 1e-4  # the comparison is not of two zeros
    torch.testing.assert_close(ours_raw.grad, theirs_raw.grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------ each option matters (the test can fail)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_the_cases_make_each_render_option_visible(raw):
    """The reference itself, with one legacy choice undone at a time, moves pixels far beyond the 1e-5 parity
    tolerance: so these cases can tell each choice apart."""
    reference = authors_render(raw)
    assert _max_diff(reference, authors_render(raw, quat_order=(1, 2, 3, 0))) > 1e-2  # w read last
    assert _max_diff(reference, authors_render(raw, pixel_frame_shift=-0.5)) > 1e-2  # gsplat >= 0.1.2's ndc2pix
    assert _max_diff(reference, authors_render(raw, cut_tiles=False)) > 1e-3  # no 3-sigma cut


@pytest.mark.parametrize("change", [dict(rotation_param="uniform-scalar-last"), dict(pixel_origin="centre"),
                                    dict(tile_cut="alpha")], ids=lambda c: next(iter(c.values())))
def test_undoing_any_render_option_breaks_the_parity(raw, change):
    *_, image = gmae_stages(raw, **change)
    assert _max_diff(image, authors_render(raw)) > 1e-3


def test_the_3sigma_cut_is_what_the_tile_border_drops(raw):
    """Gaussian 1 alone: the two cuts draw tile column 0 alike, and differ where its tail crosses into column 1."""
    alone = raw.clone()
    alone[[i for i in range(alone.shape[0]) if i != 1], 13] = -40.0  # every other Gaussian transparent
    *_, cut = gmae_stages(alone)
    *_, full = gmae_stages(alone, tile_cut="alpha")
    diff = (cut - full).abs().amax(0)
    assert diff[:, :16].max() == 0
    assert diff[:, 16].max() > 3e-3 and diff[:, 17:].max() == 0
    torch.testing.assert_close(cut, authors_render(alone), atol=1e-5, rtol=0)


def test_head_and_patch_bias_start_as_the_authors_do():
    """The authors' head keeps nn.Linear's default U(±1/√d), the patch bias Conv2d's U(±1/√(C p²));
    gmae's defaults are xavier (wider: at d = 32 its bound is √(6 / (32 + 14)) = 0.36 > 1/√32 = 0.18) and 0."""
    cfg = authors_config(decoder_embed_dim=512, decoder_num_heads=8, num_gaussians=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    w = model.gaussian_head.weight.detach()
    d = cfg.decoder_embed_dim
    assert w.abs().max() <= 1.0 / math.sqrt(d)
    assert abs(float(w.std()) - 1.0 / math.sqrt(3 * d)) < 0.05 / math.sqrt(3 * d)  # 0.0255 at d = 512
    bias = model.encoder.patch_embed.proj.bias.detach()
    fan_in = cfg.in_chans * cfg.patch_size ** 2
    assert bias.abs().max() <= 1.0 / math.sqrt(fan_in) and bias.abs().min() > 0
    torch.manual_seed(0)
    ours = build_model(authors_config(decoder_embed_dim=512, decoder_num_heads=8, num_gaussians=256,
                                      head_init="xavier", patch_bias_init="zero"))
    assert ours.gaussian_head.weight.abs().max() > 1.0 / math.sqrt(d)  # reverting would fail the check above
    assert float(ours.gaussian_head.weight.detach().std()) > 2 * float(w.std())  # 0.0616 vs 0.0255: 2.4x
    assert ours.encoder.patch_embed.proj.bias.abs().max() == 0


def test_only_the_head_and_patch_bias_differ_between_the_inits():
    """The two init options change what they name and nothing else (the random stream is the same)."""
    torch.manual_seed(0)
    theirs = build_model(authors_config())
    torch.manual_seed(0)
    ours = build_model(authors_config(head_init="xavier", patch_bias_init="zero"))
    differ = {k for k, v in theirs.state_dict().items() if not torch.equal(v, ours.state_dict()[k])}
    assert differ == {"gaussian_head.weight", "encoder.patch_embed.proj.bias"}


def test_a_checkpoint_from_before_the_authors_order_keeps_its_rotation():
    """rotation_param "uniform" meant the scalar-last reading until pixel_origin existed: such a config reads as
    "uniform-scalar-last", so the model it rebuilds renders as it did; a config saved with pixel_origin keeps "uniform"."""
    old = {k: v for k, v in as_dict(authors_config()).items()
           if k not in ("pixel_origin", "tile_cut", "head_init", "patch_bias_init")}
    assert config_from_dict(ModelConfig, old).rotation_param == "uniform-scalar-last"
    assert config_from_dict(ModelConfig, as_dict(authors_config())).rotation_param == "uniform"
