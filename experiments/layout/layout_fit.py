#!/usr/bin/env python
"""Layout harness: can GMAE's decoder place its Gaussians per image when a fixed layout is clearly worse?

The decoder sees the whole image (mask ratio 0) and is trained on every pixel, on sprites of few shapes
(``--shapes 1 1``: one shape) with few Gaussians (``-k 4``), where a fixed layout cannot cover a shape that
moves but k Gaussians placed on it can. Three fits of the same held-out images, in PSNR of the full render:

* ``net``: the GMAE model trained end to end (its decoder may place each image's Gaussians where it likes);
* ``fixed``: the same model with every Gaussian's (x, y) replaced by a learned constant (the best fixed
  layout it can learn; colour, size, opacity and depth still come from the image);
* ``direct``: no network: each held-out image's k Gaussians optimised on that image alone with Adam (what
  per-image placement can reach with these k Gaussians).

For ``net`` it also prints the layout figures (`gmae.readouts.layout`): spread ratio, depth-rank correlation,
edge follow. ``net`` at the level of ``fixed``, well below ``direct``, says the decoder does not use the image
to place its Gaussians even where that pays.

    python experiments/layout/layout_fit.py --mode net fixed direct --shapes 1 1 -k 4 --steps 1500
    python experiments/layout/layout_fit.py --mode net -k 8 --shapes 1 2 --set position_gain=4   # a ModelConfig option

One JSON line per mode with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from gmae.config import model_config
from gmae.data import EVAL_SEED, Sprites
from gmae.model import build_model
from gmae.readouts.core import Canvas
from gmae.readouts.layout import decode_in_query_order, fidelity, layout_figures
from gmae.render.gaussians import Gaussians
from gmae.model.gmae import gaussians_from_raw


def sprites(size: int, shapes: tuple[int, int], seed: int, n: int, start: int = 0) -> torch.Tensor:
    source = Sprites(size, seed=seed, min_shapes=shapes[0], max_shapes=shapes[1])
    return torch.stack([source.load(start + i, np.random.default_rng([seed, start + i])) for i in range(n)])


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def build(args) -> torch.nn.Module:
    overrides = dict(img_size=args.size, patch_size=args.patch, num_gaussians=args.k, loss="all", mask_ratio=0.0,
                     render_backend=args.backend)
    overrides.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
    torch.manual_seed(args.seed)
    return build_model(model_config("tiny", **overrides))


class FixedLayout(torch.nn.Module):
    """Wraps a GMAE: every Gaussian's (x, y) is a learned constant, the same for every image."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        g = torch.Generator().manual_seed(1)
        self.xy = torch.nn.Parameter(torch.rand(model.cfg.num_gaussians, 2, generator=g) * 1.6 - 0.8)
        decode = model.forward_decoder

        def forward_decoder(latent, ids_restore):
            out = decode(latent, ids_restore)
            xy = self.xy.expand(out.means.shape[0], -1, -1)
            return Gaussians(torch.cat([xy, out.means[..., 2:]], -1), out.scales, out.quats, out.colors,
                             out.opacities)

        model.forward_decoder = forward_decoder

    def forward(self, imgs, noise):
        return self.model(imgs, noise, mask_ratio=0.0)


def train(args, model, trainable) -> float:
    params = list(trainable.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    n = model.cfg.num_patches
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        imgs = sprites(args.size, tuple(args.shapes), args.seed, args.batch, start=step * args.batch)
        noise = torch.arange(n, dtype=torch.float32).expand(args.batch, n)
        loss = trainable(imgs, noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def direct(args, model, images) -> dict:
    """Each image's k Gaussians fitted to it alone, through the model's activations, camera and renderer."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(args.seed)
    raw = (torch.randn(images.shape[0], cfg.num_gaussians, 11 + cfg.in_chans, generator=g)).requires_grad_()
    opt = torch.optim.Adam([raw], lr=args.direct_lr)
    canvas = Canvas.of(model)
    for _ in range(args.direct_steps):
        gs = gaussians_from_raw(raw, cfg.max_scale, model.camera.scale_unit, cfg.depth_param, cfg.max_opacity,
                                cfg.rotation_param)
        loss = ((canvas.render(gs) - images) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gs = gaussians_from_raw(raw, cfg.max_scale, model.camera.scale_unit, cfg.depth_param, cfg.max_opacity,
                                cfg.rotation_param)
        render = canvas.render(gs).clamp(0, 1)
        mse = ((render - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        flat = ((images - images.mean((-2, -1), keepdim=True)) ** 2).flatten(1).mean(1)
        return {"psnr_full": float((-10 * torch.log10(mse)).mean()),
                "psnr_mean_colour": float((-10 * torch.log10(flat)).mean())}


def run(args, mode: str) -> dict:
    torch.set_num_threads(args.threads)
    model = build(args)
    held = sprites(args.size, tuple(args.shapes), EVAL_SEED, args.eval_images)
    result: dict = {"mode": mode, "k": args.k, "shapes": list(args.shapes), "steps": args.steps, "set": args.set}
    if mode == "direct":
        t0 = time.perf_counter()
        result.update(direct(args, model, held))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return result
    trainable = FixedLayout(model) if mode == "fixed" else _Net(model)
    result["seconds"] = round(train(args, model, trainable), 1)
    with torch.no_grad():
        g = decode_in_query_order(model, held)
        result.update(fidelity(model, held, g))
        result.update(layout_figures(g, held, model.cfg.camera, model.cfg.pixel_origin))
        if args.figure:
            save_figure(model, held, g, f"{args.figure}_{mode}.png")
    return result


def save_figure(model, images, g, path: str) -> None:
    """Rows: the held-out images, the renders, and the Gaussians' centres on the image (numbered by query)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmae.render.camera import project

    n = min(8, images.shape[0])
    render = Canvas.of(model).render(g).clamp(0, 1)
    size = images.shape[-1]
    means2d, _, depths = project(model.cfg.camera, g.means, g.scales, g.quats, size, size)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5))
    for i in range(n):
        axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(render[i].permute(1, 2, 0).numpy())
        axes[2, i].imshow(images[i].permute(1, 2, 0).numpy() * 0.4 + 0.6)
        order = torch.argsort(depths[i]).tolist()
        for rank, q in enumerate(order):
            x, y = means2d[i, q].tolist()
            axes[2, i].scatter([x - 0.5], [y - 0.5], s=(12 + 60 * float(g.opacities[i, q])) * min(1.0, 8.0 / g.num),
                               c=[g.colors[i, q].clamp(0, 1).tolist()],
                               edgecolors="k", linewidths=0.5)
            if g.num <= 16:
                axes[2, i].annotate(f"{q}", (x - 0.5, y - 0.5), fontsize=6)
        for r in range(3):
            axes[r, i].set_xticks([]); axes[r, i].set_yticks([])
            axes[r, i].set_xlim(-0.5, size - 0.5); axes[r, i].set_ylim(size - 0.5, -0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Net(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs, noise):
        return self.model(imgs, noise, mask_ratio=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", nargs="+", choices=("net", "fixed", "direct"), default=["net", "fixed", "direct"])
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--shapes", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--direct-steps", type=int, default=600)
    p.add_argument("--direct-lr", type=float, default=0.05)
    p.add_argument("--eval-images", type=int, default=32)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig fields (tiny preset's "
                   "otherwise; the loss is all pixels and nothing is masked)")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", metavar="PREFIX", help="write PREFIX_MODE.png: held-out images, renders, centres")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for mode in args.mode:
        r = run(args, mode)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            figures = "" if mode == "direct" else (f"  spread ratio {r['layout_spread_ratio']:.3f}  rank corr "
                                                  f"{r['depth_rank_corr']:.3f}  edge follow {r['edge_follow']:+.3f}")
            print(f"{mode:6s} k={args.k} shapes={tuple(args.shapes)} {' '.join(args.set)}: PSNR {r['psnr_full']:.2f} "
                  f"(mean colour {r['psnr_mean_colour']:.2f}){figures}  [{r['seconds']} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
