"""`gmae bench`: speed figures, each a ratio of two timings taken in the same run.

The machines this runs on are shared and noisy, so absolute times mean little;
a ratio of two things timed side by side (interleaved, medians) is what is
reported and what the performance targets are stated in.

  render_speedup     fast backend vs the torch reference (and vs a dense k*H*W
                     renderer at 128^2), forward + backward, B=8, k=256
  coverage_growth    fast backend at k=4096 over k=256, Gaussians 1/16 the area
                     (constant coverage): cost should follow footprint, not k
  render_backends    every render backend of the device (CUDA: triton, gsplat, torch;
                     CPU: cpu, torch), forward + backward in ms at k = 256 and 4096
                     (CUDA: B=64, 224^2), with and without the depth-order gradient,
                     each over the torch reference's time
  step_ratio_tiny    GMAE over MAE training-step time, `tiny` preset, k = 256 Gaussians both
                     as 256 query tokens x 1 (the paper's shape) and as 64 tokens x 4
  step_ratio_base224 the same at ViT-B/16, 224^2, batch 8 (CUDA: 64); both step_ratio
                     benchmarks in `--precision` (fp32 or bf16 autocast) and, with
                     `--compile`, with torch.compile'd models
  many_gaussians     GMAE training step at k = 4096 as 256 tokens x 16 over k = 256 as
                     256 x 1, `tiny` and `base` (the decoder is the same; only the head and
                     the rendering grow)
  default_step       the tiny preset's training step over the previous default's
                     (`PREVIOUS_TINY_DEFAULT`), each model first trained for a few
                     hundred steps on dead-leaves so that its Gaussians have grown
                     to their trained sizes (the render's cost follows them)
  contention         the default tiny pre-training step, in separate processes
                     pinned to the same 2 cores: alone, then two at once; each
                     one's throughput as a fraction of solo (fair share 0.5),
                     with gmae's thread defaults and without them
  contention_ddp     torchrun (gloo), 2 processes on those 2 cores, over 1
                     process at the same global batch
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..runtime import threads
from ..config.choices import BENCHMARKS
from ..config import model_config
from ..errors import GMAEError
from ..model import build_model, masking_noise, param_groups
from ..render import DEPTH_GRAD_BACKENDS, RenderSettings, is_available, rasterize, resolve_backend
from ..render.reference import rasterize_dense
from ..io.runs import autocast



def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Median seconds of each function, calling them in turn (a, b, a, b, ...)."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------- rendering


def random_scene(batch: int, k: int, size: int, std: tuple[float, float], seed: int = 0, device: str = "cpu"):
    """k random anisotropic Gaussians per image with std in `std` pixels: rasterize()'s inputs."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(batch, k, 2, generator=g) * size
    sd = std[0] + (std[1] - std[0]) * torch.rand(batch, k, 2, generator=g)
    theta = math.pi * torch.rand(batch, k, generator=g)
    cos, sin = theta.cos(), theta.sin()
    vx, vy = sd[..., 0] ** 2, sd[..., 1] ** 2
    sxx, syy, sxy = cos**2 * vx + sin**2 * vy, sin**2 * vx + cos**2 * vy, cos * sin * (vx - vy)
    det = sxx * syy - sxy**2
    conics = torch.stack([syy / det, -sxy / det, sxx / det], -1)
    colors = torch.rand(batch, k, 3, generator=g)
    opacities = 0.1 + 0.9 * torch.rand(batch, k, generator=g)
    depths = torch.rand(batch, k, generator=g)
    return [t.to(device) for t in (means, conics, colors, opacities, depths)]


def _render_step(backend_or_fn, scene, size, depth_tau: float = 0.0):
    """A closure running forward + backward of a fixed weighting of the render (with depth_tau > 0: and the
    depth-order gradient, for a loss of curvature 2 at every pixel)."""
    inputs = [t.clone().requires_grad_(i < 4 or depth_tau > 0) for i, t in enumerate(scene)]
    g = torch.Generator().manual_seed(1)
    w_img = torch.randn(scene[0].shape[0], 3, size, size, generator=g).to(scene[0].device)
    curvature = torch.full_like(w_img[:, 0], 2.0) if depth_tau > 0 else None

    def step():
        if callable(backend_or_fn):
            image, _ = backend_or_fn(*inputs, height=size, width=size)
        else:
            image, _ = rasterize(*inputs, height=size, width=size,
                                 settings=RenderSettings(backend=backend_or_fn, depth_tau=depth_tau),
                                 loss_curvature=curvature)
        torch.autograd.grad(image, inputs[:5] if depth_tau > 0 else inputs[:4], w_img)

    return step


def render_speedup(backend: str = "cpu", sizes=(128, 224), batch: int = 8, k: int = 256,
                   repeats: int = 5, dense_at: int = 128, device: str = "cpu") -> dict:
    out = {"backend": backend, "batch": batch, "k": k}
    for size in sizes:
        scene = random_scene(batch, k, size, (2.0, 6.0), device=device)
        fns = {"fast": _render_step(backend, scene, size), "reference": _render_step("torch", scene, size)}
        if size == dense_at and device == "cpu":
            fns["dense"] = _render_step(rasterize_dense, scene, size)
        t = timed_interleaved(fns, repeats, device=device)
        row = {"fast_s": t["fast"], "reference_s": t["reference"], "vs_reference": t["reference"] / t["fast"]}
        if "dense" in t:
            row.update(dense_s=t["dense"], vs_dense=t["dense"] / t["fast"])
        out[str(size)] = row
    return out


def coverage_growth(backend: str = "cpu", size: int = 224, batch: int = 8, repeats: int = 5, device: str = "cpu") -> dict:
    """k=4096 Gaussians with 1/4 the std (1/16 the area) vs k=256: same total coverage."""
    few = random_scene(batch, 256, size, (2.0, 6.0), device=device)
    many = random_scene(batch, 4096, size, (0.5, 1.5), device=device)
    t = timed_interleaved({"k256": _render_step(backend, few, size), "k4096": _render_step(backend, many, size)},
                          repeats, device=device)
    return {"backend": backend, "size": size, "batch": batch, "k256_s": t["k256"], "k4096_s": t["k4096"],
            "ratio": t["k4096"] / t["k256"]}


def device_backends(device: str) -> list[str]:
    """The render backends that run on `device`, fastest first: triton, gsplat, torch on CUDA; cpu, torch on the
    CPU (triton's CPU interpreter is for tests only)."""
    candidates = ("triton", "gsplat", "torch") if device.startswith("cuda") else ("cpu", "torch")
    return [name for name in candidates if is_available(name)]


def render_backends(device: str = "cpu", batch: int | None = None, ks=(256, 4096), size: int = 224,
                    repeats: int = 5, depth_tau: float = 0.1) -> dict:
    """Forward + backward milliseconds of every backend of the device at each k, Gaussians of std 2-6 px at
    k = 256 and 1/sqrt(k/256) of that above (constant coverage), plain and with the depth-order gradient (for the
    backends that have it); each row also over the torch reference's time in the same interleaved loop."""
    batch = batch or (64 if device.startswith("cuda") else 8)
    backends = device_backends(device)
    rows = []
    for k in ks:
        shrink = math.sqrt(k / 256)
        scene = random_scene(batch, k, size, (2.0 / shrink, 6.0 / shrink), device=device)
        for tau in (0.0, depth_tau):
            names = [n for n in backends if tau == 0 or n in DEPTH_GRAD_BACKENDS]
            t = timed_interleaved({n: _render_step(n, scene, size, tau) for n in names}, repeats, device=device)
            rows += [{"backend": n, "k": k, "depth_grad": tau > 0, "ms": t[n] * 1e3, "vs_torch": t["torch"] / t[n]}
                     for n in names]
    return {"device": device, "batch": batch, "size": size, "rows": rows}


# --------------------------------------------------------------------------- training steps


# The layouts of k = 256 Gaussians step_ratio_* time: (query tokens, Gaussians per token).
STEP_RATIO_LAYOUTS = ((256, 1), (64, 4))


def _training_step(cfg, batch_size: int, device: str, seed: int, precision: str = "fp32", compile: bool = False):
    """A closure running one optimizer step of a fresh model of `cfg` on a fixed batch and mask, and the model."""
    torch.manual_seed(seed)  # the same encoder initialisation for every model
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.rand(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size,
                      generator=torch.Generator().manual_seed(seed)).to(device)
    noise = masking_noise(seed, 0, batch_size, cfg.num_patches).to(device)
    optimize = _optimizer_step(model, opt, precision, compile)
    return (lambda: optimize(imgs, noise)), model, imgs, noise


def _optimizer_step(model, opt, precision: str = "fp32", compile: bool = False):
    """A function running one optimizer step of `model` on a batch (imgs, noise), as `gmae pretrain` does: in
    `precision` (fp32, or bf16 autocast) and, with `compile`, through torch.compile."""
    net = torch.compile(model) if compile else model

    def step(imgs, noise):
        with autocast(precision, imgs.device):
            loss = net(imgs, noise).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _layout(queries: int, per_query: int) -> str:
    return f"{queries}x{per_query}"


def step_ratio(preset: str = "tiny", batch_size: int = 32, repeats: int = 10, warmup: int = 2,
               device: str = "cpu", seed: int = 0, layouts=STEP_RATIO_LAYOUTS, precision: str = "fp32",
               compile: bool = False, **overrides) -> dict:
    """Median training-step seconds of GMAE (each layout of q tokens x m Gaussians) and MAE on one preset,
    batch and mask, and their ratios; all timed in one interleaved loop (the warm-up steps include compiling)."""
    steps = {}
    cfg = model_config(preset, model="mae", **overrides)
    steps["mae"] = _training_step(cfg, batch_size, device, seed, precision, compile)[0]
    backend = None
    for q, m in layouts:
        cfg = model_config(preset, num_gaussians=q * m, gaussians_per_query=m, **overrides)
        steps[_layout(q, m)], model, imgs, noise = _training_step(cfg, batch_size, device, seed, precision, compile)
        backend = resolve_backend(cfg.render_backend, device)
        # the renderer alone, forward + backward, on this model's Gaussians
        steps[f"render {_layout(q, m)}"] = _gaussian_render_step(model, imgs, noise)
    t = timed_interleaved(steps, repeats, warmup, device)
    rows = []
    for q, m in layouts:
        gmae_s, render_s = t[_layout(q, m)], t[f"render {_layout(q, m)}"]
        rows.append({"queries": q, "gaussians_per_query": m, "num_gaussians": q * m, "gmae_step_s": gmae_s,
                     "ratio": gmae_s / t["mae"], "gmae_imgs_per_s": batch_size / gmae_s, "render_s": render_s,
                     "render_share": render_s / gmae_s})
    return {"preset": preset, "batch_size": batch_size, "img_size": cfg.img_size, "device": device,
            "precision": precision, "compile": compile, "render_backend": backend,
            "mae_step_s": t["mae"], "mae_imgs_per_s": batch_size / t["mae"], "layouts": rows}


def many_gaussians(preset: str = "tiny", batch_size: int = 32, repeats: int = 5, warmup: int = 1,
                   device: str = "cpu", seed: int = 0, queries: int = 256, per_query: int = 16) -> dict:
    """GMAE training step at k = queries x per_query Gaussians over the step at k = queries x 1: the decoder
    runs the same tokens, so the ratio is the price of the extra Gaussians (head, projection, rendering)."""
    steps = {}
    for m in (1, per_query):
        cfg = model_config(preset, num_gaussians=queries * m, gaussians_per_query=m)
        steps[m], model, imgs, noise = _training_step(cfg, batch_size, device, seed)
        steps[f"render {m}"] = _gaussian_render_step(model, imgs, noise)
    t = timed_interleaved(steps, repeats, warmup, device)
    few, many = t[1], t[per_query]
    return {"preset": preset, "batch_size": batch_size, "img_size": cfg.img_size, "device": device,
            "queries": queries, "gaussians_per_query": per_query, "k_few": queries, "k_many": queries * per_query,
            "few_step_s": few, "many_step_s": many, "ratio": many / few,
            "few_render_share": t["render 1"] / few, "many_render_share": t[f"render {per_query}"] / many}


# The tiny preset's default before the layout map (docs/reports/layout.md): the masked loss at 75%, positions from the head.
# default_step times the current default against it.
PREVIOUS_TINY_DEFAULT = dict(loss="masked", mask_ratio=0.75, position_source="head")


def default_step(batch_size: int = 16, warm_steps: int = 300, repeats: int = 10, device: str = "cpu",
                 seed: int = 0, previous: dict = PREVIOUS_TINY_DEFAULT) -> dict:
    """Training-step time of the tiny preset's default over the previous default's (`previous` overrides).

    A fresh model's Gaussians all start at the same size whatever c, but the render's cost follows their
    footprint, which training changes (larger c, larger Gaussians): so each model is first trained for
    warm_steps on dead-leaves batches (the preset's lr), then both are timed interleaved on one batch.
    """
    from ..config import train_config
    from ..data import DeadLeaves

    tcfg = train_config("tiny")
    source = DeadLeaves(model_config("tiny").img_size, seed=seed)
    steps, configs = {}, {"default": model_config("tiny"), "previous": model_config("tiny", **previous)}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = build_model(cfg).to(device).train()
        opt = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.blr * batch_size / 256,
                                betas=tcfg.betas)
        step = _optimizer_step(model, opt)
        for i in range(warm_steps):
            imgs = torch.stack([source.load(i * batch_size + j) for j in range(batch_size)]).to(device)
            step(imgs, masking_noise(seed, i, batch_size, cfg.num_patches).to(device))
        imgs = torch.stack([source.load(10**6 + j) for j in range(batch_size)]).to(device)
        noise = masking_noise(seed, 10**6, batch_size, cfg.num_patches).to(device)
        steps[name] = lambda step=step, imgs=imgs, noise=noise: step(imgs, noise)
    t = timed_interleaved(steps, repeats, 1, device)
    changed = {k: (getattr(configs["previous"], k), getattr(configs["default"], k)) for k in previous
               if getattr(configs["previous"], k) != getattr(configs["default"], k)}
    return {"batch_size": batch_size, "warm_steps": warm_steps, "device": device, "default_step_s": t["default"],
            "previous_step_s": t["previous"], "ratio": t["default"] / t["previous"], "changed": changed}


def _gaussian_render_step(model, imgs, noise):
    """Projection + rasterization forward and backward on the model's own Gaussians."""
    from ..render.gaussians import Gaussians

    with torch.no_grad():
        latent, _, ids_restore = model.encoder(imgs, model.cfg.mask_ratio, noise)
        g = model.forward_decoder(latent, ids_restore)
    weights = torch.rand_like(imgs)

    def step():
        leaves = Gaussians(*(t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.colors, g.opacities)))
        torch.autograd.grad((model.render(leaves) * weights).sum(), [leaves.means, leaves.scales, leaves.colors, leaves.opacities])

    return step


# --------------------------------------------------------------------------- processes sharing cores


def busy_cores(seconds: float = 1.0, stat: str = "/proc/stat") -> float | None:
    """Cores' worth of CPU time other processes used over `seconds` while this one sleeps (None off Linux).

    Taken right before a measurement, unlike the load average, which still
    counts the benchmark's own processes of the minute before.
    """
    def sample():
        with open(stat) as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values[:8]), values[3] + values[4]  # total and idle + iowait (guest time is already in user)

    try:
        (total0, idle0), _ = sample(), time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    return (elapsed - (idle1 - idle0)) / elapsed * (os.cpu_count() or 1) if elapsed > 0 else None


def _shared_cpus(n: int = 2) -> list[int] | None:
    """The first n CPUs this process may use, for pinning the benchmark's processes; None where unsupported."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))[:n]


def _worker_env() -> dict[str, str]:
    """This process's environment without what gmae added to it, and gmae importable from anywhere."""
    env = threads.child_environment()
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


def run_workers(specs: list[dict], torchrun: int = 0, timeout: float = 300.0) -> list[dict]:
    """Start one `gmae.bench.worker` per spec (or one torchrun job of `torchrun` processes), time them together.

    Workers with a time window start timing at the same moment: each writes a
    ready file after its warm-up steps, and all start when the go file appears.
    Returns each worker's JSON result (rank 0's for torchrun).
    """
    python = [sys.executable]
    if torchrun:
        import importlib.util

        if not torch.distributed.is_available() or importlib.util.find_spec("torch.distributed.run") is None:
            raise GMAEError("contention_ddp needs torchrun (torch.distributed), which this PyTorch build lacks")
        python += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="gmae-bench-") as tmp:
        go = os.path.join(tmp, "go")
        procs = []
        try:
            for i, spec in enumerate(specs):
                if "seconds" in spec:
                    spec = {**spec, "ready": os.path.join(tmp, f"ready{i}"), "go": go}
                procs.append(subprocess.Popen([*python, "-m", "gmae.bench.worker", json.dumps(spec)], env=_worker_env(),
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            ready = [os.path.join(tmp, f"ready{i}") for i, spec in enumerate(specs) if "seconds" in spec]
            while not all(os.path.exists(r) for r in ready):
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    break  # reported below
                time.sleep(0.02)
            Path(go).touch()
            results = []
            for p in procs:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if p.returncode != 0 or not out.strip():
                    last = (err.strip().splitlines() or ["no output"])[-1]
                    raise GMAEError(f"a benchmark process failed (exit {p.returncode}): {last}")
                results.append(json.loads(out.strip().splitlines()[-1]))
            return results
        except subprocess.TimeoutExpired:
            raise GMAEError(f"benchmark processes did not finish within {timeout:.0f} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def contention(seconds: float = 8.0, batch_size: int | None = None, timeout: float = 300.0) -> dict:
    """Throughput of the default tiny pre-training step alone and beside a second identical process.

    Both processes are pinned to the same 2 CPUs (all cores of the machine this
    project is developed on), so the figure means the same on bigger machines.
    Measured with gmae's thread defaults (what `gmae pretrain` does) and
    without them (torch's and numba's own, the behaviour before them).
    """
    cpus = _shared_cpus(2)
    base = {"cpus": cpus, "batch_size": batch_size, "seconds": seconds}
    # Other work on the machine changes every figure here: say how much there was.
    out = {"cpus": cpus, "seconds": seconds, "busy_before": busy_cores()}
    for label, defaults in (("gmae", True), ("without_defaults", False)):
        spec = {**base, "defaults": defaults}
        solo = run_workers([spec], timeout=timeout)[0]
        pair = run_workers([spec, spec], timeout=timeout)
        fractions = [r["steps_per_s"] / solo["steps_per_s"] for r in pair]
        out[label] = {"solo_steps_per_s": solo["steps_per_s"], "pair_steps_per_s": [r["steps_per_s"] for r in pair],
                      "fractions": fractions, "min_fraction": min(fractions), "machine_total": sum(fractions),
                      "threads": solo["threads"], "wait_policy": solo["wait_policy"] or "unset",
                      "batch_size": solo["batch_size"]}
    return out


def contention_ddp(steps: int = 30, batch_size: int | None = None, timeout: float = 300.0) -> dict:
    """torchrun with 2 gloo processes on 2 CPUs over 1 process on them, at the same global batch."""
    cpus = _shared_cpus(2)
    spec = {"cpus": cpus, "batch_size": batch_size, "steps": steps, "defaults": True}
    busy = busy_cores()
    one = run_workers([spec], timeout=timeout)[0]
    two = run_workers([spec], torchrun=2, timeout=timeout)[0]
    return {"cpus": cpus, "steps": steps, "busy_before": busy, "batch_size": one["batch_size"],
            "one_steps_per_s": one["steps_per_s"],
            "ddp_steps_per_s": two["steps_per_s"], "ratio": two["steps_per_s"] / one["steps_per_s"],
            "one_threads": one["threads"], "ddp_threads": two["threads"], "world_size": two["world_size"]}


def run(names=BENCHMARKS, device: str = "cpu", repeats: int = 5, batch_size: int = 32, precision: str = "fp32",
        compile: bool = False, render: dict | None = None) -> dict:
    """Run the named benchmarks; the fast backend is auto's: "cpu" on CPU, "triton" (else "gsplat") on CUDA.
    `precision` and `compile` apply to the step_ratio benchmarks, `render` (batch, ks, size) to render_backends."""
    cuda = device.startswith("cuda")
    backend = resolve_backend("auto", device)
    step = dict(device=device, precision=precision, compile=compile)
    results = {}
    for name in names:
        if name == "render_speedup":
            results[name] = render_speedup(backend, repeats=repeats, device=device)
        elif name == "coverage_growth":
            results[name] = coverage_growth(backend, repeats=repeats, device=device)
        elif name == "render_backends":
            results[name] = render_backends(device, repeats=repeats, **(render or {}))
        elif name == "step_ratio_tiny":
            results[name] = step_ratio("tiny", batch_size, repeats=max(repeats, 5), **step)
        elif name == "step_ratio_base224":
            # CPU: batch 8 and 2 repeats keep it to about a minute on 2 cores
            results[name] = step_ratio("base", 64 if cuda else 8, repeats=max(repeats, 5) if cuda else 2,
                                       warmup=2 if cuda or compile else 1, **step)
        elif name == "default_step":
            results[name] = default_step(device=device)
        elif name == "contention":
            results[name] = contention()
        elif name == "contention_ddp":
            results[name] = contention_ddp()
        elif name == "many_gaussians":
            # base: batch 4 and 2 repeats keep it to about a minute on 2 CPU cores
            results[name] = {"tiny": many_gaussians("tiny", batch_size, repeats=max(repeats, 5), device=device),
                             "base": many_gaussians("base", 4, repeats=2, warmup=1, device=device)}
    return results


def format_results(results: dict) -> str:
    """The human-readable table of `run`'s results."""
    lines = []
    for name, r in results.items():
        if name == "render_speedup":
            for size in (k for k in r if k.isdigit()):
                row = r[size]
                text = (f"{r['backend']} {row['fast_s'] * 1e3:.1f} ms vs reference {row['reference_s'] * 1e3:.0f} ms: "
                        f"{row['vs_reference']:.0f}x")
                if "vs_dense" in row:
                    text += f"; vs dense {row['dense_s'] * 1e3:.0f} ms: {row['vs_dense']:.0f}x"
                lines.append((f"render_speedup {size}px", f"B={r['batch']} k={r['k']} fwd+bwd: {text}"))
        elif name == "render_backends":
            for row in r["rows"]:
                swap = row["depth_grad"]
                lines.append((f"{name} {row['backend']} k={row['k']}{' swap' if swap else ''}",
                              f"fwd+bwd {row['ms']:.2f} ms; torch / this = {row['vs_torch']:.2f}  (B={r['batch']}, "
                              f"{r['size']}px, {r['device']}{', with the depth-order gradient' if swap else ''})"))
        elif name == "coverage_growth":
            lines.append((name, f"{r['backend']} k=4096 {r['k4096_s'] * 1e3:.1f} ms / k=256 {r['k256_s'] * 1e3:.1f} ms "
                                f"at {r['size']}px, constant coverage: {r['ratio']:.2f}x"))
        elif name.startswith("step_ratio"):
            for row in r["layouts"]:  # the token count beside each ratio: it, not k, drives the decoder's cost
                lines.append((f"{name} {row['queries']}x{row['gaussians_per_query']}",
                              f"GMAE k={row['num_gaussians']} as {row['queries']} tokens x {row['gaussians_per_query']} "
                              f"{row['gmae_step_s'] * 1e3:.0f} ms / MAE {r['mae_step_s'] * 1e3:.0f} ms = "
                              f"{row['ratio']:.3f}; rendering {row['render_share']:.1%} of the GMAE step  "
                              f"({r['preset']}, {r['img_size']}px, batch {r['batch_size']}, {r['device']}"
                              f"{_step_mode_text(r)}; GMAE {row['gmae_imgs_per_s']:.0f} img/s)"))
        elif name == "default_step":
            changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in r["changed"].items()) or "nothing"
            lines.append((name, f"tiny default {r['default_step_s'] * 1e3:.0f} ms / previous default "
                                f"{r['previous_step_s'] * 1e3:.0f} ms = {r['ratio']:.3f}; target <= 1.3  (changed: "
                                f"{changed}; each after {r['warm_steps']} training steps, batch {r['batch_size']}, "
                                f"{r['device']})"))
        elif name == "contention":
            for label in ("gmae", "without_defaults"):
                row = r[label]
                lines.append((f"{name} {'defaults' if label == 'gmae' else 'none'}",
                              f"2 processes on {_cpus_text(r['cpus'])}: each at {_fractions_text(row['fractions'])} "
                              f"of solo ({row['solo_steps_per_s']:.2f} steps/s), together {row['machine_total']:.2f}; "
                              f"fair share 0.5, target >= 0.40  ({row['threads']} threads each, "
                              f"OMP_WAIT_POLICY {row['wait_policy']}, batch {row['batch_size']}{_load_text(r)})"))
        elif name == "contention_ddp":
            lines.append((name, f"torchrun 2 processes (gloo, {r['ddp_threads']} thread each) {r['ddp_steps_per_s']:.2f} "
                                f"steps/s / 1 process ({r['one_threads']} threads) {r['one_steps_per_s']:.2f} steps/s "
                                f"= {r['ratio']:.2f} on {_cpus_text(r['cpus'])}, global batch {r['batch_size']}; "
                                f"target >= 0.8{_load_text(r, '  (', ')')}"))
        elif name == "many_gaussians":
            for preset, row in r.items():
                q, m = row["queries"], row["gaussians_per_query"]
                lines.append((f"{name} {preset}",
                              f"k={row['k_many']} as {q} tokens x {m} {row['many_step_s'] * 1e3:.0f} ms / "
                              f"k={row['k_few']} as {q} x 1 {row['few_step_s'] * 1e3:.0f} ms = {row['ratio']:.3f}; "
                              f"rendering {row['many_render_share']:.0%} / {row['few_render_share']:.0%} of the steps  "
                              f"({preset}, {row['img_size']}px, batch {row['batch_size']}, {row['device']})"))
    width = max((len(k) for k, _ in lines), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


def _step_mode_text(r: dict) -> str:
    """', bf16, compiled, triton' for a step_ratio row that was not fp32 eager (rows from before these keys: '')."""
    mode = [r["precision"]] if r.get("precision", "fp32") != "fp32" else []
    mode += ["compiled"] if r.get("compile") else []
    mode += [f"render {r['render_backend']}"] if r.get("render_backend") else []
    return "".join(f", {m}" for m in mode)


def _cpus_text(cpus) -> str:
    return f"{len(cpus)} cores" if cpus else "all cores"


def _fractions_text(fractions) -> str:
    return " and ".join(f"{f:.2f}" for f in fractions)


def _load_text(r: dict, before: str = "; ", after: str = "") -> str:
    busy = r.get("busy_before")
    if busy is None:
        return ""
    warning = ": other work shares the cores; not comparable with an idle machine" if busy >= 0.2 else ""
    return f"{before}{busy:.1f} cores busy before{warning}{after}"
