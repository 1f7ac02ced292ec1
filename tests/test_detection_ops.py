"""The pure-torch kernels of torchvision's nms and roi_align (gmae.evaluate.detection.ops), used where the
compiled ones cannot load: hand-computed cases, torchvision's own Python reference of roi_align, gradients."""

import pytest
import torch

from gmae.evaluate.detection import ops
from gmae.evaluate.timm_support import torchvision_ops_loadable

INSTALLED = ops.install()  # imports torchvision, with the fallbacks where its ops do not load

import torchvision  # noqa: E402  (after install: its import needs the op schemas where _C.so does not load)


def test_fallbacks_only_where_the_compiled_ops_do_not_load():
    assert INSTALLED == (torchvision_ops_loadable() is not True)  # _C.so missing or not loadable here
    assert torchvision.extension._has_ops()  # torchvision calls its ops either way
    assert ops.install() == INSTALLED  # idempotent


def test_nms_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10],     # area 100
                          [1, 1, 11, 11],     # IoU with box 0: 81 / 119 = 0.68
                          [0, 0, 10, 5],      # IoU with box 0: 50 / 100 = 0.5 exactly
                          [20, 20, 30, 30],   # apart
                          [21, 20, 31, 30]],  # IoU with box 3: 90 / 110 = 0.82
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    assert ops.nms(boxes, scores, 0.5).tolist() == [4, 0, 2]  # 0.5 is not above 0.5: box 2 stays
    assert ops.nms(boxes, scores, 0.45).tolist() == [4, 0]
    assert ops.nms(boxes, scores, 0.7).tolist() == [4, 0, 1, 2]
    assert ops.nms(boxes[:0], scores[:0], 0.5).tolist() == []
    # through torchvision's own Python code: nms, and batched_nms (classes never suppress each other)
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [4, 0, 2]
    assert torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0, 1]), 0.5).tolist() == [4, 0, 1, 2, 3]


def test_nms_matches_a_brute_force_greedy(monkeypatch):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=g) * 20], 1)
    scores = torch.rand(200, generator=g)
    keep = []
    for i in scores.argsort(descending=True).tolist():
        if all(torchvision.ops.box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= 0.3 for j in keep):
            keep.append(i)
    assert ops.nms(boxes, scores, 0.3).tolist() == keep
    monkeypatch.setattr(ops, "NMS_BLOCK", 7)  # the IoU matrix a few rows at a time: the same boxes kept
    assert ops.nms(boxes, scores, 0.3).tolist() == keep


def ramp(h, w, channels=2):
    """f(y, x) = 3 y - 2 x + 5 (and 2x that in channel 1): bilinear sampling of it is exact."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    f = 3 * y - 2 * x + 5
    return torch.stack([f * (c + 1) for c in range(channels)])[None]


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_of_a_ramp_is_the_ramp_at_the_bin_centres(aligned):
    img = ramp(16, 20)
    x1, y1, x2, y2 = 2.0, 3.0, 14.0, 11.0  # samples well inside: no clamping
    out = torchvision.ops.roi_align(img, [torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64)], (4, 3),
                                    spatial_scale=1.0, sampling_ratio=2, aligned=aligned)
    shift = 0.5 if aligned else 0.0
    bin_h, bin_w = (y2 - y1) / 4, (x2 - x1) / 3
    for i in range(4):
        for j in range(3):
            cy, cx = y1 - shift + (i + 0.5) * bin_h, x1 - shift + (j + 0.5) * bin_w
            assert out[0, 0, i, j].item() == pytest.approx(3 * cy - 2 * cx + 5, abs=1e-9)
            assert out[0, 1, i, j].item() == pytest.approx(2 * (3 * cy - 2 * cx + 5), abs=1e-9)


def test_roi_align_outside_the_map():
    ones = torch.ones(1, 1, 8, 8)
    # 4 samples across at x = -4, -2, 0, 2: the two more than a pixel outside count as 0 (torchvision's kernel,
    # csrc/ops/cpu/roi_align_common.h, pre_calc_for_bilinear_interpolate)
    out = ops.roi_align(ones, torch.tensor([[0, -5.0, 0, 3, 2]]), 1.0, 1, 1, 4, False)
    assert out.item() == pytest.approx(0.5)
    assert ops.roi_align(ones, torch.tensor([[0, -20.0, -20, -12, -12]]), 1.0, 2, 2, 2, False).abs().max() == 0
    # within a pixel of the border a sample is clamped onto it
    img = ramp(8, 8, 1).float()
    out = ops.roi_align(img, torch.tensor([[0, 6.9, 6.9, 7.9, 7.9]]), 1.0, 1, 1, 1, False)
    assert out.item() == pytest.approx(img[0, 0, 7, 7].item())


def roi_boxes(g, n, images, h, w, scale):
    """Boxes whose samples stay within a pixel of the map (where torchvision's Python reference, which
    clamps every sample, agrees with its kernel)."""
    xy1 = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) / scale * 0.6
    wh = 0.3 + torch.rand(n, 2, generator=g) * torch.tensor([w, h]) / scale * 0.4
    return torch.cat([torch.randint(images, (n, 1), generator=g).float(), xy1, xy1 + wh], 1)


@pytest.mark.parametrize("sampling_ratio", [2, 1, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvisions_python_reference(sampling_ratio, aligned):
    from torchvision.ops.roi_align import _roi_align

    reference = getattr(_roi_align, "__wrapped__", _roi_align)  # the Python function, not its torch.compile
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 13, 17, generator=g)
    rois = roi_boxes(g, 40, 3, 13, 17, 0.5)
    got = ops.roi_align(feats, rois, 0.5, 7, 5, sampling_ratio, aligned)
    want = reference(feats, rois, 0.5, 7, 5, sampling_ratio, aligned)
    assert got.shape == (40, 4, 7, 5)
    assert torch.allclose(got, want, atol=1e-5)
    # the same through torchvision's public roi_align, boxes as a list per image
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(3)])
    via = torchvision.ops.roi_align(feats, boxes, (7, 5), 0.5, sampling_ratio, aligned)
    assert torch.allclose(via, want[order], atol=1e-5)


def test_roi_align_gradient():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 1, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 4.1], [1, 1.1, 0.2, 5.3, 3.9], [0, -1.5, 2.0, 3.0, 6.5]],
                        dtype=torch.float64)
    for sampling_ratio, aligned in [(2, True), (-1, False)]:
        assert torch.autograd.gradcheck(
            lambda f: torchvision.ops.roi_align(f, rois, (3, 2), 1.0, sampling_ratio, aligned), (feats,))
    # the boxes get no gradient, as with torchvision's kernel
    boxes = rois.clone().requires_grad_()
    ops.roi_align(feats, boxes, 1.0, 2, 2, 2, True).sum().backward()
    assert boxes.grad is None
