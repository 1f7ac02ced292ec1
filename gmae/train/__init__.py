"""Pre-training: one loop for GMAE and MAE.

Every source of randomness is a pure function of (seed, step): the samples of
step s are global sample numbers s*B ... s*B + B - 1 of a `SeededStream`, and the
masking noise of step s comes from a generator seeded with (seed, s). So a run
resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..runtime import distributed
from ..viz.board import Board, check_available
from ..io.checkpoint import configs_of, training_state
from ..config import PRETRAIN_RESUMABLE, ModelConfig, TrainConfig, as_dict, preset_of
from ..data import SeededStream, StepBatchSampler, build_dataset, held_out_batch, source_labels
from ..model.ema import WeightEMA
from ..errors import GMAEError
from ..io.loader import load
from ..io.files import checkpoint_path
from ..model import build_model, masking_noise, param_groups
from ..readouts.layout import layout_monitor
from ..config.recipes import pretrain_configs
from ..model.online_probe import OnlineProbe
from ..render import resolve_backend
from ..io.runs import autocast, learning_rate, prepare_metrics, refuse_changes, resume_from, resumed_config, say
from ..runtime.stopping import Stopped
from ..runtime.threads import resolve_workers, worker_init
from .engine import Engine, Task, run_folder
from ..viz.figures import figures_unavailable, save_reconstruction_figure

#: Images in the layout monitor's held-out batch (TrainConfig.layout_every).
LAYOUT_IMAGES = 8

FIGURE_IMAGES = 8


def settings(mcfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """A run's settings by name, as a resume compares them with the command line's: both configs and the preset."""
    return {**as_dict(mcfg), **as_dict(tcfg), "preset": preset_of(mcfg)}


def resolve_run(tcfg: TrainConfig, source, world_size: int, resumed: bool = False,
                changes: tuple[str, ...] = ()) -> TrainConfig:
    """`tcfg` made concrete for `source` and `world_size` processes (TrainConfig.resolved): a generated source
    (``shuffle = False``, a virtual length) has no epochs.

    A resumed run keeps its saved schedule (steps, warmup): only the micro-batch's accumulation follows
    the processes it runs on now, and a typed --epochs (in `changes`) sets a new length, as --steps does
    (which then also drops the saved epochs: the length is in steps from now on).
    """
    size = len(source) if getattr(source, "shuffle", True) else None
    if not resumed:
        return tcfg.resolved(size, world_size)
    epochs = None if "steps" in changes else tcfg.epochs  # the run's length, as it will be recorded
    # Resolved without epochs, steps and warmup stay as saved; only a typed --epochs recomputes the length.
    resolved = replace(tcfg, epochs=epochs if "epochs" in changes else None, warmup_epochs=None)
    return replace(resolved.resolved(size, world_size), epochs=epochs, warmup_epochs=tcfg.warmup_epochs)


def online_probe_step(probe: OnlineProbe, optimizer, labels: torch.Tensor, lr: float, ctx: distributed.Context,
                      batch_size: int) -> dict[str, float]:
    """One step of the online probe on the features its hooks kept during this step's forward passes.

    Its gradients are averaged over the processes (it is not under DDP) and the
    step is skipped if any is not finite. Returns each block's global
    train-batch accuracy and loss (``online_probe/acc_block{i}``,
    ``online_probe/loss_block{i}``, block i as in ``encoder.blocks.{i}``), from one
    all-reduce together with the gradients.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, losses, correct = probe.loss(labels)
    loss.backward()
    params = list(probe.parameters())
    depth = len(losses)
    # One all-reduce for everything: the gradients (summed, then / processes), each block's loss summed over
    # this process's images (its mean x images) and its correct count.
    flat = torch.cat([q.grad.reshape(-1) for q in params] + [losses * len(labels), correct.to(losses.dtype)])
    flat = distributed.sum_across(flat, ctx)
    if bool(torch.isfinite(flat).all()):
        offset = 0
        for q in params:
            q.grad.copy_(flat[offset : offset + q.numel()].view_as(q) / ctx.world_size)
            offset += q.numel()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    sums = flat[-2 * depth :].tolist()
    record = {}
    for i in range(depth):
        record[f"online_probe/acc_block{i}"] = sums[depth + i] / batch_size
    for i in range(depth):
        record[f"online_probe/loss_block{i}"] = sums[i] / batch_size
    return record


class PretrainTask(Task):
    """Pre-training's step on the engine: the masked reconstruction loss of GMAE or MAE, the online probe
    (on every process, after the step), the collapse and layout monitors (logged by the first process)."""

    def __init__(self, model, optimizer, mcfg: ModelConfig, tcfg: TrainConfig, ctx: distributed.Context, ema, online,
                 layout_batch, board):
        self.model, self.optimizer, self.mcfg, self.tcfg, self.ctx, self.ema = model, optimizer, mcfg, tcfg, ctx, ema
        self.probe, self.probe_optimizer, self.labels = online  # all None without --online-probe
        self.layout_batch, self.board = layout_batch, board
        self.batch_size, self.targets = tcfg.batch_size, None

    def prepare(self, batch, step):
        imgs, self.targets = batch if self.probe is not None else (batch, None)
        # The global batch's masks, sliced like the samples (global_batch takes [rank::world]).
        noise = masking_noise(self.tcfg.seed, step, self.tcfg.batch_size, self.mcfg.num_patches)
        return imgs.to(self.ctx.device, non_blocking=True), noise[self.ctx.rank :: self.ctx.world_size].to(self.ctx.device)

    def loss(self, net, micro, scale):
        # The model scales its loss (and the curvature its depth-order gradient uses) by 1/K.
        out = net(micro[0], micro[1], loss_scale=scale)
        return out.loss, out

    def after_step(self, step, output, applied, lr):
        if self.probe is None:
            return {}
        probed = online_probe_step(self.probe, self.probe_optimizer, self.targets.to(self.ctx.device, non_blocking=True),
                                   lr, self.ctx, self.tcfg.batch_size)
        return {k: round(v, 5) for k, v in probed.items()}

    def log(self, step, output):
        # GMAE's collapse monitors (scales at their cap, depth spread, opacity), so that a
        # collapse shows while it happens; computed after the timing, from this step's forward.
        record = {k: round(v, 5) for k, v in self.model.stats(output).items()}
        if self.layout_batch is not None and (step % self.tcfg.layout_every == 0 or step + 1 == self.tcfg.steps):
            # Does the geometry follow the image? No gradient, no random draw: training is unchanged.
            record.update({k: round(v, 5) for k, v in layout_monitor(self.model, self.layout_batch).items()})
            if self.probe is not None:
                self.probe.clear()  # the monitor's images are not the next step's
        return record

    def logged(self, record):
        if self.board is not None:
            self.board.log(record)

    def state(self, step):
        probe_state = None if self.probe is None else {"heads": self.probe.state_dict(),
                                                       "optimizer": self.probe_optimizer.state_dict(),
                                                       "classes": self.labels.names}
        return training_state(self.model, self.optimizer, step, as_dict(self.mcfg), as_dict(self.tcfg),
                              self.ema, probe_state)


def pretrain(mcfg: ModelConfig | None = None, tcfg: TrainConfig | None = None, resume: bool | str = False,
             progress: bool = True, changes: tuple[str, ...] = PRETRAIN_RESUMABLE, tensorboard: bool = False,
             given: dict[str, str] | None = None, *, recipe: str | None = None, **settings) -> dict:
    """Pre-train `mcfg` as `tcfg` says; returns a summary dict. Instead of the two configs, a `recipe` name
    and/or `settings` (fields of either config) build them as ``gmae pretrain --recipe`` does
    (gmae.config.recipes.pretrain_configs): ``pretrain(recipe="gmae-paper-vit-b", data="/data/imagenet/train")``.
    Writes into `tcfg.out`:

    checkpoint-NNNNNNN.pt (every `checkpoint_every` steps and at the end, newest
    `keep_checkpoints` kept), metrics.jsonl (one JSON object per step),
    reconstruction.png, and with `tensorboard` the same metrics as TensorBoard
    events in tensorboard/. With `resume` (True, or "auto": only if `tcfg.out`
    holds a checkpoint), the newest readable checkpoint's settings are used,
    except for the `changes` fields (from PRETRAIN_RESUMABLE), which come from
    `tcfg`; `given` ({setting: flag}, the flags a command line typed) makes a
    resume refuse a typed setting that differs from the saved one (GMAEError
    naming each), rather than ignore it. Under torchrun, every process trains
    on its share of each global batch and only the first one writes files. The first holds the folder's
    lock while it runs, so a second run into the same folder is refused.

    SIGTERM, SIGUSR1 or SIGUSR2 (gmae.runtime.stopping) stops the run after the step
    it arrives in, on every process alike; the checkpoint of that step is
    written and :class:`gmae.runtime.stopping.Stopped` is raised.
    """
    if mcfg is None and tcfg is None:
        mcfg, tcfg = pretrain_configs(recipe, **settings)
    elif mcfg is None or tcfg is None or recipe is not None or settings:
        raise GMAEError("pretrain() takes both configs (mcfg, tcfg), or a recipe and/or settings that build them")
    with run_folder(tcfg.out, tcfg.dist_timeout):
        if tensorboard:
            check_available()
        return _pretrain(mcfg, tcfg, resume, progress, changes, tensorboard, given or {})


def _pretrain(mcfg: ModelConfig, tcfg: TrainConfig, resume: bool | str, progress: bool,
              changes: tuple[str, ...], tensorboard: bool, given: dict[str, str]) -> dict:
    out = Path(tcfg.out)
    found = resume_from(out, resume, warn=say)
    state = None if found is None else found[1]
    if state is not None:
        saved_model, saved = configs_of(state)
        # The user may extend or relocate a run, not change what it trains: a flag that would is refused.
        refuse_changes(given, PRETRAIN_RESUMABLE, settings(mcfg, tcfg), settings(saved_model, saved))
        mcfg, tcfg = saved_model, resumed_config(saved, tcfg, changes, PRETRAIN_RESUMABLE)
    # The data source first: a wrong --data fails before anything is written.
    source = build_dataset(tcfg.data, mcfg.img_size, seed=tcfg.seed, on_bad_image=tcfg.on_bad_image,
                           scale=tcfg.crop_scale, interpolation=tcfg.interpolation)
    # The online probe's labels: data without them fails here too, before anything is written.
    labels = source_labels(source, tcfg.data, mcfg.img_size) if tcfg.online_probe else None
    ctx = distributed.init(tcfg.device, tcfg.dist_timeout)
    device = ctx.device
    tcfg = resolve_run(tcfg, source, ctx.world_size, resumed=state is not None, changes=changes)
    if state is not None and tcfg.steps < state["step"]:
        raise GMAEError(f"--steps {tcfg.steps} is below the checkpoint's step {state['step']}; "
                        "give a larger --steps (or --epochs) to extend the run")
    if ctx.is_main and state is None and tcfg.epochs is not None:
        say(f"{tcfg.epochs:g} epochs of {len(source)} images at batch {tcfg.batch_size}: {tcfg.steps} steps "
            f"({tcfg.warmup_steps} warmup)")
    if tcfg.batch_size % (ctx.world_size * tcfg.accum_steps):
        raise GMAEError(f"batch size {tcfg.batch_size} must be a multiple of processes x accum-steps "
                        f"({ctx.world_size} x {tcfg.accum_steps})")
    if labels is not None and tcfg.batch_size // ctx.world_size < 2:
        # Its heads' batch norm standardises each feature over this process's images: one image has no spread.
        raise GMAEError(f"--online-probe needs at least 2 images per process; batch size {tcfg.batch_size} over "
                        f"{ctx.world_size} processes gives {tcfg.batch_size // ctx.world_size}: raise --batch-size")
    if mcfg.model == "gmae":
        # A bad name, or a backend without the depth-order gradient the model asks for, fails now, not mid-run.
        needs = dict(depth_grad=mcfg.depth_grad == "swap", weighted=mcfg.depth_grad == "weighted")
        backend = resolve_backend(mcfg.render_backend, device, **needs)
        fastest = resolve_backend(mcfg.render_backend, device)
        if ctx.is_main and backend != fastest:  # 'auto' passed over a backend without what the model needs
            what = "depth-order gradient" if needs["depth_grad"] else "weighted compositing"
            tqdm.write(f"render backend: {backend}, because {fastest} has no {what} (--depth-grad {mcfg.depth_grad})")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tcfg.seed)  # the same initial weights in every process
    model = build_model(mcfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=0.0, betas=tcfg.betas)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]
    elif tcfg.init_encoder:  # a fresh run whose encoder starts from another run's, timm's or MAE's weights
        load(tcfg.init_encoder, "encoder", into=model.encoder)
    ema = WeightEMA(model, tcfg.ema) if tcfg.ema else None  # every process keeps it alike; the first saves it
    if ema is not None and state is not None:
        ema.load_state_dict(state["ema"])
    probe = probe_optimizer = None
    if labels is not None:
        # Apart from the model and its optimizer (and built without touching the global RNG), so that the model,
        # its updates and its checkpoint entries are those of a run without the probe. Its lr is the run's, at
        # every step (the same warmup and decay); no weight decay, as MAE's linear probe.
        probe = OnlineProbe(mcfg.embed_dim, mcfg.depth, len(labels.names), tcfg.seed).to(device)
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=0.0, betas=tcfg.betas, weight_decay=0.0)
        if state is not None:
            if "online_probe" not in state:
                raise GMAEError(f"{found[0]} was written with --online-probe but holds no online probe; "
                                "resume from an earlier checkpoint of the run")
            if state["online_probe"]["classes"] != labels.names:  # e.g. class folders added since
                raise GMAEError(f"{found[0]}'s online probe has the classes {state['online_probe']['classes'][:5]}, "
                                f"but --data {tcfg.data} now has {labels.names[:5]} ({len(labels.names)}); "
                                "resume with the data the run started with")
            probe.load_state_dict(state["online_probe"]["heads"])
            probe_optimizer.load_state_dict(state["online_probe"]["optimizer"])
        probe.attach(model.encoder)
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.distributed else model
    if tcfg.compile:
        net = torch.compile(net)
    amp = autocast(tcfg.precision, device)
    if ctx.is_main:
        if state is not None:
            say(f"resumed from {found[0].name} (step {start})")
        prepare_metrics(out / "metrics.jsonl", start, warn=say)

    # The layout monitor's fixed batch (gmae.readouts.layout): held-out images of a generated source, else the first.
    layout_batch = None
    if ctx.is_main and mcfg.model == "gmae" and tcfg.layout_every:
        layout_batch = held_out_batch(tcfg.data, mcfg.img_size, LAYOUT_IMAGES, tcfg.seed, source=source)[0].to(device)
    stream = SeededStream(source, tcfg.seed, labels=labels)
    loader = DataLoader(
        stream, batch_sampler=StepBatchSampler(tcfg.batch_size, start, tcfg.steps - start, ctx.rank, ctx.world_size),
        num_workers=resolve_workers(tcfg.num_workers, source, device), persistent_workers=False,
        worker_init_fn=worker_init,
    )
    model.train()
    engine = Engine(model, optimizer, tcfg, ctx, lambda step: learning_rate(step, tcfg), out, net=net, amp=amp,
                    ema=ema, progress=progress, desc=f"pretrain {mcfg.model}")
    t_start = time.perf_counter()
    with Board(out / "tensorboard", start) if tensorboard and ctx.is_main else contextlib.nullcontext() as board:
        task = PretrainTask(model, optimizer, mcfg, tcfg, ctx, ema, (probe, probe_optimizer, labels), layout_batch, board)
        try:
            last_loss = engine.run(task, loader, start)
        except Stopped:
            distributed.shutdown(ctx)
            raise
    if probe is not None:
        probe.detach_hooks()  # the figure's forward pass below is not the probe's
    elapsed = time.perf_counter() - t_start
    steps_done = tcfg.steps - start
    summary = {
        "steps": tcfg.steps, "steps_run": steps_done, "final_loss": last_loss, "skipped_steps": engine.skipped,
        "bad_images": getattr(source, "bad_images", 0),
        "steps_per_s": steps_done / elapsed if elapsed > 0 and steps_done else float("nan"),
        "checkpoint": str(checkpoint_path(out, tcfg.steps)), "out": str(out), "figure": None,
    }
    missing = figures_unavailable() if ctx.is_main else None
    if missing:
        summary["figure"] = f"not drawn: {missing}"  # a bare GPU machine: the run itself needs no matplotlib
    elif ctx.is_main:
        # A fixed set of images (the first of the stream) and masks for the figure.
        imgs = torch.stack([source.load(stream.index(i), stream.rng(i)) for i in range(FIGURE_IMAGES)]).to(device)
        noise = masking_noise(tcfg.seed, -1, FIGURE_IMAGES, mcfg.num_patches).to(device)
        with amp:
            summary["figure"] = str(save_reconstruction_figure(model, imgs, out / "reconstruction.png", noise))
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    return summary
