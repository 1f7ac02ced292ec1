"""The Python API: ``gmae.load(path)`` gives a pre-trained model with its readouts as methods.

    import gmae

    model = gmae.load("runs/pretrain")          # a run folder, a checkpoint-*.pt or a .safetensors export
    images = model.images("photo.jpg")          # (B, 3, S, S) in [0, 1] at the model's input size S
    layers = model.layers(images, 8)            # (B, 8, 3, S, S): each depth layer alone, near to far
    edges = model.edges(images)                 # (B, S, S) soft edge map in [0, 1]
    figure = model.figure_ground(images)        # (B, S, S) bool figure mask
    model.depth_collapse(images)                # {"depth_at_limit", "depth_spread", ..., "collapsed"}
    model.layout()                              # does the geometry follow the image? {..., "image_independent"}

Every method takes images as a tensor (B, 3, S, S) or (3, S, S) in [0, 1], or
as paths (files or folders) read like the command line reads them. The
readouts are those of :mod:`gmae.readouts` (GMAE models only); ``module`` is
the ``torch.nn.Module`` itself, for anything else.

The collapse guard: every readout (and ``gaussians``) checks the depths of the
Gaussians it read (:func:`gmae.readouts.core.depth_collapse`) and, where they
have collapsed, warns once per call with a :class:`gmae.errors.DepthCollapseWarning`
saying that their order is the query-token order, not depth;
``depth_collapse(images)`` returns the figures. The layout guard: the first readout of a model also checks
whether its Gaussians' positions and depth order change with the image at all (:func:`gmae.readouts.layout.judge_layout`,
on held-out images of the data it was trained on) and, where they do not, warns once with a
:class:`gmae.errors.LayoutWarning`; ``layout(images)`` returns the figures.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import DepthCollapseWarning, GMAEError, LayoutWarning
from .io.files import image_files
from .readouts.core import Canvas, collapse_message, depth_collapse, gaussians_of
from .readouts.edges import EDGE_LEVELS, soft_edges
from .readouts.layout import judge_layout, layout_message, layout_monitor
from .readouts.layers import PARTIAL_COUNTS, layers, partial_renders
from .readouts.segment import figure_ground
from .render.gaussians import Gaussians
from .io.loader import load as load_file

ImagesLike = torch.Tensor | str | Path | list


def load(path: str | Path, device: str | torch.device = "cpu", raw: bool = False) -> Model:
    """The model of a run folder (its newest readable checkpoint), a gmae checkpoint or a gmae export: with
    the EMA of its weights when the checkpoint has one (``gmae pretrain --ema``), unless `raw`."""
    from .io.checkpoint import configs_of

    module, config, state = load_file(path, "model", device, raw=raw)
    train = configs_of(state)[1]
    return Model(module, config, int(state["step"]), state["weights"], train_data=None if train is None else train.data)


class Model:
    """A pre-trained GMAE (or MAE) in eval mode, with the readouts as methods (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, config: ModelConfig, step: int = 0, weights: str = "raw",
                 train_data: str | None = None):
        # weights: which the module holds, "raw" or "EMA (decay D)" (gmae.io.checkpoint.model_weights);
        # train_data: what it was trained on (None: not recorded, an export), where the layout guard looks
        self.module, self.config, self.step, self.weights = module.eval(), config, step, weights
        self.train_data = train_data
        self._layout_checked = False

    def __repr__(self) -> str:
        c = self.config
        k = f", k={c.num_gaussians}" if c.model == "gmae" else ""
        if c.model == "gmae" and c.gaussians_per_query > 1:
            k += f" ({c.num_queries} queries x {c.gaussians_per_query})"
        return f"gmae.Model({c.model}, {c.img_size}px, patch {c.patch_size}, width {c.embed_dim}{k}, step {self.step})"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def images(self, images: ImagesLike) -> torch.Tensor:
        """(B, 3, S, S) on the model's device: a tensor as given, paths (files or folders) read and
        centre-cropped to the model's input size S."""
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.dim() == 3 else images
            size = self.config.img_size
            if batch.dim() != 4 or tuple(batch.shape[1:]) != (self.config.in_chans, size, size):
                raise GMAEError(f"images must be ({self.config.in_chans}, {size}, {size}) or a batch of them, in "
                                f"[0, 1]; got {tuple(images.shape)} (model.images(paths) reads and resizes files)")
            return batch.to(self.device)
        from .data import load_images

        paths = [images] if isinstance(images, (str, Path)) else list(images)
        files = image_files([str(p) for p in paths])
        return torch.stack(load_images(files, self.config.img_size)).to(self.device)

    @torch.no_grad()
    def reconstruct(self, images: ImagesLike, mask_ratio: float | None = None, seed: int = 0):
        """The model's output on masked images: ``.image`` (B, 3, S, S) the reconstruction, ``.mask``
        (B, N) 1 where a patch was hidden, ``.loss``; the mask is drawn with `seed`."""
        from .model import masking_noise

        batch = self.images(images)
        noise = masking_noise(seed, 0, batch.shape[0], self.config.num_patches).to(self.device)
        return self.module(batch, noise, mask_ratio=self.config.mask_ratio if mask_ratio is None else mask_ratio)

    @torch.no_grad()
    def features(self, images: ImagesLike, pool: str = "cls") -> torch.Tensor:
        """(B, D) encoder features of whole images: the cls token after the final norm (or "avg")."""
        from .evaluate.probe import encode

        return encode(self.module.encoder, self.images(images), pool)

    def gaussians(self, images: ImagesLike, mask_ratio: float = 0.0) -> Gaussians:
        """The k Gaussians of each image, near to far (:func:`gmae.readouts.core.gaussians_of`); warns
        (DepthCollapseWarning) when their depths have collapsed."""
        return self._read(images, mask_ratio)

    def _read(self, images: ImagesLike, mask_ratio: float = 0.0) -> Gaussians:
        """The Gaussians every readout starts from, checked by the collapse guard."""
        g = gaussians_of(self.module, self.images(images), mask_ratio)
        message = collapse_message(depth_collapse(g, self.config))
        if message:  # stacklevel 3: the caller of the readout method
            warnings.warn(message, DepthCollapseWarning, stacklevel=3)
        if not self._layout_checked:  # once per model: it is about the model, not the images
            self._layout_checked = True
            layout = self.layout()
            message = layout_message(layout)
            if message:
                warnings.warn(f"{message} (measured on {layout['source']})", LayoutWarning, stacklevel=3)
        return g

    def layout(self, images: ImagesLike | None = None) -> dict:
        """Does the geometry follow the image? The layout figures and the full-image PSNR
        (:mod:`gmae.readouts.layout`) with the verdict "image_independent", on `images` (at least 2) or, by
        default, on held-out images of the data the model was trained on (dead-leaves if not recorded)."""
        from .evaluate.zeroshot import model_layout

        if images is None:
            return model_layout(self.module, self.train_data)
        batch = self.images(images)
        if batch.shape[0] < 2:
            raise GMAEError("the layout figures compare images: give at least 2 (or none: held-out images)")
        return {**judge_layout(layout_monitor(self.module, batch)), "source": f"the {batch.shape[0]} images given"}

    def depth_collapse(self, images: ImagesLike, mask_ratio: float = 0.0) -> dict:
        """Whether the depths of these images' Gaussians have collapsed: {"depth_at_limit", "depth_spread",
        "scale_at_cap", "num_images", "collapsed"} (:func:`gmae.readouts.core.depth_collapse`)."""
        return depth_collapse(gaussians_of(self.module, self.images(images), mask_ratio), self.config)

    def _canvas(self) -> Canvas:
        return Canvas.of(self.module)

    def partial_renders(self, images: ImagesLike, counts=PARTIAL_COUNTS) -> tuple[list[int], torch.Tensor]:
        """(the K used, (B, len(K), 3, S, S)): renders of the K nearest Gaussians, then all."""
        return partial_renders(self._read(images), self._canvas(), counts)

    def layers(self, images: ImagesLike, num_layers: int = 8) -> torch.Tensor:
        """(B, l, 3, S, S): each of `num_layers` depth layers rendered alone, the nearest first."""
        return layers(self._read(images), self._canvas(), num_layers)[0]

    def edges(self, images: ImagesLike, levels=EDGE_LEVELS) -> torch.Tensor:
        """(B, S, S) soft edge map in [0, 1]: binary depth-layer edges averaged over levels and thresholds."""
        return soft_edges(self._read(images), self._canvas(), levels=levels)[0]

    def figure_ground(self, images: ImagesLike, near_fraction: float = 0.5) -> torch.Tensor:
        """(B, S, S) bool: where the nearest `near_fraction` of the Gaussians cover the image."""
        return figure_ground(self._read(images), self._canvas(), near_fraction)[0]


__all__ = ["Model", "load"]
