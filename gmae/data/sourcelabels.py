"""Labels of the pre-training sources, for the online probe (`gmae pretrain --online-probe`).

Pre-training reads images only; the online probe also needs each image's class,
*for the very image* of each global sample number. :func:`source_labels` gives a
source's :class:`SourceLabels`, whose ``load(index, rng)`` returns the source's own
``load(index, rng)`` image, bit for bit and with the same rng use, together with its
label, so a run with the probe sees exactly the images of a run without it
(:class:`~gmae.data.SeededStream` with ``labels``).

Which sources have labels (:data:`LABELLED_SOURCES`):

* ``digits``: the digit (10 classes).
* an ImageNet-style folder ``ROOT[/train]/CLASS/*.jpg``: the class folder
  (:class:`~gmae.data.ImageFolder` ``targets``); an image directly in the folder read
  has no class, and is refused.
* ``sprites`` / ``deadleaves``: the generator's truth, as the scene probes' count
  task (:mod:`gmae.data.scenes`) classes it: sprites by the number of visible shapes,
  dead-leaves by quantile bins of the visible-leaf count fitted on the scene probes'
  train split (its held-out seed, at the run's image size), so the online probe's
  classes are those of `gmae probe --data deadleaves --task count`.
* ``photos`` has none (six photos; a crop's photo is not a class worth probing).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GMAEError
from .deadleaves import DeadLeaves
from .folder import ImageFolder
from .registry import find

__all__ = ["LABELLED_SOURCES", "SourceLabels", "counts_labels", "source_labels", "targets_labels"]

#: What `--online-probe` accepts, as its error message names it.
LABELLED_SOURCES = ("digits (the digit), sprites (visible shapes), deadleaves (visible-leaf count bins) or an "
                    "image folder of class sub-folders ROOT[/train]/CLASS/*.jpg (the class)")


class SourceLabels:
    """A source's labels: ``load(index, rng)`` is ``(source.load(index, rng), label)``.

    ``names``: the class names (label i is ``names[i]``); ``what``: what a label says, in words.
    """

    def __init__(self, source, names: list[str], what: str):
        self.source, self.names, self.what = source, list(names), what

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.what}, {len(self.names)} classes)"


class _Targets(SourceLabels):
    """Sources that know each file's class: ``targets`` (in-memory arrays), or ``load_with_target``
    (image folders, whose unreadable files are replaced by the next readable one's image and label)."""

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        if hasattr(self.source, "load_with_target"):
            image, label = self.source.load_with_target(index, rng)
            return image, int(label)
        return self.source.load(index, rng), int(self.source.targets[index])


class _Counts(SourceLabels):
    """Generated scenes: the count class of the visible objects of the image (one render for both)."""

    def __init__(self, source: DeadLeaves, data: str, img_size: int):
        from .scenes import CountClasses, train_split_counts

        self.classes = CountClasses.fit(data, train_split_counts(data, img_size))
        super().__init__(source, self.classes.names, f"{data} visible-object count classes")

    def load(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        from .scenes import visible_objects

        image, objects, num_objects = self.source.load_objects(index)
        return image, self.classes(len(visible_objects(objects, num_objects)))


def counts_labels(source, data: str, img_size: int) -> SourceLabels:
    """A scene generator's labels: the count class of each image's visible objects (the registry's builder)."""
    return _Counts(source, data, img_size)


def targets_labels(source, names: list[str], what: str) -> SourceLabels:
    """The labels of a source that knows each image's class (the registry's builder)."""
    return _Targets(source, names, what)


def source_labels(source, data: str, img_size: int) -> SourceLabels:
    """The labels of the pre-training ``source`` built from ``--data data``: the registered data set's
    (:mod:`gmae.data.registry`), or an image folder's class folders; GMAEError naming ``data`` and the
    sources that have labels where it has none (or where some images have none)."""
    dataset = find(data)
    if dataset is not None and dataset.labels is not None:
        return dataset.labels(source, img_size)
    if dataset is None and isinstance(source, ImageFolder):
        flat = [f for f, t in zip(source.files, source.targets) if t < 0]
        if flat or len(source.classes) < 2:
            why = (f"image {flat[0]} lies directly in {source.root}, outside a class folder" if flat
                   else f"{source.root} has {len(source.classes)} class folder(s), and a probe needs at least 2")
            raise GMAEError(f"--online-probe needs a label for every image, but {why}; use {LABELLED_SOURCES}")
        return _Targets(source, source.classes, "class folder")
    if hasattr(source, "targets") and hasattr(source, "classes"):  # any source that knows its images' classes
        return _Targets(source, source.classes, "class")
    raise GMAEError(f"--online-probe needs labelled data, and --data {data} has none; use {LABELLED_SOURCES}")
