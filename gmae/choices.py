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

#: `gmae export` formats and the file extensions each accepts.
EXPORT_FORMATS = {"safetensors": (".safetensors",), "timm": (".safetensors", ".pth")}


def positive_int(text: str) -> int:
    """argparse type of a count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
