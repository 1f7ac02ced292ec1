"""Zero-shot readouts: what a GMAE's depth-sorted Gaussians show with no further training.

Nothing here is trained. A GMAE decoder gives k Gaussians per image; sorting
them by depth and rendering subsets is all the paper does (its Figs. 4-7).
:mod:`gmae.readouts.core` gives the Gaussians near to far (the authors' order),
renders subsets of them and checks whether their depths have collapsed; each
readout is one module holding one :class:`Readout` record
(:mod:`gmae.readouts.record`): its name, what it computes from the Gaussians,
its figure, its command's flags, and optionally how it is scored against
ground truth.

* :mod:`~gmae.readouts.layers`: partial renders (the K nearest) and each depth layer alone, nearest first;
* :mod:`~gmae.readouts.edges`: edges from depth-layer discontinuities, layers added from the far end
  (scored: BSDS ODS/OIS/AP);
* :mod:`~gmae.readouts.segment`: figure-ground from the nearest Gaussians (scored: mask IoU);
* :mod:`~gmae.readouts.gaussians`: the Gaussians' centres (scored: depth order vs occlusion).

`gmae layers|edges|segment|gaussians` and `gmae eval-zeroshot` loop over
:data:`READOUTS`. Adding a readout is one module with its ``READOUT``, named in
the import below (the order of the commands). Importing this package loads no
torch, so the command line can build its parser from the records.
"""

from __future__ import annotations

from . import edges, gaussians, layers, segment
from .record import READOUTS, Flag, Readout, Scorer, register

__all__ = ["READOUTS", "Flag", "Readout", "Scorer", "register"]

for _module in (layers, edges, segment, gaussians):  # the order of the commands
    register(_module.READOUT)
del _module
