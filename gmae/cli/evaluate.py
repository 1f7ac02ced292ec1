"""The evaluations: ablate, probe (linear, kNN, MAE's protocol, the scene probes), finetune."""

from __future__ import annotations

import json

from ..config import FINETUNE_RESUMABLE, FinetuneConfig
from ..config.choices import (
    EXTRACTION_BATCH, LABELLED_DATA_HELP, PROBE_DEFAULTS, PROBE_PROTOCOLS, SCENE_DATA, SCENE_IMAGES, SCENE_TASKS,
    positive_int,
)
from ..errors import GMAEError
from ..io.files import check_output_folder
from .common import (
    CHECKPOINT_HELP, _add_device, _add_encoder_norm, _add_raw_weights, _add_recipe, _add_resume, _check_checkpoint,
    _resolve_device, _say_weights,
)
from .flags import add_config_flags, config_settings


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
    from ..io.export import load_state

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
    from ..evaluate.probe import probe, random_encoder
    from ..io.export import load_encoder

    encoder, mcfg = load_encoder(args.checkpoint, raw=args.raw_weights, input_norm=args.input_norm)
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
    p = sub.add_parser("finetune", help="fine-tune a pre-trained encoder as a classifier (MAE's recipe)")
    _add_recipe(p, "finetune")
    _add_resume(p, FINETUNE_RESUMABLE, "--quiet", "--json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    # Every other flag is a FinetuneConfig field's (gmae.config: its help, type and choices are written there).
    add_config_flags(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    if not args.resume and not args.checkpoint:
        raise GMAEError("give --checkpoint (the pre-trained model to fine-tune), or --resume to continue a run")
    values = config_settings(args, FinetuneConfig)
    if "warmup_steps" in args.typed and "warmup_epochs" not in args.typed:
        values.pop("warmup_epochs", None)  # a typed --warmup-steps replaces a recipe's warmup epochs
    fcfg = FinetuneConfig(**values)
    if not args.resume:
        fcfg.check_warmup()
    if args.checkpoint:
        _check_checkpoint(args.checkpoint)
    check_output_folder(fcfg.out)
    from ..evaluate.finetune import finetune

    summary = finetune(fcfg, resume=args.resume, progress=not (args.quiet or args.json),
                       changes=tuple(k for k in FINETUNE_RESUMABLE if k in args.typed), given=args.typed)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"done: {summary['steps_run']} steps; final val top-1 {100 * summary['val_acc']:.2f}% "
          f"(best {100 * summary['best_val_acc']:.2f}%) on {summary['num_val']} images")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['out']}/metrics.jsonl")
    return 0
