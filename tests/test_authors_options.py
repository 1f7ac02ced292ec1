"""The GMAE authors' code's four model choices as ModelConfig options: rotation_param, query_init,
head_bias and max_alpha. Each default is the behaviour from before it, each option changes what it should and
nothing else, every new output path passes gradient to the parameters, and old configs read as they were."""

import math

import pytest
import torch
import torch.nn.functional as F

from gmae.cli import main, parse_args
from gmae.config import ModelConfig, as_dict, config_from_dict
from gmae.errors import GMAEError
from gmae.model import build_model
from gmae.model.gmae import gaussians_from_raw, uniform_quaternion
from gmae.readouts.core import Canvas, render_subsets
from gmae.render.camera import project
from gmae.render.gaussians import Gaussians
from gmae.render.reference import rasterize_dense

SMALL = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
             decoder_num_heads=2, num_gaussians=8, render_backend="torch")
OPTIONS = dict(rotation_param="uniform", query_init="uniform", head_bias=False, max_alpha=0.999)
DEFAULTS = dict(rotation_param="normalize", query_init="normal", head_bias=True, max_alpha=0.99)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed=0, **options):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**SMALL, **options))


def _forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(2, 3, 16, 16, generator=g)
    noise = torch.rand(2, model.cfg.num_patches, generator=g)
    return model(imgs, noise=noise)


def _trunk(model):
    """Every parameter and buffer outside the Gaussian head and the query embeddings."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("gaussian_head.", "query_embed"))}


# ------------------------------------------------------------------------------------------- defaults


def test_the_defaults_are_gmaes_own_choices():
    assert {k: getattr(ModelConfig(), k) for k in DEFAULTS} == DEFAULTS
    plain, spelled = _model(), _model(**DEFAULTS)
    for (k, a), b in zip(plain.state_dict().items(), spelled.state_dict().values()):
        assert torch.equal(a, b), k
    out_a, out_b = _forward(plain), _forward(spelled)
    assert torch.equal(out_a.loss, out_b.loss) and torch.equal(out_a.image, out_b.image)
    # gmae's rotation: the 4 numbers normalised; gmae's head: a bias that sets the starting size and opacity
    raw = torch.randn(2, 5, 14)
    assert torch.equal(gaussians_from_raw(raw, 1.0, 1.0).quats, F.normalize(raw[..., 6:10], dim=-1, eps=1e-8))
    bias = plain.gaussian_head.bias
    assert torch.allclose(torch.sigmoid(bias[3:6]), torch.full((3,), 0.5)) and bias[-1].item() == 0.0
    assert 0.8 < plain.query_embed.std().item() < 1.2 and abs(plain.query_embed.mean().item()) < 0.2  # N(0, 1)
    # and it renders with 3DGS's clamp
    assert Canvas.of(plain).settings.max_alpha == 0.99


# ------------------------------------------------------------------------------------------- rotation


def test_uniform_rotation_is_unit_and_its_three_numbers_get_gradient():
    raw = torch.randn(3, 7, 14, requires_grad=True)
    q = gaussians_from_raw(raw, 1.0, 1.0, rotation="uniform").quats
    assert q.shape == (3, 7, 4)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3, 7), atol=1e-6)
    (q * torch.randn_like(q)).sum().backward()
    grad = raw.grad[..., 6:10]
    assert (grad[..., :3].abs() > 0).float().mean() > 0.9  # u1, u2, u3 all steer the rotation
    assert torch.equal(grad[..., 3], torch.zeros(3, 7))  # the 4th number is unused by construction
    # Shoemake's formula in the authors' order, the first component as w (tests/test_authors_parity.py checks it
    # against their maths); "uniform-scalar-last" reads the same four numbers as (x, y, z, w)
    u = torch.sigmoid(raw.detach()[0, 0, 6:9])
    authors = torch.stack([(1 - u[0]).sqrt() * torch.sin(2 * math.pi * u[1]), (1 - u[0]).sqrt() * torch.cos(2 * math.pi * u[1]),
                           u[0].sqrt() * torch.sin(2 * math.pi * u[2]), u[0].sqrt() * torch.cos(2 * math.pi * u[2])])
    assert torch.allclose(q[0, 0].detach(), authors, atol=1e-6)
    scalar_last = gaussians_from_raw(raw.detach(), 1.0, 1.0, rotation="uniform-scalar-last").quats[0, 0]
    assert torch.allclose(scalar_last, authors[[3, 0, 1, 2]], atol=1e-6)


def test_uniform_u_gives_uniform_rotations():
    """For unit quaternions uniform on the sphere (uniform rotations), E[q qᵀ] = I / 4; normalising a uniform
    4-vector of [0, 1)^4 (what the raw numbers' sigmoids would give without Shoemake's map) does not."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, 3, generator=g).clamp(1e-6, 1 - 1e-6)
    q = uniform_quaternion(torch.logit(u).double())
    second = q.T @ q / len(q)
    assert (second - torch.eye(4, dtype=torch.float64) / 4).abs().max() < 0.005
    naive = F.normalize(torch.rand(200_000, 4, generator=g), dim=-1)
    assert (naive.T @ naive / len(naive) - torch.eye(4) / 4).abs().max() > 0.05  # the test can tell


def test_uniform_rotation_has_finite_gradient_where_the_sigmoid_saturates():
    raw = torch.tensor([[-200.0, 0.3, -0.2], [200.0, -1.0, 2.0]], requires_grad=True)
    q = uniform_quaternion(raw)
    q.sum().backward()
    assert torch.isfinite(q).all() and torch.isfinite(raw.grad).all()


def test_rotation_param_changes_only_the_rotations_and_reaches_the_head():
    plain, uniform = _model(), _model(rotation_param="uniform")
    for (k, a), b in zip(plain.state_dict().items(), uniform.state_dict().values()):
        assert torch.equal(a, b), k  # the same initialisation
    a, b = _forward(plain), _forward(uniform)
    ga, gb = a.gaussians, b.gaussians
    for name in ("means", "scales", "colors", "opacities"):
        assert torch.equal(getattr(ga, name), getattr(gb, name)), name
    assert not torch.allclose(ga.quats, gb.quats)
    b.loss.backward()
    rows = uniform.gaussian_head.weight.grad  # (14, d): rows 6, 7, 8 are the rotation's three numbers
    assert all(rows[i].abs().sum() > 0 for i in (6, 7, 8)) and rows[9].abs().sum() == 0


# ------------------------------------------------------------------------------------------- queries


def test_uniform_query_init_changes_only_the_queries_and_they_get_gradient():
    plain, uniform = _model(), _model(query_init="uniform")
    queries = uniform.query_embed.detach()
    assert queries.min() >= 0 and queries.max() < 1 and abs(queries.mean().item() - 0.5) < 0.05
    trunk = _trunk(plain)
    for k, v in _trunk(uniform).items():
        assert torch.equal(v, trunk[k]), k
    out = _forward(uniform)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert uniform.query_embed.grad.abs().sum() > 0
    # distinct queries give distinct Gaussians (not every one the same mean colour)
    assert out.gaussians.colors[0].std(dim=0).max() > 1e-3


# ------------------------------------------------------------------------------------------- head bias


@pytest.mark.parametrize("m", [1, 2])
def test_bias_free_head_has_no_bias_starts_at_half_c_and_learns(m):
    plain, free = _model(gaussians_per_query=m), _model(gaussians_per_query=m, head_bias=False, max_scale=3.0)
    assert free.gaussian_head.bias is None and "gaussian_head.bias" not in free.state_dict()
    assert free.gaussian_head.weight.shape == plain.gaussian_head.weight.shape  # 14 m (+ 2 anchors when m > 1)
    trunk = _trunk(plain)
    for k, v in _trunk(free).items():
        if k in trunk:
            assert torch.equal(v, trunk[k]), k
    out = _forward(free)
    # without a bias nothing sets the start: scales are centred on c·sigmoid(0) = c/2 (in the camera's units)
    c_half = 0.5 * free.cfg.max_scale * free.camera.scale_unit
    assert abs(out.gaussians.scales.median().item() - c_half) < 0.25 * c_half
    out.loss.backward()
    assert free.gaussian_head.weight.grad.abs().sum() > 0
    assert (free.gaussian_head.weight.grad.abs().sum(dim=1) > 0).all()  # every output row learns (m = 2: anchors too)


def test_bias_free_head_raw_is_linear_in_the_decoder_output():
    free = _model(head_bias=False)
    h = torch.randn(3, 32)
    assert torch.allclose(free.gaussian_head(h), h @ free.gaussian_head.weight.T)
    assert torch.equal(free.gaussian_head(torch.zeros(1, 32)), torch.zeros(1, 14))


# ------------------------------------------------------------------------------------------- max alpha


def _saturated_gaussians():
    """Two overlapping opaque Gaussians; the front one's centre is a pixel centre (x = y = 1/16: pixel 8.5 of
    16), where its alpha is its opacity 1, above either clamp."""
    means = torch.tensor([[[0.0625, 0.0625, 0.1], [0.2, 0.1, 0.5]]])
    scales = torch.full((1, 2, 3), 0.3)
    quats = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.2, 0.3]]])
    quats = F.normalize(quats, dim=-1)
    colors = torch.tensor([[[0.9, 0.1, 0.2], [0.1, 0.8, 0.3]]])
    return Gaussians(means, scales, quats, colors, torch.ones(1, 2))


def test_max_alpha_reaches_the_renderer_and_equals_the_reference():
    g = _saturated_gaussians()
    images = {}
    for clamp in (0.99, 0.999):
        model = _model(max_alpha=clamp, camera="orthographic")
        images[clamp] = model.render(g)
        means2d, conics, depths = project("orthographic", g.means, g.scales, g.quats, 16, 16)
        # the naive every-Gaussian-at-every-pixel renderer, which draws no background: add it
        color, alpha = rasterize_dense(means2d, conics, g.colors, g.opacities, depths, 16, 16, max_alpha=clamp)
        ref = color + (1 - alpha)[:, None] * model.background[None, :, None, None]
        assert torch.allclose(images[clamp], ref, atol=1e-5), clamp
        # the readouts render with the model's clamp too
        canvas = Canvas.of(model)
        assert canvas.settings.max_alpha == clamp
        subset, _ = render_subsets(g, torch.ones(1, 1, 2, dtype=torch.bool), canvas)
        assert torch.allclose(subset[:, 0], images[clamp], atol=1e-5)
    # where an opacity saturates, less of the white background shows through at 0.999
    diff = (images[0.99] - images[0.999]).abs().amax(dim=1)[0]  # (H, W)
    assert diff[8, 8] > 1e-3 and diff.max() == diff[8, 8]
    assert (diff > 0).float().mean() < 0.5  # only where an alpha clamps: elsewhere the same image


def test_max_alpha_changes_nothing_but_the_render_and_passes_gradient():
    plain, authors = _model(), _model(max_alpha=0.999)
    for (k, a), b in zip(plain.state_dict().items(), authors.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = _forward(plain), _forward(authors)
    for name in ("means", "scales", "quats", "colors", "opacities"):
        assert torch.equal(getattr(a.gaussians, name), getattr(b.gaussians, name)), name
    b.loss.backward()
    assert authors.gaussian_head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("bad, message", [
    (dict(rotation_param="quat"), "rotation-param must be one of normalize, uniform"),
    (dict(query_init="zeros"), "query-init must be one of normal, uniform"),
    (dict(head_bias="no"), "head-bias must be true or false"),
    (dict(max_alpha=0.0), "max-alpha must be in"), (dict(max_alpha=1.5), "max-alpha must be in"),
    (dict(max_alpha=float("nan")), "max-alpha must be in"), (dict(max_alpha="0.9"), "max-alpha must be in"),
])
def test_bad_values_are_refused_in_one_line(bad, message):
    with pytest.raises(GMAEError, match=message) as e:
        ModelConfig(**bad)
    assert "\n" not in str(e.value)
    assert ModelConfig(max_alpha=1.0).max_alpha == 1.0  # (0, 1]: 1 itself is allowed


def test_old_configs_read_as_they_were_and_new_ones_round_trip():
    saved = as_dict(ModelConfig(**SMALL))
    for key in OPTIONS:
        del saved[key]  # a checkpoint from before these options
    old = config_from_dict(ModelConfig, saved)
    assert {k: getattr(old, k) for k in DEFAULTS} == DEFAULTS
    model = _model()
    rebuilt = build_model(old)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same parameters, bias included
    new = ModelConfig(**SMALL, **OPTIONS)
    assert config_from_dict(ModelConfig, as_dict(new)) == new
    build_model(new).load_state_dict(_model(**OPTIONS).state_dict())


def test_pretrain_flags_set_the_model_config():
    args = parse_args(["pretrain", "--rotation-param", "uniform", "--query-init", "uniform", "--no-head-bias",
                       "--max-alpha", "0.999"])
    assert (args.rotation_param, args.query_init, args.head_bias, args.max_alpha) == ("uniform", "uniform", False, 0.999)
    assert {"rotation_param", "query_init", "head_bias", "max_alpha"} <= set(args.typed)
    plain = parse_args(["pretrain"])
    assert (plain.rotation_param, plain.query_init, plain.head_bias, plain.max_alpha) == (None, None, None, None)
    assert parse_args(["pretrain", "--recipe", "authors-code", "--head-bias"]).head_bias is True  # typed wins


def test_a_bad_max_alpha_is_one_line_on_the_command_line(capsys, tmp_path):
    assert main(["pretrain", "--max-alpha", "1.5", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "max-alpha must be in (0, 1]" in err and len(err.strip().splitlines()) == 1


def test_a_run_records_the_options_and_trains(tmp_path):
    """Two steps of the tiny preset at tiny shapes with all four options and 2 Gaussians per query (anchored):
    the checkpoint records them and the loss is finite."""
    import json

    from gmae.io.loader import load
    from gmae.io.files import list_checkpoints

    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--img-size", "16", "-k", "8", "--gaussians-per-query", "2",
                 "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--render-backend", "torch",
                 "--rotation-param", "uniform", "--query-init", "uniform", "--no-head-bias", "--max-alpha", "0.999",
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    model = load(list_checkpoints(out)[-1], "checkpoint")["config"]["model"]
    assert {k: model[k] for k in OPTIONS} == OPTIONS
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("per_query", [1, 4])
def test_with_all_four_every_used_head_output_learns(per_query):
    """The project's lesson (tests/test_model.py::test_every_gaussian_output_learns) for the authors-code model:
    with the authors' camera, every head output of every one of a token's m Gaussians, and the anchors, gets
    gradient, except the rotation's 4th number, which the uniform map leaves unused."""
    from gmae.data import DeadLeaves

    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "img_size": 32, "num_gaussians": 16}, camera="authors", max_scale=1.0,
                      gaussians_per_query=per_query, **OPTIONS)
    model = build_model(cfg)
    source = DeadLeaves(32, seed=0)
    imgs = torch.stack([source.load(i, None) for i in range(4)])
    model(imgs, noise=torch.rand(4, cfg.num_patches, generator=torch.Generator().manual_seed(0))).loss.backward()
    grad = model.gaussian_head.weight.grad.abs().sum(dim=1)
    assert grad.shape == (per_query * 14 + (2 if per_query > 1 else 0),)
    for j in range(per_query):
        for r in range(14):
            if r == 9:
                assert grad[j * 14 + r] == 0, (j, r)
            else:
                assert grad[j * 14 + r] > 0, (j, r)
    if per_query > 1:  # anchored (the default with m > 1): the anchor's x and y
        assert grad[per_query * 14] > 0 and grad[per_query * 14 + 1] > 0
    assert model.query_embed.grad.abs().sum(dim=-1).min() > 0  # every query token learns
