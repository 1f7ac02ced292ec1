"""scripts/gpu_check.sh, the prepared GPU run, in its CPU smoke mode: every stage runs (tiny) and report.json holds
what each stage measured."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def test_smoke_mode_runs_every_stage_and_writes_the_report(tmp_path):
    pytest.importorskip("triton", reason="the smoke run renders with the triton backend in Triton's interpreter")
    out = tmp_path / "gpu check"  # a space in the path, on purpose
    env = {**os.environ, "PYTHON": sys.executable, "GSPLAT_WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mode"].startswith("cpu smoke")
    stages = report["stages"]
    assert list(stages) == ["environment", "tests", "bench", "bench_compile", "pretrain", "gsplat_build"]
    for name in ("environment", "tests", "bench", "bench_compile", "pretrain"):
        assert stages[name]["exit"] == "0", (name, (out / "logs" / f"{name}.log").read_text()[-2000:])
        assert (out / stages[name]["log"]).exists()
    assert stages["gsplat_build"]["exit"] == "no-wheel"
    assert report["gsplat"]["result"] == "no gsplat wheel brought along"
    env_record = report["environment"]
    assert env_record["torch"] and env_record["triton"] and env_record["cuda_available"] is False
    assert report["tests"]["passed"] >= 1 and report["tests"]["failed"] == []
    rows = report["bench"]["render_backends"]["rows"]
    assert {row["backend"] for row in rows} >= {"torch"} and all(row["ms"] > 0 for row in rows)
    compiled = report["bench_compile"]["step_ratio_tiny"]
    assert compiled["compile"] is True and compiled["precision"] == "bf16"
    assert all(row["ratio"] > 0 for row in compiled["layouts"])
    pretrain = report["pretrain"]
    assert pretrain["steps"] == 6 and pretrain["finite"] and pretrain["imgs_per_s_median"] > 0
    assert pretrain["run_imgs_per_s"] == pytest.approx(2 * pretrain["run_steps_per_s"], rel=0.01)  # batch 2


def test_bad_arguments_are_refused(tmp_path):
    for args in ([], [str(tmp_path), "--device", "tpu"], [str(tmp_path), "--oops"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip(), args


def test_report_reads_gsplat_build_errors(tmp_path):
    """A failed gsplat build is reported by its first error line and the chain of errors after it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check_report
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "stages.tsv").write_text("gsplat_build\t1\t30\t240\n")
    (tmp_path / "logs" / "gsplat_build.log").write_text(
        "ImportError: cannot import name 'csrc' from 'gsplat'\n"  # gsplat's own first try, handled
        "TypeError: _jit_compile() missing 2 required positional arguments: 'verbose' and 'with_sycl'\n"
        "building...\nfatal error: cub/cub.cuh: No such file or directory\nninja: build stopped\n"
        "RuntimeError: Error building extension 'gsplat_cuda'\n")
    report = gpu_check_report.report(tmp_path, "cuda", "/w/gsplat-1.5.3-py3-none-any.whl")
    assert report["gsplat"]["first_error"] == "fatal error: cub/cub.cuh: No such file or directory"
    assert report["gsplat"]["error_lines"][-1] == "RuntimeError: Error building extension 'gsplat_cuda'"
    assert report["stages"]["gsplat_build"]["timed_out"] is False


# A GPU machine may lack what only the CPU backend (numba) and the figures (matplotlib) need.
BLOCKED = "import sys; sys.modules.update(numba=None, matplotlib=None); "


def test_gpu_test_files_collect_without_numba_and_matplotlib():
    """The GPU run's test files import with numba and matplotlib missing (import of either raises ImportError)."""
    code = BLOCKED + ("import pytest; sys.exit(pytest.main(['--collect-only', '-o', 'addopts=', '-q', '-p', 'no:cacheprovider', "
                      "'tests/test_render_triton.py', 'tests/test_render_gsplat.py']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b\d+ tests? collected", done.stdout) and not re.search(r"\d+ errors?\b", done.stdout), \
        done.stdout[-3000:]
    assert done.stdout.count("tests/test_render_triton.py::") >= 20


def test_pretrain_runs_without_numba_and_matplotlib(tmp_path):
    """`gmae pretrain` imports and trains without them, and says that it drew no figure."""
    code = BLOCKED + "from gmae.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, "pretrain", "--device", "cpu", "--img-size", "16",
                           "--patch-size", "8", "-k", "4", "--batch-size", "2", "--steps", "2", "--quiet",
                           "--render-backend", "torch", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "figure:     not drawn: matplotlib does not import" in done.stdout
    assert (out / "metrics.jsonl").exists() and not (out / "reconstruction.png").exists()
