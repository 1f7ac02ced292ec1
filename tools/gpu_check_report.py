"""tools/gpu_check.sh's Python side: the environment record, and report.json assembled from the stages' outputs.

    python tools/gpu_check_report.py report OUT DEVICE [STAGES]   # STAGES: the selected ones, comma-separated
    python tools/gpu_check_report.py missing WHEEL...             # the wheels whose package is not installed

gpu_check.sh rewrites report.json after every stage, from whatever the stages have left in OUT so far: a run cut
short (a time box, the machine taken back) still has the results of every stage that ended.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
import re
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpu": None, "triton": None, "nvcc": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cudnn=torch.backends.cudnn.version())
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001  recorded, not fatal
        env["triton"] = f"does not import: {type(exc).__name__}: {exc}"
    # what gmae, its tests and gsplat's build need: a version, or "missing" (bring its wheel in .whl/)
    env["modules"] = {}
    for name in ("numpy", "numba", "skimage", "sklearn", "matplotlib", "PIL", "safetensors", "tqdm", "pytest",
                 "hypothesis", "ninja", "jaxtyping", "rich"):
        try:
            env["modules"][name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:  # noqa: BLE001  recorded, not fatal
            env["modules"][name] = f"missing ({type(exc).__name__})"
    for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["--query-gpu=driver_version", "--format=csv,noheader"])):
        if shutil.which(tool):
            out = subprocess.run([tool, *args], capture_output=True, text=True).stdout.strip().splitlines()
            env[tool.replace("-", "_")] = out[-1] if out else None
    return env


ERROR_LINE = re.compile(r"\berror\b|Error:|FAILED|fatal", flags=re.I)


def error_lines(log: Path, most: int = 6) -> list[str]:
    """The distinct lines of a log that read as errors, in order (else its last line)."""
    if not log.exists():
        return []
    lines = [line.strip()[:500] for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = list(dict.fromkeys(line for line in lines if ERROR_LINE.search(line)))
    return errors[:most] if errors else lines[-1:]


#: Errors gsplat 1.5.3's loader raises and handles itself before it falls back to building (gsplat/cuda/_backend.py).
GSPLAT_HANDLED = ("cannot import name 'csrc'", "_jit_compile() missing")


def first_error(log: Path) -> str | None:
    """The first line of a log that reads as an error (else its last line)."""
    found = error_lines(log, 1)
    return found[0] if found else None


def junit(path: Path) -> dict | None:
    """Counts and the failing tests' names of a pytest --junitxml file."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def read_json(path: Path):
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def pretrain_summary(run: Path, log: Path) -> dict | None:
    """Loss at the start and end of the run's metrics.jsonl, whether it is finite and falling, images/s (the median
    step's, and the whole run's from the speed `gmae pretrain` prints at the end)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    losses = [r["loss"] for r in records]
    n = max(1, min(50, len(losses) // 3))
    first, last = statistics.mean(losses[:n]), statistics.mean(losses[-n:])
    speeds = [r["imgs_per_s"] for r in records[1:]] or [records[0]["imgs_per_s"]]  # the first step compiles
    done = re.search(r"done: (\d+) steps at ([0-9.]+) steps/s", log.read_text()) if log.exists() else None
    batch = records[-1]["imgs_per_s"] * records[-1]["step_time"]  # metrics.jsonl has no batch size: imgs/s x s
    return {"steps": records[-1]["step"] + 1, "loss_first": losses[0], "loss_last": losses[-1],
            f"loss_mean_first_{n}": first, f"loss_mean_last_{n}": last,
            "finite": all(math.isfinite(x) for x in losses), "falling": last < first,
            "imgs_per_s_median": statistics.median(speeds),
            "run_steps_per_s": float(done.group(2)) if done else None,
            "run_imgs_per_s": round(float(done.group(2)) * round(batch), 2) if done else None}


def gsplat_summary(out: Path, stages: dict) -> dict | None:
    """The optional gsplat stage: no prebuilt wheel, its import time and parity tests, or the error that stopped it."""
    stage = stages.get("gsplat")
    if stage is None:
        return None
    log = out / "logs" / "gsplat.log"
    if stage["exit"] == "no-wheel":
        return {"result": log.read_text().strip() if log.exists() else "no prebuilt gsplat wheel"}
    if stage["exit"] == "0":
        found = re.search(r"gsplat_import_s ([0-9.]+)", log.read_text())
        return {"result": "imported", "import_s": float(found.group(1)) if found else None,
                "tests": junit(out / "logs" / "gsplat_tests.xml"), "bench": read_json(out / "bench_gsplat.json")}
    lines = error_lines(log, most=8)  # the chained errors, in order
    # gsplat 1.5.3 first tries its compiled module, then torch's private _jit_compile with its old signature, and
    # handles both; the first error after those is the one that counts
    real = [line for line in lines if not any(benign in line for benign in GSPLAT_HANDLED)] or lines
    return {"result": "failed", "timed_out": stage["timed_out"],
            "first_error": "ran past its time box" if stage["timed_out"] else (real[0] if real else None),
            "error_lines": lines}


def report(out: Path, device: str, selected: str = "") -> dict:
    stages = {}
    tsv = out / "stages.tsv"
    for line in (tsv.read_text().splitlines() if tsv.exists() else []):
        name, rc, seconds, budget = line.split("\t")
        stages[name] = {"exit": rc, "seconds": int(seconds), "budget_s": int(budget),
                        "timed_out": rc in ("124", "137"), "log": f"logs/{name}.log"}
    chosen = [name for name in selected.split(",") if name]
    junits = sorted((out / "logs" / "junit").glob("*.xml")) if (out / "logs" / "junit").exists() else []
    result = {
        "mode": "cuda" if device == "cuda" else "cpu smoke (tiny shapes; no figure here is a GPU measurement)",
        "selected": chosen,
        "pending": [name for name in chosen if name not in stages],  # not run (yet): the run is going on, or ended
        "stages": stages,
        "preflight": read_json(out / "preflight.json"),
        "environment": read_json(out / "environment.json"),
        "tests": {path.stem + ".py": junit(path) for path in junits} if "tests" in stages else None,
        "bench": read_json(out / "bench.json"),
        "bench_compile": read_json(out / "bench_compile.json"),
        "pretrain": pretrain_summary(out / "pretrain", out / "logs" / "pretrain.log"),
        "gsplat": gsplat_summary(out, stages),
    }
    for name in ("preflight", "bench", "bench_compile", "pretrain"):
        if result[name] is None and name in stages:
            result[f"{name}_error"] = first_error(out / "logs" / f"{name}.log")
    if "tests" in stages and stages["tests"]["exit"] != "0":
        result["tests_error"] = first_error(out / "logs" / "tests.log")
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def missing(wheels: list[str]) -> list[str]:
    """The wheels (paths) whose distribution is not installed, so that brought-along wheels never replace the
    machine's own packages."""
    from importlib import metadata

    def installed(wheel: str) -> bool:
        try:
            metadata.version(Path(wheel).name.split("-")[0].replace("_", "-"))
        except metadata.PackageNotFoundError:
            return False
        return True

    return [wheel for wheel in wheels if not installed(wheel)]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "missing":
        print("\n".join(missing(argv[1:])))
        return 0
    if len(argv) in (3, 4) and argv[0] == "report":
        r = report(Path(argv[1]), argv[2], argv[3] if len(argv) == 4 else "")
        print(json.dumps({k: r[k] for k in ("mode", "selected", "stages")}, indent=1))
        print(f"report: {Path(argv[1]) / 'report.json'}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
