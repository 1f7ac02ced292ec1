"""An exponential moving average (EMA) of a model's weights, kept in fp32: `gmae pretrain --ema DECAY`.

After every optimizer step that is applied (a skipped, non-finite step leaves
it alone), each trainable parameter's average moves as

    ema = decay * ema + (1 - decay) * weight

while frozen parameters and buffers are copied. It starts from the initial
weights. Its state is the model's state dict (floating-point entries in fp32),
saved in each checkpoint as ``"ema"`` and loaded on ``--resume``, so that a
resumed run's EMA is the uninterrupted run's, bit for bit. What reads a
checkpoint for evaluation uses it when it is there
(:func:`gmae.io.checkpoint.model_weights`).
"""

from __future__ import annotations

import torch

from ..errors import GMAEError

__all__ = ["WeightEMA", "ema_label"]


def ema_label(decay: float) -> str:
    """How the commands name EMA weights: "EMA (decay 0.999)"."""
    return f"EMA (decay {decay:g})"


class WeightEMA:
    """The fp32 EMA of `model`'s weights with `decay`, on the model's device; :meth:`update` after each step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self.state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                      for k, v in model.state_dict().items()}
        self._averaged = [k for k in self.state if k in trainable]
        self._copied = [k for k in self.state if k not in trainable]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        now = model.state_dict()
        averaged = [self.state[k] for k in self._averaged]
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, [now[k].float() for k in self._averaged], alpha=1.0 - self.decay)
        for k in self._copied:
            self.state[k].copy_(now[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        if saved.keys() != self.state.keys():
            raise GMAEError("the checkpoint's EMA does not hold this model's weights; it is damaged")
        for k, v in saved.items():
            self.state[k].copy_(v)
