"""One training process of `gmae bench`'s contention benchmarks.

Run as ``python -m gmae.bench.worker JSON`` (or under ``torchrun -m``) by
`gmae.bench.suite`; not a user command. It trains the default `tiny` pre-training
step (dead-leaves, the preset's batch, the same `train_step` and data loading
as `gmae pretrain`) and prints one JSON line: steps, seconds, threads.

JSON keys: ``cpus`` (CPU ids to pin this process to, before torch starts),
``defaults`` (apply gmae's thread defaults as the `gmae` command does; false
measures torch's and numba's own), ``threads`` (like ``--threads``),
``batch_size`` (global), ``warmup`` steps, then either ``seconds`` (train
until that long has passed, starting when the file ``go`` appears, after
writing the file ``ready``) or ``steps`` (a fixed count, for torchrun, whose
processes must agree on when to stop).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(spec: dict) -> dict:
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])
    from ..runtime import threads

    if spec.get("defaults", True):
        threads.prepare_environment()  # before torch is imported
    import torch
    from torch.utils.data import DataLoader

    from ..runtime import distributed
    from ..config import model_config, train_config
    from ..data import SeededStream, StepBatchSampler, build_dataset
    from ..model import build_model, param_groups
    from ..io.runs import learning_rate
    from ..train import PretrainTask
    from ..train.engine import Engine

    if spec.get("defaults", True):
        threads.configure(spec.get("threads"))
    mcfg = model_config("tiny")
    tcfg = train_config("tiny", batch_size=spec.get("batch_size"))
    ctx = distributed.init("cpu")
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg).train()
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=0.0, betas=tcfg.betas)
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.distributed else model
    loader = iter(DataLoader(SeededStream(build_dataset("deadleaves", mcfg.img_size, seed=tcfg.seed), tcfg.seed),
                             batch_sampler=StepBatchSampler(tcfg.batch_size, 0, None, ctx.rank, ctx.world_size)))
    amp = torch.autocast("cpu", enabled=False)
    engine = Engine(model, optimizer, tcfg, ctx, lambda s: learning_rate(s, tcfg), net=net, amp=amp)
    task = PretrainTask(model, optimizer, mcfg, tcfg, ctx, None, (None, None, None), None, None)
    step = 0

    def one_step():  # the engine's step as a run takes it: the lr, this process's share and masks, one update
        nonlocal step
        engine.set_lr(step)
        engine.step(task, task.prepare(next(loader), step))
        step += 1

    for _ in range(spec.get("warmup", 3)):
        one_step()
    if spec.get("ready"):
        Path(spec["ready"]).touch()
        while not os.path.exists(spec["go"]):  # every process starts timing at the same moment
            time.sleep(0.005)
    done, t0 = 0, time.perf_counter()
    if spec.get("steps"):
        for _ in range(spec["steps"]):
            one_step()
        done = spec["steps"]
    else:
        while done < 2 or time.perf_counter() - t0 < spec["seconds"]:
            one_step()
            done += 1
    elapsed = time.perf_counter() - t0
    distributed.shutdown(ctx)
    return {"steps": done, "seconds": elapsed, "steps_per_s": done / elapsed, "batch_size": tcfg.batch_size,
            "threads": torch.get_num_threads(), "world_size": ctx.world_size, "rank": ctx.rank,
            "wait_policy": os.environ.get(threads.WAIT_POLICY, "")}


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    if result["rank"] == 0:
        print(json.dumps(result), flush=True)
