"""Image decoding and MAE's training augmentation, implemented with PIL + numpy (no torchvision).

The augmentation follows torchvision's ``RandomResizedCrop(size, scale=(0.2, 1),
ratio=(3/4, 4/3), interpolation=BICUBIC)`` + ``RandomHorizontalFlip()`` exactly
(same algorithm: 10 tries, then a centre-crop fallback clamped to the ratio
range), except that the randomness comes from the ``numpy.random.Generator``
passed in, never from global state.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import GMAEError
from ..io.files import IMG_EXTENSIONS

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_SCALE",
    "IMG_EXTENSIONS",
    "as_hw",
    "load_image",
    "mae_augment",
    "open_image",
    "pil_filter",
    "pil_to_tensor",
    "random_resized_crop",
    "random_resized_crop_params",
    "resize_center_crop",
    "to_rgb",
]

DEFAULT_SCALE = (0.2, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# PIL's filters by the names of gmae.config.INTERPOLATIONS (torchvision's InterpolationMode names).
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def pil_filter(interpolation: str):
    if interpolation not in PIL_FILTERS:
        raise GMAEError(f"interpolation must be one of {', '.join(PIL_FILTERS)}; got {interpolation!r}")
    return PIL_FILTERS[interpolation]


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
    img, why = _open_or_why(path)
    if why is not None:
        raise GMAEError(f"image {why}; give a file Pillow can open")
    return resize_center_crop(img, size, crop_pct)


def _open_or_why(path) -> tuple[Image.Image | None, str | None]:
    """(the decoded image, None), or (None, why it cannot be used: "PATH does not exist" or "PATH cannot be read
    (ErrorType)")."""
    if not os.path.isfile(path):
        return None, f"{path} does not exist"
    try:
        return open_image(path), None
    except Exception as e:  # PIL raises many types for bad files
        return None, f"{path} cannot be read ({type(e).__name__})"


def load_images(paths, size, crop_pct: float = 1.0, shown: int = 5) -> list[torch.Tensor]:
    """:func:`load_image` of every path, all read before any is used: one GMAEError naming every file that is
    missing or cannot be decoded (the first `shown` by name, then a count), so that a command that writes one
    figure per image writes none when an input is bad, and the user learns of every bad input at once."""
    images, bad = [], []
    for path in paths:
        img, why = _open_or_why(path)
        if why is None:
            images.append(resize_center_crop(img, size, crop_pct))
        else:
            bad.append(why)
    if bad:
        listed = ", ".join(bad[:shown]) + (f", and {len(bad) - shown} more" if len(bad) > shown else "")
        raise GMAEError(f"{len(bad)} of {len(images) + len(bad)} images cannot be used: {listed}; give files "
                        "Pillow can open (nothing was written)")
    return images


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
    interpolation: str = "bicubic",
) -> Image.Image:
    """Crop a random box (see :func:`random_resized_crop_params`) and resize it
    to ``size`` (int or (H, W)) with ``interpolation`` (bicubic or bilinear;
    antialiased when shrinking, as PIL/torchvision do)."""
    out_h, out_w = as_hw(size)
    top, left, h, w = random_resized_crop_params(img.height, img.width, rng, scale, ratio)
    # Crop, then resize (as torchvision does): resize(box=...) would let the
    # bicubic filter read pixels outside the box and differ at the crop's edges.
    return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), pil_filter(interpolation))


def mae_augment(img: Image.Image, size, rng: np.random.Generator,
                scale: Sequence[float] = DEFAULT_SCALE,
                ratio: Sequence[float] = DEFAULT_RATIO, interpolation: str = "bicubic") -> torch.Tensor:
    """MAE pre-training augmentation: RandomResizedCrop (bicubic by default) + horizontal
    flip with probability 1/2.  Returns float32 (3, H, W) in [0, 1], not
    normalised (the model's target; the encoder normalises its own input)."""
    out = random_resized_crop(img, size, rng, scale, ratio, interpolation)
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
