"""The EMA of the weights (gmae pretrain --ema): its values, and the commands and functions that read it."""

import json

import pytest
import torch
from conftest import TINY

import gmae
from gmae.io.loader import load
from gmae.cli import main
from gmae.config import model_config, train_config
from gmae.errors import GMAEError
from gmae.io.export import export_checkpoint
from gmae.train import pretrain

DECAY = 0.5  # far from 1, so that three steps move the EMA well away from both the first and the last weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps with --ema 0.5, a checkpoint after each; the second step's loss is NaN, so it is skipped."""
    from gmae.model.gmae import GMAE

    out = tmp_path_factory.mktemp("ema")
    original, calls = GMAE.forward, []

    def nan_on_the_second_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        return result._replace(loss=result.loss * float("nan")) if len(calls) == 2 else result

    with pytest.MonkeyPatch.context() as m:
        m.setattr(GMAE, "forward", nan_on_the_second_step)
        summary = pretrain(model_config("tiny", **TINY),
                           train_config("tiny", steps=3, batch_size=4, warmup_steps=1, checkpoint_every=1,
                                        ema=DECAY, out=str(out)), progress=False)
    assert summary["skipped_steps"] == 1
    return out


def checkpoint(run, step):
    return load(run / f"checkpoint-{step:07d}.pt", "checkpoint")


def test_the_ema_is_the_hand_computed_average_of_the_applied_steps(run):
    initial, _, _ = load(run, "model", initial=True)
    trainable = {name for name, p in initial.named_parameters() if p.requires_grad}
    weights = [initial.state_dict()] + [checkpoint(run, s)["model"] for s in (1, 2, 3)]
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in trainable)  # step 2 was skipped
    ema = {k: v.float().clone() for k, v in weights[0].items()}
    for step in (1, 3):  # the applied steps; a skipped step leaves the EMA alone
        for k, v in weights[step].items():
            ema[k] = DECAY * ema[k] + (1 - DECAY) * v if k in trainable else v
        saved = checkpoint(run, step)["ema"]
        assert saved.keys() == ema.keys()
        for k, v in saved.items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7, msg=k)
    last = checkpoint(run, 3)
    moved = [k for k in trainable if (last["ema"][k] - last["model"][k]).abs().max() > 1e-4]
    assert len(moved) > len(trainable) // 2  # the EMA is not the raw weights


def test_readers_use_the_ema_unless_asked_for_the_raw_weights(run, tmp_path):
    state = checkpoint(run, 3)
    for raw, key, label in ((False, "ema", "EMA (decay 0.5)"), (True, "model", "raw")):
        model, _, loaded = load(run, "model", raw=raw)
        assert loaded["weights"] == label and gmae.load(run, raw=raw).weights == label
        assert all(torch.equal(v, state[key][k]) for k, v in model.state_dict().items())
        encoder, _ = load(run, "encoder", raw=raw)
        assert encoder.loaded_weights == label
        assert all(torch.equal(v, state[key][f"encoder.{k}"]) for k, v in encoder.state_dict().items())
        # an export holds the weights it was asked for, and says which
        out = export_checkpoint(run, tmp_path / f"{key}.safetensors", raw=raw)
        model, _, loaded = load(out, "model")
        assert loaded["weights"] == label
        assert all(torch.equal(v, state[key][k]) for k, v in model.state_dict().items())
    with pytest.raises(GMAEError, match=r"ema.safetensors holds only its EMA \(decay 0.5\) weights"):
        load(tmp_path / "ema.safetensors", "encoder", raw=True)


def test_the_commands_say_which_weights_they_use(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "weights: EMA (decay 0.5)" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "r.safetensors"), "--raw-weights"]) == 0
    assert "weights: raw" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "x.safetensors"),
                 "--raw-weights"]) == 2
    assert "holds only its EMA (decay 0.5) weights" in capsys.readouterr().err


def test_a_bad_decay_and_a_resume_that_changes_it_are_refused(run, tmp_path, capsys):
    for bad in ("1.5", "1", "-0.1", "nan"):
        assert main(["pretrain", "--ema", bad, "--out", str(tmp_path / "new"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "ema decay must be in [0, 1)" in err and f"got {float(bad)}" in err and len(err.splitlines()) == 1
    before = sorted(p.name for p in run.iterdir())
    assert main(["pretrain", "--out", str(run), "--resume", "--ema", "0.9", "--steps", "4", "--quiet"]) == 2
    assert "--ema (saved 0.5, given 0.9)" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
