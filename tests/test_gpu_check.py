"""tools/gpu_check.sh, the prepared GPU run, in its CPU smoke mode: the default stages run (tiny) and report.json
holds what each measured; stages named alone, the optional ones, the report rewritten as each stage ends, the
preflight that stops a machine that cannot run the check; and the GPU test files and `gmae pretrain` on a machine
without numba and matplotlib."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_check(out, *args, stages=None, env=None, timeout=600, popen=False):
    """tools/gpu_check.sh OUT ARGS with this Python, no gsplat wheels, GPU_CHECK_STAGES=stages if given."""
    env = {**os.environ, "PYTHON": sys.executable, "GSPLAT_WHEELS": str(out.parent / "no-wheels"),
           "OMP_NUM_THREADS": "1", **(env or {})}
    if stages is not None:
        env["GPU_CHECK_STAGES"] = stages
    command = ["bash", str(SCRIPT), str(out), *args]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def read_report(out):
    return json.loads((out / "report.json").read_text())


def test_smoke_mode_runs_the_default_stages_and_writes_the_report(tmp_path):
    pytest.importorskip("triton", reason="the smoke run renders with the triton backend in Triton's interpreter")
    out = tmp_path / "gpu check"  # a space in the path, on purpose
    done = run_check(out, "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    report = read_report(out)
    assert report["mode"].startswith("cpu smoke")
    assert report["selected"] == ["preflight", "tests", "bench", "pretrain"] and report["pending"] == []
    stages = report["stages"]
    assert list(stages) == ["preflight", "tests", "bench", "pretrain"]  # --compile and gsplat are not in the default
    for name in stages:
        assert stages[name]["exit"] == "0", (name, (out / "logs" / f"{name}.log").read_text()[-2000:])
        assert (out / stages[name]["log"]).exists()
    preflight = report["preflight"]
    assert preflight["ok"] and preflight["checks"]["cuda"].startswith("not needed")
    assert all(v.startswith("ok") for k, v in preflight["checks"].items() if k != "cuda")
    env_record = report["environment"]
    assert env_record["torch"] and env_record["triton"] and env_record["cuda_available"] is False
    # one junit per GPU test file
    tests = report["tests"]
    assert set(tests) == {"test_render_triton.py", "test_render_gsplat.py"}
    assert tests["test_render_triton.py"]["passed"] >= 1 and tests["test_render_triton.py"]["failed"] == []
    rows = report["bench"]["render_backends"]["rows"]
    assert {row["backend"] for row in rows} >= {"torch"} and all(row["ms"] > 0 for row in rows)
    assert report["bench_compile"] is None and report["gsplat"] is None
    pretrain = report["pretrain"]
    assert pretrain["steps"] == 6 and pretrain["finite"] and pretrain["imgs_per_s_median"] > 0
    assert pretrain["run_imgs_per_s"] == pytest.approx(2 * pretrain["run_steps_per_s"], rel=0.01)  # batch 2


def test_named_stages_run_alone_after_the_preflight(tmp_path):
    """GPU_CHECK_STAGES picks stages (run in the script's order, after the preflight); the optional ones: the step
    ratio with --compile, and gsplat, which installs only a prebuilt wheel (a pure one would build for minutes)."""
    pytest.importorskip("triton", reason="the preflight launches a kernel in Triton's interpreter")
    out = tmp_path / "out"
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    (wheels / "gsplat-1.5.3-py3-none-any.whl").write_bytes(b"")  # sources only: never installed
    done = run_check(out, "--device", "cpu", stages="gsplat,bench_compile")
    assert done.returncode == 0, done.stdout + done.stderr
    report = read_report(out)
    assert list(report["stages"]) == ["preflight", "bench_compile", "gsplat"] and report["pending"] == []
    assert report["tests"] is None and report["bench"] is None and report["pretrain"] is None
    compiled = report["bench_compile"]["step_ratio_tiny"]
    assert compiled["compile"] is True and compiled["precision"] == "bf16"
    assert all(row["ratio"] > 0 for row in compiled["layouts"])
    assert report["stages"]["gsplat"]["exit"] == "no-wheel"
    assert report["gsplat"]["result"].startswith("no prebuilt gsplat wheel") and "none-any" in report["gsplat"]["result"]


def test_the_report_is_written_as_each_stage_ends(tmp_path):
    """While a stage runs, report.json already holds the stages before it (a run cut off keeps them)."""
    pytest.importorskip("triton", reason="the preflight launches a kernel in Triton's interpreter")
    out = tmp_path / "out"
    run = run_check(out, "--device", "cpu", stages="pretrain", popen=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "logs" / "pretrain.log").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "logs" / "pretrain.log").exists(), run.communicate()
        during = read_report(out)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert during["stages"]["preflight"]["exit"] == "0" and during["preflight"]["ok"]
    assert "pretrain" not in during["stages"] and during["pending"] == ["pretrain"] and during["pretrain"] is None
    assert run.returncode == 0, stdout + stderr
    after = read_report(out)
    assert after["stages"]["pretrain"]["exit"] == "0" and after["pretrain"]["steps"] == 6


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_the_preflight_stops_a_run_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, stages="tests,bench", timeout=120)
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if line.startswith("preflight: ")]
    assert len(said) == 1 and said[0].startswith("preflight: cuda: torch sees no CUDA GPU"), done.stderr
    report = read_report(out)
    assert list(report["stages"]) == ["preflight"] and report["pending"] == ["tests", "bench"]
    assert report["preflight"]["ok"] is False


def test_the_preflight_names_a_missing_compiler(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "out"
    done = run_check(out, "--device", "cpu", stages="preflight", env={"CC": str(tmp_path / "no-cc")}, timeout=120)
    assert done.returncode == 1
    assert f"preflight: c_compiler: CC={tmp_path / 'no-cc'} is not an executable" in done.stderr
    assert read_report(out)["preflight"]["checks"]["c_compiler"].startswith("CC=")


def test_bad_arguments_are_refused(tmp_path):
    for args in ([], [str(tmp_path), "--device", "tpu"], [str(tmp_path), "--oops"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip(), args
    done = run_check(tmp_path / "out", stages="tests,warp", timeout=60)
    assert done.returncode == 2
    assert "no stage 'warp'; the stages are preflight tests bench pretrain bench_compile gsplat" in done.stderr


def test_report_reads_gsplat_errors(tmp_path):
    """A gsplat stage that failed is reported by its first error line and the chain of errors after it."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check_report
    finally:
        sys.path.remove(str(ROOT / "tools"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "stages.tsv").write_text("gsplat\t1\t30\t120\n")
    (tmp_path / "logs" / "gsplat.log").write_text(
        "ImportError: cannot import name 'csrc' from 'gsplat'\n"  # gsplat's own first try, handled
        "TypeError: _jit_compile() missing 2 required positional arguments: 'verbose' and 'with_sycl'\n"
        "building...\nfatal error: cub/cub.cuh: No such file or directory\nninja: build stopped\n"
        "RuntimeError: Error building extension 'gsplat_cuda'\n")
    report = gpu_check_report.report(tmp_path, "cuda", "preflight,gsplat")
    assert report["gsplat"]["first_error"] == "fatal error: cub/cub.cuh: No such file or directory"
    assert report["gsplat"]["error_lines"][-1] == "RuntimeError: Error building extension 'gsplat_cuda'"
    assert report["stages"]["gsplat"]["timed_out"] is False and report["pending"] == ["preflight"]


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
