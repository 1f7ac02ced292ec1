"""gmae pretrain: its flags (its own, and those of ModelConfig's and TrainConfig's fields) and the run."""

from __future__ import annotations

from ..config import PRESETS, PRETRAIN_RESUMABLE, ModelConfig, TrainConfig
from ..config.recipes import check_schedule, pretrain_configs
from ..io.files import check_exists, check_output_folder
from .common import _add_recipe, _add_resume, _count
from .flags import add_config_flags, config_settings


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train GMAE or MAE (default: tiny preset on dead-leaves, CPU, a few minutes)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
    _add_recipe(p, "pretrain")
    _add_resume(p, PRETRAIN_RESUMABLE, "--quiet", "--tensorboard")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics for TensorBoard in --out/tensorboard (pip install 'gmae[tensorboard]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # Every other flag is a config field's (gmae.config: its help, type and choices are written there).
    add_config_flags(p, TrainConfig, "the run")
    add_config_flags(p, ModelConfig, "the model (a flag not given: the preset's value, or the recipe's)")
    p.set_defaults(func=cmd_pretrain)


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a `gmae pretrain` command line: gmae.config.recipes.pretrain_configs of its recipe and preset,
    with the flags typed on it applied on top (a typed --steps replaces the recipe's --epochs, and so on; typing
    both of a pair is refused, naming the flags)."""
    check_schedule(args.typed)
    typed = {k: v for k, v in config_settings(args, ModelConfig, TrainConfig).items()
             if k in args.typed and k != "recipe"}
    return pretrain_configs(args.recipe, args.preset if "preset" in args.typed else None, **typed)


def cmd_pretrain(args) -> int:
    mcfg, tcfg = configs_from_args(args)
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
