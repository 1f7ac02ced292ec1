"""Names the command line offers as choices, kept apart from the modules that use them.

Building the `gmae` parser reads these, and the modules that run the
commands import torch; holding the names here lets `gmae --help` and every
usage error answer without loading torch.
"""

#: `gmae bench` benchmarks, in the order they run.
BENCHMARKS = ("render_speedup", "coverage_growth", "step_ratio_tiny", "step_ratio_base224", "many_gaussians",
              "contention", "contention_ddp")

#: `gmae export` formats and the file extensions each accepts.
EXPORT_FORMATS = {"safetensors": (".safetensors",), "timm": (".safetensors", ".pth")}
