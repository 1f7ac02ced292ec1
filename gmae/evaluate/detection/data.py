"""Detection data: boxes and masks of every visible object, from the generators' ground truth or a COCO file.

A :class:`DetectionData` holds uint8 images (what a COCO folder holds) and, per image, torchvision's
detection target: ``boxes`` (k, 4) float32 (x1, y1, x2, y2) in pixels, ``labels`` (k,) int64 in 1..K (0 is
torchvision's background) and ``masks`` (k, H, W) uint8; ``categories`` are COCO's (``{"id", "name"}``),
label i being ``categories[i - 1]``.

:func:`generated_set` draws ``sprites`` or ``deadleaves`` images and takes each object's visible pixels from
the generator's object-id map (:meth:`gmae.data.DeadLeaves.sample`): the parts another object hides are cut
away, as COCO annotates, and an object with fewer than ``min_pixels`` visible pixels is left out (a sliver
of a few pixels is not an object anyone could box). Its category is its
shape (disc, square, ... : the source's ``shape_names``), its box the tight box of its visible pixels, as
``pycocotools.mask.toBbox`` gives it (x = first column, w = last - first + 1).

:func:`write_coco` writes a set as a COCO folder (``instances.json``, PNG images, RLE masks) and
:func:`read_coco` reads any COCO instances file with its images (``--data-json instances.json --images
DIR``) through pycocotools: polygons and RLE masks alike, crowd regions left out of the targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import GMAEError

__all__ = ["DetectionData", "GENERATED", "coco_dict", "generated_set", "import_pycocotools", "mask_rle", "read_coco",
           "write_coco"]

INSTALL = "pip install 'gmae[detect]'"
#: The generators that give detection data: name -> the source's class, looked up in gmae.data.
GENERATED = {"sprites": "Sprites", "deadleaves": "DeadLeaves"}
#: Fewest visible pixels of an object kept as an annotation.
MIN_PIXELS = 10


def import_pycocotools():
    """pycocotools' ``mask`` and ``coco`` modules; GMAEError naming the extra when it is missing."""
    try:
        from pycocotools import coco, mask
    except ImportError:
        raise GMAEError(f"detection needs pycocotools (COCO's masks and AP): {INSTALL}") from None
    return coco, mask


@dataclass
class DetectionData:
    """Images (uint8 (3, H, W)) and their torchvision targets; see the module docstring."""

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    categories: list[dict]
    image_ids: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.image_ids:
            self.image_ids = list(range(1, len(self.images) + 1))
        if not self.file_names:
            self.file_names = [f"{i:06d}.png" for i in self.image_ids]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> "DetectionData":
        indices = list(indices)
        return DetectionData([self.images[i] for i in indices], [self.targets[i] for i in indices],
                             self.categories, [self.image_ids[i] for i in indices],
                             [self.file_names[i] for i in indices])


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    """(k, 4) float32 (x1, y1, x2, y2) of the tight boxes of (k, H, W) masks, pixel edges: x2 = last column + 1."""
    _, mask_api = import_pycocotools()
    if len(masks) == 0:
        return np.zeros((0, 4), np.float32)
    xywh = mask_api.toBbox(mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0))))
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)


def _target(masks: np.ndarray, labels, boxes: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """torchvision's target of (k, H, W) masks; `boxes` (k, 4) xyxy, else the masks' tight boxes."""
    masks = np.ascontiguousarray(masks, dtype=np.uint8).reshape(len(labels), *masks.shape[-2:])
    boxes = _boxes_of(masks) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "masks": torch.from_numpy(masks)}


def generated_set(name: str, image_size: int, count: int, seed: int = 0, start: int = 0,
                  min_pixels: int = MIN_PIXELS, class_agnostic: bool = False) -> DetectionData:
    """`count` images (indices `start`, `start` + 1, ...) of the generator `name` ("sprites" or "deadleaves")
    at `image_size`, with the boxes and masks of their visible objects; see the module docstring.
    `class_agnostic`: one category, "object", instead of the shapes (finding objects without naming them)."""
    from ... import data

    if name not in GENERATED:
        raise GMAEError(f"no detection data {name!r}: the generated ones are {', '.join(GENERATED)}; "
                        "or give a COCO file with --data-json and --images")
    source = getattr(data, GENERATED[name])(image_size, seed=seed)
    categories = [{"id": i, "name": n} for i, n in enumerate(source.shape_names) if i > 0]
    images, targets = [], []
    for index in range(start, start + count):
        s = source.sample(index)
        ids = torch.arange(1, s.num_objects)
        visible = (s.objects[None] == ids[:, None, None]).numpy()
        keep = visible.sum((1, 2)) >= min_pixels
        images.append((s.image * 255).round().to(torch.uint8))
        labels = s.shapes[1:][torch.from_numpy(keep)].numpy()
        targets.append(_target(visible[keep], np.ones_like(labels) if class_agnostic else labels))
    if class_agnostic:
        categories = [{"id": 1, "name": "object"}]
    return DetectionData(images, targets, categories, list(range(start + 1, start + count + 1)))


def mask_rle(mask: np.ndarray) -> dict:
    """A (H, W) mask as COCO's JSON form of a run-length encoding: {"size": [H, W], "counts": str}."""
    _, mask_api = import_pycocotools()
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_dict(data: DetectionData) -> dict:
    """`data` as a COCO instances dict (images, annotations with RLE masks, categories)."""
    images, annotations = [], []
    for image, target, image_id, name in zip(data.images, data.targets, data.image_ids, data.file_names):
        images.append({"id": int(image_id), "file_name": name, "height": int(image.shape[1]),
                       "width": int(image.shape[2])})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"].numpy()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id),
                                "category_id": data.categories[label - 1]["id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": int(mask.sum()), "iscrowd": 0, "segmentation": mask_rle(mask)})
    return {"info": {"description": "written by gmae"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": data.categories}


def write_coco(data: DetectionData, json_path: str | Path, images_dir: str | Path) -> Path:
    """Write `data` as a COCO folder: the images as PNG files in `images_dir`, the annotations to `json_path`."""
    from PIL import Image

    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    for image, name in zip(data.images, data.file_names):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images_dir / name)
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(coco_dict(data)))
    return json_path


def _load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise GMAEError(f"image {path} named in the COCO file does not exist; give --images the folder of "
                        "the file names in its \"images\" list")
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError) as e:
        raise GMAEError(f"image {path} cannot be read ({type(e).__name__}); it may be truncated") from None


def read_coco(json_path: str | Path, images_dir: str | Path) -> DetectionData:
    """A COCO instances file and its images folder as :class:`DetectionData`: the categories in the file's
    order, labelled 1..K; crowd annotations and those without area left out; masks from polygons or RLE."""
    import contextlib
    import io

    coco_api, _ = import_pycocotools()
    json_path, images_dir = Path(json_path), Path(images_dir)
    if not json_path.is_file():
        raise GMAEError(f"COCO file {json_path} does not exist; give --data-json an instances .json file")
    if not images_dir.is_dir():
        raise GMAEError(f"images folder {images_dir} does not exist; give --images the folder of the COCO images")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = coco_api.COCO(str(json_path))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise GMAEError(f"COCO file {json_path} cannot be read as COCO instances ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:100]}); it needs \"images\", \"annotations\" and "
                        "\"categories\"") from None
    categories = [{"id": c["id"], "name": c["name"]} for c in coco.dataset.get("categories", [])]
    if not categories:
        raise GMAEError(f"COCO file {json_path} has no categories")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images, targets, ids, names = [], [], [], []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        image = _load_rgb(images_dir / info["file_name"])
        h, w = image.shape[1:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise GMAEError(f"image {images_dir / info['file_name']} is {w}x{h} but the COCO file says "
                            f"{info.get('width')}x{info.get('height')}")
        masks, labels, boxes = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            if ann["category_id"] not in label_of:
                raise GMAEError(f"COCO file {json_path}: annotation {ann['id']} has category "
                                f"{ann['category_id']}, which is not in its categories")
            x, y, bw, bh = ann["bbox"]
            mask = coco.annToMask(ann)
            if mask.any() and bw > 0 and bh > 0:
                masks.append(mask)
                labels.append(label_of[ann["category_id"]])
                boxes.append([x, y, x + bw, y + bh])  # the annotated box: a polygon's box is not its mask's
        stack = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        images.append(image)
        targets.append(_target(stack, labels, np.array(boxes, np.float32)))
        ids.append(int(image_id))
        names.append(info["file_name"])
    if not images:
        raise GMAEError(f"COCO file {json_path} lists no images")
    return DetectionData(images, targets, categories, ids, names)
