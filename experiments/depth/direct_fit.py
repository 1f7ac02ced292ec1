#!/usr/bin/env python
"""Direct-fit harness: does a depth mechanism put occluders in front when nothing but one image is fitted?

No network: each seed's k Gaussians are free parameters (raw 14-d vectors through
GMAE's own activations, camera and rasterizer) fitted to one image with Adam.
Seeds run as one batch, so a screen of a mechanism takes seconds. Scenes:

* ``disc``: a red disc (radius ``--radius`` x size) in the middle of a blue
  background plane, drawn on top of it. The disc should end up in front.
* ``deadleaves``: dead-leaves image i (seed 0) for seed i, the training data.

Scored with `gmae.evaluate.depth` (the same metrics as `gmae eval-zeroshot`):
``depth_pair_acc`` (for the disc: the fraction of (disc, background) Gaussian
pairs with the disc's Gaussian nearer; 0.5 = chance) and ``depth_rank_spearman``,
with the border-distance prior beside them, plus the final MSE.

    python experiments/depth/direct_fit.py --scene disc --depth-grad swap --max-scale 4 -k 8
    python experiments/depth/direct_fit.py --scene disc --fixed-std 4.8     # the control: fixed 4.8-px blobs

Prints one line per setting (``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from gmae.data import DeadLeaves
from gmae.evaluate.depth import DepthTruth, depth_metrics
from gmae.model.loss import pixel_curvature
from gmae.model.gmae import gaussian_stats, gaussians_from_raw
from gmae.model.vit import patchify
from gmae.render import RenderSettings, get_camera, project
from gmae.render.gaussians import render_gaussians


def disc_scene(size: int, radius: float):
    """(image (3, S, S), DepthTruth): blue plane (object 0), red disc (object 1) on top."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (radius * size) ** 2
    objects = disc.astype(int)
    image = np.zeros((3, size, size), np.float32)
    image[2] = 1.0
    image[:, disc] = np.array([1.0, 0.0, 0.0], np.float32)[:, None]
    return torch.from_numpy(image), DepthTruth(objects, np.ones((2, 2), bool))


def disc_in_front(gs, size: int, camera: str) -> tuple[float, int]:
    """Disc scene, Gaussians told apart by colour: over (red, blue) pairs of opacity > 0.3 that overlap
    (either one's alpha at the other's centre > 0.1), the fraction with the red one nearer; and the count."""
    means2d, conics, depths = project(camera, gs.means, gs.scales, gs.quats, size, size)
    right, total = 0.0, 0
    for b in range(gs.means.shape[0]):
        red = (gs.colors[b, :, 0] > gs.colors[b, :, 2]) & (gs.opacities[b] > 0.3)
        blue = (gs.colors[b, :, 2] >= gs.colors[b, :, 0]) & (gs.opacities[b] > 0.3)
        d = means2d[b][:, None, :] - means2d[b][None, :, :]  # d[i, j] = centre i - centre j
        a, c2, c = conics[b][None, :, 0], conics[b][None, :, 1], conics[b][None, :, 2]
        alpha_at = gs.opacities[b][None, :] * torch.exp(-0.5 * (a * d[..., 0] ** 2 + 2 * c2 * d[..., 0] * d[..., 1]
                                                                 + c * d[..., 1] ** 2))  # j's alpha at centre i
        overlap = (alpha_at > 0.1) | (alpha_at.T > 0.1)
        pairs = red[:, None] & blue[None, :] & overlap
        z = depths[b]
        right += float(((z[:, None] < z[None, :]) & pairs).sum() + 0.5 * ((z[:, None] == z[None, :]) & pairs).sum())
        total += int(pairs.sum())
    return (right / total if total else float("nan")), total


def deadleaves_scene(size: int, index: int, leaves: tuple[int, int] = (8, 40)):
    s = DeadLeaves(size, seed=0, min_shapes=leaves[0], max_shapes=leaves[1]).sample(index)
    return s.image, DepthTruth(s.objects.numpy(), s.overlaps.numpy())


def fit(args, seeds: list[int]) -> dict:
    size = args.size
    scenes = [disc_scene(size, args.radius) if args.scene == "disc" else deadleaves_scene(size, s, args.leaves)
              for s in seeds]
    target = torch.stack([im for im, _ in scenes])  # (B, 3, S, S)
    B = len(seeds)
    g = torch.Generator().manual_seed(args.init_seed)
    raw = torch.randn(B, args.k, 14, generator=g) * args.init_std
    # each seed its own random init (seed s -> its own generator)
    for i, s in enumerate(seeds):
        raw[i] = torch.randn(args.k, 14, generator=torch.Generator().manual_seed(1000 + s)) * args.init_std
    raw.requires_grad_()
    camera = get_camera(args.camera)
    opt = torch.optim.Adam([raw], lr=args.lr)
    background = torch.ones(3)
    # every pixel counts (no masking): curvature of the mean squared error over the image
    p = size // 8
    mask = torch.ones(B, (size // p) ** 2)
    curvature = pixel_curvature(mask, "all", p, 3)
    tau = args.tau if args.depth_grad == "swap" else 0.0
    for _ in range(args.steps):
        gs = gaussians_from_raw(raw, args.max_scale, camera.scale_unit, args.depth_param)
        if args.fixed_std:  # the control: every Gaussian a round blob of this std in pixels
            world = args.fixed_std / (size / 2) * (camera.scale_unit / get_camera("orthographic").scale_unit)
            gs.scales = torch.full_like(gs.scales, world)
        image, _ = render_gaussians(gs, size, size, background,
                                    RenderSettings(backend=args.backend, camera=args.camera, depth_tau=tau),
                                    curvature if tau > 0 else None)
        loss = ((patchify(image, p) - patchify(target, p)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gs = gaussians_from_raw(raw, args.max_scale, camera.scale_unit, args.depth_param)
        if args.fixed_std:
            gs.scales = torch.full_like(gs.scales, world)
        means2d, conics, _ = project(args.camera, gs.means, gs.scales, gs.quats, size, size)
        found = [(gs.means[i].numpy(), gs.opacities[i].numpy(), (means2d[i] / size).numpy(),
                  (conics[i] * size**2).numpy()) for i in range(B)]
        per_seed = [depth_metrics([found[i]], [scenes[i][1]]) for i in range(B)]
        pooled = depth_metrics(found, [t for _, t in scenes])
        stats = gaussian_stats(gs, args.max_scale, camera.scale_unit)
        front = disc_in_front(gs, size, args.camera) if args.scene == "disc" else (float("nan"), 0)
    return {
        "touching_pair_acc": pooled["depth_pair_acc_touching"], "touching_pairs": pooled["depth_pairs_touching"],
        "red_in_front": front[0], "red_blue_pairs": front[1],
        "loss": loss.item(),
        "pair_acc": pooled["depth_pair_acc"], "spearman": pooled["depth_rank_spearman"],
        "prior_pair_acc": pooled["border_prior"]["depth_pair_acc"],
        "prior_spearman": pooled["border_prior"]["depth_rank_spearman"],
        "per_seed_pair_acc": [round(m["depth_pair_acc"], 3) for m in per_seed],
        "seeds_right": sum(m["depth_pair_acc"] > 0.5 for m in per_seed if not math.isnan(m["depth_pair_acc"])),
        "seeds": B, **{k: round(v, 3) for k, v in stats.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", choices=("disc", "deadleaves"), default="disc")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--radius", type=float, default=0.25, help="disc radius as a fraction of the size")
    p.add_argument("-k", type=int, default=8, help="Gaussians per image")
    p.add_argument("--leaves", type=int, nargs=2, default=(8, 40), metavar=("MIN", "MAX"),
                   help="dead-leaves scene: leaves per image (default 8 40, the training data's)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--init-std", type=float, default=1.0, help="std of the raw parameters at the start")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--camera", default="orthographic")
    p.add_argument("--depth-grad", choices=("off", "swap"), default="off")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--depth-param", choices=("bounded", "linear"), default="bounded")
    p.add_argument("--max-scale", type=float, default=1.0, help="c")
    p.add_argument("--fixed-std", type=float, default=0.0, help="fix every Gaussian to this std in pixels (0: free)")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = fit(args, list(range(args.seeds)))
    setting = {k: getattr(args, k) for k in ("scene", "k", "camera", "depth_grad", "tau", "depth_param",
                                             "max_scale", "fixed_std", "steps")}
    if args.json:
        print(json.dumps({**setting, **result}))
    else:
        print(" ".join(f"{k}={v}" for k, v in setting.items()))
        print(f"  loss {result['loss']:.4f}  touching {result['touching_pair_acc']:.3f} ({result['touching_pairs']})"
              f"  red_in_front {result['red_in_front']:.3f} ({result['red_blue_pairs']} pairs)"
              f"  pair_acc {result['pair_acc']:.3f} (prior {result['prior_pair_acc']:.3f})"
              f"  spearman {result['spearman']:.3f} (prior {result['prior_spearman']:.3f})"
              f"  seeds right {result['seeds_right']}/{result['seeds']}  per seed {result['per_seed_pair_acc']}"
              f"  scale_at_cap {result['scale_at_cap']}  depth_spread {result['depth_spread']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
