"""tools/gpu_check.sh's first stage: can this machine run the check at all? Seconds, before minutes are spent.

    python tools/gpu_check_preflight.py OUT DEVICE    # DEVICE: cuda, or cpu (the smoke mode)

Checks, each recorded in OUT/preflight.json as "ok" or why not:

* cuda: torch sees a CUDA GPU (without one, tests/conftest.py would quietly run the triton tests in Triton's CPU
  interpreter and skip the GPU ones); not asked in the smoke mode;
* triton imports;
* c_compiler: $CC, else gcc or clang on PATH, as triton looks for one (it compiles a small launcher for each kernel);
* python_h: Python.h in this Python's include folder, which that launcher includes;
* pytest, and what the GPU tests import (numpy);
* kernel: one tiny Triton kernel compiled and launched, and its result read back (in the smoke mode, run in
  Triton's interpreter, which gpu_check.sh selects).

Also writes OUT/environment.json (versions, the GPU, which optional modules import). Prints one line per failed
check, "preflight: <check>: <why>", and exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_report import environment  # noqa: E402


def c_compiler() -> str:
    cc = os.environ.get("CC")
    if cc:
        if shutil.which(cc) is None:
            raise RuntimeError(f"CC={cc} is not an executable")
        return f"ok ({cc})"
    for name in ("gcc", "clang"):
        if shutil.which(name):
            return f"ok ({shutil.which(name)})"
    raise RuntimeError("no C compiler (CC unset, no gcc or clang on PATH): triton compiles a launcher for each "
                       "kernel with one; install gcc")


def python_h() -> str:
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        raise RuntimeError(f"no Python.h in {include}: triton's kernel launcher includes it; install the Python "
                           f"development headers (python{sys.version_info.major}.{sys.version_info.minor}-dev)")
    return f"ok ({include})"


def tiny_kernel(device: str) -> str:
    import torch
    from gpu_check_kernel import add_one

    x = torch.arange(100, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t0 = time.perf_counter()
    add_one[(1,)](x, y, 100, BLOCK=128)
    got = y.cpu()
    if not torch.equal(got, torch.arange(1, 101, dtype=torch.float32)):
        raise RuntimeError(f"a tiny kernel ran but computed {got[:4].tolist()}..., not x + 1")
    how = "compiled and ran" if device == "cuda" else "ran in Triton's interpreter"
    return f"ok ({how} in {time.perf_counter() - t0:.1f} s)"


def cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                           "the check would test Triton's CPU interpreter instead")
    return f"ok ({torch.cuda.get_device_name(0)})"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("cuda", "cpu"):
        print(__doc__, file=sys.stderr)
        return 2
    out, device = Path(argv[0]), argv[1]
    t0 = time.perf_counter()
    checks: dict[str, object] = {
        "cuda": cuda if device == "cuda" else (lambda: "not needed (--device cpu)"),
        "triton": lambda: "ok (" + __import__("triton").__version__ + ")",
        "c_compiler": c_compiler,
        "python_h": python_h,
        "pytest": lambda: "ok (" + __import__("pytest").__version__ + ")",
        "numpy": lambda: "ok (" + __import__("numpy").__version__ + ")",
        "kernel": lambda: tiny_kernel(device),
    }
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001  every failure is reported, in one line
            why = str(exc) if type(exc) is RuntimeError else f"{type(exc).__name__}: {exc}"  # ours say it all
            results[name] = why.splitlines()[0][:300]
            print(f"preflight: {name}: {results[name]}")
        else:
            print(f"{name}: {results[name]}")
        if name == "cuda" and not str(results[name]).startswith(("ok", "not needed")):
            break  # nothing below means anything without the GPU
    ok = all(str(r).startswith(("ok", "not needed")) for r in results.values()) and len(results) == len(checks)
    record = {"ok": ok, "device": device, "checks": results, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "preflight.json").write_text(json.dumps(record) + "\n")
    try:
        (out / "environment.json").write_text(json.dumps(environment()) + "\n")
    except Exception as exc:  # noqa: BLE001  the record is a courtesy; the checks above decide
        print(f"environment: not recorded ({type(exc).__name__}: {exc})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
