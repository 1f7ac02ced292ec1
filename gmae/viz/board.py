"""Optional TensorBoard logging (`gmae pretrain --tensorboard`), as MAE's own training code writes.

The records are those of metrics.jsonl, one scalar per numeric field under
``train/`` (``train/loss``, ``train/lr``, ...), or under its own name where that
already names a section (``online_probe/acc_block0``: TensorBoard shows the online
probe's curves as a section of their own), written with
``torch.utils.tensorboard``. It needs the ``tensorboard`` package, an extra:
``pip install "gmae[tensorboard]"``; without it only `--tensorboard` is refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import GMAEError

MISSING = ("--tensorboard needs the tensorboard package, which is not installed: "
           "pip install 'gmae[tensorboard]' (or pip install tensorboard)")


def check_available() -> None:
    """GMAEError if the tensorboard package cannot be imported (checked without importing it or torch)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise GMAEError(MISSING)


class Board:
    """A TensorBoard event writer in `folder`; a run resumed at `start` hides its old events from there on."""

    def __init__(self, folder: str | Path, start: int = 0):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the steps after the checkpoint a killed run had logged are written again,
        # so TensorBoard must drop the old ones, as metrics.jsonl drops their lines.
        self.writer = SummaryWriter(str(folder), purge_step=start or None)

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
