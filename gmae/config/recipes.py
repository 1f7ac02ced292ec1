"""Named recipes: published training settings, each value with where it comes from.

A recipe is for one command (``pretrain``, ``finetune`` or ``probe``) and holds values keyed by that
command's argparse destinations, which are the config fields' names; ``--recipe NAME`` makes them the parser's
defaults, so that a flag typed on the command line still wins (gmae.cli). ``pretrain_configs(NAME, **settings)``
builds the configs, for ``gmae pretrain`` (with the flags typed as settings) and from Python alike (and
``gmae.train.pretrain(recipe=NAME, ...)`` trains them). ``gmae recipes`` lists them, ``gmae recipes NAME`` prints
each value with its citation.

Citations name MAE's files with their line numbers (facebookresearch/mae at efb2a80: ``PRETRAIN.md``,
``FINETUNE.md``, ``main_pretrain.py``, ``main_finetune.py``, ``main_linprobe.py``, ``engine_pretrain.py``), the
GMAE paper by section, the GMAE authors' public code (tekotan/video-gmae at c630810: their video GMAE, which holds
the image model and an ImageNet branch; its shipped configs are the video model's, so a setting only a command line
could give is "not recorded"), legacy gsplat (v0.1.1) for what the authors' renderer did, or "gmae: why" for this
project's own choices. Torch-free: ``gmae recipes`` and ``--help`` load no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dataclasses

from . import TRAIN_PRESETS, ModelConfig, TrainConfig, model_config, train_config
from ..errors import GMAEError

COMMANDS = ("pretrain", "finetune", "probe")

# Where the numbers come from.
PRETRAIN_MD = "MAE PRETRAIN.md"
FINETUNE_MD = "MAE FINETUNE.md"
MAIN_PRETRAIN = "MAE main_pretrain.py"
MAIN_FINETUNE = "MAE main_finetune.py"
MAIN_LINPROBE = "MAE main_linprobe.py"
PAPER = "GMAE paper"
# The GMAE authors' public code (their video model, with the image model the recipe follows), at commit c630810.
AUTHORS_REPO = "tekotan/video-gmae@c630810"
AUTHORS_MODEL = f"{AUTHORS_REPO} vidgmae/models/components/mae/models_mae.py"
AUTHORS_MODULE = f"{AUTHORS_REPO} vidgmae/models/gmae.py"  # the training module (loss, optimiser, schedule)
AUTHORS_CONFIG = f"{AUTHORS_REPO} configs/gmae_ema.yaml"  # the config the repository's README says all runs use
AUTHORS_DATA = f"{AUTHORS_REPO} vidgmae/datamodules/components/imagenet_dataset.py"
AUTHORS_TRAINER = f"{AUTHORS_REPO} configs/trainer/default.yaml"
# Legacy gsplat, the release whose API the authors' code calls.
LEGACY_GSPLAT = "nerfstudio-project/gsplat@v0.1.1 gsplat/cuda/csrc"


@dataclass(frozen=True)
class Recipe:
    name: str
    command: str  # one of COMMANDS
    summary: str  # one line
    values: dict[str, tuple[object, str]]  # {argparse dest: (value, citation)}
    notes: tuple[str, ...] = field(default=())  # what it does not reproduce, and why

    def settings(self) -> dict[str, object]:
        """{dest: value}: what --recipe sets as the command's defaults."""
        return {dest: value for dest, (value, _) in self.values.items()}


def _tuple_or_value(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------- pre-training

# MAE's ImageNet pre-training (PRETRAIN.md's command, lines 5-16, and main_pretrain.py's defaults), for a GMAE
# model: the values every MAE-scheduled recipe below shares.
_MAE_SCHEDULE: dict[str, tuple[object, str]] = {
    "model": ("gmae", "gmae: the recipe trains a GMAE (Gaussian decoder) with MAE's schedule; --model mae for MAE"),
    "epochs": (800, f"{PRETRAIN_MD} line 13 (--epochs 800)"),
    "warmup_epochs": (40, f"{PRETRAIN_MD} line 14 (--warmup_epochs 40)"),
    "batch_size": (4096, f"{PRETRAIN_MD} line 18 (effective batch 64 x 8 nodes x 8 GPUs = 4096)"),
    "micro_batch": (64, f"{PRETRAIN_MD} line 9 (--batch_size 64 per GPU; accumulation makes up the rest, line 18)"),
    "blr": (1.5e-4, f"{PRETRAIN_MD} line 15 (--blr 1.5e-4; lr = blr x 4096 / 256, line 19)"),
    "weight_decay": (0.05, f"{PRETRAIN_MD} line 15 (--weight_decay 0.05)"),
    "betas": ((0.9, 0.95), f"{MAIN_PRETRAIN} line 180 (AdamW betas=(0.9, 0.95))"),
    "mask_ratio": (0.75, f"{PRETRAIN_MD} line 12 (--mask_ratio 0.75)"),
    "loss": ("masked", f"gmae: {PRETRAIN_MD} line 11 trains MAE with --norm_pix_loss, but for GMAE the paper's "
                       "per-patch normalised loss is far worse (ImageNet ft 76.9 vs 83.2, its loss ablation); the pixel "
                       f"loss on the masked patches is MAE's baseline ({PRETRAIN_MD} line 20) and the paper's"),
    "crop_scale": ((0.2, 1.0), f"{MAIN_PRETRAIN} line 124 (RandomResizedCrop scale=(0.2, 1.0)); flip: line 125, "
                               "always on in gmae"),
    "interpolation": ("bicubic", f"{MAIN_PRETRAIN} line 124 (interpolation=3, bicubic)"),
    "input_norm": ("imagenet", f"{MAIN_PRETRAIN} line 127 (Normalize with ImageNet's mean and std)"),
    "clip_grad": (0.0, "MAE engine_pretrain.py line 57 (the loss scaler is called without clip_grad: no clipping)"),
    "num_gaussians": (256, f"{PAPER}'s k = 256 (the authors' code's too: {AUTHORS_CONFIG} line 240)"),
    "max_scale": (1.0, f"{PAPER}: c = 1, its default and best (its scale ablation)"),
}


def _pretrain(name: str, summary: str, preset: tuple[str, str], base: dict, **values) -> Recipe:
    return Recipe(name, "pretrain", summary, {"preset": preset, **base, **values})


_VIT_B = ("base", f"{PRETRAIN_MD} line 24 (--model mae_vit_base_patch16: ViT-B/16, 224 px)")
_VIT_L = ("large", f"{PRETRAIN_MD} line 10 (--model mae_vit_large_patch16: ViT-L/16, 224 px)")
_PAPER_EPOCHS = (400, f"{PAPER}, Evaluation on Standard Vision Tasks (ViT-B pre-trained for 400 epochs, mask 0.75)")
_PAPER_LOSS = ("masked", f"{PAPER}, Method: MSE 'on the originally masked pixels'")

_AUTHORS_NOT_REPRODUCED = (
    "loss summed over the batch (tekotan/video-gmae vidgmae/models/gmae.py lines 256-317): a bug (the loss, and so "
    "the step size, grows with the batch); gmae averages",
    "decoder position embedding gathered from the table that includes the cls row (vidgmae/models/components/mae/"
    "models_mae.py lines 504-513: off by one, patch j gets patch j-1's row): a bug, not copied",
    "batch size, epochs, warmup and mask ratio of an ImageNet run: not recorded in the repository, whose configs are "
    "the video model's; MAE's effective batch and warmup, the paper's 400 epochs and mask 0.75",
    "the linear learning-rate scaling applies there only on more than one device (vidgmae/models/gmae.py line "
    "1245); gmae always scales lr = blr x batch / 256",
)

# Why the tiny preset trains as it does (its values: gmae.config.TRAIN_PRESETS['tiny']).
_TINY_WHY = {
    "steps": "tuned to learn recognisable dead-leaves renders in a few minutes on 2 cores",
    "batch_size": "small batches, many steps on CPU",
    "blr": "lr = 1e-3 at batch 16 (MAE's blr leaves mean-colour renders)",
    "warmup_steps": "a short warmup for a short run",
    "checkpoint_every": "three checkpoints in a 1200-step run",
}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("tiny", "pretrain", "the CPU default: the tiny preset on dead-leaves in a few minutes on 2 cores", {
        "preset": ("tiny", "gmae: the CPU-sized model (gmae.config.PRESETS['tiny'])"),
        # the values are TRAIN_PRESETS['tiny']'s, so that the preset and the recipe cannot drift apart
        **{dest: (value, f"gmae: gmae.config.TRAIN_PRESETS['tiny']: {_TINY_WHY[dest]}")
           for dest, value in TRAIN_PRESETS["tiny"].items()},
    }),
    _pretrain("mae-pretrain-vit-b", "MAE's ImageNet pre-training (800 epochs, batch 4096) of a GMAE ViT-B/16",
              _VIT_B, _MAE_SCHEDULE),
    _pretrain("mae-pretrain-vit-l", "MAE's ImageNet pre-training (800 epochs, batch 4096) of a GMAE ViT-L/16",
              _VIT_L, _MAE_SCHEDULE),
    _pretrain("gmae-paper-vit-b", "the GMAE paper's ViT-B/16: 400 epochs, masked loss, c = 1, k = 256; else MAE's",
              _VIT_B, _MAE_SCHEDULE, epochs=_PAPER_EPOCHS, loss=_PAPER_LOSS),
    _pretrain("gmae-paper-vit-l", "the paper's recipe (reported for ViT-B) on ViT-L/16; else MAE's",
              _VIT_L, _MAE_SCHEDULE, epochs=_PAPER_EPOCHS, loss=_PAPER_LOSS),
    Recipe("authors-code", "pretrain", "the GMAE authors' code's choices (ViT-B/16), without its bugs", {
        "preset": ("base", f"{AUTHORS_MODEL} lines 729-742 and 778 (mae_vit_base_patch16: ViT-B/16, decoder 512 wide, "
                           "8 blocks); no shipped config selects it (their configs are the video model's)"),
        "model": ("gmae", f"{AUTHORS_MODULE} lines 84-95 and 376-385 (the ImageNet branch: an MAE encoder with the "
                          "Gaussian decoder)"),
        "epochs": (400, f"{PAPER}, Evaluation on Standard Vision Tasks (400 epochs; the authors' runs are not "
                        f"recorded: {AUTHORS_TRAINER} line 6 has max_epochs 100 for the video model)"),
        "warmup_epochs": (40, f"{PRETRAIN_MD} line 14 (MAE's; {AUTHORS_CONFIG} line 143 has warmup_epochs 5 with a "
                              "cosine stepped once per epoch, lines 146 and 208, for the video model)"),
        "batch_size": (4096, f"{PRETRAIN_MD} line 18 (MAE's effective batch; the authors' ImageNet batch is not "
                             f"recorded: {AUTHORS_CONFIG} line 131 has 8 per GPU for the video model)"),
        "micro_batch": (64, f"{PRETRAIN_MD} line 9 (64 per GPU)"),
        "blr": (1e-3, f"{AUTHORS_CONFIG} line 138 (lr: 0.001, scaled by batch / 256: {AUTHORS_MODULE} lines "
                      "1244-1256, 1306-1308)"),
        "weight_decay": (0.05, f"{AUTHORS_CONFIG} line 145 (weight_decay: 0.05; none on 1-d parameters, "
                               f"{AUTHORS_MODULE} line 1305)"),
        "betas": ((0.9, 0.95), f"{AUTHORS_MODULE} lines 1306-1308 (AdamW, betas=(0.9, 0.95))"),
        "mask_ratio": (0.75, f"{PAPER}, Evaluation on Standard Vision Tasks (mask ratio 0.75; {AUTHORS_CONFIG} "
                             "line 222 has 0.90, for the video model)"),
        "loss": ("all", f"{AUTHORS_MODULE} lines 307-311 (MSE over every pixel of the image, against the [0, 1] "
                        "image, lines 242-254; the paper says masked)"),
        "input_norm": ("imagenet", f"{AUTHORS_DATA} lines 104-105 and 140 (timm's ImageNet mean and std)"),
        "crop_scale": ((0.08, 1.0), f"{AUTHORS_DATA} line 137 (RandomResizedCrop with no scale given: torchvision's "
                                    "default (0.08, 1))"),
        "interpolation": ("bicubic", f"{AUTHORS_DATA} line 137 (interpolation=3, bicubic)"),
        "clip_grad": (2.0, f"{AUTHORS_TRAINER} line 24 (gradient_clip_val: 2.0)"),
        "precision": ("fp32", f"{AUTHORS_TRAINER} line 25 (precision: 32)"),
        "ema": (0.999, f"{AUTHORS_CONFIG} lines 40-45 (EMA callback, decay 0.999; README line 77: all runs use "
                       "this config)"),
        "num_gaussians": (256, f"{AUTHORS_CONFIG} line 240 (vocab_size: 256, the number of query tokens)"),
        "max_scale": (1.0, f"{AUTHORS_CONFIG} line 241 (scale_factor: 1.0) and {AUTHORS_MODEL} line 550"),
        "camera": ("authors", f"{AUTHORS_MODEL} lines 311-328 and 582-596 (fov 90 degrees, focal W/2, camera at "
                              "t_z = 8, projmat = viewmat: orthographic centres, perspective covariance)"),
        "depth_param": ("bounded", f"{AUTHORS_MODEL} line 549 (means = 2 (sigmoid - 0.5), z included)"),
        "background": ((1.0, 1.0, 1.0), f"{AUTHORS_MODEL} lines 635-645 pass no background, which legacy gsplat "
                                        "makes white (nerfstudio-project/gsplat@v0.1.1 gsplat/rasterize.py lines "
                                        "58-59)"),
        "rotation_param": ("uniform", f"{AUTHORS_MODEL} lines 551-564 (Shoemake's uniform-rotation formula of 3 "
                                      "sigmoids, its first component sqrt(1-u1) sin 2 pi u2 in front), read by legacy "
                                      f"gsplat with that first component as w ({LEGACY_GSPLAT}/helpers.cuh line 144)"),
        "pixel_origin": ("legacy", f"{AUTHORS_MODEL} lines 582-596 (legacy ProjectGaussians, 13 arguments: gsplat "
                                   f"v0.1.0/v0.1.1 only), whose ndc2pix is 0.5 W x + 0.5 + cx ({LEGACY_GSPLAT}/"
                                   "helpers.cuh line 8) with pixel i sampled at i (forward.cu lines 275-276)"),
        "tile_cut": ("3sigma", f"{LEGACY_GSPLAT}/helpers.cuh lines 62-66 (radius ceil(3 sigma)) and forward.cu lines "
                               "116-118 (a Gaussian is listed only in the tiles that radius touches)"),
        "head_init": ("torch", f"{AUTHORS_MODEL} line 306 (initialize_weights) runs before lines 333-335 create the "
                               "Gaussian head, which keeps nn.Linear's own init"),
        "patch_bias_init": ("torch", f"{AUTHORS_MODEL} lines 357-359 (only the patch embedding's weight is re-drawn; "
                                     "its bias keeps the Conv2d default)"),
        "query_init": ("uniform", f"{AUTHORS_MODEL} lines 329-332 (the query embeddings: torch.rand, U[0, 1))"),
        "head_bias": (False, f"{AUTHORS_MODEL} lines 333-335 (linear_gaussian, bias=False: every scale then starts "
                             "around c/2)"),
        "max_alpha": (0.999, f"{LEGACY_GSPLAT}/forward.cu line 337 (alpha = min(0.999, ...); 3DGS and gmae's "
                             "default: 0.99)"),
    }, notes=_AUTHORS_NOT_REPRODUCED),
)}

# ---------------------------------------------------------------------------------------------- fine-tuning

# MAE's fine-tuning regularisers and schedule shared by every size (FINETUNE.md's commands; main_finetune.py's
# defaults for what the commands leave out).
_MAE_FINETUNE: dict[str, tuple[object, str]] = {
    "batch_size": (1024, f"{FINETUNE_MD} line 77 (effective batch 32 x 4 nodes x 8 GPUs = 1024)"),
    "weight_decay": (0.05, f"{FINETUNE_MD} line 73 (--weight_decay 0.05)"),
    "reprob": (0.25, f"{FINETUNE_MD} line 73 (--reprob 0.25)"),
    "remode": ("pixel", f"{MAIN_FINETUNE} line 90 (--remode pixel)"),
    "recount": (1, f"{MAIN_FINETUNE} line 92 (--recount 1)"),
    "mixup": (0.8, f"{FINETUNE_MD} line 73 (--mixup 0.8)"),
    "cutmix": (1.0, f"{FINETUNE_MD} line 73 (--cutmix 1.0)"),
    "mixup_prob": (1.0, f"{MAIN_FINETUNE} line 104 (--mixup_prob 1.0)"),
    "mixup_switch_prob": (0.5, f"{MAIN_FINETUNE} line 106 (--mixup_switch_prob 0.5)"),
    "mixup_mode": ("batch", f"{MAIN_FINETUNE} line 108 (--mixup_mode batch)"),
    "aa": ("rand-m9-mstd0.5-inc1", f"{MAIN_FINETUNE} line 82 (--aa rand-m9-mstd0.5-inc1, RandAugment)"),
    "smoothing": (0.1, f"{MAIN_FINETUNE} line 84 (--smoothing 0.1)"),
    "warmup_epochs": (5, f"{MAIN_FINETUNE} line 76 (--warmup_epochs 5)"),
    "global_pool": ("avg", f"{MAIN_FINETUNE} line 115 (global_pool=True) and {FINETUNE_MD} line 131"),
    "clip_grad": (0.0, f"{MAIN_FINETUNE} line 61 (--clip_grad None: no clipping)"),
}

def _regularisers_of_command(line: int, batch_source: str) -> dict[str, tuple[object, str]]:
    """The values FINETUNE.md's ViT-L and ViT-H commands repeat (the same as ViT-B's), cited at their own lines:
    the flags line and where the effective batch of 1024 comes from."""
    return {
        "batch_size": (1024, f"{FINETUNE_MD} {batch_source}"),
        **{dest: (value, f"{FINETUNE_MD} line {line} (--{dest} {value})")
           for dest, value in (("weight_decay", 0.05), ("reprob", 0.25), ("mixup", 0.8), ("cutmix", 1.0))},
    }


RECIPES.update({r.name: r for r in (
    Recipe("mae-finetune-vit-b", "finetune", "MAE's ImageNet fine-tuning of ViT-B: 100 epochs, batch 1024", {
        **_MAE_FINETUNE,
        "epochs": (100, f"{FINETUNE_MD} line 71 (--epochs 100)"),
        "blr": (5e-4, f"{FINETUNE_MD} line 72 (--blr 5e-4)"),
        "layer_decay": (0.65, f"{FINETUNE_MD} line 72 (--layer_decay 0.65)"),
        "drop_path": (0.1, f"{FINETUNE_MD} line 73 (--drop_path 0.1)"),
    }),
    Recipe("mae-finetune-vit-l", "finetune", "MAE's ImageNet fine-tuning of ViT-L: 50 epochs, batch 1024", {
        **_MAE_FINETUNE,
        **_regularisers_of_command(92, "lines 86-87 (32 per GPU x 4 nodes x 8 GPUs = 1024, as line 77)"),
        "epochs": (50, f"{FINETUNE_MD} line 90 (--epochs 50)"),
        "blr": (1e-3, f"{FINETUNE_MD} line 91 (--blr 1e-3)"),
        "layer_decay": (0.75, f"{FINETUNE_MD} line 91 (--layer_decay 0.75)"),
        "drop_path": (0.2, f"{FINETUNE_MD} line 92 (--drop_path 0.2)"),
    }),
    Recipe("mae-finetune-vit-h", "finetune", "MAE's ImageNet fine-tuning of ViT-H: 50 epochs, batch 1024", {
        **_MAE_FINETUNE,
        **_regularisers_of_command(108, "lines 102-103 (16 per GPU x 8 nodes x 8 GPUs = 1024)"),
        "epochs": (50, f"{FINETUNE_MD} line 106 (--epochs 50)"),
        "blr": (1e-3, f"{FINETUNE_MD} line 107 (--blr 1e-3)"),
        "layer_decay": (0.75, f"{FINETUNE_MD} line 107 (--layer_decay 0.75)"),
        "drop_path": (0.3, f"{FINETUNE_MD} line 108 (--drop_path 0.3)"),
    }),
    # ------------------------------------------------------------------------------------------ linear probe
    Recipe("mae-linprobe", "probe", "MAE's linear probe: BatchNorm + linear head, LARS, batch 16384, 90 epochs", {
        "protocol": ("mae", f"{MAIN_LINPROBE} lines 218-252 (BatchNorm without affine + linear head, std 0.01 "
                            "init, LARS)"),
        "batch_size": (16384, f"{FINETUNE_MD} line 150 (effective batch 512 x 4 nodes x 8 GPUs = 16384)"),
        "blr": (0.1, f"{FINETUNE_MD} line 146 (--blr 0.1)"),
        "weight_decay": (0.0, f"{FINETUNE_MD} line 147 (--weight_decay 0.0)"),
        "epochs": (90, f"{FINETUNE_MD} line 145 (--epochs 90; ViT-L/H: 50 suffice, line 155)"),
        "warmup_epochs": (10, f"{MAIN_LINPROBE} line 66 (--warmup_epochs 10)"),
        "pool": ("cls", f"{FINETUNE_MD} line 143 (--cls_token)"),
    }),
)})


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; GMAEError listing the names if there is none."""
    if name not in RECIPES:
        raise GMAEError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (gmae recipes lists them)")
    return RECIPES[name]


def recipe_defaults(name: str, command: str, dests) -> dict[str, object]:
    """{dest: value} to make `command`'s defaults, of recipe `name` for a parser whose destinations are
    `dests`. GMAEError for a recipe of another command, or a key the parser lacks."""
    recipe = get_recipe(name)
    if recipe.command != command:
        raise GMAEError(f"recipe {name!r} is for gmae {recipe.command}, not gmae {command}; "
                        f"use it there, or pick a {command} recipe (gmae recipes lists them)")
    dests = set(dests)
    unknown = [k for k in recipe.values if k not in dests]
    if unknown:
        raise GMAEError(f"recipe {name!r} sets {', '.join(unknown)}, which gmae {command} has no flag for; "
                        "the recipe table (gmae/config/recipes.py) is out of date")
    return recipe.settings()


def recipe_json(recipe: Recipe) -> dict:
    return {"name": recipe.name, "command": recipe.command, "summary": recipe.summary,
            "values": {k: _tuple_or_value(v) for k, v in recipe.settings().items()},
            "citations": {k: cite for k, (_, cite) in recipe.values.items()}, "not_reproduced": list(recipe.notes)}


# A length, warmup or accumulation given in steps replaces the recipe's in epochs (or micro-batches); both of a
# pair at once is refused. pretrain_configs applies this rule, for the command line (gmae.cli.pretrain) and Python
# alike.
SCHEDULE_PAIRS = (("steps", "epochs"), ("warmup_steps", "warmup_epochs"), ("accum_steps", "micro_batch"))


def check_schedule(given: dict[str, str]) -> None:
    """GMAEError if `given` ({setting: how it was given}) holds both settings of a SCHEDULE_PAIRS pair."""
    for a, b in SCHEDULE_PAIRS:
        if a in given and b in given:
            raise GMAEError(f"give {given[a]} or {given[b]}, not both")


def pretrain_configs(recipe: str | None = None, preset: str | None = None,
                     **settings) -> tuple[ModelConfig, TrainConfig]:
    """The (ModelConfig, TrainConfig) that ``gmae pretrain --recipe RECIPE`` builds, with `settings` (fields of
    either config, by name) applied on top as flags typed after --recipe: the same rule, the same configs.

        mcfg, tcfg = pretrain_configs("gmae-paper-vit-b", data="/data/imagenet/train", out="runs/vit-b")
        gmae.train.pretrain(mcfg, tcfg)        # or: gmae.train.pretrain(recipe="gmae-paper-vit-b", data=...)

    Without a recipe these are the preset's configs (`preset`, default tiny) with `settings`. GMAEError for a
    recipe of another command, or a setting that is no field of either config."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, object] = {}
    if recipe:
        values = {**recipe_defaults(recipe, "pretrain", {"preset", *model_fields, *train_fields}), "recipe": recipe}
    recipe_preset = values.pop("preset", None)
    preset = preset or recipe_preset or "tiny"
    check_schedule({k: k for k in settings})
    for a, b in SCHEDULE_PAIRS:
        if a in settings:
            values.pop(b, None)
    values.update(settings)
    unknown = sorted(set(values) - model_fields - train_fields)
    if unknown:
        raise GMAEError(f"{', '.join(unknown)}: not a setting of ModelConfig or TrainConfig (gmae.config)")
    return (model_config(preset, **{k: v for k, v in values.items() if k in model_fields}),
            train_config(preset, **{k: v for k, v in values.items() if k in train_fields}))


__all__ = ["COMMANDS", "RECIPES", "SCHEDULE_PAIRS", "Recipe", "check_schedule", "get_recipe", "pretrain_configs",
           "recipe_defaults", "recipe_json"]
