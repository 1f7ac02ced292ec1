"""Zero-shot readouts on hand-made Gaussians whose layers, edges and figure are known."""

import math

import numpy as np
import pytest
import torch

from gmae.render import RenderSettings
from gmae import zeroshot
from gmae.config import model_config
from gmae.errors import GMAEError
from gmae.model import build_model
from gmae.render.gaussians import Gaussians, render_gaussians

SIZE = 32
WHITE = torch.ones(3)


def scene(zs=(0.5, -0.5), centres=((0.0, 0.0), (-0.5, -0.5)), sigmas=(0.5, 0.1), opacities=(0.99, 0.9),
          colors=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))) -> Gaussians:
    k = len(zs)
    means = torch.tensor([[x, y, z] for (x, y), z in zip(centres, zs)]).unsqueeze(0)
    scales = torch.tensor([[s, s, s] for s in sigmas]).unsqueeze(0)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * k).unsqueeze(0)
    return Gaussians(means, scales, quats, torch.tensor(colors).unsqueeze(0), torch.tensor(opacities).unsqueeze(0))


def random_scene(k=24, batch=2, seed=0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        torch.rand(batch, k, 3, generator=g) * 2 - 1,
        torch.rand(batch, k, 3, generator=g) * 0.2 + 0.02,
        torch.nn.functional.normalize(torch.randn(batch, k, 4, generator=g), dim=-1),
        torch.rand(batch, k, 3, generator=g),
        torch.rand(batch, k, generator=g) * 0.9 + 0.05,
    )


CANVAS = zeroshot.Canvas(SIZE, SIZE, WHITE, RenderSettings(backend="torch"))


def full_render(g: Gaussians) -> torch.Tensor:
    return render_gaussians(g, SIZE, SIZE, WHITE, settings=RenderSettings(backend="torch"))[0]


def test_near_to_far_orders_by_ascending_depth_stably():
    g = scene(zs=(0.5, -0.5, 0.5, -0.5), centres=((0, 0), (0.1, 0), (0.2, 0), (0.3, 0)), sigmas=(0.1,) * 4,
              opacities=(0.5,) * 4, colors=((1, 0, 0),) * 4)
    ordered = zeroshot.near_to_far(g)
    # smaller z = nearer; ties keep index (query-token) order, the renderer's compositing order
    assert ordered.means[0, :, 0].tolist() == pytest.approx([0.1, 0.3, 0.0, 0.2])
    assert zeroshot.from_far_end(ordered).means[0, :, 0].tolist() == pytest.approx([0.2, 0.0, 0.3, 0.1])


def layered_scene(k=12) -> Gaussians:
    """k overlapping Gaussians of distinct colours whose depths are a known shuffle of -0.9 ... 0.9 (index order
    is not depth order), so that the near and the far ends render differently."""
    g = torch.Generator().manual_seed(3)
    depth = torch.linspace(-0.9, 0.9, k)[torch.randperm(k, generator=g)]
    xy = (torch.rand(k, 2, generator=g) - 0.5) * 0.8
    means = torch.cat([xy, depth[:, None]], dim=1)[None]
    scales = (torch.rand(1, k, 3, generator=g) * 0.25 + 0.1)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(1, k, 4)
    return Gaussians(means, scales, quats, torch.rand(1, k, 3, generator=g), torch.full((1, k), 0.8))


def nearest(g: Gaussians, start: int, stop: int) -> torch.Tensor:
    """Render of the Gaussians ranked start..stop-1 by depth (0 = smallest z), chosen from z directly."""
    rank = torch.argsort(g.means[0, :, 2])
    return full_render(g.take(rank[start:stop].unsqueeze(0)))


def test_partial_renders_layers_and_cumulative_views_start_from_the_nearest():
    """The authors' order (limit_gaussian_z: z ascending, the first K): partial render K = the K nearest,
    layer 1 = the nearest group, cumulative view i = the i nearest groups."""
    g = layered_scene(12)
    ordered = zeroshot.near_to_far(g)
    counts, partial = zeroshot.partial_renders(ordered, CANVAS, counts=(3, 6))
    assert counts == [3, 6, 12]
    for i, K in enumerate(counts):
        torch.testing.assert_close(partial[:, i], nearest(g, 0, K), atol=1e-5, rtol=0)
    # the check can tell the ends apart: the 3 farthest render differently
    assert (partial[:, 0] - nearest(g, 9, 12)).abs().max() > 0.1
    alone, _ = zeroshot.layers(ordered, CANVAS, 4)
    cumulative, _ = zeroshot.layers(ordered, CANVAS, 4, cumulative=True)
    for i in range(4):
        torch.testing.assert_close(alone[:, i], nearest(g, 3 * i, 3 * i + 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(cumulative[:, i], nearest(g, 0, 3 * i + 3), atol=1e-5, rtol=0)
    assert (alone[:, 0] - alone[:, -1]).abs().max() > 0.1


def test_subset_render_equals_rendering_only_that_subset():
    g = zeroshot.near_to_far(random_scene())
    keep = torch.zeros(2, 1, g.num, dtype=torch.bool)
    keep[0, 0, ::3] = True
    keep[1, 0, 5:] = True
    images, _ = zeroshot.render_subsets(g, keep, CANVAS)
    for b, index in enumerate([torch.arange(0, g.num, 3), torch.arange(5, g.num)]):
        one = Gaussians(*(t[b : b + 1] for t in (g.means, g.scales, g.quats, g.colors, g.opacities)))
        expected = full_render(one.take(index.unsqueeze(0)))
        torch.testing.assert_close(images[b, 0], expected[0], atol=1e-5, rtol=0)


def test_partial_renders_and_layers_end_with_the_full_image():
    g = zeroshot.near_to_far(random_scene(k=40))
    counts, partial = zeroshot.partial_renders(g, CANVAS, counts=(8, 16, 64))
    assert counts == [8, 16, 40] and partial.shape == (2, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(partial[:, -1], full_render(g), atol=1e-5, rtol=0)
    cumulative, _ = zeroshot.layers(g, CANVAS, 4, cumulative=True)
    torch.testing.assert_close(cumulative[:, -1], full_render(g), atol=1e-5, rtol=0)
    # the first partial render is the 8 nearest Gaussians, i.e. the first group of 5 layers of 40
    alone, _ = zeroshot.layers(g, CANVAS, 5)
    torch.testing.assert_close(alone[:, 0], partial[:, 0], atol=1e-5, rtol=0)


def test_group_ids_are_equal_consecutive_groups():
    assert zeroshot.group_ids(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert torch.bincount(zeroshot.group_ids(256, 32)).tolist() == [8] * 32
    with pytest.raises(GMAEError, match="number of layers"):
        zeroshot.group_ids(10, 11)


def near_disc(threshold_alpha: float) -> np.ndarray:
    """Pixels where the near Gaussian of `scene()` has alpha above threshold (analytic)."""
    sigma2 = (0.1 * SIZE / 2) ** 2 + 0.3  # projected variance incl. the 0.3 px dilation
    centre = (-0.5 + 1) / 2 * SIZE  # 8 px
    c = np.arange(SIZE) + 0.5
    d2 = (c[None, :] - centre) ** 2 + (c[:, None] - centre) ** 2
    return 0.9 * np.exp(-0.5 * d2 / sigma2) > threshold_alpha


def test_layer_index_marks_where_the_near_layer_changes_the_image():
    g = zeroshot.near_to_far(scene())
    cumulative, _ = zeroshot.layers(zeroshot.from_far_end(g), CANVAS, 2, cumulative=True)  # as edges add them
    index = zeroshot.layer_index(cumulative, WHITE, threshold=0.1)[0].numpy()
    # Layer 1 (near, blue) changes red-on-white by > 0.1 wherever its alpha * |colour difference| > 0.1;
    # blue over red differs by 1 in the red and blue channels, so: alpha > 0.1 (the far one is ~opaque there).
    np.testing.assert_array_equal(index == 1, near_disc(0.1))
    far = ~near_disc(0.1)
    # elsewhere the far red Gaussian decides: it changed white by more than 0.1 near its centre, not in the corners
    assert (index[far] == 0).any() and (index[far] == -1).any() and set(np.unique(index)) == {-1, 0, 1}
    edges = zeroshot.edges(g, CANVAS, num_layers=2)[0].numpy()
    expected = np.zeros_like(edges)
    expected[:, :-1] |= index[:, :-1] != index[:, 1:]
    expected[:-1, :] |= index[:-1, :] != index[1:, :]
    np.testing.assert_array_equal(edges, expected)
    assert edges.sum() > 10


def test_figure_is_where_the_near_half_is_at_least_half_opaque():
    figure, near = zeroshot.figure_ground(zeroshot.near_to_far(scene()), CANVAS, near_fraction=0.5)
    np.testing.assert_array_equal(figure[0].numpy(), near_disc(0.5))
    assert near.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(GMAEError, match="near fraction"):
        zeroshot.figure_ground(zeroshot.near_to_far(scene()), CANVAS, near_fraction=1.0)


def test_soft_edges_average_the_binary_maps():
    g = zeroshot.near_to_far(random_scene(k=32))
    soft, per_level = zeroshot.soft_edges(g, CANVAS, levels=(4, 8), thresholds=(0.1, 0.3))
    expected = sum(zeroshot.edges(g, CANVAS, level, t).float() for level in (4, 8) for t in (0.1, 0.3)) / 4
    torch.testing.assert_close(soft, expected)
    assert set(per_level) == {4, 8} and torch.equal(per_level[8], zeroshot.edges(g, CANVAS, 8, 0.1))
    assert 0 <= soft.min() and soft.max() <= 1 and soft.max() > 0


def test_gaussians_of_a_model_and_refusal_of_mae():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", img_size=32, num_gaussians=16, depth=1, decoder_depth=1))
    imgs = torch.rand(2, 3, 32, 32)
    g = zeroshot.gaussians_of(model, imgs)
    assert g.means.shape == (2, 16, 3)
    z = g.means[..., 2]
    assert (z[:, :-1] <= z[:, 1:]).all()  # near to far
    mae = build_model(model_config("tiny", model="mae", img_size=32, depth=1, decoder_depth=1))
    with pytest.raises(GMAEError, match="MAE"):
        zeroshot.gaussians_of(mae, imgs)


@pytest.mark.parametrize("camera,depth_grad", [("authors", "off"), ("orthographic", "weighted")])
def test_readouts_render_as_the_model_was_trained(camera, depth_grad):
    """The canvas carries the model's camera and compositing: all Gaussians rendered = the model's render."""
    torch.manual_seed(0)
    model = build_model(model_config("tiny", img_size=32, num_gaussians=16, depth=1, decoder_depth=1,
                                     camera=camera, depth_grad=depth_grad, depth_tau=0.2))
    imgs = torch.rand(2, 3, 32, 32)
    g = zeroshot.gaussians_of(model, imgs)
    canvas = zeroshot.Canvas.of(model)
    assert canvas.settings.camera == camera and canvas.settings.compositing == model.compositing
    everything = zeroshot.render_subsets(g, torch.ones(1, 16, dtype=torch.bool), canvas)[0][:, 0]
    with torch.no_grad():
        torch.testing.assert_close(everything, model.render(g), atol=1e-5, rtol=0)
    if depth_grad == "weighted":  # and differs from what sorted compositing would draw
        sorted_canvas = zeroshot.Canvas(32, 32, model.background, RenderSettings(backend="torch", camera=camera))
        assert not torch.allclose(zeroshot.render_subsets(g, torch.ones(1, 16, dtype=torch.bool), sorted_canvas)[0][:, 0],
                                  everything, atol=1e-3)


def test_ellipse_prior_covers_half_the_image():
    from gmae.readouts.segment import ellipse_prior

    for h, w in ((64, 64), (90, 160)):
        e = ellipse_prior(h, w)
        assert e.mean() == pytest.approx(0.5, abs=0.02)
        assert e[h // 2, w // 2] and not e[0, 0]
    assert math.isclose(ellipse_prior(200, 200, area=0.25).mean(), 0.25, abs_tol=0.01)


# --------------------------------------------------------------------------- commands

FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet", "--steps", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from gmae.cli import main

    root = tmp_path_factory.mktemp("zeroshot")
    for model in ("gmae", "mae"):
        assert main(["pretrain", *FAST, "--model", model, "--out", str(root / model)]) == 0
    return {m: str(root / m / "checkpoint-0000002.pt") for m in ("gmae", "mae")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("wide.jpg", (90, 50)), ("tall.png", (40, 70))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        paths.append(str(root / name))
    return paths


@pytest.mark.parametrize("command", ["layers", "edges", "segment", "gaussians"])
def test_readout_commands_write_one_figure_per_image(command, checkpoints, photos, tmp_path, capsys):
    from PIL import Image

    from gmae.cli import main

    assert main([command, *photos, "--checkpoint", checkpoints["gmae"], "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == [f"wide_{command}.png", f"tall_{command}.png"]
    for path in written:
        width, height = Image.open(path).size
        assert width > 2 * height > 100  # a row: input first, then the readouts


def test_readout_of_an_mae_checkpoint_is_a_one_line_error(checkpoints, photos, tmp_path, capsys):
    from gmae.cli import main

    assert main(["layers", photos[0], "--checkpoint", checkpoints["mae"], "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GMAE checkpoint" in err


def test_eval_zeroshot_json_on_deadleaves(checkpoints, capsys):
    import json

    from gmae.cli import main

    args = ["eval-zeroshot", "--checkpoint", checkpoints["gmae"], "--num-images", "3", "--json"]
    assert main(args) == 0
    trained = json.loads(capsys.readouterr().out)
    for key in ("edge_ods", "edge_ois", "edge_ap", "fg_iou", "depth_pair_acc", "depth_pair_acc_touching"):
        assert 0.0 <= trained[key] <= 1.0
    assert -1.0 <= trained["depth_rank_spearman"] <= 1.0 and trained["depth_pairs"] > 0
    assert set(trained["baselines"]) == {"sobel", "canny", "no edges", "ellipse", "all figure", "border prior",
                                         "size prior", "reverse size prior", "random order"}
    assert set(trained["baselines"]["ellipse"]) == {"fg_iou"} and "edge_ods" in trained["baselines"]["sobel"]
    for prior in ("border prior", "size prior", "reverse size prior"):
        assert set(trained["baselines"][prior]) == {"depth_rank_spearman", "depth_pair_acc",
                                                    "depth_pair_acc_touching", "depth_ooa"}
    # OOA and its coverage; a prior and its reverse order every scored pair oppositely (no ties: areas differ)
    assert trained["depth_ooa_pairs"] + trained["depth_ooa_pairs_skipped"] > 0
    assert 0.0 <= trained["depth_ooa_coverage"] <= 1.0
    size, reverse = trained["baselines"]["size prior"], trained["baselines"]["reverse size prior"]
    if trained["depth_ooa_pairs"]:
        assert 0.0 <= trained["depth_ooa"] <= 1.0
        assert size["depth_ooa"] + reverse["depth_ooa"] == pytest.approx(1.0)
    assert trained["num_images"] == 3 and not trained["random_init"]
    # the layout and the full-image fidelity on the images read
    assert trained["layout"]["num_images"] == 3 and isinstance(trained["layout"]["image_independent"], bool)
    assert trained["fidelity"]["psnr_gain"] == pytest.approx(trained["fidelity"]["psnr_full"]
                                                             - trained["fidelity"]["psnr_mean_colour"])
    # the model's own scores are its readouts' on these images, scored here without eval-zeroshot's path
    from gmae.evaluate.boundaries import evaluate_boundaries, mean_iou
    from gmae.evaluate.depth import depth_metrics
    from gmae.evaluate.zeroshot import items
    from gmae.io.loader import load

    model, _, _ = load(checkpoints["gmae"], "model")
    scenes = list(items("deadleaves", 32, 3)[0])
    g = zeroshot.gaussians_of(model, torch.stack([s.image for s in scenes]))
    canvas = zeroshot.Canvas.of(model)
    figure, _ = zeroshot.figure_ground(g, canvas)
    assert trained["fg_iou"] == pytest.approx(mean_iou(list(figure.numpy()), [s.figure for s in scenes]))
    soft, _ = zeroshot.soft_edges(g, canvas)
    edges = evaluate_boundaries(list(soft.numpy().astype(np.float64)), [s.boundaries for s in scenes], progress=False)
    assert trained["edge_ods"] == pytest.approx(edges["ods"]) and trained["edge_ap"] == pytest.approx(edges["ap"])
    depth = depth_metrics([(g.means[i].numpy(), g.opacities[i].numpy()) for i in range(3)], [s.depth for s in scenes])
    for key in ("depth_rank_spearman", "depth_pair_acc", "depth_ooa", "depth_pairs"):
        assert trained[key] == pytest.approx(depth[key], nan_ok=True), key
    assert main([*args, "--random-init"]) == 0
    init = json.loads(capsys.readouterr().out)
    # same images, same truth: the image baselines are equal (the border prior scores each model's own Gaussians)
    same = ("sobel", "canny", "ellipse")
    assert init["random_init"] and {k: init["baselines"][k] for k in same} == {k: trained["baselines"][k] for k in same}
    assert init["edge_ods"] != trained["edge_ods"] or init["fg_iou"] != trained["fg_iou"]


def test_deadleaves_truth_is_the_generators():
    from gmae.data import DeadLeaves
    from gmae.evaluate.zeroshot import EVAL_SEED, items

    stream, n = items("deadleaves", 48, num_images=2)
    first = next(iter(stream))
    sample = DeadLeaves(48, seed=EVAL_SEED).sample(0)
    assert n == 2 and torch.equal(first.image, sample.image)
    np.testing.assert_array_equal(first.boundaries[0], sample.boundaries.numpy())
    leaves = sample.num_objects - 1
    np.testing.assert_array_equal(first.figure, (sample.objects > leaves / 2).numpy())
    assert 0 < first.figure.mean() < 1
    np.testing.assert_array_equal(first.depth.objects, sample.objects.numpy())
    np.testing.assert_array_equal(first.depth.overlaps, sample.overlaps.numpy())
    with pytest.raises(GMAEError, match="unknown evaluation data"):
        items("imagenet", 48)


def test_eval_zeroshot_on_bsds_and_mask_layouts_scores_the_centre_square(checkpoints, tmp_path, capsys):
    """Non-square images: truth and baselines are cropped with the image (a misplaced crop would score ~0)."""
    import json

    import scipy.io
    from PIL import Image

    from gmae.cli import main
    from gmae.readouts.segment import ellipse_prior

    # BSDS layout: a 200x300 image with one vertical step edge at column 150, annotated by two people.
    bsds = tmp_path / "bsds"
    (bsds / "images" / "test").mkdir(parents=True)
    (bsds / "groundTruth" / "test").mkdir(parents=True)
    image = np.full((200, 300, 3), 30, np.uint8)
    image[:, 150:] = 220
    Image.fromarray(image).save(bsds / "images" / "test" / "1.png")
    edge = np.zeros((200, 300), np.uint8)
    edge[:, 149] = 1
    cell = np.empty((1, 2), dtype=object)
    for k in range(2):
        cell[0, k] = {"Segmentation": np.ones((200, 300), np.uint16), "Boundaries": edge}
    scipy.io.savemat(bsds / "groundTruth" / "test" / "1.mat", {"groundTruth": cell})
    assert main(["eval-zeroshot", "--checkpoint", checkpoints["gmae"], "--data", f"bsds:{bsds}", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "fg_iou" not in scores and 0 <= scores["edge_ods"] <= 1
    assert scores["baselines"]["sobel"]["edge_ods"] > 0.9

    # Mask layout: a 120x200 image whose mask is the centred ellipse of its centre square.
    masks = tmp_path / "masks"
    (masks / "images").mkdir(parents=True)
    (masks / "masks").mkdir()
    Image.fromarray(np.zeros((120, 200, 3), np.uint8)).save(masks / "images" / "a.jpg")
    mask = np.zeros((120, 200), bool)
    mask[:, 40:160] = ellipse_prior(120, 120)
    Image.fromarray(mask.astype(np.uint8) * 255).save(masks / "masks" / "a.png")
    assert main(["eval-zeroshot", "--checkpoint", checkpoints["gmae"], "--data", f"masks:{masks}", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "edge_ods" not in scores and 0 <= scores["fg_iou"] <= 1
    assert scores["baselines"]["ellipse"]["fg_iou"] == 1.0


# --------------------------------------------------------------------------- the collapse guard

def test_depth_collapse_figures_and_verdict():
    from gmae.readouts.core import COLLAPSE_AT_LIMIT, COLLAPSE_SPREAD

    bounded = model_config("tiny", img_size=32, num_gaussians=12, depth_param="bounded")
    linear = model_config("tiny", img_size=32, num_gaussians=12, depth_param="linear", camera="orthographic")
    g = layered_scene(12)  # z spread over -0.9 ... 0.9, none at a limit
    healthy = zeroshot.depth_collapse(g, bounded)
    assert healthy["depth_at_limit"] == 0.0 and healthy["depth_spread"] > 0.5 and not healthy["collapsed"]
    assert healthy["num_images"] == 1 and zeroshot.collapse_message(healthy) is None
    g.means[..., 2] = -1.0  # every z at the near limit: the sort orders nothing
    collapsed = zeroshot.depth_collapse([g, g], bounded)
    assert collapsed["depth_at_limit"] == 1.0 and collapsed["depth_spread"] == 0.0 and collapsed["collapsed"]
    assert collapsed["num_images"] == 2
    message = zeroshot.collapse_message(collapsed)
    assert message.startswith("depth collapsed: 100% of z at a limit, spread 0 (on 2 images)")
    assert "query-token order, not depth" in message and "\n" not in message
    # half at a limit is not yet collapsed; more than half is
    g.means[0, :6, 2] = torch.linspace(-0.5, 0.5, 6)
    assert zeroshot.depth_collapse(g, bounded)["depth_at_limit"] == 0.5 == COLLAPSE_AT_LIMIT
    assert not zeroshot.depth_collapse(g, bounded)["collapsed"]
    # linear z is unbounded: |z| >= 0.99 is no limit, only the spread counts
    g.means[..., 2] = torch.linspace(2.0, 5.0, 12)
    assert zeroshot.depth_collapse(g, linear) == {**zeroshot.depth_collapse(g, linear), "depth_at_limit": 0.0,
                                                  "collapsed": False}
    assert zeroshot.depth_collapse(g, bounded)["collapsed"]
    g.means[..., 2] = 3.0 + torch.linspace(0, COLLAPSE_SPREAD, 12)  # std below the threshold
    assert zeroshot.depth_collapse(g, linear)["collapsed"]


@pytest.fixture(scope="module")
def collapsed_checkpoint(checkpoints, tmp_path_factory):
    """The gmae checkpoint with its head's z bias at -30 and z weights 0, and the authors' bounded z: every
    z = -1, the near limit (centred z, the tiny default, cannot drift there: all z would tie at 0 instead)."""
    from gmae.io.checkpoint import save_checkpoint
    from gmae.io.loader import load

    state = load(checkpoints["gmae"], "checkpoint")
    state["config"]["model"]["depth_param"] = "bounded"
    state["model"]["gaussian_head.bias"][2] = -30.0
    state["model"]["gaussian_head.weight"][2] = 0.0
    return str(save_checkpoint(state, tmp_path_factory.mktemp("collapsed") / "checkpoint-0000002.pt"))


def collapse_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("depth collapsed")]


def test_readout_commands_say_when_the_depths_have_collapsed(checkpoints, collapsed_checkpoint, photos, tmp_path,
                                                             capsys):
    from gmae.cli import main

    for command in ("layers", "segment"):
        assert main([command, *photos, "--checkpoint", collapsed_checkpoint, "--out", str(tmp_path)]) == 0
        out, err = capsys.readouterr()
        assert len(out.split()) == 2  # the figures are still written
        assert collapse_lines(err) == ["depth collapsed: 100% of z at a limit, spread 0 (on 2 images) -- the depth "
                                       "order of these readouts is the query-token order, not depth"]
        assert main([command, *photos, "--checkpoint", checkpoints["gmae"], "--out", str(tmp_path)]) == 0
        assert collapse_lines(capsys.readouterr().err) == []


def test_eval_zeroshot_json_carries_the_collapse_figures(checkpoints, collapsed_checkpoint, capsys):
    import json

    from gmae.cli import main

    args = ["eval-zeroshot", "--num-images", "2", "--json", "--checkpoint"]
    assert main([*args, collapsed_checkpoint]) == 0
    out, err = capsys.readouterr()
    collapse = json.loads(out)["collapse"]
    assert collapse["collapsed"] is True and collapse["depth_at_limit"] == pytest.approx(1.0)
    assert collapse["depth_spread"] == pytest.approx(0.0, abs=1e-6) and collapse["num_images"] == 2
    assert 0.0 <= collapse["scale_at_cap"] <= 1.0
    assert len(collapse_lines(err)) == 1 and "on 2 images" in collapse_lines(err)[0]
    # its random-init row (the same architecture at the run's initial weights) and the healthy model are not
    for extra, checkpoint in ((["--random-init"], collapsed_checkpoint), ([], checkpoints["gmae"])):
        assert main([*args, checkpoint, *extra]) == 0
        out, err = capsys.readouterr()
        collapse = json.loads(out)["collapse"]
        assert collapse["collapsed"] is False and collapse["depth_at_limit"] < 0.1 and collapse["depth_spread"] > 0.1
        assert collapse_lines(err) == []
    from gmae.evaluate.zeroshot import format_scores

    table = format_scores(json.loads(out))
    depth = [line for line in table.splitlines() if line.startswith("gmae depth: ")]
    assert len(depth) == 1 and depth[0].startswith("gmae depth: 0% of z at a limit, spread ")
    assert depth[0].endswith("(not collapsed)")
    assert table.splitlines()[-2].startswith("gmae layout on the first 2 images: spread ratio ")
    assert table.splitlines()[-1].startswith("gmae full render (mask 0): PSNR ")


def test_info_shows_the_collapse_figures(checkpoints, collapsed_checkpoint, capsys):
    import json

    from gmae.cli import main

    assert main(["info", collapsed_checkpoint, "--json"]) == 0
    collapse = json.loads(capsys.readouterr().out)["collapse"]
    assert collapse["collapsed"] is True and collapse["depth_at_limit"] == 1.0 and collapse["num_images"] == 8
    assert collapse["source"] == "8 held-out deadleaves images (seed 2024)"
    assert main(["info", collapsed_checkpoint]) == 0
    text = capsys.readouterr().out
    assert "depth: 100% of z at a limit, spread 0, " in text and "(collapsed: the depth order is the query-token " \
        "order)" in text and "measured on 8 held-out deadleaves images (seed 2024)" in text
    assert main(["info", checkpoints["gmae"], "--json"]) == 0
    healthy = json.loads(capsys.readouterr().out)["collapse"]
    assert healthy["collapsed"] is False and healthy["depth_spread"] > 0.1


def test_info_falls_back_to_the_logged_monitors(checkpoints, tmp_path, capsys):
    """A run whose data cannot be read here: the last monitors of its metrics.jsonl, said so."""
    import json

    from gmae.io.checkpoint import save_checkpoint

    from gmae.io.loader import load
    from gmae.cli import main

    state = load(checkpoints["gmae"], "checkpoint")
    state["config"]["train"]["data"] = str(tmp_path / "gone")
    save_checkpoint(state, tmp_path / "checkpoint-0000002.pt")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 0.2, "scale_at_cap": 0.97, "depth_spread": 0.006, "depth_at_limit": 0.88})
        + '\n{"step": 2, "lo')
    assert main(["info", str(tmp_path), "--json"]) == 0
    collapse = json.loads(capsys.readouterr().out)["collapse"]
    assert collapse["collapsed"] is True and collapse["depth_at_limit"] == 0.88 and collapse["scale_at_cap"] == 0.97
    assert collapse["source"].startswith(f"the last monitors logged in {tmp_path / 'metrics.jsonl'} (step 1")


def test_readouts_say_once_when_the_layout_does_not_follow_the_image(checkpoints, photos, tmp_path, capsys):
    """A 2-step model puts its Gaussians in the same place for every image: the readout commands and the API say
    so once, with where it was measured; the API's layout() gives the figures."""
    import warnings

    import gmae
    from gmae.cli import main
    from gmae.errors import LayoutWarning

    assert main(["layers", *photos, "--checkpoint", checkpoints["gmae"], "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layout does not follow")]
    assert len(lines) == 1 and "held-out deadleaves images" in lines[0]
    model = gmae.load(checkpoints["gmae"])
    with pytest.warns(LayoutWarning, match="layout does not follow the image") as caught:
        model.layers(torch.rand(2, 3, 32, 32))
    assert len([w for w in caught if w.category is LayoutWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        model.edges(torch.rand(1, 3, 32, 32))  # once per model
    figures = model.layout(torch.rand(3, 3, 32, 32))
    assert figures["image_independent"] and figures["source"] == "the 3 images given"
    with pytest.raises(Exception, match="at least 2"):
        model.layout(torch.rand(1, 3, 32, 32))


def test_the_api_warns_when_the_depths_have_collapsed(checkpoints, collapsed_checkpoint):
    import warnings

    import gmae
    from gmae.errors import DepthCollapseWarning

    images = torch.rand(2, 3, 32, 32)
    model = gmae.load(collapsed_checkpoint)
    for readout in (model.layers, model.edges, model.figure_ground, model.gaussians):
        with pytest.warns(DepthCollapseWarning, match="100% of z at a limit.*query-token order") as caught:
            readout(images)
        caught = [w for w in caught if w.category is DepthCollapseWarning]  # (the layout guard warns too, once)
        assert len(caught) == 1 and caught[0].filename == __file__  # reported where the readout was called
    figures = model.depth_collapse(images)
    assert figures["collapsed"] and figures["depth_at_limit"] == 1.0 and figures["num_images"] == 2
    healthy = gmae.load(checkpoints["gmae"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DepthCollapseWarning)
        healthy.layers(images)
    assert not healthy.depth_collapse(images)["collapsed"]
