"""Safetensors export of a checkpoint's model, and loading it back (gmae.export)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gmae.checkpoint import load_model, save_checkpoint
from gmae.config import as_dict, model_config, train_config
from gmae.errors import GMAEError
from gmae.export import CONFIG_KEY, export_checkpoint, load_exported
from gmae.model import build_model


def make_checkpoint(path, model="gmae", step=7, shared=False):
    """A gmae checkpoint (the documented format) of a small, randomly perturbed model."""
    mcfg = model_config("tiny", model=model, img_size=32, patch_size=8, num_gaussians=16,
                        render_backend="torch")
    tcfg = train_config("tiny", steps=10)
    torch.manual_seed(1)
    net = build_model(mcfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = net.state_dict()
    if shared:
        # entries that are views of one storage (as a checkpoint of tied or
        # flattened weights may hold): safetensors refuses those unless copied
        flat = torch.cat([v.reshape(-1) for v in sd.values()])
        views, offset = {}, 0
        for k, v in sd.items():
            views[k] = flat[offset:offset + v.numel()].view(v.shape)
            offset += v.numel()
        sd = views
    state = {
        "format": "gmae-checkpoint", "version": 1, "step": step,
        "config": {"model": as_dict(mcfg), "train": as_dict(tcfg)},
        "model": sd, "optimizer": None, "rng": {"torch": torch.get_rng_state()},
    }
    return save_checkpoint(state, path), net, mcfg


@pytest.mark.parametrize("model", ["gmae", "mae"])
def test_round_trip_rebuilds_the_same_model(tmp_path, model):
    ckpt, net, mcfg = make_checkpoint(tmp_path / "checkpoint-0000007.pt", model=model)
    out = export_checkpoint(ckpt, tmp_path / "sub" / "model.safetensors")
    assert out == tmp_path / "sub" / "model.safetensors" and out.is_file()
    assert not list(out.parent.glob("*.tmp"))

    # a plain safetensors file: every state_dict entry, frozen pos_embed included
    tensors = load_file(str(out))
    sd = net.state_dict()
    assert set(tensors) == set(sd)
    assert "encoder.pos_embed" in tensors and "decoder_pos_embed" in tensors
    for k, v in sd.items():
        assert torch.equal(tensors[k], v), k
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "7" and meta["format"] == "gmae-export"
    assert json.loads(meta[CONFIG_KEY]) == as_dict(mcfg)

    loaded, cfg = load_exported(out)
    assert cfg == mcfg and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the same outputs as the model loaded from the checkpoint itself
    ref, _, _ = load_model(ckpt)
    imgs = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, mcfg.num_patches)
    with torch.no_grad():
        assert torch.equal(loaded(imgs, noise).loss, ref(imgs, noise).loss)


def test_tensors_sharing_memory_are_exported(tmp_path):
    ckpt, net, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt", shared=True)
    loaded, _ = load_exported(export_checkpoint(ckpt, tmp_path / "m.safetensors"))
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)


def test_export_errors(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt")
    with pytest.raises(GMAEError) as e:
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m.safetensors")
    one_line_error(e, "missing.pt")
    with pytest.raises(GMAEError) as e:
        export_checkpoint(ckpt, tmp_path / "m.pt")
    one_line_error(e, "m.pt", ".safetensors")
    with pytest.raises(GMAEError) as e:
        export_checkpoint(ckpt, tmp_path / "m.onnx", fmt="onnx")
    one_line_error(e, "onnx", "safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(GMAEError) as e:
        export_checkpoint(ckpt, tmp_path / "d.safetensors")
    one_line_error(e, "d.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(GMAEError) as e:
        export_checkpoint(junk, tmp_path / "m.safetensors")
    one_line_error(e, "junk.pt")
    assert not (tmp_path / "m.safetensors").exists()


def test_load_errors(tmp_path):
    with pytest.raises(GMAEError) as e:
        load_exported(tmp_path / "missing.safetensors")
    one_line_error(e, "missing.safetensors", "does not exist")

    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt")
    with pytest.raises(GMAEError) as e:  # a checkpoint is not an export
        load_exported(ckpt)
    one_line_error(e, "checkpoint-0000007.pt", ".safetensors")

    with pytest.raises(GMAEError) as e:
        load_exported(tmp_path)
    one_line_error(e, str(tmp_path))

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(GMAEError) as e:
        load_exported(junk)
    one_line_error(e, "junk.safetensors")

    other = tmp_path / "other.safetensors"  # valid safetensors, not written by gmae
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(GMAEError) as e:
        load_exported(other)
    one_line_error(e, "other.safetensors", "not a gmae export")

    good = export_checkpoint(ckpt, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GMAEError) as e:
        load_exported(cut)
    one_line_error(e, "cut.safetensors")

    # right metadata but weights of another model
    meta = {"format": "gmae-export", "version": "1", CONFIG_KEY: json.dumps(as_dict(model_config("tiny")))}
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(3)}, str(wrong), metadata=meta)
    with pytest.raises(GMAEError) as e:
        load_exported(wrong)
    one_line_error(e, "wrong.safetensors", "does not match")
