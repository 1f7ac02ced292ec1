"""Gaussian Masked Autoencoders: MAE pre-training whose decoder emits 3D Gaussians."""

__version__ = "0.1.0"


def load(path, device="cpu", raw=False):
    """The model of a run folder, a gmae checkpoint or export, with its readouts as methods (gmae.api.Model);
    the EMA of its weights when it has one, unless `raw`.

    torch is imported here, on first use, not by ``import gmae``: the command
    line imports this package and answers --help and usage errors without it.
    """
    from .api import load as load_model

    return load_model(path, device, raw)
