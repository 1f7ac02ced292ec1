"""End-to-end checks of the `gmae` command: every sub-command, resume, safe loading, user errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.io.checkpoint import list_checkpoints

from gmae.io.loader import load
from gmae.cli import main

# A small, fast run of the tiny preset (32 px, 16 patches, 32 Gaussians).
FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet"]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", *FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def test_pretrain_writes_checkpoints_metrics_and_figure(run_dir):
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    assert [s for s, _ in losses(run_dir)] == [0, 1, 2, 3]
    assert all(np.isfinite(l) for _, l in losses(run_dir))
    fig = Image.open(run_dir / "reconstruction.png")
    assert fig.size[0] > 100 and fig.size[1] > 100
    # loadable without executing code, and holds everything needed to continue
    state = torch.load(run_dir / "checkpoint-0000004.pt", weights_only=True)
    assert state["step"] == 4
    assert {"model", "optimizer", "rng", "config"} <= set(state)
    assert state["config"]["model"]["num_gaussians"] == 32 and state["config"]["train"]["steps"] == 4


def test_resume_continues_exactly(tmp_path, run_dir):
    out = tmp_path / "resumed"
    assert main(["pretrain", *FAST, "--steps", "2", "--checkpoint-every", "2", "--out", str(out)]) == 0
    # a killed run may leave metric lines past its last checkpoint: they are replaced on resume
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 123.0}) + "\n{\"step\": 3, \"lo")
    assert main(["pretrain", *FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(out), "--resume"]) == 0
    assert losses(out) == losses(run_dir)  # bitwise-equal losses to the uninterrupted run


def test_info(run_dir, capsys):
    assert main(["info", str(run_dir / "checkpoint-0000004.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 4 and info["model"]["model"] == "gmae"
    assert info["parameters"]["total"] == info["parameters"]["encoder"] + info["parameters"]["decoder"] > 0
    # whether the geometry follows the image, on held-out dead-leaves, and the full render against the mean colour
    layout = info["layout"]
    assert {"layout_spread_ratio", "depth_rank_corr", "edge_follow", "image_independent"} <= set(layout)
    assert layout["image_independent"] and "held-out deadleaves" in layout["source"]  # 4 steps: a fixed layout
    assert set(info["fidelity"]) == {"deadleaves", "sprites", "photos"}
    for f in info["fidelity"].values():
        assert f["psnr_gain"] == pytest.approx(f["psnr_full"] - f["psnr_mean_colour"]) and f["psnr_mean_colour"] > 5
    assert main(["info", str(run_dir / "checkpoint-0000004.pt")]) == 0
    out = capsys.readouterr().out
    assert "num_gaussians: 32" in out and "layout: spread ratio" in out and "image-independent" in out
    assert "fidelity (PSNR of the full render at mask 0" in out and "photos" in out


def test_pretrain_logs_whether_the_layout_follows_the_image(run_dir, tmp_path):
    """--layout-every N: the layout figures and the full-image PSNR at step 0, every N steps and the last; the
    losses are those of a run without them (the monitor draws nothing and computes no gradient)."""
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    monitored = [r["step"] for r in records if "layout_spread_ratio" in r]
    assert monitored == [0, 3]  # default every 100: step 0 and the last
    for key in ("depth_rank_corr", "edge_follow", "psnr_full", "psnr_mean_colour", "psnr_gain"):
        assert np.isfinite(records[0][key])
    out = tmp_path / "quiet"
    assert main(["pretrain", *FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(out),
                 "--layout-every", "0"]) == 0
    assert losses(out) == losses(run_dir)
    with open(out / "metrics.jsonl") as f:
        assert not any("layout_spread_ratio" in json.loads(line) for line in f)


def test_reconstruct_any_image(run_dir, tmp_path):
    rgb = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(rgb)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(grey)
    out = tmp_path / "figs"
    assert main(["reconstruct", str(rgb), str(grey), "--checkpoint", str(run_dir / "checkpoint-0000004.pt"),
                 "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["grey_reconstruction.png", "photo_reconstruction.png"]


def test_bench_prints_ratio(capsys):
    assert main(["bench", "--only", "step_ratio_tiny", "--batch-size", "2", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["step_ratio_tiny"]
    assert r["mae_step_s"] > 0
    # k = 256 Gaussians at the paper's shape (256 tokens) and with fewer tokens (64 x 4)
    assert [(row["queries"], row["gaussians_per_query"], row["num_gaussians"]) for row in r["layouts"]] == \
        [(256, 1, 256), (64, 4, 256)]
    for row in r["layouts"]:
        # (the ratios' arithmetic is checked with known timings in test_bench.py)
        assert row["gmae_step_s"] > 0 and row["render_s"] > 0 and 0 < row["render_share"] < 1


def test_mae_pretrain(tmp_path):
    assert main(["pretrain", *FAST, "--model", "mae", "--loss", "masked_normpix", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    assert load(tmp_path / "checkpoint-0000002.pt", "checkpoint")["config"]["model"]["model"] == "mae"


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "gmae-checkpoint", "payload": Evil()}, path)
    code = main(["info", str(path)])
    assert code == 2 and not marker.exists()


@pytest.mark.parametrize("argv,needle", [
    (["info", "missing.pt"], "missing.pt does not exist"),
    (["pretrain", "--mask-ratio", "1.0", "--steps", "1"], "mask ratio"),
    (["pretrain", "--data", "no/such/folder", "--steps", "1"], "no/such/folder"),
    (["pretrain", "--img-size", "30", "--steps", "1"], "multiple of the patch size"),
    (["pretrain", "--render-backend", "nope", "--steps", "1", "-k", "4", "--img-size", "16"], "nope"),
    (["pretrain", "--num-workers", "-1", "--steps", "1"], "num-workers"),
    (["pretrain", "--dist-timeout", "0", "--steps", "1"], "dist-timeout must be > 0 seconds"),
    pytest.param(["pretrain", "--device", "cuda", "--steps", "1"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_user_errors_are_one_line(argv, needle, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path)] if argv[0] == "pretrain" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err


def test_unreadable_image_is_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code = main(["reconstruct", str(bad), "--checkpoint", str(run_dir / "checkpoint-0000004.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "bad.jpg" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["layers", "reconstruct"])
def test_every_input_is_read_before_any_figure_is_written(command, run_dir, tmp_path, capsys):
    """A folder with good images and seven bad files: nothing is written, and one line names the first five bad
    files and counts the rest (the good images sort first, so a per-image loop would have written their figures)."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a0.png", "a1.png"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / name)
    for i in range(7):
        (folder / f"b{i}.png").write_bytes(b"" if i == 0 else b"not an image")
    out = tmp_path / "figs"
    code = main([command, str(folder), "--checkpoint", str(run_dir / "checkpoint-0000004.pt"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "7 of 9 images cannot be used" in err and all(f"b{i}.png" in err for i in range(5)), err
    assert "b5.png" not in err and "and 2 more" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_every_command_runs_on_the_gpu_when_there_is_one():
    """--device defaults to auto everywhere (pretrain, finetune and detect through their configs): CUDA when it is
    available, else the CPU; the README's ImageNet line then uses the GPU without a flag."""
    from gmae.cli import build_parser
    from gmae.config import DetectConfig, FinetuneConfig, train_config
    from gmae.errors import GMAEError
    from gmae.runtime.distributed import resolve_device

    defaults = {name: a.default for name, p in build_parser().commands.items() for a in p._actions
                if "--device" in a.option_strings}
    assert len(defaults) >= 8, defaults
    assert all(d == "auto" or (d is None and name in ("pretrain", "finetune", "detect"))
               for name, d in defaults.items()), defaults
    assert train_config("tiny").device == DetectConfig().device == FinetuneConfig().device == "auto"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(GMAEError, match="unknown device 'gpu'; use auto"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(GMAEError, match="CUDA is not available here"):
            resolve_device("cuda")


def test_the_progress_bar_names_the_device(tmp_path, capsys):
    assert main(["pretrain", "--img-size", "16", "-k", "8", "--steps", "1", "--batch-size", "2",
                 "--render-backend", "torch", "--threads", "1", "--out", str(tmp_path / "r")]) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"pretrain gmae ({expected})" in capsys.readouterr().err


def test_console_entry_point_and_bad_flag():
    ok = subprocess.run([sys.executable, "-m", "gmae", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pretrain" in ok.stdout and "reconstruct" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gmae", "pretrain", "--steps", "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a whole number" in bad.stderr and "Traceback" not in bad.stderr


def test_resume_keeps_saved_settings_unless_given(tmp_path):
    out = str(tmp_path)
    assert main(["pretrain", *FAST, "--steps", "2", "--blr", "0.01", "--out", out]) == 0
    # no --steps: the run is already complete at its own 2 steps (not the preset's 1200)
    assert main(["pretrain", *FAST, "--out", out, "--resume"]) == 0
    assert [s for s, _ in losses(out)] == [0, 1]
    assert main(["pretrain", *FAST, "--out", out, "--resume", "--steps", "3"]) == 0
    state = load(tmp_path / "checkpoint-0000003.pt", "checkpoint")
    assert state["config"]["train"]["steps"] == 3 and state["config"]["train"]["blr"] == 0.01


def test_export_safetensors(run_dir, tmp_path):
    from gmae.io.loader import load

    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir / "checkpoint-0000004.pt"), "--format", "safetensors", "--out", str(out)]) == 0
    model, cfg = load(out, "export")
    state = torch.load(run_dir / "checkpoint-0000004.pt", weights_only=True)["model"]
    assert cfg.num_gaussians == 32
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_run_folder_is_not_silently_reused(run_dir, capsys):
    before = sorted(os.listdir(run_dir))
    # a fresh run into a folder holding another run's checkpoints is refused (it would prune them)
    assert main(["pretrain", *FAST, "--steps", "1", "--out", str(run_dir)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # resuming to fewer steps than the checkpoint has is refused too
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(run_dir), "--resume"]) == 2
    assert "below the checkpoint's step 4" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == before


def test_gaussians_per_query_reaches_the_checkpoint_and_bad_values_are_one_line(tmp_path, capsys):
    out = tmp_path / "m4"
    assert main(["pretrain", *FAST, "--gaussians-per-query", "4", "--position-param", "anchored", "--steps", "1",
                 "--out", str(out)]) == 0
    state = load(out / "checkpoint-0000001.pt", "checkpoint")
    model_cfg = state["config"]["model"]
    assert (model_cfg["num_gaussians"], model_cfg["gaussians_per_query"], model_cfg["position_param"]) == (32, 4, "anchored")
    assert state["model"]["query_embed"].shape[1] == 8  # k / m query tokens
    import gmae

    assert "k=32 (8 queries x 4)" in repr(gmae.load(out))
    assert main(["pretrain", *FAST, "--gaussians-per-query", "5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "gaussians-per-query 5 must be at least 1 and divide the number of Gaussians k = 32" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
