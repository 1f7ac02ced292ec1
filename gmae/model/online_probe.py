"""The online probe (`gmae pretrain --online-probe`): a linear classifier on every encoder block, trained
during pre-training on the batch's labels, on features detached from the model.

The GMAE authors' code keeps such a probe per block on the masked input
(tekotan/video-gmae at c630810, `vidgmae/models/gmae.py` lines 139-160 and
522-525): the visible tokens the encoder sees in pre-training. It shows,
while a run trains, how linearly decodable a label is at each depth, at almost no
cost: one (B, D) feature per block and a linear layer each.

Design (each choice is a measurement's precondition, not a taste):

* **Detached.** Forward hooks keep each block's output ``.detach()``-ed; nothing
  of the probe enters the model's graph, so the encoder and decoder get exactly
  the gradients of a run without it. The heads live in this module, not in the
  model: the model's state dict, exports, readouts and fine-tuning never see them.
* **Pooling: the mean of the visible patch tokens** (the cls token left out).
  Every block's patch tokens carry the image; the cls token of an early block
  has attended only a few times, and no pre-training loss asks it to summarise
  the image, so a cls probe would measure the cls token's late start rather
  than what each depth holds.
* **Head: BatchNorm1d without affine, then Linear** (MAE's linear-probe head,
  weights truncated-normal with std 0.01, bias 0). The residual stream's scale
  grows with depth and differs per channel; the batch norm standardises each
  channel, so one learning rate suits every block. It keeps no running
  statistics (``track_running_stats=False``): the probe is only ever applied in
  training mode to the batch it learns from, and running statistics would be
  unused state that differs between data-parallel processes.
* The initial weights come from their own seed inside ``fork_rng``: building
  the probe leaves the global RNG, and so everything after it, as it was.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OnlineProbe"]

HEAD_INIT_STD = 0.01  # MAE's linear-probe head initialisation
_SEED_SALT = 0x0B5E  # the heads' init seed: (run seed, salt), apart from the model's


class OnlineProbe(nn.Module):
    """``depth`` linear heads (``heads[i]`` reads block i's output) for ``num_classes`` classes.

    :meth:`attach` hooks an encoder's blocks; every forward of the encoder while
    attached appends each block's pooled, detached features (float32) to a list,
    so the micro-batches of a gradient-accumulated step add up to the whole
    batch, in order; :meth:`loss` consumes them.
    """

    def __init__(self, dim: int, depth: int, num_classes: int, seed: int = 0):
        super().__init__()
        self.num_classes = int(num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 65537 + _SEED_SALT)
            self.heads = nn.ModuleList(self._head(dim, num_classes) for _ in range(depth))
        self._kept: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self._hooks: list = []

    @staticmethod
    def _head(dim: int, num_classes: int) -> nn.Sequential:
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, track_running_stats=False), linear)

    def attach(self, encoder: nn.Module) -> None:
        """Keep the pooled output of every block of ``encoder`` (a :class:`~gmae.model.vit.ViTEncoder`)."""
        if len(encoder.blocks) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads for an encoder of {len(encoder.blocks)} blocks")
        self.detach_hooks()
        self._hooks = [block.register_forward_hook(self._keeper(i)) for i, block in enumerate(encoder.blocks)]

    def detach_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear()

    def clear(self) -> None:
        self._kept = [[] for _ in self.heads]

    def _keeper(self, i: int):
        def keep(module, inputs, output):
            # (B, 1 + n, D): the cls token, then the visible patch tokens; their mean, cut from the graph.
            self._kept[i].append(output[:, 1:].detach().float().mean(1))
        return keep

    def loss(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the sum over blocks of each head's mean cross-entropy, to backpropagate; each block's mean loss,
        detached; each block's number of correct predictions) on the features kept since the last call,
        whose rows are the images of ``labels``. The kept features are then dropped."""
        if not all(self._kept) or any(sum(len(f) for f in kept) != len(labels) for kept in self._kept):
            raise RuntimeError("the online probe holds no features of this batch's images")
        losses, correct = [], []
        for head, kept in zip(self.heads, self._kept):
            logits = head(torch.cat(kept))
            losses.append(F.cross_entropy(logits, labels))
            correct.append((logits.argmax(1) == labels).sum())
        self.clear()
        losses_t = torch.stack(losses)
        return losses_t.sum(), losses_t.detach(), torch.stack(correct)
