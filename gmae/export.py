"""Export a checkpoint's weights to safetensors, and load such an export back.

An export holds only the model: its full ``state_dict`` (frozen parameters such
as the sin-cos ``pos_embed`` included) as safetensors tensors, and in the
safetensors metadata (string -> string)

    {"format": "gmae-export", "version": "1",
     "gmae_model_config": <ModelConfig as JSON>, "step": "<training step>"}

so that :func:`load_exported` rebuilds the model with no pickle, no optimizer
state and no code execution. The ``gmae export CKPT --format safetensors --out
FILE`` command is a thin wrapper around :func:`export_checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import configs_of, load_checkpoint
from .config import ModelConfig, as_dict, config_from_dict
from .errors import GMAEError

__all__ = ["EXPORT_FORMAT", "FORMATS", "export_checkpoint", "load_exported", "read_export_metadata"]

EXPORT_FORMAT = "gmae-export"
EXPORT_VERSION = "1"
CONFIG_KEY = "gmae_model_config"
#: Export formats and the file extension each requires.
FORMATS = {"safetensors": ".safetensors"}


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise GMAEError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_extension(path: Path, ext: str, what: str) -> None:
    if path.suffix.lower() != ext:
        raise GMAEError(f"{what} {path} must end in {ext} (got {path.suffix or 'no extension'!r})")


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "safetensors") -> Path:
    """Write the model of a gmae checkpoint to `out_path` as `fmt` (only "safetensors"); returns the path.

    Every entry of the model's state_dict is written (frozen ``pos_embed``
    included), each as its own contiguous copy (safetensors refuses tensors
    that share memory). The file is written next to `out_path` and renamed
    into place, so a crash never leaves a half-written export.
    """
    from safetensors.torch import save_file

    ext = _check_format(fmt)
    out_path = Path(out_path)
    _check_extension(out_path, ext, "export file")
    if out_path.is_dir():
        raise GMAEError(f"export file {out_path} is a directory; give a file name ending in {ext}")
    state = load_checkpoint(checkpoint_path)
    mcfg, _ = configs_of(state)
    tensors = {}
    for name, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            raise GMAEError(f"checkpoint {checkpoint_path} has a non-tensor model entry {name!r}; it is damaged")
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        CONFIG_KEY: json.dumps(as_dict(mcfg)),
        "step": str(int(state["step"])),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a gmae safetensors export; GMAEError if `path` is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise GMAEError(f"export {path} does not exist; give a .safetensors file written by gmae export")
    if not path.is_file():
        raise GMAEError(f"export {path} is not a file; give a .safetensors file written by gmae export")
    _check_extension(path, FORMATS["safetensors"], "export")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # not safetensors at all, or truncated
        first = (str(e).splitlines() or [""])[0][:120]
        raise GMAEError(f"export {path} cannot be read as safetensors ({type(e).__name__}: {first}); "
                        "it may be truncated") from None
    if metadata.get("format") != EXPORT_FORMAT or CONFIG_KEY not in metadata:
        raise GMAEError(f"{path} is a safetensors file but not a gmae export (no '{CONFIG_KEY}' metadata)")
    return metadata


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """(model in eval mode, ModelConfig) rebuilt from a gmae safetensors export."""
    from safetensors.torch import load_file

    from .model import build_model  # local: models import this module's neighbours

    metadata = read_export_metadata(path)
    try:
        values = json.loads(metadata[CONFIG_KEY])
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        mcfg = config_from_dict(ModelConfig, values)
    except (ValueError, TypeError) as e:
        raise GMAEError(f"export {path} has an unreadable model config ({e})") from None
    tensors = load_file(str(path), device="cpu")
    model = build_model(mcfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise GMAEError(f"export {path} does not match its model config ({detail})") from None
    return model.to(map_location).eval(), mcfg
