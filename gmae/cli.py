"""The `gmae` command: pretrain, reconstruct, the readouts (layers, edges, segment, gaussians: one command per
readout registered in gmae.readouts), eval-zeroshot, ablate, info, export, bench, probe, finetune, plot, submit.

Each sub-command is one small function; mistakes a user can make are raised as
GMAEError and printed as one line (exit status 2). Building the parser and
checking the arguments and paths import no torch (this module and what it
imports at the top are torch-free), so `gmae --help` and usage errors answer
at once; each command imports what it runs only after its checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .runtime import cluster, threads
from .config.choices import (
    BENCHMARKS, EXPORT_FORMATS, EXTRACTION_BATCH, PROBE_DEFAULTS, PROBE_PROTOCOLS, SCENE_DATA, SCENE_IMAGES,
    SCENE_TASKS, positive_int,
)
from .config import (
    CAMERAS, DEPTH_GRADS, DEPTH_PARAMS, ERASE_MODES, FINETUNE_RESUMABLE, GLOBAL_POOLS, INPUT_NORMS, INTERPOLATIONS,
    LOSSES, MIXUP_MODES, MODELS, POSITION_PARAMS, PRESETS, QUERY_INITS, ROTATION_PARAMS, PIXEL_ORIGINS, TILE_CUTS,
    HEAD_INITS, PATCH_BIAS_INITS, POSITION_SOURCES,
    PRETRAIN_RESUMABLE, FinetuneConfig, TrainConfig, as_dict, model_config, train_config,
)
from .errors import GMAEError
from .io.files import check_exists, check_output_file, check_output_folder, image_files, list_checkpoints
from .readouts import READOUTS
from .config.recipes import RECIPES, check_schedule, get_recipe, recipe_defaults, recipe_json

CHECKPOINT_HELP = "a gmae checkpoint (.pt), a gmae .safetensors export, or a run folder (its newest checkpoint)"
RAW_WEIGHTS_HELP = ("use the checkpoint's raw weights, not the EMA of them that a run with --ema saves "
                    "(used by default when there is one)")
RESUME_HELP = ("continue the newest checkpoint in --out (an error if there is none; --resume=auto: "
               "continue if there is one, else start) with its saved settings. A flag given with --resume that "
               "contradicts them is refused, except those a resume may change: {}")


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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_mask_ratio(ratio: float | None) -> None:
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise GMAEError(f"mask ratio must be in [0, 1); got {ratio}")


def _check_checkpoint(path: str) -> None:
    check_exists(path, "checkpoint", f"give {CHECKPOINT_HELP}")


def _add_raw_weights(p) -> None:
    p.add_argument("--raw-weights", action="store_true", help=RAW_WEIGHTS_HELP)


def _add_encoder_norm(p) -> None:
    """--normalize for the commands that read an encoder from any ViT file (gmae.io.export.load_encoder)."""
    p.add_argument("--normalize", dest="input_norm", default=None, choices=INPUT_NORMS,
                   help="the input normalisation of a ViT file without gmae's config: imagenet (default for "
                        "timm's and MAE's files, as they trained) or none (a gmae .pth timm export of a model "
                        "pre-trained without --normalize); gmae checkpoints and exports keep their own")


def _say_weights(label: str | None, raw: bool) -> None:
    """One line on stderr naming the weights a command uses, when it had a choice (gmae.io.checkpoint.weights_line)."""
    from .io.checkpoint import weights_line
    from .io.runs import say

    line = weights_line(label, raw)
    if line:
        say(line)


def _load_model(args, **kw):
    """gmae.io.runs.load_model of ``args.checkpoint`` on ``args.device`` with the weights ``--raw-weights`` picks,
    saying which (model, ModelConfig, checkpoint dict)."""
    from .io.runs import load_model

    model, mcfg, state = load_model(args.checkpoint, args.device, raw=args.raw_weights, **kw)
    _say_weights(state["weights"], args.raw_weights)
    return model, mcfg, state


def _add_resume(p, resumable: tuple[str, ...], *logging: str) -> None:
    """--resume, whose help lists the flags a resume may change: the `resumable` settings, --threads,
    --out and the `logging` flags."""
    flags = [f"--{name.replace('_', '-')}" for name in resumable] + ["--threads", *logging, "--out"]
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help=RESUME_HELP.format(", ".join(flags)))


def _typed_options(parser: argparse.ArgumentParser, argv: list[str] | None, command: str) -> dict[str, str]:
    """{dest: flag} of the options of `command` that `argv` gives explicitly (argparse's defaults are not).

    The command line is parsed again with every default of that command suppressed, so only what was
    typed lands in the namespace; a flag is named by its option strings (``--num-gaussians/-k``).
    """
    actions = [a for a in parser.commands[command]._actions if a.option_strings]
    defaults = [a.default for a in actions]
    for action in actions:
        action.default = argparse.SUPPRESS
    try:
        typed = vars(parser.parse_known_args(argv)[0])
    finally:
        for action, default in zip(actions, defaults):
            action.default = default
    return {a.dest: "/".join(a.option_strings) for a in actions if a.dest in typed}


# --------------------------------------------------------------------------- pretrain


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train GMAE or MAE (default: tiny preset on dead-leaves, CPU, a few minutes)")
    d = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
    p.add_argument("--model", default=None, choices=MODELS, help="gmae (default) or the mae baseline")
    p.add_argument("--data", default=d.data, help="deadleaves (default), sprites (1-4 plain shapes), photos, digits (scikit-learn's, train split), or a folder of images (ImageNet layout or flat)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (tiny: 1200)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (tiny: 16)")
    p.add_argument("--blr", type=float, help="base learning rate; lr = blr * batch / 256 (tiny: 1.6e-2, others 1e-3)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (tiny: 50)")
    p.add_argument("--out", default=d.out, help=f"output folder for checkpoints, metrics and figures (default {d.out})")
    _add_resume(p, PRETRAIN_RESUMABLE, "--quiet", "--tensorboard")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (tiny: 400)")
    p.add_argument("--num-workers", type=int, help="data-loading processes (default 0)")
    p.add_argument("--keep-checkpoints", type=positive_int,
                   help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    p.add_argument("--accum-steps", type=positive_int, default=d.accum_steps,
                   help="split each process's batch into this many micro-batches (same result, less memory)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (default 0: no clipping)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-bad-steps", type=positive_int,
                   help=f"non-finite losses in a row (each step skipped) before stopping (default {d.max_bad_steps})")
    p.add_argument("--on-bad-image", choices=("skip", "error"), default=d.on_bad_image,
                   help="an unreadable image during training: skip it (logged and counted, default) or stop")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the preset's)")
    p.add_argument("--patch-size", type=positive_int, default=None, help="patch size (default: the preset's)")
    p.add_argument("--num-gaussians", "-k", type=positive_int, default=None,
                   help="k Gaussians per image, whatever --gaussians-per-query (tiny: 128, others 256)")
    p.add_argument("--gaussians-per-query", type=positive_int, default=None,
                   help="m Gaussians emitted by each query token: the decoder runs k / m query tokens, so m must "
                        "divide k (default 1; e.g. -k 4096 --gaussians-per-query 16: 256 tokens, 4096 Gaussians)")
    p.add_argument("--position-param", default=None, choices=POSITION_PARAMS,
                   help="with m > 1, where a token's m Gaussians sit: anchored (default; x, y offsets of at most "
                        "2/sqrt(k/m) around a per-token anchor; trains better) or absolute (each its own position)")
    p.add_argument("--max-scale", type=float, default=None, help="c, the largest Gaussian scale (default 1.0)")
    p.add_argument("--max-opacity", type=float, default=None,
                   help="opacity = MAX * sigmoid (default 1, the authors'); above 1 a Gaussian saturates at alpha "
                        "--max-alpha over a core and has a sharp rim (a flat-topped blob)")
    p.add_argument("--opacity-reg", type=float, default=None,
                   help="add this x mean opacity (relative to --max-opacity) to the loss: an economy prior for "
                        "fewer, larger Gaussians (default 0)")
    p.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches masked (tiny: 0.25; the other presets: 0.75, the paper's)")
    p.add_argument("--loss", default=None, choices=LOSSES, help="masked (the paper's; default of every preset but tiny), all (tiny's: every pixel), "
                        "masked_normpix")
    p.add_argument("--background", type=_background, default=None, help="render background: white (default), black, grey or R,G,B")
    p.add_argument("--render-backend", default=None,
                   help="renderer backend: auto (default; triton, else gsplat, on CUDA), triton, gsplat, cpu, torch")
    p.add_argument("--camera", default=None, choices=CAMERAS,
                   help="projection of the Gaussians: orthographic (z only sorts), authors (the GMAE authors' "
                        "legacy-gsplat camera: z changes on-screen size), pinhole (true perspective)")
    p.add_argument("--depth-grad", default=None, choices=DEPTH_GRADS,
                   help="how depth learns: off (3DGS compositing; depth only sorts), swap (the same compositing "
                        "plus the rasterizer's depth-order gradient: z learns which of two overlapping Gaussians "
                        "should be in front; backends torch and cpu) or weighted (order-free weighted compositing "
                        "with depth weights exp(-z/tau); backend torch; the readouts render the same way)")
    p.add_argument("--depth-tau", type=float, default=None,
                   help="temperature, in depth units, of the swap relaxation or of the weighted compositing "
                        "(default 0.1)")
    p.add_argument("--depth-param", default=None, choices=DEPTH_PARAMS,
                   help="z from the head: bounded 2*(sigmoid-0.5) (the authors'), centred (the same of the raw "
                        "depth minus the image's mean: no common drift onto a limit) or linear (never saturates; "
                        "--camera orthographic only)")
    _add_authors_options(p)
    p.add_argument("--position-source", default=None, choices=POSITION_SOURCES,
                   help="what places each query's Gaussians: head (the paper's presets; x, y are numbers of the linear "
                        "head, the authors'), pointer (tiny's default: an attention-weighted place among the visible "
                        "patches, from the decoder's outputs, plus an offset of at most a patch: a pointer into the image) or slots "
                        "(slot attention: the queries compete for the visible patches and sit around the centre of "
                        "those they win)")
    p.add_argument("--position-gain", type=float, default=None,
                   help="x, y = 2 (sigmoid(GAIN x raw) - 1/2): positions GAIN times as sensitive to the head, and as "
                        "fast to learn under Adam (default 1)")
    p.add_argument("--query-noise", type=float, default=None,
                   help="std of Gaussian noise added to every query embedding, per image, while training (default 0)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also keep an fp32 exponential moving average of the weights with this decay, saved in the "
                        "checkpoints and used by the commands that read them (--raw-weights: not); e.g. 0.999, the "
                        "authors' (default 0: none)")
    p.add_argument("--init-encoder", default=d.init_encoder, metavar="FILE",
                   help="start the encoder from FILE: a gmae checkpoint or export, or a timm / MAE ViT checkpoint "
                        "of the same shape (fresh runs only)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics for TensorBoard in --out/tensorboard (pip install 'gmae[tensorboard]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--layout-every", type=int, default=None, metavar="STEPS",
                   help=f"every STEPS steps (and at the last), log whether the Gaussians follow the image: the layout "
                        f"figures (layout_spread_ratio, depth_rank_corr, edge_follow) and the full-image PSNR against "
                        f"the flat mean colour (psnr_full, psnr_mean_colour) on a fixed held-out batch; 0: never "
                        f"(default {d.layout_every})")
    _add_pretrain_recipe_flags(p)
    # The online probe (gmae.model.online_probe), apart from the flags above.
    p.add_argument("--online-probe", action="store_true",
                   help="also train a linear probe on every encoder block's visible tokens, detached (the model "
                        "trains exactly as without it), and log each block's train-batch accuracy and loss as "
                        "online_probe/acc_blockI, online_probe/loss_blockI; needs labelled --data: digits, sprites, "
                        "deadleaves or a folder of class sub-folders")
    p.set_defaults(func=cmd_pretrain)


def _add_authors_options(p) -> None:
    """The GMAE authors' code's model choices (the authors-code recipe turns them on; docs/fidelity.md cites each).
    Their defaults (None: ModelConfig's) are gmae's own choices, so checkpoints saved before the options keep their model."""
    p.add_argument("--rotation-param", default=None, choices=ROTATION_PARAMS,
                   help="the Gaussians' rotation from the head: normalize (default; its 4 numbers divided by their "
                        "norm), uniform (the authors': 3 sigmoids through Shoemake's uniform-rotation formula, "
                        "components in the authors' order, the first, sqrt(1-u1) sin 2 pi u2, as w: "
                        "tekotan/video-gmae models_mae.py lines 555-564, gsplat v0.1.1 helpers.cuh line 144; the 4th "
                        "number is unused) or uniform-scalar-last (the same formula read (x, y, z, w))")
    p.add_argument("--query-init", default=None, choices=QUERY_INITS,
                   help="the query tokens' own embeddings at the start: normal (default; N(0, 1)) or uniform "
                        "(the authors': U[0, 1))")
    p.add_argument("--head-bias", default=None, action=argparse.BooleanOptionalAction,
                   help="whether the Gaussian head has a bias (default: yes). Its bias also sets the starting size "
                        "(half of c = 1's largest std, / sqrt(m)) and opacity (1/2); --no-head-bias (the authors') "
                        "starts every scale around c x sigmoid(0) = c/2 and every opacity around max-opacity/2")
    p.add_argument("--max-alpha", type=float, default=None,
                   help="the renderer's clamp on each Gaussian's alpha, in (0, 1] (default 0.99, 3DGS's; the "
                        "authors' 0.999); training and the readouts render with it")
    p.add_argument("--pixel-origin", default=None, choices=PIXEL_ORIGINS,
                   help="where pixel i is sampled: centre (default; at i + 0.5, gsplat >= 0.1.2's) or legacy "
                        "(legacy gsplat v0.1.0/v0.1.1's, which the authors' code calls: ndc2pix = 0.5 W x + 0.5 + cx "
                        "with pixel i at i, helpers.cuh line 8: every Gaussian one pixel further right and down)")
    p.add_argument("--tile-cut", default=None, choices=TILE_CUTS,
                   help="which tiles draw a Gaussian: alpha (default; every tile where its alpha can reach 1/255) "
                        "or 3sigma (legacy gsplat's, as the authors' model renders: only the tiles its ceil(3 sigma) "
                        "box touches, helpers.cuh line 66; backends torch, cpu, triton)")
    p.add_argument("--head-init", default=None, choices=HEAD_INITS,
                   help="the Gaussian head's starting weights: xavier (default; MAE's init of every linear) or torch "
                        "(nn.Linear's own U(+-1/sqrt(d)), as the authors' head keeps it: models_mae.py lines 306 "
                        "and 333-335 create it after initialize_weights())")
    p.add_argument("--patch-bias-init", default=None, choices=PATCH_BIAS_INITS,
                   help="the patch embedding's starting bias: zero (default) or torch (nn.Conv2d's own, kept by MAE "
                        "and the authors, whose init re-draws only the weight: models_mae.py lines 357-359)")


def _add_recipe(p, command: str) -> None:
    names = [name for name, r in RECIPES.items() if r.command == command]
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help=f"start from a named recipe's settings (flags given here override them): {', '.join(names)}; "
                        "gmae recipes NAME prints its values and where each comes from")


def _add_pretrain_recipe_flags(p) -> None:
    """The settings the recipes (gmae.config.recipes) need: epochs, the effective batch, the optimizer's wd and betas,
    input normalisation and the crop. Their defaults (None) keep the behaviour from before them."""
    _add_recipe(p, "pretrain")
    p.add_argument("--epochs", type=float, default=None,
                   help="run length in epochs of the data set (an image folder or digits; not with --steps): "
                        "steps = round(EPOCHS x floor(images / batch)), batch being the global (effective) batch")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup in epochs, as --epochs converts them (not with --warmup-steps)")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="per-process micro-batch: --batch-size is then the effective batch, reached by gradient "
                        "accumulation over batch / (processes x micro-batch) micro-batches, as MAE's accum_iter "
                        "(e.g. --batch-size 4096 --micro-batch 64; not with --accum-steps)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.05)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW betas (default 0.9 0.95, MAE's)")
    p.add_argument("--normalize", dest="input_norm", default=None, choices=INPUT_NORMS,
                   help="the encoder's input: none (default: the [0, 1] image) or imagenet (MAE's mean/std, applied "
                        "inside the encoder, so fine-tuning, probes, readouts and exports get it too); the "
                        "reconstruction target stays the [0, 1] image")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random resized crop's area range for image folders and photos (default 0.2 1, MAE's)")
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS,
                   help="random resized crop's resampling for image folders and photos (default bicubic, MAE's)")


def _pretrain_schedule(args) -> dict:
    """TrainConfig's length, warmup and accumulation from the command line and its recipe: a typed --steps
    (--warmup-steps, --accum-steps) replaces a recipe's --epochs (--warmup-epochs, --micro-batch); typing both
    of a pair is refused."""
    typed = args.typed
    check_schedule(typed)
    return dict(
        epochs=None if "steps" in typed else args.epochs,
        warmup_epochs=None if "warmup_steps" in typed else args.warmup_epochs,
        micro_batch=0 if "accum_steps" in typed or not args.micro_batch else args.micro_batch,
    )


def cmd_pretrain(args) -> int:
    mcfg = model_config(
        args.preset, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
        num_gaussians=args.num_gaussians, gaussians_per_query=args.gaussians_per_query,
        position_param=args.position_param, max_scale=args.max_scale, max_opacity=args.max_opacity,
        opacity_reg=args.opacity_reg,
        mask_ratio=args.mask_ratio, loss=args.loss, background=args.background, render_backend=args.render_backend,
        camera=args.camera,
        depth_grad=args.depth_grad, depth_tau=args.depth_tau, depth_param=args.depth_param,
        input_norm=args.input_norm, rotation_param=args.rotation_param, query_init=args.query_init,
        head_bias=args.head_bias, max_alpha=args.max_alpha, pixel_origin=args.pixel_origin, tile_cut=args.tile_cut,
        head_init=args.head_init, patch_bias_init=args.patch_bias_init, position_source=args.position_source,
        position_gain=args.position_gain, query_noise=args.query_noise,
    )
    tcfg = train_config(
        args.preset, data=args.data, steps=args.steps, batch_size=args.batch_size, blr=args.blr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device, out=args.out,
        checkpoint_every=args.checkpoint_every, num_workers=args.num_workers, keep_checkpoints=args.keep_checkpoints,
        accum_steps=args.accum_steps, clip_grad=args.clip_grad, precision=args.precision, compile=args.compile,
        max_bad_steps=args.max_bad_steps, on_bad_image=args.on_bad_image, init_encoder=args.init_encoder,
        ema=args.ema, online_probe=args.online_probe, layout_every=args.layout_every,
        # recipes (gmae.config.recipes)
        recipe=args.recipe or "", weight_decay=args.weight_decay, betas=args.betas, crop_scale=args.crop_scale,
        interpolation=args.interpolation, **_pretrain_schedule(args),
    )
    check_output_folder(tcfg.out)
    if args.tensorboard:
        from .viz.board import check_available

        check_available()
    if args.init_encoder:
        check_exists(args.init_encoder, "--init-encoder", "give a gmae checkpoint or export, or a timm / MAE ViT file")
    from .train import pretrain  # torch: only once the arguments are known to be good

    # On --resume the run's saved settings win: those a resume may change are taken from this command
    # line when typed here, and any other typed flag that contradicts them is refused.
    summary = pretrain(mcfg, tcfg, resume=args.resume, progress=not args.quiet,
                       changes=tuple(k for k in PRETRAIN_RESUMABLE if k in args.typed),
                       tensorboard=args.tensorboard, given=args.typed)
    if summary["figure"] is None:  # not the main process of a torchrun job
        return 0
    print(f"done: {summary['steps_run']} steps at {summary['steps_per_s']:.2f} steps/s, "
          f"final loss {summary['final_loss']:.4f}")
    if summary["skipped_steps"] or summary["bad_images"]:
        print(f"skipped: {_count(summary['skipped_steps'], 'step')} with a non-finite loss, "
              f"{_count(summary['bad_images'], 'unreadable image')}")
    print(f"checkpoint: {summary['checkpoint']}\nfigure:     {summary['figure']}")
    return 0


# --------------------------------------------------------------------------- reconstruct


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="masked input and reconstruction of images, side by side")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads) or folders of them")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the model's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--device", default="cpu")
    _add_raw_weights(p)
    p.set_defaults(func=cmd_reconstruct)


def _image_command_inputs(args) -> list[str]:
    """The checks of a command that reads images and writes figures, before anything heavy is imported."""
    _check_mask_ratio(args.mask_ratio)
    _check_checkpoint(args.checkpoint)
    images = image_files(args.images)
    check_output_folder(args.out)
    return images


def cmd_reconstruct(args) -> int:
    images = _image_command_inputs(args)
    import torch

    from .data import load_image
    from .model import masking_noise
    from .viz.figures import save_reconstruction_figure

    model, mcfg, state = _load_model(args)
    imgs = torch.stack([load_image(path, mcfg.img_size) for path in images]).to(args.device)
    out = Path(args.out)
    for i, path in enumerate(images):
        noise = masking_noise(args.seed, i, 1, mcfg.num_patches).to(args.device)
        fig = save_reconstruction_figure(model, imgs[i : i + 1], out / f"{Path(path).stem}_reconstruction.png", noise,
                                         mask_ratio=args.mask_ratio)
        print(fig)
    return 0


# --------------------------------------------------------------------------- zero-shot readouts

def add_readouts(sub) -> None:
    """One command per registered readout (gmae.readouts: names, help and flags are read without torch)."""
    for readout in READOUTS.values():
        p = sub.add_parser(readout.name, help=f"zero-shot {readout.summary} (PNG per image)")
        p.add_argument("images", nargs="+", help="image files (any format Pillow reads) or folders of them; the "
                       "shorter side is resized to the model's input size and the centre square is cropped")
        p.add_argument("--checkpoint", required=True, help=f"GMAE model: {CHECKPOINT_HELP}")
        p.add_argument("--out", required=True, help=f"folder for the PNG figures (NAME_{readout.name}.png)")
        p.add_argument("--mask-ratio", type=float, default=0.0,
                       help="patches hidden from the encoder (default 0: it sees the whole image)")
        p.add_argument("--device", default="cpu")
        _add_raw_weights(p)
        for flag in readout.flags:
            p.add_argument(*flag.names, **flag.options)
        p.set_defaults(func=cmd_readout, readout=readout.name)


def _report_collapse(collapse: dict | None) -> None:
    """The collapse guard of the readout commands and eval-zeroshot: one line on stderr (above any progress
    bar) when the depths of the Gaussians read have collapsed (gmae.readouts.core.depth_collapse)."""
    from .readouts.core import collapse_message
    from .io.runs import say

    message = collapse_message(collapse) if collapse else None
    if message:
        say(message)


def cmd_readout(args) -> int:
    images = _image_command_inputs(args)
    from .data import load_image
    from .readouts.core import Canvas, depth_collapse, gaussians_of

    readout = READOUTS[args.readout]
    model, mcfg, state = _load_model(args)
    canvas = Canvas.of(model)
    out = Path(args.out)
    read = []
    for path in images:
        img = load_image(path, mcfg.img_size).to(args.device)
        g = gaussians_of(model, img[None], args.mask_ratio)
        read.append(g)
        print(readout.save(img, readout.compute(g, canvas, args), out / f"{Path(path).stem}_{readout.name}.png"))
    _report_collapse(depth_collapse(read, mcfg))
    _report_layout(model, state)
    return 0


def _report_layout(model, state) -> None:
    """The layout guard of the readout commands and eval-zeroshot: one line on stderr when the model's geometry does
    not follow the image (gmae.readouts.layout.judge_layout), measured on held-out images of its run's data."""
    from .io.checkpoint import configs_of
    from .evaluate.zeroshot import checkpoint_layout
    from .readouts.layout import layout_message
    from .io.runs import say

    layout = checkpoint_layout(model, configs_of(state)[1], fidelity_too=False)["layout"]
    message = layout_message(layout)
    if message:
        say(f"{message} (measured on {layout['source']})")


def add_eval_zeroshot(sub) -> None:
    p = sub.add_parser("eval-zeroshot", help="score zero-shot edges (ODS/OIS/AP) and figure-ground (IoU) "
                       "against ground truth, with Sobel/Canny/ellipse baselines")
    p.add_argument("--checkpoint", required=True, help=f"GMAE model: {CHECKPOINT_HELP}")
    p.add_argument("--data", default="deadleaves",
                   help="deadleaves (default; generated, exact truth), sprites (1-4 plain shapes, exact truth), "
                   "bsds:ROOT (BSDS500 layout, test split) "
                   "or masks:ROOT (ROOT/images + same-named binary PNGs in ROOT/masks)")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="score only the first N images (deadleaves, sprites default: 200)")
    p.add_argument("--random-init", action="store_true",
                   help="score the checkpoint's architecture at initialisation (its run's seed) instead")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="patches hidden from the encoder (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="cpu")
    _add_raw_weights(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval_zeroshot)


def cmd_eval_zeroshot(args) -> int:
    _check_mask_ratio(args.mask_ratio)
    _check_checkpoint(args.checkpoint)
    from .evaluate.zeroshot import evaluate_zeroshot, format_scores

    model, _, state = _load_model(args, initial=args.random_init)
    results = evaluate_zeroshot(model, args.data, args.num_images, args.batch_size, args.mask_ratio,
                                progress=not args.json)
    results.update(checkpoint=str(args.checkpoint), random_init=args.random_init, weights=state["weights"])
    _report_collapse(results["collapse"])
    if results["layout"] is not None:
        from .readouts.layout import layout_message
        from .io.runs import say

        message = layout_message(results["layout"])
        if message:
            say(f"{message} (measured on the first {results['layout']['num_images']} images)")
    label = "gmae (init)" if args.random_init else "gmae"
    print(json.dumps(results) if args.json else format_scores(results, label))
    return 0


# --------------------------------------------------------------------------- ablate


def add_ablate(sub) -> None:
    from .evaluate.ablate import VARIANTS

    p = sub.add_parser("ablate", help="the paper's ablation grid (c, mask ratio, loss, k) and MAE on the tiny "
                       "preset at equal steps, scored by linear/kNN probes and masked PSNR")
    p.add_argument("--out", default="runs/ablate", help="folder of the runs and of table.md (default runs/ablate)")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="NAME",
                   help=f"variants to run (default all): {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=positive_int, default=None, help="steps per run (tiny preset: 1200)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="seeds per variant (default 1); with more, runs are OUT/NAME-sSEED and the table "
                        "shows mean ± std")
    p.add_argument("--data", default="deadleaves", help="pre-training data (default deadleaves)")
    p.add_argument("--probe-data", default="digits",
                   help="probe data (see gmae probe; default digits); deadleaves or sprites runs the scene "
                        "probes (count, shape, front, figure) on held-out scenes")
    p.add_argument("--no-eval", action="store_true", help="only pre-train")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args) -> int:
    check_output_folder(args.out)
    from .evaluate.ablate import format_table, run_ablation

    rows = run_ablation(args.out, args.only, args.steps, args.seed, args.data, args.probe_data,
                        evaluate=not args.no_eval, progress=not args.json, seeds=args.seeds)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


# --------------------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="config, step and parameter counts of a checkpoint, whether its depths have "
                       "collapsed and its layout follows the image (measured on a few held-out images of its run's "
                       "data), and the PSNR of its full renders against the flat mean colour")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _add_raw_weights(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    _check_checkpoint(args.checkpoint)
    from .io.checkpoint import configs_of
    from .model import count_parameters
    from .io.runs import load_model

    model, mcfg, state = load_model(args.checkpoint, raw=args.raw_weights)
    _, tcfg = configs_of(state)
    encoder = count_parameters(model.encoder)
    total = count_parameters(model)
    collapse, geometry = None, {"layout": None, "fidelity": None}
    if mcfg.model == "gmae":
        from .evaluate.zeroshot import checkpoint_collapse, checkpoint_layout

        collapse = checkpoint_collapse(model, tcfg, args.checkpoint)
        geometry = checkpoint_layout(model, tcfg)
    info = {
        "checkpoint": str(args.checkpoint), "step": state["step"], "weights": state["weights"],
        "parameters": {"encoder": encoder, "decoder": total - encoder, "total": total},
        "collapse": collapse, **geometry, "model": as_dict(mcfg), "train": None if tcfg is None else as_dict(tcfg),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['checkpoint']}: {mcfg.model} at step {info['step']}, {state['weights']} weights")
    print(f"parameters: encoder {encoder:,}  decoder {total - encoder:,}  total {total:,}")
    if collapse is not None:
        from .evaluate.zeroshot import collapse_figures

        print(f"depth: {collapse_figures(collapse)}\n  measured on {collapse['source']}")
    if info["layout"] is not None:
        from .evaluate.zeroshot import fidelity_line, layout_line

        print(f"layout: {layout_line(info['layout'])}\n  measured on {info['layout']['source']}")
        print(f"fidelity (PSNR of the full render at mask 0 vs each image's flat mean colour): "
              f"{fidelity_line(info['fidelity'])}")
    for section in ("model", "train"):
        if info[section] is None:
            print(f"{section}: not stored (an export holds the model only)")
            continue
        print(f"{section}:")
        for key, value in info[section].items():
            print(f"  {key}: {value}")
    return 0


# --------------------------------------------------------------------------- bench


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed ratios measured in one run (renderer speed-ups, GMAE/MAE step time)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="batch of step_ratio_tiny and of many_gaussians' tiny row (default 32)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per figure (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the fast backend is then triton, else gsplat)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the step_ratio benchmarks' precision: fp32 (default) or bf16 autocast, as gmae pretrain's")
    p.add_argument("--compile", action="store_true", help="torch.compile the step_ratio benchmarks' models")
    p.add_argument("--render-batch", type=positive_int, default=None,
                   help="render_backends' batch (default 64 on CUDA, 8 on the CPU)")
    p.add_argument("--render-k", type=positive_int, nargs="+", default=[256, 4096], metavar="K",
                   help="render_backends' numbers of Gaussians (default 256 4096)")
    p.add_argument("--render-size", type=positive_int, default=224, help="render_backends' image size (default 224)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench.suite import format_results, run

    results = run(args.only, device=args.device, repeats=args.repeats, batch_size=args.batch_size,
                  precision=args.precision, compile=args.compile,
                  render=dict(batch=args.render_batch, ks=tuple(args.render_k), size=args.render_size))
    print(json.dumps(results) if args.json else format_results(results))
    return 0


# --------------------------------------------------------------------------- export


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model for sharing (safetensors: no code runs on load)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", default="safetensors", choices=list(EXPORT_FORMATS),
                   help="safetensors (default): the whole gmae model; timm: the encoder only, under timm's "
                        "VisionTransformer names (.safetensors or .pth)")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors or vit.pth")
    _add_raw_weights(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    _check_checkpoint(args.checkpoint)
    check_output_file(args.out)
    from .io.checkpoint import configs_of, model_weights
    from .io.export import export_checkpoint, load_state, timm_create_call

    state = load_state(args.checkpoint)  # read once: the export and the lines below both need it
    out = export_checkpoint(args.checkpoint, args.out, fmt=args.format, raw=args.raw_weights, state=state)
    print(out)
    _say_weights(model_weights(state, args.raw_weights, args.checkpoint)[1], args.raw_weights)
    if args.format == "timm":
        mcfg, _ = configs_of(state)
        print(f"load in timm: {timm_create_call(mcfg, out)}")
    return 0


# --------------------------------------------------------------------------- probe / finetune

LABELLED_DATA_HELP = ("labelled data: digits (default; scikit-learn's 8x8 digits upsampled, stratified 80/20 "
                      "split, seed 0), cifar10:ROOT, cifar100:ROOT (python-pickle releases; ROOT holds "
                      "cifar-10-batches-py/ or cifar-100-python/, or is it), folder:ROOT (ROOT/train/CLASS/*.jpg "
                      "and ROOT/val/CLASS/*.jpg), or a bare ROOT, detected as one of these")


def add_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear and kNN probes of a frozen encoder on labelled images")
    p.add_argument("--checkpoint", required=True, help=f"{CHECKPOINT_HELP}, or timm/MAE ViT weights")
    p.add_argument("--data", default="digits", help=LABELLED_DATA_HELP + "; or deadleaves / sprites for the "
                   "scene probes (see --task)")
    p.add_argument("--pool", default="cls", choices=("cls", "avg"),
                   help="feature: cls token (default, MAE's linear probe) or mean of patch tokens, after the final norm")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--random-init", action="store_true",
                      help="probe the checkpoint's architecture with fresh weights drawn with --seed (the baseline)")
    init.add_argument("--baseline", action="store_true",
                      help="probe the trained weights and the random-init baseline, and print both side by side")
    p.add_argument("--task", action="append", choices=(*SCENE_TASKS, "all"), default=None,
                   help="scene probes (--data deadleaves or sprites only; repeat for several; default all): count "
                        "and shape (of the largest object) are semantic, front (which of two marked objects is "
                        "nearer) spatial, figure (is a marked point on the figure) figure-ground; see "
                        "docs/evaluation.md")
    p.add_argument("--train-images", type=positive_int, default=SCENE_IMAGES["train"],
                   help=f"scene probes: train images (default {SCENE_IMAGES['train']})")
    p.add_argument("--val-images", type=positive_int, default=SCENE_IMAGES["val"],
                   help=f"scene probes: val images (default {SCENE_IMAGES['val']})")
    p.add_argument("--k", type=positive_int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature T (default 0.07)")
    _add_probe_protocol(p)
    _add_raw_weights(p)
    _add_encoder_norm(p)
    p.add_argument("--seed", type=int, default=0, help="linear-probe seed (and --random-init's for files "
                   "that are not gmae checkpoints; a checkpoint's initial weights use its run's seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_recipe(p, "probe")
    p.set_defaults(func=cmd_probe)


# gmae probe's linear-probe protocols (MAE's main_linprobe.py; docs/evaluation.md). The dests (protocol, epochs, batch_size, blr, weight_decay,
# warmup_epochs) are what recipes set; None = the protocol's own (gmae.config.choices.PROBE_DEFAULTS).
def _add_probe_protocol(p) -> None:
    cached, mae = PROBE_DEFAULTS["cached"], PROBE_DEFAULTS["mae"]
    g = p.add_argument_group("linear-probe protocol")
    g.add_argument("--protocol", choices=PROBE_PROTOCOLS, default="cached",
                   help="cached (default): SGD on the features of the un-augmented images, computed once (fast); "
                        "mae: MAE's main_linprobe.py (BatchNorm + linear head, LARS, the encoder run on every "
                        "augmented training batch; scenes: count and shape only). See docs/evaluation.md")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"linear-probe epochs (default: cached {cached['epochs']}, mae {mae['epochs']})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"cached: the feature-extraction batch (default {EXTRACTION_BATCH}; the probe trains at "
                        f"{cached['batch_size']}); mae: the training batch, at most the train set (default "
                        f"{mae['batch_size']}; MAE: 16384)")
    g.add_argument("--blr", type=float, default=None,
                   help=f"linear-probe base lr; lr = blr * batch / 256 (default: cached {cached['blr']}; mae "
                        f"{mae['blr']}, MAE's lr per LARS step at batch 256 (MAE: 0.1 at batch 16384))")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"linear-probe weight decay (default {mae['weight_decay']:g})")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear-probe warmup epochs, at most half the epochs (default {mae['warmup_epochs']})")


def _probe_settings(args) -> tuple[int, dict]:
    """(feature-extraction batch, the linear probe's settings as probe() and scene_probe() take them): the typed
    flags over the protocol's defaults; GMAEError for impossible ones."""
    typed = {k: getattr(args, k) for k in PROBE_DEFAULTS[args.protocol] if getattr(args, k) is not None}
    if args.protocol == "cached":  # --batch-size is the extraction batch; the probe's own stays at its default
        extraction = typed.pop("batch_size", EXTRACTION_BATCH)
    else:
        extraction = typed.get("batch_size", PROBE_DEFAULTS["mae"]["batch_size"])
    values = {**PROBE_DEFAULTS[args.protocol], **typed}
    if not values["blr"] > 0 or values["weight_decay"] < 0 or values["warmup_epochs"] < 0:
        raise GMAEError(f"the linear probe needs blr > 0 (got {values['blr']}), weight decay >= 0 (got "
                        f"{values['weight_decay']}) and warmup epochs >= 0 (got {values['warmup_epochs']}; at most "
                        "half the epochs are used)")
    values["linear_batch"] = values.pop("batch_size")
    return extraction, values


def _run_seed(path: str, default: int) -> int:
    """The seed a gmae checkpoint's run started from (its initial weights); `default` for other files."""
    from .io.checkpoint import configs_of
    from .io.export import load_state

    try:
        tcfg = configs_of(load_state(path))[1]
    except GMAEError:
        return default
    return default if tcfg is None else tcfg.seed


def cmd_probe(args) -> int:
    if not args.temperature > 0:
        raise GMAEError(f"temperature must be positive; got {args.temperature}")
    if args.task and args.data not in SCENE_DATA:
        raise GMAEError(f"--task is for the scene probes: give --data {' or '.join(SCENE_DATA)} "
                        f"(got --data {args.data})")
    extraction, linear = _probe_settings(args)
    points = [t for t in (args.task or ()) if t not in ("count", "shape")]
    if args.protocol == "mae" and args.data in SCENE_DATA and points:
        raise GMAEError(f"--task {points[0]} reads marked points: only --protocol cached probes it; with "
                        "--protocol mae give --task count and/or --task shape")
    _check_checkpoint(args.checkpoint)
    from .evaluate.probe import probe, random_encoder
    from .io.export import load_encoder

    encoder, mcfg = load_encoder(args.checkpoint, raw=args.raw_weights, input_norm=args.input_norm)
    if not args.random_init:
        _say_weights(encoder.loaded_weights, args.raw_weights)
    encoders = {"pre-trained": encoder}
    if args.random_init or args.baseline:
        baseline = random_encoder(mcfg, _run_seed(args.checkpoint, args.seed))
        encoders = {"random init": baseline} if args.random_init else {**encoders, "random init": baseline}
    if args.data in SCENE_DATA:
        return _scene_probe(args, encoders, mcfg, extraction, linear)
    from .data.labelled import build_labelled

    # built once when the baseline is probed too; with augment=True only load(index, rng) augments (mae's training)
    data = build_labelled(args.data, mcfg.img_size, augment=args.protocol == "mae", progress=not args.json)
    results = {label: probe(enc, data, batch_size=extraction, device=args.device, pool=args.pool, k=args.k,
                            T=args.temperature, seed=args.seed, progress=not args.json, protocol=args.protocol,
                            **linear)
               for label, enc in encoders.items()}
    result = next(iter(results.values()))
    result.update(checkpoint=str(args.checkpoint), data=args.data, random_init=args.random_init,
                  weights=None if args.random_init else encoder.loaded_weights, input_norm=mcfg.input_norm,
                  **_probe_record(args))
    if args.baseline:
        result["baseline"] = {key: results["random init"][key] for key in ("linear_acc", "knn_acc")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint} ({' vs '.join(results)}), {args.data}: {result['num_train']} train / "
          f"{result['num_val']} val images, {result['num_classes']} classes; feature: {result['feature']} "
          f"({result['dim']}-d)")
    if args.baseline:
        print(" " * 10 + "".join(f"{label:>14}" for label in results))
    linear_how = f"BatchNorm + linear, SGD on cached features, {result['linear_epochs']} epochs" \
        if args.protocol == "cached" else \
        f"MAE's protocol: BatchNorm + linear, LARS, batch {result['linear_batch']}, {result['linear_epochs']} epochs"
    for key, how in (("linear_acc", linear_how),
                     ("knn_acc", f"cosine, k={args.k}, T={args.temperature}")):
        cells = "".join(f"{100 * r[key]:13.2f}%" for r in results.values())
        print(f"{key:<10}{cells}   ({how})")
    return 0


def _probe_record(args) -> dict:
    """What a probe's --json records of how it ran: its recipe and every setting it used."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
                if k not in ("func", "typed", "command", "json")}
    return {"recipe": args.recipe or "", "settings": settings}


def _scene_probe(args, encoders: dict, mcfg, extraction: int, linear: dict) -> int:
    """`gmae probe --data deadleaves|sprites`: the scene tasks, each encoder on the same labels."""
    from .data.scenes import SPLIT_SEEDS, scene_labels
    from .evaluate.scene import scene_probe

    tasks = SCENE_TASKS if not args.task or "all" in args.task else tuple(dict.fromkeys(args.task))
    if args.protocol == "mae" and (not args.task or "all" in args.task):
        tasks = ("count", "shape")  # MAE's protocol: the image-level tasks only (see gmae.evaluate.scene)
    progress = not args.json
    labels = (scene_labels(args.data, "train", mcfg.img_size, mcfg.patch_size, args.train_images, progress),
              scene_labels(args.data, "val", mcfg.img_size, mcfg.patch_size, args.val_images, progress))
    results = {label: scene_probe(enc, args.data, tasks, labels, batch_size=extraction, device=args.device,
                                  pool=args.pool, k=args.k, T=args.temperature, seed=args.seed, progress=progress,
                                  protocol=args.protocol, **linear)
               for label, enc in encoders.items()}
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, "split_seeds": SPLIT_SEEDS,
                          "weights": getattr(encoders.get("pre-trained"), "loaded_weights", None),
                          "pool": args.pool, "protocol": args.protocol, "input_norm": mcfg.input_norm,
                          **_probe_record(args),
                          **({"tasks": results[next(iter(results))]} if len(results) == 1 else {"encoders": results})}))
        return 0
    print(f"{args.checkpoint}, {args.data} scene probes: {args.train_images} train / {args.val_images} val images "
          f"(seeds {SPLIT_SEEDS['train']} / {SPLIT_SEEDS['val']}); linear: BatchNorm + linear, "
          f"{'SGD on cached features' if args.protocol == 'cached' else 'LARS (MAE protocol)'}, "
          f"{linear['epochs']} epochs; kNN: cosine, k={args.k}, T={args.temperature}; chance: the train split's most "
          "common class")
    head = "".join(f"{f'{name} {label}':>24}" for name in ("linear", "kNN") for label in results)
    print(f"{'task':<34}{head}{'chance':>10}")
    for task in tasks:
        first = results[next(iter(results))][task]
        row = f"{task} ({first['kind']}, {first['num_classes']} classes)"
        cells = "".join(f"{100 * r[task][key]:23.1f}%" for key in ("linear_acc", "knn_acc") for r in results.values())
        print(f"{row:<34}{cells}{100 * first['chance']:9.1f}%")
    return 0


def add_finetune(sub) -> None:
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a pre-trained encoder as a classifier (MAE's recipe)")
    p.add_argument("--checkpoint", help=f"{CHECKPOINT_HELP}, or timm/MAE ViT weights (not needed with --resume)")
    p.add_argument("--data", default=d.data, help=LABELLED_DATA_HELP)
    p.add_argument("--out", default=d.out, help=f"folder for checkpoints and metrics.jsonl (default {d.out})")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--blr", type=float, default=d.blr, help=f"base lr; lr = blr * batch / 256 (default {d.blr})")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: one epoch)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help=f"layer-wise lr decay (default {d.layer_decay}; MAE: 0.65 base, 0.75 large)")
    p.add_argument("--drop-path", type=float, default=d.drop_path, help=f"stochastic depth rate (default {d.drop_path})")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help=f"label smoothing (default {d.smoothing})")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (default 0: no clipping)")
    p.add_argument("--random-init", action="store_true",
                   help="fine-tune the checkpoint's architecture from fresh weights (the from-scratch baseline)")
    _add_raw_weights(p)
    _add_encoder_norm(p)
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between val evaluations (default: an epoch)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints (default: an epoch)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=None,
                   help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    _add_resume(p, FINETUNE_RESUMABLE, "--quiet", "--json")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes (default 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_finetune_timm(p, d)
    _add_recipe(p, "finetune")
    p.set_defaults(func=cmd_finetune)


# The FinetuneConfig fields that MAE's fine-tuning recipe adds on timm (MAE's main_finetune.py; docs/evaluation.md): each flag's dest is the
# field's name, so cmd_finetune passes them through as they are.
FINETUNE_TIMM_FIELDS = ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "aa", "reprob", "remode",
                        "recount", "global_pool", "warmup_epochs")


def _add_finetune_timm(p, d: FinetuneConfig) -> None:
    """gmae finetune's MAE regularisers (timm's; `pip install 'gmae[timm]'` when one is on) and pooling."""
    g = p.add_argument_group("MAE's regularisers, from timm (off by default; MAE's ViT-B value in brackets)")
    g.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha, 0 = off [0.8]")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha, 0 = off [1.0]")
    g.add_argument("--mixup-prob", type=float, default=d.mixup_prob,
                   help=f"probability of mixing a batch (default {d.mixup_prob}) [1.0]")
    g.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob,
                   help=f"with both on: probability of cutmix instead of mixup (default {d.mixup_switch_prob}) [0.5]")
    g.add_argument("--mixup-mode", choices=MIXUP_MODES, default=d.mixup_mode,
                   help=f"one mixing weight per batch, pair or element (default {d.mixup_mode}) [batch]")
    g.add_argument("--aa", default=d.aa, metavar="POLICY",
                   help="RandAugment policy in timm's syntax; default none [rand-m9-mstd0.5-inc1]")
    g.add_argument("--reprob", type=float, default=d.reprob, help="random-erasing probability (default 0) [0.25]")
    g.add_argument("--remode", choices=ERASE_MODES, default=d.remode,
                   help=f"random-erasing fill (default {d.remode}) [pixel]")
    g.add_argument("--recount", type=positive_int, default=d.recount,
                   help=f"random-erasing boxes per image (default {d.recount}) [1]")
    g.add_argument("--global-pool", choices=GLOBAL_POOLS, default=d.global_pool,
                   help="classifier feature: avg (default: fc_norm of the patch-token mean) or cls "
                        "(the encoder's final norm of the cls token) [avg]")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup in epochs, instead of --warmup-steps [5]")


def cmd_finetune(args) -> int:
    if not args.resume and not args.checkpoint:
        raise GMAEError("give --checkpoint (the pre-trained model to fine-tune), or --resume to continue a run")
    d = FinetuneConfig()
    fcfg = FinetuneConfig(
        checkpoint=str(args.checkpoint or ""), data=args.data, epochs=args.epochs, steps=args.steps or 0,
        batch_size=args.batch_size, blr=args.blr,
        warmup_steps=d.warmup_steps if args.warmup_steps is None else args.warmup_steps,
        weight_decay=args.weight_decay, layer_decay=args.layer_decay, drop_path=args.drop_path,
        smoothing=args.smoothing, clip_grad=args.clip_grad, random_init=args.random_init, seed=args.seed,
        device=args.device or d.device, out=args.out, eval_every=args.eval_every or 0,
        checkpoint_every=args.checkpoint_every or 0, keep_checkpoints=args.keep_checkpoints or d.keep_checkpoints,
        num_workers=d.num_workers if args.num_workers is None else args.num_workers, precision=args.precision,
        raw_weights=args.raw_weights, input_norm=args.input_norm or "", recipe=args.recipe or "",
        **{k: getattr(args, k) for k in FINETUNE_TIMM_FIELDS if k != "warmup_epochs"},
        # A typed --warmup-steps replaces a recipe's warmup epochs (typing both is refused by check_warmup).
        warmup_epochs=d.warmup_epochs if args.warmup_epochs is None or (
            "warmup_steps" in args.typed and "warmup_epochs" not in args.typed) else args.warmup_epochs,
    )
    if not args.resume:
        fcfg.check_warmup()
    if args.checkpoint:
        _check_checkpoint(args.checkpoint)
    check_output_folder(fcfg.out)
    from .evaluate.finetune import finetune

    summary = finetune(fcfg, resume=args.resume, progress=not (args.quiet or args.json),
                       changes=tuple(k for k in FINETUNE_RESUMABLE if k in args.typed), given=args.typed)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"done: {summary['steps_run']} steps; final val top-1 {100 * summary['val_acc']:.2f}% "
          f"(best {100 * summary['best_val_acc']:.2f}%) on {summary['num_val']} images")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['out']}/metrics.jsonl")
    return 0


# --------------------------------------------------------------------------- recipes


def add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="the named recipes (MAE's, the GMAE paper's, the authors' code's, tiny) "
                       "for --recipe of pretrain, finetune and probe, with where each value comes from")
    p.add_argument("name", nargs="?", default=None, help="a recipe: print its values and their citations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args) -> int:
    if args.name is None:
        if args.json:
            print(json.dumps([{k: recipe_json(r)[k] for k in ("name", "command", "summary")}
                              for r in RECIPES.values()]))
            return 0
        width = max(map(len, RECIPES))
        print(f"{'recipe':<{width}}  {'command':<8}  summary")
        for r in RECIPES.values():
            print(f"{r.name:<{width}}  {r.command:<8}  {r.summary}")
        print(f"\nuse: gmae COMMAND --recipe NAME ...; gmae recipes NAME shows its values")
        return 0
    recipe = get_recipe(args.name)
    if args.json:
        print(json.dumps(recipe_json(recipe)))
        return 0
    print(f"{recipe.name} (gmae {recipe.command} --recipe {recipe.name}): {recipe.summary}")
    # Each value under the flag that sets it (a pending one, whose flag is not built yet, under its dest's name).
    actions = {a.dest: a for a in build_parser().commands[recipe.command]._actions if a.option_strings}
    flags = {dest: a.option_strings[0] for dest, a in actions.items()}
    # A switch's False under the flag that sets it (--no-head-bias), which is what a command line would type.
    flags.update({dest: a.option_strings[-1] for dest, a in actions.items()
                  if isinstance(a, argparse.BooleanOptionalAction) and recipe.values.get(dest, (None,))[0] is False})
    names = {dest: flags.get(dest, f"--{dest.replace('_', '-')}") for dest in recipe.values}
    width = max(map(len, names.values()))
    for dest, (value, cite) in recipe.values.items():
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        print(f"  {names[dest]:<{width}}  {shown:<20}  {cite}")
    values = recipe.settings()
    if "blr" in values and "batch_size" in values:  # the peak lr the linear scaling rule makes of them
        print(f"  (lr = blr x batch / 256 = {values['blr'] * values['batch_size'] / 256:g})")
    if recipe.notes:
        print("not reproduced:")
        for note in recipe.notes:
            print(f"  - {note}")
    return 0


# --------------------------------------------------------------------------- plot


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="training curves (loss, lr and every other logged metric) of one or more runs, "
                       "on shared axes")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of gmae pretrain or finetune "
                   "(or their metrics.jsonl files)")
    p.add_argument("--out", required=True, help="the image file to write: FILE.png (or .pdf, .svg, ...); a name "
                   "without an extension gets .png (the name written is printed)")
    p.add_argument("--smooth", type=positive_int, default=None,
                   help="moving-average window of the loss, in logged steps (default: 1/50 of the longest run)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    check_output_file(args.out)
    from .viz.plot import figure_path, plot_runs  # matplotlib, no torch

    out = check_output_file(figure_path(args.out))  # the file written, which is the name printed
    print(plot_runs(args.runs, out, smooth=args.smooth))
    return 0


# --------------------------------------------------------------------------- submit


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run gmae pretrain or finetune as a SLURM job through submitit, requeued on a "
                       f"time limit or preemption ({cluster.INSTALL})")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: a CPU job)")
    p.add_argument("--tasks-per-node", type=positive_int, default=None,
                   help="processes per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None, help="CPU cores per process")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", type=cluster.time_minutes, default=60, metavar="LIMIT",
                   help="the job's time limit, as sbatch --time: minutes, H:MM:SS or D-HH:MM:SS (default 60 minutes); "
                        "the job requeues itself when it is reached")
    p.add_argument("--signal-delay", type=positive_int, default=120, metavar="S",
                   help="seconds before the time limit at which the run is told to save and requeue (default 120)")
    p.add_argument("--folder", default=None,
                   help="folder for submitit's job files and each task's log (default: the command's --out/submitit)")
    p.add_argument("--name", default="gmae", help="the job's name (default gmae)")
    p.add_argument("--slurm", type=cluster.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch option, e.g. --slurm account=myproj --slurm qos=high (repeatable)")
    p.add_argument("--cluster", default=None, choices=("slurm", "local"),
                   help="slurm (default when sbatch is available) or local: the tasks on this machine, for a test")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and report how it ended")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help=f"the command to run, with its flags: {' or '.join(cluster.SUBMITTABLE)} ... (it runs with "
                        "--resume=auto)")
    p.set_defaults(func=cmd_submit)


class TrainingJob:
    """What each task of a submitted job runs: `gmae COMMAND ...` in this process, under torch.distributed when
    the job has several tasks. Checkpointable: its requeue runs the same command (which has --resume=auto)."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            dist = submitit.helpers.TorchDistributedEnvironment()
            if job.cluster in ("local", "debug"):
                dist.master_addr = "127.0.0.1"  # one machine: no name lookup
            # Each process picks its GPU by LOCAL_RANK (gmae.runtime.distributed), so all stay visible.
            dist.export(set_cuda_visible_devices=False, overwrite=True)
        from .runtime.stopping import STOPPED_EXIT, Stopped

        try:
            status = run(self.argv)
        except Stopped as stop:
            print(f"gmae {self.argv[0]}: {stop}", file=sys.stderr, flush=True)
            if stop.signum != job._usr_sig() and stop.signal_name != "SIGUSR1":
                raise SystemExit(STOPPED_EXIT) from None  # SIGTERM: cancelled, or preempted (SLURM requeues)
            self._requeue(job, stop.signum)
            return STOPPED_EXIT  # a task other than the first: the first requeues the job
        if status:
            raise RuntimeError(f"gmae {' '.join(self.argv)} exited with status {status}; see this task's log")
        return status

    @staticmethod
    def _requeue(job, signum: int) -> None:
        """The time limit's signal: requeue the job as submitit does on it (task 0 only; it exits)."""
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        paths = job.paths
        SignalHandler(job, paths, DelayedSubmission.load(paths.submitted_pickle)).checkpoint_and_try_requeue(signum)

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on requeue: the same command, which continues with --resume=auto."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.argv))


def _check_job(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """gmae submit: the command to run must be pretrain or finetune with flags that parse; finetune takes one task."""
    if not args.job or args.job[0] not in cluster.SUBMITTABLE:
        given = f"; got {args.job[0]!r}" if args.job else ""
        parser.commands["submit"].error(f"give the command to run after submit's own flags: "
                                        f"{' or '.join(cluster.SUBMITTABLE)} with its flags{given}")
    args.job_args = parse_args(args.job)
    if args.job[0] == "finetune" and args.nodes * (args.tasks_per_node or max(1, args.gpus_per_node)) > 1:
        parser.commands["submit"].error("gmae finetune runs in one process: give --nodes 1 and one task "
                                        "(--tasks-per-node 1, or --gpus-per-node 1)")


def cmd_submit(args) -> int:
    inner = args.job_args
    check_output_folder(inner.out)
    saved = list_checkpoints(inner.out)
    if not inner.resume and saved:
        raise GMAEError(f"{inner.out} already holds checkpoints of another run; add --resume to continue it "
                        "or choose a new --out")
    if inner.resume is True and not saved:
        raise GMAEError(f"--resume: there is no checkpoint in {inner.out} to continue; drop --resume to start "
                        "a new run there (the job continues its own checkpoints when requeued)")
    folder = args.folder or str(Path(inner.out) / "submitit")
    check_output_folder(folder)
    job = cluster.submit(TrainingJob(cluster.job_command(args.job)), folder, cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                         partition=args.partition, time_min=args.time, name=args.name,
                         signal_delay_s=args.signal_delay, slurm=dict(args.slurm))
    print(f"submitted job {job.job_id}: gmae {' '.join(args.job)} (it runs with --resume=auto)")
    print(f"logs:  {folder}/{job.job_id}_*_log.out and .err (one per task)")
    print(f"where it stands: gmae info {inner.out}   gmae plot {inner.out} --out curves.png")
    if not args.wait:
        return 0
    try:
        job.results()  # every task's
    except Exception as e:  # submitit's UncompletedJobError / FailedJobError: the task's traceback is in its log
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GMAEError(f"job {job.job_id} did not finish ({first}); see {folder}/{job.job_id}_0_log.err") from None
    print(f"job {job.job_id} finished: {list_checkpoints(inner.out)[-1]}")
    return 0


# --------------------------------------------------------------------------- main


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (with where to look), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The commands that compute with torch (and so take --threads; info runs its model on a few images); export only
# reads and writes files.
COMPUTING = ("pretrain", "reconstruct", *READOUTS, "eval-zeroshot", "ablate", "info", "bench", "probe", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gmae", description="Gaussian Masked Autoencoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_pretrain, add_reconstruct, add_readouts, add_eval_zeroshot, add_ablate, add_info, add_export, add_bench,
                add_probe, add_finetune, add_recipes, add_plot, add_submit):
        add(sub)
    parser.commands = sub.choices  # {name: its parser}, so that its own errors name it
    for name in COMPUTING:
        sub.choices[name].add_argument(
            "--threads", type=int, default=None, metavar="N",
            help="CPU threads of this process (default: OMP_NUM_THREADS if set, else usable cores / processes "
                 "on this machine under torchrun)")
    return parser


def _apply_recipe(p: argparse.ArgumentParser, command: str, name: str) -> None:
    """Make recipe `name`'s values the defaults of `command`'s parser `p` (its actions' own defaults, not
    set_defaults', so that _typed_options still sees only what was typed)."""
    actions = {a.dest: a for a in p._actions if a.option_strings}
    try:
        values = recipe_defaults(name, command, actions)
    except GMAEError as e:
        p.error(str(e))
    for dest, value in values.items():
        actions[dest].default = value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of one command; a flag that command does not know is reported by that command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "recipe", None):  # the recipe's values become the defaults; then what was typed wins
        _apply_recipe(parser.commands[args.command], args.command, args.recipe)
        args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.typed = _typed_options(parser, argv, args.command)  # what --resume compares with the saved settings
    if args.command == "submit":
        _check_job(parser, args)
    return args


def _interrupted(args) -> str:
    """What a Ctrl-C leaves behind, said for the command that was running."""
    if args.command in ("pretrain", "finetune"):
        from .io.files import list_checkpoints

        kept = list_checkpoints(args.out)
        if kept:
            return f"interrupted; {args.out} keeps its checkpoints up to {kept[-1].name}: add --resume to continue"
        return f"interrupted before the first checkpoint, so {args.out} holds nothing to resume; run again to start over"
    if args.command == "ablate":
        return "interrupted; finished runs, scores and checkpoints are kept: run the same command again to continue"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    """The `gmae` command; a run stopped by a signal (gmae.runtime.stopping) says so and exits with STOPPED_EXIT (75)."""
    from .runtime.stopping import STOPPED_EXIT, Stopped

    try:
        return run(argv)
    except Stopped as stop:
        print(f"gmae {(sys.argv[1:] if argv is None else argv)[0]}: {stop}", file=sys.stderr)
        return STOPPED_EXIT


def run(argv: list[str] | None = None) -> int:
    """main without the handling of a signal's stop: a stopped pretrain or finetune raises gmae.runtime.stopping.Stopped."""
    # Before anything imports torch: OpenMP reads its wait policy once, when torch loads it.
    threads.prepare_environment()
    args = parse_args(argv)
    if args.command == "pretrain":  # `srun gmae pretrain` with several tasks: data-parallel, as under torchrun
        os.environ.update(cluster.slurm_task_env())
    try:
        if args.command in COMPUTING:
            threads.configure(args.threads)
        return args.func(args)
    except GMAEError as e:
        print(f"gmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmae {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
