"""Fine-tuning the detector, ViTDet's recipe at small scale: AdamW with layer-wise lr decay, linear warmup and
two step decays, drop path; COCO AP on held-out images at the end.

The per-step work is one function, :func:`detection_step` (batch -> loss and its parts);
:class:`DetectionTask` runs it on the training engine (gmae.train.engine), as pre-training and fine-tuning
run theirs, and :func:`train_detector` is the Python entry.

ViTDet's schedule (``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` lines 23-35 at detectron2
02b5c4e): linear warmup from 0.001 x lr over 250 of 184375 iterations, then x0.1 at 88.9 % and x0.01 at
96.3 % of the run; AdamW lr 1e-4 at batch 64, betas (0.9, 0.999), weight decay 0.1
(``configs/common/optim.py`` lines 18-28), layer decay 0.7 for ViT-B. Here the schedule's shape, the betas,
weight decay and layer decay are ViTDet's; the lr is 1e-3 at batch 8 (:class:`DetectionRecipe` says why), and
ViTDet's large-scale-jitter augmentation is replaced by horizontal flips: the generated objects already come at
every scale the images hold.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ...config import (
    DETECT_RESUMABLE, DETECTION_VAL_START, DetectConfig, ModelConfig, as_dict, config_from_dict, model_config,
)
from ...data.stream import SeededStream, StepBatchSampler
from ...errors import GMAEError
from ...io.checkpoint import DETECT_FORMAT, run_state, weights_line
from ...io.files import checkpoint_path
from ...io.loader import load
from ...io.runs import prepare_metrics, refuse_changes, resume_from, resumed_config, say
from ...runtime import distributed
from ...runtime.distributed import Context
from ...runtime.stopping import Stopped
from ...train.engine import Engine, Task, run_folder
from ..probe import random_encoder
from .data import DetectionData, generated_set, read_coco
from .metric import evaluate
from .model import build_detector, param_groups

__all__ = ["DetectionRecipe", "DetectionTask", "batch_of", "detect", "detection_data", "detection_step", "lr_factor",
           "predict", "train_detector"]

#: Where ViTDet's two lr steps fall, as fractions of the run (163889 and 177546 of 184375 iterations).
STEP_FRACTIONS = (163889 / 184375, 177546 / 184375)


@dataclass
class DetectionRecipe:
    """The fine-tuning settings (ViTDet's values where they carry over to small images; see the module
    docstring). `lr` is the peak learning rate at `batch_size`, not scaled."""

    # the run (ViTDet: 184375 iterations at batch 64)
    steps: int = 600
    batch_size: int = 8
    seed: int = 0
    # AdamW with ViTDet-B's weight decay and layer decay; its lr, 1e-4 at batch 64 over 184375 iterations, learns
    # about half as fast as 1e-3 in a 600-step run at batch 8 (AP^box 0.086 vs 0.164 on sprites, docs/evaluation.md)
    lr: float = 1e-3
    weight_decay: float = 0.1
    layer_decay: float = 0.7
    # ViTDet's warmup is 250 iterations from 0.001 x lr; here a twelfth of the run at most
    warmup_steps: int = 25
    warmup_factor: float = 0.001
    # the model: ViT-B's drop path, the pyramid's and heads' width
    drop_path: float = 0.1
    channels: int = 64
    # box-head proposals sampled per image (ViTDet's 512 at COCO's 1024 px: detectron2 at 163549b,
    # configs/common/models/mask_rcnn_fpn.py line 54, which mask_rcnn_vitdet.py builds on; the generated images
    # hold 2-30 objects in 64 px, and the box head's cost grows with this)
    rois_per_image: int = 32
    # augmentation: random horizontal flips
    flip: bool = True


def lr_factor(step: int, steps: int, warmup_steps: int, warmup_factor: float = 0.001) -> float:
    """The multiplier of the peak lr at `step` (0-based) of `steps`: ViTDet's warmup and two x0.1 steps."""
    decay = 0.1 ** sum(step >= f * steps for f in STEP_FRACTIONS)
    if step < warmup_steps:
        alpha = step / warmup_steps
        return decay * (warmup_factor * (1 - alpha) + alpha)
    return decay


def batch_of(data: DetectionData, indices, flip: torch.Tensor | None = None):
    """(images as float [0, 1] tensors, targets) of `indices`; image i mirrored left-right where `flip[i]`,
    its boxes and masks with it."""
    images, targets = [], []
    for j, i in enumerate(indices):
        image, target = data.images[i].float() / 255, dict(data.targets[i])
        if flip is not None and flip[j]:
            width = image.shape[-1]
            image, boxes = image.flip(-1), target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            target["masks"] = target["masks"].flip(-1)
        images.append(image)
        targets.append(target)
    return images, targets


def detection_step(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's loss: `batch` is (images, targets) as :func:`batch_of` gives them; returns the sum
    of Mask R-CNN's losses (to backpropagate) and each of them as a float (to log)."""
    images, targets = batch
    losses = model(images, targets)
    return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, data: DetectionData, batch_size: int = 16) -> list[dict]:
    """The detector's outputs on every image of `data` (eval mode), on the CPU."""
    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        images, _ = batch_of(data, range(start, min(start + batch_size, len(data))))
        out += [{k: v.cpu() for k, v in o.items()} for o in model([im.to(device) for im in images])]
    return out


class _Images:
    """The training images as a SeededStream source (gmae.data.stream): sample g is image perm(seed, epoch)[pos],
    mirrored where its own draw says so; so the batches of step s are a function of (seed, s), as in
    pre-training and fine-tuning, and a run resumes exactly."""

    shuffle = True

    def __init__(self, data: DetectionData, flip: bool):
        self.data, self.flip = data, flip

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int, rng):
        flip = torch.tensor([bool(self.flip and rng.random() < 0.5)])
        images, targets = batch_of(self.data, [index], flip)
        return images[0], targets[0]


def _as_lists(samples):
    """A DataLoader batch of (image, target) samples as (images, targets): Mask R-CNN takes lists."""
    images, targets = zip(*samples)
    return list(images), list(targets)


class DetectionTask(Task):
    """Detection fine-tuning on the training engine (gmae.train.engine): Mask R-CNN's summed loss of each batch;
    each of its parts in the metrics."""

    def __init__(self, model: torch.nn.Module, recipe: DetectionRecipe, device: torch.device, optimizer=None,
                 run_config: dict | None = None):
        self.model, self.recipe, self.device = model, recipe, device
        self.optimizer, self.run_config = optimizer, run_config
        self.batch_size, self.last = recipe.batch_size, {}

    def prepare(self, batch, step):
        images, targets = batch
        torch.manual_seed(self.recipe.seed * 1_000_003 + step)  # drop-path masks: a function of (seed, step)
        return ([im.to(self.device) for im in images],
                [{k: v.to(self.device) for k, v in t.items()} for t in targets])

    def loss(self, net, micro, scale):
        total, self.last = detection_step(net, micro)
        return total * scale, self.last

    def log(self, step, output):
        return {k: round(v, 5) for k, v in output.items()}

    def state(self, step):
        return run_state(DETECT_FORMAT, step, self.run_config, self.model, self.optimizer)


def _detector(encoder, train: DetectionData, recipe: DetectionRecipe, image_size: int, device):
    """(detector on `encoder` for `train`'s categories, its AdamW with ViTDet's parameter groups), as `recipe`
    says; the caller seeds the new layers' weights."""
    model = build_detector(encoder, len(train.categories), image_size, channels=recipe.channels,
                           drop_path=recipe.drop_path, box_batch_size_per_image=recipe.rois_per_image).to(device)
    groups = param_groups(model, recipe.weight_decay, recipe.layer_decay)
    return model, torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


def _loader(train: DetectionData, recipe: DetectionRecipe, start: int, ctx: Context) -> DataLoader:
    """This process's batches of steps `start` .. recipe.steps - 1: functions of (seed, step), sliced by rank."""
    return DataLoader(SeededStream(_Images(train, recipe.flip), recipe.seed),
                      batch_sampler=StepBatchSampler(recipe.batch_size, start, recipe.steps - start, ctx.rank,
                                                     ctx.world_size), collate_fn=_as_lists)


def _lr_at(recipe: DetectionRecipe, step: int) -> float:
    """The lr of `step`: the recipe's peak times ViTDet's warmup and step decays (lr_factor)."""
    return recipe.lr * lr_factor(step, recipe.steps, recipe.warmup_steps, recipe.warmup_factor)


def train_detector(encoder, train: DetectionData, val: DetectionData, recipe: DetectionRecipe | None = None,
                   device: str | torch.device = "cpu", log=None) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a detector built on `encoder` (taken over) on `train`, on the training engine; (model, results)
    where results has COCO AP / AP50 / AP75 for "bbox" and "segm" on `val`, the last step's losses and the
    seconds taken. `log(step, losses, lr)` is called every 10 steps and at the last."""
    recipe = recipe or DetectionRecipe()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the new layers' initial weights
        model, optimizer = _detector(encoder, train, recipe, int(train.images[0].shape[-1]), device)
        loader = _loader(train, recipe, 0, Context(device=device))

        class Logged(DetectionTask):
            def after_step(self, step, output, applied, lr):
                if log is not None and (step % 10 == 0 or step == recipe.steps - 1):
                    log(step, output, lr)
                return {}

        task = Logged(model, recipe, device)
        engine = Engine(model, optimizer, recipe, Context(device=device), partial(_lr_at, recipe), progress=False,
                        desc="detect")
        start = time.perf_counter()
        model.train()
        engine.run(task, loader)
        seconds = time.perf_counter() - start
    results = evaluate(val, predict(model, val))
    return model, {**results, "losses": task.last, "train_seconds": seconds}


# --------------------------------------------------------------------------- gmae detect


def _one_category(data: DetectionData) -> DetectionData:
    """`data` with every object labelled 1, "object" (class-agnostic detection)."""
    targets = [{**t, "labels": torch.ones_like(t["labels"])} for t in data.targets]
    return DetectionData(data.images, targets, [{"id": 1, "name": "object"}], data.image_ids, data.file_names)


def detection_data(dcfg: DetectConfig) -> tuple[DetectionData, DetectionData]:
    """(train, val) of `dcfg`: generated images (train from index 0, val from DETECTION_VAL_START), or a COCO
    file whose last `val_images` images are the val set unless `val_json` names one."""
    if not dcfg.data_json:
        sets = [generated_set(dcfg.data, dcfg.image_size, n, seed=0, start=start, class_agnostic=dcfg.class_agnostic)
                for n, start in ((dcfg.train_images, 0), (dcfg.val_images, DETECTION_VAL_START))]
        return sets[0], sets[1]
    data = read_coco(dcfg.data_json, dcfg.images)
    if dcfg.val_json:
        train, val = data, read_coco(dcfg.val_json, dcfg.val_dir or dcfg.images)
        if [c["name"] for c in val.categories] != [c["name"] for c in train.categories]:
            raise GMAEError(f"the categories of {dcfg.val_json} differ from those of {dcfg.data_json}; give a val "
                            "file of the same categories, in the same order")
    else:
        if dcfg.val_images >= len(data):
            raise GMAEError(f"--val-images {dcfg.val_images} leaves no training image of the {len(data)} in "
                            f"{dcfg.data_json}; give a smaller --val-images, or --val-json")
        cut = len(data) - dcfg.val_images
        train, val = data.subset(range(cut)), data.subset(range(cut, len(data)))
    return (_one_category(train), _one_category(val)) if dcfg.class_agnostic else (train, val)


def _encoder(dcfg: DetectConfig):
    """(encoder, its ModelConfig) the detector starts from: the checkpoint's, or fresh weights drawn with the
    run's seed (the checkpoint's architecture; without one, the tiny preset's at the image size)."""
    if dcfg.checkpoint:
        encoder, mcfg = load(dcfg.checkpoint, "encoder", raw=dcfg.raw_weights, input_norm=dcfg.input_norm or None)
        if not dcfg.random_init:
            if line := weights_line(encoder.loaded_weights, dcfg.raw_weights):
                say(line)
            return encoder, mcfg
    elif dcfg.random_init:
        mcfg = model_config("tiny", img_size=dcfg.image_size)
    else:
        raise GMAEError("detection needs an encoder: give --checkpoint, or --random-init for the baseline")
    return random_encoder(mcfg, dcfg.seed), mcfg


def detect(dcfg: DetectConfig, resume: bool | str = False, progress: bool = True,
           changes: tuple[str, ...] = DETECT_RESUMABLE, given: dict[str, str] | None = None) -> dict | None:
    """Fine-tune a detector on `dcfg`'s encoder and data on the training engine (checkpoints, metrics.jsonl, the
    signal stop, torchrun) into ``dcfg.out``; then the first process scores COCO AP on the val set and writes
    ``results.json``. Returns the results (None on the other processes of a torchrun job).

    ``resume`` (True, or "auto": only if there is a checkpoint) continues the newest checkpoint in ``dcfg.out``
    with its saved settings, except the ``changes`` fields (from DETECT_RESUMABLE); ``given`` ({setting: flag}
    of a command line) makes it refuse a typed setting that contradicts the saved one. A stop signal raises
    :class:`gmae.runtime.stopping.Stopped` after that step's checkpoint.
    """
    with run_folder(dcfg.out, dcfg.dist_timeout):
        return _detect(dcfg, resume, progress, changes, given or {})


def _detect(dcfg: DetectConfig, resume, progress: bool, changes: tuple[str, ...], given: dict[str, str]):
    out = Path(dcfg.out)
    found = resume_from(out, resume, say, what="detect-checkpoint")
    state = None if found is None else found[1]
    if state is not None:
        saved = config_from_dict(DetectConfig, state["config"]["detect"])
        refuse_changes(given, DETECT_RESUMABLE, as_dict(dcfg), as_dict(saved))
        dcfg = resumed_config(saved, dcfg, changes, DETECT_RESUMABLE)
        if dcfg.steps < state["step"]:
            raise GMAEError(f"--steps {dcfg.steps} is below the checkpoint's step {state['step']}; "
                            "give a larger --steps to extend the run")
        mcfg = config_from_dict(ModelConfig, state["config"]["model"])
        encoder = random_encoder(mcfg)  # the architecture: its weights are the checkpoint's
    else:
        encoder, mcfg = _encoder(dcfg)
    train, val = detection_data(dcfg)
    ctx = distributed.init(dcfg.device, dcfg.dist_timeout)
    device = ctx.device
    if dcfg.batch_size % ctx.world_size:
        raise GMAEError(f"batch size {dcfg.batch_size} must be a multiple of the {ctx.world_size} processes")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # A saved run keeps the warmup it started with, even where its length changes on resume.
    recipe = DetectionRecipe(steps=dcfg.steps, batch_size=dcfg.batch_size, seed=dcfg.seed, lr=dcfg.lr,
                             weight_decay=dcfg.weight_decay, layer_decay=dcfg.layer_decay,
                             warmup_steps=dcfg.warmup, drop_path=dcfg.drop_path, channels=dcfg.channels,
                             rois_per_image=dcfg.rois_per_image,
                             flip=dcfg.flip)
    dcfg = replace(dcfg, warmup_steps=recipe.warmup_steps)
    torch.manual_seed(dcfg.seed)  # the new layers' initial weights
    model, optimizer = _detector(encoder, train, recipe, dcfg.image_size, device)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    # find_unused_parameters: a step in which some parameter gets no gradient (a head with nothing sampled for
    # it) runs on instead of failing DDP's check; the cost is one more pass over the graph.
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ctx.distributed else model
    if ctx.is_main:
        if state is not None:
            say(f"resumed from {found[0].name} (step {start})")
        prepare_metrics(out / "metrics.jsonl", start, warn=say)
    loader = _loader(train, recipe, start, ctx)
    run_config = {"model": as_dict(mcfg), "detect": as_dict(dcfg), "categories": train.categories}
    task = DetectionTask(model, recipe, device, optimizer, run_config)
    engine = Engine(model, optimizer, dcfg, ctx, partial(_lr_at, recipe), out, net=net, progress=progress,
                    desc="detect")
    model.train()
    try:
        loss_value = engine.run(task, loader, start)
    except Stopped:
        distributed.shutdown(ctx)
        raise
    results = None
    if ctx.is_main:
        results = {"steps": dcfg.steps, "steps_run": dcfg.steps - start, "final_loss": loss_value,
                   "num_train": len(train), "num_val": len(val), "categories": len(train.categories),
                   "encoder": "random init" if dcfg.random_init else dcfg.checkpoint,
                   "checkpoint": str(checkpoint_path(out, dcfg.steps)), "out": str(out)}
        if dcfg.evaluate:
            results = {**evaluate(val, predict(model, val)), **results}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    return results

