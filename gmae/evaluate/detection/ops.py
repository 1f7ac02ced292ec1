"""Pure-torch kernels for torchvision's ``nms`` and ``roi_align``, used only where its compiled ops cannot load.

PyPI's torchvision is built against one torch; beside another (the CPU torch wheel next to the CUDA build of
torchvision that pip resolves for it) ``torchvision/_C.so`` does not load
(:mod:`gmae.evaluate.timm_support`), and Mask R-CNN then fails at its first ``nms``. :func:`install` gives the
two ops torchvision's detection models call (``batched_nms`` calls ``nms``; ``MultiScaleRoIAlign`` calls
``roi_align``; ``paste_masks_in_image`` is plain Python) kernels written with torch's own operators, under
torchvision's op schemas, so that torchvision's Python code runs unchanged. torchvision asks
``extension._has_ops()`` before it calls an op (torchvision 0.28.0: ``ops/boxes.py`` line 47 through
``_assert_has_ops``, ``ops/roi_align.py`` lines 276-283), answered once at import by whether ``_C`` loaded
(``extension.py`` lines 25-31); :func:`install` makes it answer True once the kernels are in place. Without
that, ``roi_align`` would take torchvision's own Python reference through ``torch.compile``, which on the
CPU needs a C++ compiler and compiles again for each new number of boxes.

The kernels are registered as ``CompositeImplicitAutograd``: autograd runs through the torch operators they
are made of, so ``roi_align``'s gradient reaches the features, as the compiled backward does.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..timm_support import import_torchvision

__all__ = ["install", "nms", "roi_align"]

# Kept alive for the whole process: a torch.library.Library's kernels go away with it.
_LIBRARY = None
ROI_ALIGN_SCHEMA = ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")


def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's ``nms``: indices (int64) of the boxes kept, by decreasing score; a box is dropped when its
    IoU with a kept box of higher score is above `iou_threshold`. Areas and IoU as torchvision's CPU kernel
    computes them (``csrc/ops/cpu/nms_kernel.cpp``: no +1 on widths, intersection clamped at 0)."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = dets[order]
    n = len(order)
    removed = np.zeros(n, dtype=bool)
    keep = []
    # IoU above the threshold of each box with the lower-scored ones, a block of rows at a time (the whole
    # n x n matrix at once for the few thousand boxes of a detector's image)
    for lo in range(0, n, NMS_BLOCK):
        over = (_iou(boxes[lo:lo + NMS_BLOCK], boxes) > iou_threshold).cpu().numpy()
        for i in range(lo, min(lo + NMS_BLOCK, n)):
            if not removed[i]:
                keep.append(i)
                removed[i + 1:] |= over[i - lo, i + 1:]
    return order[torch.tensor(keep, dtype=torch.long, device=dets.device)]


#: Rows of the IoU matrix :func:`nms` computes at once.
NMS_BLOCK = 2048


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) IoU of xyxy boxes, as torchvision's nms kernel computes it (a 0/0 is nan: kept)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _sample_grid(rois: torch.Tensor, spatial_scale, ph: int, pw: int, gh: int, gw: int, aligned: bool):
    """(y (k, ph*gh), x (k, pw*gw)) of the bilinear sampling points of boxes (k, 5), as torchvision's kernel
    places them (``csrc/ops/cpu/roi_align_kernel.cpp``): `gh` x `gw` evenly spaced points in each of the
    ph x pw bins."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:, None] * spatial_scale - offset).unbind(1)
    width, height = x2 - x1, y2 - y1
    if not aligned:  # the legacy boxes are at least one pixel across
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    iy = torch.arange(ph * gh, dtype=rois.dtype, device=rois.device)
    ix = torch.arange(pw * gw, dtype=rois.dtype, device=rois.device)
    # bin b, sample s -> start + b * bin + (s + 0.5) * bin / g = start + (i + 0.5) * bin / g with i = b * g + s
    return y1 + (iy + 0.5) * (height / (ph * gh)), x1 + (ix + 0.5) * (width / (pw * gw))


def roi_align(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision's ``roi_align`` (K, C, ph, pw) for `rois` (K, 5: batch index, x1, y1, x2, y2).

    Each bin is the mean of bilinear samples of `input`. A sample more than one pixel outside the map counts
    as 0; one within a pixel of the border is clamped onto it (``bilinear_interpolate`` of torchvision's
    kernel). That clamping is ``grid_sample``'s border padding with ``align_corners=True`` (pixel centres at
    -1 and 1), which does the bilinear sampling here, one ``grid_sample`` per image and sampling grid size.
    `sampling_ratio` <= 0 takes ceil(box size / bins) samples per bin, per box, as torchvision does.
    The boxes get no gradient, as in torchvision."""
    ph, pw = int(pooled_height), int(pooled_width)
    n, c, height, width = input.shape
    out = input.new_zeros(rois.shape[0], c, ph, pw)
    if rois.shape[0] == 0:
        return out
    done, pooled = [], []  # the boxes of each group and their bins, written into `out` at once
    rois = rois.detach().to(input.dtype)
    if sampling_ratio > 0:
        gh = gw = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.long)
    else:
        size = (rois[:, 3:5] - rois[:, 1:3]) * spatial_scale
        if not aligned:
            size = size.clamp(min=1.0)
        gw, gh = torch.ceil(size / torch.tensor([pw, ph], dtype=size.dtype, device=size.device)).long().cpu().unbind(1)
    batch = rois[:, 0].long().cpu()
    groups = torch.stack([batch, gh, gw], 1)
    for b, g_h, g_w in torch.unique(groups, dim=0).tolist():
        idx = torch.nonzero((groups == torch.tensor([b, g_h, g_w])).all(1)).squeeze(1)
        if g_h <= 0 or g_w <= 0:  # an empty box samples nothing: its bins stay 0
            continue
        y, x = _sample_grid(rois[idx.to(rois.device)], spatial_scale, ph, pw, g_h, g_w, aligned)
        inside = ((y >= -1) & (y <= height))[:, :, None] & ((x >= -1) & (x <= width))[:, None, :]
        gy = (2 * y / max(height - 1, 1) - 1)[:, :, None].expand(-1, -1, x.shape[1])
        gx = (2 * x / max(width - 1, 1) - 1)[:, None, :].expand(-1, y.shape[1], -1)
        grid = torch.stack([gx, gy], -1).reshape(1, -1, x.shape[1], 2)  # the boxes stacked along the height
        vals = F.grid_sample(input[b:b + 1], grid, mode="bilinear", padding_mode="border", align_corners=True)
        vals = vals.reshape(c, len(idx), ph * g_h, pw * g_w).transpose(0, 1)
        if not inside.all():
            vals = vals * inside[:, None].to(input.dtype)
        done.append(idx)
        pooled.append(F.avg_pool2d(vals, (g_h, g_w)))  # each bin's mean
    if not done:
        return out
    return out.index_copy(0, torch.cat(done).to(out.device), torch.cat(pooled))


def install() -> bool:
    """Register :func:`nms` and :func:`roi_align` as torchvision's ops when its compiled ones cannot load here,
    importing torchvision (:func:`gmae.evaluate.timm_support.import_torchvision`); True if they were
    registered (now or before), False where torchvision's own ops load and nothing is changed."""
    global _LIBRARY
    torchvision = import_torchvision()
    if _LIBRARY is not None:
        return True
    if torchvision.extension._has_ops():  # its compiled ops loaded
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    try:
        torch.ops.torchvision.roi_align  # noqa: B018  (declared already?)
    except (AttributeError, RuntimeError):
        lib.define(ROI_ALIGN_SCHEMA)
    lib.impl("nms", nms, "CompositeImplicitAutograd")
    lib.impl("roi_align", roi_align, "CompositeImplicitAutograd")
    _LIBRARY = lib
    # torchvision.ops.roi_align (the module: the package re-exports the function under the same name) took
    # its own reference to _has_ops at import
    for module in (torchvision.extension, sys.modules["torchvision.ops.roi_align"]):
        module._has_ops = lambda: True
    return True
