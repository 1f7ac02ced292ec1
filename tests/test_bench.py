import torch

from gmae.bench import coverage_growth, format_results, many_gaussians, random_scene, rasterize_dense, render_speedup
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


def test_many_gaussians_and_step_ratio_rows_name_their_token_counts():
    r = many_gaussians("tiny", batch_size=1, repeats=1, warmup=0, queries=4, per_query=4)
    assert (r["k_few"], r["k_many"]) == (4, 16) and r["ratio"] == r["many_step_s"] / r["few_step_s"]
    assert 0 < r["few_render_share"] and 0 < r["many_render_share"]
    step = {"preset": "tiny", "img_size": 64, "batch_size": 2, "device": "cpu", "mae_step_s": 0.1, "layouts": [
        {"queries": q, "gaussians_per_query": m, "num_gaussians": 256, "gmae_step_s": 0.2, "ratio": 2.0,
         "gmae_imgs_per_s": 10.0, "render_s": 0.02, "render_share": 0.1} for q, m in ((256, 1), (64, 4))]}
    table = format_results({"step_ratio_tiny": step, "many_gaussians": {"tiny": r}}).splitlines()
    assert "k=256 as 256 tokens x 1" in table[0] and "k=256 as 64 tokens x 4" in table[1]
    assert table[2].startswith("many_gaussians tiny") and "k=16 as 4 tokens x 4" in table[2] and "k=4 as 4 x 1" in table[2]
