"""Names the command line offers as choices, its value types and the help texts several commands share, kept apart
from the modules that use them.

Building the `gmae` parser reads these, and the modules that run the
commands import torch; holding the names here lets `gmae --help` and every
usage error answer without loading torch.
"""

import argparse

from ..errors import GMAEError

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


def parse_workers(value) -> int | str:
    """A num-workers setting: "auto" (gmae.runtime.threads.resolve_workers decides per data source and machine)
    or an integer >= 0 (0: load in the training process); GMAEError otherwise."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise GMAEError(f"num-workers must be auto or an integer >= 0 (0: load in the training process); "
                        f"got {value!r}")
    return int(text)


def workers(text: str) -> int | str:
    """argparse type of --num-workers: auto or a whole number >= 0; anything else is passed on as typed, for the
    config to refuse in its one line (parse_workers)."""
    try:
        return parse_workers(text)
    except GMAEError:
        return text


def positive_int(text: str) -> int:
    """argparse type of a count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def background_colour(text: str) -> tuple[float, ...]:
    """argparse type of a render background: white, black, grey (gray) or R,G,B with each value in [0, 1]."""
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5)}
    if text in named:
        return named[text]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected white, black, grey or R,G,B in [0,1]; got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"background values must be in [0, 1]; got {text!r}")
    return values


# ----- help texts that several commands' flags share (the config fields' metadata and gmae.cli read them)
CHECKPOINT_HELP = "a gmae checkpoint (.pt), a gmae .safetensors export, or a run folder (its newest checkpoint)"
RAW_WEIGHTS_HELP = ("use the checkpoint's raw weights, not the EMA of them that a run with --ema saves "
                    "(used by default when there is one)")
DEVICE_HELP = "auto (default: CUDA when available, else the CPU), cpu, cuda, cuda:1, ..."
ENCODER_NORM_HELP = ("the input normalisation of a ViT file without gmae's config: imagenet (default for "
                     "timm's and MAE's files, as they trained) or none (a gmae .pth timm export of a model "
                     "pre-trained without --normalize); gmae checkpoints and exports keep their own")
STOP_GRACE_HELP = ("after a stop signal (SIGTERM, SIGUSR1/2) the run saves at the end of the step and exits 75; "
                   "if no step ends within S seconds, or a second signal comes first, it exits at once, its "
                   "saved checkpoints intact (default {default:g}; 0: wait for the step)")
DIST_TIMEOUT_HELP = ("under torchrun: a collective that waits more than S seconds for the other processes (one hung "
                     "or stopped) ends this one with an error naming its rank (default {default:g}, torch's)")
WORKERS_HELP = ("data-loading processes (default auto: for an image folder on a GPU, the cores of this process, at "
                "most 10; otherwise 0)")
LABELLED_DATA_HELP = ("labelled data: digits (default; scikit-learn's 8x8 digits upsampled, stratified 80/20 "
                      "split, seed 0), cifar10:ROOT, cifar100:ROOT (python-pickle releases; ROOT holds "
                      "cifar-10-batches-py/ or cifar-100-python/, or is it), folder:ROOT (ROOT/train/CLASS/*.jpg "
                      "and ROOT/val/CLASS/*.jpg), or a bare ROOT, detected as one of these")
