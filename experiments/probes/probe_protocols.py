#!/usr/bin/env python
"""Which frozen-feature protocol lets pre-training beat random init on the scene probes? (docs/evaluation.md)

`gmae probe --data sprites` finds that no pre-trained tiny encoder beats its random initialisation on the
semantic tasks (count, shape of the largest object). Before concluding that the features are the problem, this
script tries the other frozen-feature read-outs the field uses, on the same labels and splits
(gmae.data.scenes: train seed 3001, val 3002), with every setting fixed before any result was seen:

* ``linear cls`` / ``linear avg``: gmae probe's BN + linear probe (SGD, 100 epochs) on the cls token / the mean
  patch token after the final norm (the library's two pools);
* ``linear best block``: the same probe on each block's cls and mean token (before the final norm, except the
  last); the best of the 12 read-outs on val (an upper bound, chosen on val: it flatters every encoder alike);
* ``linear all blocks``: on the concatenation of every block's mean token (DINO's multi-block read-out);
* ``attentive``: a learned query cross-attending over the final patch tokens (LayerNorm, 4 heads, linear head;
  AdamW lr 1e-3, wd 0.05, one-cycle, 60 epochs of batch 128), the "attentive probe" of CAE / AIM / V-JEPA, which
  can count and pick out the largest object where a pooled linear read-out cannot;
* ``shape at point`` (a task, not a read-out): the shape class of the object under a marked patch (a patch
  covered more than half by one shape), read by the linear probe from that patch token, so a local feature can
  answer it.

    python experiments/probes/probe_protocols.py runs/probe/gmae-sprites-s0 runs/probe/mae-sprites-s0 \\
        runs/probe-4000/gmae-sprites-s0 runs/probe-4000/mae-sprites-s0 --threads 1

Each RUN is a run folder or checkpoint (its newest checkpoint); the random-init column is the first run's
architecture at its run's initial weights (gmae.io.loader.load(RUN, "model", initial=True)). Prints one markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gmae.data.scenes import MAJORITY, patch_cover, scene_labels, task_targets
from gmae.evaluate.probe import linear_probe
from gmae.io.loader import load

TRAIN, VAL = 2000, 1000
_POINT_TAG = 0x5A17  # the shape-at-point marks' rng, apart from the scene probes' own


def shape_at_point(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch index, shape class or -1) per image: a random patch held by one shape, and that shape's class."""
    source = labels.source()
    points, classes = [], []
    for i in range(len(labels)):
        sample = source.sample(i)
        cover = patch_cover(sample.objects.numpy(), sample.num_objects, labels.patch_size)
        owner = np.where(cover.max(0) > MAJORITY, cover.argmax(0), -1)
        held = np.flatnonzero(owner >= 1)  # 0 is the background plane
        if not held.size:
            points.append(0), classes.append(-1)
            continue
        p = int(np.random.default_rng([labels.seed, i, _POINT_TAG]).choice(held))
        points.append(p), classes.append(int(sample.shapes[owner[p]]) - 1)
    return torch.tensor(points), torch.tensor(classes)


@torch.no_grad()
def features(encoder, labels, points: torch.Tensor) -> dict:
    """Every read-out's features of one split: per-block cls and mean tokens, the final tokens, the marked token."""
    source = labels.source()
    per_block, final, marked = [], [], []
    for start in range(0, len(labels), 128):
        stop = min(len(labels), start + 128)
        imgs = torch.stack([source.load(i) for i in range(start, stop)])
        x = encoder.patch_embed(encoder.normalize(imgs)) + encoder.pos_embed[:, 1:, :]  # (B, N, D), no masking
        cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(len(imgs), -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        blocks = []
        for block in encoder.blocks:
            x = block(x)
            blocks.append(x)
        blocks[-1] = encoder.norm(x)  # the last block's read-out is the encoder's output
        per_block.append(torch.stack([torch.stack([b[:, 0], b[:, 1:].mean(1)], 1) for b in blocks], 1))  # (B, L, 2, D)
        final.append(blocks[-1][:, 1:])
        marked.append(blocks[-1][torch.arange(stop - start), 1 + points[start:stop]])
    return {"blocks": torch.cat(per_block), "tokens": torch.cat(final), "marked": torch.cat(marked)}


class AttentiveProbe(nn.Module):
    """One learned query cross-attending over frozen tokens, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, classes)
        x = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(len(x), -1, -1), x, x)
        return self.head(pooled[:, 0])


def attentive_probe(train_f, train_y, val_f, val_y, num_classes, epochs=60, batch=128, lr=1e-3, seed=0) -> float:
    torch.manual_seed(seed)
    probe = AttentiveProbe(train_f.shape[-1], num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.05)
    n = len(train_f)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-n // batch))
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            loss = F.cross_entropy(probe(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (probe(val_f).argmax(1) == val_y).float().mean().item()


def scores(ft: dict, fv: dict, targets: dict) -> dict:
    """{(read-out, task): val accuracy} of one encoder."""
    out = {}
    for task in ("count", "shape"):
        ty, vy, nc = targets[task]
        blocks_t, blocks_v = ft["blocks"], fv["blocks"]
        out["linear cls", task] = linear_probe(blocks_t[:, -1, 0], ty, blocks_v[:, -1, 0], vy, nc)
        out["linear avg", task] = linear_probe(blocks_t[:, -1, 1], ty, blocks_v[:, -1, 1], vy, nc)
        out["linear best block", task] = max(
            linear_probe(blocks_t[:, b, j], ty, blocks_v[:, b, j], vy, nc)
            for b in range(blocks_t.shape[1]) for j in (0, 1))
        out["linear all blocks", task] = linear_probe(blocks_t[:, :, 1].flatten(1), ty, blocks_v[:, :, 1].flatten(1),
                                                      vy, nc)
        out["attentive", task] = attentive_probe(ft["tokens"], ty, fv["tokens"], vy, nc)
    ty, vy, nc = targets["shape at point"]
    tk, vk = ty >= 0, vy >= 0
    out["linear marked token", "shape at point"] = linear_probe(ft["marked"][tk], ty[tk], fv["marked"][vk], vy[vk], nc)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders or checkpoints, all of one architecture")
    p.add_argument("--data", default="sprites", choices=["sprites", "deadleaves"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = {}
    for run in args.runs:
        model, mcfg, _ = load(run, "model")
        encoders[str(Path(run))] = model.encoder.eval()
    first, mcfg, _ = load(args.runs[0], "model", initial=True)
    encoders["random init"] = first.encoder.eval()
    train = scene_labels(args.data, "train", mcfg.img_size, mcfg.patch_size, TRAIN, progress=False)
    val = scene_labels(args.data, "val", mcfg.img_size, mcfg.patch_size, VAL, progress=False)
    tp, tsy = shape_at_point(train)
    vp, vsy = shape_at_point(val)
    targets = {}
    for task in ("count", "shape"):
        ty, vy, nc, _ = task_targets(task, train, val)
        targets[task] = (torch.from_numpy(ty), torch.from_numpy(vy), nc)
    targets["shape at point"] = (tsy, vsy, int(tsy.max()) + 1)
    chance = {}
    for task, (ty, vy, nc) in targets.items():
        majority = torch.bincount(ty[ty >= 0], minlength=nc).argmax()
        chance[task] = (vy[vy >= 0] == majority).float().mean().item()
    found = {}
    for name, encoder in encoders.items():
        print(f"{name} ...", flush=True)
        found[name] = scores(features(encoder, train, tp), features(encoder, val, vp), targets)
    names = list(encoders)
    print(f"\n{args.data}, {TRAIN} train / {VAL} val images; val accuracy in %\n")
    print("| read-out | task | " + " | ".join(names) + " | chance |")
    print("|---|---|" + "---:|" * (len(names) + 1))
    for key in found[names[0]]:
        print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{100 * found[n][key]:.1f}" for n in names)
              + f" | {100 * chance[key[1]]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
