"""Training on a SLURM cluster: `gmae submit` (through submitit) and `srun gmae ...` in an sbatch script.

* :func:`submit` sends `gmae pretrain ...`, `finetune ...`, `detect ...` or `probe ...` to SLURM (or, for a
  test, to submitit's local executor) as a :class:`gmae.cli.TrainingJob`. Each task sets up
  torch.distributed from the job's environment and runs the command with
  ``--resume=auto``. When the run stops on the time-limit signal (submitit's
  SIGUSR2, or SIGUSR1) it has saved the step it stopped at (gmae.runtime.stopping); the
  job then requeues itself, and the requeued job continues from that checkpoint.
* :func:`slurm_task_env`: a process started by ``srun`` as one of several tasks
  (an sbatch script's ``srun gmae pretrain ...``) takes its rank, world size and
  rendezvous from SLURM's variables when torchrun's are absent.

This module imports neither torch nor submitit at the top: the command line
builds its parser from it, and submitit is an optional extra.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import GMAEError

SUBMITTABLE = ("pretrain", "finetune", "detect", "probe")
#: The submittable commands that write checkpoints and continue them (--resume=auto); the probe starts over.
RESUMING = ("pretrain", "finetune", "detect")
INSTALL = "pip install 'gmae[cluster]'"


# --------------------------------------------------------------------------- srun without torchrun


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-004,007],cpu1" -> "gpu003"."""
    found = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
    if found is None:
        raise GMAEError(f"cannot read SLURM's node list {nodelist!r}; export MASTER_ADDR (the first node's name)")
    return found.group(1) + (found.group(2) or "")


def slurm_task_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torch.distributed's variables for a task that `srun` started as one of several (empty otherwise).

    Only when torchrun's RANK and WORLD_SIZE are absent and srun's step has
    more than one task (SLURM_STEP_NUM_TASKS): a process run directly in the
    batch script, or under torchrun, is left alone. MASTER_ADDR defaults to the
    step's first node and MASTER_PORT to one derived from the job id; a value
    already set wins.
    """
    try:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    except ValueError:
        return {}
    if tasks <= 1 or "SLURM_PROCID" not in env or "RANK" in env or "WORLD_SIZE" in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
           "LOCAL_WORLD_SIZE": str(max(1, tasks // max(1, nodes)))}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 40000)
    return out


# --------------------------------------------------------------------------- gmae submit


def time_minutes(text: str) -> int:
    """argparse type of a time limit in sbatch --time's forms (minutes, MM:SS, H:MM:SS, D-H, D-H:MM,
    D-H:MM:SS), in whole minutes (seconds round up)."""
    found = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"expected minutes, H:MM:SS or D-HH:MM:SS (as sbatch --time); got {text!r}")
    parts = [int(p) for p in found.group(2).split(":")]
    if found.group(1) is not None:  # days-hours[:minutes[:seconds]]
        parts = [int(found.group(1)) * 24 + parts[0], *parts[1:]] + [0] * (3 - len(parts))
    else:  # minutes, minutes:seconds, or hours:minutes:seconds
        parts = [0] * (3 - len(parts)) + parts if len(parts) == 3 else [0, *parts] + [0] * (2 - len(parts))
    hours, minutes, seconds = parts
    total = hours * 60 + minutes + (seconds > 0)
    if total < 1:
        raise argparse.ArgumentTypeError(f"the time limit must be at least a minute; got {text!r}")
    return total


def key_value(text: str) -> tuple[str, str]:
    """argparse type of a further sbatch option: KEY=VALUE (account=proj, qos=high, constraint=volta32gb)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its --), got {text!r}")
    return key.strip().lstrip("-"), value


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise GMAEError(f"gmae submit needs submitit, which is not installed; {INSTALL}") from None
    return submitit


def job_command(command: list[str]) -> list[str]:
    """The command a job runs: for a run that checkpoints (RESUMING), `command` with --resume=auto in place of any
    --resume, so that the job and every requeue of it (a time limit, a preemption, a failed node) continue the
    newest checkpoint; any other command (the probe) as it is: a requeue runs it again."""
    if command[0] not in RESUMING:
        return list(command)
    out, i = [], 0
    while i < len(command):
        word = command[i]
        if word == "--resume":
            i += 2 if i + 1 < len(command) and command[i + 1] == "auto" else 1
            continue
        if not word.startswith("--resume="):
            out.append(word)
        i += 1
    return [*out, "--resume=auto"]


def submit(job, folder: str | Path, *, cluster: str | None = None, nodes: int = 1,
           gpus_per_node: int = 0, tasks_per_node: int | None = None, cpus_per_task: int | None = None,
           partition: str | None = None, time_min: int = 60, name: str = "gmae", signal_delay_s: int = 120,
           slurm: dict[str, str] | None = None):
    """Submit `job` (a checkpointable callable: gmae.cli.TrainingJob) as one job; returns submitit's Job.

    `cluster` is submitit's: None picks SLURM when there is one, "local" runs
    the tasks on this machine (one node). Each node runs `tasks_per_node`
    processes (default: one per GPU, or one), and the job's time limit is
    `time_min`; `signal_delay_s` before it, SLURM sends the signal that makes
    the run save and requeue.
    """
    submitit = import_submitit()
    tasks = tasks_per_node or max(1, gpus_per_node)
    if cluster in ("local", "debug") and nodes > 1:
        raise GMAEError(f"--cluster {cluster} runs on this machine only; give --nodes 1 (got {nodes})")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(name=name, nodes=nodes, tasks_per_node=tasks, timeout_min=time_min,
                  slurm_signal_delay_s=signal_delay_s, slurm_additional_parameters=dict(slurm or {}))
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if partition:
        params["slurm_partition"] = partition
    if executor.cluster != "slurm":  # slurm_* settings are SLURM's alone
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    return executor.submit(job)
