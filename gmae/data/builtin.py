"""The built-in data sets, each one :func:`gmae.data.registry.register` call naming its builders.

Adding a data set is one more call here (or in the code that uses it): see
:mod:`gmae.data.registry` for what each builder takes and gives.
"""

from __future__ import annotations

import numpy as np
import torch

from .deadleaves import DeadLeaves
from .folder import Photos
from .images import resize_center_crop
from .labelled import build_scene_labelled, load_cifar, load_digits, load_folder
from .registry import Dataset, Truth, register
from .sourcelabels import counts_labels, targets_labels
from .sprites import Sprites
from .stream import check_seed

#: The seed of the images the monitors and the evaluations read from a generated source (dead-leaves, sprites):
#: training's default seed is 0, so these are images training never saw.
EVAL_SEED = 2024
#: eval-zeroshot's number of generated images when not given.
GENERATED_IMAGES = 200


def _generated(name: str, cls: type, help: str, aliases: tuple[str, ...] = ()) -> Dataset:
    """A scene generator (dead-leaves, sprites): images of any seed, the scene tasks, the count labels of the
    online probe, exact zero-shot truth and held-out images (seed EVAL_SEED)."""

    def truth(option, size, num_images):
        n = num_images or GENERATED_IMAGES
        source = cls(size, seed=EVAL_SEED)

        def generate():
            for i in range(n):
                s = source.sample(i)
                yield Truth(f"{name}-{i}", s.image, [s.boundaries.numpy()], s.figure.numpy(),
                            (s.objects.numpy(), s.overlaps.numpy(), s.order_weights.numpy()))

        return generate(), n

    def held_out(image_size, num_images, seed):
        held = cls(image_size, seed=check_seed(seed))
        batch = torch.stack([held.load(i, np.random.default_rng([seed, i])) for i in range(num_images)])
        return batch, f"{num_images} held-out {name} images (seed {seed})"

    return Dataset(
        name, help, aliases,
        images=lambda image_size, seed=0, **_: cls(image_size, seed=check_seed(seed)),
        labelled=lambda task, img_size, augment, progress: build_scene_labelled(name, task, img_size, augment,
                                                                                 progress),
        labelled_option="TASK", truth=truth,
        labels=lambda source, img_size: counts_labels(source, name, img_size),
        held_out=held_out, scenes=cls)


def _photos_held_out(image_size, num_images, seed):
    """Each whole photo, resized and centre-cropped (training on them sees random crops)."""
    photos = Photos(image_size)
    chosen = list(zip(photos.names, photos.photos))[:num_images]
    batch = torch.stack([resize_center_crop(photo, image_size, crop_pct=1.0) for _, photo in chosen])
    return batch, f"{len(chosen)} photos ({', '.join(n for n, _ in chosen)}), whole and centre-cropped"


def _benchmark_truth(kind: str):
    """BSDS500 (every annotator's boundaries) or a mask folder (figure masks), each image's centred square."""

    def truth(root, size, num_images):
        from .benchmarks import BSDS500, MaskFolder, centre_square

        dataset = BSDS500(root) if kind == "bsds" else MaskFolder(root)
        n = len(dataset) if num_images is None else min(num_images, len(dataset))

        def read():
            for i in range(n):
                name, image, truth = dataset[i]
                if kind == "bsds":
                    image, truth = centre_square(image, *truth)
                    yield Truth(name, image, truth, None)
                else:
                    image, (mask,) = centre_square(image, truth)
                    yield Truth(name, image, None, mask)

        return read(), n

    return truth


register(_generated("deadleaves", DeadLeaves, "dead-leaves scenes with exact occlusion truth",
                    ("dead-leaves", "dead_leaves")))
register(_generated("sprites", Sprites, "1-4 plain shapes over a plain background, the same truth"))
register(Dataset(
    "photos", "the scikit-image photos, random resized crops", ("skimage",),
    images=lambda image_size, scale, interpolation, **_: Photos(image_size, scale=scale, interpolation=interpolation),
    held_out=_photos_held_out))
# Pre-training on digits reads the train split's images, unlabelled (MAE's protocol: pre-train where you probe);
# digits keep their own crop of 8x8 images.
register(Dataset(
    "digits", "scikit-learn's 8x8 digits, stratified 80/20 split",
    images=lambda image_size, **_: load_digits(image_size, augment=True)[0],
    labelled=lambda option, img_size, augment, progress: load_digits(img_size, augment),
    labels=lambda source, img_size: targets_labels(source, source.classes, "class")))
for _kind in ("cifar10", "cifar100"):
    register(Dataset(
        _kind, f"the python-pickle release of {_kind.upper()}", labelled_option="ROOT",
        labelled=lambda root, img_size, augment, progress, kind=_kind: load_cifar(kind, root, img_size, augment)))
register(Dataset(
    "folder", "an ImageNet-style tree ROOT/train/CLASS/*.jpg + ROOT/val/CLASS/*.jpg", labelled_option="ROOT",
    labelled=lambda root, img_size, augment, progress: load_folder(root, img_size, augment)))
register(Dataset("bsds", "BSDS500 (edges; every annotator)", truth=_benchmark_truth("bsds"), truth_option="ROOT"))
register(Dataset("masks", "images with binary figure masks (figure-ground)", truth=_benchmark_truth("masks"),
                 truth_option="ROOT"))

__all__ = ["EVAL_SEED", "GENERATED_IMAGES"]
