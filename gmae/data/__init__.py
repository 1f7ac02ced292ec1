"""Image sources and the seeded, resumable sample stream.

Every source has ``load(index, rng) -> float32 tensor (3, H, W) in [0, 1]``
(un-normalised: the model's target), ``__len__`` and a ``shuffle`` flag
(False for sources whose length is virtual, e.g. dead-leaves).  Randomness
comes only from the ``rng`` passed in or from the index.

:class:`SeededStream` (:mod:`gmae.data.stream`) turns a source into a
map-style Dataset over *global sample numbers* g = 0, 1, 2, ...: sample g is a
pure function of (seed, g), so training is exactly reproducible and can resume
at any step (``global_batch(step, batch_size)``), and several processes can take
disjoint slices of each global batch (``rank``/``world_size``).

:mod:`~gmae.data.registry` names the data sets (each with the builders of its
uses: pre-training images, labels, zero-shot truth, scene generators), and
:mod:`~gmae.data.builtin` registers the built-in ones; :func:`build_dataset`
gives a name's images. The modules hold the sources: ``deadleaves``
(the generator with its ground truth), ``sprites`` (a few plain shapes over
a plain background, the same generator and truth), ``images`` (decoding and MAE's
augmentation), ``folder`` (image folders and the scikit-image photos),
``labelled`` (classification sets for the probes and fine-tuning), ``sourcelabels``
(the pre-training sources' own labels, for the online probe),
``benchmarks`` (BSDS500 and mask folders for the readouts' scores).
"""

from __future__ import annotations

import os

from ..errors import GMAEError
from .deadleaves import DeadLeaves, DeadLeavesSample, masks, occlusion_boundaries, order_weights
from .folder import ImageFolder, Photos
from .sprites import Sprites
from .images import (
    DEFAULT_SCALE,
    IMG_EXTENSIONS,
    load_image,
    load_images,
    mae_augment,
    open_image,
    random_resized_crop,
    random_resized_crop_params,
    resize_center_crop,
)
from .stream import ImageSource, SeededStream, StepBatchSampler, global_batch
from .sourcelabels import LABELLED_SOURCES, SourceLabels, source_labels
from .registry import DATASETS, Dataset, Truth, find, names_with, register
from .builtin import EVAL_SEED

__all__ = [
    "ImageSource",
    "SeededStream",
    "StepBatchSampler",
    "global_batch",
    "build_dataset",
    "source_labels",
    "SourceLabels",
    "LABELLED_SOURCES",
    "DATASETS",
    "Dataset",
    "Truth",
    "register",
    "DeadLeaves",
    "DeadLeavesSample",
    "masks",
    "occlusion_boundaries",
    "order_weights",
    "Sprites",
    "ImageFolder",
    "Photos",
    "IMG_EXTENSIONS",
    "load_image",
    "load_images",
    "mae_augment",
    "random_resized_crop",
    "random_resized_crop_params",
    "resize_center_crop",
    "EVAL_SEED",
    "held_out_batch",
]


def build_dataset(name: str, image_size, seed: int = 0, on_bad_image: str = "skip",
                  scale=DEFAULT_SCALE, interpolation: str = "bicubic") -> ImageSource:
    """The image source called ``name``: the ``images`` builder of the data set registered under that name or
    alias (:mod:`gmae.data.registry`, the built-in ones in :mod:`gmae.data.builtin`).

    ``"deadleaves"``: :class:`DeadLeaves` (image_size, seed); ``"sprites"``:
    :class:`Sprites` (image_size, seed), 1-4 plain shapes; ``"photos"``: the
    scikit-image photos with random crops (:class:`Photos`); ``"digits"``: the
    train split of scikit-learn's digits, unlabelled, with random resized crops
    (:func:`gmae.data.labelled.load_digits`); anything else is
    the path of an image folder (:class:`ImageFolder`, using ``root/train`` if
    present).  ``seed`` only matters for the generated sources (which images exist); the
    order and augmentation of every source come from the :class:`SeededStream`.
    ``scale`` and ``interpolation`` are the random resized crop's (MAE's: (0.2, 1), bicubic) for the sources
    that crop photos: image folders and ``"photos"`` (digits keep their own crop of 8x8 images; the
    generated sources are not cropped).
    Raises :class:`GMAEError` for a missing or empty folder or an unknown name.
    """
    if on_bad_image not in ("skip", "error"):
        raise GMAEError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    try:
        if isinstance(image_size, (tuple, list)):
            hw = tuple(int(v) for v in image_size)
            ok = len(hw) == 2 and min(hw) > 0
        else:
            ok = int(image_size) > 0 and int(image_size) == image_size
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GMAEError(f"image_size must be a positive integer or (height, width), got {image_size!r}")
    dataset = find(name)
    if dataset is not None and dataset.images is not None:
        return dataset.images(image_size, seed=seed, scale=scale, interpolation=interpolation,
                              on_bad_image=on_bad_image)
    name = str(name)
    path = os.path.expanduser(name)
    if not os.path.exists(path) and os.sep not in name and "/" not in name and not name.startswith("."):
        raise GMAEError(f"unknown data {name!r}: use one of {', '.join(names_with('images'))} "
                        f"or the path of an existing image folder")
    return ImageFolder(path, image_size, on_bad_image=on_bad_image, scale=scale, interpolation=interpolation)


def held_out_batch(data: str, image_size, num_images: int, seed: int = 0, source=None):
    """A fixed batch of images to measure a model on, not a training batch -> (images (n, 3, H, W), where from).

    data: a :func:`build_dataset` name or folder; seed: the training run's seed. A generated source (dead-leaves,
    sprites) gives images of seed :data:`EVAL_SEED` (EVAL_SEED + 1 if that was the run's): held out. The photos
    give each whole photo, resized and centre-cropped (training on them sees random crops). Any other source gives
    its first images, each cropped by its own seeded rng, which training may have seen (the text says so);
    `source`: that source already built, so that a large folder is not listed twice. Deterministic.
    """
    import numpy as np
    import torch

    eval_seed = EVAL_SEED if seed != EVAL_SEED else EVAL_SEED + 1
    dataset = find(data)
    if dataset is not None and dataset.held_out is not None:
        return dataset.held_out(image_size, num_images, eval_seed)
    source = build_dataset(data, image_size, seed=seed) if source is None else source
    if isinstance(source, ImageFolder):
        # The evaluation view (resized, centre-cropped) of its first readable files; an unreadable one is passed
        # over quietly (this batch is not training, which reports its own).
        images = []
        for i in range(len(source.files)):
            try:
                images.append(resize_center_crop(open_image(source.path(i)), image_size))
            except (OSError, ValueError, SyntaxError, EOFError):
                continue
            if len(images) == num_images:
                break
        if not images:
            raise GMAEError(f"no image of {data} can be read")
        return torch.stack(images), f"the first {len(images)} images of {data}, centre-cropped (no held-out split: " \
                                    "training may have seen them)"
    n = min(num_images, len(source))
    batch = torch.stack([source.load(i, np.random.default_rng([eval_seed, i])) for i in range(n)])
    return batch, f"the first {n} images of {data} (no held-out split: training may have seen them)"
