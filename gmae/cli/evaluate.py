"""The evaluations: ablate, probe (linear, kNN, MAE's protocol, the scene probes), finetune."""

from __future__ import annotations

import json

from ..config import FINETUNE_RESUMABLE, FinetuneConfig, ProbeConfig
from ..config.choices import SCENE_DATA, SCENE_TASKS, positive_int
from ..errors import GMAEError
from ..io.files import check_output_folder
from .common import (
    CHECKPOINT_HELP, _add_device, _add_encoder_norm, _add_raw_weights, _add_recipe, _add_training, _check_checkpoint,
    _resolve_device, _say_weights, _train,
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
    _add_raw_weights(p)
    _add_encoder_norm(p)
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_recipe(p, "probe")
    # Every other flag is a ProbeConfig field's (gmae.config: its help, type and choices are written there).
    add_config_flags(p, ProbeConfig)
    p.set_defaults(func=cmd_probe)


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
    pcfg = ProbeConfig(**config_settings(args, ProbeConfig))
    if args.task and pcfg.data not in SCENE_DATA:
        raise GMAEError(f"--task is for the scene probes: give --data {' or '.join(SCENE_DATA)} "
                        f"(got --data {pcfg.data})")
    extraction, linear = pcfg.linear()
    points = [t for t in (args.task or ()) if t not in ("count", "shape")]
    if pcfg.protocol == "mae" and pcfg.data in SCENE_DATA and points:
        raise GMAEError(f"--task {points[0]} reads marked points: only --protocol cached probes it; with "
                        "--protocol mae give --task count and/or --task shape")
    _check_checkpoint(args.checkpoint)
    from ..evaluate.probe import format_probe, probe, random_encoder
    from ..io.loader import load

    encoder, mcfg = load(args.checkpoint, "encoder", raw=args.raw_weights, input_norm=args.input_norm)
    _resolve_device(args)
    if not args.random_init:
        _say_weights(encoder.loaded_weights, args.raw_weights)
    encoders = {"pre-trained": encoder}
    if args.random_init or args.baseline:
        baseline = random_encoder(mcfg, _run_seed(args.checkpoint, pcfg.seed))
        encoders = {"random init": baseline} if args.random_init else {**encoders, "random init": baseline}
    if pcfg.data in SCENE_DATA:
        return _scene_probe(args, pcfg, encoders, mcfg, extraction, linear)
    from ..data.labelled import build_labelled

    # built once when the baseline is probed too; with augment=True only load(index, rng) augments (mae's training)
    data = build_labelled(pcfg.data, mcfg.img_size, augment=pcfg.protocol == "mae", progress=not args.json)
    results = {label: probe(enc, data, batch_size=extraction, device=args.device, pool=pcfg.pool, k=pcfg.k,
                            T=pcfg.temperature, seed=pcfg.seed, progress=not args.json, protocol=pcfg.protocol,
                            **linear)
               for label, enc in encoders.items()}
    from ..runtime.distributed import rank_from_env

    if rank_from_env() != 0:  # a torchrun job (--protocol mae): the first process reports
        return 0
    result = next(iter(results.values()))
    result.update(checkpoint=str(args.checkpoint), data=pcfg.data, random_init=args.random_init,
                  weights=None if args.random_init else encoder.loaded_weights, input_norm=mcfg.input_norm,
                  **_probe_record(args))
    if args.baseline:
        result["baseline"] = {key: results["random init"][key] for key in ("linear_acc", "knn_acc")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_probe(results, str(args.checkpoint), pcfg.data))
    return 0


def _probe_record(args) -> dict:
    """What a probe's --json records of how it ran: its recipe and every setting it used."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
                if k not in ("func", "typed", "command", "json")}
    return {"recipe": args.recipe or "", "settings": settings}


def _scene_probe(args, pcfg: ProbeConfig, encoders: dict, mcfg, extraction: int, linear: dict) -> int:
    """`gmae probe --data deadleaves|sprites`: the scene tasks, each encoder on the same labels."""
    from ..data.scenes import SPLIT_SEEDS, scene_labels
    from ..evaluate.scene import format_scene_table, scene_probe

    tasks = SCENE_TASKS if not args.task or "all" in args.task else tuple(dict.fromkeys(args.task))
    if pcfg.protocol == "mae" and (not args.task or "all" in args.task):
        tasks = ("count", "shape")  # MAE's protocol: the image-level tasks only (see gmae.evaluate.scene)
    progress = not args.json
    labels = (scene_labels(pcfg.data, "train", mcfg.img_size, mcfg.patch_size, pcfg.train_images, progress),
              scene_labels(pcfg.data, "val", mcfg.img_size, mcfg.patch_size, pcfg.val_images, progress))
    results = {label: scene_probe(enc, pcfg.data, tasks, labels, batch_size=extraction, device=args.device,
                                  pool=pcfg.pool, k=pcfg.k, T=pcfg.temperature, seed=pcfg.seed, progress=progress,
                                  protocol=pcfg.protocol, **linear)
               for label, enc in encoders.items()}
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data": pcfg.data, "split_seeds": SPLIT_SEEDS,
                          "weights": getattr(encoders.get("pre-trained"), "loaded_weights", None),
                          "pool": pcfg.pool, "protocol": pcfg.protocol, "input_norm": mcfg.input_norm,
                          **_probe_record(args),
                          **({"tasks": results[next(iter(results))]} if len(results) == 1 else {"encoders": results})}))
        return 0
    print(format_scene_table(results, tasks, f"{args.checkpoint}, {pcfg.data}", pcfg.train_images, pcfg.val_images,
                             pcfg.protocol, linear["epochs"], pcfg.k, pcfg.temperature))
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pre-trained encoder as a classifier (MAE's recipe)")
    _add_recipe(p, "finetune")
    _add_training(p, FINETUNE_RESUMABLE, FinetuneConfig, "summary")
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

    summary = _train(args, finetune, fcfg, FINETUNE_RESUMABLE)
    if summary is None:
        return 0
    print(f"done: {summary['steps_run']} steps; final val top-1 {100 * summary['val_acc']:.2f}% "
          f"(best {100 * summary['best_val_acc']:.2f}%) on {summary['num_val']} images")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['out']}/metrics.jsonl")
    return 0
