"""What a zero-shot readout is: one record, registered once (see :mod:`gmae.readouts`).

Nothing here imports torch: the command line reads the records (names, help,
flags) to build `gmae layers|edges|segment|gaussians` and answers `--help` and
usage errors before torch is loaded. A readout's functions import what they
compute with when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import GMAEError


class Flag:
    """One command-line option of a readout's command: what argparse's ``add_argument(*names, **options)`` takes."""

    def __init__(self, *names: str, **options):
        self.names, self.options = names, options

    def __repr__(self) -> str:
        return f"Flag({', '.join(map(repr, self.names))}, ...)"


@dataclass(frozen=True)
class Scorer:
    """How `gmae eval-zeroshot` scores a readout against ground truth, beside baselines scored alike.

    truth: the ground truth it is scored against, an attribute of each scored
        item (:class:`gmae.evaluate.zeroshot.Item`): ``"boundaries"``,
        ``"figure"`` or ``"depth"``; images without it are not scored by this readout.
    predict: (Gaussians near to far, Canvas, sides) -> the model's prediction for
        each image of the batch, at its truth's resolution (a square of side ``sides[i]``).
    score: (predictions {method: [one per image]}, truths [one per image],
        thresholds=..., progress=...) -> {method: {metric: value}}; it may add
        methods of its own (a prior computed from the model's predictions).
    baselines: {method: fn(item) -> prediction}: predictions made without the model.
    columns: (metric, title) of the scores in `gmae eval-zeroshot`'s table, in order.
    """

    truth: str
    predict: Callable
    score: Callable
    baselines: dict[str, Callable] = field(default_factory=dict)
    columns: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Readout:
    """One zero-shot readout: its command, what it computes from the depth-sorted Gaussians, its figure.

    name: the command (`gmae NAME`) and the figure's file name (``IMAGE_NAME.png``).
    summary: what the figure shows (`gmae --help` says "zero-shot SUMMARY (PNG per image)").
    compute: (Gaussians near to far, Canvas, options) -> what the figure shows, for the batch;
        ``options`` holds the values of its flags (the parsed command line).
    save: (image (C, H, W), computed (a batch of one), path) -> the path of the figure written.
    flags: the options of its command, besides those every readout command has.
    scorer: how `gmae eval-zeroshot` scores it (None: it is not scored).
    """

    name: str
    summary: str
    compute: Callable
    save: Callable
    flags: tuple[Flag, ...] = ()
    scorer: Scorer | None = None


#: The registered readouts by name, in the order of their commands.
READOUTS: dict[str, Readout] = {}


def register(readout: Readout) -> Readout:
    """Add `readout` to :data:`READOUTS` (its command, its scores); a name may be registered once."""
    if readout.name in READOUTS:
        raise GMAEError(f"a readout named {readout.name!r} is already registered")
    READOUTS[readout.name] = readout
    return readout
