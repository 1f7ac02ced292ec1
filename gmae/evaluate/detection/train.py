"""Fine-tuning the detector, ViTDet's recipe at small scale: AdamW with layer-wise lr decay, linear warmup and
two step decays, drop path; COCO AP on held-out images at the end.

The per-step work is one function, :func:`detection_step` (batch -> loss and its parts);
:class:`DetectionTask` runs it on the training engine (gmae.train.engine), as pre-training and fine-tuning
run theirs, and :func:`train_detector` is the Python entry.

ViTDet's schedule (``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` lines 23-35 at detectron2
02b5c4e): linear warmup from 0.001 x lr over 250 of 184375 iterations, then x0.1 at 88.9 % and x0.01 at
96.3 % of the run; AdamW lr 1e-4 at batch 64, betas (0.9, 0.999), weight decay 0.1
(``configs/common/optim.py`` lines 18-28), layer decay 0.7 for ViT-B. Its large-scale-jitter augmentation is
replaced here by horizontal flips: the generated objects already come at every scale the images hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ...data.stream import SeededStream, StepBatchSampler
from ...runtime.distributed import Context
from ...train.engine import Engine, Task
from .data import DetectionData
from .metric import evaluate
from .model import build_detector, param_groups

__all__ = ["DetectionRecipe", "DetectionTask", "batch_of", "detection_step", "lr_factor", "predict", "train_detector"]

#: Where ViTDet's two lr steps fall, as fractions of the run (163889 and 177546 of 184375 iterations).
STEP_FRACTIONS = (163889 / 184375, 177546 / 184375)


@dataclass
class DetectionRecipe:
    """The fine-tuning settings (ViTDet's values where they carry over to small images; see the module
    docstring). `lr` is the peak learning rate at `batch_size`, not scaled."""

    # the run (ViTDet: 184375 iterations at batch 64)
    steps: int = 300
    batch_size: int = 8
    seed: int = 0
    # AdamW with ViTDet-B's lr, weight decay and layer decay
    lr: float = 1e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.7
    # ViTDet's warmup is 250 iterations from 0.001 x lr; here a twelfth of the run at most
    warmup_steps: int = 25
    warmup_factor: float = 0.001
    # the model: ViT-B's drop path, the pyramid's and heads' width
    drop_path: float = 0.1
    channels: int = 64
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

    def __init__(self, model: torch.nn.Module, recipe: DetectionRecipe, device: torch.device):
        self.model, self.recipe, self.device = model, recipe, device
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


def train_detector(encoder, train: DetectionData, val: DetectionData, recipe: DetectionRecipe | None = None,
                   device: str | torch.device = "cpu", log=None) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a detector built on `encoder` (taken over) on `train`, on the training engine; (model, results)
    where results has COCO AP / AP50 / AP75 for "bbox" and "segm" on `val`, the last step's losses and the
    seconds taken. `log(step, losses, lr)` is called every 10 steps and at the last."""
    recipe = recipe or DetectionRecipe()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the new layers' initial weights
        model = build_detector(encoder, len(train.categories), int(train.images[0].shape[-1]),
                               channels=recipe.channels, drop_path=recipe.drop_path).to(device)
        groups = param_groups(model, recipe.weight_decay, recipe.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))
        loader = DataLoader(SeededStream(_Images(train, recipe.flip), recipe.seed),
                            batch_sampler=StepBatchSampler(recipe.batch_size, 0, recipe.steps), collate_fn=_as_lists)

        def lr_at(step: int) -> float:
            return recipe.lr * lr_factor(step, recipe.steps, recipe.warmup_steps, recipe.warmup_factor)

        class Logged(DetectionTask):
            def after_step(self, step, output, applied, lr):
                if log is not None and (step % 10 == 0 or step == recipe.steps - 1):
                    log(step, output, lr)
                return {}

        task = Logged(model, recipe, device)
        engine = Engine(model, optimizer, recipe, Context(device=device), lr_at, progress=False, desc="detect")
        start = time.perf_counter()
        model.train()
        engine.run(task, loader)
        seconds = time.perf_counter() - start
    results = evaluate(val, predict(model, val))
    return model, {**results, "losses": task.last, "train_seconds": seconds}
