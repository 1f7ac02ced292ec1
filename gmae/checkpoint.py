"""Checkpoints: plain tensors and Python values only, written atomically, loaded without code execution.

A checkpoint is a dict
    {"format": "gmae-checkpoint", "version": 1, "step": int,
     "config": {"model": {...}, "train": {...}},
     "model": state_dict, "optimizer": state_dict | None, "rng": {"torch": ByteTensor}}
so `torch.load(path, weights_only=True)` reads it and nothing in it can run code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig, config_from_dict
from .errors import GMAEError

FORMAT = "gmae-checkpoint"
NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoints in `out`, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, path: str | Path, keep: int | None = None) -> Path:
    """Write `state` to `path` atomically: a temporary file, fsync, then rename.

    A crash mid-write leaves the previous checkpoints untouched. With `keep`,
    only the newest `keep` checkpoints of the folder survive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep is not None:
        for old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; one clear GMAEError if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise GMAEError(f"checkpoint {path} does not exist; give the path to a .pt file written by gmae")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise GMAEError(
            f"checkpoint {path} was refused: it holds objects that would run code on load "
            f"(weights_only=True); only load checkpoints written by gmae ({str(e).splitlines()[0][:120]})"
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise GMAEError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it may be truncated") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GMAEError(f"{path} is not a gmae checkpoint (no '{FORMAT}' marker)")
    return state


def configs_of(state: dict) -> tuple[ModelConfig, TrainConfig]:
    cfg = state["config"]
    return config_from_dict(ModelConfig, cfg["model"]), config_from_dict(TrainConfig, cfg["train"])


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """(model in eval mode, ModelConfig, checkpoint dict) from a checkpoint file."""
    from .model import build_model  # local: models import this module's neighbours

    state = load_checkpoint(path, map_location)
    mcfg, _ = configs_of(state)
    model = build_model(mcfg)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), mcfg, state
