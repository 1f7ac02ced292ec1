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

import torch
from tqdm.auto import tqdm

from ..config.choices import SCENE_TASKS
from ..data.labelled import IMAGE_TASKS, scene_arrays
from ..data.scenes import SPLIT_SEEDS, TASK_KIND, SceneLabels, scene_labels, task_targets
from ..errors import GMAEError
from .probe import (
    POOLS, PROTOCOLS, encode_tokens, knn_accuracy, linear_probe, linear_settings, mae_linear_probe, pool_tokens,
)


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
               k: int = 20, T: float = 0.07, epochs: int = 100, seed: int = 0, linear: dict | None = None) -> dict:
    """Linear-probe, kNN and chance accuracy of one task from precomputed features (rows as the labels).

    ``linear``: the cached linear probe's other settings (batch_size, blr, weight_decay, warmup_epochs), or
    for MAE's protocol ``{"protocol": "mae", "encoder": ..., "pool": ..., "device": ..., settings}``: the
    head then trains on the encoder's features of augmented images (image-level tasks only)."""
    ty, vy, num_classes, names = task_targets(task, train, val)
    ty, vy = torch.from_numpy(ty), torch.from_numpy(vy)
    tk, vk = ty >= 0, vy >= 0
    if tk.sum() < 2 or vk.sum() < 1:
        raise GMAEError(f"too few images for the {task} task ({int(tk.sum())} train / {int(vk.sum())} val "
                        "have a valid label); use more images")
    ty, vy = ty[tk], vy[vk]
    linear = dict(linear or {})
    protocol, extra = linear.pop("protocol", "cached"), {}
    with torch.random.fork_rng(devices=[]):
        if protocol == "cached":
            linear_acc = linear_probe(train_f[tk], ty, val_f[vk], vy, num_classes, epochs=epochs, seed=seed, **linear)
        else:
            if task not in IMAGE_TASKS:
                raise GMAEError(f"the {task} task reads marked points: only --protocol cached probes it "
                                f"(MAE's protocol takes {', '.join(IMAGE_TASKS)})")
            encoder, pool, device, progress = (linear.pop(key) for key in ("encoder", "pool", "device", "progress"))
            images = scene_arrays(task, train, val, augment=True, progress=progress)
            out = mae_linear_probe(encoder, images[0], images[1], num_classes, pool, epochs=epochs, seed=seed,
                                   device=device, progress=progress, val_features=(val_f[vk], vy), **linear)
            linear_acc = out["linear_acc"]
            extra = {"linear_batch": out["linear_batch"], "linear_lr": out["linear_lr"],
                     "linear_steps": out["linear_steps"], "linear_warmup_epochs": out["linear_warmup_epochs"]}
    knn = knn_accuracy(train_f[tk], ty, val_f[vk], vy, k=k, T=T, num_classes=num_classes)
    majority = int(torch.bincount(ty, minlength=num_classes).argmax())
    return {"task": task, "kind": TASK_KIND[task], "linear_acc": linear_acc, "knn_acc": knn, "protocol": protocol,
            **extra,
            "chance": (vy == majority).float().mean().item(), "num_train": int(tk.sum()), "num_val": int(vk.sum()),
            "num_classes": int(num_classes), "classes": names, "dim": int(train_f.shape[1])}


def scene_probe(encoder, data: str = "sprites", tasks=SCENE_TASKS, labels: tuple[SceneLabels, SceneLabels] | None = None,
                train_images: int | None = None, val_images: int | None = None, batch_size: int = 128,
                device: str | torch.device = "cpu", pool: str = "cls", k: int = 20, T: float = 0.07,
                epochs: int | None = None, seed: int = 0, progress: bool = True, protocol: str = "cached",
                linear_batch: int | None = None, blr: float | None = None, weight_decay: float | None = None,
                warmup_epochs: float | None = None) -> dict:
    """{task: scores} of a frozen ``encoder`` on the scene ``tasks`` (see the module docstring).

    ``labels``: a (train, val) pair from :func:`scene_labels` to reuse across
    encoders; by default made here from ``data`` and the encoder's image and
    patch size. ``protocol`` and the linear settings: as :func:`gmae.evaluate.probe.probe`'s
    (``protocol="mae"`` takes the image-level tasks only).
    """
    unknown = [t for t in tasks if t not in SCENE_TASKS]
    if unknown:
        raise GMAEError(f"unknown scene task {unknown[0]!r}; choose from {', '.join(SCENE_TASKS)}")
    if protocol not in PROTOCOLS:
        raise GMAEError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    points = [t for t in tasks if t not in IMAGE_TASKS]
    if protocol == "mae" and points:
        raise GMAEError(f"the {points[0]} task reads marked points: only --protocol cached probes it; with "
                        f"--protocol mae give --task {' or --task '.join(IMAGE_TASKS)}")
    settings = linear_settings(protocol, epochs=epochs, batch_size=linear_batch, blr=blr, weight_decay=weight_decay,
                               warmup_epochs=warmup_epochs)
    epochs = settings.pop("epochs")
    if protocol == "mae":
        settings.update(protocol="mae", encoder=encoder.to(device), pool=pool, device=device, progress=progress)
    img, patch = encoder.patch_embed.img_size, encoder.patch_embed.patch_size
    if labels is None:
        labels = (scene_labels(data, "train", img, patch, train_images, progress),
                  scene_labels(data, "val", img, patch, val_images, progress))
    train, val = labels
    encoder = encoder.to(device)
    train_f = scene_features(encoder, train, pool, batch_size, device, progress, "train features")
    val_f = scene_features(encoder, val, pool, batch_size, device, progress, "val features")
    return {t: {**probe_task(t, train_f[t], val_f[t], train, val, k, T, epochs, seed, settings), "data": train.data,
                "feature": pool if t in ("count", "shape") else "patch tokens at the marked points"}
            for t in tasks}


__all__ = ["probe_task", "scene_features", "scene_probe"]


def format_scene_table(results: dict[str, dict], tasks, source: str, train_images: int, val_images: int,
                       protocol: str, epochs: int, k: int, T: float) -> str:
    """`gmae probe --data deadleaves|sprites`'s table of :func:`scene_probe` results ({encoder label: {task:
    result}}): a line saying how the probes ran, then per task each encoder's linear and kNN accuracy and the
    chance level."""
    lines = [f"{source} scene probes: {train_images} train / {val_images} val images "
             f"(seeds {SPLIT_SEEDS['train']} / {SPLIT_SEEDS['val']}); linear: BatchNorm + linear, "
             f"{'SGD on cached features' if protocol == 'cached' else 'LARS (MAE protocol)'}, "
             f"{epochs} epochs; kNN: cosine, k={k}, T={T}; chance: the train split's most common class"]
    head = "".join(f"{f'{name} {label}':>24}" for name in ("linear", "kNN") for label in results)
    lines.append(f"{'task':<34}{head}{'chance':>10}")
    for task in tasks:
        first = results[next(iter(results))][task]
        row = f"{task} ({first['kind']}, {first['num_classes']} classes)"
        cells = "".join(f"{100 * r[task][key]:23.1f}%" for key in ("linear_acc", "knn_acc") for r in results.values())
        lines.append(f"{row:<34}{cells}{100 * first['chance']:9.1f}%")
    return "\n".join(lines)
