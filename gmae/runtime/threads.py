"""How many threads each gmae process computes with, decided in one place.

Why this exists: torch's CPU wheels run their intra-op work on GNU OpenMP
(libgomp), sized to every core, whose idle threads *spin* between parallel
regions. A training step is thousands of short regions with Python in
between, so one process keeps all cores busy even when only one thread has
work. Alone that is harmless (the spin buys a little latency); when a second
process shares the cores, each spinning thread holds a core the other
process's working thread needs, each region's barrier waits for a thread that
is not scheduled, and both runs slow down far beyond the fair 2x (measured:
4x to 9x each on 2 cores). numba's "workqueue" pool (the CPU renderer's)
sleeps on a condition variable and did not spin in our measurements.

The rules, applied by the `gmae` command before torch does any work:

* threads per process = ``--threads`` if given, else ``OMP_NUM_THREADS`` if the
  user set it, else usable cores (``os.sched_getaffinity``) // local processes
  (``LOCAL_WORLD_SIZE`` under torchrun), at least 1. torch and numba use it.
* ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy: idle OpenMP threads
  sleep instead of spinning. It must be in the environment before torch (and
  with it libgomp) is imported, which is why `prepare_environment` is a step
  of its own, run first thing by the CLI.
* DataLoader workers compute with one thread each (`worker_init`); how many
  there are (``--num-workers auto``) is `resolve_workers`.

A variable the user set is never overwritten.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ..errors import GMAEError

logger = logging.getLogger("gmae.runtime.threads")

WAIT_POLICY = "OMP_WAIT_POLICY"
OMP_THREADS = "OMP_NUM_THREADS"
NUMBA_THREADS = "NUMBA_NUM_THREADS"
PASSIVE = "PASSIVE"

# Variables this process put into its own environment (not the user's), so that
# a benchmark can start children without them.
_ADDED: set[str] = set()
_APPLIED: Decision | None = None  # the default, applied once per process


@dataclass(frozen=True)
class Decision:
    """Threads for this process's torch and numba pools, and where the number came from."""

    threads: int
    reason: str


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def local_processes(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _omp_threads(value: str) -> int | None:
    """The outer level of an OMP_NUM_THREADS value ("4" or libgomp's nested "4,2"), if valid."""
    try:
        n = int(value.split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def decide(cores: int, local_procs: int = 1, env: Mapping[str, str] | None = None,
           requested: int | None = None) -> Decision:
    """Threads per process: the --threads flag, else the user's OMP_NUM_THREADS, else cores // processes."""
    env = {} if env is None else env
    if requested is not None:
        if requested < 1:
            raise GMAEError(f"--threads must be at least 1; got {requested}")
        return Decision(requested, "--threads")
    if env.get(OMP_THREADS):
        n = _omp_threads(env[OMP_THREADS])
        if n is not None:
            return Decision(n, f"{OMP_THREADS}={env[OMP_THREADS]}")
    cores, local_procs = max(1, cores), max(1, local_procs)
    plural = "es" if local_procs > 1 else ""
    return Decision(max(1, cores // local_procs), f"{cores} usable cores / {local_procs} local process{plural}")


def environment_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The variables gmae adds before torch is imported: only those the user has not set."""
    return {} if WAIT_POLICY in env else {WAIT_POLICY: PASSIVE}


def prepare_environment(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Put `environment_defaults` into `env`; returns what was added.

    libgomp reads OMP_WAIT_POLICY once, when it is loaded with torch, so this
    does nothing (and returns {}) once torch is imported.
    """
    if "torch" in sys.modules:
        return {}
    added = environment_defaults(env)
    env.update(added)
    if env is os.environ:
        _ADDED.update(added)
    return added


def configure(requested: int | None = None) -> Decision:
    """Size torch's and numba's pools for this process (see the module doc); logged once.

    The default (no `requested`) is applied once per process: a program that
    calls `gmae.cli.main` several times, or has set its own thread count since,
    is not reset on every call. An explicit `requested` always applies.
    """
    global _APPLIED
    if requested is None and _APPLIED is not None:
        return _APPLIED
    decision = decide(usable_cores(), local_processes(), os.environ, requested)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(decision.threads)
    elif os.environ.get(OMP_THREADS) != str(decision.threads):
        # Not loaded yet (a usage error must not pay for loading it): OpenMP reads this when torch loads.
        if OMP_THREADS not in os.environ:
            _ADDED.add(OMP_THREADS)
        os.environ[OMP_THREADS] = str(decision.threads)
    numba_threads = decision.threads
    if sys.modules.get("numba") is not None:  # its pool size is fixed at import: limit what it uses
        import numba

        numba_threads = min(decision.threads, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(numba_threads)
    elif NUMBA_THREADS not in os.environ or NUMBA_THREADS in _ADDED:
        os.environ[NUMBA_THREADS] = str(decision.threads)  # read when numba is first imported
        _ADDED.add(NUMBA_THREADS)
    else:
        numba_threads = int(os.environ[NUMBA_THREADS]) if os.environ[NUMBA_THREADS].isdigit() else numba_threads
    if _APPLIED is None:
        logger.info("%d threads per process (%s); numba %d; %s=%s", decision.threads, decision.reason,
                    numba_threads, WAIT_POLICY, os.environ.get(WAIT_POLICY, "unset"))
    _APPLIED = decision
    return decision


def child_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` without the variables this process added itself: a child decides for itself."""
    return {k: v for k, v in env.items() if k not in _ADDED}


# DataLoader workers per process at most, for `resolve_workers`: MAE's loader runs 10 per GPU
# (facebookresearch/mae at efb2a80, main_pretrain.py line 90, `--num_workers` default 10).
MAX_AUTO_WORKERS = 10
AUTO = "auto"


def resolve_workers(value: int | str, source, device="cpu", cores: int | None = None,
                    local_procs: int | None = None) -> int:
    """DataLoader workers for `source` on `device`: an integer as given (gmae.config.parse_workers checked it);
    "auto" is

    * 0 for a source that does not read files: generated scenes and arrays in memory draw a sample in less time
      than a worker takes to hand it over (docs/training.md has the measurement);
    * 0 on the CPU: the training process's own threads already take the cores this process may use (`decide`),
      and a worker would take one of them;
    * for image folders (``reads_files``: JPEG decoding and resizing) on an accelerator, usable cores // local
      processes, at most MAX_AUTO_WORKERS, and 0 below 2 (a lone core gains nothing by decoding elsewhere).

    Workers never change the batches: each sample is a function of (seed, index) (gmae.data.stream), whichever
    process draws it."""
    if value != AUTO:
        return int(value)
    device_type = getattr(device, "type", str(device).split(":")[0])
    if not getattr(source, "reads_files", False) or device_type == "cpu":
        return 0
    cores = usable_cores() if cores is None else cores
    local_procs = local_processes() if local_procs is None else local_procs
    per_process = max(1, cores) // max(1, local_procs)
    return min(MAX_AUTO_WORKERS, per_process) if per_process >= 2 else 0


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: every pool in a data worker gets one thread.

    The main process already uses the cores; torch gives each worker one
    thread, but numpy's BLAS and numba would still start a pool per worker
    sized to every core. A worker also ignores the stop signals (gmae.runtime.stopping).
    """
    import torch

    from .stopping import ignore_in_worker

    ignore_in_worker()  # the main process decides when to stop, at a step boundary
    torch.set_num_threads(1)
    os.environ[NUMBA_THREADS] = "1"  # for a numba first imported in this worker
    if sys.modules.get("numba") is not None:
        import numba

        numba.set_num_threads(1)
    try:  # numpy's OpenBLAS / MKL and any OpenMP runtime loaded here (threadpoolctl comes with scikit-learn)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)
