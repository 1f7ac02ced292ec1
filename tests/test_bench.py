import torch

from gmae.bench import coverage_growth, format_results, random_scene, rasterize_dense, render_speedup
from gmae.render import rasterize


def test_dense_baseline_has_the_contract_semantics():
    scene = random_scene(2, 40, 24, (1.0, 5.0), seed=3)
    dense = rasterize_dense(*scene, height=24, width=24)
    ref = rasterize(*scene, height=24, width=24, backend="torch")
    torch.testing.assert_close(dense[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[1], ref[1], atol=1e-5, rtol=1e-5)


def test_render_benchmarks_report_ratios():
    r = render_speedup("cpu", sizes=(32,), batch=2, k=16, repeats=1, dense_at=32)
    row = r["32"]
    assert row["vs_reference"] == row["reference_s"] / row["fast_s"] and row["vs_dense"] == row["dense_s"] / row["fast_s"]
    c = coverage_growth("cpu", size=32, batch=1, repeats=1)
    assert c["ratio"] == c["k4096_s"] / c["k256_s"]
    table = format_results({"render_speedup": r, "coverage_growth": c})
    assert "render_speedup 32px" in table and "coverage_growth" in table
