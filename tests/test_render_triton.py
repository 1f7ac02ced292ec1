"""The triton render backend against the torch oracle: values and every gradient, the depth-order (swap) gradient
with the loss curvature, backgrounds, opacities above 1, culled and degenerate Gaussians, determinism.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before they
are defined), so the shapes are tiny: a handful of Gaussians over 1 to 4 tiles. On a GPU the same checks run on
CUDA tensors (marked `gpu`), and `test_parity_at_gmae_shapes` compares at the shapes GMAE trains at.
"""

from __future__ import annotations

import inspect
import json
import os
import struct

import numpy as np
import pytest
import torch

triton_raster = pytest.importorskip("gmae.render.triton_raster", reason="needs triton (pip install -e '.[test]')")

from gmae.errors import GMAEError  # noqa: E402
from gmae.render import DEPTH_GRAD_BACKENDS, RenderSettings, rasterize, resolve_backend  # noqa: E402
from gmae.render.contract import ALPHA_MIN, T_MIN  # noqa: E402
from gmae.render.reference import rasterize_torch  # noqa: E402
from test_depth_grad import assert_matches_torch, backend_grads, scene as depth_scene  # noqa: E402
from render_scenes import make_scene, render_and_grad  # noqa: E402

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64: the same arithmetic as the oracle, up to summation order
FP32 = dict(rtol=1e-5, atol=1e-5)

# CPU tensors in the interpreter (CI), CUDA tensors on a GPU.
DEVICES = ([pytest.param("cpu", id="interpreter")] if triton_raster.INTERPRETED else []) + \
    [pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def to(device, scene):
    return [t.to(device) for t in scene]


def assert_parity(scene, height, width, background=None, max_alpha=0.99):
    """triton == torch oracle: image, alpha and the gradients wrt means2d, conics, colors, opacities, background."""
    tol = TIGHT if scene[0].dtype == F64 else FP32
    fast = render_and_grad(triton_raster.rasterize_triton, scene, height, width, background, max_alpha)
    ref = render_and_grad(rasterize_torch, scene, height, width, background, max_alpha)
    assert fast[0].dtype == ref[0].dtype
    torch.testing.assert_close(fast[0], ref[0], **tol)
    torch.testing.assert_close(fast[1], ref[1], **tol)
    for name, g, g_r in zip(["means2d", "conics", "colors", "opacities", "background"], fast[2], ref[2]):
        scale = max(1.0, g_r.abs().max().item())  # sums over many pixels: relative to their scale
        torch.testing.assert_close(g, g_r, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale,
                                   msg=lambda m: f"d/d{name}: {m}")
    return fast


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,background", [(F64, None), (F64, "shared"), (torch.float32, "batch")],
                         ids=["f64", "f64_bg", "f32_bg_per_image"])
def test_random_scenes_match_the_oracle(device, dtype, background):
    scene = to(device, make_scene(batch=2, k=12, height=20, width=24, dtype=dtype, seed=1))
    bg = {None: None, "shared": torch.rand(3, dtype=dtype), "batch": torch.rand(2, 3, dtype=dtype)}[background]
    img, alpha, grads = assert_parity(scene, 20, 24, None if bg is None else bg.to(device))
    assert alpha.max() > 0.5 and all(g.abs().max() > 0 for g in grads)  # a scene with something to get wrong


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(channels=1, batch=1, k=6, height=19, width=17),  # C = 1, odd size, one tile
    dict(channels=4, batch=1, k=10, height=16, width=32, background="shared"),  # C = 4 (no padding lanes)
    dict(channels=3, batch=1, k=10, opacity=(0.9, 1.0), std=(3.0, 8.0), max_alpha=0.999),  # saturating, early stop
    dict(channels=3, batch=1, k=4, std=(40.0, 100.0), height=20, width=20),  # bigger than the image
    dict(channels=2, batch=1, k=16, std=(0.1, 0.6), height=16, width=16),  # sub-pixel
], ids=["C1_odd", "C4", "saturating_0999", "huge", "subpixel"])
def test_edge_cases_match_the_oracle(device, case):
    case = dict(case)
    height, width = case.pop("height", 20), case.pop("width", 24)
    background, max_alpha = case.pop("background", None), case.pop("max_alpha", 0.99)
    scene = to(device, make_scene(height=height, width=width, seed=7, dtype=F64, **case))
    bg = None if background is None else torch.rand(scene[2].shape[-1], dtype=F64, device=device)
    img, alpha, _ = assert_parity(scene, height, width, bg, max_alpha)
    if max_alpha == 0.999:
        assert alpha.max() > 0.999  # pixels that stopped early


def stop_slots(scene, height, width, max_alpha):
    """Per pixel of a one-image scene, the slot in its depth-sorted list of the Gaussian before which it stops (T
    would fall below 1e-4), -1 where it never stops: the contract, every Gaussian at every pixel."""
    means, conics, _, opac, depths = (t[0] for t in scene)
    order = torch.argsort(depths, stable=True)
    m, cn, o = means[order], conics[order], opac[order]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=F64) + 0.5, torch.arange(width, dtype=F64) + 0.5,
                            indexing="ij")
    dx, dy = xs.reshape(1, -1) - m[:, 0:1], ys.reshape(1, -1) - m[:, 1:2]
    alpha = (o[:, None] * torch.exp(-0.5 * (cn[:, 0:1] * dx * dx + 2 * cn[:, 1:2] * dx * dy + cn[:, 2:3] * dy * dy)))
    alpha = alpha.clamp_max(max_alpha)
    below = torch.cumprod(1 - torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha)), 0) < T_MIN
    return torch.where(below.any(0), below.to(torch.int64).argmax(0), -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [4, None], ids=["chunk4", "default_chunk"])
def test_long_lists_span_several_chunks(device, chunk, monkeypatch):
    """The forward composites its list a chunk of entries at a time: 48 Gaussians over one tile make lists of 3 to
    12 chunks, whose pixels stop (T would fall below 1e-4) in different chunks or not at all; T, the stop and the
    last contributor carry over from chunk to chunk."""
    if chunk is not None:
        monkeypatch.setattr(triton_raster, "FORWARD_CHUNK", chunk)
    nb = triton_raster.FORWARD_CHUNK
    scene = make_scene(batch=1, k=48, height=16, width=16, std=(2.0, 8.0), opacity=(0.3, 1.0), dtype=F64, seed=6)
    scene[0] = scene[0].clamp(1.0, 15.0)  # every centre inside the one tile: its list has all 48
    stops = stop_slots(scene, 16, 16, 0.999)
    assert (stops < 0).any() and len(torch.unique(stops[stops >= 0] // nb)) >= 3  # a scene that tests the carry
    assert_parity(to(device, scene), 16, 16, torch.rand(3, dtype=F64, device=device), max_alpha=0.999)


@pytest.mark.parametrize("device", DEVICES)
def test_opacities_above_one(device):
    """Flat-topped Gaussians (`--max-opacity`): alpha = min(0.99, o G) is clamped over a core, whose gradient is 0."""
    scene = make_scene(batch=1, k=8, height=20, width=24, std=(2.0, 5.0), dtype=F64, seed=4)
    scene[3] = scene[3] * 30.0
    _, alpha, _ = assert_parity(to(device, scene), 20, 24, torch.ones(3, dtype=F64, device=device))
    assert (alpha > 0.98).float().mean() > 0.3


@pytest.mark.parametrize("device", DEVICES)
def test_culled_and_degenerate_gaussians(device):
    """Non-finite, degenerate, negative definite and off-screen Gaussians are culled (zero gradient), as the
    oracle culls them; extreme but valid conics still match."""
    means, conics, colors, opac, depths = make_scene(batch=1, k=12, height=20, width=24, std=(2.0, 6.0),
                                                     opacity=(0.5, 1.0), dtype=F64, seed=3)
    nan, inf = float("nan"), float("inf")
    conics[0, 0] = torch.tensor([nan, 0.0, 1.0])
    conics[0, 1] = torch.tensor([1.0, 2.0, 1.0])  # det < 0
    conics[0, 2] = torch.tensor([-1.0, 0.0, -1.0])  # negative definite
    conics[0, 3] = torch.tensor([1.0, 1.0, 1.0])  # det = 0
    means[0, 4] = torch.tensor([inf, 3.0])
    means[0, 5] = torch.tensor([1e30, -1e30])  # far away
    conics[0, 6] = torch.tensor([1e-12, 0.0, 1e-12])  # covers everything
    conics[0, 7] = torch.tensor([1e12, 0.0, 1e12])  # vanishing
    opac[0, 8] = nan
    colors[0, 9] = torch.tensor([nan, 0.0, 0.0])
    depths[0, 10] = inf
    scene = to(device, [means, conics, colors, opac, depths])
    img, alpha, grads = assert_parity(scene, 20, 24, torch.rand(3, dtype=F64, device=device))
    for t in (img, alpha, *grads):
        assert torch.isfinite(t).all()
    for i in (0, 1, 2, 3, 4, 5, 8, 9, 10):
        assert all(torch.all(g[0, i] == 0) for g in grads[:4]), i


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_to_draw(device):
    """No Gaussians, or all invisible: the background, and its gradient T_final = 1 per pixel."""
    bg = torch.tensor([0.1, 0.2, 0.3], device=device, requires_grad=True)
    empty = [torch.zeros(2, 0, 2), torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), torch.zeros(2, 0), torch.zeros(2, 0)]
    for scene in (empty, make_scene(batch=2, k=3, height=5, width=7, opacity=(0.0, 0.001))):
        img, alpha = triton_raster.rasterize_triton(*to(device, scene), height=5, width=7, background=bg)
        assert torch.equal(img, bg.detach().view(1, 3, 1, 1).expand(2, 3, 5, 7))
        assert torch.equal(alpha, torch.zeros(2, 5, 7, device=device))
        (grad,) = torch.autograd.grad(img.sum() + alpha.sum(), [bg])
        assert torch.equal(grad, torch.full((3,), 70.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_tied_depths_keep_index_order(device):
    scene = make_scene(batch=1, k=8, height=16, width=16, std=(3.0, 6.0), opacity=(0.6, 1.0), dtype=F64, seed=2)
    scene[4] = torch.zeros_like(scene[4])
    assert_parity(to(device, scene), 16, 16)


# --------------------------------------------------------------------------- the depth-order gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,background", [(F64, "shared"), (F64, None), (torch.float32, "per-image")],
                         ids=["f64_bg", "f64", "f32_bg_per_image"])
def test_swap_gradient_and_curvature_match_the_oracle(device, dtype, background):
    """depth_tau > 0: the relaxed swap gradient with the loss curvature (test_depth_grad.py checks the oracle
    against brute force and finite differences); the image and the other gradients are unchanged."""
    params, target, weight = depth_scene(0, B=2, K=8, H=16, W=20, dtype=dtype, std=(1.0, 5.0))
    params, target, weight = to(device, params), target.to(device), weight.to(device)
    bg = {"shared": torch.tensor([1.0, 1.0, 1.0], dtype=F64), None: None,
          "per-image": torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.3, 0.9]], dtype=F64)}[background]
    bg = None if bg is None else bg.to(device)
    ref, fast = assert_matches_torch("triton", params, target, weight, 0.1, bg)
    assert ref[2][4].abs().max() > 1e-3
    off = backend_grads("triton", params, target, weight, 0.0, bg)
    assert torch.equal(off[0], fast[0]) and off[2][4] is None
    for a, b in zip(off[2][:4], fast[2][:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_gradient_with_opacities_above_one(device):
    params, target, weight = depth_scene(4, B=1, K=8, H=16, W=16, std=(1.0, 5.0))
    params[3] = params[3] * 30.0
    params, target, weight = to(device, params), target.to(device), weight.to(device)
    assert_matches_torch("triton", params, target, weight, 0.1)


# --------------------------------------------------------------------------- determinism and dispatch


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bitwise(device):
    """Per-intersection rows summed per Gaussian in a fixed order: two runs agree bit for bit, depths included."""
    params, target, weight = depth_scene(5, B=1, K=10, H=16, W=24, dtype=torch.float32, std=(1.0, 6.0))
    params, target, weight = to(device, params), target.to(device), weight.to(device)
    first = backend_grads("triton", params, target, weight, 0.1)
    second = backend_grads("triton", params, target, weight, 0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_auto_prefers_triton_on_cuda():
    """auto on CUDA: triton (it has the depth-order gradient too), then gsplat, then torch; cpu on the CPU."""
    from gmae import render

    assert "triton" in DEPTH_GRAD_BACKENDS
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cuda", depth_grad=True) == "triton"
    assert resolve_backend("auto", "cpu") == "cpu"
    saved = render.BACKENDS.pop("triton", None)
    render._UNAVAILABLE.add("triton")
    try:
        assert resolve_backend("auto", "cuda") in {"gsplat", "torch"}
        assert resolve_backend("auto", "cuda", depth_grad=True) == "torch"
    finally:
        render._UNAVAILABLE.discard("triton")
        if saved is not None:
            render.BACKENDS["triton"] = saved


def test_cpu_tensors_without_the_interpreter_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(triton_raster, "INTERPRETED", False)
    scene = make_scene(batch=1, k=2, height=8, width=8)
    with pytest.raises(GMAEError, match="triton backend needs CUDA tensors.*TRITON_INTERPRET=1"):
        triton_raster.rasterize_triton(*scene, height=8, width=8)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_through_rasterize(device):
    scene = to(device, make_scene(batch=1, k=4, height=16, width=16))
    img, alpha = rasterize(*scene, height=16, width=16, settings=RenderSettings(backend="triton"))
    img_r, alpha_r = triton_raster.rasterize_triton(*scene, height=16, width=16)
    assert torch.equal(img, img_r) and torch.equal(alpha, alpha_r)


# --------------------------------------------------------------------------- compiled for a GPU, without one

# --------------------------------------------------------------------------- what a compiled kernel computes


class AsCompiled:
    """A kernel launched with its arguments as a compiled kernel receives them: triton types a Python float argument
    fp32, so the kernel gets the nearest float32, where the interpreter passes the double on."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters
        self.runtime = {name for name, p in params.items() if "constexpr" not in str(p.annotation)}

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        names = list(inspect.signature(self.kernel.fn).parameters)

        def cast(name, value):
            return float(np.float32(value)) if type(value) is float and name in self.runtime else value

        return lambda *args, **kwargs: launch(*(cast(n, v) for n, v in zip(names, args)),
                                              **{n: cast(n, v) for n, v in kwargs.items()})


@pytest.fixture
def as_compiled(monkeypatch):
    if not triton_raster.INTERPRETED:
        pytest.skip("emulates a compiled kernel in the interpreter")
    for name in ("_forward_kernel", "_backward_kernel", "_depth_back_kernel", "_reduce_kernel"):
        monkeypatch.setattr(triton_raster, name, AsCompiled(getattr(triton_raster, name)))


@pytest.mark.parametrize("case", [
    lambda: test_opacities_above_one("cpu"),
    lambda: test_swap_gradient_and_curvature_match_the_oracle("cpu", F64, "shared"),
    lambda: test_swap_gradient_and_curvature_match_the_oracle("cpu", F64, None),
    lambda: test_swap_gradient_with_opacities_above_one("cpu"),
    lambda: test_random_scenes_match_the_oracle("cpu", F64, "shared"),
], ids=["opacities_above_one", "swap_f64_bg", "swap_f64", "swap_opacities_above_one", "random_f64_bg"])
def test_float64_holds_with_float_arguments_as_the_compiler_passes_them(as_compiled, case):
    """max_alpha = 0.99 as an fp32 argument is 0.99000000953...: two clamped Gaussians then leave T just under
    T_MIN = 1e-4 instead of just over it, and the pixel stops early. The kernels read their float parameters from
    a tensor in their compute dtype, so this runs (in the interpreter) what a compiled kernel runs."""
    case()


def test_gmae_scene_in_float64_with_float_arguments_as_the_compiler_passes_them(as_compiled):
    """test_parity_at_gmae_shapes's scene (opacities up to 1.2, so clamped alphas; the depth-order gradient on) at a
    size the interpreter runs, one image of 48 px and k = 96, in float64: the oracle's values at 1e-9."""
    params = gmae_scene(1, 96, 48, device="cpu", dtype=F64)
    g = torch.Generator().manual_seed(1)
    target, weight = torch.rand(1, 3, 48, 48, generator=g, dtype=F64), torch.rand(1, 48, 48, generator=g, dtype=F64)
    ref, _ = assert_matches_torch("triton", params, target, weight, 0.1, torch.ones(3, dtype=F64))
    assert ref[1].max() > 0.99 and all(grad.abs().max() > 0 for grad in ref[2])


def test_float64_kernels_compile_with_float64_parameters_and_thresholds():
    """The float64 kernels as compiled for sm_90: no fp32 parameter, and the thresholds 1/255 and 1e-4 as float64
    constants, not their fp32 roundings (which the tests at 1e-10 would see)."""
    kernels = compiled_kernels("--float64")
    as_hex = lambda x: "0d%016X" % struct.unpack("<Q", struct.pack("<d", x))[0]
    for k in kernels:
        assert k["f32_params"] == 0, k["kernel"]
        assert as_hex(float(np.float32(ALPHA_MIN))) not in k["f64_constants"], k["kernel"]
        assert as_hex(float(np.float32(T_MIN))) not in k["f64_constants"], k["kernel"]
    forward = next(k for k in kernels if k["function"] == "_forward_kernel")
    assert {as_hex(ALPHA_MIN), as_hex(T_MIN)} <= set(forward["f64_constants"])


def compiled_kernels(*args):
    """tools/triton_sass.py --json's kernels (skips where this triton cannot compile for CUDA)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "tools" / "triton_sass.py"), "--json", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("ptxas" in done.stderr and "not found" in done.stderr.lower()
                                 or "No module named 'triton.backends.nvidia'" in done.stderr
                                 or "cuobjdump" in done.stderr or "nvdisasm" in done.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["kernels"]


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs kernels as Python, so it accepts code that Triton's compiler refuses (types that change
    in a loop, ...): every kernel variant is compiled for sm_90 (H100/H200) down to a cubin, with the ptxas that
    comes with triton, in a process without TRITON_INTERPRET (tools/triton_sass.py, which also prints their
    registers and the instructions and barriers of their loops); none spills registers to local memory."""
    kernels = compiled_kernels()
    assert [k["function"] for k in kernels] == ["_forward_kernel"] * 2 + ["_backward_kernel"] * 2 + \
        ["_depth_back_kernel", "_reduce_kernel"]
    for k in kernels:
        assert k["local"] == 0 and k["stack"] == 0, k  # no register spills
        assert k["loops"], k  # each walks its list in a loop


# --------------------------------------------------------------------------- GPU only


def gmae_scene(batch, k, size, seed=0, device="cuda", dtype=torch.float32):
    """Gaussians like a GMAE decoder's at 224 px: centres over the image, std 1-8 px at k = 256 and 1/4 of that at
    k = 4096 (the same coverage), opacities over (0, 1), some above 1."""
    shrink = (k / 256) ** 0.5
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(batch, k, 2, generator=g) * size
    sd = (1.0 + 7.0 * torch.rand(batch, k, 2, generator=g)) / shrink
    rho = torch.rand(batch, k, generator=g) * 1.2 - 0.6
    sxx, syy, sxy = sd[..., 0] ** 2, sd[..., 1] ** 2, rho * sd[..., 0] * sd[..., 1]
    det = sxx * syy - sxy**2
    conics = torch.stack([syy / det, -sxy / det, sxx / det], -1)
    colors = torch.rand(batch, k, 3, generator=g)
    opac = torch.rand(batch, k, generator=g) * 1.2
    depths = torch.rand(batch, k, generator=g)
    return [t.to(device, dtype) for t in (means, conics, colors, opac, depths)]


@pytest.mark.gpu
@pytest.mark.parametrize("k", [256, 4096])
def test_parity_at_gmae_shapes(k):
    """B 64, 224 px, k = 256 and 4096, float32 on CUDA, the depth-order gradient on: triton == torch."""
    size = 224
    params = gmae_scene(64, k, size)
    g = torch.Generator().manual_seed(1)
    target = torch.rand(64, 3, size, size, generator=g).cuda()
    weight = torch.rand(64, size, size, generator=g).cuda()
    bg = torch.ones(3, device="cuda")
    ref = backend_grads("torch", params, target, weight, 0.1, bg)
    fast = backend_grads("triton", params, target, weight, 0.1, bg)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["means2d", "conics", "colors", "opacities", "depths"], fast[2], ref[2]):
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_a_render_waits_for_the_device_once():
    """Forward and backward make one host sync: the lists' length, which sizes them. The parameters are filled on
    the device, the tile ranges and the backward's segments found by searchsorted (bincount and repeat_interleave
    without a size would each wait)."""
    import warnings

    params = [p.requires_grad_(i < 4) for i, p in enumerate(gmae_scene(2, 64, 64))]
    run = lambda: triton_raster.rasterize_triton(*params, height=64, width=64, background=torch.ones(3, device="cuda"))
    img, alpha = run()  # compiles
    (img.sum() + alpha.sum()).backward()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            img, alpha = run()
            (img.sum() + alpha.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
