"""Checkpoints: plain tensors and Python values only, written atomically, loaded without code execution.

A checkpoint is a dict
    {"format": "gmae-checkpoint", "version": 1, "step": int,
     "config": {"model": {...}, "train": {...}},
     "model": state_dict, "optimizer": state_dict | None, "rng": {"torch": ByteTensor},
     "ema": state_dict (fp32; only in runs with --ema, see gmae.model.ema),
     "online_probe": {"heads": state_dict, "optimizer": state_dict, "classes": [str]}
                     (only in runs with --online-probe, see gmae.model.online_probe)}
so `torch.load(path, weights_only=True)` reads it and nothing in it can run code.
Also here: the newest readable checkpoint of a run folder (:func:`find_latest`).
Reading any model file (a checkpoint, an export or a run folder) is
:func:`gmae.io.export.load_state`; building a model from one, :func:`gmae.io.runs.load_model`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, config_from_dict
from ..model.ema import ema_label
from ..errors import GMAEError
from .files import list_checkpoints

FORMAT = "gmae-checkpoint"


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", fmt: str = FORMAT,
                    kind: str = "gmae") -> dict:
    """Load a checkpoint with `weights_only=True`; one clear GMAEError if it cannot be.

    `fmt` is the marker the file must carry (pre-training's by default; fine-tuning
    has its own), `kind` names such files in the messages.
    """
    path = Path(path)
    if path.is_dir():
        inside = list_checkpoints(path)
        hint = f", e.g. its newest, {inside[-1]}" if inside else ""
        raise GMAEError(f"checkpoint {path} is a folder; give the path of a .pt file written by gmae{hint}")
    if not path.is_file():
        raise GMAEError(f"checkpoint {path} does not exist; give the path to a .pt file written by gmae")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True raises this both for a forbidden object and for bytes
        # that are not a pickle at all; only the first is a refusal.
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Unsupported global" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise GMAEError(
                f"checkpoint {path} was refused: it holds an object that would run code on load{what} "
                f"(weights_only=True); only load checkpoints written by gmae"
            ) from None
        raise GMAEError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint file, or it is damaged") from None
    except Exception as e:  # truncated (zip without its directory), empty, unreadable
        detail = " ".join(str(e).split()).split(". ")[0][:120] or "no data"  # its first sentence
        raise GMAEError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {detail}); it may be truncated or damaged"
        ) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise GMAEError(f"{path} is not a {kind} checkpoint (no '{fmt}' marker)")
    return state


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


def find_latest(out: str | Path, warn=print, load=load_checkpoint) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint in `out` that `load` reads (None if there is none).

    A truncated or corrupt newest checkpoint is reported through `warn` and
    the next older one is tried, so a crash during a save costs one interval.
    """
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load(path)
        except GMAEError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    return None


def load_latest(out: str | Path, warn=print, load=load_checkpoint) -> dict | None:
    """The state of :func:`find_latest` (None if there is none)."""
    found = find_latest(out, warn, load)
    return None if found is None else found[1]
