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


def configs_of(state: dict) -> tuple[ModelConfig, TrainConfig]:
    cfg = state["config"]
    return config_from_dict(ModelConfig, cfg["model"]), config_from_dict(TrainConfig, cfg["train"])


def training_state(model, optimizer, step: int, model_cfg: dict, train_cfg: dict) -> dict:
    """Everything a run needs to continue exactly: weights, optimizer, step, RNG, configs."""
    return {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "config": {"model": model_cfg, "train": train_cfg},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


def load_latest(out: str | Path, warn=print, load=load_checkpoint) -> dict | None:
    """The newest checkpoint in `out` that `load` reads (None if there is none).

    A truncated or corrupt newest checkpoint is reported through `warn` and
    the next older one is tried, so a crash during a save costs one interval.
    """
    for path in reversed(list_checkpoints(out)):
        try:
            return load(path)
        except GMAEError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    return None


def load_model(path: str | Path, map_location: str | torch.device = "cpu", initial: bool = False):
    """(model in eval mode, ModelConfig, checkpoint dict) from a checkpoint file.

    initial=True gives the same architecture with the weights its run started
    from (built after seeding with the run's seed, as `gmae pretrain` does):
    the "before pre-training" baseline of every evaluation.
    """
    from .model import build_model  # local: models import this module's neighbours

    state = load_checkpoint(path, map_location)
    mcfg, tcfg = configs_of(state)
    # The renderer is a property of this machine, not of the model: a model
    # trained with gsplat on a GPU must still render on a laptop.
    mcfg.render_backend = "auto"
    if initial:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            torch.manual_seed(tcfg.seed)
            model = build_model(mcfg)
        if tcfg.init_encoder:  # the run's encoder started from a file, as `gmae pretrain --init-encoder`
            from .export import init_encoder_weights

            init_encoder_weights(model.encoder, tcfg.init_encoder)
    else:
        model = build_model(mcfg)
        model.load_state_dict(state["model"])
    return model.to(map_location).eval(), mcfg, state
