"""Shared test fixtures."""

import os

import pytest
import torch

# Without a GPU the triton render backend is tested in Triton's CPU interpreter, which must be chosen before
# gmae.render.triton_raster is first imported (its kernels are defined then). Only that module uses triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A model small enough for probe and fine-tune tests (32 px, 16 patches, 2 blocks of width 32).
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "num_gaussians": 8,
        "render_backend": "torch"}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: skipped, with the reason, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu; tools/gpu_check.sh runs them)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fast enough, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(path, seed=0, **overrides):
    """Write a pre-training checkpoint of a fresh TINY GMAE (torch seed `seed`, TINY's fields updated with
    `overrides`) to `path`; returns `path`."""
    from gmae.io.checkpoint import save_checkpoint, training_state
    from gmae.config import TrainConfig, as_dict, model_config
    from gmae.model import build_model

    mcfg = model_config("tiny", **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = build_model(mcfg)
    save_checkpoint(training_state(model, torch.optim.AdamW(model.parameters()), 1, as_dict(mcfg),
                                   as_dict(TrainConfig(steps=1))), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pre-training checkpoint of a fresh TINY GMAE (seed 0), for the probe and fine-tune tests."""
    return tiny_checkpoint(tmp_path_factory.mktemp("pre") / "checkpoint-0000001.pt")
