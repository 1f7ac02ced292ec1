"""`gmae export --format mae`: the file MAE's fine-tune / linear-probe scripts and ViTDet's configs take.

The names and shapes below are written out from MAE's and detectron2's sources, not from gmae's encoder:
MAE's ``models_vit.py`` (facebookresearch/mae at efb2a80) subclasses timm's ``VisionTransformer``; its
pre-training checkpoint ``mae_pretrain_vit_base.pth`` comes from ``models_mae.py``, whose encoder has the same
names and a final ``norm``.
"""

import torch
from torch import nn

from gmae.cli import main
from gmae.config import as_dict, model_config
from gmae.evaluate.timm_support import import_timm
from gmae.io.export import export_checkpoint
from gmae.io.loader import load
from gmae.model.vit import ViTEncoder

from test_export import features, make_checkpoint


def mae_vit_shapes(depth=12, dim=768, patch=16, img=224, hidden=3072, chans=3):
    """Every entry of MAE's ViT encoder (models_mae's encoder part / models_vit without head) and its shape;
    ViT-B/16 by default."""
    n = (img // patch) ** 2
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + n, dim),
              "patch_embed.proj.weight": (dim, chans, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    return shapes


def test_vit_b_export_has_maes_names_and_shapes(tmp_path):
    """A base-preset export holds exactly MAE's ViT-B/16 encoder entries: no decoder, no mask token, no head."""
    mcfg = model_config("base")
    with torch.device("meta"):  # only the shapes are needed: zeros stand in for the weights
        names = ViTEncoder(mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.embed_dim, mcfg.depth,
                           mcfg.num_heads, mcfg.mlp_ratio).state_dict()
    state = {"format": "gmae-checkpoint", "version": 1, "step": 3,
             "config": {"model": as_dict(mcfg), "train": None},
             "model": {f"encoder.{k}": torch.zeros(v.shape) for k, v in names.items()} | {
                 "decoder_embed.weight": torch.zeros(4, 4), "mask_token": torch.zeros(1, 1, 4)}}
    out = export_checkpoint("base.pt", tmp_path / "model.pth", fmt="mae", state=state)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"model"}
    got = {k: tuple(v.shape) for k, v in loaded["model"].items()}
    assert got == mae_vit_shapes()


class MAEViT(nn.Module):
    """MAE's ``models_vit.VisionTransformer`` with ``global_pool=True`` (main_finetune.py's default, line 115):
    timm's ViT whose final ``norm`` is deleted and an ``fc_norm`` added after pooling (models_vit.py lines 26-31)."""

    def __new__(cls, timm, **kw):
        vit = timm.models.vision_transformer.VisionTransformer(**kw)
        vit.fc_norm = nn.LayerNorm(kw["embed_dim"], eps=1e-6)
        del vit.norm
        return vit


def test_mae_export_loads_in_timm_and_as_maes_scripts_load_it(tmp_path):
    timm = import_timm()
    ckpt, net, mcfg = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=2)
    out = export_checkpoint(ckpt, tmp_path / "model.pth", fmt="mae")
    sd = torch.load(out, weights_only=True)["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == mae_vit_shapes(
        depth=2, dim=192, patch=8, img=32, hidden=768)

    # timm's own VisionTransformer, strictly (no head: num_classes=0), gives gmae's features
    shape = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    vit = timm.models.vision_transformer.VisionTransformer(num_classes=0, **shape).eval()
    vit.load_state_dict(sd, strict=True)
    imgs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit.forward_features(imgs)
    assert (features(net.encoder.eval(), imgs) - ref).abs().max() < 1e-6

    # MAE's main_finetune.py (lines 237-254 at efb2a80): checkpoint["model"], head dropped when its shape differs,
    # load_state_dict(strict=False), then it asserts that exactly the head and fc_norm are missing
    model = MAEViT(timm, num_classes=10, **shape)
    msg = model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}  # MAE's own pretrain file has these too
    # main_linprobe.py (--cls_token: global_pool False, lines 212-215) misses only the head
    msg = timm.models.vision_transformer.VisionTransformer(num_classes=10, **shape).load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys

    # and gmae reads it back as MAE's files are read (under "model")
    enc, cfg = load(out, "encoder", input_norm="none")
    assert torch.equal(features(enc, imgs), features(net.encoder, imgs))


# --------------------------------------------------------------------------- ViTDet's checkpointer


def align_by_suffix(model_shapes: dict, ckpt: dict) -> tuple[dict, list]:
    """detectron2's matching heuristics, re-written from ``align_and_update_state_dicts``
    (facebookresearch/detectron2 at 02b5c4e, detectron2/checkpoint/c2_model_loading.py lines 229-288), which
    ``DetectionCheckpointer._load_model`` applies when the path ends in ``?matching_heuristics=True``
    (detection_checkpoint.py lines 104-123): each model key takes the longest checkpoint key that equals it or
    is a ``.``-separated suffix of it; a match of another shape is skipped; one checkpoint key matched to two
    model keys is an error. Returns (model key -> checkpoint key, checkpoint keys left unmatched)."""
    matched = {}
    for key_model, shape in sorted(model_shapes.items()):
        fits = [k for k in ckpt if key_model == k or key_model.endswith("." + k)]
        if not fits:
            continue
        best = max(fits, key=len)
        if tuple(ckpt[best].shape) != tuple(shape):
            continue
        if best in matched.values():
            raise ValueError(f"{best} matches two model keys")
        matched[key_model] = best
    return matched, sorted(set(ckpt) - set(matched.values()))


def vitdet_model_shapes(depth, dim, patch, pretrain_img, window, hidden, out_channels=256):
    """Parameters of ViTDet's Mask R-CNN that end like a ViT's (configs/common/models/mask_rcnn_vitdet.py at
    02b5c4e; detectron2/modeling/backbone/vit.py): the backbone ViT under ``backbone.net.`` (no cls token, no
    final norm, relative positions per block), the simple feature pyramid's LayerNorm'd convs and a LN box head."""
    shapes = {k: v for k, v in mae_vit_shapes(depth, dim, patch, pretrain_img, hidden).items()
              if k not in ("cls_token", "norm.weight", "norm.bias")}
    shapes = {f"backbone.net.{k}": v for k, v in shapes.items()}
    head_dim = dim // (dim // 64)
    for i in range(depth):
        shapes[f"backbone.net.blocks.{i}.attn.rel_pos_h"] = (2 * window - 1, head_dim)
        shapes[f"backbone.net.blocks.{i}.attn.rel_pos_w"] = (2 * window - 1, head_dim)
    for stage in (2, 3, 4, 5):
        for j in (0, 1):
            shapes[f"backbone.simfp_{stage}.{j}.norm.weight"] = (out_channels,)
            shapes[f"backbone.simfp_{stage}.{j}.norm.bias"] = (out_channels,)
    shapes["backbone.simfp_2.1.weight"] = (dim // 2,)  # the LayerNorm between the two deconvolutions
    shapes["roi_heads.box_head.conv1.norm.weight"] = (out_channels,)
    shapes["roi_heads.mask_head.mask_fcn1.norm.weight"] = (out_channels,)
    return shapes


def test_vitdet_checkpointer_maps_the_export_onto_the_backbone(tmp_path):
    ckpt, net, mcfg = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=2)
    sd = torch.load(export_checkpoint(ckpt, tmp_path / "model.pth", fmt="mae"), weights_only=True)["model"]
    # ViT-B's config with this encoder's shape: pretrain_img_size = the export's image size, else pos_embed's
    # shape differs and is skipped (vit.py lines 297-301: 1 + (pretrain_img_size / patch)^2 positions)
    shapes = vitdet_model_shapes(depth=2, dim=192, patch=8, pretrain_img=32, window=4, hidden=768)
    matched, left = align_by_suffix(shapes, sd)
    backbone = {k for k in shapes if k.startswith("backbone.net.") and ".rel_pos_" not in k}
    assert set(matched) == backbone
    assert all(matched[k] == k.removeprefix("backbone.net.") for k in backbone)
    assert left == ["cls_token", "norm.bias", "norm.weight"]  # ViTDet's ViT has neither (vit.py lines 287-338)
    # with detectron2's default pretrain_img_size (224) the position table alone is skipped
    matched, _ = align_by_suffix(vitdet_model_shapes(2, 192, 8, 224, 4, 768), sd)
    assert "backbone.net.pos_embed" not in matched and len(matched) == len(backbone) - 1


def test_export_cli_says_how_maes_scripts_take_it(tmp_path, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path / "checkpoint-0000007.pt", depth=1)
    assert main(["export", str(ckpt), "--format", "mae", "--out", str(tmp_path / "model.pth")]) == 0
    out = capsys.readouterr().out
    assert f"--finetune {tmp_path / 'model.pth'}" in out and "matching_heuristics=True" in out
    assert "ImageNet's mean and std" in out  # this encoder learnt on [0, 1] images
    assert set(torch.load(tmp_path / "model.pth", weights_only=True)) == {"model"}
    assert main(["export", str(ckpt), "--format", "mae", "--out", str(tmp_path / "model.safetensors")]) == 2
    assert "must end in .pth" in capsys.readouterr().err
