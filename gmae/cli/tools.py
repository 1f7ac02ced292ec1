"""The tools around runs: bench, export, recipes, plot."""

from __future__ import annotations

import argparse
import json

from ..config.choices import BENCHMARKS, EXPORT_FORMATS, positive_int
from ..config.recipes import RECIPES, get_recipe, recipe_json
from ..io.files import check_output_file
from .common import (
    CHECKPOINT_HELP, _add_device, _add_raw_weights, _check_checkpoint, _resolve_device, _say_weights,
)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed ratios measured in one run (renderer speed-ups, GMAE/MAE step time)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="batch of step_ratio_tiny and of many_gaussians' tiny row (default 32)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per figure (median)")
    _add_device(p, extra="; on CUDA the fast backend is triton, else gsplat")
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
    from ..bench.suite import format_results, run

    results = run(args.only, device=_resolve_device(args), repeats=args.repeats, batch_size=args.batch_size,
                  precision=args.precision, compile=args.compile,
                  render=dict(batch=args.render_batch, ks=tuple(args.render_k), size=args.render_size))
    print(json.dumps(results) if args.json else format_results(results))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model for sharing (safetensors: no code runs on load)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", default="safetensors", choices=list(EXPORT_FORMATS),
                   help="safetensors (default): the whole gmae model; timm: the encoder only, under timm's "
                        "VisionTransformer names (.safetensors or .pth); mae: the same encoder as "
                        "{'model': state_dict} in a .pth, the file MAE's main_finetune.py/main_linprobe.py "
                        "--finetune and ViTDet's train.init_checkpoint take")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors or vit.pth")
    _add_raw_weights(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    _check_checkpoint(args.checkpoint)
    check_output_file(args.out)
    from ..io.checkpoint import configs_of, model_weights
    from ..io.export import export_checkpoint, timm_create_call
    from ..io.loader import load

    state = load(args.checkpoint, "state")  # read once: the export and the lines below both need it
    out = export_checkpoint(args.checkpoint, args.out, fmt=args.format, raw=args.raw_weights, state=state)
    print(out)
    _say_weights(model_weights(state, args.raw_weights, args.checkpoint)[1], args.raw_weights)
    mcfg, _ = configs_of(state)
    if args.format == "timm":
        print(f"load in timm: {timm_create_call(mcfg, out)}")
    if args.format == "mae":
        print(f"load in MAE: main_finetune.py --finetune {out} (or main_linprobe.py); in ViTDet: "
              f"train.init_checkpoint={out}?matching_heuristics=True (docs/evaluation.md)")
        if mcfg.input_norm != "imagenet":
            print("note: this encoder learnt on [0, 1] images, while MAE's and ViTDet's data pipelines normalise "
                  "with ImageNet's mean and std (see docs/evaluation.md)")
    return 0


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
    actions = {a.dest: a for a in args.commands[recipe.command]._actions if a.option_strings}
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
    from ..viz.plot import figure_path, plot_runs  # matplotlib, no torch

    out = check_output_file(figure_path(args.out))  # the file written, which is the name printed
    print(plot_runs(args.runs, out, smooth=args.smooth))
    return 0
