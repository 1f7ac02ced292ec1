"""What the commands share: help texts, argument types and checks, loading a model, --resume, the typed flags."""

from __future__ import annotations

import argparse
import json

from ..config import INPUT_NORMS
from ..config.choices import CHECKPOINT_HELP, DEVICE_HELP, ENCODER_NORM_HELP, RAW_WEIGHTS_HELP
from ..config.recipes import RECIPES
from ..errors import GMAEError
from ..io.files import check_exists


RESUME_HELP = ("continue the newest checkpoint in --out (an error if there is none; --resume=auto: "
               "continue if there is one, else start) with its saved settings. A flag given with --resume that "
               "contradicts them is refused, except those a resume may change: {}")


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
    """--normalize for the commands that read an encoder from any ViT file (gmae.io.loader.load)."""
    p.add_argument("--normalize", dest="input_norm", default=None, choices=INPUT_NORMS, help=ENCODER_NORM_HELP)


def _say_weights(label: str | None, raw: bool) -> None:
    """One line on stderr naming the weights a command uses, when it had a choice (gmae.io.checkpoint.weights_line)."""
    from ..io.checkpoint import weights_line
    from ..io.runs import say

    line = weights_line(label, raw)
    if line:
        say(line)


def _load_model(args, **kw):
    """gmae.io.loader.load of ``args.checkpoint`` on ``args.device`` with the weights ``--raw-weights`` picks,
    saying which (model, ModelConfig, checkpoint dict)."""
    from ..io.loader import load

    model, mcfg, state = load(args.checkpoint, "model", _resolve_device(args), raw=args.raw_weights, **kw)
    _say_weights(state["weights"], args.raw_weights)
    return model, mcfg, state


def _add_resume(p, resumable: tuple[str, ...], *logging: str, config=None) -> None:
    """--resume, whose help lists the flags a resume may change: the `resumable` settings (by the flags of
    the dataclass `config`'s fields where it is given), --threads, --out and the `logging` flags."""
    from .flags import flag_fields, option_strings

    named = {f.name: option_strings(f)[0] for f in (flag_fields(config) if config is not None else ())}
    flags = [named.get(name, f"--{name.replace('_', '-')}") for name in resumable] + ["--threads", *logging, "--out"]
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help=RESUME_HELP.format(", ".join(flags)))


def _add_training(p, resumable: tuple[str, ...], config, printed: str) -> None:
    """The flags of a command that trains on the engine: --resume, --quiet, --json (prints the `printed`), then
    one flag per field of the dataclass `config` (gmae.config: their help, type and choices are written there)."""
    from .flags import add_config_flags

    _add_resume(p, resumable, "--quiet", "--json", config=config)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help=f"print the {printed} as one JSON object")
    add_config_flags(p, config)


def _train(args, train, cfg, resumable: tuple[str, ...]) -> dict | None:
    """Run `train` (gmae.evaluate.finetune.finetune, gmae.evaluate.detection.train.detect) on `cfg` as the command
    line asks (--resume, --quiet, --json, the typed flags); its summary for the command to print, or None when
    there is nothing more to print (--json printed it; not the main process of a torchrun job)."""
    summary = train(cfg, resume=args.resume, progress=not (args.quiet or args.json),
                    changes=tuple(k for k in resumable if k in args.typed), given=args.typed)
    if summary is not None and args.json:
        print(json.dumps(summary))
        return None
    return summary


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


def _add_recipe(p, command: str) -> None:
    names = [name for name, r in RECIPES.items() if r.command == command]
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help=f"start from a named recipe's settings (flags given here override them): {', '.join(names)}; "
                        "gmae recipes NAME prints its values and where each comes from")


def _add_device(p, default: str | None = "auto", extra: str = "") -> None:
    p.add_argument("--device", default=default, help=DEVICE_HELP + extra)


def _resolve_device(args) -> str:
    """`args.device` made concrete (auto: CUDA when available, else the CPU), once the command's cheap checks have
    passed: this imports torch."""
    from ..runtime.distributed import resolve_device

    args.device = str(resolve_device(args.device))
    return args.device
