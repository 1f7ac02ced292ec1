"""Exports for sharing: a gmae model, or its encoder under timm's names, written from a checkpoint.

Reading them back (and every other model file) is :func:`gmae.io.loader.load`.

``--format safetensors`` (a *gmae export*) holds the whole model: its full
``state_dict`` (frozen parameters such as the sin-cos ``pos_embed`` included) as
safetensors tensors, and in the safetensors metadata (string -> string)

    {"format": "gmae-export", "version": "1",
     "gmae_model_config": <ModelConfig as JSON>, "step": "<training step>",
     "weights": "EMA (decay 0.999)" | "raw"}

so that ``gmae.io.loader.load(path, "export")`` rebuilds the model with no pickle, no optimizer
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

``gmae.io.loader.load(path, "encoder")`` reads an encoder from any of: a gmae training checkpoint, a
gmae export, or a timm-named ViT state dict (``.safetensors``, or ``.pt``/``.pth``/
``.bin`` read with ``torch.load(weights_only=True)``, bare or under ``"model"`` or
``"state_dict"`` as in MAE's official checkpoints; a file without gmae's config is read
as ImageNet-normalised, as MAE and timm train, unless ``input_norm`` says otherwise); with ``into=ENCODER``
it copies such an encoder into a model (``gmae pretrain --init-encoder FILE``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import (
    CONFIG_KEY, EXPORT_FORMAT, EXPORT_VERSION, TIMM_FORMAT, configs_of, model_weights, write_atomically,
)
from ..config.choices import EXPORT_FORMATS
from ..config import IMAGENET_MEAN, IMAGENET_STD, PRESETS, ModelConfig, as_dict
from ..errors import GMAEError
from .loader import load

__all__ = ["CONFIG_KEY", "EXPORT_FORMAT", "FORMATS", "TIMM_FORMAT", "export_checkpoint",
           "input_mean_std", "timm_create_call", "timm_model_name"]

FORMATS = EXPORT_FORMATS  # format -> the file extensions it accepts
#: Formats holding only the encoder, under timm's names.
ENCODER_ONLY = ("timm", "mae")
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

    `state`: the checkpoint already read (``gmae.io.loader.load(checkpoint_path, "state")``), so that a caller that
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
        state = load(checkpoint_path, "state")
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
