"""Readers for the zero-shot evaluation sets: BSDS500 boundaries and image/mask folders.

Both read files lazily (``__getitem__``) and check the layout up front, so a
wrong path or a missing annotation fails at once with a one-line
:class:`~gmae.errors.GMAEError` naming the file, not halfway through an
evaluation.  Images come back as float32 (3, H, W) tensors in [0, 1] at their
own size (no resizing: the metrics are computed at the annotation's resolution).

``BSDS500(root, split)``
    the official layout ``ROOT/images/{train,val,test}/NAME.jpg`` +
    ``ROOT/groundTruth/{train,val,test}/NAME.mat``; ROOT may also be a folder
    holding ``BSDS500/data`` or ``BSR/BSDS500/data`` (the archive's nesting) or
    ``data``.  Each ``.mat`` (MATLAB v5, read with ``scipy.io.loadmat``: plain
    data, no code runs) holds ``groundTruth``, a 1 x n cell array of structs
    with fields ``Segmentation`` (uint16 labels) and ``Boundaries`` (0/1), one
    per annotator.
``MaskFolder(root)``
    ``ROOT/images/NAME.{jpg,png,...}`` + ``ROOT/masks/NAME.png``: the mask is
    foreground where its grey value (any mode, converted like the images, then
    to 8-bit luminance) is > 127.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io
import torch
from PIL import Image

from .images import IMG_EXTENSIONS, open_image, pil_to_tensor, to_rgb
from ..errors import GMAEError

__all__ = ["BSDS500", "BSDS_SPLITS", "MaskFolder"]

BSDS_SPLITS = ("train", "val", "test")
# What PIL and scipy.io raise for unreadable files (v7.3 .mat files: NotImplementedError).
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_BAD_MAT = (OSError, ValueError, TypeError, EOFError, NotImplementedError, scipy.io.matlab.MatReadError)


def _images_in(folder: str) -> dict[str, str]:
    """{name without extension: file name} of the image files directly in ``folder``."""
    found: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if not f.startswith(".") and ext.lower() in IMG_EXTENSIONS and os.path.isfile(os.path.join(folder, f)):
            found.setdefault(stem, f)
    return found


def _boundary_maps(gt) -> list[np.ndarray]:
    """The ``Boundaries`` of a loaded ``groundTruth``: a cell array of structs
    (the official files) or a struct array, as ``loadmat`` returns them."""
    gt = np.asarray(gt)
    structs = [gt] if gt.dtype.names else [np.asarray(c) for c in gt.ravel()]
    maps = []
    for st in structs:
        for b in st["Boundaries"].ravel():
            b = np.asarray(b)
            if b.dtype.kind not in "biuf":
                raise TypeError("non-numeric Boundaries")
            maps.append(b > 0)
    return maps


def _paired_images(image_dir: str, partner_dir: str, ext: str, what: str, missing: str) -> dict[str, str]:
    """{name: image file} of ``image_dir``, each checked to have ``partner_dir/NAME{ext}``.

    ``what`` names the image folder in errors, ``missing`` the partner file.
    """
    files = _images_in(image_dir)
    if not files:
        raise GMAEError(f"{what} {image_dir} holds no images: check the path")
    for name in files:
        partner = os.path.join(partner_dir, name + ext)
        if not os.path.isfile(partner):
            raise GMAEError(f"{missing.format(name=name)} {partner}: restore the file or remove the image")
    return files


def _read_image(path: str) -> torch.Tensor:
    try:
        return pil_to_tensor(open_image(path))
    except _BAD_IMAGE as e:
        raise GMAEError(f"cannot read image {path} ({type(e).__name__}): replace or remove the file") from None


class BSDS500:
    """The BSDS500 boundary benchmark: ``(name, image, [boundary map per annotator])``."""

    def __init__(self, root: str, split: str = "test"):
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise GMAEError(f"BSDS500 folder {root} does not exist: give the folder holding images/ and groundTruth/")
        if split not in BSDS_SPLITS:
            raise GMAEError(f"BSDS500 split must be one of {', '.join(BSDS_SPLITS)}, got {split!r}")
        for sub in ("", "data", os.path.join("BSDS500", "data"), os.path.join("BSR", "BSDS500", "data")):
            base = os.path.join(root, sub)
            if os.path.isdir(os.path.join(base, "images")) and os.path.isdir(os.path.join(base, "groundTruth")):
                break
        else:
            raise GMAEError(f"{root} is not a BSDS500 folder: it has no images/ and groundTruth/ (nor BSDS500/data/ "
                            f"holding them); give the BSDS500 data folder")
        self.root, self.split = base, split
        self.image_dir = os.path.join(base, "images", split)
        self.gt_dir = os.path.join(base, "groundTruth", split)
        for d in (self.image_dir, self.gt_dir):
            if not os.path.isdir(d):
                raise GMAEError(f"BSDS500 folder {base} has no {split} split ({d} is missing): check the split")
        files = _paired_images(self.image_dir, self.gt_dir, ".mat", "BSDS500 image folder",
                               "BSDS500 image {name} has no ground truth")
        self.names = list(files)
        self._files = files

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"BSDS500({self.root!r}, split={self.split!r}, {len(self)} images)"

    def boundaries(self, index: int) -> list[np.ndarray]:
        """The annotators' boundary maps of image ``index``: bool (H, W) each."""
        path = os.path.join(self.gt_dir, self.names[index] + ".mat")
        try:
            mat = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
        except _BAD_MAT as e:
            raise GMAEError(f"cannot read BSDS500 ground truth {path} ({type(e).__name__}): "
                            f"replace the file with the dataset's") from None
        if "groundTruth" not in mat:
            raise GMAEError(f"BSDS500 ground truth {path} has no 'groundTruth' variable: it is not a BSDS500 file")
        try:
            maps = _boundary_maps(mat["groundTruth"])
        except (KeyError, ValueError, IndexError, TypeError):
            raise GMAEError(f"BSDS500 ground truth {path}: 'groundTruth' is not a cell array of structs with "
                            f"a numeric 'Boundaries' field: it is not a BSDS500 file") from None
        if not maps or any(m.ndim != 2 for m in maps):
            raise GMAEError(f"BSDS500 ground truth {path} holds no 2-D boundary maps: it is not a BSDS500 file")
        return maps

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, list[np.ndarray]]:
        name = self.names[index]
        image = _read_image(os.path.join(self.image_dir, self._files[name]))
        maps = self.boundaries(index)
        for m in maps:
            if m.shape != tuple(image.shape[1:]):
                raise GMAEError(f"BSDS500 image {name} is {image.shape[1]}x{image.shape[2]} (HxW) but its ground truth "
                                f"is {m.shape[0]}x{m.shape[1]}: use the dataset's original files")
        return name, image, maps


class MaskFolder:
    """Images with binary figure masks: ``(name, image, bool (H, W) mask)``."""

    def __init__(self, root: str):
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise GMAEError(f"mask folder {root} does not exist: give the folder holding images/ and masks/")
        self.root = root
        self.image_dir, self.mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        for d in (self.image_dir, self.mask_dir):
            if not os.path.isdir(d):
                raise GMAEError(f"mask folder {root} has no {os.path.basename(d)}/ sub-folder: the layout is "
                                f"ROOT/images/NAME.jpg + ROOT/masks/NAME.png")
        files = _paired_images(self.image_dir, self.mask_dir, ".png", "mask folder image folder",
                               "image {name} has no mask")
        self.names = list(files)
        self._files = files

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"MaskFolder({self.root!r}, {len(self)} images)"

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, np.ndarray]:
        name = self.names[index]
        image = _read_image(os.path.join(self.image_dir, self._files[name]))
        path = os.path.join(self.mask_dir, name + ".png")
        try:
            with Image.open(path) as img:
                img.load()
                mask = np.asarray(to_rgb(img).convert("L")) > 127
        except _BAD_IMAGE as e:
            raise GMAEError(f"cannot read mask {path} ({type(e).__name__}): replace the file") from None
        if mask.shape != tuple(image.shape[1:]):
            raise GMAEError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
                            f"{image.shape[1]}x{image.shape[2]}: masks must match their images' size")
        return name, image, mask


def centre_square(image: torch.Tensor, *maps: np.ndarray):
    """(the image's centred square (side = its shorter side), each map cropped alike (None stays None))."""
    H, W = image.shape[-2:]
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    crop = (slice(top, top + s), slice(left, left + s))
    return image[:, crop[0], crop[1]], [None if m is None else m[crop] for m in maps]
