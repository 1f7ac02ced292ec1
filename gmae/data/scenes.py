"""Ground truth for the scene probes: labels and marked points read from the generators' truth.

Each task's labels (see :mod:`gmae.evaluate.scene` for what the tasks ask and
how they are probed) are read from :class:`gmae.data.DeadLeavesSample` of
images drawn from seeds no pre-training run uses (:data:`SPLIT_SEEDS`), and
depend only on (data, split seed, index, image size, patch size).
:func:`gmae.data.labelled.build_scene_labelled` serves the image-level tasks
(count, shape) as a labelled data set, so `gmae finetune --data sprites:count`
fine-tunes on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..config.choices import SCENE_IMAGES, SCENE_TASKS
from ..errors import GMAEError
from .registry import find, scene_names

TASK_KIND = {"count": "semantic", "shape": "semantic", "front": "spatial", "figure": "figure-ground"}
#: Source seeds of the probe splits: pre-training uses the run's --seed (small integers) and the
#: zero-shot evaluation gmae.evaluate.zeroshot.EVAL_SEED (2024); these are neither.
SPLIT_SEEDS = {"train": 3001, "val": 3002}
COUNT_BINS = 4  # dead-leaves count classes
_POINT_TAG = 0x9B0B  # the marked points' rng: (seed, index, tag), apart from the image's own rng
MAJORITY = 0.5  # a marked patch is covered by its object more than this


@dataclass
class SceneLabels:
    """Every task's ground truth for images ``0 .. n-1`` of one split (numpy int64 arrays of length n).

    ``count``: visible objects; ``shape``: shape code (index into the source's
    ``shape_names``) of the largest visible object; ``front``: 1 if the first
    of ``front_points`` is in front, 0 if behind, -1 where the image has no
    valid pair; ``front_points`` (n, 2) patch indices (row-major on the patch
    grid, -1 where invalid); ``figure``: 1 figure / 0 ground / -1 invalid, at
    patch ``figure_point`` (n,).
    """

    data: str
    seed: int
    img_size: int
    patch_size: int
    shape_names: tuple[str, ...]
    count: np.ndarray
    shape: np.ndarray
    front: np.ndarray
    front_points: np.ndarray
    figure: np.ndarray
    figure_point: np.ndarray

    def __len__(self) -> int:
        return len(self.count)

    def source(self):
        return _source(self.data, self.img_size, self.seed)


def _source(data: str, img_size: int, seed: int):
    """The scene generator registered as `data` (:mod:`gmae.data.registry`), of images of `seed`."""
    dataset = find(data)
    if dataset is None or dataset.scenes is None or data != dataset.name:
        raise GMAEError(f"scene probes read generated scenes: data must be one of {', '.join(scene_names())}; "
                        f"got {data!r}")
    return dataset.scenes(img_size, seed=seed)


def patch_cover(objects: np.ndarray, num_objects: int, patch_size: int) -> np.ndarray:
    """(num_objects, N) fraction of each patch's pixels (row-major patch grid) that each object owns."""
    H, W = objects.shape
    if H % patch_size or W % patch_size:
        raise GMAEError(f"image {H}x{W} is not a whole number of {patch_size}-pixel patches")
    gh, gw = H // patch_size, W // patch_size
    # (gh, p, gw, p) -> (N, p*p): each row one patch's pixels
    patches = objects.reshape(gh, patch_size, gw, patch_size).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    onehot = patches[None, :, :] == np.arange(num_objects)[:, None, None]
    return onehot.mean(-1)


def visible_objects(objects: np.ndarray, num_objects: int) -> np.ndarray:
    """The ids of the objects (background excluded) that own at least one pixel of the object-id map."""
    area = np.bincount(np.asarray(objects).ravel(), minlength=num_objects)
    return np.flatnonzero(area[1:] > 0) + 1


def image_labels(sample, figure_of, patch_size: int, rng: np.random.Generator) -> dict:
    """One image's labels (see :class:`SceneLabels`) from its ground truth ``sample``.

    ``figure_of(objects_ids, num_objects)`` is the source's figure truth applied to object ids.
    """
    objects = sample.objects.numpy()
    m = sample.num_objects
    area = np.bincount(objects.ravel(), minlength=m)
    visible = visible_objects(objects, m)
    largest = visible[np.argmax(area[visible])] if visible.size else 0
    cover = patch_cover(objects, m, patch_size)  # (m, N)
    owner = np.where(cover.max(0) > MAJORITY, cover.argmax(0), -1)  # (N,) the object holding each patch, or -1

    def point_on(obj: int) -> int:
        return int(rng.choice(np.flatnonzero(owner == obj)))

    # front: a pair of marked objects whose whole shapes overlap, in random order
    marked = [o for o in visible if (owner == o).any()]
    overlaps = sample.overlaps.numpy()
    pairs = [(a, b) for i, a in enumerate(marked) for b in marked[i + 1:] if overlaps[a, b]]
    front, points = -1, (-1, -1)
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
            a, b = b, a
        front, points = int(a > b), (point_on(a), point_on(b))  # larger id = painted later = nearer

    # figure: a marked patch on the figure or the ground, each with probability 1/2 where both exist
    owned = np.flatnonzero(owner >= 0)
    is_fig = figure_of(owner[owned], m).astype(bool)
    figure, fpoint = -1, -1
    if owned.size:
        want = rng.random() < 0.5
        pool = owned[is_fig == want] if (is_fig == want).any() else owned
        fpoint = int(rng.choice(pool))
        figure = int(bool(figure_of(np.array([owner[fpoint]]), m)[0]))
    return {"count": len(visible), "shape": int(sample.shapes[largest]), "front": front, "front_points": points,
            "figure": figure, "figure_point": fpoint}


def scene_labels(data: str, split: str, img_size: int, patch_size: int, images: int | None = None,
                 progress: bool = True) -> SceneLabels:
    """Ground truth of every scene task for the first ``images`` images of ``split`` ("train" or "val")."""
    if split not in SPLIT_SEEDS:
        raise GMAEError(f"split must be one of {', '.join(SPLIT_SEEDS)}; got {split!r}")
    n = SCENE_IMAGES[split] if images is None else int(images)
    if n < 1:
        raise GMAEError(f"need at least one {split} image; got {images}")
    seed = SPLIT_SEEDS[split]
    source = _source(data, img_size, seed)
    rows = []
    for index in tqdm(range(n), desc=f"{data} {split} labels", disable=not progress, leave=False,
                      dynamic_ncols=True):
        rng = np.random.default_rng([seed, index, _POINT_TAG])
        rows.append(image_labels(source.sample(index), source.figure, patch_size, rng))

    def col(key):
        return np.array([r[key] for r in rows], dtype=np.int64)

    return SceneLabels(data, seed, int(img_size), int(patch_size), tuple(source.shape_names), col("count"),
                       col("shape"), col("front"), col("front_points"), col("figure"), col("figure_point"))


@dataclass(frozen=True)
class CountClasses:
    """How a visible-object count becomes the count task's class: sprites by the count itself (1..4 visible
    shapes: classes 0..3), dead-leaves by quantile bins of the train split's counts (about 1/COUNT_BINS each)."""

    lo: int  # sprites: the smallest count (class 0); dead-leaves: unused
    edges: tuple[float, ...]  # dead-leaves: the bins' interior edges; sprites: empty
    names: list[str]

    @classmethod
    def fit(cls, data: str, train_count: np.ndarray, *more: np.ndarray) -> CountClasses:
        """The classes of ``data``'s counts: sprites' over the counts of ``train_count`` and ``more``, dead-leaves'
        bins from ``train_count`` alone."""
        if data == "sprites":
            lo = int(min(c.min() for c in (train_count, *more)))
            hi = int(max(c.max() for c in (train_count, *more)))
            return cls(lo, (), [str(c) for c in range(lo, hi + 1)])
        # Interior edges of the train split's quantiles, so that each class holds about 1/COUNT_BINS of it.
        edges = np.unique(np.quantile(train_count, np.linspace(0, 1, COUNT_BINS + 1)[1:-1]))
        names = [f"<{int(np.ceil(edges[0]))}"] + \
                [f"{int(np.ceil(a))}-{int(np.ceil(b)) - 1}" for a, b in zip(edges[:-1], edges[1:])] + \
                [f">={int(np.ceil(edges[-1]))}"]
        return cls(0, tuple(float(e) for e in edges), names)

    def __call__(self, count):
        """The class of each count (an int for an int, an int64 array for an array); clipped into the classes, so
        that a count the fitted split never showed (sprites) still has one."""
        if self.edges:
            found = np.searchsorted(np.asarray(self.edges), count, side="right")
        else:
            found = np.clip(np.asarray(count) - self.lo, 0, len(self.names) - 1)
        return int(found) if np.ndim(found) == 0 else found.astype(np.int64)


def train_split_counts(data: str, img_size: int, images: int | None = None) -> np.ndarray:
    """The visible-object counts of the first ``images`` images of the scene probes' train split (its
    :data:`SPLIT_SEEDS` seed, :data:`SCENE_IMAGES` images by default): the images :func:`scene_labels` reads, but
    only their object maps (far cheaper than the whole ground truth)."""
    source = _source(data, img_size, SPLIT_SEEDS["train"])
    n = SCENE_IMAGES["train"] if images is None else int(images)
    counts = np.empty(n, np.int64)
    for index in range(n):
        _, objects, m = source.load_objects(index)
        counts[index] = len(visible_objects(objects, m))
    return counts


def task_targets(task: str, train: SceneLabels, val: SceneLabels):
    """(train_y, val_y, num_classes, class names); -1 marks images the task does not apply to."""
    if task == "count":
        classes = CountClasses.fit(train.data, train.count, val.count)
        return classes(train.count), classes(val.count), len(classes.names), classes.names
    if task == "shape":  # codes 1.. (0 is the background plane)
        names = list(train.shape_names[1:])
        return train.shape - 1, val.shape - 1, len(names), names
    if task == "front":
        return train.front, val.front, 2, ["behind", "in front"]
    if task == "figure":
        return train.figure, val.figure, 2, ["ground", "figure"]
    raise GMAEError(f"unknown scene task {task!r}; choose from {', '.join(SCENE_TASKS)}")


__all__ = ["SPLIT_SEEDS", "CountClasses", "SceneLabels", "TASK_KIND", "image_labels", "patch_cover", "scene_labels",
           "task_targets", "train_split_counts", "visible_objects"]
