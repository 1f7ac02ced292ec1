"""Labelled image data for probes and fine-tuning: digits, CIFAR-10/100, ImageFolder trees.

Pre-training needs images only; judging what the encoder learned needs
(image, label) pairs with a fixed train/val split.  :func:`build_labelled`
turns one spec string into a train and a val dataset:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no
    download), grey values 0..16 scaled to [0, 1], upsampled bilinearly to the
    model's input and repeated to 3 channels.  Split: stratified 80/20 with a
    fixed seed (0), so 1438 train / 359 val, identical on every machine.
``cifar10:ROOT`` / ``cifar100:ROOT``
    the python-pickle releases (``cifar-10-batches-py/data_batch_1..5,
    test_batch, batches.meta``; ``cifar-100-python/train, test, meta`` with
    ``fine_labels``).  ROOT is that folder or its parent.  The pickles are
    read with an unpickler that only builds numpy arrays, so a tampered file
    is refused instead of running code.  Train = the train batches, val = the
    test batch.
``folder:ROOT``
    an ImageNet-style tree ``ROOT/train/CLASS/*.jpg`` + ``ROOT/val/CLASS/*.jpg``
    (the same class folders in both).
``deadleaves:TASK`` / ``sprites:TASK``
    an image-level scene task (``count`` or ``shape``) on generated scenes with
    held-out seeds (:mod:`gmae.data.scenes`); augmentation is a flip only.
``ROOT``
    a bare path is detected: CIFAR files (in ROOT or its ``cifar-10-batches-py``
    / ``cifar-100-python`` sub-folder) or ``train/`` + ``val/`` class folders.

Every dataset returns ``(image float32 (3, S, S) in [0, 1], label int)`` with
``__getitem__`` (the deterministic evaluation transform: resize, plus MAE's
centre crop for folder images) and ``load(index, rng)`` (with an rng and
``augment=True``: random resized crop + flip, the fine-tuning augmentation).
:class:`LabelledStream` walks a dataset like pre-training's
:class:`~gmae.data.SeededStream`: sample g is a pure function of (seed, g), so
a fine-tuning run resumes exactly.
"""

from __future__ import annotations

import codecs
import copy
import os
import pickle
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import GMAEError
from .folder import ImageFolder
from .images import DEFAULT_RATIO, IMG_EXTENSIONS, random_resized_crop_params
from .registry import DATASETS, names_with, spec_of
from .stream import SeededStream

__all__ = [
    "ArrayImages",
    "LabelledFolder",
    "LabelledStream",
    "IMAGE_TASKS",
    "build_labelled",
    "build_scene_labelled",
    "detect_kind",
    "load_cifar",
    "load_digits",
    "load_folder",
    "read_cifar_pickle",
    "scene_arrays",
]

# Fine-tuning crop scales: MAE's (0.08, 1) for photos; digits fill their 8x8 box,
# so small crops would cut them apart, and a mirrored digit is another symbol.
PHOTO_SCALE = (0.08, 1.0)
DIGITS_SCALE = (0.5, 1.0)
DIGITS_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def _size(img_size) -> int:
    try:
        size = int(img_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or size != img_size:
        raise GMAEError(f"image size must be a positive integer, got {img_size!r}")
    return size


# --------------------------------------------------------------------------- array datasets


class ArrayImages(Dataset):
    """Small images held in memory (digits, CIFAR), resized on the fly.

    images: (n, C, h, w) uint8 or float array, divided by ``value_scale`` to get
    [0, 1]; C = 1 is repeated to 3 channels.  labels: (n,) ints in
    [0, len(classes)).  The evaluation transform resizes the whole image to
    ``img_size`` (these images are small and square: nothing is cropped away);
    with ``augment`` and an rng, torchvision's RandomResizedCrop box (the
    same :func:`~gmae.data.images.random_resized_crop_params`) is cropped, resized
    and mirrored with probability 1/2 if ``hflip``.
    """

    shuffle = True

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], img_size: int,
                 augment: bool = False, value_scale: float = 255.0, interpolation: str = "bicubic",
                 scale: Sequence[float] = PHOTO_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
                 hflip: bool = True, name: str = "arrays"):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (n, 1 or 3, h, w), got {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.img_size = _size(img_size)
        self.augment = bool(augment)
        self.value_scale = float(value_scale)
        self.interpolation = interpolation
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), bool(hflip)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ArrayImages({self.name}, {len(self)} images, {len(self.classes)} classes, "
                f"img_size={self.img_size}, augment={self.augment})")

    def _resize(self, x: torch.Tensor) -> torch.Tensor:  # (C, h, w) -> (C, S, S)
        s = self.img_size
        if x.shape[1:] == (s, s):
            return x
        shrink = x.shape[1] > s or x.shape[2] > s
        antialias = shrink and self.interpolation in ("bilinear", "bicubic")
        align = False if self.interpolation in ("bilinear", "bicubic") else None
        out = F.interpolate(x[None], size=(s, s), mode=self.interpolation, align_corners=align, antialias=antialias)
        return out[0].clamp_(0.0, 1.0)  # bicubic overshoots

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Image ``index`` as float32 (3, S, S) in [0, 1]; augmented if ``augment`` and an rng is given."""
        x = torch.from_numpy(np.asarray(self.images[int(index)], dtype=np.float32)) / self.value_scale  # (C, h, w)
        if self.augment and rng is not None:
            top, left, h, w = random_resized_crop_params(x.shape[1], x.shape[2], rng, self.scale, self.ratio)
            x = x[:, top : top + h, left : left + w]
            if self.hflip and rng.random() < 0.5:
                x = x.flip(-1)
        x = self._resize(x)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), int(self.targets[index])


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), sorted; each class split val_fraction : rest."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(val_fraction * len(idx))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_digits(img_size: int, augment: bool = False) -> tuple[ArrayImages, ArrayImages, int]:
    """scikit-learn's bundled digits, stratified 80/20 split with seed 0 (1438 train / 359 val)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise GMAEError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    d = sk_digits()
    images = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = d.target.astype(np.int64)
    classes = [str(c) for c in range(10)]
    tr, va = _stratified_split(labels, DIGITS_VAL_FRACTION, DIGITS_SEED)
    common = {"classes": classes, "img_size": img_size, "value_scale": 16.0, "interpolation": "bilinear",
              "scale": DIGITS_SCALE, "hflip": False}
    train = ArrayImages(images[tr], labels[tr], augment=augment, name="digits/train", **common)
    val = ArrayImages(images[va], labels[va], augment=False, name="digits/val", **common)
    return train, val, len(classes)


# --------------------------------------------------------------------------- CIFAR pickles


def _latin1_encode(text, encoding="utf-8"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1");
    # only that codec is allowed (a codec name can import modules).
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays; refuses every other global."""

    NUMPY: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self.NUMPY:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise GMAEError(f"{self.path} was refused: it asks to load {module}.{name}, but a CIFAR pickle holds only "
                        "numpy arrays and lists; re-download the data set from its original source")


def read_cifar_pickle(path: str) -> dict:
    """One CIFAR python pickle as a dict (keys as stored, usually bytes), read without running code."""
    if not os.path.isfile(path):
        raise GMAEError(f"CIFAR file {path} does not exist; the python-pickle release of CIFAR is expected")
    try:
        with open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(f, path).load()
    except GMAEError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, ImportError, MemoryError) as e:  # truncated, not a pickle, bad opcode ...
        detail = " ".join(str(e).split())[:100] or "no data"
        raise GMAEError(f"CIFAR file {path} cannot be read ({type(e).__name__}: {detail}); "
                        "it may be truncated or not a CIFAR pickle") from None
    if not isinstance(data, dict):
        raise GMAEError(f"CIFAR file {path} holds a {type(data).__name__}, not the expected dict")
    return data


def _field(d: dict, key: str, path: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise GMAEError(f"CIFAR file {path} has no {key!r} entry; is it the python release of the right CIFAR?")


def _decode_batch(d: dict, path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(_field(d, "data", path))
    labels = np.asarray(_field(d, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise GMAEError(f"CIFAR file {path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise GMAEError(f"CIFAR file {path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise GMAEError(f"CIFAR file {path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    # Each row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


CIFAR = {
    # kind: (folder name, train files, val files, label key, meta file, names key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", 100),
}


def _cifar_dir(kind: str, root: str) -> str:
    sub = os.path.join(root, CIFAR[kind][0])
    return sub if os.path.isdir(sub) else root


def load_cifar(kind: str, root: str, img_size: int, augment: bool = False) -> tuple[ArrayImages, ArrayImages, int]:
    """CIFAR-10 or -100 (``kind``) from ``root`` (the pickle folder or its parent): train batches / test batch."""
    folder, train_files, val_files, label_key, meta_file, names_key, n = CIFAR[kind]
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise GMAEError(f"CIFAR folder {root} does not exist; give the folder holding {folder}/ or its files")
    base = _cifar_dir(kind, root)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_decode_batch(read_cifar_pickle(os.path.join(base, f)), os.path.join(base, f), label_key, n)
                 for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (xt, yt), (xv, yv) = read(train_files), read(val_files)
    classes = [str(c) for c in range(n)]
    meta_path = os.path.join(base, meta_file)
    if os.path.isfile(meta_path):  # optional: only the class names come from it
        names = _field(read_cifar_pickle(meta_path), names_key, meta_path)
        if len(names) == n:
            classes = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in names]
    common = {"classes": classes, "img_size": img_size, "value_scale": 255.0, "interpolation": "bicubic",
              "scale": PHOTO_SCALE, "hflip": True}
    return (ArrayImages(xt, yt, augment=augment, name=f"{kind}/train", **common),
            ArrayImages(xv, yv, augment=False, name=f"{kind}/val", **common), n)


# --------------------------------------------------------------------------- image folders


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


class LabelledFolder(Dataset):
    """``SPLIT/CLASS/...`` images with their class index, read by :class:`~gmae.data.folder.ImageFolder`.

    Evaluation transform: resize + centre crop (crop_pct 0.875, MAE's probes);
    with ``augment`` and an rng: RandomResizedCrop(scale) + flip.  An
    unreadable file is an error naming it (skipping it would give its slot
    another image's label).
    """

    shuffle = True
    reads_files = True  # decodes image files: worth DataLoader workers (gmae.runtime.threads.resolve_workers)

    def __init__(self, split_dir: str, img_size: int, classes: Sequence[str], augment: bool = False,
                 scale: Sequence[float] = PHOTO_SCALE):
        self.root = split_dir
        self.classes = list(classes)
        self.img_size = _size(img_size)
        self.augment = bool(augment)
        self._folder = ImageFolder(split_dir, self.img_size, augment=True, on_bad_image="error", split=None,
                                   scale=scale)
        self._eval = copy.copy(self._folder)  # shares the file list
        self._eval.augment = False
        top = [f for f, t in zip(self._folder.files, self._folder.targets) if t < 0]
        if top:
            raise GMAEError(f"image {os.path.join(split_dir, top[0])} is not inside a class folder; "
                            f"put every image in {split_dir}/CLASS/")
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.asarray([index[self._folder.classes[t]] for t in self._folder.targets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._folder)

    def __repr__(self) -> str:
        return f"LabelledFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes)"

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        if self.augment and rng is not None:
            return self._folder.load(index, rng)
        return self._eval.load(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), int(self.targets[index])


def load_folder(root: str, img_size: int, augment: bool = False) -> tuple[LabelledFolder, LabelledFolder, int]:
    """``root/train/CLASS/*`` and ``root/val/CLASS/*`` with the same class folders."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise GMAEError(f"image folder {root} does not exist; give a folder with train/ and val/ class folders")
    splits = {}
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise GMAEError(f"image folder {root} has no {split}/ sub-folder; a labelled folder needs "
                            "train/CLASS/*.jpg and val/CLASS/*.jpg")
        classes = _class_dirs(d)
        if not classes:
            raise GMAEError(f"{d} has no class folders; put the images in {d}/CLASS/")
        for c in classes:
            cdir = os.path.join(d, c)
            has_image = any(not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)
                            for _, _, files in os.walk(cdir, followlinks=True) for f in files)
            if not has_image:
                raise GMAEError(f"class folder {cdir} holds no images ({' '.join(IMG_EXTENSIONS)}); "
                                "add images or remove the folder")
        splits[split] = classes
    if splits["train"] != splits["val"]:
        only_t = sorted(set(splits["train"]) - set(splits["val"]))
        only_v = sorted(set(splits["val"]) - set(splits["train"]))
        raise GMAEError(f"train/ and val/ of {root} have different classes (only in train: {only_t[:5]}, "
                        f"only in val: {only_v[:5]}); both need the same class folders")
    classes = splits["train"]
    return (LabelledFolder(os.path.join(root, "train"), img_size, classes, augment=augment),
            LabelledFolder(os.path.join(root, "val"), img_size, classes, augment=False), len(classes))


# --------------------------------------------------------------------------- entry point


def detect_kind(root: str) -> str:
    """cifar10, cifar100 or folder, from what ``root`` holds; GMAEError if none fits."""
    for kind in ("cifar10", "cifar100"):
        base = _cifar_dir(kind, root)
        if os.path.isfile(os.path.join(base, CIFAR[kind][1][0])):
            return kind
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        return "folder"
    raise GMAEError(f"{root} is not a labelled data set: expected CIFAR pickles (cifar-10-batches-py/ or "
                    "cifar-100-python/) or train/ and val/ class folders")


def build_labelled(spec: str, img_size: int, augment: bool = False,
                   progress: bool = True) -> tuple[Dataset, Dataset, int]:
    """(train dataset, val dataset, number of classes) for ``spec`` (see the module docstring): a registered
    data set with labels (:mod:`gmae.data.registry`), ``NAME`` or ``NAME:OPTION`` as it takes, or the path of a
    labelled data folder, whose kind (:func:`detect_kind`) names the registered data set that reads it.

    ``augment`` turns on the fine-tuning augmentation of the train dataset
    (used by ``load(index, rng)``; indexing stays deterministic). ``progress``:
    a bar while generated scenes are drawn.
    """
    text = str(spec).strip()
    img_size = _size(img_size)
    dataset, option, colon = spec_of(text)
    if dataset is not None and dataset.labelled is not None:
        if colon != bool(dataset.labelled_option) or (colon and not option):
            want = dataset.name + (f":{dataset.labelled_option}" if dataset.labelled_option else "")
            raise GMAEError(f"data {text!r}: write it as {want}")
        return dataset.labelled(option, img_size, augment, progress)
    if not os.path.exists(os.path.expanduser(text)):
        raise GMAEError(f"unknown data {text!r}: use {', '.join(names_with('labelled'))} "
                        "or the path of an existing data folder")
    kind = detect_kind(os.path.expanduser(text))
    return DATASETS[kind].labelled(text, img_size, augment, progress)


# --------------------------------------------------------------------------- generated scenes

#: Scene tasks that label a whole image, so that a classifier can be fine-tuned on them.
IMAGE_TASKS = ("count", "shape")


def build_scene_labelled(data: str, task: str, img_size: int, augment: bool = False, progress: bool = True):
    """(train, val, number of classes) of an image-level scene task as labelled data sets (`DATA:TASK` specs).

    The images of :func:`scene_labels`'s splits, generated once and held as
    uint8; the fine-tuning augmentation is a horizontal flip only (a crop could
    cut objects out of the count, and a mirror changes neither the count nor a
    shape's class).
    """
    from .scenes import scene_labels

    if task not in IMAGE_TASKS:
        raise GMAEError(f"{data}:{task}: fine-tuning takes the image-level scene tasks ({', '.join(IMAGE_TASKS)}); "
                        f"the point tasks (front, figure) are probed with gmae probe --data {data} --task {task}")
    # One patch covers the image: the image-level labels do not read the marked points.
    train, val = (scene_labels(data, split, img_size, img_size, progress=progress) for split in ("train", "val"))
    return scene_arrays(task, train, val, augment, progress)


def scene_arrays(task: str, train, val, augment: bool = False, progress: bool = True):
    """(train, val, number of classes) ArrayImages of an image-level ``task`` on already drawn
    :class:`~gmae.data.scenes.SceneLabels` (any patch size: image-level labels read no marked point).

    Images held as uint8; the augmentation is a horizontal flip only (a crop could cut objects out of the
    count, and a mirror changes neither the count nor a shape's class). Images without a valid label are left out.
    """
    from .scenes import SceneLabels, task_targets

    if task not in IMAGE_TASKS:
        raise GMAEError(f"{task} is not an image-level scene task ({', '.join(IMAGE_TASKS)})")
    ty, vy, num_classes, names = task_targets(task, train, val)
    img_size = train.img_size

    def images(labels: SceneLabels, keep: np.ndarray) -> np.ndarray:
        source = labels.source()
        out = np.empty((len(keep), 3, img_size, img_size), np.uint8)
        for j, i in enumerate(tqdm(keep, desc=f"{labels.data} {labels.seed} images", disable=not progress,
                                   leave=False, dynamic_ncols=True)):
            out[j] = np.rint(source.load(int(i)).numpy() * 255.0)
        return out

    tk, vk = np.flatnonzero(ty >= 0), np.flatnonzero(vy >= 0)
    common = {"classes": names, "img_size": img_size, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": True}
    return (ArrayImages(images(train, tk), ty[tk], augment=augment, name=f"{train.data}:{task}/train", **common),
            ArrayImages(images(val, vk), vy[vk], augment=False, name=f"{val.data}:{task}/val", **common), num_classes)


class LabelledStream(SeededStream):
    """A labelled dataset as an endless seeded stream: ``stream[g] = (image, label)``.

    As :class:`~gmae.data.SeededStream`: each epoch is a (seed, epoch)
    permutation and sample g's augmentation comes from rng (seed, g), so a run
    that resumes at step s reads exactly the samples the uninterrupted run would.
    """

    def __getitem__(self, g: int) -> tuple[torch.Tensor, int]:
        i = self.index(int(g))
        return self.source.load(i, self.rng(int(g))), int(self.source.targets[i])
