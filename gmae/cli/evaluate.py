"""The evaluations: ablate, probe (linear, kNN, MAE's protocol, the scene probes), finetune."""

from __future__ import annotations

import json

from ..config import ERASE_MODES, FINETUNE_RESUMABLE, FinetuneConfig, GLOBAL_POOLS, MIXUP_MODES
from ..config.choices import (
    EXTRACTION_BATCH, PROBE_DEFAULTS, PROBE_PROTOCOLS, SCENE_DATA, SCENE_IMAGES, SCENE_TASKS, positive_int, workers,
)
from ..errors import GMAEError
from ..io.files import check_output_folder
from .common import (
    CHECKPOINT_HELP, _add_device, _add_dist_timeout, _add_encoder_norm, _add_raw_weights, _add_recipe, _add_resume,
    _add_stop_grace, _check_checkpoint, _resolve_device, _say_weights,
)


def add_ablate(sub) -> None:
    from ..evaluate.ablate import VARIANTS

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
    from ..evaluate.ablate import format_table, run_ablation

    rows = run_ablation(args.out, args.only, args.steps, args.seed, args.data, args.probe_data,
                        evaluate=not args.no_eval, progress=not args.json, seeds=args.seeds)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


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
    _add_device(p)
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
    from ..io.checkpoint import configs_of
    from ..io.loader import load

    try:
        tcfg = configs_of(load(path, "state"))[1]
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
    from ..evaluate.probe import probe, random_encoder
    from ..io.loader import load

    encoder, mcfg = load(args.checkpoint, "encoder", raw=args.raw_weights, input_norm=args.input_norm)
    _resolve_device(args)
    if not args.random_init:
        _say_weights(encoder.loaded_weights, args.raw_weights)
    encoders = {"pre-trained": encoder}
    if args.random_init or args.baseline:
        baseline = random_encoder(mcfg, _run_seed(args.checkpoint, args.seed))
        encoders = {"random init": baseline} if args.random_init else {**encoders, "random init": baseline}
    if args.data in SCENE_DATA:
        return _scene_probe(args, encoders, mcfg, extraction, linear)
    from ..data.labelled import build_labelled

    # built once when the baseline is probed too; with augment=True only load(index, rng) augments (mae's training)
    data = build_labelled(args.data, mcfg.img_size, augment=args.protocol == "mae", progress=not args.json)
    results = {label: probe(enc, data, batch_size=extraction, device=args.device, pool=args.pool, k=args.k,
                            T=args.temperature, seed=args.seed, progress=not args.json, protocol=args.protocol,
                            **linear)
               for label, enc in encoders.items()}
    from ..runtime.distributed import rank_from_env

    if rank_from_env() != 0:  # a torchrun job (--protocol mae): the first process reports
        return 0
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
    from ..data.scenes import SPLIT_SEEDS, scene_labels
    from ..evaluate.scene import scene_probe

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
    p.add_argument("--accum-steps", type=positive_int, default=d.accum_steps,
                   help="split each process's batch into this many micro-batches (same result, less memory); "
                        "--batch-size stays the global batch")
    p.add_argument("--max-bad-steps", type=positive_int, default=d.max_bad_steps,
                   help=f"non-finite steps in a row (each skipped) before the run gives up (default {d.max_bad_steps})")
    p.add_argument("--random-init", action="store_true",
                   help="fine-tune the checkpoint's architecture from fresh weights (the from-scratch baseline)")
    _add_raw_weights(p)
    _add_encoder_norm(p)
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between val evaluations (default: an epoch)")
    _add_stop_grace(p, d.stop_grace)
    _add_dist_timeout(p, d.dist_timeout)
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints (default: an epoch)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=None,
                   help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    _add_resume(p, FINETUNE_RESUMABLE, "--quiet", "--json")
    p.add_argument("--seed", type=int, default=d.seed)
    _add_device(p, None)
    p.add_argument("--num-workers", type=workers, default=None, metavar="N|auto",
                   help="data-loading processes (default auto: for an image folder on a GPU, the cores of this "
                        "process, at most 10; otherwise 0)")
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


# gmae finetune's MAE regularisers and pooling: (flag, argparse keywords, help, MAE's ViT-B value); each default is
# FinetuneConfig's, so the help cannot drift from it.
_TIMM_FLAGS = (
    ("--mixup", dict(type=float), "mixup alpha, 0 = off", "0.8"),
    ("--cutmix", dict(type=float), "cutmix alpha, 0 = off", "1.0"),
    ("--mixup-prob", dict(type=float), "probability of mixing a batch", "1.0"),
    ("--mixup-switch-prob", dict(type=float), "with both on: probability of cutmix instead of mixup", "0.5"),
    ("--mixup-mode", dict(choices=MIXUP_MODES), "one mixing weight per batch, pair or element", "batch"),
    ("--aa", dict(metavar="POLICY"), "RandAugment policy in timm's syntax", "rand-m9-mstd0.5-inc1"),
    ("--reprob", dict(type=float), "random-erasing probability", "0.25"),
    ("--remode", dict(choices=ERASE_MODES), "random-erasing fill", "pixel"),
    ("--recount", dict(type=positive_int), "random-erasing boxes per image", "1"),
    ("--global-pool", dict(choices=GLOBAL_POOLS), "classifier feature: avg (fc_norm of the patch-token mean) or cls "
                                                   "(the encoder's final norm of the cls token)", "avg"),
)


def _add_finetune_timm(p, d: FinetuneConfig) -> None:
    """gmae finetune's MAE regularisers (timm's; `pip install 'gmae[timm]'` when one is on) and pooling."""
    g = p.add_argument_group("MAE's regularisers, from timm (off by default; MAE's ViT-B value in brackets)")
    for flag, keywords, text, mae in _TIMM_FLAGS:
        default = getattr(d, flag[2:].replace("-", "_"))
        shown = "none" if default in ("", None) else default
        g.add_argument(flag, default=default, help=f"{text} (default {shown}) [{mae}]", **keywords)
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
        smoothing=args.smoothing, clip_grad=args.clip_grad, accum_steps=args.accum_steps,
        max_bad_steps=args.max_bad_steps, random_init=args.random_init, seed=args.seed,
        device=args.device or d.device, out=args.out, eval_every=args.eval_every or 0,
        stop_grace=d.stop_grace if args.stop_grace is None else args.stop_grace,
        dist_timeout=d.dist_timeout if args.dist_timeout is None else args.dist_timeout,
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
    from ..evaluate.finetune import finetune

    summary = finetune(fcfg, resume=args.resume, progress=not (args.quiet or args.json),
                       changes=tuple(k for k in FINETUNE_RESUMABLE if k in args.typed), given=args.typed)
    if summary is None:  # not the main process of a torchrun job
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"done: {summary['steps_run']} steps; final val top-1 {100 * summary['val_acc']:.2f}% "
          f"(best {100 * summary['best_val_acc']:.2f}%) on {summary['num_val']} images")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['out']}/metrics.jsonl")
    return 0
