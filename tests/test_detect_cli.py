"""gmae detect: detection fine-tuning as a command, on the training engine (checkpoints, metrics, the signal
stop, exact resume), on generated data or a COCO folder; COCO AP in results.json; usage errors in one line."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from gmae.cli import main
from gmae.config import DetectConfig, model_config
from gmae.evaluate.detection import train as detection_train
from gmae.evaluate.detection.data import generated_set, write_coco
from gmae.evaluate.detection.train import DetectionRecipe, detect
from gmae.evaluate.probe import random_encoder
from gmae.errors import GMAEError
from gmae.io.files import list_checkpoints
from gmae.io.loader import load
from gmae.runtime.stopping import Stopped

TINY = ["--image-size", "32", "--channels", "16", "--batch-size", "2", "--threads", "1", "--quiet"]


def tiny(out, **kw) -> DetectConfig:
    values = dict(random_init=True, image_size=32, channels=16, batch_size=2, train_images=8, val_images=4, steps=3,
                  out=str(out))
    return DetectConfig(**{**values, **kw})


def scores_in_unit_interval(results: dict) -> None:
    for kind in ("bbox", "segm"):
        assert set(results[kind]) == {"AP", "AP50", "AP75"}
        assert all(0.0 <= v <= 1.0 for v in results[kind].values()), results[kind]


def test_the_recipe_defaults_are_the_detection_recipes():
    recipe, dcfg = DetectionRecipe(), DetectConfig()
    same = ("steps", "batch_size", "seed", "lr", "weight_decay", "layer_decay", "drop_path", "channels", "rois_per_image", "flip")
    assert {k: getattr(dcfg, k) for k in same} == {k: getattr(recipe, k) for k in same}
    assert DetectConfig(steps=300).warmup == 25 == recipe.warmup_steps  # a twelfth of the run
    assert DetectConfig(steps=6000).warmup == 250  # ViTDet's warmup at most
    assert DetectConfig(steps=300, warmup_steps=7).warmup == 7


def test_the_command_writes_results_checkpoints_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "--random-init", *TINY, "--train-images", "8", "--val-images", "4", "--steps", "3",
                 "--checkpoint-every", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    scores_in_unit_interval(results)
    assert (results["steps"], results["num_train"], results["num_val"], results["categories"]) == (3, 8, 4, 4)
    assert f"bbox: AP {100 * results['bbox']['AP']:.1f}" in printed and "segm: AP " in printed
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000002.pt", "checkpoint-0000003.pt"]
    state = load(out / "checkpoint-0000003.pt", "detect-checkpoint")
    assert state["step"] == 3 and state["config"]["detect"]["warmup_steps"] == 0  # 3 // 12, recorded
    assert any(k.startswith("backbone.net.blocks.") for k in state["model"])
    assert state["config"]["detect"]["rois_per_image"] == 32
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and all("loss_mask" in r for r in lines)
    with pytest.raises(GMAEError, match="not a gmae fine-tune checkpoint"):
        load(out / "checkpoint-0000003.pt", "finetune-checkpoint")


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    detect(tiny(full, evaluate=False), progress=False)
    real = detection_train.lr_factor

    def lr_factor(step, *args):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(detection_train, "lr_factor", lr_factor)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 2 of 3"):
        detect(tiny(cut, evaluate=False), progress=False)
    assert [p.name for p in list_checkpoints(cut)] == ["checkpoint-0000002.pt"]
    monkeypatch.setattr(detection_train, "lr_factor", real)
    with pytest.raises(GMAEError, match=r"--lr \(saved 0.001, given 0.0001\)"):
        detect(tiny(cut, evaluate=False, lr=1e-4), resume=True, progress=False, given={"lr": "--lr"})
    results = detect(tiny(cut, evaluate=False), resume=True, progress=False)
    assert results["steps_run"] == 1
    a = load(full / "checkpoint-0000003.pt", "detect-checkpoint")["model"]
    b = load(cut / "checkpoint-0000003.pt", "detect-checkpoint")["model"]
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    before = load(cut / "checkpoint-0000002.pt", "detect-checkpoint")["model"]
    assert [k for k in a if not torch.equal(a[k], before[k])]  # the resumed step trained the weights


def test_a_coco_folder_and_an_encoder_file(tmp_path, capsys):
    data = generated_set("sprites", 32, 8, seed=0)
    write_coco(data, tmp_path / "coco" / "instances.json", tmp_path / "coco" / "images")
    val = generated_set("sprites", 32, 3, seed=0, start=100)
    write_coco(val, tmp_path / "val" / "instances.json", tmp_path / "val" / "images")
    encoder = tmp_path / "vit.pth"  # timm's names, no gmae config: the loader infers the architecture
    torch.save(random_encoder(model_config("tiny", img_size=32)).state_dict(), encoder)
    coco = ["--data-json", str(tmp_path / "coco" / "instances.json"), "--images", str(tmp_path / "coco" / "images")]
    assert main(["detect", "--checkpoint", str(encoder), *TINY, *coco, "--val-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "a"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    scores_in_unit_interval(results)
    assert (results["num_train"], results["num_val"], results["encoder"]) == (6, 2, str(encoder))
    assert main(["detect", "--random-init", *TINY, *coco, "--val-json", str(tmp_path / "val" / "instances.json"),
                 "--val-dir", str(tmp_path / "val" / "images"), "--class-agnostic", "--steps", "2", "--out",
                 str(tmp_path / "b"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert (results["num_train"], results["num_val"], results["categories"]) == (8, 3, 1)
    assert main(["detect", "--random-init", *TINY, *coco, "--val-images", "8", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-images 8 leaves no training image of the 8" in err
    write_coco(detection_train._one_category(val), tmp_path / "other" / "instances.json", tmp_path / "other" / "im")
    assert main(["detect", "--random-init", *TINY, *coco, "--val-json", str(tmp_path / "other" / "instances.json"),
                 "--val-dir", str(tmp_path / "other" / "im"), "--out", str(tmp_path / "d")]) == 2
    assert "categories of " + str(tmp_path / "other" / "instances.json") + " differ" in capsys.readouterr().err


CHECKS = textwrap.dedent("""
    import sys
    from gmae.cli import main

    folder, codes = sys.argv[1], []
    for argv in (["--random-init", "--data", "cats"],
                 ["--random-init", "--data-json", folder + "/missing.json", "--images", folder],
                 ["--random-init", "--batch-size", "0"],
                 ["--data-json", folder + "/x.json"],
                 [],
                 ["--checkpoint", folder + "/missing.pt"],
                 ["--random-init", "--val-dir", folder]):
        try:
            codes.append(main(["detect", *argv]))
        except SystemExit as e:  # argparse's usage errors
            codes.append(e.code)
    print(codes, "torch" in sys.modules)
""")


def test_usage_errors_are_one_line_before_torch_is_imported(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHECKS, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.strip().splitlines()[-1] == f"{[2] * 7} False", done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 7 and "Traceback" not in done.stderr, done.stderr
    for expected in ("invalid choice: 'cats'", "--data-json " + str(tmp_path / "missing.json") + " does not exist",
                     "--batch-size", "--data-json and --images go together", "give --checkpoint",
                     "missing.pt does not exist", "--val-dir is the folder of --val-json's images"):
        assert any(expected in e for e in errors), (expected, errors)



def test_two_processes_under_torchrun(tmp_path):
    from test_cluster import ENV, torchrun

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, *torchrun(), "-m", "gmae", "detect", "--random-init", *TINY,
                           "--train-images", "8", "--val-images", "4", "--steps", "3", "--device", "cpu", "--json",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # the first process reports
    scores_in_unit_interval(printed[0])
    assert printed[0] == json.loads((out / "results.json").read_text())
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert load(out / "checkpoint-0000003.pt", "detect-checkpoint")["step"] == 3


def test_the_resume_help_names_detects_own_flags(capsys):
    from gmae.cli import build_parser

    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after a hyphen
    start = text.index("a resume may change")
    named = re.findall(r"--[a-z-]+", text[start:text.index("--out", start) + len("--out")])
    options = {o for a in build_parser().commands["detect"]._actions for o in a.option_strings}
    assert "--eval" in named and "--steps" in named and set(named) <= options, (named, options)


def test_submit_runs_detect_as_a_job_that_continues_its_checkpoints(tmp_path):
    pytest.importorskip("submitit")
    from gmae.cli import parse_args
    from gmae.runtime.cluster import job_command
    from test_cluster import ENV

    job = ["detect", "--random-init", *TINY, "--train-images", "8", "--val-images", "4", "--steps", "3", "--device",
           "cpu", "--out", str(tmp_path / "run")]
    args = parse_args(["submit", "--nodes", "2", "--gpus-per-node", "8", *job])
    assert args.job_args.command == "detect" and job_command(args.job)[-1] == "--resume=auto"  # a requeue continues
    done = subprocess.run([sys.executable, "-m", "gmae", "submit", "--cluster", "local", "--time", "10", "--wait",
                           *job], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "finished" in done.stdout and "(it runs with --resume=auto)" in done.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 3
    scores_in_unit_interval(results)


def test_the_proposals_sampled_per_image_reach_the_box_head(tmp_path):
    train = generated_set("sprites", 32, 2)
    model, _ = detection_train._detector(random_encoder(model_config("tiny", img_size=32)), train,
                                         DetectionRecipe(rois_per_image=5, channels=16), 32, "cpu")
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 5
