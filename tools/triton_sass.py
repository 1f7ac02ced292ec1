"""The triton render backend's kernels compiled for sm_90 (H100/H200) without a GPU: registers, spills, and per loop
the SASS instructions and block-wide barriers of one iteration.

    python tools/triton_sass.py                    # one line per kernel variant, then one per loop
    python tools/triton_sass.py --json             # the same as JSON, with the float constants of the PTX
    python tools/triton_sass.py --float64 --json   # the float64 variants (what the tests compare at 1e-10)

Every kernel variant that gmae/render/triton_raster.py launches is compiled with triton's own ptxas (triton ships it;
no GPU and no CUDA toolkit needed) down to a cubin, which triton's nvdisasm turns into SASS. Run it without
TRITON_INTERPRET (the interpreter has no compiler). tests/test_render_triton.py runs it.

A loop is a backward branch in the SASS: its body is the instructions from the branch's target to the branch. The
instructions of one iteration are per warp (each thread does its lanes' share), and "per entry" divides them by the
tile-list entries one iteration handles (triton_raster.FORWARD_CHUNK in the forward, one elsewhere). BAR is a
block-wide barrier (every warp of the program waits at it); the forward and backward kernels' reductions over a
tile's 256 pixels need them, to pass partial sums between warps through shared memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("tools/triton_sass.py compiles kernels: run it without TRITON_INTERPRET")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gmae.render.triton_raster as tr  # noqa: E402

#: Kernel argument types by name (the kernels name their arguments alike); DT's pointers follow the job's DT.
POINTERS = ("geom", "colors", "bg", "image", "trans", "grad_image", "grad_alpha",
            "curvature", "buf", "out", "params")
INDICES = dict(gids="*i64", starts="*i64", counts="*i64", perm="*i64", seg="*i64", last_out="*i32", last_in="*i32")
SCALARS = dict(H="i32", W="i32", tiles_x="i32", n_tiles="i32", n="i32")


def jobs(dt=tl.float32) -> list[tuple[str, object, dict]]:
    """(label, kernel, constexprs) of every kernel variant the backend launches, at C = 3 channels."""
    common = dict(C=3, CP=4, TILE=16, DT=dt)
    return [(name, fn, consts) for name, fn, consts in [
        ("forward", tr._forward_kernel, dict(common, HAS_BG=True, NB=tr.FORWARD_CHUNK)),
        ("forward no bg", tr._forward_kernel, dict(common, HAS_BG=False, NB=tr.FORWARD_CHUNK)),
        ("backward depth", tr._backward_kernel, dict(common, HAS_BG=True, DEPTH=True, DP=16)),
        ("backward", tr._backward_kernel, dict(common, HAS_BG=False, DEPTH=False, DP=16)),
        ("depth back", tr._depth_back_kernel, common),
        ("reduce", tr._reduce_kernel, dict(D=11, DP=16, GB=tr.REDUCE_LANES // 16, DT=dt)),
    ]]


def compile_sm90(fn, consts: dict):
    """fn compiled for sm_90 with the backend's launch options (signature from the argument names)."""
    dt = {tl.float32: "fp32", tl.float64: "fp64"}[consts["DT"]]
    types = {**{n: f"*{dt}" for n in POINTERS}, **INDICES, **SCALARS}
    signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, {k: consts[k] for k in consts if k in fn.arg_names}),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(tr.REDUCE_LAUNCH if "GB" in consts else tr.LAUNCH))


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / name)


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def ptx_floats(ptx: str) -> dict:
    """The kernel's fp32 parameters (a Python float argument becomes one) and its float64 constants (hex)."""
    return {"f32_params": len(re.findall(r"\.param \.f32", ptx)),
            "f64_constants": sorted(set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx)))}


def sass_stats(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills), the instruction count, and the loops of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    code, labels = [], {}
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        ins = INSTRUCTION.search(line)
        if ins:
            code.append(ins.group(2))
    loops = []
    for i, ins in enumerate(code):
        target = BRANCH.search(ins)
        if target and labels.get(target.group(1), i + 1) < i:  # a backward branch closes a loop
            body = code[labels[target.group(1)]:i + 1]
            loops.append({"instructions": len(body), "barriers": sum(op.startswith("BAR.") for op in body)})
    return {"registers": found.get("REG"), "stack": found.get("STACK", 0), "local": found.get("LOCAL", 0),
            "shared": found.get("SHARED", 0), "instructions": sum(not op.startswith("NOP") for op in code),
            "barriers": sum(op.startswith("BAR.") for op in code), "loops": loops}


def entries_per_iteration(label: str) -> int:
    return tr.FORWARD_CHUNK if label.startswith("forward") else 1


def main(argv: list[str]) -> int:
    rows = []
    for label, fn, consts in jobs(tl.float64 if "--float64" in argv else tl.float32):
        kernel = compile_sm90(fn, consts)
        stats = {**sass_stats(kernel.asm["cubin"]), **ptx_floats(kernel.asm["ptx"])}
        per = entries_per_iteration(label)
        for loop in stats["loops"]:
            loop["per_entry"] = round(loop["instructions"] / per, 1)
        rows.append({"kernel": label, "function": fn.__name__, "entries_per_iteration": per, **stats})
    if "--json" in argv:
        print(json.dumps({"triton": triton.__version__, "kernels": rows}, indent=1))
        return 0
    print(f"triton {triton.__version__}, sm_90, {'float64' if '--float64' in argv else 'float32'}, {tr.LAUNCH}")
    for row in rows:
        print(f"compiled {row['kernel']:15s} registers {row['registers']:3d}  stack {row['stack']}  local "
              f"{row['local']}  shared {row['shared']:5d}  instructions {row['instructions']:5d}  "
              f"barriers {row['barriers']}")
        for n, loop in enumerate(row["loops"]):
            print(f"    loop {n}: {loop['instructions']} instructions per iteration "
                  f"({loop['per_entry']} per list entry, {row['entries_per_iteration']} per iteration), "
                  f"{loop['barriers']} barriers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
