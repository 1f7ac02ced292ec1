"""Tests for gmae.data: dead-leaves, the seeded stream, image folders, photos."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.data import (
    DeadLeaves,
    ImageFolder,
    Photos,
    SeededStream,
    StepBatchSampler,
    build_dataset,
    global_batch,
    masks,
    random_resized_crop_params,
)
from gmae.data.deadleaves import SHAPES, TEXTURES
from gmae.data.images import mae_augment, pil_to_tensor, random_resized_crop, resize_center_crop, to_rgb
from gmae.errors import GMAEError


# ----------------------------------------------------------------- dead-leaves
def _check_image(x, h, w):
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, h, w) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.isfinite(x).all()


def test_deadleaves_deterministic_and_distinct():
    d = DeadLeaves(64, seed=0)
    a, b = d.sample(5), d.sample(5)
    for f in ("image", "objects", "depth_rank", "boundaries", "shapes", "textures", "colors"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.num_objects == b.num_objects
    # A fresh instance (e.g. in another process) gives the same image.
    assert torch.equal(DeadLeaves(64, seed=0).load(5, None), a.image)
    assert not torch.equal(d.sample(6).image, a.image)
    assert not torch.equal(DeadLeaves(64, seed=1).sample(5).image, a.image)
    # load ignores the rng.
    assert torch.equal(d.load(5, np.random.default_rng(123)), a.image)
    assert len(d) >= 10**9 and d.shuffle is False


@pytest.mark.parametrize("size", [32, 64, 224, (48, 80)])
def test_deadleaves_shapes_and_ranges(size):
    d = DeadLeaves(size, seed=3)
    h, w = (size, size) if isinstance(size, int) else size
    for i in range(3):
        s = d.sample(i)
        _check_image(s.image, h, w)
        assert s.objects.shape == (h, w) and s.objects.dtype == torch.int64
        assert s.depth_rank.shape == (h, w) and s.depth_rank.dtype == torch.int64
        assert s.boundaries.shape == (h, w) and s.boundaries.dtype == torch.bool
        n = s.num_objects - 1
        assert 8 <= n <= 40
        assert int(s.objects.min()) >= 0 and int(s.objects.max()) <= n
        assert s.shapes.shape == (n + 1,) and s.textures.shape == (n + 1,)
        assert s.colors.shape == (n + 1, 3)
        assert int(s.shapes[0]) == SHAPES.index("background")
        assert (s.shapes[1:] > 0).all()


def test_deadleaves_ground_truth_consistency():
    d = DeadLeaves(64, seed=0)
    for i in range(10):
        s = d.sample(i)
        n = s.num_objects - 1
        assert torch.equal(s.depth_rank, n - s.objects)
        o = s.objects.numpy()
        # Boundaries: exactly where the right or lower neighbour has another id.
        ref = np.zeros_like(o, dtype=bool)
        for y in range(o.shape[0]):
            for x in range(o.shape[1]):
                if x + 1 < o.shape[1] and o[y, x] != o[y, x + 1]:
                    ref[y, x] = True
                if y + 1 < o.shape[0] and o[y, x] != o[y + 1, x]:
                    ref[y, x] = True
        assert np.array_equal(s.boundaries.numpy(), ref)
        assert s.boundaries.any()
        # Masks partition the image and agree with objects.
        m = masks(s)
        assert m.shape == (n + 1, 64, 64) and m.dtype == torch.bool
        assert torch.equal(m.sum(0), torch.ones(64, 64, dtype=m.sum(0).dtype))
        assert torch.equal(m.float().argmax(0), s.objects)
        assert torch.equal(s.masks(), m)
        # Several leaves are visible; the nearest visible one has rank min.
        assert len(torch.unique(s.objects)) >= 3


def test_deadleaves_flat_objects_are_constant_and_texture_varies():
    d = DeadLeaves(64, seed=0)
    flat = TEXTURES.index("flat")
    n_flat = n_textured = 0
    for i in range(20):
        s = d.sample(i)
        img = s.image.permute(1, 2, 0)  # (H, W, 3)
        for k in torch.unique(s.objects).tolist():
            sel = s.objects == k
            pix = img[sel]
            if int(s.textures[k]) == flat:
                # Hard edges + flat texture: every visible pixel is exactly the colour.
                assert torch.equal(pix, s.colors[k].expand_as(pix))
                n_flat += 1
            elif int(sel.sum()) >= 30:
                # Gradients, stripes and noise vary inside the object.
                assert float(pix.std(0).max()) > 1e-3
                n_textured += 1
    assert n_flat > 10 and n_textured > 5


def test_deadleaves_same_scene_at_any_size():
    # The scene is resolution independent: each object covers about the same
    # share of the image at 64 and 128 px.
    s64 = DeadLeaves(64, seed=0).sample(4)
    s128 = DeadLeaves(128, seed=0).sample(4)
    assert s64.num_objects == s128.num_objects
    assert torch.equal(s64.colors, s128.colors)
    c64 = torch.bincount(s64.objects.flatten(), minlength=s64.num_objects).float() / 64**2
    c128 = torch.bincount(s128.objects.flatten(), minlength=s128.num_objects).float() / 128**2
    assert float((c64 - c128).abs().max()) < 0.03


def test_deadleaves_sizes_are_heavy_tailed():
    d = DeadLeaves(64, seed=0)
    areas = []
    for i in range(30):
        p = d._draw_scene(np.random.default_rng([0, i]))
        areas.extend((p["r"] * 64) ** 2)
    areas = np.array(areas)
    # Many small leaves and a few big ones.
    assert np.median(areas) < 0.5 * areas.mean()
    assert areas.max() > 20 * np.median(areas)


def test_deadleaves_bad_args():
    with pytest.raises(ValueError):
        DeadLeaves(0)
    with pytest.raises(ValueError):
        DeadLeaves(64, min_shapes=10, max_shapes=5)
    with pytest.raises(IndexError):
        DeadLeaves(16).sample(-1)


# ---------------------------------------------------------------- the stream
class _Finite:
    """Finite source returning its index as a constant image, plus an rng draw."""

    shuffle = True

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def load(self, index, rng):
        return torch.tensor([float(index), float(rng.random())])


def test_stream_same_g_same_tensor():
    src = _Finite(13)
    s1, s2 = SeededStream(src, seed=4), SeededStream(src, seed=4)
    for g in (0, 7, 12, 13, 40, 1000):
        assert torch.equal(s1[g], s2[g])
        assert torch.equal(s1[g], s1[g])
    # Out of order access gives the same as in order (no hidden state).
    fwd = [s1[g] for g in range(30)]
    back = [SeededStream(src, seed=4)[g] for g in reversed(range(30))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(fwd, back))


def test_stream_epochs_visit_each_index_once():
    n = 17
    s = SeededStream(_Finite(n), seed=0)
    orders = []
    for e in range(4):
        idx = [int(s[g][0]) for g in range(e * n, (e + 1) * n)]
        assert sorted(idx) == list(range(n))
        assert [s.index(g) for g in range(e * n, (e + 1) * n)] == idx
        orders.append(idx)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled each epoch
    other = [SeededStream(_Finite(n), seed=1).index(g) for g in range(n)]
    assert other != orders[0]
    # rng differs per g (same index in two epochs gets a different augmentation).
    assert len({float(s[g][1]) for g in range(3 * n)}) == 3 * n


def test_stream_virtual_source_no_permutation():
    d = DeadLeaves(32, seed=2)
    s = SeededStream(d, seed=9)
    assert [s.index(g) for g in range(5)] == list(range(5))
    assert torch.equal(s[3], d.sample(3).image)


def test_stream_batches_and_dataloader():
    assert global_batch(3, 8) == list(range(24, 32))
    parts = [global_batch(3, 8, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(24, 32))
    s = SeededStream(_Finite(10), seed=0)
    loader = torch.utils.data.DataLoader(s, batch_sampler=StepBatchSampler(4, start_step=2, num_steps=2))
    batches = list(loader)
    assert len(batches) == 2
    assert torch.equal(batches[0], torch.stack([s[g] for g in range(8, 12)]))
    assert torch.equal(batches[1], torch.stack([s[g] for g in range(12, 16)]))
    with pytest.raises(GMAEError):
        SeededStream(_Finite(3), seed=-1)


# -------------------------------------------------------------- augmentation
def test_random_resized_crop_params_scale_and_ratio():
    rng = np.random.default_rng(0)
    H, W = 300, 400
    fracs, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(H, W, rng)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        fracs.append(h * w / (H * W))
        ratios.append(w / h)
    fracs, ratios = np.array(fracs), np.array(ratios)
    assert fracs.min() >= 0.2 - 0.01 and fracs.max() <= 1.0
    assert fracs.min() < 0.25 and fracs.max() > 0.8  # the range is used
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02


def test_random_resized_crop_fallback_centre_crop():
    # A very wide image: no box of ratio <= 4/3 and area >= 0.2 fits the height
    # often, but the fallback must be a centre crop clamped to ratio 4/3.
    class NoLuck:  # a generator whose draws never fit
        def uniform(self, lo, hi):
            return hi  # area 100%, widest ratio: 37 x 27 never fits a height of 10

        def integers(self, lo, hi):
            raise AssertionError("no box should fit")

    top, left, h, w = random_resized_crop_params(10, 100, NoLuck())
    assert (top, h) == (0, 10) and w == round(10 * 4 / 3) and left == (100 - w) // 2


def test_random_resized_crop_output_and_flip():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = random_resized_crop(img, 24, np.random.default_rng(0))
    assert out.size == (24, 24)
    assert random_resized_crop(img, (16, 32), np.random.default_rng(0)).size == (32, 16)

    # Flip: same rng seed => same crop box; mae_augment flips iff its last
    # draw is < 0.5.  Find seeds for both cases and compare with the unflipped crop.
    seen = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        crop = pil_to_tensor(random_resized_crop(img, 24, rng))
        flip = rng.random() < 0.5
        x = mae_augment(img, 24, np.random.default_rng(seed))
        _check_image(x, 24, 24)
        expect = crop.flip(-1) if flip else crop
        assert torch.equal(x, expect)
        seen.add(flip)
    assert seen == {True, False}


def test_resize_center_crop_deterministic():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    a = resize_center_crop(img, 32)
    _check_image(a, 32, 32)
    assert torch.equal(a, resize_center_crop(img, 32))


# -------------------------------------------------------------- image folder
def _make_tree(root):
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "deep").mkdir(parents=True)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "cat" / "a.JPG")
    Image.fromarray(rgb[..., 0]).save(root / "cat" / "gray.png")
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 128, np.uint8)], 2)
    Image.fromarray(rgba).save(root / "dog" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "dog" / "pal.gif")
    Image.fromarray(rgb).save(root / "dog" / "deep" / "b.bmp")
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(root / "dog" / "tiny.png")
    grad16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(grad16).save(root / "dog" / "sixteen.png")
    Image.fromarray(rgb).save(root / "flat.webp")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"junk")


def test_image_folder_loads_all_kinds(tmp_path):
    root = tmp_path / "data"
    _make_tree(root)
    ds = ImageFolder(str(root), 32, split=None)
    assert len(ds) == 8
    assert ds.files == sorted(ds.files)
    assert ds.classes == ["cat", "dog"]
    by_name = dict(zip([os.path.basename(f) for f in ds.files], ds.targets))
    assert by_name["a.JPG"] == 0 and by_name["b.bmp"] == 1 and by_name["flat.webp"] == -1
    for i in range(len(ds)):
        _check_image(ds.load(i, np.random.default_rng(i)), 32, 32)
    assert ds.bad_images == 0
    # Same rng => same sample; different rng => different crop.
    a = ds.load(0, np.random.default_rng(5))
    assert torch.equal(a, ds.load(0, np.random.default_rng(5)))
    assert not torch.equal(a, ds.load(0, np.random.default_rng(6)))
    # Non-augmenting mode (for probes).
    _check_image(ImageFolder(str(root), 16, augment=False, split=None).load(0), 16, 16)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    grad16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(grad16).save(tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        im.load()
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (64, 64, 3)
    expect = np.rint(grad16 / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expect).max() <= 1
    assert rgb.mean() > 100  # a plain convert("RGB") would be almost all 255
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_image_folder_imagenet_train_split(tmp_path):
    rgb = np.zeros((20, 20, 3), np.uint8)
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(rgb).save(tmp_path / split / c / "x.JPEG")
    ds = build_dataset(str(tmp_path), 16)
    assert isinstance(ds, ImageFolder)
    assert ds.root == os.path.join(str(tmp_path), "train")
    assert ds.classes == ["n01", "n02"] and ds.targets == [0, 1]
    assert len(ImageFolder(str(tmp_path), 16, split="val")) == 2


def test_image_folder_bad_image(tmp_path, caplog):
    root = tmp_path / "d"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "b.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "c.png")
    bad = str(root / "b.jpg")

    ds = build_dataset(str(root), 16, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="gmae.data"):
        x = ds.load(1, np.random.default_rng(0))
    _check_image(x, 16, 16)
    assert ds.bad_images == 1
    assert any(bad in r.getMessage() for r in caplog.records)
    # Deterministic replacement: the next index, with the same rng.
    assert torch.equal(x, ds.load(2, np.random.default_rng(0)))
    ds.load(1, np.random.default_rng(0))
    assert ds.bad_images == 1  # distinct files

    ds_err = build_dataset(str(root), 16, on_bad_image="error")
    with pytest.raises(GMAEError, match="b.jpg"):
        ds_err.load(1, np.random.default_rng(0))
    _check_image(ds_err.load(0, np.random.default_rng(0)), 16, 16)


def test_build_dataset_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(GMAEError) as e:
        build_dataset(str(missing), 32)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(GMAEError) as e:
        build_dataset(str(empty), 32)
    assert str(empty) in str(e.value) and ".jpg" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GMAEError, match="unknown data 'imagenett'"):
        build_dataset("imagenett", 32)
    with pytest.raises(GMAEError):
        build_dataset(str(empty / "readme.txt"), 32)
    with pytest.raises(GMAEError):
        build_dataset("deadleaves", 32, on_bad_image="ignore")
    with pytest.raises(GMAEError):
        build_dataset("deadleaves", 0)
    assert issubclass(GMAEError, ValueError)


def test_build_dataset_names():
    d = build_dataset("deadleaves", 32, seed=7)
    assert isinstance(d, DeadLeaves) and d.seed == 7
    assert isinstance(build_dataset("Dead-Leaves", 32), DeadLeaves)
    assert isinstance(build_dataset("photos", 32), Photos)


# -------------------------------------------------------------------- photos
def test_photos():
    p = Photos(48)
    s = SeededStream(p, seed=0)
    a, b = s[0], s[len(p.photos)]  # same photo, different g
    _check_image(a, 48, 48)
    _check_image(b, 48, 48)
    assert not torch.equal(a, b)
    assert torch.equal(a, SeededStream(Photos(48), seed=0)[0])
    assert len(p.photos) >= 4 and "astronaut" in p.names
    assert p.shuffle is False and len(p) >= 10**9
    # Different photos at consecutive g.
    assert not torch.equal(s[1], s[0])


def test_digits_as_pretraining_data_is_the_unlabelled_train_split():
    import numpy as np

    from gmae.data import build_dataset
    from gmae.data.labelled import load_digits

    source = build_dataset("digits", 32)
    train, val, _ = load_digits(32)
    assert len(source) == len(train) == 1438 and source.shuffle
    img = source.load(3, np.random.default_rng(0))  # augmented crop of train image 3
    assert img.shape == (3, 32, 32) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert torch.equal(source.load(3), train[3][0])  # without an rng: the plain image
