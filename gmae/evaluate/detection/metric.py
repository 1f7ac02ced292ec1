"""COCO's AP, AP50 and AP75 for boxes and masks, by pycocotools' COCOeval (the metric of the paper's COCO row).

Predictions are torchvision's detection outputs, one dict per image of a :class:`DetectionData`: ``boxes``
(k, 4) xyxy, ``scores`` (k,), ``labels`` (k,) in 1..K and, for masks, ``masks`` (k, 1, H, W) or (k, H, W)
probabilities, binarised at 0.5 as torchvision's detection reference does (``references/detection/
coco_eval.py``, ``masks > 0.5``).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch

from .data import DetectionData, coco_dict, import_pycocotools, mask_rle

__all__ = ["IOU_TYPES", "coco_results", "evaluate"]

IOU_TYPES = ("bbox", "segm")
#: COCOeval.stats entries: AP at IoU 0.5:0.95, at 0.5 and at 0.75 (pycocotools' cocoeval.py, summarize()).
STATS = {"AP": 0, "AP50": 1, "AP75": 2}


def coco_results(data: DetectionData, predictions: list[dict], with_masks: bool = True) -> list[dict]:
    """The predictions as COCO's result list: image_id, category_id, bbox (x, y, w, h), score, and an RLE
    segmentation where `with_masks`."""
    if len(predictions) != len(data):
        raise ValueError(f"{len(predictions)} predictions for {len(data)} images")
    results = []
    for image_id, pred in zip(data.image_ids, predictions):
        boxes = pred["boxes"].detach().cpu().float()
        scores, labels = pred["scores"].detach().cpu().tolist(), pred["labels"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        masks = None
        if with_masks:
            m = pred["masks"].detach().cpu()
            masks = (m.reshape(len(scores), *m.shape[-2:]) > 0.5).numpy().astype(np.uint8)
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            result = {"image_id": int(image_id), "category_id": data.categories[int(label) - 1]["id"],
                      "bbox": [float(v) for v in box], "score": float(score)}
            if masks is not None:
                result["segmentation"] = mask_rle(masks[i])
            results.append(result)
    return results


def evaluate(data: DetectionData, predictions: list[dict], iou_types=IOU_TYPES) -> dict[str, dict[str, float]]:
    """{"bbox": {"AP", "AP50", "AP75"}, "segm": {...}} of `predictions` on `data`, in [0, 1] (COCOeval's
    stats; nan where `data` has no annotation to score against). No prediction at all scores 0."""
    coco_api, _ = import_pycocotools()
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = coco_api.COCO()
        gt.dataset = coco_dict(data)
        gt.createIndex()
        results = coco_results(data, predictions, with_masks="segm" in iou_types)
        out = {}
        for iou_type in iou_types:
            if not results:
                out[iou_type] = {k: 0.0 for k in STATS}
                continue
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = {k: (math.nan if ev.stats[i] < 0 else float(ev.stats[i])) for k, i in STATS.items()}
    return out
