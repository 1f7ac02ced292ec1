"""The gsplat backend's glue, on the CPU: what gmae.render.cuda gives gsplat's `isect_tiles` / `isect_offset_encode`.

gsplat is not a test dependency (it compiles CUDA code on first use), so its two pure-torch reference functions are
written out below from gsplat 1.5.3's source, vectorised: `_isect_tiles` (gsplat/cuda/_torch_impl.py, lines
378-474) and `_isect_offset_encode` (same file, lines 477-503). Where gsplat is installed and its pure-torch module
imports, they are also checked against gsplat's own.

Checked: the radii layout ((B, K, 2) int32, x then y, 0 for culled), the rank sort key (positive float32, the stable
depth order, ties in index order), and that the tile lists gsplat builds from them (counts, offsets, order) hold every
Gaussian of gmae's own lists (the oracle's), in the same front-to-back order.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from gmae.render.contract import TILE, footprint
from gmae.render.gsplat_glue import isect_inputs
from gmae.render.reference import sort_and_bin
from render_scenes import make_scene


def ref_isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height):
    """gsplat 1.5.3 `_isect_tiles(..., sort=True)` (gsplat/cuda/_torch_impl.py:378-474), for (I, N) inputs.

    Tile box [floor(m/ts - r/ts), ceil(m/ts + r/ts)) clamped to the grid; a Gaussian with any radius <= 0 is
    skipped; isect_id = (image << tile_bits | tile) << 32 | the depth's float32 bits (zero-extended); sorted.
    """
    I, N = means2d.shape[:2]
    mins = torch.floor(means2d / tile_size - radii / tile_size).int()
    maxs = torch.ceil(means2d / tile_size + radii / tile_size).int()
    for t in (mins, maxs):
        t[..., 0] = t[..., 0].clamp(0, tile_width)
        t[..., 1] = t[..., 1].clamp(0, tile_height)
    tiles_per_gauss = (maxs - mins).prod(dim=-1) * (radii > 0).all(dim=-1)
    tile_n_bits = (tile_width * tile_height).bit_length()
    assert I.bit_length() + tile_n_bits + 32 <= 64
    depth_bits = depths.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ids, flat = [], []
    for i in range(I):
        for n in range(N):
            if radii[i, n, 0] <= 0 or radii[i, n, 1] <= 0:
                continue
            for y in range(int(mins[i, n, 1]), int(maxs[i, n, 1])):
                for x in range(int(mins[i, n, 0]), int(maxs[i, n, 0])):
                    ids.append((((i << tile_n_bits) | (y * tile_width + x)) << 32) | int(depth_bits[i, n]))
                    flat.append(i * N + n)
    isect_ids = torch.tensor(ids, dtype=torch.int64)
    flatten_ids = torch.tensor(flat, dtype=torch.int32)
    isect_ids, perm = torch.sort(isect_ids)
    return tiles_per_gauss.int(), isect_ids, flatten_ids[perm]


def ref_isect_offset_encode(isect_ids, I, tile_width, tile_height):
    """gsplat 1.5.3 `_isect_offset_encode` (gsplat/cuda/_torch_impl.py:477-503): (I, tile_height, tile_width) int32,
    each tile's first entry in the sorted intersection list."""
    tile_n_bits = (tile_width * tile_height).bit_length()
    counts = torch.zeros(I, tile_height, tile_width, dtype=torch.int64)
    uq, n = torch.unique_consecutive(isect_ids >> 32, return_counts=True)
    tiles = uq & ((1 << tile_n_bits) - 1)
    counts[uq >> tile_n_bits, tiles // tile_width, tiles % tile_width] = n
    return (torch.cumsum(counts.flatten(), 0).reshape_as(counts) - counts).int()


def glue_scene():
    """Random Gaussians (some off-screen, some thin) with every kind of culled one and tied depths."""
    means, conics, colors, opac, depths = make_scene(batch=2, k=20, height=40, width=56, std=(0.5, 9.0), seed=3)
    depths[0, :6] = -1.0  # ties, in front: index order decides
    conics[0, 6] = torch.tensor([1.0, 2.0, 1.0])  # det < 0
    opac[0, 7] = 0.001  # can never reach 1/255
    colors[1, 3, 0] = float("nan")
    depths[1, 4] = float("inf")
    means[1, 5] = torch.tensor([1e4, -1e4])  # far off-screen
    return [means, conics, colors, opac, depths]


def test_radii_layout_and_culling():
    scene = glue_scene()
    radii, keys, tile, tiles_x, tiles_y = isect_inputs(*scene, height=40, width=56)
    assert (tile, tiles_x, tiles_y) == (TILE, 4, 3)
    assert radii.shape == (2, 20, 2) and radii.dtype == torch.int32
    rx, ry, keep = footprint(scene[1], scene[3], scene[0], scene[2], scene[4])
    # per axis, x then y: the opacity-aware half-extent rounded up (never below it), 0 where culled
    assert torch.equal(radii[..., 0], torch.where(keep, rx.ceil(), torch.zeros_like(rx)).int())
    assert torch.equal(radii[..., 1], torch.where(keep, ry.ceil(), torch.zeros_like(ry)).int())
    assert not keep[0, 6] and not keep[0, 7] and not keep[1, 3] and not keep[1, 4]
    assert (radii[keep] > 0).all() and (radii[~keep] == 0).all()
    thin = torch.tensor([[[5.0, 5.0]]]), torch.tensor([[[1 / 100.0, 0.0, 1.0]]])  # sigma_x 10 px, sigma_y 1 px
    r, *_ = isect_inputs(thin[0], thin[1], torch.ones(1, 1, 3), torch.ones(1, 1), torch.zeros(1, 1), 32, 32)
    assert r[0, 0, 0] > 5 * r[0, 0, 1]


def test_sort_keys_are_the_stable_depth_rank():
    scene = glue_scene()
    _, keys, *_ = isect_inputs(*scene, height=40, width=56)
    assert keys.dtype == torch.float32 and (keys > 0).all()
    depths = scene[4]
    assert torch.equal(torch.argsort(keys, dim=1), torch.argsort(depths, dim=1, stable=True))
    assert torch.equal(keys[0, :6], torch.arange(1.0, 7.0))  # six tied depths in front: index order
    assert torch.equal(keys.sort(dim=1).values, torch.arange(1.0, 21.0).expand(2, 20))  # distinct, exact


def test_gsplat_tile_lists_hold_gmaes_lists_in_order():
    scene = glue_scene()
    B, K = scene[4].shape
    radii, keys, tile, tiles_x, tiles_y = isect_inputs(*scene, height=40, width=56)
    per_gauss, isect_ids, flatten_ids = ref_isect_tiles(scene[0], radii, keys, tile, tiles_x, tiles_y)
    offsets = ref_isect_offset_encode(isect_ids, B, tiles_x, tiles_y)
    assert offsets.shape == (B, tiles_y, tiles_x) and offsets.dtype == torch.int32
    assert per_gauss.sum() == len(flatten_ids) and (per_gauss[radii.eq(0).any(-1)] == 0).all()
    # gmae's own per-tile lists (the oracle's binning), as input indices b*K + k
    order, _, gids, starts, counts = sort_and_bin(*scene, torch.float32, tiles_x, tiles_y)
    to_input = (order + torch.arange(B)[:, None] * K).reshape(-1)
    ends = torch.cat([offsets.flatten()[1:].long(), torch.tensor([len(flatten_ids)])])
    for t, (lo, hi) in enumerate(zip(offsets.flatten().tolist(), ends.tolist())):
        theirs = flatten_ids[lo:hi].long()
        assert (theirs // K == t // (tiles_x * tiles_y)).all()  # the tile's image
        assert torch.equal(theirs, theirs[torch.argsort(keys.flatten()[theirs], stable=True)])  # front to back
        ours = to_input[gids[starts[t]:starts[t] + counts[t]]]
        position = {int(g): i for i, g in enumerate(theirs)}
        assert all(int(g) in position for g in ours), f"tile {t}: gsplat's list lacks a Gaussian gmae draws"
        assert [position[int(g)] for g in ours] == sorted(position[int(g)] for g in ours)  # the same order
    assert counts.sum() > 20  # lists worth comparing


def test_reference_matches_gsplats_own_pure_torch_functions():
    """Where gsplat is installed: its `_torch_impl.py` loaded as a file (gsplat's package __init__ would load its
    CUDA build), and compared with the reference above."""
    spec = importlib.util.find_spec("gsplat")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gsplat is not installed; the reference above is written from its source (1.5.3)")
    path = Path(spec.submodule_search_locations[0]) / "cuda" / "_torch_impl.py"
    try:
        file_spec = importlib.util.spec_from_file_location("gsplat_torch_impl", path)
        impl = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(impl)
    except Exception as exc:  # noqa: BLE001  a version without the file, or with other imports
        pytest.skip(f"gsplat's {path} does not load on its own: {type(exc).__name__}: {exc}")
    scene = glue_scene()
    radii, keys, tile, tiles_x, tiles_y = isect_inputs(*scene, height=40, width=56)
    ours = ref_isect_tiles(scene[0], radii, keys, tile, tiles_x, tiles_y)
    theirs = impl._isect_tiles(scene[0], radii, keys, tile, tiles_x, tiles_y, sort=True)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.long(), b.long())
    assert torch.equal(ref_isect_offset_encode(ours[1], 2, tiles_x, tiles_y),
                       impl._isect_offset_encode(theirs[1], 2, tiles_x, tiles_y))
    assert math.isfinite(float(keys.max()))
