import os

import pytest
import torch

from gmae.bench import suite as bench
from gmae.bench.suite import coverage_growth, format_results, many_gaussians, random_scene, rasterize_dense, render_speedup
from gmae.errors import GMAEError
from gmae.render import RenderSettings, rasterize


def test_dense_baseline_has_the_contract_semantics():
    scene = random_scene(2, 40, 24, (1.0, 5.0), seed=3)
    dense = rasterize_dense(*scene, height=24, width=24)
    ref = rasterize(*scene, height=24, width=24, settings=RenderSettings(backend="torch"))
    torch.testing.assert_close(dense[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[1], ref[1], atol=1e-5, rtol=1e-5)


def test_timed_interleaved_takes_medians_after_the_warmup(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = {"a": 0, "b": 0}

    def advance(name, first, then):
        def fn():
            clock[0] += first if calls[name] == 0 else then[(calls[name] - 1) % len(then)]
            calls[name] += 1
        return fn

    t = bench.timed_interleaved({"a": advance("a", 100.0, [1.0, 5.0, 2.0]), "b": advance("b", 100.0, [3.0])},
                                repeats=3, warmup=1)
    assert t == {"a": 2.0, "b": 3.0} and calls == {"a": 4, "b": 4}


def test_render_benchmarks_report_ratios(monkeypatch):
    """Each ratio is the named timings' quotient, the right way up (known timings in, known ratios out)."""
    known = {"fast": 2.0, "reference": 6.0, "dense": 10.0, "k256": 0.5, "k4096": 2.0}
    monkeypatch.setattr(bench, "timed_interleaved", lambda fns, *a, **k: {name: known[name] for name in fns})
    r = render_speedup("cpu", sizes=(32,), batch=2, k=16, repeats=1, dense_at=32)
    row = r["32"]
    assert (row["vs_reference"], row["vs_dense"], row["fast_s"]) == (3.0, 5.0, 2.0)
    c = coverage_growth("cpu", size=32, batch=1, repeats=1)
    assert c["ratio"] == 4.0
    table = format_results({"render_speedup": r, "coverage_growth": c})
    assert "render_speedup 32px" in table and "coverage_growth" in table


def test_default_step_times_the_default_against_the_previous_one():
    from gmae.config import model_config

    c, loss = model_config("tiny").max_scale, model_config("tiny").loss
    r = bench.default_step(batch_size=2, warm_steps=1, repeats=1, previous=dict(max_scale=c + 1.0, loss=loss))
    assert r["default_step_s"] > 0 and r["previous_step_s"] > 0
    assert r["changed"] == {"max_scale": (c + 1.0, c)}  # loss is the same in both: not a change
    line = format_results({"default_step": r})
    assert line.startswith("default_step") and f"max_scale {c + 1.0} -> {c}" in line and f"{r['ratio']:.3f}" in line


# --------------------------------------------------------------------------- the benchmark's processes


def test_bench_worker_runs_and_reports(tmp_path):
    spec = {"cpus": bench._shared_cpus(2), "batch_size": 2, "seconds": 0.0, "warmup": 0, "threads": 1}
    (result,) = bench.run_workers([spec], timeout=240)
    assert result["steps"] >= 2 and result["threads"] == 1 and result["world_size"] == 1
    assert result["wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_bench_worker_failure_is_one_clear_error():
    with pytest.raises(GMAEError, match="a benchmark process failed .*Invalid argument"):
        bench.run_workers([{"cpus": [10**6], "steps": 1}], timeout=120)


def test_missing_torchrun_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch.distributed.run" else real(name, *a))
    with pytest.raises(GMAEError, match="needs torchrun"):
        bench.run_workers([{"steps": 1}], torchrun=2)


def test_contention_table():
    row = {"solo_steps_per_s": 5.0, "pair_steps_per_s": [2.2, 2.4], "fractions": [0.44, 0.48], "min_fraction": 0.44,
           "machine_total": 0.92, "threads": 2, "wait_policy": "PASSIVE", "batch_size": 16}
    table = bench.format_results({
        "contention": {"cpus": [0, 1], "seconds": 8, "busy_before": 1.5, "gmae": row, "without_defaults": {**row, "fractions": [0.1, 0.12]}},
        "contention_ddp": {"cpus": [0, 1], "steps": 30, "busy_before": 0.0, "batch_size": 16, "one_steps_per_s": 5.0,
                           "ddp_steps_per_s": 4.5, "ratio": 0.9, "one_threads": 2, "ddp_threads": 1, "world_size": 2},
    })
    assert "each at 0.44 and 0.48 of solo" in table and "each at 0.10 and 0.12 of solo" in table
    assert "= 0.90 on 2 cores" in table and "1.5 cores busy before: other work" in table


def test_busy_cores_reads_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    lines = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  250 0 150 1000 0 0 0 0 0 0\n"])  # 200 busy of 400

    def fake_sleep(_):
        stat.write_text(next(lines))

    stat.write_text(next(lines))
    monkeypatch.setattr(bench.time, "sleep", fake_sleep)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.busy_cores(0.0, str(stat)) == 1.0  # half of 2 cores
    assert bench.busy_cores(0.0, str(tmp_path / "missing")) is None


def test_many_gaussians_and_step_ratio_rows_name_their_token_counts():
    r = many_gaussians("tiny", batch_size=1, repeats=1, warmup=0, queries=4, per_query=4)
    assert (r["k_few"], r["k_many"]) == (4, 16) and r["few_step_s"] > 0 and r["many_step_s"] > 0
    assert 0 < r["few_render_share"] and 0 < r["many_render_share"]
    step = {"preset": "tiny", "img_size": 64, "batch_size": 2, "device": "cpu", "mae_step_s": 0.1, "layouts": [
        {"queries": q, "gaussians_per_query": m, "num_gaussians": 256, "gmae_step_s": 0.2, "ratio": 2.0,
         "gmae_imgs_per_s": 10.0, "render_s": 0.02, "render_share": 0.1} for q, m in ((256, 1), (64, 4))]}
    table = format_results({"step_ratio_tiny": step, "many_gaussians": {"tiny": r}}).splitlines()
    assert "k=256 as 256 tokens x 1" in table[0] and "k=256 as 64 tokens x 4" in table[1]
    assert table[2].startswith("many_gaussians tiny") and "k=16 as 4 tokens x 4" in table[2] and "k=4 as 4 x 1" in table[2]


def test_step_ratios_are_the_timings_quotients(monkeypatch):
    """step_ratio, many_gaussians and default_step with known timings: each ratio and share the right way up."""
    def fake(fns, *a, **k):
        return {name: (0.5 if str(name).startswith("render") else 2.0 if name in ("mae", 1, "previous") else 6.0)
                for name in fns}

    monkeypatch.setattr(bench, "timed_interleaved", fake)
    r = bench.step_ratio("tiny", batch_size=1, repeats=1, warmup=0, img_size=16, patch_size=8)
    assert [(row["ratio"], row["render_share"], row["gmae_imgs_per_s"]) for row in r["layouts"]] == \
        [(3.0, 0.5 / 6.0, 1 / 6.0)] * len(r["layouts"])
    m = many_gaussians("tiny", batch_size=1, repeats=1, warmup=0, queries=4, per_query=4)
    assert (m["ratio"], m["few_render_share"], m["many_render_share"]) == (3.0, 0.25, 0.5 / 6.0)
    d = bench.default_step(batch_size=2, warm_steps=0, repeats=1, previous=dict(loss="masked"))
    assert d["ratio"] == 3.0


def test_render_backends_times_every_backend_of_the_device_against_torch():
    r = bench.render_backends("cpu", batch=1, ks=(8,), size=16, repeats=1)
    names = bench.device_backends("cpu")
    assert names[-1] == "torch" and "triton" not in names  # the interpreter is for tests, not for timing
    assert [(row["backend"], row["depth_grad"]) for row in r["rows"]] == \
        [(n, False) for n in names] + [(n, True) for n in names if n in bench.DEPTH_GRAD_BACKENDS]
    assert all(row["ms"] > 0 and row["vs_torch"] > 0 for row in r["rows"])
    table = format_results({"render_backends": r})
    assert "render_backends torch k=8 swap" in table and "with the depth-order gradient" in table


def test_render_backends_ratio_is_torch_over_the_backend(monkeypatch):
    """With known timings (torch 3 s, cpu 0.5 s): ms is the backend's time and vs_torch torch's over it."""
    monkeypatch.setattr(bench, "timed_interleaved", lambda fns, *a, **k: {n: 3.0 if n == "torch" else 0.5 for n in fns})
    rows = bench.render_backends("cpu", batch=1, ks=(8,), size=16, repeats=1)["rows"]
    cpu = [row for row in rows if row["backend"] == "cpu"]
    assert cpu and all((row["ms"], row["vs_torch"]) == (500.0, 6.0) for row in cpu)
    assert all((row["ms"], row["vs_torch"]) == (3000.0, 1.0) for row in rows if row["backend"] == "torch")


def test_step_ratio_reports_its_precision_and_render_backend():
    r = bench.step_ratio("tiny", 2, repeats=1, warmup=0, precision="bf16", layouts=((16, 1),))
    assert r["precision"] == "bf16" and r["compile"] is False and r["render_backend"] == "cpu"
    assert "bf16, render cpu;" in format_results({"step_ratio_tiny": r})
