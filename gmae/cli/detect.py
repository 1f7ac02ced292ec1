"""gmae detect: detection and instance segmentation fine-tuning of an encoder (ViTDet's Mask R-CNN), COCO AP."""

from __future__ import annotations

from ..config import DETECT_RESUMABLE, DetectConfig
from ..errors import GMAEError
from ..io.files import check_exists, check_output_folder
from .common import _add_training, _check_checkpoint, _train
from .flags import config_settings


def add_detect(sub) -> None:
    p = sub.add_parser("detect", help="fine-tune a detector (ViTDet's Mask R-CNN) on an encoder; COCO box and mask AP")
    _add_training(p, DETECT_RESUMABLE, DetectConfig, "results")
    p.set_defaults(func=cmd_detect)


def cmd_detect(args) -> int:
    dcfg = DetectConfig(**config_settings(args, DetectConfig))
    if not (args.resume or dcfg.checkpoint or dcfg.random_init):
        raise GMAEError("give --checkpoint (the encoder to fine-tune), --random-init for the baseline, or --resume "
                        "to continue a run")
    if dcfg.checkpoint:
        _check_checkpoint(dcfg.checkpoint)
    for path, flag, what in ((dcfg.data_json, "--data-json", "a COCO instances .json file"),
                             (dcfg.images, "--images", "the folder of its images"),
                             (dcfg.val_json, "--val-json", "a COCO instances .json file"),
                             (dcfg.val_dir, "--val-dir", "the folder of its images")):
        if path:
            check_exists(path, flag, f"give {flag} {what}")
    check_output_folder(dcfg.out)
    from ..evaluate.detection.train import detect

    results = _train(args, detect, dcfg, DETECT_RESUMABLE)
    if results is None:
        return 0
    print(f"done: {results['steps_run']} steps; {results['num_train']} train / {results['num_val']} val images")
    for kind in ("bbox", "segm"):
        if kind in results:
            print(f"{kind:>5}: " + "  ".join(f"{k} {100 * v:.1f}" for k, v in results[kind].items()))
    print(f"checkpoint: {results['checkpoint']}\nresults:    {results['out']}/results.json")
    return 0
