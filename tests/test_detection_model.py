"""ViTDet's detector on a gmae encoder (gmae.evaluate.detection.model): pyramid, windows, Mask R-CNN, lr decay."""

import math

import pytest
import torch
from torch import nn

from gmae.evaluate.detection.data import generated_set
from gmae.evaluate.detection.model import (
    ViTDetBackbone,
    build_detector,
    global_blocks,
    param_groups,
    window_partition,
    window_unpartition,
)
from gmae.model.vit import ViTEncoder

pytest.importorskip("pycocotools")


def tiny_encoder(img_size=32, patch=8, depth=3):
    torch.manual_seed(0)
    return ViTEncoder(img_size, patch, 3, 64, depth, 2)


def test_global_blocks_are_vitdets():
    # projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b,l,h}: window_block_indexes are every block but these
    assert global_blocks(12) == [2, 5, 8, 11]
    assert global_blocks(24) == [5, 11, 17, 23]
    assert global_blocks(32) == [7, 15, 23, 31]
    assert global_blocks(3) == [0, 1, 2]  # shallower than four: every block global


@pytest.mark.parametrize("patch, scales", [(8, (2, 1, 0.5, 0.25)), (16, (4, 2, 1, 0.5))])
def test_pyramid_strides(patch, scales):
    backbone = ViTDetBackbone(tiny_encoder(64, patch), channels=16).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 64, 128))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for name, stride in zip(out, (4, 8, 16, 32, 64)):
        assert out[name].shape == (2, 16, 64 // stride, 128 // stride), name
    deconvs = [sum(isinstance(m, nn.ConvTranspose2d) for m in getattr(backbone, f"simfp_{i}")) for i in (2, 3, 4, 5)]
    pools = [[m.kernel_size for m in getattr(backbone, f"simfp_{i}") if isinstance(m, nn.MaxPool2d)] for i in (2, 3, 4, 5)]
    assert deconvs == [max(0, round(math.log2(s))) for s in scales]
    assert pools == [[round(1 / s)] if s < 1 else [] for s in scales]


def test_window_partition_round_trip():
    x = torch.randn(2, 7, 10, 5)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 5) and padded == (8, 12)
    assert torch.equal(window_unpartition(windows, 4, padded, (7, 10)), x)


def test_windowed_blocks_attend_within_their_windows():
    """Images larger than the encoder's pre-training size: windows of the pre-training grid, except in the
    global blocks. A patch changed in one window moves the features only inside that window, unless a block
    attends globally."""
    enc = tiny_encoder(32, 8, depth=4)  # pre-training grid 4 x 4
    backbone = ViTDetBackbone(enc, channels=16, drop_path=0.0).eval()
    assert backbone.window_size == 4 and backbone.global_blocks == [0, 1, 2, 3]  # depth 4: all global
    backbone.global_blocks = [3]
    assert [backbone.windowed(i, 8, 8) for i in range(4)] == [True, True, True, False]
    assert not any(backbone.windowed(i, 4, 4) for i in range(4))  # the pre-training size: one window, global
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[:, :, :8, :8] = torch.rand(1, 3, 8, 8)  # the top-left patch, in the top-left window

    def moved():
        with torch.no_grad():
            return (backbone.features(x) - backbone.features(y)).abs().amax(1)[0] > 1e-6

    backbone.global_blocks = []
    m = moved()
    assert m[:4, :4].all() and not m[4:].any() and not m[:, 4:].any()
    backbone.global_blocks = [3]
    assert moved().all()


def test_train_forward_gives_finite_losses_whose_gradient_reaches_every_block():
    data = generated_set("sprites", 32, 2, seed=0)
    enc = tiny_encoder(32, 8, depth=3)
    model = build_detector(enc, num_classes=len(data.categories), image_size=32, channels=16, fc_dim=32).train()
    losses = model([im.float() / 255 for im in data.images], data.targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for i, block in enumerate(enc.blocks):
        assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0, i
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.pos_embed.grad.abs().sum() > 0  # trained, as in ViTDet


def test_eval_forward_gives_boxes_and_masks():
    enc = tiny_encoder(32, 8)
    model = build_detector(enc, num_classes=4, image_size=32, channels=16, fc_dim=32,
                           box_score_thresh=0.0).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 32, 32), torch.rand(3, 32, 32)])
    assert len(out) == 2
    for o in out:
        k = len(o["scores"])
        assert 0 < k <= 50
        assert o["boxes"].shape == (k, 4) and o["labels"].shape == (k,) and o["masks"].shape == (k, 1, 32, 32)
        assert ((o["labels"] >= 1) & (o["labels"] <= 4)).all()
        assert o["masks"].min() >= 0 and o["masks"].max() <= 1
        assert (o["boxes"][:, :2] >= 0).all() and (o["boxes"][:, 2:] <= 32).all()


def test_param_groups_follow_vitdets_lr_decay_and_weight_decay():
    enc = tiny_encoder(32, 8, depth=3)
    model = build_detector(enc, num_classes=2, image_size=32, channels=16, fc_dim=32)
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    of = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(of) == len(named) == sum(len(g["params"]) for g in groups)  # every parameter, once
    # get_vit_lr_decay_rate with 3 layers: 0.5 ** (4 - layer)
    assert of[id(named["backbone.net.pos_embed"])]["lr_scale"] == 0.5 ** 4
    assert of[id(named["backbone.net.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** 4
    for i in range(3):
        assert of[id(named[f"backbone.net.blocks.{i}.mlp.fc1.weight"])]["lr_scale"] == 0.5 ** (3 - i)
    for name in ("backbone.simfp_2.0.weight", "rpn.head.cls_logits.weight", "roi_heads.box_predictor.cls_score.weight",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        assert of[id(named[name])]["lr_scale"] == 1.0, name
    # weight decay: none on norms (blocks' and the pyramid's) and the position table; biases decay, as in detectron2
    for name in ("backbone.net.pos_embed", "backbone.net.blocks.0.norm1.weight", "backbone.simfp_3.1.weight", "backbone.simfp_4.2.weight"):
        assert of[id(named[name])]["weight_decay"] == 0.0, name
    for name in ("backbone.net.blocks.0.attn.qkv.weight", "backbone.net.blocks.0.attn.qkv.bias",
                 "roi_heads.box_head.5.weight"):
        assert of[id(named[name])]["weight_decay"] == 0.1, name


# --------------------------------------------------------------------------- fine-tuning


def test_lr_schedule_is_vitdets():
    from gmae.evaluate.detection.train import lr_factor

    assert lr_factor(0, 1000, 100) == pytest.approx(0.001)
    assert lr_factor(50, 1000, 100) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(100, 1000, 100) == 1.0
    assert lr_factor(888, 1000, 100) == 1.0 and lr_factor(889, 1000, 100) == pytest.approx(0.1)
    assert lr_factor(962, 1000, 100) == pytest.approx(0.1) and lr_factor(963, 1000, 100) == pytest.approx(0.01)


def test_flipped_batches_keep_boxes_on_their_masks():
    from gmae.evaluate.detection.train import batch_of

    data = generated_set("sprites", 32, 3, seed=2)
    images, targets = batch_of(data, [0, 1, 2], torch.tensor([True, False, True]))
    for i, (image, target) in enumerate(zip(images, targets)):
        assert image.dtype == torch.float32 and image.max() <= 1
        want = data.images[i].float() / 255
        assert torch.equal(image, want.flip(-1) if i != 1 else want)
        for mask, box in zip(target["masks"], target["boxes"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert torch.equal(data.targets[0]["masks"], targets[0]["masks"].flip(-1))  # the data itself is untouched


def test_train_detector_moves_the_encoder_less_in_its_early_blocks():
    """Two steps of fine-tuning: every block moves, the first (lr x decay^depth) less than the last."""
    from gmae.evaluate.detection.train import DetectionRecipe, train_detector

    data = generated_set("sprites", 32, 4, seed=0)
    enc = tiny_encoder(32, 8, depth=2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    recipe = DetectionRecipe(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, layer_decay=0.1, channels=16)
    model, results = train_detector(enc, data, data.subset([0, 1]), recipe)
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"} and set(results["segm"]) == {"AP", "AP50", "AP75"}
    assert set(results["losses"]) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                      "loss_rpn_box_reg"}
    step = {i: (enc.blocks[i].mlp.fc1.weight - before[f"blocks.{i}.mlp.fc1.weight"]).abs().max() for i in (0, 1)}
    assert 0 < step[0] < step[1]
