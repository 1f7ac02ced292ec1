"""One place per setting: the flags of gmae pretrain and gmae finetune are the config fields' own (gmae.config.setting,
gmae.cli.flags), one flag per field and one field per flag, and a value typed on the command line reaches the config."""

import dataclasses

import pytest

from gmae.cli import build_parser, parse_args
from gmae.cli.flags import config_settings, flag_fields
from gmae.cli.pretrain import configs_from_args
from gmae.config import DetectConfig, FinetuneConfig, ModelConfig, ProbeConfig, TrainConfig

# The configs each command builds from its flags.
CONFIGS = {"pretrain": (ModelConfig, TrainConfig), "finetune": (FinetuneConfig,), "probe": (ProbeConfig,),
           "detect": (DetectConfig,)}

# Flags that are the command's own, not a config field's, and why.
COMMAND_ONLY = {
    "pretrain": {
        "help": "argparse's --help",
        "preset": "names a set of field values (gmae.config.PRESETS), not one field",
        "resume": "continues the run in --out instead of building new configs",
        "tensorboard": "where the metrics go as well, not how the run trains",
        "quiet": "the progress bar, not the run",
        "threads": "this process's CPU threads (gmae.runtime.threads), not the run: every computing command has it",
    },
    "finetune": {
        "help": "argparse's --help",
        "resume": "continues the run in --out instead of building a new config",
        "quiet": "the progress bar, not the run",
        "json": "how the summary is printed",
        "threads": "this process's CPU threads (gmae.runtime.threads), not the run: every computing command has it",
    },
    "detect": {
        "help": "argparse's --help",
        "resume": "continues the run in --out instead of building a new config",
        "quiet": "the progress bar, not the run",
        "json": "how the results are printed",
        "threads": "this process's CPU threads (gmae.runtime.threads), not the run: every computing command has it",
    },
    "probe": {
        "help": "argparse's --help",
        "checkpoint": "which encoder is probed, not how (required, unlike every setting)",
        "random_init": "which weights: fresh ones (a mutually exclusive pair with --baseline)",
        "baseline": "which weights: the trained and fresh ones side by side",
        "task": "which scene tasks to run (repeatable), for --data deadleaves or sprites only",
        "raw_weights": "which weights of the checkpoint, as every command that reads one",
        "input_norm": "how a ViT file without gmae's config is read (--normalize), as every command that reads one",
        "device": "where it runs, as every command that computes",
        "json": "how the results are printed",
        "threads": "this process's CPU threads (gmae.runtime.threads): every computing command has it",
    },
}


def _actions(command):
    return [a for a in build_parser().commands[command]._actions if a.option_strings]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_has_one_flag_and_every_flag_one_field(command):
    by_dest: dict[str, list] = {}
    for action in _actions(command):
        by_dest.setdefault(action.dest, []).append(action)
    assert all(len(actions) == 1 for actions in by_dest.values()), {d: a for d, a in by_dest.items() if len(a) > 1}
    fields = {f.name: f for cls in CONFIGS[command] for f in dataclasses.fields(cls)}
    for name, field in fields.items():
        meta = field.metadata
        if "no_flag" in meta:  # deliberately none: its reason is written beside it
            assert name not in by_dest and len(meta["no_flag"]) > 10, name
        elif "own_flag" in meta:  # the command writes it, and says why
            assert by_dest[name][0].option_strings == [meta["own_flag"]] and meta["why"], name
        else:
            assert name in by_dest, f"{command}: the field {name} has no flag"
            assert by_dest[name][0].help == meta["help"].format(default=field.default), name
    assert set(by_dest) - set(fields) == set(COMMAND_ONLY[command]), \
        f"{command}: flags that are no field: {sorted(set(by_dest) - set(fields) - set(COMMAND_ONLY[command]))}"
    # no field without a decision: each is a setting (help), deliberately flagless, or the command's own; a cited
    # default names a file (and line) of MAE or of the GMAE authors' code
    for field in fields.values():
        assert {"help", "no_flag", "own_flag"} & set(field.metadata), field.name
        if "cite" in field.metadata:
            assert field.metadata["cite"].startswith(("MAE ", "tekotan/video-gmae@")) and " line" in \
                field.metadata["cite"], field.name


def test_a_field_that_names_choices_or_a_type_gets_them():
    actions = {a.dest: a for a in _actions("pretrain")}
    for field in flag_fields(ModelConfig) + flag_fields(TrainConfig):
        action = actions[field.name]
        assert action.choices == field.metadata.get("choices"), field.name
        if "type" in field.metadata:
            assert action.type is field.metadata["type"], field.name
        # a field whose flag has no default of its own takes the preset's, the recipe's, or its own value (a switch
        # is off unless typed)
        own = field.default if field.metadata.get("flag_default") or field.type == "bool" and \
            not field.metadata.get("negatable") else None
        assert action.default == own, field.name


def test_typed_values_of_every_kind_arrive_in_the_pretrain_configs():
    mcfg, tcfg = configs_from_args(parse_args([
        "pretrain", "--no-head-bias", "--compile",  # bools: a negatable one and a switch
        "-k", "64", "--accum-steps", "2",  # ints (an alias, and a positive count)
        "--max-alpha", "0.5", "--blr", "0.25",  # floats
        "--camera", "pinhole", "--normalize", "imagenet", "--precision", "fp32",  # choices (one under another name)
        "--betas", "0.8", "0.9", "--crop-scale", "0.3", "0.7", "--background", "black",  # tuples
        "--epochs", "2.5",  # an optional float
    ]))
    assert (mcfg.head_bias, tcfg.compile) == (False, True)
    assert (mcfg.num_gaussians, tcfg.accum_steps) == (64, 2)
    assert (mcfg.max_alpha, tcfg.blr) == (0.5, 0.25)
    assert (mcfg.camera, mcfg.input_norm, tcfg.precision) == ("pinhole", "imagenet", "fp32")
    assert (tcfg.betas, tcfg.crop_scale, mcfg.background) == ((0.8, 0.9), (0.3, 0.7), (0.0, 0.0, 0.0))
    assert tcfg.epochs == 2.5
    # and what was not typed is the preset's (tiny), not the field's own default
    assert (tcfg.steps, mcfg.loss) == (1200, "all")


def test_typed_values_of_every_kind_arrive_in_the_finetune_config(monkeypatch, tmp_path):
    import gmae.evaluate.finetune as ft

    seen = {}
    monkeypatch.setattr(ft, "finetune", lambda fcfg, **kw: seen.setdefault("fcfg", fcfg) and {
        "steps_run": 0, "val_acc": 0.0, "best_val_acc": 0.0, "num_val": 0, "checkpoint": "", "out": ""})
    args = parse_args(["finetune", "--checkpoint", __file__, "--out", str(tmp_path / "ft"), "--random-init",
                       "--recount", "3", "--layer-decay", "0.5", "--mixup-mode", "pair", "--global-pool", "cls",
                       "--normalize", "none", "--warmup-epochs", "1.5", "--aa", "rand-m9"])
    assert args.func(args) == 0
    fcfg = seen["fcfg"]
    assert (fcfg.random_init, fcfg.recount, fcfg.layer_decay) == (True, 3, 0.5)
    assert (fcfg.mixup_mode, fcfg.global_pool, fcfg.input_norm) == ("pair", "cls", "none")
    assert (fcfg.warmup_epochs, fcfg.aa, fcfg.checkpoint) == (1.5, "rand-m9", __file__)
    assert (fcfg.epochs, fcfg.steps, fcfg.eval_every) == (FinetuneConfig().epochs, 0, 0)  # not typed: the defaults


def test_typed_values_reach_the_probe_config_and_the_protocol_fills_the_rest():
    from gmae.config.choices import PROBE_DEFAULTS

    args = parse_args(["probe", "--checkpoint", "x.pt", "--protocol", "mae", "--blr", "0.5", "--k", "7",
                       "--pool", "avg", "--warmup-epochs", "2.5"])
    pcfg = ProbeConfig(**config_settings(args, ProbeConfig))
    assert (pcfg.protocol, pcfg.blr, pcfg.k, pcfg.pool, pcfg.warmup_epochs) == ("mae", 0.5, 7, "avg", 2.5)
    extraction, linear = pcfg.linear()
    assert (linear["blr"], linear["warmup_epochs"]) == (0.5, 2.5)  # typed
    assert (linear["epochs"], linear["linear_batch"]) == (PROBE_DEFAULTS["mae"]["epochs"], extraction)  # the protocol's
