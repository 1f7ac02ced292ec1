"""Names the command line offers as choices, and its value types, kept apart from the modules that use them.

Building the `gmae` parser reads these, and the modules that run the
commands import torch; holding the names here lets `gmae --help` and every
usage error answer without loading torch.
"""

import argparse

#: `gmae bench` benchmarks, in the order they run.
BENCHMARKS = ("render_speedup", "coverage_growth", "render_backends", "step_ratio_tiny", "step_ratio_base224", "many_gaussians",
              "default_step", "contention", "contention_ddp")

#: Scene probes (`gmae probe --data deadleaves|sprites --task ...`, gmae.evaluate.scene): the generated
#: sources they read, their tasks in print order, and the default split sizes.
SCENE_DATA = ("deadleaves", "sprites")
SCENE_TASKS = ("count", "shape", "front", "figure")
SCENE_IMAGES = {"train": 2000, "val": 1000}

#: `gmae probe --protocol`: the linear-probe protocols (gmae.evaluate.probe), and each one's settings when not
#: given (a recipe or the command line may change them). cached: SGD on cached features, batch 256. mae: MAE's
#: main_linprobe.py lines 46, 55, 66 (90 epochs, wd 0, 10 warmup epochs), at batch 256 instead of 16384 and
#: blr 6.4 instead of 0.1: 6.4 is MAE's lr per step (blr 0.1 x 16384 / 256, lines 60, 239-240). LARS scales each
#: step to lr x 0.001 of the weight's norm whatever the gradient's size, so how far the head moves is lr x steps;
#: the linear scaling rule would cut MAE's lr 64x at batch 256, on top of the ~16x fewer steps a data set of
#: thousands of images gives over 90 epochs. Measured on digits (tiny random encoder, 90 epochs): blr 0.1
#: stays at chance, 6.4 reaches 75 % (docs/evaluation.md, "Linear-probe protocols").
PROBE_PROTOCOLS = ("cached", "mae")
PROBE_DEFAULTS = {
    "cached": {"epochs": 100, "batch_size": 256, "blr": 0.1, "weight_decay": 0.0, "warmup_epochs": 10},
    "mae": {"epochs": 90, "batch_size": 256, "blr": 6.4, "weight_decay": 0.0, "warmup_epochs": 10},
}
#: `gmae probe --batch-size` with the cached protocol: the feature-extraction batch.
EXTRACTION_BATCH = 128

#: `gmae export` formats and the file extensions each accepts.
EXPORT_FORMATS = {"safetensors": (".safetensors",), "timm": (".safetensors", ".pth"), "mae": (".pth",)}


def positive_int(text: str) -> int:
    """argparse type of a count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
