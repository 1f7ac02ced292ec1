"""Reading model files: :func:`load`, the one loader every command and the Python API go through.

``load(path, what)`` reads any file gmae reads, and gives what `what` asks for:

=======================  =====================================================================================
``"model"``              (model in eval mode, ModelConfig, checkpoint dict) from a gmae checkpoint, a gmae
                         export or a run folder (its newest readable checkpoint); ``initial=True`` gives the
                         weights its run started from
``"encoder"``            (ViTEncoder in eval mode, ModelConfig) from those, or from a timm / MAE ViT file
                         (``.safetensors``, ``.pt``/``.pth``/``.bin``); with ``into=ENCODER`` the weights are
                         copied into that encoder (``gmae pretrain --init-encoder``)
``"classifier"``         (classifier in eval mode, ModelConfig, checkpoint dict) from a fine-tuning checkpoint
``"state"``              the checkpoint dict of a gmae checkpoint, export or run folder
``"export"``             (model in eval mode, ModelConfig) from a gmae safetensors export only (no pickle)
``"checkpoint"``         the dict of one pre-training checkpoint file (what a resumed run reads)
``"finetune-checkpoint"``  the dict of one fine-tuning checkpoint file
``"detect-checkpoint"``  the dict of one detection fine-tuning (``gmae detect``) checkpoint file
=======================  =====================================================================================

Every ``.pt`` file is read with ``torch.load(weights_only=True)``, so nothing in
it can run code; safetensors files are read without pickle. What cannot be read
is a one-line :class:`gmae.errors.GMAEError` naming the file. The formats
themselves (and writing them) are :mod:`gmae.io.checkpoint` and
:mod:`gmae.io.export`; :func:`find_latest` gives a run folder's newest
readable checkpoint.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from pathlib import Path

import torch

from ..config import IMAGENET_MEAN, ModelConfig, TrainConfig, as_dict, config_from_dict
from ..errors import GMAEError
from ..model import ViTEncoder, build_classifier, build_model
from .checkpoint import (
    CHECKPOINT_FORMATS, CONFIG_KEY, DROPPED, EXPORT_FORMAT, EXPORT_SUFFIXES, FORMAT, TIMM_FORMAT,
    TORCH_SUFFIXES, configs_of, model_weights,
)
from .files import list_checkpoints

__all__ = ["WHAT", "find_latest", "load"]

#: What :func:`load` gives (see the module docstring).
WHAT = ("model", "encoder", "classifier", "state", "export", "checkpoint", "finetune-checkpoint", "detect-checkpoint")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def load(path: str | Path, what: str = "model", map_location: str | torch.device = "cpu", *, raw: bool = False,
         initial: bool = False, num_heads: int | None = None, input_norm: str | None = None,
         into: torch.nn.Module | None = None, warn=_warn):
    """What `what` asks for (see the module docstring), read from `path` onto `map_location`.

    ``raw``: of a checkpoint with an EMA of the weights, its raw weights rather than the EMA
    (:func:`gmae.io.checkpoint.model_weights`; "model", "encoder"). ``initial`` ("model"): the
    architecture with the weights its run started from (built after seeding with the run's seed, as
    `gmae pretrain` does): the "before pre-training" baseline of every evaluation. ``num_heads`` and
    ``input_norm`` ("encoder"): for ViT files without gmae's config (see :func:`_encoder`). ``into``
    ("encoder"): an encoder to copy the file's weights into, in place; every parameter must have the same
    shape in both. ``warn``: where a run folder's unreadable newest checkpoint is reported.
    """
    if what == "model":
        return _model(path, map_location, initial, raw, warn)
    if what == "encoder":
        if into is not None:
            _init_encoder(into, path)
            return into, None
        return _encoder(path, map_location, num_heads, raw, input_norm)
    if what == "classifier":
        return _classifier(path, map_location)
    if what == "state":
        return _state(path, map_location, warn)
    if what == "export":
        return _exported_model(_export_state(path), path, map_location)
    if what in CHECKPOINT_FORMATS:
        fmt, kind = CHECKPOINT_FORMATS[what]
        return _read_checkpoint(path, map_location, fmt, kind)
    raise GMAEError(f"cannot load {what!r} from {path}: ask for one of {', '.join(WHAT)}")


# --------------------------------------------------------------------------- checkpoints and run folders


def _read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", fmt: str = FORMAT,
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


def find_latest(out: str | Path, warn=print, what: str = "checkpoint",
                map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint in `out` that :func:`load` reads as `what` ("checkpoint",
    "finetune-checkpoint" or "detect-checkpoint"; None if there is none).

    A truncated or corrupt newest checkpoint is reported through `warn` and
    the next older one is tried, so a crash during a save costs one interval.
    """
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load(path, what, map_location)
        except GMAEError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    return None


def _state(path: str | Path, map_location: str | torch.device = "cpu", warn=_warn) -> dict:
    """A checkpoint dict read from a gmae checkpoint, a gmae safetensors export or a run folder.

    A run folder gives its newest readable checkpoint. An export gives the
    model and its config, with step and no training config (``"train": None``)
    or optimizer; it is read without pickle.
    """
    path = Path(path)
    if path.is_dir():
        found = find_latest(path, warn, map_location=map_location)
        if found is None:
            what = "none of its checkpoints can be read" if list_checkpoints(path) else "it holds no checkpoint"
            raise GMAEError(f"checkpoint {path} is a folder and {what}; give a run folder of gmae pretrain, "
                            "a checkpoint-*.pt file or a .safetensors export")
        return found[1]
    if path.suffix.lower() in EXPORT_SUFFIXES:
        return _export_state(path, map_location)
    return _read_checkpoint(path, map_location)


def _model(path, map_location="cpu", initial: bool = False, raw: bool = False, warn=_warn):
    """(model in eval mode, ModelConfig, checkpoint dict) from a checkpoint, an export or a run folder.

    The weights are the checkpoint's EMA when it has one, unless `raw`; the dict's ``"weights"`` names
    them: "EMA (decay 0.999)", "raw" or, with `initial`, "initial".
    """
    state = _state(path, map_location, warn)
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
            _init_encoder(model.encoder, tcfg.init_encoder)
        state["weights"] = "initial"
    else:
        model = build_model(mcfg)
        weights, state["weights"] = model_weights(state, raw, path)
        model.load_state_dict(weights)
    return model.to(map_location).eval(), mcfg, state


def _classifier(path, map_location="cpu"):
    """(classifier in eval mode, ModelConfig, checkpoint dict) from a fine-tuning checkpoint."""
    state = _read_checkpoint(path, map_location, *CHECKPOINT_FORMATS["finetune-checkpoint"])
    mcfg = config_from_dict(ModelConfig, state["config"]["model"])
    pool = state["config"]["finetune"].get("global_pool", "avg")  # runs before the setting existed pooled avg
    model = build_classifier(mcfg, state["config"]["num_classes"], global_pool=pool)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), mcfg, state


# --------------------------------------------------------------------------- gmae exports


def _safetensors_metadata(path: Path, what: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001  not safetensors at all, or truncated
        first = (str(e).splitlines() or [""])[0][:120]
        raise GMAEError(f"{what} {path} cannot be read as safetensors ({type(e).__name__}: {first}); "
                        "it may be truncated") from None


def _export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a gmae safetensors export; GMAEError if `path` is not one."""
    path = Path(path)
    if not path.exists():
        raise GMAEError(f"export {path} does not exist; give a .safetensors file written by gmae export")
    if not path.is_file():
        raise GMAEError(f"export {path} is not a file; give a .safetensors file written by gmae export")
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise GMAEError(f"export {path} must end in {' or '.join(EXPORT_SUFFIXES)} "
                        f"(got {path.suffix or 'no extension'!r})")
    metadata = _safetensors_metadata(path, "export")
    if metadata.get("format") != EXPORT_FORMAT or CONFIG_KEY not in metadata:
        raise GMAEError(f"{path} is a safetensors file but not a gmae export (no '{CONFIG_KEY}' metadata)")
    return metadata


def _config_of(metadata: dict[str, str], path) -> ModelConfig:
    try:
        values = json.loads(metadata[CONFIG_KEY])
        if not isinstance(values, dict):
            raise TypeError("not a JSON object")
        return config_from_dict(ModelConfig, values)
    except (ValueError, TypeError) as e:
        raise GMAEError(f"export {path} has an unreadable model config ({e})") from None


def _export_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A gmae safetensors export as a checkpoint dict (:mod:`gmae.io.checkpoint`): format, step, the
    model config (no training config: ``"train": None``), the model's tensors and which weights they are
    (``"weights"``: "raw" or "EMA (decay D)"); no optimizer."""
    from safetensors.torch import load_file

    metadata = _export_metadata(path)
    mcfg = _config_of(metadata, path)
    try:
        step = int(metadata.get("step", "0"))
    except ValueError:
        step = 0
    return {"format": FORMAT, "version": 1, "step": step,
            "config": {"model": as_dict(mcfg), "train": None},
            "model": load_file(str(path), device=str(torch.device(map_location))), "optimizer": None,
            "weights": metadata.get("weights", "raw")}


def _exported_model(state: dict, path, map_location="cpu") -> tuple[torch.nn.Module, ModelConfig]:
    mcfg, _ = configs_of(state)
    model = build_model(mcfg)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise GMAEError(f"export {path} does not match its model config ({detail})") from None
    return model.to(map_location).eval(), mcfg


# --------------------------------------------------------------------------- encoders from gmae, timm and MAE files


def _torch_load(path: Path):
    """`torch.load(weights_only=True)` with one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise GMAEError(f"{path} was refused: it holds an object that would run code on load "
                            "(weights_only=True); give a plain state dict of tensors") from None
        raise GMAEError(f"{path} cannot be read: it is not a PyTorch file, or it is damaged") from None
    except Exception as e:  # noqa: BLE001  truncated, empty, unreadable
        detail = " ".join(str(e).split()).split(". ")[0][:120] or "no data"
        raise GMAEError(f"{path} cannot be read ({type(e).__name__}: {detail}); it may be truncated") from None


def _encoder_entries(sd, path: Path) -> dict[str, torch.Tensor]:
    """The encoder entries of a timm / MAE / gmae state dict, under timm names (see DROPPED)."""
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise GMAEError(f"{path} does not hold a state dict of tensors (bare, or under 'model' or 'state_dict'); "
                        "give a timm or MAE ViT checkpoint")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from DistributedDataParallel
    if any(k.startswith("encoder.") for k in sd):  # a whole gmae model
        return {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    return {k: v for k, v in sd.items() if not k.startswith(DROPPED)}


def _infer_config(sd: dict[str, torch.Tensor], path: Path, num_heads: int | None) -> ModelConfig:
    """The encoder's shape from the tensors' shapes (see :func:`_encoder`)."""
    missing = [k for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise GMAEError(f"{path} is not a ViT state dict with timm's names: no {', '.join(missing)}")
    w, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise GMAEError(f"{path}: patch_embed.proj.weight {tuple(w.shape)} is not (D, C, p, p); only square patches load")
    dim, chans, p = w.shape[0], w.shape[1], w.shape[2]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2 or pos.shape[2] != dim:
        raise GMAEError(f"{path}: pos_embed {tuple(pos.shape)} is not (1, 1 + N, {dim})")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        why = ("has no cls slot (a ViT without a class-token position)" if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]
               else "is not a square grid of patches plus a cls slot")
        raise GMAEError(f"{path}: pos_embed {tuple(pos.shape)} {why}; gmae's encoder needs (1, 1 + n*n, D)")
    if num_heads is None:
        if dim % 64:
            raise GMAEError(f"{path}: width {dim} is not a multiple of 64, so the number of heads cannot be "
                            "inferred; give num_heads")
        num_heads = dim // 64  # every standard ViT (timm, MAE) has 64-dimensional heads
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    try:
        return ModelConfig(img_size=grid * p, patch_size=p, in_chans=chans, embed_dim=dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                           background=(1.0,) * chans)
    except GMAEError as e:
        raise GMAEError(f"{path}: {e}") from None


def _build_encoder(sd: dict[str, torch.Tensor], mcfg: ModelConfig, path: Path):
    encoder = ViTEncoder(mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.embed_dim, mcfg.depth,
                         mcfg.num_heads, mcfg.mlp_ratio, input_norm=mcfg.input_norm)
    ours = encoder.state_dict()
    missing, unexpected = [k for k in ours if k not in sd], [k for k in sd if k not in ours]
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        hint = ("; an MAE fine-tuned checkpoint keeps its final norm as fc_norm (after pooling): give the "
                "pre-training checkpoint" if "norm.weight" in missing else
                "; give a plain ViT (no layer-scale, register tokens or other extras)")
        raise GMAEError(f"{path} does not hold a gmae/timm ViT encoder: {'; '.join(parts)}{hint}")
    for k, v in ours.items():
        if sd[k].shape != v.shape:
            raise GMAEError(f"{path}: {k} is {tuple(sd[k].shape)} but the encoder it describes needs {tuple(v.shape)}")
    encoder.load_state_dict(sd, strict=True)
    return encoder


def _check_own_norm(mcfg: ModelConfig, input_norm: str | None, path: Path) -> None:
    """A gmae file records how its encoder normalises; another given for it would feed the weights wrong inputs."""
    if input_norm is not None and input_norm != mcfg.input_norm:
        raise GMAEError(f"{path} records its own input normalisation ({mcfg.input_norm}); the one given "
                        f"({input_norm}) is for ViT files without gmae's config (timm's, MAE's): leave it out")


def _encoder(path: str | Path, map_location: str | torch.device = "cpu",
             num_heads: int | None = None, raw: bool = False,
             input_norm: str | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """(ViTEncoder in eval mode on `map_location`, ModelConfig) read from `path`, which may be

    (a) a gmae training checkpoint (``.pt``) or a run folder (its newest readable
        checkpoint), or (b) a gmae safetensors export:
        the encoder of the model, with the file's own config;
    (c) a timm-named ViT state dict: a ``.safetensors`` file (a gmae timm export,
        or timm's/Hugging Face's own), or a ``.pt``/``.pth``/``.bin`` file read with
        ``torch.load(weights_only=True)``, bare or under ``"model"``/``"state_dict"``
        (MAE's official checkpoints). Only the encoder's entries are kept:
        ``decoder*``, ``mask_token``, ``head.*`` and ``fc_norm.*`` are dropped (a
        fine-tuned MAE with global pooling has ``fc_norm`` instead of ``norm`` and is
        refused). The architecture is read from the shapes: width D and patch p
        from ``patch_embed.proj.weight`` (D, C, p, p), depth from the block count,
        mlp_ratio from ``fc1``, the image size from ``pos_embed`` (1, 1 + n*n, D)
        as n*p; the number of heads is D // 64 (every standard ViT has
        64-dimensional heads) unless `num_heads` is given or the file is a gmae
        export with its config. The ModelConfig's decoder fields are defaults.
        Such a file says nothing of its input normalisation: its encoder
        normalises [0, 1] images with ImageNet's mean and std, as MAE and timm
        trained theirs, unless `input_norm` says otherwise ("none" for a gmae
        ``.pth`` timm export of a model trained without ``--normalize``; a
        ``.safetensors`` timm export keeps its config, normalisation included).

    Of a gmae checkpoint with an EMA of the weights, the EMA's encoder is read
    unless `raw` (:func:`gmae.io.checkpoint.model_weights`); the encoder's
    ``loaded_weights`` says which: "EMA (decay D)" or "raw" for gmae files, None
    for timm / MAE files.

    Anything else (a missing key, a non-square grid, a ``pos_embed`` without a
    cls slot, layer-scale, ...) is a one-line GMAEError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise GMAEError(f"encoder file {path} does not exist; give a .pt/.pth/.bin or .safetensors file, "
                        "or a run folder of gmae pretrain")
    suffix = path.suffix.lower()
    mcfg, label = None, None
    if path.is_dir():  # a run folder: its newest readable checkpoint
        state = _state(path)
        mcfg, (sd, label) = configs_of(state)[0], model_weights(state, raw, path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        metadata = _safetensors_metadata(path, "encoder file")
        if metadata.get("format") == EXPORT_FORMAT:
            state = _export_state(path)
            label = model_weights(state, raw, path)[1]  # an EMA export has no raw weights to give
            model, mcfg = _exported_model(state, path)
            _check_own_norm(mcfg, input_norm, path)
            model.encoder.loaded_weights = label
            return model.encoder.to(map_location).eval(), mcfg
        if metadata.get("format") == TIMM_FORMAT and CONFIG_KEY in metadata:
            mcfg = _config_of(metadata, path)
        sd = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        sd = _torch_load(path)
        if isinstance(sd, dict) and sd.get("format") == FORMAT:
            mcfg, (sd, label) = configs_of(sd)[0], model_weights(sd, raw, path)
        elif isinstance(sd, dict) and isinstance(sd.get("model", sd.get("state_dict")), dict):
            sd = sd.get("model", sd.get("state_dict"))
    else:
        raise GMAEError(f"encoder file {path} must end in .safetensors, {', '.join(TORCH_SUFFIXES)} "
                        f"(got {suffix or 'no extension'!r})")
    sd = _encoder_entries(sd, path)
    if mcfg is None:
        mcfg = _infer_config(sd, path, num_heads)
        # A file with no gmae config is most likely timm's or MAE's, whose ViTs learnt on ImageNet-normalised
        # images (MAE's main_pretrain.py line 127, main_linprobe.py line 136, util/datasets.py lines 32-33):
        # fed [0, 1] images as they are, their features would be off.
        if input_norm is None:
            input_norm = "imagenet" if mcfg.in_chans == len(IMAGENET_MEAN) else "none"
        mcfg.input_norm = input_norm
        try:
            mcfg.validate()
        except GMAEError as e:
            raise GMAEError(f"{path}: {e}") from None
    else:
        _check_own_norm(mcfg, input_norm, path)
    if num_heads is not None and mcfg.num_heads != num_heads:
        mcfg.num_heads = num_heads
        try:
            mcfg.validate()
        except GMAEError as e:
            raise GMAEError(f"{path}: {e}") from None
    encoder = _build_encoder(sd, mcfg, path)
    encoder.loaded_weights = label
    return encoder.to(map_location).eval(), mcfg


def _init_encoder(encoder: torch.nn.Module, path: str | Path) -> None:
    """Copy the encoder read from `path` (see :func:`_encoder`) into `encoder`, in place.

    Every parameter must have the same shape in both; otherwise a one-line
    GMAEError names the first that differs. The global RNG is left untouched.
    """
    heads = encoder.blocks[0].attn.num_heads if len(encoder.blocks) else None
    with torch.random.fork_rng(devices=[]):  # building the loaded encoder draws random initial weights
        theirs = _encoder(path, num_heads=heads)[0].state_dict()
    ours = encoder.state_dict()
    for name in [*ours, *(k for k in theirs if k not in ours)]:
        a = tuple(theirs[name].shape) if name in theirs else "absent"
        b = tuple(ours[name].shape) if name in ours else "absent"
        if a != b:
            raise GMAEError(f"init-encoder {path} does not fit this run's encoder: {name} is {a} in the file "
                            f"but {b} in the run; choose the file's architecture (preset, --img-size, --patch-size)")
    with torch.no_grad():
        for name, value in ours.items():
            value.copy_(theirs[name])
