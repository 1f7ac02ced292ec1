"""Zero-shot readouts from depth-sorted Gaussians as functions on batches: the public names of :mod:`gmae.readouts`.

This module only gathers them (``from gmae import zeroshot``: ``zeroshot.layers``,
``zeroshot.soft_edges``, ...); each is defined, with its rule, in the readout it
belongs to: :mod:`gmae.readouts.core` (the Gaussians near to far, subset
renders, the depth-collapse check), :mod:`gmae.readouts.layers`, :mod:`gmae.readouts.edges`,
:mod:`gmae.readouts.segment`.
"""

from __future__ import annotations

from .readouts.core import (
    RENDER_CHUNK, Canvas, collapse_message, depth_collapse, from_far_end, gaussians_of, group_ids, near_to_far,
    render_subsets, require_gmae,
)
from .readouts.edges import EDGE_LEVELS, EDGE_THRESHOLD, EDGE_THRESHOLDS, edges, layer_index, soft_edges
from .readouts.layers import PARTIAL_COUNTS, layers, partial_renders
from .readouts.segment import figure_ground

__all__ = [
    "EDGE_LEVELS",
    "EDGE_THRESHOLD",
    "EDGE_THRESHOLDS",
    "PARTIAL_COUNTS",
    "RENDER_CHUNK",
    "Canvas",
    "collapse_message",
    "depth_collapse",
    "edges",
    "figure_ground",
    "from_far_end",
    "gaussians_of",
    "group_ids",
    "layer_index",
    "layers",
    "near_to_far",
    "partial_renders",
    "render_subsets",
    "require_gmae",
    "soft_edges",
]
