"""Real images as training sources: an ImageFolder reader and the photos bundled in scikit-image,
both with MAE's augmentation (:mod:`gmae.data.images`).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import GMAEError
from ..io.files import IMG_EXTENSIONS
from .images import DEFAULT_RATIO, DEFAULT_SCALE, as_hw, mae_augment, open_image, resize_center_crop

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolder",
    "Photos",
    "PHOTO_NAMES",
]

logger = logging.getLogger("gmae.data")


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
    reads_files = True  # decodes image files: worth DataLoader workers (gmae.runtime.threads.resolve_workers)

    def __init__(self, root: str, image_size, augment: bool = True,
                 on_bad_image: str = "skip", split: str | None = "auto",
                 scale: Sequence[float] = DEFAULT_SCALE,
                 ratio: Sequence[float] = DEFAULT_RATIO, interpolation: str = "bicubic"):
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
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation
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
            return mae_augment(img, self.image_size, rng, self.scale, self.ratio, self.interpolation)
        return resize_center_crop(img, self.image_size)

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Image ``index`` augmented with ``rng``: float32 (3, H, W) in [0, 1]."""
        return self._read(index, rng)[1]

    def load_with_target(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """(:meth:`load`'s image, bit for bit; the class index of the file it came from): with
        ``on_bad_image="skip"`` the image may be a later file's, and the label must be that file's."""
        i, image = self._read(index, rng)
        return image, self.targets[i]

    def _read(self, index: int, rng: np.random.Generator | None) -> tuple[int, torch.Tensor]:
        """(the index of the file read, its image): ``index``'s, or the next readable one's (see ``on_bad_image``)."""
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
            return i, self._transform(img, rng)
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
                 ratio: Sequence[float] = DEFAULT_RATIO, interpolation: str = "bicubic"):
        self.image_size = as_hw(image_size)
        self.names = tuple(names)
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation
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
        return mae_augment(img, self.image_size, rng, self.scale, self.ratio, self.interpolation)
