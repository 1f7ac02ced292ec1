"""The command-line flags of a config dataclass, built from its fields' metadata (gmae.config.setting).

Each field of ModelConfig, TrainConfig, FinetuneConfig and ProbeConfig says its help, type, choices and flag name once, where it
is defined; `add_config_flags` turns those into argparse flags whose destination is the field's name, and
`config_settings` reads back the values a command line gave. Torch-free, like the rest of gmae.cli's parsing.
"""

from __future__ import annotations

import argparse
import dataclasses

# A field's annotation -> (argparse type, nargs) when its metadata names no type.
_TYPES = {"int": (int, None), "float": (float, None), "float | None": (float, None), "str": (None, None),
          "tuple[float, float]": (float, 2)}


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that have a generated flag (those made with gmae.config.setting)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def option_strings(field: dataclasses.Field) -> tuple[str, ...]:
    return field.metadata.get("flags") or (f"--{field.name.replace('_', '-')}",)


def add_config_flags(parser: argparse.ArgumentParser, cls, group: str | None = None,
                     skip: tuple[str, ...] = ()) -> None:
    """Add a flag to `parser` for every field of `cls` with one (except `skip`), in the fields' order; fields that
    name a --help section go there, the others into `group` (None: the parser's own options)."""
    sections: dict[str | None, object] = {None: parser}
    for field in flag_fields(cls):
        if field.name in skip:
            continue
        meta = field.metadata
        where = meta.get("group", group)
        if where not in sections:
            sections[where] = parser.add_argument_group(where)
        default = field.default if meta.get("flag_default") else None
        keywords: dict = dict(dest=field.name, help=meta["help"].format(default=field.default))
        if field.type == "bool":
            action = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
            keywords.update(action=action, **({"default": None} if meta.get("negatable") else {}))
        else:
            kind, nargs = _TYPES[field.type] if field.type in _TYPES else (None, None)
            keywords.update(default=default, type=meta.get("type", kind), nargs=nargs, choices=meta.get("choices"),
                            metavar=meta.get("metavar"))
        sections[where].add_argument(*option_strings(field), **{k: v for k, v in keywords.items()
                                                                 if v is not None or k == "default"})


def config_settings(args: argparse.Namespace, *classes) -> dict[str, object]:
    """{field: value} of the flags of `classes` that `args` holds a value for (None: not given, so the field keeps
    the preset's, the recipe's or its own default)."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}
