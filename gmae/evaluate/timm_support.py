"""The one door to timm (``pip install 'gmae[timm]'``): every use of timm in gmae goes through :func:`import_timm`.

timm is optional: gmae's models, pre-training and the default fine-tuning
need none of it; MAE's fine-tuning regularisers (mixup / cutmix with a
soft-target loss, RandAugment, random erasing) come from it, as they do in MAE
itself (MAE ``main_finetune.py`` lines 28-29, ``util/datasets.py`` line 37).

timm imports torchvision. PyPI's torchvision wheels are built against one torch
build; beside another (say the CPU torch wheel ``2.13.0+cpu`` next to the CUDA
build of torchvision 0.28.0 that pip resolves for it) torchvision's compiled
ops (``torchvision/_C.so``) cannot load (it needs ``libc10_cuda.so``), and
torchvision's ``_meta_registrations.py`` (line 163 in 0.28.0,
``@torch.library.register_fake("torchvision::nms")``) then raises
``RuntimeError: operator torchvision::nms does not exist`` at import, so
``import timm`` fails. gmae needs only torchvision's pure-Python transforms,
never its compiled ops, so before torchvision is first imported
:func:`import_timm` checks whether ``_C.so`` loads and, if it does not,
declares the schemas of the two ops torchvision registers fakes for (``nms``
and ``qnms``; no kernel: calling them would still fail, as it would anyway).
:func:`import_torchvision` does the same for torchvision alone; the detector
gives ``nms`` and ``roi_align`` pure-torch kernels
(:mod:`gmae.evaluate.detection.ops`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

from ..errors import GMAEError

__all__ = ["import_timm", "import_torchvision", "torchvision_ops_loadable"]

INSTALL = "pip install 'gmae[timm]'"

# Kept alive for the whole process: a torch.library.Library's definitions go away with it.
_SCHEMA_LIBRARY = None


def torchvision_ops_loadable() -> bool | None:
    """Whether torchvision's compiled ops (``_C.so``) load here; None if torchvision or its ``_C`` is not
    installed. Found with ``importlib.util.find_spec``, so torchvision itself is not imported."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("_C*.so"))
    if not libs:
        return None
    try:
        ctypes.CDLL(str(libs[0]))
    except OSError:
        return False
    return True


def _declare_torchvision_op_schemas() -> None:
    """Declare torchvision::nms and ::qnms (schemas only) so that torchvision's import can register its fakes."""
    global _SCHEMA_LIBRARY
    import torch

    if _SCHEMA_LIBRARY is not None or "torchvision" in sys.modules:
        return  # done already, or too late: torchvision was imported (successfully or not) before us
    try:
        torch.ops.torchvision.nms  # noqa: B018  (defined already: by a loaded _C.so, or by someone else)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMA_LIBRARY = lib


def import_torchvision():
    """The ``torchvision`` module, importable even where its compiled ops cannot load here (their schemas
    declared first, see the module docstring). GMAEError when torchvision is missing or still fails."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise GMAEError(f"this needs torchvision: {INSTALL}")
    if torchvision_ops_loadable() is False:
        _declare_torchvision_op_schemas()
    return _import("torchvision", ())


def _import(name: str, submodules: tuple[str, ...]):
    """``import name`` (and its `submodules`), a failure told as a one-line GMAEError."""
    try:
        for module in (name, *submodules):
            importlib.import_module(module)
    except (ImportError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:160]
        raise GMAEError(f"{name} could not be imported ({type(e).__name__}: {detail}); reinstall it with "
                        f"{INSTALL} (a torchvision built for this torch)") from None
    return sys.modules[name]


def import_timm():
    """The ``timm`` module, importable even beside a torchvision whose compiled ops cannot load here.

    Raises GMAEError naming the extra to install when timm (or torchvision) is missing.
    """
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        raise GMAEError(f"this needs timm and torchvision (MAE's mixup, cutmix, RandAugment and random erasing): "
                        f"{INSTALL}")
    import_torchvision()
    # timm.data: Mixup, RandAugment; timm.data.random_erasing: RandomErasing (not exported by timm.data);
    # timm.loss: SoftTargetCrossEntropy
    return _import("timm", ("timm.data", "timm.data.random_erasing", "timm.loss"))
