"""ViTDet's detector on a gmae encoder: the plain ViT, a simple feature pyramid from its last block, and
torchvision's Mask R-CNN (RPN, MultiScaleRoIAlign, box and mask heads).

Sources: facebookresearch/detectron2 at 02b5c4e, ``detectron2/modeling/backbone/vit.py`` (``ViT`` lines
232-360, ``SimpleFeaturePyramid`` lines 363-503, ``get_vit_lr_decay_rate`` lines 506-524),
``detectron2/modeling/backbone/utils.py`` (``window_partition`` / ``window_unpartition`` lines 16-60,
``get_abs_pos`` lines 128-157) and the ViTDet configs (``configs/common/models/mask_rcnn_vitdet.py``,
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b,l,h}_*.py``).

* **Backbone** (:class:`ViTDetBackbone`): the encoder's patch embedding, blocks and input normalisation
  (taken over, not copied) under ``backbone.net``, as ViTDet names them, so ViTDet's layer-wise lr decay
  rule applies to the names unchanged. No cls token (ViTDet's ViT has none); the position table loses its cls
  slot and is resized bicubically to the image's grid (``get_abs_pos``) and trained, as in ViTDet. Drop
  path rises linearly from 0 to ``drop_path`` (ViT-B: 0.1).
* **Windowed attention with a few global blocks.** ViTDet attends within windows of the pre-training grid
  (14 x 14 tokens: 224 px / 16) and globally in four evenly spaced blocks, the last of each quarter of the
  depth (B: 2, 5, 8, 11; L: 5, 11, 17, 23; H: 7, 15, 23, 31, which is ``(k + 1) * depth // 4 - 1``).
  Here the windows are likewise the encoder's pre-training grid (``img_size / patch_size`` tokens across),
  so every window attends over as many tokens as pre-training did, and the global blocks follow the same
  rule. Where the detection image is no larger than the pre-training image (the grid fits in one window)
  every block is global: windows would only cut the image the encoder learnt to see whole.
  ViTDet's relative position biases (``use_rel_pos``) are left out: gmae's attention has none to load and
  they start at zero.
* **Simple feature pyramid** (``simfp_2`` ... ``simfp_5``): strides 4, 8, 16, 32 from the last block's
  stride-p map: scale 2 by a stride-2 deconvolution (halving the width), 4 by two with LayerNorm + GELU
  between, 1 by identity, 1/2 by 2 x 2 max-pooling; then a 1 x 1 and a 3 x 3 convolution to ``channels``,
  each LayerNorm'd over channels (ViTDet's ``norm="LN"``). ViTDet's scales are (4, 2, 1, 0.5) for patch 16;
  a patch-8 encoder needs (2, 1, 0.5, 0.25), the last by 4 x 4 max-pooling. A stride-64 level is taken from
  the stride-32 one by max-pooling (ViTDet's ``LastLevelMaxPool``; torchvision's ``"pool"``).
* **Heads**: torchvision's RPN with two 3 x 3 convolutions (ViTDet's ``conv_dims=[-1, -1]``), a 4conv1fc box
  head and a 4conv mask head, LayerNorm'd (ViTDet's ``conv_norm="LN"``; torchvision's
  ``FastRCNNConvFCHead`` and ``MaskRCNNHeads``). Sized for small images: anchors of 4 x the level's stride
  (ViTDet's are 8 x at 1024 px; the generated images' objects span a fifth to a half of a 64-128 px image),
  ``channels`` 64 and fewer proposals and sampled boxes per image than COCO's defaults.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ...model.classifier import DropPath
from ...model.vit import ViTEncoder
from .ops import install

__all__ = ["ViTDetBackbone", "build_detector", "global_blocks", "lr_decay_rate", "param_groups"]

#: Strides of the pyramid's levels (ViTDet's p2 ... p5).
STRIDES = (4, 8, 16, 32)


def global_blocks(depth: int) -> list[int]:
    """ViTDet's global-attention blocks: the last of each quarter of the depth."""
    return sorted({(k + 1) * depth // 4 - 1 for k in range(4)} - {-1})


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, size * size, C), zero-padded to whole windows; and the padded (H, W)."""
    B, H, W, C = x.shape
    ph, pw = -H % size, -W % size
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // size, size, Wp // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, C), (Hp, Wp)


def window_unpartition(x: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`window_partition`, padding cut away: (B, H, W, C)."""
    Hp, Wp = padded
    B = x.shape[0] // (Hp * Wp // size // size)
    x = x.view(B, Hp // size, Wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :hw[0], :hw[1]].contiguous()


def _layer_norm_2d(channels: int) -> nn.Module:
    from torchvision.models.convnext import LayerNorm2d

    return LayerNorm2d(channels, eps=1e-6)


def _scale_stage(dim: int, scale: float) -> tuple[list[nn.Module], int]:
    """The resampling layers of one pyramid level (ViTDet's vit.py lines 410-428) and their output width."""
    if scale >= 1:
        layers, width = [], dim
        for i in range(int(round(math.log2(scale)))):
            if i:
                layers += [_layer_norm_2d(width), nn.GELU()]
            layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
            width //= 2
        return layers, width
    k = int(round(1 / scale))
    return [nn.MaxPool2d(kernel_size=k, stride=k)], dim


class ViTDetBackbone(nn.Module):
    """A gmae encoder as ViTDet's backbone: images (B, C, H, W) in [0, 1], H and W multiples of 32 and of the
    patch -> OrderedDict of the pyramid, "0" ... "3" at strides 4 ... 32 and "pool" at 64, each
    ``channels`` wide (torchvision's backbone contract: ``out_channels``)."""

    def __init__(self, encoder: ViTEncoder, channels: int = 64, drop_path: float = 0.1,
                 window_size: int | None = None, global_block_indexes: list[int] | None = None):
        super().__init__()
        install()  # imports torchvision (its LayerNorm2d), with the op fallbacks where they are needed
        patch = encoder.patch_embed.patch_size
        if any(s % patch and patch % s for s in STRIDES):
            raise ValueError(f"patch size {patch} does not divide or multiply the pyramid's strides {STRIDES}")
        dim, depth = encoder.cls_token.shape[-1], len(encoder.blocks)
        self.net = nn.Module()
        self.net.normalize = encoder.normalize
        self.net.patch_embed = encoder.patch_embed
        self.net.pos_embed = encoder.pos_embed
        self.net.pos_embed.requires_grad_(True)  # ViTDet trains its absolute positions
        self.net.blocks = encoder.blocks
        self.net.drop_paths = nn.ModuleList(DropPath(r) for r in torch.linspace(0, drop_path, depth).tolist())
        self.patch_size = patch
        self.pretrain_grid = math.isqrt(encoder.pos_embed.shape[1] - 1)
        self.window_size = self.pretrain_grid if window_size is None else int(window_size)
        self.global_blocks = global_blocks(depth) if global_block_indexes is None else list(global_block_indexes)
        for stride in STRIDES:
            layers, width = _scale_stage(dim, patch / stride)
            layers += [nn.Conv2d(width, channels, 1, bias=False), _layer_norm_2d(channels),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), _layer_norm_2d(channels)]
            self.add_module(f"simfp_{int(math.log2(stride))}", nn.Sequential(*layers))
        self.out_channels = channels

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The position table without its cls slot at an h x w grid (1, h, w, D), bicubic when resized."""
        pos = self.net.pos_embed[:, 1:]
        g = self.pretrain_grid
        pos = pos.reshape(1, g, g, -1)
        if (h, w) == (g, g):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def windowed(self, index: int, h: int, w: int) -> bool:
        return index not in self.global_blocks and (h > self.window_size or w > self.window_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's tokens as a map (B, D, H / p, W / p)."""
        x = self.net.patch_embed.proj(self.net.normalize(images))  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.permute(0, 2, 3, 1) + self.positions(h, w)
        for i, (block, drop) in enumerate(zip(self.net.blocks, self.net.drop_paths)):
            y = block.norm1(x)
            if self.windowed(i, h, w):
                windows, padded = window_partition(y, self.window_size)
                y = window_unpartition(block.attn(windows), self.window_size, padded, (h, w))
            else:
                y = block.attn(y.reshape(B, h * w, D)).reshape(B, h, w, D)
            x = x + drop(y)
            x = x + drop(block.mlp(block.norm2(x)))
        return x.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.features(images)
        levels = [getattr(self, f"simfp_{int(math.log2(s))}")(x) for s in STRIDES]
        out = OrderedDict((str(i), level) for i, level in enumerate(levels))
        out["pool"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
        return out


def build_detector(encoder: ViTEncoder, num_classes: int, image_size: int, channels: int = 64,
                   drop_path: float = 0.1, window_size: int | None = None,
                   global_block_indexes: list[int] | None = None, anchor_scale: float = 4.0,
                   fc_dim: int = 256, **overrides) -> nn.Module:
    """torchvision's ``MaskRCNN`` on :class:`ViTDetBackbone` (see the module docstring), for images of
    `image_size` pixels (resized so that the shorter side is `image_size`, at most `image_size` long) and
    `num_classes` object classes (torchvision counts the background too: its `num_classes` is this + 1).

    Images go in as [0, 1] tensors: the encoder normalises them itself, so torchvision's transform is told
    mean 0 and std 1. `overrides` go to ``MaskRCNN`` (e.g. ``box_score_thresh``).
    """
    install()  # torchvision's nms and roi_align, in pure torch where its compiled ops cannot load
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = ViTDetBackbone(encoder, channels, drop_path, window_size, global_block_indexes)
    strides = (*STRIDES, 2 * STRIDES[-1])
    anchors = AnchorGenerator(sizes=tuple((int(anchor_scale * s),) for s in strides),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(strides))
    levels = [str(i) for i in range(len(STRIDES))]
    settings = dict(
        min_size=image_size, max_size=image_size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc_dim], norm_layer=_layer_norm_2d),
        box_batch_size_per_image=128, box_detections_per_img=50,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=_layer_norm_2d),
    )
    settings.update(overrides)
    settings.setdefault("box_predictor", FastRCNNPredictor(fc_dim, num_classes + 1))
    settings.setdefault("mask_predictor", MaskRCNNPredictor(channels, channels, num_classes + 1))
    return MaskRCNN(backbone, None, **settings)


def lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int) -> float:
    """ViTDet's ``get_vit_lr_decay_rate`` (vit.py lines 506-524): the lr factor of parameter `name` of the
    detector: decay^(num_layers + 1 - layer), layer 0 for the position table and patch embedding, i + 1 for
    block i, num_layers + 1 (factor 1) for everything else (pyramid, RPN, heads)."""
    layer = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer = 0
        elif ".blocks." in name:
            layer = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer)


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def param_groups(model: nn.Module, weight_decay: float = 0.1, layer_decay: float = 0.7) -> list[dict]:
    """AdamW parameter groups as ViTDet's recipe builds them (``get_default_optimizer_params`` with
    ``weight_decay_norm=0``, ``lr_factor_func=get_vit_lr_decay_rate`` and ``pos_embed`` without weight decay;
    ``mask_rcnn_vitdet_b_100ep.py`` lines 38-40, ``configs/common/optim.py`` lines 18-28): each group has an
    ``lr_scale`` (:func:`lr_decay_rate`) and a ``weight_decay``, 0 for normalisation layers and the position
    table. ViT-B's decay is 0.7, L's 0.8, H's 0.9."""
    depth = len(model.backbone.net.blocks)
    groups: dict[tuple[float, float], dict] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}"
            wd = 0.0 if isinstance(module, NORMS) or pname == "pos_embed" else weight_decay
            scale = lr_decay_rate(name, layer_decay, depth)
            groups.setdefault((scale, wd), {"params": [], "lr_scale": scale, "weight_decay": wd})["params"].append(p)
    return [groups[k] for k in sorted(groups)]
