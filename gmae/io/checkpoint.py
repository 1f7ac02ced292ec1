"""Checkpoints: plain tensors and Python values only, written atomically, loaded without code execution.

A checkpoint is a dict
    {"format": "gmae-checkpoint", "version": 1, "step": int,
     "config": {"model": {...}, "train": {...}},
     "model": state_dict, "optimizer": state_dict | None, "rng": {"torch": ByteTensor},
     "ema": state_dict (fp32; only in runs with --ema, see gmae.model.ema),
     "online_probe": {"heads": state_dict, "optimizer": state_dict, "classes": [str]}
                     (only in runs with --online-probe, see gmae.model.online_probe)}
so `torch.load(path, weights_only=True)` reads it and nothing in it can run code.
Here: the formats' markers and writing checkpoints; reading any model file (a
checkpoint, an export or a run folder) is :func:`gmae.io.loader.load`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, config_from_dict
from ..config.choices import EXPORT_FORMATS
from ..model.ema import ema_label
from ..errors import GMAEError
from .files import list_checkpoints

FORMAT = "gmae-checkpoint"
#: A fine-tuning checkpoint's marker (gmae.evaluate.finetune writes them).
FINETUNE_FORMAT = "gmae-finetune"
#: The marker of a `gmae detect` run's checkpoints (a detector's weights, optimizer and run config).
DETECT_FORMAT = "gmae-detect"
#: The checkpoint files :func:`gmae.io.loader.load` reads by name: (marker, what the messages call them).
CHECKPOINT_FORMATS = {"checkpoint": (FORMAT, "gmae"), "finetune-checkpoint": (FINETUNE_FORMAT, "gmae fine-tune"),
                      "detect-checkpoint": (DETECT_FORMAT, "gmae detect")}

# Exports (gmae.io.export writes them, gmae.io.loader reads them; the format is described in gmae.io.export).
EXPORT_FORMAT = "gmae-export"
TIMM_FORMAT = "timm-vit"
EXPORT_VERSION = "1"
CONFIG_KEY = "gmae_model_config"
EXPORT_SUFFIXES = EXPORT_FORMATS["safetensors"]
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: Entries of MAE / timm checkpoints that are not the encoder and are dropped on load:
#: MAE's decoder (``decoder_*``) and ``mask_token``, a classifier (``head.*``) and the
#: norm after global pooling of MAE fine-tuned models (``fc_norm.*``).
DROPPED = ("decoder", "mask_token", "head.", "fc_norm.")


def save_checkpoint(state: dict, path: str | Path, keep: int | None = None) -> Path:
    """Write `state` to `path` atomically: a temporary file, fsync, then rename.

    A crash mid-write leaves the previous checkpoints untouched. With `keep`,
    only the newest `keep` checkpoints of the folder survive.
    """
    path = write_atomically(path, lambda f: torch.save(state, f))
    if keep is not None:
        for old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def write_atomically(path: str | Path, write) -> Path:
    """Call `write(file)` on a temporary file next to `path`, flush it to disk and rename it to `path`.

    A crash mid-write leaves `path` as it was. The file is made by `open`, so
    its mode follows the umask, the same for checkpoints and exports.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def configs_of(state: dict) -> tuple[ModelConfig, TrainConfig | None]:
    """The model and training configs of a checkpoint (training: None for a model read from an export)."""
    cfg = state["config"]
    train = cfg.get("train")
    mcfg = config_from_dict(ModelConfig, cfg["model"])
    return mcfg, None if train is None else config_from_dict(TrainConfig, train)


def run_state(fmt: str, step: int, config: dict, model, optimizer, **extra) -> dict:
    """The one layout of every run's checkpoint (pre-training's `FORMAT`, fine-tuning's, ...): what a run needs to
    continue exactly (weights, optimizer, step, RNG, its configs), then the run's own `extra` entries."""
    return {"format": fmt, "version": 1, "step": step, "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}, **extra}


def training_state(model, optimizer, step: int, model_cfg: dict, train_cfg: dict, ema=None,
                   online_probe: dict | None = None) -> dict:
    """A pre-training checkpoint (:func:`run_state`), with the EMA and the online probe's {"heads", "optimizer",
    "classes"} if the run has them: kept apart from "model", which they are not part of."""
    return run_state(FORMAT, step, {"model": model_cfg, "train": train_cfg}, model, optimizer,
                     **({} if ema is None else {"ema": ema.state_dict()}),
                     **({} if online_probe is None else {"online_probe": online_probe}))


def model_weights(state: dict, raw: bool = False, path: str | Path = "") -> tuple[dict, str]:
    """(state dict, its label) of the weights a model read from `state` gets: the checkpoint's EMA when it has
    one ("EMA (decay 0.999)"), unless `raw`; else its raw weights ("raw"). An export holds one set, named by
    its "weights" entry: asking for the raw weights of an EMA export is a GMAEError naming `path`."""
    if state.get("ema") is not None:
        return (state["model"], "raw") if raw else (state["ema"], ema_label(configs_of(state)[1].ema))
    label = state.get("weights", "raw")
    if raw and label != "raw":
        raise GMAEError(f"{path} holds only its {label} weights, not the raw ones; export the checkpoint again "
                        "with --raw-weights, or drop --raw-weights")
    return state["model"], label


def weights_line(label: str | None, raw: bool) -> str | None:
    """What a command says about the weights it read (a :func:`model_weights` label): an EMA, or the raw
    weights asked for; nothing for a run without an EMA."""
    return f"weights: {label}" if label and (label.startswith("EMA") or raw) else None
