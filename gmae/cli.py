"""The `gmae` command: pretrain, reconstruct, info, export, bench.

Each sub-command is one small function; mistakes a user can make are raised as
GMAEError and printed as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import LOSSES, MODELS, PRESETS, TrainConfig, as_dict, model_config, train_config
from .errors import GMAEError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _background(text: str) -> tuple[float, ...]:
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5)}
    if text in named:
        return named[text]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected white, black, grey or R,G,B in [0,1]; got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"background values must be in [0, 1]; got {text!r}")
    return values


# --------------------------------------------------------------------------- pretrain


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train GMAE or MAE (default: tiny preset on dead-leaves, CPU, a few minutes)")
    d = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
    p.add_argument("--model", default=None, choices=MODELS, help="gmae (default) or the mae baseline")
    p.add_argument("--data", default=d.data, help="deadleaves (default), photos, or a folder of images (ImageNet layout or flat)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (tiny: 1200)")
    p.add_argument("--batch-size", type=_positive_int, help="global batch size (tiny: 16)")
    p.add_argument("--blr", type=float, help="base learning rate; lr = blr * batch / 256 (tiny: 1.6e-2, others 1e-3)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (tiny: 50)")
    p.add_argument("--out", default=d.out, help=f"output folder for checkpoints, metrics and figures (default {d.out})")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out with its saved settings; of those, "
                        "--steps, --device, --checkpoint-every, --num-workers, --keep-checkpoints and "
                        "--max-bad-steps take effect when given")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (tiny: 400)")
    p.add_argument("--num-workers", type=int, help="data-loading processes (default 0)")
    p.add_argument("--keep-checkpoints", type=_positive_int,
                   help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    p.add_argument("--accum-steps", type=_positive_int, default=d.accum_steps,
                   help="split each process's batch into this many micro-batches (same result, less memory)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (default 0: no clipping)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-bad-steps", type=_positive_int,
                   help=f"non-finite losses in a row (each step skipped) before stopping (default {d.max_bad_steps})")
    p.add_argument("--on-bad-image", choices=("skip", "error"), default=d.on_bad_image,
                   help="an unreadable image during training: skip it (logged and counted, default) or stop")
    p.add_argument("--img-size", type=_positive_int, default=None, help="input size (default: the preset's)")
    p.add_argument("--patch-size", type=_positive_int, default=None, help="patch size (default: the preset's)")
    p.add_argument("--num-gaussians", "-k", type=_positive_int, default=None, help="k Gaussians per image (tiny: 128, others 256)")
    p.add_argument("--max-scale", type=float, default=None, help="c, the largest Gaussian scale (default 1.0)")
    p.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches masked (default 0.75)")
    p.add_argument("--loss", default=None, choices=LOSSES, help="masked (default), all, masked_normpix")
    p.add_argument("--background", type=_background, default=None, help="render background: white (default), black, grey or R,G,B")
    p.add_argument("--render-backend", default=None, help="renderer backend: auto (default), torch, cpu, gsplat")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    from .train import RESUMABLE_CHANGES, pretrain

    mcfg = model_config(
        args.preset, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
        num_gaussians=args.num_gaussians, max_scale=args.max_scale, mask_ratio=args.mask_ratio,
        loss=args.loss, background=args.background, render_backend=args.render_backend,
    )
    tcfg = train_config(
        args.preset, data=args.data, steps=args.steps, batch_size=args.batch_size, blr=args.blr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device, out=args.out,
        checkpoint_every=args.checkpoint_every, num_workers=args.num_workers, keep_checkpoints=args.keep_checkpoints,
        accum_steps=args.accum_steps, clip_grad=args.clip_grad, precision=args.precision, compile=args.compile,
        max_bad_steps=args.max_bad_steps, on_bad_image=args.on_bad_image,
    )
    # On --resume the run's saved settings win, except those given on this command line.
    given = tuple(k for k in RESUMABLE_CHANGES if getattr(args, k) is not None)
    summary = pretrain(mcfg, tcfg, resume=args.resume, progress=not args.quiet, changes=given)
    if summary["figure"] is None:  # not the main process of a torchrun job
        return 0
    print(f"done: {summary['steps_run']} steps at {summary['steps_per_s']:.2f} steps/s, "
          f"final loss {summary['final_loss']:.4f}")
    if summary["skipped_steps"] or summary["bad_images"]:
        print(f"skipped: {summary['skipped_steps']} steps with a non-finite loss, {summary['bad_images']} unreadable images")
    print(f"checkpoint: {summary['checkpoint']}\nfigure:     {summary['figure']}")
    return 0


# --------------------------------------------------------------------------- reconstruct


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="masked input and reconstruction of images, side by side")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by gmae pretrain")
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the model's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> int:
    import torch

    from .checkpoint import load_model
    from .data import load_image
    from .train import masking_noise
    from .viz import save_reconstruction_figure

    model, mcfg, _ = load_model(args.checkpoint, args.device)
    if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
        raise GMAEError(f"mask ratio must be in [0, 1); got {args.mask_ratio}")
    imgs = torch.stack([load_image(path, mcfg.img_size) for path in args.images]).to(args.device)
    out = Path(args.out)
    for i, path in enumerate(args.images):
        noise = masking_noise(args.seed, i, 1, mcfg.num_patches).to(args.device)
        fig = save_reconstruction_figure(model, imgs[i : i + 1], out / f"{Path(path).stem}_reconstruction.png", noise,
                                         mask_ratio=args.mask_ratio)
        print(fig)
    return 0


# --------------------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="config, step and parameter counts of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .checkpoint import configs_of, load_model
    from .model import count_parameters

    model, mcfg, state = load_model(args.checkpoint)
    _, tcfg = configs_of(state)
    encoder = count_parameters(model.encoder)
    total = count_parameters(model)
    info = {
        "checkpoint": str(args.checkpoint), "step": state["step"],
        "parameters": {"encoder": encoder, "decoder": total - encoder, "total": total},
        "model": as_dict(mcfg), "train": as_dict(tcfg),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['checkpoint']}: {mcfg.model} at step {info['step']}")
    print(f"parameters: encoder {encoder:,}  decoder {total - encoder:,}  total {total:,}")
    for section in ("model", "train"):
        print(f"{section}:")
        for key, value in info[section].items():
            print(f"  {key}: {value}")
    return 0


# --------------------------------------------------------------------------- bench


def add_bench(sub) -> None:
    from .bench import BENCHMARKS

    p = sub.add_parser("bench", help="speed ratios measured in one run (renderer speed-ups, GMAE/MAE step time)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch of step_ratio_tiny (default 32)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats per figure (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the fast backend is then gsplat)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import format_results, run

    results = run(args.only, device=args.device, repeats=args.repeats, batch_size=args.batch_size)
    print(json.dumps(results) if args.json else format_results(results))
    return 0


# --------------------------------------------------------------------------- export


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model for sharing (safetensors: no code runs on load)")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="safetensors", choices=("safetensors",))
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, fmt=args.format))
    return 0


# --------------------------------------------------------------------------- main


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (with where to look), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gmae", description="Gaussian Masked Autoencoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_pretrain, add_reconstruct, add_info, add_export, add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GMAEError as e:
        print(f"gmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmae {args.command}: interrupted (checkpoints written so far are kept; --resume continues)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
