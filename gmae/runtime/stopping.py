"""Stopping a training run cleanly when a scheduler asks: SIGTERM, SIGUSR1 (``sbatch --signal``), SIGUSR2 (submitit's).

While a run trains, :class:`StopGuard` replaces the handlers of these signals
with one that records the first signal that arrives. At the end of every step
the loop reads :attr:`StopGuard.signum`; under torchrun it all-reduces it
(max, gmae.runtime.distributed.max_across), so a signal sent to any one process stops
every process after the same step. The main process then writes that step's checkpoint
(atomically, as every checkpoint) and the run raises :class:`Stopped`; the
`gmae` command prints its message and exits with :data:`STOPPED_EXIT`.
The previous handlers come back when the guard's block ends.

A stop must also stop a run whose step does not end (a hung data loader, a
step far longer than the scheduler's notice): a second signal ends the process
at once, and so does the grace period (``grace_s``, `--stop-grace`) running
out after the first. Either way the process exits with :data:`STOPPED_EXIT`
and one line saying so; the checkpoints already saved are intact, since every
checkpoint is written to a temporary file and renamed into place
(gmae.io.checkpoint.write_atomically), so an exit mid-save leaves only a
temporary file behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry" -- here with --resume.
STOPPED_EXIT = 75
# Signals this close to the first are the same stop delivered twice, not a second request.
REPEAT_S = 2.0


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
    elsewhere Python cannot install handlers, and the guard does nothing). A second signal, or `grace_s`
    seconds after the first without the block ending (0: no limit), ends the process at once with
    STOPPED_EXIT; `where` names what the one line says is left intact (a run folder)."""

    def __init__(self, grace_s: float = 60.0, where: str = ""):
        self.signum = 0
        self.grace_s, self.where = grace_s, where
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._stopping, self._first = False, 0.0

    def stopping(self) -> None:
        """The loop reached a step boundary and is acting on the stop (saving, then raising Stopped): the grace
        period ends, and further signals are ignored so that the checkpoint of that step is written."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()

    def _exit_now(self, why: str) -> None:
        kept = f"; the checkpoints saved in {self.where} are intact" if self.where else ""
        print(f"gmae: {why}: exiting now{kept}; continue with --resume", file=sys.stderr, flush=True)
        os._exit(STOPPED_EXIT)  # from a handler or a timer thread: no step boundary to wait for

    def _handle(self, signum, frame) -> None:
        if self.signum:
            # A second signal before the step boundary: the user or the scheduler will not wait for the step to
            # end. Once the run is stopping (saving that step's checkpoint) it is ignored, and so is a repeat
            # within REPEAT_S of the first: one stop can arrive twice (SLURM signals every process of a step,
            # and torchrun forwards the signal it receives to its workers).
            if not self._stopping and time.monotonic() - self._first > REPEAT_S:
                self._exit_now(f"a second signal ({signal.Signals(signum).name}) before the step ended")
            return
        self.signum, self._first = signum, time.monotonic()
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._exit_now,
                                          (f"no step ended within {self.grace_s:g} s of {signal.Signals(signum).name}",))
            self._timer.daemon = True
            self._timer.start()

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_in_worker() -> None:
    """A DataLoader worker ignores the stop signals: a scheduler signals every process of a job, and the
    run must reach its step boundary with its workers alive (the main process ends them when it stops)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
