#!/usr/bin/env python
"""Which Gaussian pairs does a model order wrongly, and what does the loss itself prefer?

For a checkpoint, over held-out dead-leaves images (the seed of `gmae eval-zeroshot`):

* the model's order on the *touching* pairs (footprints overlap; Gaussians on two
  different leaves whose whole shapes overlap) split by what the pair is: one of
  them on the background plane or two leaves; the Gaussian on the nearer leaf
  larger or smaller on screen than the other; the nearer leaf whole (>= 95% of
  it visible) or itself partly hidden;
* the **swap vote** of each such pair: summed over the pixels where the two are
  consecutive contributors, the exact loss change of swapping them (the quantity
  the depth-order gradient follows; loss = MSE on every pixel). A negative sum
  means the loss prefers the other order. Reported: how often the loss prefers
  the true occlusion order, and how often the model's order is the one the loss
  prefers (1.0: the model sits where the loss wants it, whatever the truth).

    python experiments/depth/depth_diagnose.py runs/depth/ortho-swap-all25 [--num-images 50]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np
import torch

from gmae.data import DeadLeaves
from gmae.evaluate.depth import MIN_OPACITY, touching
from gmae.evaluate.zeroshot import EVAL_SEED
from gmae.render import RenderSettings, project
from gmae.render.contract import TILE
from gmae.render.reference import bin_into_tiles, contributions, exclusive_transmittance, tile_ranges, to_tiles
from gmae.io.loader import load
from gmae.readouts.core import Canvas, gaussians_of, render_subsets


def pair_votes(means2d, conics, colors, opacities, depths, target, background):
    """(K, K) summed loss change of swapping i (in front) and j where they are consecutive contributors.

    One image; MSE over all pixels (g = 2(C - target)/n, h = 2/n). Uses the torch oracle's own pieces.
    """
    K = means2d.shape[0]
    H, W = target.shape[-2:]
    order = torch.argsort(depths, stable=True)
    m, c, col, o = means2d[order], conics[order], colors[order], opacities[order]
    tiles_x, tiles_y = -(-W // TILE), -(-H // TILE)
    x0, x1, y0, y1, keep = tile_ranges(m, c, o, tiles_x, tiles_y, col, depths[order])
    gids, starts, counts = bin_into_tiles(x0, x1, y0, y1, keep, K, tiles_x, tiles_y, 1)
    # the render, to get g = dL/dC
    image = render_one(means2d, conics, colors, opacities, depths, H, W, background)
    n = target.numel()
    g = to_tiles((2.0 * (image - target) / n)[None], tiles_x, tiles_y)
    lin = torch.arange(TILE * TILE)
    votes = torch.zeros(K, K, dtype=torch.float64)
    for t in range(tiles_x * tiles_y):
        cnt = int(counts[t])
        if cnt < 2:
            continue
        gid = gids[starts[t]: starts[t] + cnt][None]
        present = torch.ones(1, cnt, dtype=torch.bool)
        px = ((t % tiles_x) * TILE + lin % TILE + 0.5).double()[None]
        py = ((t // tiles_x) * TILE + lin // TILE + 0.5).double()[None]
        alpha, t_incl = contributions(m.double(), c.double(), o.double(), gid, present, px, py, 0.99)
        t_before = exclusive_transmittance(t_incl)
        a, tb = alpha[0], t_before[0]  # (M, P)
        for p in range(TILE * TILE):
            idx = torch.nonzero(a[:, p] > 0).flatten()
            for u, v in zip(idx[:-1], idx[1:]):
                i, j = int(gid[0, u]), int(gid[0, v])
                delta = tb[u, p] * a[u, p] * a[v, p] * (col[j].double() - col[i].double())
                change = (g[t, :, p].double() * delta).sum() + 0.5 * (2.0 / n) * (delta * delta).sum()
                votes[order[i], order[j]] += change
    return votes


def render_one(means2d, conics, colors, opacities, depths, H, W, background):
    from gmae.render import rasterize

    image, _ = rasterize(means2d[None], conics[None], colors[None], opacities[None], depths[None], height=H,
                         width=W, background=background, settings=RenderSettings(backend="torch"))
    return image[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint or run folder")
    p.add_argument("--num-images", type=int, default=30)
    p.add_argument("--no-votes", action="store_true", help="skip the (slow, pure-Python) swap votes")
    args = p.parse_args(argv)
    model, mcfg, _ = load(args.checkpoint, "model")
    size = mcfg.img_size
    source = DeadLeaves(size, seed=EVAL_SEED)
    canvas = Canvas.of(model)
    buckets = defaultdict(lambda: [0.0, 0])
    vote_truth = defaultdict(lambda: [0, 0])  # per bucket: the loss prefers the true order
    vote_model = [0, 0]
    for index in range(args.num_images):
        s = source.sample(index)
        g = gaussians_of(model, s.image[None])
        with torch.no_grad():
            means2d, conics, depths = project(canvas.settings.camera, g.means, g.scales, g.quats, size, size,
                                              pixel_origin=canvas.settings.pixel_origin)
        m2, con, z = means2d[0], conics[0], g.means[0, :, 2]
        objects = s.objects.numpy()
        px, py = m2[:, 0].numpy(), m2[:, 1].numpy()
        ok = (g.opacities[0].numpy() > MIN_OPACITY) & (px >= 0) & (px < size) & (py >= 0) & (py < size)
        obj = np.full(len(px), -1)
        obj[ok] = objects[py[ok].astype(int), px[ok].astype(int)]
        touch = touching(m2.double().numpy(), con.double().numpy())
        area = np.sqrt(1.0 / np.clip(con[:, 0].numpy() * con[:, 2].numpy() - con[:, 1].numpy() ** 2, 1e-12, None))
        visible = np.bincount(objects.ravel(), minlength=s.num_objects)
        shapes = source.whole_shapes(index)
        whole = shapes.sum(1)
        votes = None
        if not args.no_votes:
            votes = pair_votes(m2, con, g.colors[0], g.opacities[0], depths[0], s.image, model.background)
        for i in range(len(px)):
            for j in range(len(px)):
                a, b = obj[i], obj[j]
                if not (ok[i] and ok[j] and touch[i, j] and a > b and s.overlaps[a, b]):
                    continue  # i sits on the nearer leaf a, j on the farther b
                right = float(z[i] < z[j]) + 0.5 * float(z[i] == z[j])
                kind = "background pair" if b == 0 else "leaf pair"
                size_rel = "near Gaussian larger" if area[i] > area[j] else "near Gaussian smaller"
                whole_near = "near leaf whole" if visible[a] >= 0.95 * whole[a] else "near leaf partly hidden"
                for key in ("all", kind, size_rel, whole_near):
                    buckets[key][0] += right
                    buckets[key][1] += 1
                if votes is not None:
                    # loss change of the model's order swapped; in front = the smaller depth
                    front, back = (i, j) if z[i] < z[j] else (j, i)
                    v = votes[front, back].item()
                    if v != 0.0:
                        prefers_current = v > 0  # swapping would raise the loss
                        loss_front = front if prefers_current else back
                        for key in ("all", kind, size_rel, whole_near):
                            vote_truth[key][0] += loss_front == i
                            vote_truth[key][1] += 1
                        vote_model[0] += prefers_current
                        vote_model[1] += 1
    print(f"{args.checkpoint}: {args.num_images} images, touching pairs on overlapping leaves")
    for key, (right, n) in sorted(buckets.items()):
        line = f"  {key:24s} model order right {right / max(n, 1):.3f} ({n:5d} pairs)"
        if key in vote_truth:
            agree, m = vote_truth[key]
            line += f"   swap vote for the true order {agree / m:.3f} ({m:5d} pairs that meet)"
        print(line)
    if vote_model[1]:
        print(f"  the swap vote keeps the model's own order on {vote_model[0] / vote_model[1]:.3f} of the pairs that meet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
