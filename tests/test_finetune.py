"""Fine-tuning: drop path, layer-wise lr decay, the training loop, checkpoints, exact resume, `gmae finetune`."""

import json

import pytest
import torch

from gmae.io.checkpoint import list_checkpoints
from gmae.cli import main
from gmae.config import model_config
from gmae.errors import GMAEError
from gmae.evaluate.finetune import (
    FinetuneConfig,
    evaluate,
    finetune,
)
from gmae.io.loader import load
from gmae.model import param_groups as param_groups_lrd
from gmae.model.classifier import DropPath, build_classifier
from conftest import TINY, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """train/ and val/ of 3 classes: noisy images whose dominant channel is the class (easy to learn)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 120, (24, 24, 3))
                a[..., c] += 120
                Image.fromarray(a.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def fast(out, **kw):
    values = {"data": "digits", "steps": 6, "batch_size": 16, "blr": 2e-2, "eval_every": 3,
              "checkpoint_every": 3, "out": str(out)}
    values.update(kw)
    return FinetuneConfig(**values)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- model pieces


def test_drop_path_identity_in_eval_stochastic_in_train():
    drop = DropPath(0.5)
    x = torch.ones(4000, 3, 2)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # whole samples dropped, the rest scaled by 1/(1-p)
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(y.mean().item() - 1.0) < 0.05  # expectation kept
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_classifier_keeps_pretrained_weights_and_timm_names(ckpt):
    encoder, mcfg = load(ckpt, "encoder")
    reference = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = build_classifier(mcfg, 10, drop_path=0.3, encoder=encoder)
    sd = model.state_dict()
    assert {k.split(".")[0] for k in sd} == {"patch_embed", "cls_token", "pos_embed", "blocks", "fc_norm", "head"}
    for k, v in reference.items():
        if not k.startswith("norm."):  # MAE's global pool: fc_norm replaces the final norm
            assert torch.equal(sd[k], v), k
    assert [d.p for d in model.drop_paths] == pytest.approx([0.0, 0.3])
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert model(x).shape == (4, 10) and torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model.forward_features(x)
    assert not torch.equal(a, model.forward_features(x))  # drop path draws new masks


def test_layer_decay_scales_and_weight_decay():
    mcfg = model_config("tiny", **TINY)  # depth 2
    model = build_classifier(mcfg, 5)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[ids[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert by_name["head.weight"] == (1.0, 0.05) and by_name["fc_norm.weight"] == (1.0, 0.0)
    assert by_name["blocks.1.attn.qkv.weight"] == (0.5, 0.05)  # deepest block: decay^1
    assert by_name["blocks.0.mlp.fc1.bias"] == (0.25, 0.0)
    assert by_name["patch_embed.proj.weight"] == (0.125, 0.05)  # embeddings: decay^(depth + 1)
    assert by_name["cls_token"] == (0.125, 0.0)
    assert "pos_embed" not in by_name  # fixed sin-cos, not trained
    assert len(by_name) == sum(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- training


def test_finetune_learns_writes_metrics_and_checkpoints(tmp_path, ckpt, colours):
    out = tmp_path / "ft"
    summary = finetune(fast(out, checkpoint=str(ckpt), data=str(colours), steps=24, batch_size=12, eval_every=12,
                            checkpoint_every=12, smoothing=0.0, warmup_steps=2), progress=False)
    rows = records(out)
    assert [r["step"] for r in rows] == list(range(24))
    assert all({"step", "loss", "lr"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val_acc" in r] == [11, 23]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-4:]) / 4
    assert first == pytest.approx(1.0986, abs=0.01) and last < first - 0.2  # from ln 3
    assert summary["val_acc"] == rows[-1]["val_acc"] and summary["val_acc"] > 0.8
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000012.pt", "checkpoint-0000024.pt"]
    state = torch.load(out / "checkpoint-0000024.pt", weights_only=True)
    assert state["format"] == "gmae-finetune" and state["step"] == 24
    assert state["config"]["num_classes"] == 3 and state["config"]["classes"] == ["blue", "green", "red"]
    # the optimizer ran with the layer-wise scales
    lrs = {g["layer_id"]: (g["lr"], g["lr_scale"]) for g in state["optimizer"]["param_groups"]}
    head_lr = lrs[3][0]
    assert all(lr == pytest.approx(head_lr * scale) for lr, scale in lrs.values())
    model, mcfg, _ = load(out / "checkpoint-0000024.pt", "classifier")
    from gmae.data.labelled import build_labelled

    _, val, _ = build_labelled(str(colours), mcfg.img_size)
    assert evaluate(model, val) == pytest.approx(summary["val_acc"])
    with pytest.raises(GMAEError, match="already holds checkpoints"):
        finetune(fast(out, checkpoint=str(ckpt)), progress=False)


def test_resume_continues_exactly(tmp_path, ckpt, colours):
    full, cut = tmp_path / "full", tmp_path / "cut"
    finetune(fast(full, checkpoint=str(ckpt), data=str(colours), batch_size=6), progress=False)
    finetune(fast(cut, checkpoint=str(ckpt), data=str(colours), batch_size=6), progress=False)
    # as if killed after the step-3 checkpoint: the last checkpoint gone, torn metric lines left
    (cut / "checkpoint-0000006.pt").unlink()
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    summary = finetune(fast(cut, checkpoint="ignored on resume", blr=1.0), resume=True, progress=False)
    assert summary["steps_run"] == 3
    assert [(r["step"], r["loss"]) for r in records(cut)] == [(r["step"], r["loss"]) for r in records(full)]
    a = torch.load(full / "checkpoint-0000006.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint-0000006.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_differs_from_pretrained(tmp_path, ckpt):
    pre = finetune(fast(tmp_path / "a", checkpoint=str(ckpt), steps=1, eval_every=1), progress=False)
    rnd = finetune(fast(tmp_path / "b", checkpoint=str(ckpt), steps=1, eval_every=1, random_init=True), progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint-0000001.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint-0000001.pt", weights_only=True)["model"]
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    assert pre["steps"] == rnd["steps"] == 1


def test_bad_settings_are_one_line_errors(tmp_path):
    for kw in ({"layer_decay": 0.0}, {"drop_path": 1.0}, {"smoothing": -0.1}, {"batch_size": 0}):
        with pytest.raises(GMAEError) as err:
            fast(tmp_path, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(GMAEError, match="not a gmae fine-tune checkpoint"):
        bad = tmp_path / "x.pt"
        torch.save({"format": "other"}, bad)
        load(bad, "classifier")


# --------------------------------------------------------------------------- CLI


def test_cli_finetune(tmp_path, ckpt, capsys):
    out = tmp_path / "cli"
    args = ["finetune", "--checkpoint", str(ckpt), "--data", "digits", "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--layer-decay", "0.65", "--drop-path", "0.2"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and 0.0 <= summary["val_acc"] <= 1.0
    state = torch.load(out / "checkpoint-0000002.pt", weights_only=True)
    assert state["config"]["finetune"]["layer_decay"] == 0.65 and state["config"]["finetune"]["drop_path"] == 0.2
    assert main(["finetune", "--out", str(out), "--resume", "--quiet"]) == 0  # finished: nothing left to run
    assert "final val top-1" in capsys.readouterr().out
    assert main(["finetune", "--out", str(tmp_path / "none")]) == 2
    assert main([*args[:-6], "--data", "cifar10:" + str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2


def test_cli_finetune_reads_a_timm_pth_with_the_normalisation_given(tmp_path):
    """--normalize reaches the encoder a .pth is read into, and the run's recorded model config says it."""
    from gmae.io.export import export_checkpoint

    pth = export_checkpoint(tiny_checkpoint(tmp_path / "checkpoint-0000001.pt", embed_dim=64, num_heads=1),
                            tmp_path / "vit.pth", fmt="timm")
    for given, used in (("", "imagenet"), ("none", "none")):  # nothing given: read as timm's and MAE's files
        out = tmp_path / f"ft-{used}"
        flags = ["--normalize", given] if given else []
        assert main(["finetune", "--checkpoint", str(pth), "--data", "digits", "--out", str(out), "--steps", "1",
                     "--batch-size", "8", "--quiet", *flags]) == 0
        config = torch.load(out / "checkpoint-0000001.pt", weights_only=True)["config"]
        assert config["model"]["input_norm"] == used and config["finetune"]["input_norm"] == given
