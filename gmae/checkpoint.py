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
import sys
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig, config_from_dict
from .errors import GMAEError
from .files import checkpoint_path, list_checkpoints, metric_lines  # noqa: F401  (checkpoint_path: for importers)

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


def resume_from(out: str | Path, resume: bool | str, warn=print, load=load_checkpoint) -> tuple[Path, dict] | None:
    """(path, state) of the checkpoint a run into `out` continues, or None for a fresh start.

    resume False: a fresh run, refused if `out` holds checkpoints (it would
    prune them). True: the newest readable checkpoint, and a GMAEError if
    there is none -- resuming with nothing to resume from is a mistake, not a
    reason to start over. "auto": that checkpoint if there is one, else a
    fresh start (said through `warn` when checkpoints exist but none reads).
    Nothing in `out` is touched here.
    """
    existing = list_checkpoints(out)
    if not resume:
        if existing:
            raise GMAEError(f"{out} already holds checkpoints of another run; add --resume to continue it "
                            "or choose a new --out")
        return None
    found = find_latest(out, warn, load)
    if found is None and resume == "auto":
        if existing:
            warn(f"none of the {len(existing)} checkpoints in {out} can be read; starting afresh")
        return None
    if found is None:
        if existing:
            raise GMAEError(f"--resume: none of the {len(existing)} checkpoints in {out} can be read; "
                            "move them away to start a new run there")
        lines = len(metric_lines(Path(out) / "metrics.jsonl"))
        why = (f" (its metrics.jsonl has {lines} lines of a run stopped before its first checkpoint)" if lines
               else "" if Path(out).is_dir() else " (the folder does not exist)")
        raise GMAEError(f"--resume: there is no checkpoint in {out} to continue{why}; run without --resume to "
                        "start a new run there, or with --resume=auto to continue only when there is one")
    return found


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def load_state(path: str | Path, map_location: str | torch.device = "cpu", warn=_warn) -> dict:
    """A checkpoint dict read from a gmae checkpoint, a gmae safetensors export or a run folder.

    A run folder gives its newest readable checkpoint. An export gives the
    model and its config, with step and no training config (``"train": None``)
    or optimizer; it is read without pickle.
    """
    path = Path(path)
    if path.is_dir():
        found = find_latest(path, warn, lambda p: load_checkpoint(p, map_location))
        if found is None:
            what = "none of its checkpoints can be read" if list_checkpoints(path) else "it holds no checkpoint"
            raise GMAEError(f"checkpoint {path} is a folder and {what}; give a run folder of gmae pretrain, "
                            "a checkpoint-*.pt file or a .safetensors export")
        return found[1]
    if path.suffix.lower() == ".safetensors":
        from .export import export_state  # local: export imports this module

        return export_state(path, map_location)
    return load_checkpoint(path, map_location)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", initial: bool = False):
    """(model in eval mode, ModelConfig, checkpoint dict) from a checkpoint, an export or a run folder.

    initial=True gives the same architecture with the weights its run started
    from (built after seeding with the run's seed, as `gmae pretrain` does):
    the "before pre-training" baseline of every evaluation.
    """
    from .model import build_model  # local: models import this module's neighbours

    state = load_state(path, map_location)
    mcfg, tcfg = configs_of(state)
    tcfg = tcfg or TrainConfig()  # an export: a run's defaults (seed 0, no init-encoder) for `initial`
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
