"""Fine-tuning on timm (MAE's main_finetune.py): the timm door, mixup / cutmix targets and loss, RandAugment and random
erasing on the training images only, the pooled feature, MAE's ViT-B settings end to end, exact resume."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmae.cli import main
from gmae.config import FinetuneConfig, as_dict
from gmae.errors import GMAEError

pytestmark = pytest.mark.usefixtures("one_thread")

# MAE's ViT-B fine-tuning (FINETUNE.md; main_finetune.py's defaults for the rest), at a tiny shape
MAE_B = {"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch",
         "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "recount": 1, "global_pool": "avg",
         "smoothing": 0.1, "layer_decay": 0.65, "drop_path": 0.1, "weight_decay": 0.05, "warmup_epochs": 5.0}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the timm door


def test_import_timm_works_beside_a_torchvision_whose_ops_cannot_load():
    """In a fresh process (torchvision not imported yet): import_timm gives timm, and MAE's training transform
    builds and runs; if torchvision's _C.so cannot load here, the op schemas were declared for it."""
    code = (
        "from gmae.evaluate.timm_support import import_timm, torchvision_ops_loadable\n"
        "import torch, sys\n"
        "ok = torchvision_ops_loadable()\n"
        "timm = import_timm()\n"
        "from PIL import Image\n"
        "import numpy as np\n"
        "tf = timm.data.create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)\n"
        "x = tf(Image.fromarray(np.zeros((40, 40, 3), np.uint8)))\n"
        "assert x.shape == (3, 32, 32), x.shape\n"
        "from gmae.evaluate import timm_support\n"
        "print(ok, timm_support._SCHEMA_LIBRARY is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loadable, declared = out.stdout.split()
    assert declared == ("True" if loadable == "False" else "False")  # declared exactly when the ops cannot load


def test_without_timm_the_error_names_the_extra(monkeypatch):
    from gmae.evaluate import timm_support

    real = timm_support.importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(timm_support.importlib.util, "find_spec", lambda name, *a: None if name == "timm" else
                        real(name, *a))
    with pytest.raises(GMAEError, match=r"pip install 'gmae\[timm\]'"):
        timm_support.import_timm()


# --------------------------------------------------------------------------- settings


def test_settings_are_checked_and_recorded():
    for kw in ({"mixup": -1.0}, {"mixup_prob": 1.5}, {"mixup_mode": "pixel"}, {"aa": "autoaug"}, {"reprob": 2.0},
               {"remode": "zero"}, {"recount": 0}, {"global_pool": "max"}, {"warmup_epochs": -2.0},
               {"mixup": 0.8, "batch_size": 7}):
        with pytest.raises(GMAEError) as err:
            FinetuneConfig(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(GMAEError, match="not both"):
        FinetuneConfig(warmup_steps=3, warmup_epochs=1.0).check_warmup()
    cfg = FinetuneConfig(epochs=10, batch_size=10, warmup_epochs=2.5).resolved(95)  # 10 steps an epoch
    assert cfg.warmup_steps == 25 and cfg.steps == 100 and cfg.warmup_epochs == 2.5
    assert FinetuneConfig(epochs=10, batch_size=10).resolved(95).warmup_steps == 10  # the default: one epoch
    assert as_dict(FinetuneConfig(**{k: v for k, v in MAE_B.items()}))["aa"] == "rand-m9-mstd0.5-inc1"


# --------------------------------------------------------------------------- mixup / cutmix


def test_mixup_targets_and_soft_target_loss_are_maes():
    """Mixup only, one lambda per batch: images = lam x + (1 - lam) x.flip(0) and targets = the same mix of the
    label-smoothed one-hots (on 1 - s + s / C, off s / C), rows summing to 1; the loss is the soft-target
    cross-entropy computed by hand; and the draws are a function of (seed, step)."""
    from gmae.evaluate.augment import build_mixup, mix_batch, soft_target_loss

    C, s = 5, 0.1
    cfg = FinetuneConfig(mixup=0.8, cutmix=0.0, smoothing=s, batch_size=6)
    mixup = build_mixup(cfg, C)
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xm, t = mix_batch(mixup, x.clone(), y, seed=3, step=7)
    lam = ((xm - x.flip(0)) / (x - x.flip(0))).flatten()
    lam = lam[torch.isfinite(lam)].median().item()
    assert 0.0 < lam < 1.0
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    one_hot = torch.full((6, C), s / C).scatter_(1, y[:, None], 1 - s + s / C)
    assert torch.allclose(t, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-5)
    assert torch.allclose(t.sum(1), torch.ones(6))
    # the same (seed, step) mixes the same way, another step differently; the global generators are untouched
    np_state = np.random.get_state()[1].copy()
    xm2, t2 = mix_batch(mixup, x.clone(), y, seed=3, step=7)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    assert not torch.equal(mix_batch(mixup, x.clone(), y, seed=3, step=8)[1], t)
    assert (np.random.get_state()[1] == np_state).all()
    logits = torch.randn(6, C, requires_grad=True)
    loss = soft_target_loss()(logits, t)
    by_hand = -(t * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(g, (F.softmax(logits, 1) - t).detach() / 6, atol=1e-6)  # d/dlogits of soft CE


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    from gmae.evaluate.augment import build_mixup, mix_batch

    C = 4
    mixup = build_mixup(FinetuneConfig(mixup=0.0, cutmix=1.0, smoothing=0.0, batch_size=4), C)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i is the constant i
    y = torch.tensor([0, 1, 2, 3])
    for step in range(20):
        xm, t = mix_batch(mixup, x.clone(), y, seed=0, step=step)
        pasted = (xm[0] == 3.0).float().mean().item()  # image 0 takes its box from image 3 (the flipped batch)
        if 0 < pasted < 1:
            break
    assert 0 < pasted < 1
    lam = 1 - pasted  # timm corrects lambda to the box's real area (correct_lam=True)
    assert t[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam], abs=1e-6)


def test_plain_smoothing_is_timms_label_smoothing_cross_entropy():
    """Without mixing the loss stays PyTorch's label_smoothing, which is timm's LabelSmoothingCrossEntropy (MAE's)."""
    from gmae.evaluate.timm_support import import_timm

    timm = import_timm()
    logits, y = torch.randn(8, 6), torch.randint(0, 6, (8,))
    ours = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert ours.item() == pytest.approx(timm.loss.LabelSmoothingCrossEntropy(0.1)(logits, y).item(), rel=1e-6)


# --------------------------------------------------------------------------- RandAugment, erasing


def test_randaugment_and_erasing_change_train_images_not_val_images():
    from gmae.data.labelled import build_labelled
    from gmae.evaluate.augment import augmented

    train, val, _ = build_labelled("digits", 32, augment=True)
    assert augmented(train, 32, FinetuneConfig()) is train  # all off: the set itself, no timm
    aug = augmented(train, 32, FinetuneConfig(aa="rand-m9-mstd0.5-inc1", reprob=1.0))
    changed = 0
    for i in range(12):
        rng_a, rng_b = np.random.default_rng([0, i]), np.random.default_rng([0, i])
        plain, extra = train.load(i, rng_a), aug.load(i, rng_b)
        assert extra.shape == plain.shape and extra.dtype == torch.float32
        changed += not torch.allclose(plain, extra, atol=1 / 255)
        # a function of the sample's rng: the same draw twice
        assert torch.equal(extra, aug.load(i, np.random.default_rng([0, i])))
        assert torch.equal(aug[i][0], train[i][0]) and aug[i][1] == train[i][1]  # evaluation untouched
    assert changed == 12  # reprob 1: every image has an erased box at least
    # the evaluation data are never wrapped (finetune wraps the train set only) and load unaugmented
    assert torch.equal(val.load(0, np.random.default_rng(0)), val[0][0])


def test_posterize_at_the_top_magnitude_keeps_no_bit_instead_of_failing():
    """MAE's policy draws magnitudes up to 10, where timm's PosterizeIncreasing asks for 0 bits; Pillow >= 10
    refuses that (it ended a real fine-tune at step 12). gmae's op gives the black image old Pillow gave."""
    from PIL import Image

    from gmae.data.labelled import build_labelled
    from gmae.evaluate.augment import augmented

    train, _, _ = build_labelled("digits", 32, augment=True)
    aug = augmented(train, 32, FinetuneConfig(aa="rand-m9-mstd0.5-inc1"))
    op = next(op for op in aug.randaugment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the top of the range: 4 - 4 = 0 bits
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.array(op(img)).max() == 0
    op.magnitude = 5  # 2 bits: 200 = 0b11001000 -> 0b11000000
    assert (np.array(op(img)) == 192).all()


def test_erasing_fills_maes_normalised_noise():
    """pixel erasing: the box holds mean + std x N(0, 1) in [0, 1] space (MAE's N(0, 1) after ImageNet
    normalisation); pixels outside it are untouched bit for bit."""
    from gmae.evaluate.augment import IMAGENET_MEAN, IMAGENET_STD, TimmAugmented

    class Flat:
        targets = np.zeros(1, np.int64)

        def __len__(self):
            return 1

        def load(self, index, rng=None):
            return torch.full((3, 64, 64), 0.5)

    aug = TimmAugmented(Flat(), 64, reprob=1.0, remode="pixel")
    x = aug.load(0, np.random.default_rng(1))
    box = x != 0.5
    assert box.any() and (x[~box] == 0.5).all()
    for c in range(3):
        z = (x[c][box[c]] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert abs(z.mean().item()) < 0.2 and z.std().item() == pytest.approx(1.0, abs=0.2)
    const = TimmAugmented(Flat(), 64, reprob=1.0, remode="const").load(0, np.random.default_rng(1))
    filled = const[:, const[0] != 0.5]
    assert torch.allclose(filled, torch.tensor(IMAGENET_MEAN)[:, None].expand_as(filled), atol=1e-6)


def test_bad_randaugment_policy_is_one_line():
    from gmae.data.labelled import build_labelled
    from gmae.evaluate.augment import augmented

    train, _, _ = build_labelled("digits", 32, augment=True)
    with pytest.raises(GMAEError) as err:
        augmented(train, 32, FinetuneConfig(aa="rand-q9"))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- pooling


def test_global_pool_avg_is_the_patch_token_mean_cls_is_the_cls_token(ckpt):
    from gmae.evaluate.finetune import finetune
    from gmae.io.loader import load
    from gmae.model.classifier import build_classifier

    encoder, mcfg = load(ckpt, "encoder")
    avg = build_classifier(mcfg, 3, 0.0, encoder, "avg").eval()
    encoder, _ = load(ckpt, "encoder")
    cls = build_classifier(mcfg, 3, 0.0, encoder, "cls").eval()
    x = torch.rand(4, 3, 32, 32)
    tokens = avg.forward_tokens(x)
    assert torch.equal(tokens, cls.forward_tokens(x))  # the same encoder weights
    assert torch.allclose(avg.forward_features(x), avg.fc_norm(tokens[:, 1:].mean(1)))
    assert torch.allclose(cls.forward_features(x), cls.norm(tokens)[:, 0])
    assert not torch.allclose(avg.forward_features(x), cls.forward_features(x), atol=1e-3)
    assert "norm.weight" in cls.state_dict() and "fc_norm.weight" not in cls.state_dict()
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()
    # the encoder's pre-trained final norm is the cls classifier's norm
    assert torch.equal(cls.state_dict()["norm.weight"], load(ckpt, "encoder")[0].state_dict()["norm.weight"])


# --------------------------------------------------------------------------- end to end


def test_mae_base_settings_run_and_resume_exactly(tmp_path, ckpt):
    """A few steps with every MAE ViT-B regulariser on (mixup, cutmix, RandAugment, erasing, smoothing, cls
    pooling to exercise it too): finite losses that are not the plain recipe's, the settings saved in the
    checkpoint, loadable, and a resume that repeats the uninterrupted run bit for bit."""
    from gmae.evaluate.finetune import finetune
    from gmae.io.loader import load

    def cfg(out, **kw):
        return FinetuneConfig(**{**MAE_B, "global_pool": "cls", "checkpoint": str(ckpt), "data": "digits",
                                 "steps": 4, "batch_size": 8, "blr": 1e-2, "eval_every": 2, "checkpoint_every": 2,
                                 "warmup_epochs": -1.0, "warmup_steps": 1, "out": str(out), **kw})

    full, cut, plain = tmp_path / "full", tmp_path / "cut", tmp_path / "plain"
    finetune(cfg(full), progress=False)
    losses = [r["loss"] for r in records(full)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    finetune(cfg(plain, mixup=0.0, cutmix=0.0, aa="", reprob=0.0), progress=False)
    assert losses != [r["loss"] for r in records(plain)]
    finetune(cfg(cut), progress=False)
    (cut / "checkpoint-0000004.pt").unlink()
    with open(cut / "metrics.jsonl", "w") as f:  # as if killed after the step-2 checkpoint
        f.write("".join(json.dumps(r) + "\n" for r in records(full)[:2]))
    summary = finetune(cfg(cut), resume=True, progress=False)
    assert summary["steps_run"] == 2
    assert [r["loss"] for r in records(cut)] == losses
    a = torch.load(full / "checkpoint-0000004.pt", weights_only=True)
    b = torch.load(cut / "checkpoint-0000004.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    saved = a["config"]["finetune"]
    assert {k: saved[k] for k in MAE_B if k not in ("global_pool", "warmup_epochs")} == \
        {k: v for k, v in MAE_B.items() if k not in ("global_pool", "warmup_epochs")}
    assert saved["global_pool"] == "cls"
    model, _, _ = load(full / "checkpoint-0000004.pt", "classifier")
    assert model.global_pool == "cls"
    # a resume that contradicts a saved regulariser is refused
    with pytest.raises(GMAEError, match="mixup"):
        finetune(cfg(cut, mixup=0.2), resume=True, progress=False, given={"mixup": "--mixup"})


def test_cli_finetune_flags(tmp_path, ckpt, capsys):
    out = tmp_path / "cli"
    args = ["finetune", "--checkpoint", str(ckpt), "--data", "digits", "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--mixup", "0.8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1",
            "--reprob", "0.25", "--global-pool", "cls", "--warmup-epochs", "0.5", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    state = torch.load(out / "checkpoint-0000002.pt", weights_only=True)
    saved = state["config"]["finetune"]
    assert (saved["mixup"], saved["cutmix"], saved["aa"], saved["reprob"], saved["global_pool"]) == \
        (0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25, "cls")
    assert saved["warmup_epochs"] == 0.5 and saved["warmup_steps"] == 1  # 180 steps an epoch, capped at steps - 1
    assert summary["steps"] == 2
    bad = ["finetune", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--warmup-steps", "3",
           "--warmup-epochs", "1"]
    assert main(bad) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(ckpt), "--out", str(tmp_path / "p"), "--mixup", "0.8",
                 "--batch-size", "7"]) == 2
    assert "even" in capsys.readouterr().err
