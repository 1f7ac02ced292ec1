"""Stopping a training run cleanly when a scheduler asks: SIGTERM, SIGUSR1 (``sbatch --signal``), SIGUSR2 (submitit's).

While a run trains, :class:`StopGuard` replaces the handlers of these signals
with one that only records the first signal that arrives; later ones, a
second SIGTERM during the save included, are ignored. At the end of every step
the loop reads :attr:`StopGuard.signum`; under torchrun it all-reduces it
(max, gmae.runtime.distributed.max_across), so a signal sent to any one process stops
every process after the same step. The main process then writes that step's checkpoint
(atomically, as every checkpoint) and the run raises :class:`Stopped`; the
`gmae` command prints its message and exits with :data:`STOPPED_EXIT`.
The previous handlers come back when the guard's block ends.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry" -- here with --resume.
STOPPED_EXIT = 75


class Stopped(Exception):
    """A run stopped by a signal after saving the checkpoint of the step it stopped at."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: str, rank: int = 0, world_size: int = 1):
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        self.rank, self.world_size = rank, world_size
        who = f"rank {rank} of {world_size}: " if world_size > 1 else ""
        saved = f"saved {checkpoint}; " if rank == 0 else f"rank 0 saved step {step}; "
        super().__init__(f"{who}stopped by {self.signal_name} at step {step} of {steps}: "
                         f"{saved}continue with --resume")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopGuard:
    """Within its block, the stop signals set a flag instead of ending the process (main thread only:
    elsewhere Python cannot install handlers, and the guard does nothing)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:  # the first one counts; a repeat (during the save, say) changes nothing
            self.signum = signum

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

def ignore_in_worker() -> None:
    """A DataLoader worker ignores the stop signals: a scheduler signals every process of a job, and the
    run must reach its step boundary with its workers alive (the main process ends them when it stops)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
