"""Real images: an ImageFolder reader, the photos bundled in scikit-image, and
MAE's training augmentation implemented with PIL + numpy (no torchvision).

The augmentation follows torchvision's ``RandomResizedCrop(size, scale=(0.2, 1),
ratio=(3/4, 4/3), interpolation=BICUBIC)`` + ``RandomHorizontalFlip()`` exactly
(same algorithm: 10 tries, then a centre-crop fallback clamped to the ratio
range), except that the randomness comes from the ``numpy.random.Generator``
passed in, never from global state.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import GMAEError
from ..files import IMG_EXTENSIONS

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolder",
    "Photos",
    "PHOTO_NAMES",
    "open_image",
    "to_rgb",
    "pil_to_tensor",
    "random_resized_crop_params",
    "random_resized_crop",
    "mae_augment",
    "resize_center_crop",
]

logger = logging.getLogger("gmae.data")

DEFAULT_SCALE = (0.2, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def as_hw(image_size) -> tuple[int, int]:
    """(height, width) of an image size given as an int (square) or (H, W)."""
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        h, w = int(image_size[0]), int(image_size[1])
    else:
        h = w = int(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


# --------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, scaling high bit depths properly.

    ``Image.convert("RGB")`` clips 16-bit ('I;16', 'I') and float ('F') images
    at 255 instead of rescaling them, so those are rescaled here first:
    'I;16*' by 1/257 (65535 -> 255); 'I' the same if any value exceeds 255
    (16-bit data decoded as 32-bit), else as-is; 'F' as [0, 1] if its maximum
    is <= 1, as [0, 255] if <= 255, else as 16-bit.  Palette images with
    transparency go through RGBA (avoids PIL's warning); alpha is dropped, as
    torchvision's loader does.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            finite = a[np.isfinite(a)]
            top = float(finite.max()) if finite.size else 0.0
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            a = a * 255.0 if top <= 1.0 else (a if top <= 255.0 else a / 257.0)
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB (raises on bad files)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def load_image(path, size, crop_pct: float = 1.0) -> torch.Tensor:
    """A user's image file for inference: (3, size, size) float in [0, 1].

    Any format Pillow reads; the shorter side is resized to size / crop_pct and
    the centre is cropped (crop_pct = 1: the largest centred square). Raises
    GMAEError naming the file if it is missing or cannot be decoded.
    """
    if not os.path.isfile(path):
        raise GMAEError(f"image {path} does not exist")
    try:
        img = open_image(path)
    except Exception as e:  # PIL raises many types for bad files
        raise GMAEError(f"image {path} cannot be read ({type(e).__name__}); give a file Pillow can open") from None
    return resize_center_crop(img, size, crop_pct)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div_(255.0)


# --------------------------------------------------------------- augmentation
def random_resized_crop_params(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """The crop box ``(top, left, h, w)`` of torchvision's RandomResizedCrop.

    Up to 10 tries: area fraction uniform in ``scale``, aspect ratio (w/h)
    log-uniform in ``ratio``; the first box that fits is placed uniformly.  If
    none fits, a centre crop of the whole image clamped to the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> Image.Image:
    """Crop a random box (see :func:`random_resized_crop_params`) and resize it
    to ``size`` (int or (H, W)) with bicubic interpolation (antialiased when
    shrinking, as PIL/torchvision do)."""
    out_h, out_w = as_hw(size)
    top, left, h, w = random_resized_crop_params(img.height, img.width, rng, scale, ratio)
    # Crop, then resize (as torchvision does): resize(box=...) would let the
    # bicubic filter read pixels outside the box and differ at the crop's edges.
    return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), Image.BICUBIC)


def mae_augment(img: Image.Image, size, rng: np.random.Generator,
                scale: Sequence[float] = DEFAULT_SCALE,
                ratio: Sequence[float] = DEFAULT_RATIO) -> torch.Tensor:
    """MAE pre-training augmentation: RandomResizedCrop (bicubic) + horizontal
    flip with probability 1/2.  Returns float32 (3, H, W) in [0, 1], not
    normalised (the model's target)."""
    out = random_resized_crop(img, size, rng, scale, ratio)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(out)


def resize_center_crop(img: Image.Image, size, crop_pct: float = 0.875) -> torch.Tensor:
    """Evaluation transform (MAE's probes): resize the shorter side to
    ``size / crop_pct`` (bicubic) then centre-crop ``size``.  No randomness."""
    out_h, out_w = as_hw(size)
    short = int(round(max(out_h, out_w) / crop_pct))
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(1, int(short * h / w))
    else:
        new_h, new_w = short, max(1, int(short * w / h))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    return pil_to_tensor(img.crop((left, top, left + out_w, top + out_h)))


# -------------------------------------------------------------------- sources
def _find_images(root: str) -> list[str]:
    """Image files under ``root``, recursively, as sorted paths relative to root.

    Hidden files and folders (leading '.') are skipped; symlinked folders are
    followed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    found.sort()
    return found


class ImageFolder:
    """Images read from a folder tree, with MAE's augmentation.

    Files with an extension in :data:`IMG_EXTENSIONS` (any case) are collected
    recursively and sorted, so ``root/class/x.JPEG`` (ImageNet), deeper trees
    and flat folders all work.  If ``root`` has a ``train`` sub-folder and
    ``split`` is ``"auto"`` (default), ``root/train`` is used (ImageNet's
    ``root/{train,val}/class/...``; training on ``val`` by accident would leak);
    pass ``split=None`` to read all of ``root``, or ``split="val"`` etc.

    ``classes`` are the sorted first-level sub-folder names (of the folder
    actually read) and ``targets[i]`` the class index of file ``i``, or -1 for a
    file directly in that folder.

    Args:
        root: the folder.
        image_size: int or (H, W) of the output.
        augment: True: RandomResizedCrop + flip (pre-training); False:
            resize + centre crop (:func:`resize_center_crop`, for probes).
        on_bad_image: ``"skip"``: an unreadable file is logged once (logger
            ``gmae.data``), counted in ``bad_images`` (distinct files) and
            replaced by the next readable index (wrapping), deterministically;
            ``"error"``: raise :class:`GMAEError` naming the file.
    """

    shuffle = True

    def __init__(self, root: str, image_size, augment: bool = True,
                 on_bad_image: str = "skip", split: str | None = "auto",
                 scale: Sequence[float] = DEFAULT_SCALE,
                 ratio: Sequence[float] = DEFAULT_RATIO):
        if on_bad_image not in ("skip", "error"):
            raise GMAEError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        root = os.path.expanduser(str(root))
        if not os.path.exists(root):
            raise GMAEError(f"image folder {root!r} does not exist: check the path "
                            f"(or use the built-in data 'deadleaves' or 'photos')")
        if not os.path.isdir(root):
            raise GMAEError(f"{root!r} is a file, not a folder: give the folder that holds the images")
        if split == "auto":
            split = "train" if os.path.isdir(os.path.join(root, "train")) else None
        if split:
            sub = os.path.join(root, split)
            if not os.path.isdir(sub):
                raise GMAEError(f"image folder {root!r} has no {split!r} sub-folder: check the path or the split")
            root = sub
        self.root = root
        self.image_size = as_hw(image_size)
        self.augment = bool(augment)
        self.on_bad_image = on_bad_image
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.files = _find_images(root)
        if not self.files:
            raise GMAEError(f"image folder {root!r} contains no images (accepted extensions: "
                            f"{' '.join(IMG_EXTENSIONS)}, any case): put images in it or fix the path")
        first = [f.split(os.sep, 1)[0] if os.sep in f else None for f in self.files]
        self.classes = sorted({c for c in first if c is not None})
        idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [idx[c] if c is not None else -1 for c in first]
        self._bad: set[str] = set()

    @property
    def bad_images(self) -> int:
        """Number of distinct unreadable files met so far (in this process)."""
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root!r}, {len(self.files)} images, "
                f"{len(self.classes)} classes, image_size={self.image_size})")

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def _transform(self, img: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        if self.augment:
            if rng is None:
                raise ValueError("an augmenting source needs an rng")
            return mae_augment(img, self.image_size, rng, self.scale, self.ratio)
        return resize_center_crop(img, self.image_size)

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Image ``index`` augmented with ``rng``: float32 (3, H, W) in [0, 1]."""
        n = len(self.files)
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for k in range(n):
            i = (index + k) % n
            path = self.path(i)
            try:
                img = open_image(path)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise GMAEError(f"cannot read image {path!r} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'unreadable'}): "
                                    f"remove or replace the file, or use on_bad_image='skip'") from e
                if path not in self._bad:
                    self._bad.add(path)
                    logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return self._transform(img, rng)
        raise GMAEError(f"no readable image in {self.root!r}: all {n} files failed to open")


#: skimage.data photos tried, in order (colour natural photos; camera is grey).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle")


def _load_skimage_photo(name: str) -> np.ndarray | None:
    import skimage.data as skd

    try:
        if name == "motorcycle":  # left view of the stereo pair
            a = skd.stereo_motorcycle()[0]
        else:
            a = getattr(skd, name)()
    except Exception as e:  # some need a download (pooch); skip those offline
        logger.debug("skimage photo %s unavailable: %s", name, e)
        return None
    a = np.asarray(a)
    if a.dtype != np.uint8:
        return None
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


class Photos:
    """The colour photos bundled with scikit-image (no network), with MAE's
    augmentation: every sample is a fresh random crop.

    ``load(index, rng)`` uses photo ``index % n_photos``; the length is virtual
    (10**9, ``shuffle = False``) so a SeededStream walks the photos in turn and
    each sample's crop comes from its own rng.  The photos are decoded lazily,
    once per process.
    """

    shuffle = False
    length = 10**9

    def __init__(self, image_size, names: Sequence[str] = PHOTO_NAMES,
                 scale: Sequence[float] = DEFAULT_SCALE,
                 ratio: Sequence[float] = DEFAULT_RATIO):
        self.image_size = as_hw(image_size)
        self.names = tuple(names)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self._photos: list[Image.Image] | None = None
        self.bad_images = 0

    @property
    def photos(self) -> list[Image.Image]:
        if self._photos is None:
            loaded, names = [], []
            for name in self.names:
                a = _load_skimage_photo(name)
                if a is not None:
                    loaded.append(Image.fromarray(a))
                    names.append(name)
            if not loaded:
                raise GMAEError("none of the scikit-image photos could be loaded: "
                                "reinstall scikit-image or use 'deadleaves' or an image folder")
            self.names = tuple(names)
            self._photos = loaded
        return self._photos

    def __getstate__(self):  # do not ship decoded photos to DataLoader workers
        state = self.__dict__.copy()
        state["_photos"] = None
        return state

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"Photos({self.names}, image_size={self.image_size})"

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        photos = self.photos
        img = photos[int(index) % len(photos)]
        return mae_augment(img, self.image_size, rng, self.scale, self.ratio)
