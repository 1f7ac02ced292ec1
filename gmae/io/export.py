"""Model files in and out: exports for sharing, any gmae model file read as a checkpoint dict, and
encoders read from gmae, timm and MAE files.

:func:`load_state` reads what every command that takes a model accepts: a gmae
checkpoint, a gmae export or a run folder (its newest readable checkpoint).

``--format safetensors`` (a *gmae export*) holds the whole model: its full
``state_dict`` (frozen parameters such as the sin-cos ``pos_embed`` included) as
safetensors tensors, and in the safetensors metadata (string -> string)

    {"format": "gmae-export", "version": "1",
     "gmae_model_config": <ModelConfig as JSON>, "step": "<training step>",
     "weights": "EMA (decay 0.999)" | "raw"}

so that :func:`load_exported` rebuilds the model with no pickle, no optimizer
state and no code execution.

``--format timm`` holds only the encoder, under timm's ``VisionTransformer``
parameter names (gmae's encoder already uses them; the ``encoder.`` prefix is
dropped): ``cls_token``, ``pos_embed`` (1, 1 + N, D, the cls slot first, as in
timm), ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
``norm.*``. A ``.pth`` file is a plain dict of tensors (``torch.save``; loads with
``weights_only=True``); a ``.safetensors`` file carries the metadata above with
``"format": "timm-vit"``. ``--format mae`` writes the same tensors as a ``.pth`` holding
``{"model": state_dict}``, the layout of MAE's own ``mae_pretrain_vit_base.pth``: MAE's
``main_finetune.py`` / ``main_linprobe.py --finetune`` read ``torch.load(path)["model"]``
(facebookresearch/mae at efb2a80, ``main_finetune.py`` lines 234-248, ``main_linprobe.py``
lines 195-209) and detectron2's ViTDet configs take it as ``train.init_checkpoint``
(docs/evaluation.md, "Exports for MAE's and ViTDet's scripts"). There is no classifier, so create the timm model with
``num_classes=0`` (or load with ``strict=False``)::

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="enc.safetensors", mean=(0, 0, 0), std=(1, 1, 1)))

timm names of the presets' encoders: small = ``vit_small_patch16_224``, base =
``vit_base_patch16_224``, large = ``vit_large_patch16_224``. No timm name has the
``tiny`` preset's shape (64 px, patch 8, width 192, depth 6, 3 heads;
``vit_tiny_patch16_224`` is 224 px, patch 16, depth 12): create
``vit_tiny_patch16_224`` with ``img_size=64, patch_size=8, depth=6`` (timm's
model functions take such overrides); :func:`timm_create_call` writes the call.
gmae models take RGB images in [0, 1] and normalise them inside the encoder as
their ``input_norm`` says (``gmae pretrain --normalize``): by default not at all,
while timm's data config normalises by default, so give ``mean=(0, 0, 0),
std=(1, 1, 1)`` as above; an encoder trained with ``--normalize imagenet`` needs
timm to normalise with ImageNet's mean and std (timm's ViT exports feed the
model normalised images), so give those. :func:`input_mean_std` has the pair, a
timm export's safetensors metadata records it (``"mean"``, ``"std"``, JSON
lists) and :func:`timm_create_call` writes it into the call.

:func:`load_encoder` reads an encoder from any of: a gmae training checkpoint, a
gmae export, or a timm-named ViT state dict (``.safetensors``, or ``.pt``/``.pth``/
``.bin`` read with ``torch.load(weights_only=True)``, bare or under ``"model"`` or
``"state_dict"`` as in MAE's official checkpoints; a file without gmae's config is read
as ImageNet-normalised, as MAE and timm train, unless ``input_norm`` says otherwise). :func:`init_encoder_weights`
copies such an encoder into a model (``gmae pretrain --init-encoder FILE``).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from pathlib import Path

import torch

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import configs_of, find_latest, load_checkpoint, model_weights, write_atomically
from ..config.choices import EXPORT_FORMATS
from ..config import IMAGENET_MEAN, IMAGENET_STD, PRESETS, ModelConfig, as_dict, config_from_dict
from ..errors import GMAEError
from .files import list_checkpoints
from ..model import ViTEncoder, build_model

__all__ = ["EXPORT_FORMAT", "FORMATS", "TIMM_FORMAT", "export_checkpoint", "export_state", "init_encoder_weights",
           "input_mean_std", "load_encoder", "load_exported", "load_state", "read_export_metadata", "timm_create_call",
           "timm_model_name"]

EXPORT_FORMAT = "gmae-export"
TIMM_FORMAT = "timm-vit"
EXPORT_VERSION = "1"
CONFIG_KEY = "gmae_model_config"
FORMATS = EXPORT_FORMATS  # format -> the file extensions it accepts
#: Formats holding only the encoder, under timm's names.
ENCODER_ONLY = ("timm", "mae")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: Entries of MAE / timm checkpoints that are not the encoder and are dropped on load:
#: MAE's decoder (``decoder_*``) and ``mask_token``, a classifier (``head.*``) and the
#: norm after global pooling of MAE fine-tuned models (``fc_norm.*``).
DROPPED = ("decoder", "mask_token", "head.", "fc_norm.")
#: gmae presets whose encoder is exactly a standard timm ViT.
TIMM_NAMES = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}
ENCODER_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
#: timm's vit_tiny_patch16_224, the base of the timm call for other shapes.
_TIMM_TINY = {"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0,
              "in_chans": 3}


def _check_format(fmt: str) -> tuple[str, ...]:
    if fmt not in FORMATS:
        raise GMAEError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_extension(path: Path, exts: tuple[str, ...], what: str) -> None:
    if path.suffix.lower() not in exts:
        raise GMAEError(f"{what} {path} must end in {' or '.join(exts)} (got {path.suffix or 'no extension'!r})")


def timm_model_name(mcfg: ModelConfig) -> str | None:
    """The timm model whose encoder has exactly `mcfg`'s shape (small/base/large presets), else None."""
    for preset, name in TIMM_NAMES.items():
        if (all(getattr(mcfg, k) == PRESETS[preset][k] for k in ENCODER_FIELDS)
                and mcfg.mlp_ratio == 4.0 and mcfg.in_chans == 3):
            return name
    return None


def input_mean_std(mcfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a timm user must normalise [0, 1] images with for `mcfg`'s encoder: the encoder
    normalises inside itself in gmae, but a timm export is a plain ViT, which expects normalised input."""
    if mcfg.input_norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * mcfg.in_chans, (1.0,) * mcfg.in_chans


def timm_create_call(mcfg: ModelConfig, path: str | Path) -> str:
    """A ``timm.create_model(...)`` call that loads a timm export of a `mcfg` encoder from `path`."""
    name = timm_model_name(mcfg)
    extra = ""
    if name is None:  # a standard name with the shape given as overrides
        name = "vit_tiny_patch16_224"
        keys = (*ENCODER_FIELDS, "mlp_ratio", "in_chans")
        extra = "".join(f", {k}={getattr(mcfg, k)}" for k in keys if getattr(mcfg, k) != _TIMM_TINY[k])
    mean, std = (tuple(int(v) if v in (0.0, 1.0) else v for v in values) for values in input_mean_std(mcfg))
    return (f"timm.create_model({name!r}, pretrained=True, num_classes=0{extra}, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, mean={mean}, std={std}))")



def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "safetensors",
                      raw: bool = False, state: dict | None = None) -> Path:
    """Write the model of a gmae checkpoint to `out_path` as `fmt`; returns the path.

    `state`: the checkpoint already read (:func:`load_state` of `checkpoint_path`), so that a caller that
    needs it too reads the file once; `checkpoint_path` then only names it in messages.

    The weights are the checkpoint's EMA when it has one, unless `raw`
    (:func:`gmae.io.checkpoint.model_weights`); the metadata's "weights" names them.

    "safetensors": the whole model (every state_dict entry, frozen ``pos_embed``
    included). "timm": the encoder only, under timm's names, as ``.safetensors``
    or ``.pth``; "mae": the same tensors as ``{"model": state_dict}`` in a ``.pth``
    (see the module docstring). Each tensor is its own contiguous
    copy (safetensors refuses tensors that share memory). The file is written
    next to `out_path` and renamed into place, so a crash never leaves a
    half-written export.
    """
    from safetensors.torch import save

    exts = _check_format(fmt)
    out_path = Path(out_path)
    _check_extension(out_path, exts, "export file")
    if out_path.is_dir():
        raise GMAEError(f"export file {out_path} is a directory; give a file name ending in {' or '.join(exts)}")
    if state is None:
        state = load_state(checkpoint_path)
    mcfg, _ = configs_of(state)
    weights, label = model_weights(state, raw, checkpoint_path)
    tensors = {}
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise GMAEError(f"checkpoint {checkpoint_path} has a non-tensor model entry {name!r}; it is damaged")
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    if fmt in ENCODER_ONLY:
        tensors = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    metadata = {
        "format": EXPORT_FORMAT if fmt == "safetensors" else TIMM_FORMAT,
        "version": EXPORT_VERSION,
        CONFIG_KEY: json.dumps(as_dict(mcfg)),
        "step": str(int(state["step"])),
        "weights": label,
    }
    if fmt == "timm":  # what timm must normalise with: the export has no input normalisation of its own
        mean, std = input_mean_std(mcfg)
        metadata.update(mean=json.dumps(list(mean)), std=json.dumps(list(std)))
    if out_path.suffix.lower() == ".pth":
        # MAE's scripts read the state dict under "model" (see the module docstring); timm takes it bare.
        payload = {"model": tensors} if fmt == "mae" else tensors
        return write_atomically(out_path, lambda f: torch.save(payload, f))
    # Bytes written through `open` (safetensors' own save_file makes its files 0600, whatever the umask).
    return write_atomically(out_path, lambda f: f.write(save(tensors, metadata=metadata)))


def _safetensors_metadata(path: Path, what: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001  not safetensors at all, or truncated
        first = (str(e).splitlines() or [""])[0][:120]
        raise GMAEError(f"{what} {path} cannot be read as safetensors ({type(e).__name__}: {first}); "
                        "it may be truncated") from None


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a gmae safetensors export; GMAEError if `path` is not one."""
    path = Path(path)
    if not path.exists():
        raise GMAEError(f"export {path} does not exist; give a .safetensors file written by gmae export")
    if not path.is_file():
        raise GMAEError(f"export {path} is not a file; give a .safetensors file written by gmae export")
    _check_extension(path, FORMATS["safetensors"], "export")
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


def export_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A gmae safetensors export as a checkpoint dict (:mod:`gmae.io.checkpoint`): format, step, the
    model config (no training config: ``"train": None``), the model's tensors and which weights they are
    (``"weights"``: "raw" or "EMA (decay D)"); no optimizer."""
    from safetensors.torch import load_file

    metadata = read_export_metadata(path)
    mcfg = _config_of(metadata, path)
    try:
        step = int(metadata.get("step", "0"))
    except ValueError:
        step = 0
    return {"format": CHECKPOINT_FORMAT, "version": 1, "step": step,
            "config": {"model": as_dict(mcfg), "train": None},
            "model": load_file(str(path), device=str(torch.device(map_location))), "optimizer": None,
            "weights": metadata.get("weights", "raw")}


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """(model in eval mode, ModelConfig) rebuilt from a gmae safetensors export."""
    return _exported_model(export_state(path), path, map_location)


def _exported_model(state: dict, path, map_location="cpu") -> tuple[torch.nn.Module, ModelConfig]:
    mcfg, _ = configs_of(state)
    model = build_model(mcfg)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise GMAEError(f"export {path} does not match its model config ({detail})") from None
    return model.to(map_location).eval(), mcfg


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
        return export_state(path, map_location)
    return load_checkpoint(path, map_location)


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
    """The encoder's shape from the tensors' shapes (see :func:`load_encoder`)."""
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


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu",
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
        state = load_state(path)
        mcfg, (sd, label) = configs_of(state)[0], model_weights(state, raw, path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        metadata = _safetensors_metadata(path, "encoder file")
        if metadata.get("format") == EXPORT_FORMAT:
            state = export_state(path)
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
        if isinstance(sd, dict) and sd.get("format") == CHECKPOINT_FORMAT:
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


def init_encoder_weights(encoder: torch.nn.Module, path: str | Path) -> None:
    """Copy the encoder read from `path` (see :func:`load_encoder`) into `encoder`, in place.

    Every parameter must have the same shape in both; otherwise a one-line
    GMAEError names the first that differs. The global RNG is left untouched.
    """
    heads = encoder.blocks[0].attn.num_heads if len(encoder.blocks) else None
    with torch.random.fork_rng(devices=[]):  # building the loaded encoder draws random initial weights
        theirs = load_encoder(path, num_heads=heads)[0].state_dict()
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
