"""Scene probes: what a frozen encoder knows about the generated scenes it was pre-trained on.

Digit probes (:mod:`gmae.evaluate.probe` on ``digits``) ask about data the
encoders never saw, and random pixels already separate digits well; they say
little about what pre-training on dead-leaves or sprites taught. These probes
ask about those scenes, with labels read from the generators' ground truth
(:class:`gmae.data.DeadLeavesSample`), on images drawn from seeds no
pre-training run uses (:data:`SPLIT_SEEDS`):

``count`` (semantic)
    how many objects are visible (at least one pixel; the background plane is
    not counted). Sprites: 1-4, four classes. Dead-leaves (8-40 leaves, many of
    them small): the count binned into :data:`COUNT_BINS` classes at the train
    split's quantiles, so the classes are balanced and the val split uses the
    same edges.
``shape`` (semantic)
    the shape class of the largest visible object (most visible pixels; sprites:
    disc, square, triangle, ellipse; dead-leaves: disc, rectangle, polygon).
``front`` (spatial)
    two marked points on two different objects whose whole shapes overlap (so
    one occludes the other and the order shows in the image): is the first one
    in front? The points are patches, each covered more than half by its object;
    the feature is the two patch tokens concatenated (first, second), which any
    ViT encoder gives in the same way, GMAE's and MAE's alike. The pair's order
    is drawn at random, so the classes are balanced.
``figure`` (figure-ground)
    a marked point (a patch covered more than half by one object): is it on the
    figure or the ground, by the source's figure truth (sprites: any shape;
    dead-leaves: the nearer half of the leaves)? Figure and ground points are
    drawn with probability 1/2 each where the image has both. Feature: the
    patch token.

Semantic tasks read the pooled feature of :func:`gmae.evaluate.probe.encode`
(cls token or the patch-token mean). Every task is scored by the same linear
probe and kNN as the digit probes, with their settings fixed in advance
(:func:`~gmae.evaluate.probe.linear_probe`, DINO's kNN k = 20, T = 0.07), and
beside them a chance row: the val accuracy of always answering the train
split's most common class. Labels and marked points depend only on (data,
split seed, index, image size, patch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..choices import SCENE_DATA, SCENE_IMAGES, SCENE_TASKS
from ..errors import GMAEError
from .probe import POOLS, encode_tokens, knn_accuracy, linear_probe, pool_tokens

TASK_KIND = {"count": "semantic", "shape": "semantic", "front": "spatial", "figure": "figure-ground"}
#: Source seeds of the probe splits: pre-training uses the run's --seed (small integers) and the
#: zero-shot evaluation gmae.evaluate.zeroshot.EVAL_SEED (2024); these are neither.
SPLIT_SEEDS = {"train": 3001, "val": 3002}
COUNT_BINS = 4  # dead-leaves count classes
_POINT_TAG = 0x9B0B  # the marked points' rng: (seed, index, tag), apart from the image's own rng
_MAJORITY = 0.5  # a marked patch is covered by its object more than this


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
        from ..data import build_dataset

        return build_dataset(self.data, self.img_size, seed=self.seed)


def _source(data: str, img_size: int, seed: int):
    if data not in SCENE_DATA:
        raise GMAEError(f"scene probes read generated scenes: data must be one of {', '.join(SCENE_DATA)}; "
                        f"got {data!r}")
    from ..data import build_dataset

    return build_dataset(data, img_size, seed=seed)


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


def image_labels(sample, figure_of, patch_size: int, rng: np.random.Generator) -> dict:
    """One image's labels (see :class:`SceneLabels`) from its ground truth ``sample``.

    ``figure_of(objects_ids, num_objects)`` is the source's figure truth applied to object ids.
    """
    objects = sample.objects.numpy()
    m = sample.num_objects
    area = np.bincount(objects.ravel(), minlength=m)
    visible = np.flatnonzero(area[1:] > 0) + 1  # object ids, background excluded
    largest = visible[np.argmax(area[visible])] if visible.size else 0
    cover = patch_cover(objects, m, patch_size)  # (m, N)
    owner = np.where(cover.max(0) > _MAJORITY, cover.argmax(0), -1)  # (N,) the object holding each patch, or -1

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


def task_targets(task: str, train: SceneLabels, val: SceneLabels):
    """(train_y, val_y, num_classes, class names); -1 marks images the task does not apply to."""
    if task == "count":
        if train.data == "sprites":  # 1..4 visible shapes
            lo = int(min(train.count.min(), val.count.min()))
            hi = int(max(train.count.max(), val.count.max()))
            return train.count - lo, val.count - lo, hi - lo + 1, [str(c) for c in range(lo, hi + 1)]
        # Dead-leaves: quantile bins of the train split; interior edges, so each class holds about 1/COUNT_BINS.
        edges = np.unique(np.quantile(train.count, np.linspace(0, 1, COUNT_BINS + 1)[1:-1]))
        names = [f"<{int(np.ceil(edges[0]))}"] + \
                [f"{int(np.ceil(a))}-{int(np.ceil(b)) - 1}" for a, b in zip(edges[:-1], edges[1:])] + \
                [f">={int(np.ceil(edges[-1]))}"]
        return (np.searchsorted(edges, train.count, side="right"), np.searchsorted(edges, val.count, side="right"),
                len(edges) + 1, names)
    if task == "shape":  # codes 1.. (0 is the background plane)
        names = list(train.shape_names[1:])
        return train.shape - 1, val.shape - 1, len(names), names
    if task == "front":
        return train.front, val.front, 2, ["behind", "in front"]
    if task == "figure":
        return train.figure, val.figure, 2, ["ground", "figure"]
    raise GMAEError(f"unknown scene task {task!r}; choose from {', '.join(SCENE_TASKS)}")


@torch.no_grad()
def scene_features(encoder, labels: SceneLabels, pool: str = "cls", batch_size: int = 128,
                   device: str | torch.device = "cpu", progress: bool = True, desc: str = "features") -> dict:
    """{task: float32 (n, D) or (n, 2D) features on the CPU} for every scene task, one encoder pass per image."""
    if pool not in POOLS:
        raise GMAEError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if encoder.patch_embed.img_size != labels.img_size or encoder.patch_embed.patch_size != labels.patch_size:
        raise GMAEError(f"the labels were made for {labels.img_size} px images in {labels.patch_size} px patches; "
                        f"the encoder takes {encoder.patch_embed.img_size} px in "
                        f"{encoder.patch_embed.patch_size} px patches")
    source = labels.source()
    was_training = encoder.training
    encoder.eval()
    pooled, front, figure = [], [], []
    fp = torch.from_numpy(labels.front_points).clamp(min=0)  # invalid rows gather patch 0; their label is -1
    gp = torch.from_numpy(labels.figure_point).clamp(min=0)
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
        stop = min(len(labels), start + batch_size)
        imgs = torch.stack([source.load(i) for i in range(start, stop)]).to(device)
        latent = encode_tokens(encoder, imgs)  # (B, 1 + N, D)
        patches = latent[:, 1:].float().cpu()  # (B, N, D)
        rows = torch.arange(stop - start)
        pooled.append(pool_tokens(latent, pool).float().cpu())
        front.append(torch.cat([patches[rows, fp[start:stop, 0]], patches[rows, fp[start:stop, 1]]], dim=1))
        figure.append(patches[rows, gp[start:stop]])
    encoder.train(was_training)
    pooled = torch.cat(pooled)
    return {"count": pooled, "shape": pooled, "front": torch.cat(front), "figure": torch.cat(figure)}


def probe_task(task: str, train_f: torch.Tensor, val_f: torch.Tensor, train: SceneLabels, val: SceneLabels,
               k: int = 20, T: float = 0.07, epochs: int = 100, seed: int = 0) -> dict:
    """Linear-probe, kNN and chance accuracy of one task from precomputed features (rows as the labels)."""
    ty, vy, num_classes, names = task_targets(task, train, val)
    ty, vy = torch.from_numpy(ty), torch.from_numpy(vy)
    tk, vk = ty >= 0, vy >= 0
    if tk.sum() < 2 or vk.sum() < 1:
        raise GMAEError(f"too few images for the {task} task ({int(tk.sum())} train / {int(vk.sum())} val "
                        "have a valid label); use more images")
    ty, vy = ty[tk], vy[vk]
    with torch.random.fork_rng(devices=[]):
        linear = linear_probe(train_f[tk], ty, val_f[vk], vy, num_classes, epochs=epochs, seed=seed)
    knn = knn_accuracy(train_f[tk], ty, val_f[vk], vy, k=k, T=T, num_classes=num_classes)
    majority = int(torch.bincount(ty, minlength=num_classes).argmax())
    return {"task": task, "kind": TASK_KIND[task], "linear_acc": linear, "knn_acc": knn,
            "chance": (vy == majority).float().mean().item(), "num_train": int(tk.sum()), "num_val": int(vk.sum()),
            "num_classes": int(num_classes), "classes": names, "dim": int(train_f.shape[1])}


def scene_probe(encoder, data: str = "sprites", tasks=SCENE_TASKS, labels: tuple[SceneLabels, SceneLabels] | None = None,
                train_images: int | None = None, val_images: int | None = None, batch_size: int = 128,
                device: str | torch.device = "cpu", pool: str = "cls", k: int = 20, T: float = 0.07,
                epochs: int = 100, seed: int = 0, progress: bool = True) -> dict:
    """{task: scores} of a frozen ``encoder`` on the scene ``tasks`` (see the module docstring).

    ``labels``: a (train, val) pair from :func:`scene_labels` to reuse across
    encoders; by default made here from ``data`` and the encoder's image and
    patch size.
    """
    unknown = [t for t in tasks if t not in SCENE_TASKS]
    if unknown:
        raise GMAEError(f"unknown scene task {unknown[0]!r}; choose from {', '.join(SCENE_TASKS)}")
    img, patch = encoder.patch_embed.img_size, encoder.patch_embed.patch_size
    if labels is None:
        labels = (scene_labels(data, "train", img, patch, train_images, progress),
                  scene_labels(data, "val", img, patch, val_images, progress))
    train, val = labels
    encoder = encoder.to(device)
    train_f = scene_features(encoder, train, pool, batch_size, device, progress, "train features")
    val_f = scene_features(encoder, val, pool, batch_size, device, progress, "val features")
    return {t: {**probe_task(t, train_f[t], val_f[t], train, val, k, T, epochs, seed), "data": train.data,
                "feature": pool if t in ("count", "shape") else "patch tokens at the marked points"}
            for t in tasks}


__all__ = ["SCENE_DATA", "SCENE_TASKS", "SPLIT_SEEDS", "SceneLabels", "image_labels",
           "patch_cover", "probe_task", "scene_features", "scene_labels", "scene_probe", "task_targets"]
