"""Detection data from the generators and COCO files, and COCO's AP (gmae.evaluate.detection.data / .metric)."""

import json

import numpy as np
import pytest
import torch

from gmae.data import DeadLeaves, Sprites
from gmae.errors import GMAEError
from gmae.evaluate.detection.data import generated_set, read_coco, write_coco
from gmae.evaluate.detection.metric import evaluate

pytest.importorskip("pycocotools")


@pytest.mark.parametrize("name, cls", [("sprites", Sprites), ("deadleaves", DeadLeaves)])
def test_generated_boxes_and_masks_are_the_visible_objects(name, cls):
    data = generated_set(name, 48, 6, seed=3, min_pixels=10)
    source = cls(48, seed=3)
    assert [c["name"] for c in data.categories] == list(source.shape_names[1:])
    occluded = 0
    for i, (image, target) in enumerate(zip(data.images, data.targets)):
        s = source.sample(i)
        assert image.dtype == torch.uint8 and torch.equal(image, (s.image * 255).round().to(torch.uint8))
        whole = source.whole_shapes(i).reshape(-1, 48, 48) > 0
        ids = [j for j in range(1, s.num_objects) if (s.objects == j).sum() >= 10]
        assert len(target["masks"]) == len(ids)  # every object with 10 visible pixels, the others left out
        for mask, box, label, j in zip(target["masks"], target["boxes"], target["labels"], ids):
            assert torch.equal(mask.bool(), s.objects == j)  # exactly its visible pixels
            assert label == s.shapes[j]
            assert not (mask.numpy() & ~whole[j]).any()
            occluded += int(mask.sum() < whole[j].sum())  # the part a nearer object hides is cut away
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        if len(ids) > 1:  # visible parts never overlap
            assert target["masks"].sum(0).max() == 1
    assert occluded > 0


def test_class_agnostic_set_has_the_same_objects_under_one_category():
    shapes = generated_set("sprites", 40, 3, seed=4)
    agnostic = generated_set("sprites", 40, 3, seed=4, class_agnostic=True)
    assert agnostic.categories == [{"id": 1, "name": "object"}]
    for a, b in zip(shapes.targets, agnostic.targets):
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])
        assert (b["labels"] == 1).all() and len(b["labels"]) == len(a["labels"])


def test_small_objects_are_dropped():
    few = generated_set("deadleaves", 48, 3, min_pixels=200)
    many = generated_set("deadleaves", 48, 3, min_pixels=1)
    assert all(m.sum() >= 200 for t in few.targets for m in t["masks"])
    assert sum(len(t["labels"]) for t in few.targets) < sum(len(t["labels"]) for t in many.targets)


def test_coco_round_trip(tmp_path):
    data = generated_set("sprites", 40, 5, seed=1, start=7)
    json_path = write_coco(data, tmp_path / "annotations" / "instances.json", tmp_path / "images")
    back = read_coco(json_path, tmp_path / "images")
    assert back.categories == data.categories and back.image_ids == data.image_ids == [8, 9, 10, 11, 12]
    assert back.file_names == data.file_names
    for a, b in zip(data.images, back.images):
        assert torch.equal(a, b)
    for a, b in zip(data.targets, back.targets):
        assert set(a) == set(b) == {"boxes", "labels", "masks"}
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_coco_polygons_crowds_and_category_ids(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.jpg")
    coco = {"images": [{"id": 5, "file_name": "a.jpg", "height": 20, "width": 30}],
            "categories": [{"id": 17, "name": "cat"}, {"id": 3, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 3, "bbox": [2, 4, 10, 6], "area": 60, "iscrowd": 0,
                 "segmentation": [[2, 4, 12, 4, 12, 10, 2, 10]]},
                {"id": 2, "image_id": 5, "category_id": 17, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1,
                 "segmentation": {"size": [20, 30], "counts": [0, 25, 575]}}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    data = read_coco(tmp_path / "instances.json", tmp_path)
    assert data.image_ids == [5] and [c["id"] for c in data.categories] == [17, 3]
    t = data.targets[0]
    assert t["labels"].tolist() == [2]  # dog: the second category; the crowd region is not a target
    assert t["boxes"].tolist() == [[2, 4, 12, 10]]
    rows, cols = torch.nonzero(t["masks"][0], as_tuple=True)
    # the polygon, rasterised: the 10 x 6 pixels it covers
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (2, 11, 4, 9) and t["masks"][0].sum() == 60


def test_coco_errors(tmp_path):
    with pytest.raises(GMAEError, match="missing.json.*does not exist"):
        read_coco(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GMAEError, match="bad.json"):
        read_coco(tmp_path / "bad.json", tmp_path)
    coco = {"images": [{"id": 1, "file_name": "gone.png", "height": 4, "width": 4}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    (tmp_path / "i.json").write_text(json.dumps(coco))
    with pytest.raises(GMAEError, match="gone.png.*does not exist"):
        read_coco(tmp_path / "i.json", tmp_path)
    with pytest.raises(GMAEError, match="no detection data 'coco'"):
        generated_set("coco", 32, 1)


# --------------------------------------------------------------------------- metric


def as_predictions(targets, scores=None):
    return [{"boxes": t["boxes"].clone(), "labels": t["labels"].clone(),
             "scores": torch.ones(len(t["labels"])) if scores is None else scores[i],
             "masks": t["masks"][:, None].float()} for i, t in enumerate(targets)]


def test_ground_truth_as_predictions_scores_ap_1():
    data = generated_set("sprites", 64, 12, seed=0)
    ap = evaluate(data, as_predictions(data.targets))
    for iou_type in ("bbox", "segm"):
        assert ap[iou_type] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, iou_type


def test_shuffled_predictions_score_near_0():
    data = generated_set("sprites", 64, 12, seed=0)
    # every image gets the boxes and masks of the next image
    rolled = as_predictions(data.targets[1:] + data.targets[:1])
    ap = evaluate(data, rolled)
    assert ap["bbox"]["AP"] < 0.1 and ap["segm"]["AP"] < 0.1
    # the right boxes with the labels permuted among the categories
    permuted = as_predictions(data.targets)
    for p in permuted:
        p["labels"] = p["labels"] % 4 + 1
    ap = evaluate(data, permuted)
    assert ap["bbox"]["AP"] == 0.0 and ap["segm"]["AP"] == 0.0
    # nothing predicted at all
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, 64, 64)} for _ in data.targets]
    assert evaluate(data, empty)["bbox"]["AP"] == 0.0


def test_half_the_objects_found_scores_below_1():
    """Dropping every second image's detections halves the recall: AP lands near 0.5, not at either end."""
    data = generated_set("sprites", 64, 12, seed=0)
    preds = as_predictions(data.targets)
    for p in preds[::2]:
        for k in p:
            p[k] = p[k][:0]
    ap = evaluate(data, preds)["bbox"]["AP"]
    assert 0.3 < ap < 0.7
