"""The dataset registry: one entry per data set name, with what each use of the data needs.

A :class:`Dataset` names the builders of the uses it supports; every command
that reads data looks its name up here, and only here:

``images(image_size, seed=, scale=, interpolation=, on_bad_image=)``
    the unlabelled image source of pre-training (``--data NAME``;
    :func:`gmae.data.build_dataset`): an object with ``load(index, rng)``,
    ``__len__`` and ``shuffle`` (:class:`gmae.data.stream.ImageSource`).
``labelled(option, img_size, augment, progress)``
    (train, val, number of classes) for the probes and fine-tuning
    (``NAME`` or ``NAME:OPTION``; :func:`gmae.data.labelled.build_labelled`).
    ``labelled_option`` names what follows the colon ("ROOT", "TASK"); ""
    for none.
``truth(option, size, num_images)``
    (an iterator of :class:`Truth`, how many) for `gmae eval-zeroshot`
    (``NAME`` or ``NAME:OPTION`` as ``truth_option`` says).
``labels(source, img_size)``
    the online probe's :class:`gmae.data.sourcelabels.SourceLabels` of the
    pre-training source built from this entry.
``held_out(image_size, num_images, seed)``
    a fixed batch to measure a model on, with the words saying what it is
    (:func:`gmae.data.held_out_batch`); without it, the source's first images.
``scenes``
    a scene generator class (``cls(img_size, seed=)`` with ``sample(index)``,
    ``load_objects(index)``, ``figure``, ``shape_names``) for the scene probes
    (:mod:`gmae.data.scenes`).

Names are matched without case or surrounding spaces, and so are the
``aliases``; anything that names no entry is read as a path (an image folder,
or a labelled data set whose kind is detected). The built-in data sets are
registered in :mod:`gmae.data.builtin`; a new one is one :func:`register` call.
This module imports nothing else of gmae.data, so that every module there may
read it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import GMAEError

__all__ = ["DATASETS", "Dataset", "Truth", "find", "names_with", "register", "scene_names", "spec_of", "unregister"]


@dataclass
class Truth:
    """One image of eval-zeroshot's data with its ground truth, at the image's resolution (None: not known).

    ``boundaries``: one (H, W) bool map per annotator; ``figure``: (H, W) bool; ``depth``: (object-id map (H, W),
    whole-shape overlaps (n+1, n+1), order weights (n+1, n+1) or None), as
    :class:`gmae.evaluate.depth.DepthTruth` reads them."""

    name: str
    image: Any  # (3, H, W) float tensor in [0, 1]
    boundaries: list | None = None
    figure: Any = None
    depth: tuple | None = None


@dataclass(frozen=True)
class Dataset:
    """One registered data set (see the module docstring for each builder's signature)."""

    name: str
    help: str = ""
    aliases: tuple[str, ...] = ()
    images: Callable | None = None
    labelled: Callable | None = None
    labelled_option: str = ""
    truth: Callable | None = None
    truth_option: str = ""
    labels: Callable | None = None
    held_out: Callable | None = None
    scenes: type | None = None


#: Registered data sets by name, in registration order (the order the error messages list them in).
DATASETS: dict[str, Dataset] = {}
_KEYS: dict[str, str] = {}  # lower-case name or alias -> name


def register(dataset: Dataset) -> Dataset:
    """Add `dataset` (a name or alias already taken is a GMAEError); returns it."""
    keys = [k.strip().lower() for k in (dataset.name, *dataset.aliases)]
    taken = [k for k in keys if k in _KEYS and _KEYS[k] != dataset.name]
    if taken or not dataset.name or ":" in "".join(keys):
        raise GMAEError(f"data set name {taken[0] if taken else dataset.name!r} is taken or not a plain name; "
                        "choose another")
    unregister(dataset.name)  # a data set registered again drops its old aliases
    DATASETS[dataset.name] = dataset
    _KEYS.update(dict.fromkeys(keys, dataset.name))
    return dataset


def unregister(name: str) -> None:
    """Remove a registered data set (tests register toy ones)."""
    DATASETS.pop(name, None)
    for key in [k for k, v in _KEYS.items() if v == name]:
        del _KEYS[key]


def find(name: str) -> Dataset | None:
    """The data set called `name` (or one of its aliases), without case or surrounding spaces; None if none."""
    found = _KEYS.get(str(name).strip().lower())
    return None if found is None else DATASETS[found]


def spec_of(text: str) -> tuple[Dataset | None, str, bool]:
    """(the data set a ``NAME`` or ``NAME:OPTION`` spec names or None, the option, whether a colon was given)."""
    text = str(text).strip()
    whole = find(text)
    if whole is not None:
        return whole, "", False
    head, sep, option = text.partition(":")
    return (find(head), option, bool(sep)) if sep else (None, "", False)


def names_with(use: str) -> list[str]:
    """The names of the data sets that have the builder `use` ("images", "labelled", ...), each written as its
    spec (``cifar10:ROOT`` for a use that takes an option)."""
    option = {"labelled": "labelled_option", "truth": "truth_option"}.get(use)
    return [d.name + (f":{getattr(d, option)}" if option and getattr(d, option) else "")
            for d in DATASETS.values() if getattr(d, use) is not None]


def scene_names() -> tuple[str, ...]:
    """The data sets the scene probes read (those with a scene generator)."""
    return tuple(d.name for d in DATASETS.values() if d.scenes is not None)
