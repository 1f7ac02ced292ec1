"""The sprites source (`gmae.data.Sprites`, `--data sprites`): its images, its ground truth, and the commands on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gmae.data import DeadLeaves, Sprites, build_dataset, order_weights
from gmae.data.sprites import SHAPES
from gmae.errors import GMAEError

SIZE = 64


def whole_shapes(source, index):
    """bool (n+1, H, W): every object's whole shape, hidden parts included (the generator's own masks)."""
    _, _, _, shapes = source._render(index, whole_shapes=True)
    return shapes.reshape(len(shapes), source.height, source.width) > 0


def test_sprites_are_deterministic_per_index_and_seed():
    source = Sprites(SIZE, seed=0)
    a, b = source.sample(7), source.sample(7)
    for field in ("image", "objects", "depth_rank", "boundaries", "shapes", "textures", "colors", "overlaps",
                  "order_weights", "figure"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(Sprites(SIZE, seed=0).load(7, np.random.default_rng(5)), a.image)  # another process, any rng
    assert not torch.equal(source.sample(8).image, a.image)
    assert not torch.equal(Sprites(SIZE, seed=1).sample(7).image, a.image)
    assert len(source) >= 10**9 and source.shuffle is False
    # the same scene at another resolution: same shapes and colours
    big = Sprites(2 * SIZE, seed=0).sample(7)
    assert torch.equal(big.shapes, a.shapes) and torch.equal(big.colors, a.colors)


def test_one_to_four_shapes_of_the_four_kinds_on_a_plain_background():
    source = Sprites(SIZE, seed=0)
    counts, kinds = set(), set()
    for i in range(60):
        s = source.sample(i)
        n = s.num_objects - 1
        counts.add(n)
        assert 1 <= n <= 4
        assert int(s.shapes[0]) == SHAPES.index("background")
        kinds.update(SHAPES[k] for k in s.shapes[1:].tolist())
        assert (s.textures == 0).all()  # flat
        image = s.image.permute(1, 2, 0)
        assert s.image.shape == (3, SIZE, SIZE) and 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        # the background is one plain colour, and each visible object is exactly its colour
        for k in range(n + 1):
            visible = image[s.objects == k]
            assert torch.equal(visible, s.colors[k].expand_as(visible))
    assert counts == {1, 2, 3, 4}
    assert kinds == {"disc", "square", "triangle", "ellipse"}


def test_shapes_have_their_kinds_area_and_size():
    """Each whole shape covers its kind's area (disc pi r^2, square (2r)^2, equilateral triangle 3 sqrt(3)/4 r^2,
    ellipse pi r^2 aspect) at 256 px, with r in 10-30 % of the side."""
    size = 256
    source = Sprites(size, seed=4)
    seen = set()
    for i in range(12):
        p = source._draw_scene(np.random.default_rng([4, i, *source._rng_tag]))
        whole = whole_shapes(source, i)
        for q in range(1, p["n"] + 1):
            kind, r = SHAPES[p["kind"][q]], p["r"][q - 1] * size
            assert 0.1 * size <= r <= 0.3 * size
            area = {"disc": math.pi * r * r, "square": 4 * r * r, "triangle": 3 * math.sqrt(3) / 4 * r * r,
                    "ellipse": math.pi * r * r * p["aspect"][q - 1]}[kind]
            covered = whole[q].sum()
            if kind == "square":  # a rotated square's corners may leave the image
                assert 0.8 * area <= covered <= 1.02 * area, (kind, covered, area)
            else:
                assert covered == pytest.approx(area, rel=0.03), (kind, covered, area)
            seen.add(kind)
    assert seen == {"disc", "square", "triangle", "ellipse"}


def test_ground_truth_is_the_paint_order():
    source = Sprites(SIZE, seed=0)
    overlapping = hidden_part = 0
    for i in range(40):
        s = source.sample(i)
        n = s.num_objects - 1
        whole = whole_shapes(source, i)
        # painting the whole shapes in order, the last that covers a pixel is the one visible there
        painted = (np.arange(n + 1)[:, None, None] * whole).max(0)
        np.testing.assert_array_equal(s.objects.numpy(), painted)
        assert torch.equal(s.depth_rank, n - s.objects)  # 0 = the last painted = nearest
        # figure = the union of the shapes
        np.testing.assert_array_equal(s.figure.numpy(), whole[1:].any(0))
        # boundaries exactly where the visible object differs from the right or lower neighbour
        o = s.objects.numpy()
        ref = np.zeros_like(o, dtype=bool)
        ref[:, :-1] |= o[:, :-1] != o[:, 1:]
        ref[:-1, :] |= o[:-1, :] != o[1:, :]
        np.testing.assert_array_equal(s.boundaries.numpy(), ref)
        # whole-shape overlaps, and OOA weights |overlap| * |c_i - c_j|^2
        flat = whole.reshape(n + 1, -1).astype(int)
        np.testing.assert_array_equal(s.overlaps.numpy(), flat @ flat.T > 0)
        c = s.colors.double()
        expected = (flat @ flat.T) * ((c[:, None] - c[None]) ** 2).sum(-1).numpy()
        np.fill_diagonal(expected, 0)
        np.testing.assert_allclose(s.order_weights.numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(order_weights(flat, c.numpy()), expected, rtol=1e-9)
        overlapping += bool(np.triu(s.overlaps.numpy()[1:, 1:], 1).any())
        hidden_part += any(whole[k].sum() > (o == k).sum() for k in range(1, n + 1))
    # occlusions are common: most images have overlapping shapes, some of them partly hidden
    assert overlapping >= 20 and hidden_part >= 20


def test_colours_are_distinct():
    source = Sprites(SIZE, seed=0)
    for i in range(30):
        c = source.sample(i).colors
        d = torch.cdist(c.double(), c.double())
        assert float(d[~torch.eye(len(c), dtype=torch.bool)].min()) >= 0.3


def test_train_and_evaluation_images_are_disjoint():
    from gmae.config import TrainConfig
    from gmae.evaluate.zeroshot import EVAL_SEED, items

    train = build_dataset("sprites", 32, seed=TrainConfig().seed)
    assert isinstance(train, Sprites) and isinstance(build_dataset(" Sprites ", 32), Sprites)
    assert EVAL_SEED != TrainConfig().seed
    stream, n = items("sprites", 32, num_images=20)
    evaluated = [it.image for it in stream]
    trained = [train.load(i) for i in range(200)]
    assert n == 20 and not any(torch.equal(a, b) for a in evaluated for b in trained)
    first = Sprites(32, seed=EVAL_SEED).sample(0)
    assert torch.equal(evaluated[0], first.image)
    # and sprites are not dead-leaves' images under the same (seed, index)
    assert not torch.equal(Sprites(32).sample(0).image, DeadLeaves(32).sample(0).image)


def test_evaluation_items_carry_the_sprites_truth():
    from gmae.evaluate.zeroshot import EVAL_SEED, items

    stream, _ = items("sprites", 48, num_images=2)
    item = next(iter(stream))
    s = Sprites(48, seed=EVAL_SEED).sample(0)
    assert item.name == "sprites-0"
    np.testing.assert_array_equal(item.boundaries[0], s.boundaries.numpy())
    np.testing.assert_array_equal(item.figure, (s.objects > 0).numpy())
    np.testing.assert_array_equal(item.depth.objects, s.objects.numpy())
    np.testing.assert_array_equal(item.depth.overlaps, s.overlaps.numpy())
    np.testing.assert_array_equal(item.depth.weights, s.order_weights.numpy())


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="at least one shape"):
        Sprites(32, min_shapes=0)
    with pytest.raises(ValueError, match="max_radius"):
        Sprites(32, max_radius=0.5)
    with pytest.raises(ValueError):
        Sprites(32, min_shapes=3, max_shapes=2)
    with pytest.raises(IndexError):
        Sprites(32).sample(-1)
    with pytest.raises(GMAEError, match="sprites"):
        build_dataset("sprits", 32)
    with pytest.raises(GMAEError):
        build_dataset("sprites", 32, seed=-1)


FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet", "--steps", "2",
        "--threads", "1"]


def test_pretrain_and_eval_zeroshot_on_sprites(tmp_path, capsys):
    from gmae.cli import main
    from gmae.evaluate.boundaries import mean_iou
    from gmae.evaluate.zeroshot import items
    from gmae.readouts.segment import ellipse_prior

    out = tmp_path / "run"
    assert main(["pretrain", *FAST, "--data", "sprites", "--out", str(out)]) == 0
    checkpoint = out / "checkpoint-0000002.pt"
    assert checkpoint.exists()
    capsys.readouterr()
    args = ["eval-zeroshot", "--checkpoint", str(checkpoint), "--data", "sprites", "--num-images", "6"]
    assert main([*args, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["data"] == "sprites" and scores["num_images"] == 6
    for key in ("edge_ods", "fg_iou", "depth_pair_acc", "depth_ooa_coverage"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["depth_pairs"] > 0 and scores["depth_ooa_pairs"] + scores["depth_ooa_pairs_skipped"] > 0
    assert {"border prior", "size prior", "reverse size prior", "ellipse"} <= set(scores["baselines"])
    # the ellipse baseline against the sprites' figure truth, by hand
    figures = [it.figure for it in items("sprites", 32, 6)[0]]
    assert scores["baselines"]["ellipse"]["fg_iou"] == pytest.approx(
        mean_iou([ellipse_prior(32, 32) for _ in figures], figures))
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("sprites, 6 images") and "depth OOA" in table and "reverse size prior" in table
    assert f"depth OOA: {scores['depth_ooa_pairs']} object pairs scored" in table
