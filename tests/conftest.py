"""Shared test fixtures."""

import pytest
import torch

# A model small enough for probe and fine-tune tests (32 px, 16 patches, 2 blocks of width 32).
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "num_gaussians": 8,
        "render_backend": "torch"}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fast enough, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
