"""`gmae ablate`: the grid, resumable runs and cached scores, the table, and masked PSNR."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.evaluate import ablate
from gmae.config import model_config
from gmae.errors import GMAEError
from gmae.model.mae import Output


def test_grid_changes_one_setting_of_the_base_run_each():
    base = model_config("tiny", **ablate.PAPER_BASE)
    assert ablate.GRID[0].name == "base" and ablate.GRID[0].overrides == {}
    changed = {}
    for v in ablate.GRID[1:]:
        assert len(v.overrides) == 1, v.name
        (key, value), = v.overrides.items()
        assert getattr(base, key) != value, v.name  # really a change
        changed.setdefault(key, set()).add(value)
    assert changed == {"max_scale": {0.5, 2.0}, "mask_ratio": {0.70, 0.80}, "loss": {"all", "masked_normpix"},
                       "num_gaussians": {64, 256, 512}, "model": {"mae"}}


class ShiftedModel(torch.nn.Module):
    """Off by exactly 0.1 on the masked patches (PSNR 20 dB there) and wildly wrong on the visible ones."""

    def __init__(self):
        super().__init__()
        self.cfg = model_config("tiny", img_size=32)

    def forward(self, imgs, noise, mask_ratio):
        from gmae.model.vit import patchify, unpatchify

        p = self.cfg.patch_size
        mask = (noise > noise.median(dim=1, keepdim=True).values).float()  # (B, N)
        target = patchify(imgs, p)
        shifted = torch.where(target < 0.5, target + 0.1, target - 0.1)
        pred = torch.where(mask.bool().unsqueeze(-1), shifted, 1.0 - target)
        return Output(torch.zeros(()), unpatchify(pred, p, 3), mask)


def test_masked_psnr_is_computed_on_the_masked_patches():
    assert ablate.masked_psnr(ShiftedModel(), images=8, batch_size=4) == pytest.approx(20.0, abs=1e-3)


def make_labelled_folder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, level in (("dark", 40), ("light", 210)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return str(root)


def test_run_ablation_trains_scores_caches_and_tabulates(tmp_path, monkeypatch):
    probe_data = make_labelled_folder(tmp_path / "labelled")
    out = tmp_path / "ablate"
    rows = ablate.run_ablation(out, names=["base", "mae"], steps=2, probe_data=probe_data, progress=False)
    assert [r["name"] for r in rows] == ["base", "init", "mae"]
    for r in rows:
        assert 0 <= r["linear_acc"] <= 1 and 0 <= r["knn_acc"] <= 1 and math.isfinite(r["psnr"])
    assert rows[0]["step"] == 2 and rows[1]["step"] == 0
    # the base run is the paper's: c = 1, the authors' bounded z, mask 0.75, the masked loss, k = 128
    from gmae.io.loader import load

    trained = load(out / "base" / "checkpoint-0000002.pt", "checkpoint")["config"]["model"]
    assert (trained["max_scale"], trained["depth_param"], trained["mask_ratio"], trained["loss"],
            trained["num_gaussians"]) == (1.0, "bounded", 0.75, "masked", 128)
    table = (out / "table.md").read_text()
    assert "83.2 / 61.9" in table  # the paper's fine-tune / linear numbers beside the base row
    assert "GMAE base" in table and "at initialisation" in table and "MAE (pixel decoder)" in table
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))

    # A second call trains nothing and re-scores nothing.
    def refuse(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr("gmae.train.pretrain", refuse)
    monkeypatch.setattr(ablate, "score_variant", refuse)
    assert ablate.run_ablation(out, names=["base", "mae"], steps=2, probe_data=probe_data, progress=False) == rows

    with pytest.raises(GMAEError, match=r"holds another run \(its seed differ\)"):
        ablate.run_ablation(out, names=["base"], steps=2, seed=1, probe_data=probe_data, progress=False)
    with pytest.raises(GMAEError, match="unknown ablation variant 'c3'"):
        ablate.run_ablation(out, names=["c3"])


def test_a_damaged_final_checkpoint_is_trained_again(tmp_path, capsys):
    from gmae.io.loader import load

    probe_data = make_labelled_folder(tmp_path / "labelled")
    out = tmp_path / "ablate"
    kwargs = dict(names=["k64"], steps=2, probe_data=probe_data, progress=False, evaluate=False)
    ablate.run_ablation(out, **kwargs)
    final = out / "k64" / "checkpoint-0000002.pt"
    final.write_bytes(final.read_bytes()[:100])  # truncated, as by a crash mid-copy
    ablate.run_ablation(out, **kwargs)
    assert load(final, "checkpoint")["step"] == 2
    assert "checkpoint-0000002.pt cannot be read" in capsys.readouterr().out
