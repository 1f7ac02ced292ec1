"""Data-parallel training through PyTorch's own engine, started by `torchrun`.

`torchrun --nproc_per_node=N -m gmae pretrain ...` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` reads them (env:// rendezvous)
and joins the process group: NCCL on CUDA, gloo on CPU. Run as a plain
command, `init` returns a single-process context and nothing else changes.

A collective (DDP's gradient all-reduce, a barrier) waits for every rank. If one
rank never joins (hung in I/O, stopped, lost its node while its sockets stay
open), the others would wait for ever and ignore SIGTERM; the process group's
``timeout`` (``--dist-timeout``) ends the wait with an error, and
`rank_named_timeouts` turns that error into one line naming the rank.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import GMAEError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and draws the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_from_env() -> int:
    """This process's rank under torchrun (0 when run as a plain command), before `init`."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def resolve_device(device: str) -> torch.device:
    """The device a command runs on: "auto" (every command's default) is CUDA when it is available, else the CPU;
    anything else must name a device this machine has (one-line GMAEError)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        requested = torch.device(device)
    except RuntimeError:
        raise GMAEError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if requested.type == "cuda" and not torch.cuda.is_available():
        raise GMAEError(f"device {device!r} asked for but CUDA is not available here; use --device cpu (or auto)")
    return requested


# Seconds a collective may wait for the other ranks: torch's own default (torch.distributed.constants.
# default_pg_timeout, 30 minutes). Not shorter, because healthy ranks wait in a barrier while the first one works
# alone: it writes a checkpoint (minutes for ViT-L on a slow shared file system), draws the end-of-run figures.
DEFAULT_TIMEOUT = 1800.0


def init(device: str, timeout: float = DEFAULT_TIMEOUT) -> Context:
    """Join the torchrun process group if there is one, whose collectives give up after `timeout` seconds;
    returns this process's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    requested = resolve_device(device)
    if world_size == 1:
        return Context(0, 1, requested)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if requested.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise GMAEError(f"rank {rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible")
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
    if not dist.is_initialized():
        global _STORE
        _STORE = _store(rank, world_size)
        dist.init_process_group("nccl" if requested.type == "cuda" else "gloo", store=_STORE,
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    return Context(rank, world_size, requested)


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective giving up on another rank: gloo says "Timed out waiting 3000ms for send
    operation" (and "Application timeout caused pair closure" once the pair is closed), NCCL "Watchdog caught
    collective operation timeout"."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        phrase in text for phrase in ("timed out waiting", "timeout caused pair closure", "collective operation timeout"))


@contextlib.contextmanager
def rank_named_timeouts(timeout: float):
    """Run a training loop; a collective that timed out becomes one GMAEError naming this rank."""
    try:
        yield
    except RuntimeError as e:
        if not timed_out(e) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise
        raise GMAEError(f"rank {rank_from_env()} of {os.environ['WORLD_SIZE']}: a collective waited more than "
                        f"--dist-timeout {timeout:g} s for the other processes (one of them hung, stopped or died); "
                        "the checkpoints already saved are intact: restart with --resume=auto") from None


def _store(rank: int, world_size: int) -> dist.Store:
    """The env:// rendezvous store; under torchrun's shared agent store, with keys of their own for each restart.

    torchrun's workers share the TCP store of its c10d rendezvous, which
    outlives a restart (``--max-restarts``): without a prefix of its own, a
    restart reads the addresses the dead processes published and fails to
    connect. The prefix is the restart count, which every node's agent
    advances when the workers fail together. With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` each start gets a new store and
    needs none (docs/cluster.md: a node that joins anew starts its count at 0).
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world_size))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    return dist.PrefixStore(f"gmae/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def mean_across(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a scalar over all processes (itself when single-process)."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def sum_across(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The element-wise sum of a tensor over all processes (itself when single-process)."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def max_across(value: int, ctx: Context) -> int:
    """The largest of an integer over all processes (itself when single-process)."""
    if not ctx.distributed:
        return value
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


#: The rendezvous store the process group was made with (init), which outlives it: shutdown's last handshake.
_STORE: dist.Store | None = None

#: Seconds the first process waits at shutdown for the others to have closed their connections.
SHUTDOWN_WAIT_S = 60.0


def shutdown(ctx: Context) -> None:
    """Leave the process group; the first process leaves last.

    Gloo's connections are closed as each process destroys its group. Had the first process gone (and closed
    its end) while another was still closing its own, that one's pending read would fail with "Connection reset
    by peer" and abort the process at exit; so every process says on the store when it is done, and the first
    waits for all of them (at most SHUTDOWN_WAIT_S) before it returns.
    """
    if not (ctx.distributed and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if _STORE is None:
        return
    done = _STORE.add("gmae/left", 1)
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while ctx.rank == 0 and done < ctx.world_size and time.monotonic() < deadline:
        time.sleep(0.01)
        done = _STORE.add("gmae/left", 0)
