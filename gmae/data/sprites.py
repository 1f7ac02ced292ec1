"""Procedural sprites: a few opaque plain-coloured shapes over a plain background, with exact depth truth.

Each image paints 1-4 shapes (disc, square, triangle, ellipse) of random
colour, size, position and orientation, one after another, over a background
of one random plain colour: the paint order *is* the depth order (the last
painted is the nearest). It is the control between one disc (where the
depth-order gradient already works, docs/reports/depth.md) and dead-leaves (dozens of
textured leaves, where it does not): few, large, flat objects that overlap
often.

The generator is :class:`gmae.data.deadleaves.DeadLeaves` with another scene
drawer, so the sampling (seeded per ``(seed, index)``, resolution independent,
hard edges), the painting and the ground truth are the same code:
:class:`gmae.data.DeadLeavesSample` with ``objects`` (0 = background, 1..n in
paint order), ``depth_rank``, ``boundaries``, ``overlaps`` (whole shapes) and
``order_weights``; ``shapes`` indexes :data:`SHAPES`, every ``textures`` entry
is ``"flat"``, and each object is exactly ``colors[i]`` wherever it is visible.
The figure truth is every shape (``objects > 0``).
"""

from __future__ import annotations

import math

import numpy as np

from .deadleaves import _MAX_VERTS, DeadLeaves

__all__ = ["Sprites", "SHAPES"]

#: Shape kind codes (``DeadLeavesSample.shapes`` of a sprite image); 0 is the background plane.
SHAPES = ("background", "disc", "square", "triangle", "ellipse")

_MIN_COLOR_DISTANCE = 0.3  # each shape's colour differs this much (Euclidean, RGB) from the background and the others
_COLOR_TRIES = 64


class Sprites(DeadLeaves):
    """Sprites image source: ``len`` is virtual (10**9), images depend only on (seed, index).

    Args:
        image_size: int (square) or (H, W).
        seed: non-negative int; a different seed gives a different family of images.
        min_shapes, max_shapes: number of shapes per image, uniform in this range (inclusive).
        min_radius, max_radius: shape radius (a disc's radius, half a square's side, a
            triangle's circumradius, an ellipse's semi-major axis) as a fraction of the
            image's longer side, uniform in this range. Every shape's centre lies at
            least its radius from the border, so shapes sit (almost) wholly in the image.
    """

    shape_names = SHAPES
    _rng_tag = (0x5B5B,)  # sprites (seed, index) is not dead-leaves' (seed, index)

    def __init__(self, image_size, seed: int = 0, min_shapes: int = 1, max_shapes: int = 4,
                 min_radius: float = 0.1, max_radius: float = 0.3):
        if not 1 <= int(min_shapes):
            raise ValueError(f"need at least one shape, got min_shapes={min_shapes}")
        if not max_radius < 0.5:
            raise ValueError(f"max_radius must be below 0.5 of the image side, got {max_radius}")
        super().__init__(image_size, seed=seed, min_shapes=min_shapes, max_shapes=max_shapes,
                         min_radius=min_radius, max_radius=max_radius)

    def __repr__(self) -> str:
        return (f"Sprites(image_size=({self.height}, {self.width}), seed={self.seed}, "
                f"shapes={self.min_shapes}..{self.max_shapes})")

    def figure(self, objects: np.ndarray, num_objects: int) -> np.ndarray:
        """The figure truth: every shape, i.e. wherever the background is not visible."""
        return objects > 0

    def _draw_scene(self, rng: np.random.Generator) -> dict:
        """All random scene parameters, in units of the longer side (size independent), in the
        dictionary :meth:`DeadLeaves._paint` and :meth:`DeadLeaves._shade` read."""
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        m = n + 1
        ext_x, ext_y = self.width / self._scale, self.height / self._scale
        kind = np.zeros(m, dtype=np.int64)
        kind[1:] = rng.integers(1, len(SHAPES), n)
        r = rng.uniform(self.min_radius, self.max_radius, n)
        # centres at least r from the border (shorter extent permitting)
        cx = r + rng.random(n) * np.maximum(ext_x - 2 * r, 0.0)
        cy = r + rng.random(n) * np.maximum(ext_y - 2 * r, 0.0)
        theta = rng.random(n) * (2 * math.pi)
        names = np.array(SHAPES)[kind[1:]]
        aspect = np.where(names == "ellipse", rng.uniform(0.4, 0.8, n), 1.0)
        colors = _distinct_colors(rng, m)

        bound = np.empty(m)
        bound[0] = 0.5 * math.hypot(ext_x, ext_y)
        bound[1:] = np.where(names == "square", r * math.sqrt(2.0), r)
        zeros = np.zeros(m)
        return dict(
            n=n, kind=kind, r=r, cx=np.concatenate([[ext_x / 2], cx]), cy=np.concatenate([[ext_y / 2], cy]),
            theta=theta, aspect=aspect,
            nverts=np.full(n, 3), jitter=np.zeros((n, _MAX_VERTS)),  # the polygons: equilateral triangles
            bound=bound, texture=np.zeros(m, dtype=np.int64), c0=colors, c1=colors,
            tex_dx=zeros, tex_dy=zeros, freq=zeros, phase=zeros, noise_amp=zeros,
        )


def _distinct_colors(rng: np.random.Generator, m: int) -> np.ndarray:
    """(m, 3) uniform random colours, each at least _MIN_COLOR_DISTANCE from those before it where
    _COLOR_TRIES draws allow (else the farthest of them), so that no shape vanishes into another."""
    colors = np.empty((m, 3))
    for i in range(m):
        tries = rng.random((_COLOR_TRIES, 3))
        if i == 0:
            colors[0] = tries[0]
            continue
        nearest = np.linalg.norm(tries[:, None, :] - colors[None, :i, :], axis=-1).min(1)
        ok = np.flatnonzero(nearest >= _MIN_COLOR_DISTANCE)
        colors[i] = tries[ok[0] if ok.size else int(nearest.argmax())]
    return colors
