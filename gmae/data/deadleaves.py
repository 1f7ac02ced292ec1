"""Procedural dead-leaves images with exact occlusion ground truth.

The dead-leaves model (Matheron; Lee, Mumford & Huang 2001) paints opaque
"leaves" back to front: each new shape hides what is under it.  With leaf sizes
drawn from a power law the images share the scale statistics and the occlusion
layering of natural images, and because we paint them ourselves we know, for
every pixel, which leaf is visible and how deep in the stack it is.

Everything about image ``index`` is drawn from
``numpy.random.default_rng([seed, index])``.  The scene (shapes, colours,
textures) is drawn in units of the image's longer side before anything that
depends on the pixel count, so the same ``(seed, index)`` gives the *same scene*
at 32, 64 or 224 pixels, just sampled more finely (only the per-pixel noise
texture differs).  Edges are hard (no anti-aliasing), so the ground truth is
exact: a pixel belongs to the leaf that covers its centre.

Ground truth conventions (see :class:`DeadLeavesSample`):

* ``objects[y, x]``: draw-order id of the visible object; 0 is the background
  plane (it covers everything), 1..n are the leaves, larger = nearer the viewer.
* ``depth_rank = n - objects``: 0 for the nearest leaf, n for the background.
* ``boundaries[y, x]``: ``objects[y, x]`` differs from its right or lower
  neighbour (occlusion boundaries; texture edges such as stripes are not
  boundaries).
* ``overlaps[i, j]``: the *whole* shapes of objects i and j (visible or not)
  share a pixel centre, so one occludes the other where they meet: the nearer
  (larger id) is in front. The background overlaps every leaf on the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .images import as_hw

__all__ = [
    "DeadLeaves",
    "DeadLeavesSample",
    "masks",
    "occlusion_boundaries",
    "order_weights",
    "SHAPES",
    "TEXTURES",
]

#: Shape kind codes (``DeadLeavesSample.shapes``); 0 is the background plane.
SHAPES = ("background", "disc", "rectangle", "polygon")
#: Texture codes (``DeadLeavesSample.textures``).
TEXTURES = ("flat", "gradient", "stripes", "noise")

# Probability of each texture (flat, gradient, stripes, noise).
_TEXTURE_P = np.array([0.4, 0.25, 0.15, 0.2])
_MAX_VERTS = 7


def occlusion_boundaries(objects: np.ndarray | torch.Tensor):
    """Boolean map, True where ``objects`` differs from the right or lower neighbour.

    A torch tensor gives a torch tensor on its own device (the zero-shot edges run on GPUs too).
    """
    if isinstance(objects, torch.Tensor):
        obj, b = objects, torch.zeros_like(objects, dtype=torch.bool)
    else:
        obj = np.asarray(objects)
        b = np.zeros(obj.shape, dtype=bool)
    b[..., :, :-1] |= obj[..., :, :-1] != obj[..., :, 1:]
    b[..., :-1, :] |= obj[..., :-1, :] != obj[..., 1:, :]
    return b


@dataclass
class DeadLeavesSample:
    """One dead-leaves image and its ground truth (all torch tensors).

    Attributes:
        image: float32 (3, H, W) in [0, 1].
        objects: int64 (H, W), draw-order id of the visible object
            (0 = background, n = nearest leaf).
        depth_rank: int64 (H, W), ``num_objects - 1 - objects`` (0 = nearest).
        boundaries: bool (H, W), occlusion boundaries (see module docstring).
        num_objects: n + 1 = leaves drawn + the background.  Some of them may be
            fully hidden or cover no pixel centre.
        shapes: int64 (n+1,), index into :data:`SHAPES` per object.
        textures: int64 (n+1,), index into :data:`TEXTURES` per object.
        colors: float32 (n+1, 3), base colour per object; a ``"flat"`` object is
            exactly this colour at every pixel it owns.
        overlaps: bool (n+1, n+1), True where the two objects' whole shapes
            (hidden parts included) share a pixel centre (diagonal: the object
            covers a pixel centre at all).
        order_weights: float64 (n+1, n+1), how much the pair's order shows in
            the image: the sum, over the pixel centres both whole shapes cover,
            of the squared difference of the colours the two objects would have
            there (their textures without the per-pixel noise, which is zero
            mean and hides nothing); 0 where they do not overlap and on the
            diagonal. The weights of object ordering accuracy
            (:mod:`gmae.evaluate.depth`).
        figure: bool (H, W), the source's figure truth: for dead-leaves the
            pixels whose visible object is one of the nearer half of the leaves
            (id > n / 2), the analogue of the readout's "nearest half of the
            Gaussians"; for sprites, every shape (see :meth:`DeadLeaves.figure`).
    """

    image: torch.Tensor
    objects: torch.Tensor
    depth_rank: torch.Tensor
    boundaries: torch.Tensor
    num_objects: int
    shapes: torch.Tensor
    textures: torch.Tensor
    colors: torch.Tensor
    overlaps: torch.Tensor
    order_weights: torch.Tensor | None = None
    figure: torch.Tensor | None = None

    def masks(self) -> torch.Tensor:
        """bool (num_objects, H, W): the visible support of each object."""
        return masks(self)


def masks(sample: DeadLeavesSample) -> torch.Tensor:
    """bool (num_objects, H, W): ``masks[i]`` is where object ``i`` is visible.

    The masks partition the image (exactly one is True per pixel); hidden
    objects have an all-False mask.
    """
    ids = torch.arange(sample.num_objects, dtype=sample.objects.dtype)
    return sample.objects.unsqueeze(0) == ids.view(-1, 1, 1)


class DeadLeaves:
    """Dead-leaves image source: ``len`` is virtual (10**9), images depend only on (seed, index).

    Args:
        image_size: int (square) or (H, W).
        seed: non-negative int; a different seed gives a different family of images.
        min_shapes, max_shapes: number of leaves per image, uniform in this range
            (inclusive).  The scene is resolution independent, so the count does
            not change with the image size.
        min_radius, max_radius: leaf radius range as a fraction of the image's
            longer side.
        size_power: leaf radii have density proportional to ``r ** -size_power``
            on [min_radius, max_radius] (heavy tailed: many small leaves, a few
            big ones).  3 is the scale-invariant classic; the default 2 leaves
            fewer sub-pixel leaves for the small counts used here.
    """

    shuffle = False  # virtual length: a SeededStream uses index = g, no permutation
    length = 10**9
    #: Names of the shape codes this source draws (index 0: the background plane).
    shape_names = SHAPES
    #: Appended to (seed, index) in the generator's entropy: a subclass's images are not another's.
    _rng_tag: tuple[int, ...] = ()

    def __init__(
        self,
        image_size,
        seed: int = 0,
        min_shapes: int = 8,
        max_shapes: int = 40,
        min_radius: float = 0.03,
        max_radius: float = 0.5,
        size_power: float = 2.0,
    ):
        self.height, self.width = as_hw(image_size)
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not 0 <= int(min_shapes) <= int(max_shapes):
            raise ValueError(f"need 0 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        if not 0 < min_radius <= max_radius:
            raise ValueError(f"need 0 < min_radius <= max_radius, got {min_radius}, {max_radius}")
        self.seed = seed
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.min_radius, self.max_radius = float(min_radius), float(max_radius)
        self.size_power = float(size_power)
        # Pixel-centre coordinates in units of the longer side.
        self._scale = float(max(self.height, self.width))
        self._xs = ((np.arange(self.width) + 0.5) / self._scale)
        self._ys = ((np.arange(self.height) + 0.5) / self._scale)
        self.bad_images = 0  # for interface parity with file-backed sources

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"DeadLeaves(image_size=({self.height}, {self.width}), seed={self.seed}, "
                f"shapes={self.min_shapes}..{self.max_shapes})")

    # ------------------------------------------------------------------ API
    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The image of ``index`` (float32 (3, H, W) in [0, 1]); ``rng`` is ignored.

        Training's path: only the image, none of :meth:`sample`'s ground truth.
        """
        return torch.from_numpy(self._render(index)[2])

    def load_objects(self, index: int) -> tuple[torch.Tensor, np.ndarray, int]:
        """(the image of :meth:`load`, bit for bit; its int64 (H, W) object-id map; the number of objects,
        background included): the ground truth an image-level label needs, at the cost of :meth:`load`."""
        p, objects, image = self._render(index)
        return torch.from_numpy(image), objects, p["n"] + 1

    def figure(self, objects: np.ndarray, num_objects: int) -> np.ndarray:
        """The figure truth of an object-id map: the nearer half of the leaves (id > n / 2 of n leaves)."""
        return objects > (num_objects - 1) / 2

    def sample(self, index: int) -> DeadLeavesSample:
        """Image ``index`` with its ground truth."""
        from threadpoolctl import threadpool_limits  # comes with scikit-learn

        p, objects, image, shapes = self._render(index, whole_shapes=True)
        n = p["n"]
        obj_t = torch.from_numpy(objects)
        # Thin products (n << H*W): one BLAS thread is faster than several fighting for a busy machine's cores.
        with threadpool_limits(1, user_api="blas"):
            overlaps, weights = (shapes @ shapes.T) > 0, self._order_weights(p, shapes)
        return DeadLeavesSample(
            image=torch.from_numpy(image),
            objects=obj_t,
            depth_rank=n - obj_t,
            boundaries=torch.from_numpy(occlusion_boundaries(objects)),
            num_objects=n + 1,
            shapes=torch.from_numpy(p["kind"]),
            textures=torch.from_numpy(p["texture"]),
            colors=torch.from_numpy(p["c0"].astype(np.float32)),
            overlaps=torch.from_numpy(overlaps),
            order_weights=torch.from_numpy(weights),
            figure=torch.from_numpy(self.figure(objects, n + 1)),
        )

    def whole_shapes(self, index: int) -> np.ndarray:
        """(n+1, H*W) float32 0/1 masks of every object's whole shape in image ``index``, occluded parts included
        (what ``sample`` shows is only the visible part of each)."""
        return self._render(index, whole_shapes=True)[3]

    # ------------------------------------------------------------ internals
    def _render(self, index: int, whole_shapes: bool = False):
        """(scene parameters, object-id map, image) of ``index``; with ``whole_shapes`` also
        the (n+1, H*W) float32 0/1 masks of every object's whole shape."""
        index = int(index)
        if index < 0:
            raise IndexError(f"dead-leaves index must be non-negative, got {index}")
        rng = np.random.default_rng([self.seed, index, *self._rng_tag])
        p = self._draw_scene(rng)
        shapes = np.zeros((p["n"] + 1, self.height * self.width), np.float32) if whole_shapes else None
        objects = self._paint(p, shapes)
        image = self._shade(objects, p, rng)
        return (p, objects, image, shapes) if whole_shapes else (p, objects, image)

    def _draw_scene(self, rng: np.random.Generator) -> dict:
        """All random scene parameters, in units of the longer side (size independent)."""
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        m = n + 1  # objects including the background
        ext_x, ext_y = self.width / self._scale, self.height / self._scale

        kind = np.zeros(m, dtype=np.int64)
        kind[1:] = rng.integers(1, len(SHAPES), n)
        # Power-law radii by inverse CDF.
        u = rng.random(n)
        a, lo, hi = self.size_power, self.min_radius, self.max_radius
        if abs(a - 1.0) < 1e-9:
            r = lo * (hi / lo) ** u
        else:
            e = 1.0 - a
            r = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)
        cx = rng.random(n) * ext_x
        cy = rng.random(n) * ext_y
        theta = rng.random(n) * (2 * math.pi)
        aspect = rng.uniform(0.3, 1.0, n)
        nverts = rng.integers(3, _MAX_VERTS + 1, n)
        jitter = rng.uniform(-0.4, 0.4, (n, _MAX_VERTS))

        texture = rng.choice(len(TEXTURES), size=m, p=_TEXTURE_P).astype(np.int64)
        c0 = rng.random((m, 3))
        c_grad = rng.random((m, 3))
        c_stripe = np.clip(c0 + rng.normal(0.0, 0.3, (m, 3)), 0.0, 1.0)
        tex_angle = rng.random(m) * (2 * math.pi)
        period = rng.uniform(0.04, 0.15, m)
        phase = rng.random(m) * (2 * math.pi)
        noise_amp = rng.uniform(0.02, 0.08, m)

        # Background plane: object 0, centred, spanning the image.
        cxa = np.concatenate([[ext_x / 2], cx])
        cya = np.concatenate([[ext_y / 2], cy])
        bound = np.empty(m)
        bound[0] = 0.5 * math.hypot(ext_x, ext_y)
        bound[1:] = np.where(kind[1:] == 2, r * np.sqrt(1.0 + aspect**2), r)

        c1 = np.where((texture == 1)[:, None], c_grad, np.where((texture == 2)[:, None], c_stripe, c0))
        return dict(
            n=n, kind=kind, r=r, cx=cxa, cy=cya, theta=theta, aspect=aspect,
            nverts=nverts, jitter=jitter, bound=bound, texture=texture, c0=c0, c1=c1,
            tex_dx=np.cos(tex_angle), tex_dy=np.sin(tex_angle), freq=1.0 / period,
            phase=phase, noise_amp=np.where(texture == 3, noise_amp, 0.0),
        )

    def _paint(self, p: dict, shapes: np.ndarray | None = None) -> np.ndarray:
        """Object-id map: paint leaves 1..n back to front over the background 0.

        shapes (n+1, H*W), if given, receives each object's whole shape (1 where it covers a pixel centre).
        """
        H, W, s = self.height, self.width, self._scale
        objects = np.zeros((H, W), dtype=np.int64)
        n = p["n"]
        if shapes is not None:
            shapes[0] = 1.0  # the background plane covers everything
        if n == 0:
            return objects
        kind, r, cx, cy, bound = p["kind"][1:], p["r"], p["cx"][1:], p["cy"][1:], p["bound"][1:]
        theta, aspect = p["theta"], p["aspect"]
        # Pixel j has centre (j + 0.5) / s; keep the pixels whose centre may be inside.
        j0 = np.maximum(0, np.ceil((cx - bound) * s - 0.5)).astype(np.int64)
        j1 = np.minimum(W, np.floor((cx + bound) * s - 0.5) + 1).astype(np.int64)
        i0 = np.maximum(0, np.ceil((cy - bound) * s - 0.5)).astype(np.int64)
        i1 = np.minimum(H, np.floor((cy + bound) * s - 0.5) + 1).astype(np.int64)
        cos_t, sin_t = np.cos(theta), np.sin(theta)
        # Convex polygons: vertices on a rotated ellipse (semi-axes r, aspect*r) in
        # angular order, i.e. counter-clockwise in (x, y); a point is inside iff it
        # is left of every edge: A*dy + B*dx >= C for each edge (A, B, C).
        nv = p["nverts"]
        k = np.arange(_MAX_VERTS)
        phi = (k[None, :] + p["jitter"]) * (2 * math.pi / nv[:, None])
        ex, ey = r[:, None] * np.cos(phi), (r * aspect)[:, None] * np.sin(phi)
        vx = ex * cos_t[:, None] - ey * sin_t[:, None]
        vy = ex * sin_t[:, None] + ey * cos_t[:, None]
        nxt = np.where(k[None, :] + 1 < nv[:, None], k[None, :] + 1, 0)  # wrap at nverts
        wx = np.take_along_axis(vx, nxt, 1) - vx
        wy = np.take_along_axis(vy, nxt, 1) - vy
        edge_a, edge_b, edge_c = wx, -wy, wx * vy - wy * vx
        rows = zip(kind.tolist(), cx.tolist(), cy.tolist(), r.tolist(), aspect.tolist(),
                   cos_t.tolist(), sin_t.tolist(), nv.tolist(),
                   j0.tolist(), j1.tolist(), i0.tolist(), i1.tolist())
        xs_all, ys_all = self._xs, self._ys
        names = self.shape_names
        for q, (kd, x, y, rq, aq, c, sn, m, a0, a1, b0, b1) in enumerate(rows):
            if a0 >= a1 or b0 >= b1:
                continue
            dx = (xs_all[a0:a1] - x)[None, :]
            dy = (ys_all[b0:b1] - y)[:, None]
            name = names[kd]
            if name == "disc":
                mask = dx * dx + dy * dy <= rq * rq
            elif name in ("rectangle", "square"):  # rotated, half sides r and aspect * r
                mask = (np.abs(dx * c + dy * sn) <= rq) & (np.abs(dy * c - dx * sn) <= rq * aq)
            elif name == "ellipse":  # rotated, semi-axes r and aspect * r
                u, v = dx * c + dy * sn, (dy * c - dx * sn) / aq
                mask = u * u + v * v <= rq * rq
            else:  # convex polygon (a triangle is one with 3 vertices)
                mask = ((edge_a[q, :m, None, None] * dy + edge_b[q, :m, None, None] * dx)
                        >= edge_c[q, :m, None, None]).all(axis=0)
            objects[b0:b1, a0:a1][mask] = q + 1
            if shapes is not None:
                shapes[q + 1].reshape(H, W)[b0:b1, a0:a1] = mask
        return objects

    def _shade(self, objects: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
        """Colour every pixel from its visible object's texture; float32 (3, H, W).

        colour = c0 + t * (c1 - c0) + noise_amp * noise, with t = 0 (flat, noise),
        a clipped linear ramp across the object (gradient) or a sinusoid
        (stripes); c1 == c0 and noise_amp == 0 unless the texture uses them.
        """
        H, W = objects.shape
        obj = objects.ravel()
        img = self._appearance(p, obj, np.arange(H * W))  # (H*W, 3)
        pix_tex = p["texture"].astype(np.int8)[obj]
        sel = np.flatnonzero(pix_tex == 3)
        if sel.size:  # drawn last: the only size-dependent randomness
            noise = rng.standard_normal(sel.size) * p["noise_amp"][obj[sel]]
            img[sel] += noise.astype(np.float32)[:, None]
        np.clip(img, 0.0, 1.0, out=img)
        return np.ascontiguousarray(img.reshape(H, W, 3).transpose(2, 0, 1))

    def _appearance(self, p: dict, obj: np.ndarray, pix: np.ndarray) -> np.ndarray:
        """float32 (P, 3): the colour object ``obj[i]`` has at flat pixel ``pix[i]``, without the noise texture.

        c0 + t * (c1 - c0), with t = 0 (flat, noise), a clipped linear ramp across
        the object (gradient) or a sinusoid (stripes).
        """
        W = self.width
        img = p["c0"].astype(np.float32)[obj]
        tex = p["texture"].astype(np.int8)[obj]
        sel = np.flatnonzero((tex == 1) | (tex == 2))  # gradient or stripes
        if sel.size:
            o, at = obj[sel], pix[sel]
            proj = ((self._xs[at % W] - p["cx"][o]) * p["tex_dx"][o]
                    + (self._ys[at // W] - p["cy"][o]) * p["tex_dy"][o])
            t = np.where(tex[sel] == 1,
                         np.clip(0.5 + proj / (2.0 * p["bound"][o]), 0.0, 1.0),
                         0.5 + 0.5 * np.sin(2 * math.pi * p["freq"][o] * proj + p["phase"][o]))
            img[sel] += (t[:, None] * (p["c1"] - p["c0"])[o]).astype(np.float32)
        return img

    def _order_weights(self, p: dict, shapes: np.ndarray) -> np.ndarray:
        """:func:`order_weights` of the whole shapes (n+1, H*W), coloured by :meth:`_appearance`."""
        obj, pix = np.nonzero(shapes)
        colour = np.zeros((*shapes.shape, 3))
        colour[obj, pix] = self._appearance(p, obj, pix)
        return order_weights(shapes, colour)


def order_weights(inside: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """float64 (m, m): w[i, j] = sum over the pixels both whole shapes cover of |colour_i - colour_j|^2.

    How much the order of objects i and j shows in the image (object ordering
    accuracy's weights). inside (m, P) bool or 0/1: each object's whole shape
    over P pixels; colour (m, P, 3) or (m, 3): the colour each object has at
    each pixel (only read inside its shape), or its one plain colour.
    """
    inside = np.asarray(inside, np.float64)
    colour = np.asarray(colour, np.float64)
    if colour.ndim == 2:
        colour = np.broadcast_to(colour[:, None, :], (*inside.shape, 3))
    colour = colour * inside[..., None]  # 0 outside each shape
    sq = np.einsum("ipc,ipc->ip", colour, colour)  # |colour_i|^2 at each pixel of shape i
    flat = colour.reshape(len(colour), -1)  # (m, P * 3)
    part = sq @ inside.T  # sum over the overlap of |colour_i|^2
    w = part + part.T - 2.0 * (flat @ flat.T)
    np.fill_diagonal(w, 0.0)
    return np.maximum(w, 0.0)  # rounding below zero
