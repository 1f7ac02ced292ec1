"""Exports of a checkpoint (gmae safetensors, timm ViT) and loading encoders from gmae, timm and MAE files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gmae.io.checkpoint import save_checkpoint
from gmae.cli import main
from gmae.config import IMAGENET_MEAN, IMAGENET_STD, as_dict, model_config, train_config
from gmae.errors import GMAEError
from gmae.io.export import (
    CONFIG_KEY,
    export_checkpoint,
)
from gmae.model import build_model
from gmae.io.loader import load


def make_checkpoint(path, model="gmae", step=7, shared=False, **overrides):
    """A gmae checkpoint (the documented format) of a small, randomly perturbed model."""
    mcfg = model_config("tiny", model=model, img_size=32, patch_size=8, num_gaussians=16,
                        render_backend="torch", **overrides)
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

    loaded, cfg = load(out, "export")
    assert cfg == mcfg and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the same outputs as the model loaded from the checkpoint itself
    ref, _, _ = load(ckpt, "model")
    # load(..., "model") renders with this machine's backend ("auto"), the export with the saved one: the same
    # weights through two kernels agree only to float rounding, so compare through the same kernel
    ref.cfg.render_backend = loaded.cfg.render_backend
    imgs = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, mcfg.num_patches)
    with torch.no_grad():
        assert torch.equal(loaded(imgs, noise).loss, ref(imgs, noise).loss)


def test_tensors_sharing_memory_are_exported(tmp_path):
    ckpt, net, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt", shared=True)
    loaded, _ = load(export_checkpoint(ckpt, tmp_path / "m.safetensors"), "export")
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
        load(tmp_path / "missing.safetensors", "export")
    one_line_error(e, "missing.safetensors", "does not exist")

    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt")
    with pytest.raises(GMAEError) as e:  # a checkpoint is not an export
        load(ckpt, "export")
    one_line_error(e, "checkpoint-0000007.pt", ".safetensors")

    with pytest.raises(GMAEError) as e:
        load(tmp_path, "export")
    one_line_error(e, str(tmp_path))

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(GMAEError) as e:
        load(junk, "export")
    one_line_error(e, "junk.safetensors")

    other = tmp_path / "other.safetensors"  # valid safetensors, not written by gmae
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(GMAEError) as e:
        load(other, "export")
    one_line_error(e, "other.safetensors", "not a gmae export")

    good = export_checkpoint(ckpt, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GMAEError) as e:
        load(cut, "export")
    one_line_error(e, "cut.safetensors")

    # right metadata but weights of another model
    meta = {"format": "gmae-export", "version": "1", CONFIG_KEY: json.dumps(as_dict(model_config("tiny")))}
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(3)}, str(wrong), metadata=meta)
    with pytest.raises(GMAEError) as e:
        load(wrong, "export")
    one_line_error(e, "wrong.safetensors", "does not match")


# --------------------------------------------------------------------------- timm


class TimmBlock(nn.Module):
    """timm's ViT block, written from timm's layout: qkv split as (3, heads, head_dim), pre-norm, GELU MLP."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """A minimal timm `VisionTransformer` (class token, learned pos_embed incl. the cls slot, token pooling)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0, in_chans=3, num_classes=0):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, embed_dim))
        self.blocks = nn.Sequential(*[TimmBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))


def timm_vit(mcfg, **kw):
    return TimmViT(mcfg.img_size, mcfg.patch_size, mcfg.embed_dim, mcfg.depth, mcfg.num_heads, mcfg.mlp_ratio, **kw)


def features(encoder, imgs):
    """gmae's encoder with nothing masked and the patches in their own order (noise sorted ascending)."""
    noise = torch.arange(imgs.shape[2] * imgs.shape[3] // encoder.patch_embed.patch_size**2).float()
    with torch.no_grad():
        return encoder(imgs, 0.0, noise.expand(imgs.shape[0], -1))[0]


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_timm_export_loads_into_a_timm_vit(tmp_path, ext):
    ckpt, net, mcfg = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=2)
    out = export_checkpoint(ckpt, tmp_path / f"vit{ext}", fmt="timm")
    if ext == ".pth":  # a plain dict of tensors
        sd = torch.load(out, weights_only=True)
        assert type(sd) is dict
    else:
        sd = load_file(str(out))
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "timm-vit" and meta["step"] == "7"
        assert json.loads(meta[CONFIG_KEY]) == as_dict(mcfg)
    assert set(sd) == {k.removeprefix("encoder.") for k in net.state_dict() if k.startswith("encoder.")}
    assert sd["pos_embed"].shape == (1, 1 + mcfg.num_patches, mcfg.embed_dim)

    vit = timm_vit(mcfg).eval()
    vit.load_state_dict(sd, strict=True)
    imgs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit.forward_features(imgs)
    assert torch.allclose(features(net.encoder.eval(), imgs), ref, atol=1e-5)
    # with a classifier only the head is missing
    missing, unexpected = timm_vit(mcfg, num_classes=10).load_state_dict(sd, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected

    # round trip: the file back as a gmae encoder, 192 wide -> 3 heads of 64 as in the preset. A .pth has no
    # metadata, so it is read as MAE's and timm's files are (ImageNet-normalised) unless told otherwise.
    if ext == ".pth":
        assert load(out, "encoder")[1].input_norm == "imagenet"
    enc, cfg = load(out, "encoder", input_norm=mcfg.input_norm if ext == ".pth" else None)
    assert cfg.input_norm == mcfg.input_norm == "none"
    assert not enc.training and cfg.num_heads == mcfg.num_heads == 3
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth) == (32, 8, 192, 2)
    assert torch.equal(features(enc, imgs), features(net.encoder, imgs))


def test_load_encoder_from_gmae_checkpoint_and_export(tmp_path):
    ckpt, net, mcfg = make_checkpoint(tmp_path / "checkpoint-0000007.pt", model="mae", depth=2)
    imgs = torch.rand(2, 3, 32, 32)
    want = features(net.encoder.eval(), imgs)
    for source in (ckpt, export_checkpoint(ckpt, tmp_path / "m.safetensors")):
        enc, cfg = load(source, "encoder")
        assert cfg == mcfg and not enc.training
        assert torch.equal(features(enc, imgs), want)


def test_mae_and_timm_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    vit = TimmViT(32, 8, 128, 2, num_heads=4).eval()  # 128 wide: 2 heads by the 64-dim rule, 4 given here
    sd = vit.state_dict()
    # MAE's official pre-training layout: encoder and decoder under "model"
    mae = {**sd, "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(64, 128),
           "decoder_pos_embed": torch.zeros(1, 17, 64), "decoder_blocks.0.norm1.weight": torch.ones(64),
           "decoder_pred.weight": torch.zeros(192, 64)}
    torch.save({"model": mae, "epoch": 399}, tmp_path / "mae_pretrain.pth")
    imgs = torch.rand(2, 3, 32, 32)
    # MAE and timm trained on ImageNet-normalised images: the loaded encoder takes [0, 1] and normalises
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit.forward_features((imgs - mean) / std)
    enc, cfg = load(tmp_path / "mae_pretrain.pth", "encoder", num_heads=4)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (32, 8, 128, 2, 4)
    assert cfg.input_norm == "imagenet"
    assert torch.allclose(features(enc, imgs), ref, atol=1e-5)
    assert load(tmp_path / "mae_pretrain.pth", "encoder")[1].num_heads == 2
    # a timm model's own safetensors (with a classifier head, no metadata)
    save_file({**sd, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}, str(tmp_path / "model.safetensors"))
    enc, _ = load(tmp_path / "model.safetensors", "encoder", num_heads=4)
    assert torch.allclose(features(enc, imgs), ref, atol=1e-5)


def timm_state(tmp_path, name, change):
    torch.manual_seed(0)
    sd = TimmViT(32, 8, 128, 2, num_heads=2).state_dict()
    change(sd)
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def fine_tuned(sd):
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")


@pytest.mark.parametrize("change, needles", [
    (lambda sd: sd.pop("blocks.1.attn.proj.weight"), ["missing blocks.1.attn.proj.weight"]),
    (lambda sd: sd.pop("patch_embed.proj.weight"), ["no patch_embed.proj.weight"]),
    (lambda sd: sd.update(pos_embed=sd["pos_embed"][:, 1:]), ["no cls slot"]),
    (lambda sd: sd.update(pos_embed=sd["pos_embed"][:, :-2]), ["not a square grid"]),
    (lambda sd: sd.update({"blocks.0.ls1.gamma": torch.ones(128)}), ["unexpected blocks.0.ls1.gamma"]),
    (lambda sd: sd.update({"blocks.1.mlp.fc1.weight": torch.zeros(100, 128)}), ["blocks.1.mlp.fc1.weight", "(100, 128)"]),
    (fine_tuned, ["missing norm.weight", "fc_norm"]),
])
def test_load_encoder_refuses_what_does_not_fit(tmp_path, change, needles):
    with pytest.raises(GMAEError) as e:
        load(timm_state(tmp_path, "vit.pth", change), "encoder")
    one_line_error(e, "vit.pth", *needles)


def test_load_encoder_file_errors(tmp_path):
    with pytest.raises(GMAEError) as e:
        load(tmp_path / "missing.pth", "encoder")
    one_line_error(e, "missing.pth", "does not exist")
    (tmp_path / "vit.onnx").write_bytes(b"x")
    with pytest.raises(GMAEError) as e:
        load(tmp_path / "vit.onnx", "encoder")
    one_line_error(e, "vit.onnx", ".safetensors")
    for name in ("junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 4)
        with pytest.raises(GMAEError) as e:
            load(tmp_path / name, "encoder")
        one_line_error(e, name)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(GMAEError) as e:
        load(tmp_path / "list.pt", "encoder")
    one_line_error(e, "list.pt", "state dict")
    wide = timm_state(tmp_path, "wide.pth", lambda sd: None)  # fine with the 64-dim rule; 96 wide is not
    assert load(wide, "encoder")[1].num_heads == 2
    torch.save(TimmViT(32, 8, 96, 1, num_heads=2).state_dict(), tmp_path / "w96.pth")
    with pytest.raises(GMAEError) as e:
        load(tmp_path / "w96.pth", "encoder")
    one_line_error(e, "w96.pth", "num_heads")
    assert load(tmp_path / "w96.pth", "encoder", num_heads=2)[1].embed_dim == 96


def test_timm_export_errors_and_cli(tmp_path, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=1)
    with pytest.raises(GMAEError) as e:
        export_checkpoint(ckpt, tmp_path / "vit.bin", fmt="timm")
    one_line_error(e, "vit.bin", ".safetensors or .pth")
    with pytest.raises(GMAEError) as e:  # the gmae format stays safetensors-only
        export_checkpoint(ckpt, tmp_path / "m.pth")
    one_line_error(e, "m.pth", ".safetensors")
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "vit.pth")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "vit.pth")
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=True, num_classes=0, img_size=32, patch_size=8, depth=1" \
        in lines[1] and "std=(1, 1, 1)" in lines[1]
    assert load(tmp_path / "vit.pth", "encoder")[1].depth == 1


def test_timm_names_of_presets():
    from gmae.io.export import timm_create_call, timm_model_name

    assert [timm_model_name(model_config(p)) for p in ("tiny", "small", "base", "large")] == [
        None, "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
    assert timm_create_call(model_config("base"), "e.pth").startswith(
        "timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file='e.pth'")


def test_init_encoder_shape_mismatch_names_the_parameter(tmp_path):
    from gmae.model.vit import ViTEncoder

    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=2)
    with pytest.raises(GMAEError) as e:
        load(ckpt, "encoder", into=ViTEncoder(64, 8, 3, 192, 2, 3))
    one_line_error(e, "checkpoint-0000007.pt", "pos_embed", "(1, 17, 192)", "(1, 65, 192)")
    with pytest.raises(GMAEError) as e:
        load(ckpt, "encoder", into=ViTEncoder(32, 8, 3, 192, 3, 3))
    one_line_error(e, "blocks.2.norm1.weight", "absent", "(192,)")


def test_pretrain_starts_from_init_encoder(tmp_path):
    """The step-1 checkpoint of a run at a negligible learning rate holds the file's encoder, not a random one."""
    other, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt")  # another run, tiny preset
    vit = export_checkpoint(other, tmp_path / "vit.safetensors", fmt="timm")
    want = load_file(str(vit))
    out = tmp_path / "run"
    args = ["pretrain", "--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "2", "--quiet",
            "--steps", "1", "--blr", "1e-9", "--out", str(out)]
    assert main([*args, "--init-encoder", str(vit)]) == 0
    got = torch.load(out / "checkpoint-0000001.pt", weights_only=True)["model"]
    assert torch.equal(got["encoder.pos_embed"], want["pos_embed"])  # frozen: copied exactly
    for k, v in want.items():
        assert torch.allclose(got[f"encoder.{k}"], v, atol=1e-6), k
    # a resumed run keeps its own weights and does not read the file again
    vit.unlink()
    assert main([*args[:-4], "--steps", "2", "--out", str(out), "--resume"]) == 0
