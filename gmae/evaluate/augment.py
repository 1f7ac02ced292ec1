"""MAE's fine-tuning regularisers from timm: RandAugment and random erasing per image, mixup / cutmix per batch.

MAE builds them with timm (``util/datasets.py`` lines 37-48: ``create_transform``
with ``auto_augment``, ``re_prob``, ``re_mode``, ``re_count``;
``main_finetune.py`` lines 218-225: ``Mixup``, lines 290-296: the loss), and
so does gmae, through :func:`gmae.evaluate.timm_support.import_timm`. What
differs, and why:

* **Order and crop.** timm's training transform is crop + flip, RandAugment,
  ToTensor, Normalize, RandomErasing. gmae keeps each data set's own crop + flip
  (:mod:`gmae.data.labelled`: photos MAE's RandomResizedCrop (0.08, 1) + flip,
  digits crops of 50-100 % without flip, scenes a flip only), then runs timm's
  RandAugment on the 8-bit image and timm's RandomErasing on the tensor, in
  timm's order. RandAugment's fill colour and translation are
  ``create_transform``'s (ImageNet mean colour, 0.45 x image size), its
  interpolation bicubic as MAE's.
* **No normalisation.** gmae's models take [0, 1] images (normalisation, if
  any, is the model's business), so no Normalize runs here. Random erasing
  fills in ImageNet-normalised coordinates all the same: the image is mapped to
  (x - mean) / std, erased by timm (``pixel``: N(0, 1) per value, ``const``: 0),
  and mapped back, so an erased box holds mean + std x N(0, 1) in [0, 1] space
  (not clamped), exactly MAE's values once normalised with ImageNet's mean/std.
* **Seeded randomness.** timm's RandAugment draws from Python's ``random`` and
  numpy's global generator, RandomErasing from ``random`` and torch's, Mixup
  from numpy's. Each image's draws here are seeded from that sample's own
  generator (rng (seed, g) of :class:`gmae.data.labelled.LabelledStream`),
  each batch's mixing from (seed, step), and the global generators are put
  back afterwards: a fine-tuning run with them on still resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import IMAGENET_MEAN, IMAGENET_STD, FinetuneConfig
from ..errors import GMAEError
from .timm_support import import_timm

__all__ = ["TimmAugmented", "augmented", "build_mixup", "mix_batch", "posterize", "seeded_globals", "soft_target_loss"]

_MIX_SALT = 0x6D697875  # "mixu": separates the batches' mixing streams from everything else seeded by (seed, step)


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Run the block with Python's ``random``, numpy's global generator and torch's CPU generator seeded from
    ``seed`` (< 2**32), then put all three back as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def posterize(img, bits_to_keep, **_):
    """timm's posterize op, with 0 bits allowed again.

    At magnitude 10 timm's PosterizeIncreasing keeps 4 - 4 = 0 bits (with MAE's mstd0.5 the magnitude passes
    10 for about 2% of its draws), and Pillow >= 10 refuses ``ImageOps.posterize(img, 0)`` (ValueError: bits must
    be between 1 and 8), which ended a fine-tune mid-run. Older Pillow, which MAE ran on, gave the black image
    that keeping no bit means; so does this."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: black
    return ImageOps.posterize(img, bits_to_keep)


class TimmAugmented(Dataset):
    """A labelled training set whose ``load(index, rng)`` adds timm's RandAugment (``aa``) and random erasing
    (``reprob``, ``remode``, ``recount``) after the set's own crop + flip; ``__getitem__`` (evaluation) is the
    set's own, untouched."""

    shuffle = True

    def __init__(self, source, img_size: int, aa: str = "", reprob: float = 0.0, remode: str = "pixel",
                 recount: int = 1):
        timm = import_timm()
        self.source = source
        self.targets = source.targets
        self.classes = getattr(source, "classes", None)
        self.randaugment = None
        if aa:
            hparams = {  # as timm's create_transform builds them (transforms_factory.transforms_imagenet_train)
                "translate_const": int(img_size * 0.45),
                "img_mean": tuple(min(255, round(255 * v)) for v in IMAGENET_MEAN),
                "interpolation": timm.data.transforms.str_to_pil_interp("bicubic"),
            }
            try:
                self.randaugment = timm.data.rand_augment_transform(aa, hparams)
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise GMAEError(f"aa {aa!r} is not a RandAugment policy timm reads ({type(e).__name__}: {e}); "
                                "e.g. rand-m9-mstd0.5-inc1 (MAE's)") from None
            for op in self.randaugment.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
        self.erase = None
        if reprob > 0:
            self.erase = timm.data.random_erasing.RandomErasing(reprob, mode=remode, max_count=recount, device="cpu")
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"TimmAugmented({self.source!r}, randaugment={self.randaugment is not None}, erase={self.erase})"

    def __getitem__(self, index: int):
        return self.source[index]

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        x = self.source.load(index, rng)
        if rng is None:
            return x
        # Drawn after the source's own draws, so the crop and flip are the ones a run without timm's extras gets.
        with seeded_globals(int(rng.integers(2**32))):
            if self.randaugment is not None:
                from PIL import Image

                pil = Image.fromarray(x.mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy())
                x = torch.from_numpy(np.array(self.randaugment(pil))).permute(2, 0, 1).float().div_(255)
            if self.erase is not None:
                normed = (x - self._mean) / self._std
                before = normed.clone()
                self.erase(normed)  # in place
                # Only the erased values come back through * std + mean: the others stay bit for bit.
                x = torch.where(normed != before, normed * self._std + self._mean, x)
        return x


def augmented(train: Dataset, img_size: int, fcfg: FinetuneConfig) -> Dataset:
    """``train`` itself when ``fcfg`` asks for no RandAugment and no erasing (no timm needed), else wrapped."""
    if not fcfg.aa and fcfg.reprob == 0:
        return train
    return TimmAugmented(train, img_size, fcfg.aa, fcfg.reprob, fcfg.remode, fcfg.recount)


def build_mixup(fcfg: FinetuneConfig, num_classes: int):
    """timm's Mixup as MAE builds it (main_finetune.py lines 222-225: label smoothing folded into the mixed
    targets), or None when neither mixup nor cutmix is on."""
    if not fcfg.mixup_active:
        return None
    timm = import_timm()
    return timm.data.Mixup(mixup_alpha=fcfg.mixup, cutmix_alpha=fcfg.cutmix, prob=fcfg.mixup_prob,
                           switch_prob=fcfg.mixup_switch_prob, mode=fcfg.mixup_mode,
                           label_smoothing=fcfg.smoothing, num_classes=num_classes)


def mix_batch(mixup, imgs: torch.Tensor, labels: torch.Tensor, seed: int, step: int):
    """(mixed imgs, soft targets (B, classes)) of one step's batch; the draws are a function of (seed, step)."""
    mix_seed = int(np.random.SeedSequence([seed, step, _MIX_SALT]).generate_state(1)[0])
    with seeded_globals(mix_seed):
        return mixup(imgs, labels)


def soft_target_loss():
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum(target x log_softmax(logits))."""
    return import_timm().loss.SoftTargetCrossEntropy()
