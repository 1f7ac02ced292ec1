"""gmae pretrain: its flags (the model, the data, the schedule, the authors' options, the recipes) and the run."""

from __future__ import annotations

import argparse

from ..config import (
    CAMERAS, DEPTH_GRADS, DEPTH_PARAMS, HEAD_INITS, INPUT_NORMS, INTERPOLATIONS, LOSSES, MODELS, PATCH_BIAS_INITS,
    PIXEL_ORIGINS, POSITION_PARAMS, POSITION_SOURCES, PRESETS, PRETRAIN_RESUMABLE, QUERY_INITS, ROTATION_PARAMS,
    TILE_CUTS, TrainConfig, model_config, train_config,
)
from ..config.choices import positive_int, workers
from ..config.recipes import check_schedule
from ..io.files import check_exists, check_output_folder
from .common import (
    _add_device, _add_dist_timeout, _add_recipe, _add_resume, _add_stop_grace, _background, _count,
)


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
    _add_device(p, None)
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (tiny: 400)")
    p.add_argument("--num-workers", type=workers, metavar="N|auto",
                   help="data-loading processes (default auto: for an image folder on a GPU, the cores of this "
                        "process, at most 10; otherwise 0)")
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
    _add_stop_grace(p, d.stop_grace)
    _add_dist_timeout(p, d.dist_timeout)
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
        stop_grace=args.stop_grace, dist_timeout=args.dist_timeout,
        # recipes (gmae.config.recipes)
        recipe=args.recipe or "", weight_decay=args.weight_decay, betas=args.betas, crop_scale=args.crop_scale,
        interpolation=args.interpolation, **_pretrain_schedule(args),
    )
    check_output_folder(tcfg.out)
    if args.tensorboard:
        from ..viz.board import check_available

        check_available()
    if args.init_encoder:
        check_exists(args.init_encoder, "--init-encoder", "give a gmae checkpoint or export, or a timm / MAE ViT file")
    from ..train import pretrain  # torch: only once the arguments are known to be good

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
