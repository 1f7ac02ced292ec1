"""The seeded, resumable sample stream: global sample numbers, and the batches of each step.

:class:`SeededStream` turns an image source (:class:`ImageSource`) into a
map-style Dataset over *global sample numbers* g = 0, 1, 2, ...: sample g is a
pure function of (seed, g), so training is exactly reproducible and can resume
at any step (``global_batch(step, batch_size)``), and several processes can take
disjoint slices of each global batch (``rank``/``world_size``).
"""

from __future__ import annotations

import sys
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import GMAEError

__all__ = ["ImageSource", "SeededStream", "StepBatchSampler", "check_seed", "global_batch"]


@runtime_checkable
class ImageSource(Protocol):
    """What a SeededStream needs from a source."""

    shuffle: bool

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor: ...

    def __len__(self) -> int: ...


def check_seed(seed) -> int:
    try:
        s = int(seed)
    except (TypeError, ValueError):
        raise GMAEError(f"seed must be a non-negative integer, got {seed!r}") from None
    if s < 0 or s != seed:
        raise GMAEError(f"seed must be a non-negative integer, got {seed!r}")
    return s


# Salt separating the permutation streams from the per-sample streams.
_PERM_SALT = 0x9E3779B9


class SeededStream(Dataset):
    """Map-style dataset over global sample numbers g = 0, 1, 2, ...

    ``stream[g]``: ``epoch, pos = divmod(g, len(source))``; the source index is
    ``perm(seed, epoch)[pos]`` (a permutation of ``range(len(source))`` seeded by
    (seed, epoch)), or ``g`` itself when ``source.shuffle`` is False (virtual
    length sources such as dead-leaves, taken modulo their length); the
    augmentation rng is ``numpy.random.default_rng([seed, g])``.  So every epoch
    visits each index exactly once, and sample g never depends on what was
    loaded before it.

    With ``labels`` (:func:`gmae.data.sourcelabels.source_labels` of the source),
    ``stream[g]`` is ``(image, label)``, the image unchanged.

    ``len(stream)`` is ``sys.maxsize`` (the stream is endless); a plain
    ``DataLoader(stream, batch_size=B)`` thus reads g = 0, 1, 2, ... in order.
    ``epoch_length`` is ``len(source)``.
    """

    def __init__(self, source: ImageSource, seed: int = 0, labels=None):
        self.source = source
        # With labels (a gmae.data.sourcelabels.SourceLabels of `source`), stream[g] is (image, label): the same
        # image, from the same index and rng, so the image stream does not change (the online probe's labels).
        self.labels = labels
        self.seed = check_seed(seed)
        self.epoch_length = len(source)
        if self.epoch_length < 1:
            raise GMAEError(f"data source {source!r} is empty")
        self.shuffle = bool(getattr(source, "shuffle", True))
        self._perms: dict[int, np.ndarray] = {}  # last two epochs' permutations

    def __len__(self) -> int:
        return sys.maxsize

    def permutation(self, epoch: int) -> np.ndarray:
        """The index order of ``epoch`` (cached for the last two epochs used)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, int(epoch), _PERM_SALT])
            perm = rng.permutation(self.epoch_length)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def index(self, g: int) -> int:
        """The source index used for global sample ``g``."""
        g = int(g)
        if g < 0:
            raise IndexError(f"global sample number must be non-negative, got {g}")
        epoch, pos = divmod(g, self.epoch_length)
        if not self.shuffle:
            return pos
        return int(self.permutation(epoch)[pos])

    def rng(self, g: int) -> np.random.Generator:
        """The augmentation generator of global sample ``g``."""
        return np.random.default_rng([self.seed, int(g)])

    def __getitem__(self, g: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        g = int(g)
        if self.labels is not None:
            return self.labels.load(self.index(g), self.rng(g))
        return self.source.load(self.index(g), self.rng(g))

    def __repr__(self) -> str:
        return f"SeededStream({self.source!r}, seed={self.seed})"


def global_batch(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Global sample numbers of optimisation step ``step`` taken by process ``rank``.

    The global batch of step s is g = s*B ... s*B + B - 1; process ``rank`` of
    ``world_size`` takes every ``world_size``-th of them starting at ``rank``
    (disjoint slices whose union is the global batch).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
    start = int(step) * int(batch_size)
    return list(range(start + rank, start + batch_size, world_size))


class StepBatchSampler(Sampler):
    """Batch sampler for ``DataLoader(stream, batch_sampler=...)`` yielding
    :func:`global_batch` for steps ``start_step, start_step + 1, ...``
    (``num_steps`` of them, or endless if None).  Resuming = a new sampler with
    ``start_step`` set to the next step."""

    def __init__(self, batch_size: int, start_step: int = 0, num_steps: int | None = None,
                 rank: int = 0, world_size: int = 1):
        global_batch(0, batch_size, rank, world_size)  # validate
        self.batch_size, self.start_step, self.num_steps = int(batch_size), int(start_step), num_steps
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield global_batch(step, self.batch_size, self.rank, self.world_size)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepBatchSampler has no length")
        return int(self.num_steps)
