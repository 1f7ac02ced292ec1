"""MAE's linear-probe protocol (MAE's main_linprobe.py): LARS, the head, the frozen encoder, `gmae probe --protocol`."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from gmae.cli import main
from gmae.config import model_config
from gmae.data.labelled import ArrayImages
from gmae.errors import GMAEError
from gmae.evaluate.probe import (
    LARS,
    PROTOCOL_DEFAULTS,
    LinearHead,
    mae_learning_rate,
    mae_linear_probe,
    probe,
    random_encoder,
)
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_sets(n_train=60, n_val=30, size=16, seed=0):
    """3 classes of noisy images whose dominant channel is the class, as ArrayImages (train augments)."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % 3
        x = rng.integers(0, 120, (n, 3, size, size))
        x[np.arange(n), y] += 120
        return x.astype(np.uint8), y

    common = {"classes": ["r", "g", "b"], "img_size": size, "scale": (0.5, 1.0)}
    (xt, yt), (xv, yv) = make(n_train), make(n_val)
    return ArrayImages(xt, yt, augment=True, **common), ArrayImages(xv, yv, **common), 3


class ColourEncoder(nn.Module):
    """A stand-in ViT encoder whose cls token is a linear map of the image's mean colour (the label, linearly),
    with a trainable-looking parameter to show that the probe never trains or moves it."""

    def __init__(self, dim=8):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.proj = nn.Linear(3, dim)
        self.patch_embed = type("PE", (), {"num_patches": 1, "img_size": 16, "patch_size": 16})()

    def forward(self, imgs, mask_ratio=0.0, noise=None):
        f = self.proj(imgs.mean(dim=(2, 3)))[:, None]  # (B, 1, D)
        return torch.cat([f, f], dim=1), None, None


# --------------------------------------------------------------------------- LARS


def test_lars_step_is_maes_formula_with_its_exclusions():
    """Two steps on a matrix W (weight decay and trust ratio) and a bias b (neither), by hand from MAE's
    util/lars.py: d = g + wd W; q = tc ||W|| / ||d||; mu = m mu + q d; W -= lr mu; for b: mu = m mu + g."""
    torch.manual_seed(0)
    W, b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(3))
    lr, wd, m, tc = 0.5, 0.1, 0.9, 0.001
    opt = LARS([W, b], lr=lr, weight_decay=wd, momentum=m, trust_coefficient=tc)
    w, bb = W.detach().clone(), b.detach().clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(bb)
    for _ in range(2):
        gw, gb = torch.randn(2, 3), torch.randn(3)
        W.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + wd * w
        mu_w = m * mu_w + tc * w.norm() / d.norm() * d
        w = w - lr * mu_w
        mu_b = m * mu_b + gb  # ndim 1: no weight decay, no trust ratio
        bb = bb - lr * mu_b
        torch.testing.assert_close(W.detach(), w)
        torch.testing.assert_close(b.detach(), bb)
    # zero weights or zero update: the trust ratio is 1
    Z = nn.Parameter(torch.zeros(2, 2))
    Z.grad = torch.ones(2, 2)
    LARS([Z], lr=1.0).step()
    torch.testing.assert_close(Z.detach(), -torch.ones(2, 2))


def test_timm_lars_agrees_only_at_weight_decay_zero():
    """The reason gmae has its own LARS: timm's equals MAE's at wd 0 (always_adapt on, eps 0, biases in a
    group of their own), and differs at wd > 0 (its trust ratio divides by ||g|| + wd ||W||)."""
    if importlib.util.find_spec("timm") is None:  # not importorskip: a bare `import timm` may fail here (see timm_support)
        pytest.skip("timm is not installed: pip install 'gmae[timm]'")
    from gmae.evaluate.timm_support import import_timm

    import_timm()
    from timm.optim import Lars

    def run(wd, ours):
        torch.manual_seed(0)
        W, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
        if ours:
            opt = LARS([W, b], lr=0.3, weight_decay=wd)
        else:
            opt = Lars([{"params": [W], "weight_decay": wd, "always_adapt": True},
                        {"params": [b], "weight_decay": 0.0}], lr=0.3, momentum=0.9, eps=0.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            W.grad, b.grad = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
            opt.step()
        return W.detach(), b.detach()

    for a, c in zip(run(0.0, True), run(0.0, False)):
        torch.testing.assert_close(a, c)
    assert not torch.allclose(run(0.5, True)[0], run(0.5, False)[0])


def test_mae_schedule():
    assert mae_learning_rate(0.0, 1.0, 10, 90) == 0.0  # MAE's warmup starts at 0
    assert mae_learning_rate(5.0, 1.0, 10, 90) == pytest.approx(0.5)
    assert mae_learning_rate(10.0, 1.0, 10, 90) == pytest.approx(1.0)
    assert mae_learning_rate(50.0, 1.0, 10, 90) == pytest.approx(0.5)
    assert mae_learning_rate(90.0, 1.0, 10, 90) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- the head and the encoder


def test_head_is_maes_bn_without_affine_and_std_001_init():
    head = LinearHead(768, 1000, generator=torch.Generator().manual_seed(0))
    bn, fc = head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert [n for n, _ in head.named_parameters()] == ["1.weight", "1.bias"]
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert fc.weight.abs().max().item() < 0.06 and (fc.bias == 0).all()


def test_encoder_gets_no_gradient_and_keeps_its_weights():
    train, val, n = colour_sets(24, 9)
    mcfg = model_config("tiny", **{**TINY, "img_size": 16})
    encoder = random_encoder(mcfg, 0).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    out = mae_linear_probe(encoder, train, val, n, epochs=2, batch_size=8, warmup_epochs=1, blr=50.0)
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert encoder.training  # left in the mode it came in
    assert out["linear_steps"] == 2 * 3 and out["linear_batch"] == 8 and out["linear_lr"] == pytest.approx(50 * 8 / 256)
    head = out["head"]
    assert not torch.equal(head[1].weight, LinearHead(32, 3, torch.Generator().manual_seed(0))[1].weight)  # trained
    # the same seed, the same run
    again = mae_linear_probe(encoder, train, val, n, epochs=2, batch_size=8, warmup_epochs=1, blr=50.0)
    assert torch.equal(again["head"][1].weight, head[1].weight)


def test_linearly_encoded_labels_reach_100_percent():
    train, val, n = colour_sets()
    encoder = ColourEncoder()
    out = mae_linear_probe(encoder, train, val, n, epochs=20, batch_size=16, warmup_epochs=2, blr=400.0)
    assert out["linear_acc"] == 1.0
    assert all(p.grad is None for p in encoder.parameters())
    # features with no label in them stay near chance
    noise = ColourEncoder()
    noise.forward = lambda imgs, *a: (torch.randn(len(imgs), 2, 8), None, None)
    assert mae_linear_probe(noise, train, val, n, epochs=5, batch_size=16, warmup_epochs=1,
                            blr=100.0)["linear_acc"] < 0.7


def test_bad_settings_are_one_line():
    train, val, n = colour_sets(4, 3)
    encoder = ColourEncoder()
    for kw in ({"warmup_epochs": -1}, {"blr": 0.0}, {"weight_decay": -1.0}):
        with pytest.raises(GMAEError) as err:
            mae_linear_probe(encoder, train, val, n, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(GMAEError, match="at least 2"):
        mae_linear_probe(encoder, *colour_sets(1, 3)[:2], n)


# --------------------------------------------------------------------------- probe() and the command line


def test_probe_names_the_protocol_and_its_settings():
    train, val, n = colour_sets(30, 9)
    encoder = random_encoder(model_config("tiny", **{**TINY, "img_size": 16}), 0)
    r = probe(encoder, (train, val, n), protocol="mae", epochs=2, warmup_epochs=1, linear_batch=64, progress=False)
    assert r["protocol"] == "mae" and r["linear_batch"] == 30  # at most the train set
    assert r["linear_epochs"] == 2 and r["blr"] == 6.4 and r["linear_steps"] == 2
    c = probe(encoder, (train, val, n), epochs=2, progress=False)
    assert c["protocol"] == "cached" and c["linear_batch"] == 256 and c["knn_acc"] == r["knn_acc"]
    assert PROTOCOL_DEFAULTS["mae"] == {"epochs": 90, "batch_size": 256, "blr": 6.4, "weight_decay": 0.0,
                                        "warmup_epochs": 10}


def test_cli_probe_protocol_mae_on_digits_and_scenes(ckpt, capsys):
    base = ["probe", "--checkpoint", str(ckpt), "--protocol", "mae", "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "512", "--threads", "1"]
    assert main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "mae" and out["linear_batch"] == 512 and out["linear_steps"] == 2 * (1438 // 512)
    assert out["warmup_epochs"] == 1.0 and out["num_train"] == 1438
    scene = [*base, "--data", "sprites", "--train-images", "40", "--val-images", "20", "--batch-size", "16"]
    assert main([*scene, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "mae" and list(out["tasks"]) == ["count", "shape"]  # the image-level tasks only
    assert out["tasks"]["count"]["protocol"] == "mae" and out["tasks"]["count"]["linear_steps"] == 2 * (40 // 16)
    assert main([*scene, "--task", "front"]) == 2
    assert "only --protocol cached" in capsys.readouterr().err
    assert main([*base, "--blr", "0"]) == 2
    assert "blr > 0" in capsys.readouterr().err
    assert main([*base, "--warmup-epochs", "2", "--json"]) == 0  # capped at half the epochs, and so recorded
    assert json.loads(capsys.readouterr().out)["warmup_epochs"] == 1.0
    assert main(["probe", "--checkpoint", str(ckpt), "--protocol", "mae", "--epochs", "2", "--warmup-epochs", "1",
                 "--threads", "1"]) == 0
    assert "MAE's protocol" in capsys.readouterr().out
