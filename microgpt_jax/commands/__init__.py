"""The commands of `microgpt-jax`, one module each: they parse, call the library, print.

Each module has PARSER (its help line, and a description or epilog where
it has one), CONFIG_FLAGS ({table: fields, or None for every field}: the
config fields cli.py makes flags of), add_arguments(parser) for its own
flags, and run(args). Before run, cli.py sets args.given_configs: {table:
{field: value}}, the config file's values (--config) with the typed config
flags over them. A command never imports cli.py: cli.py imports them.
"""

import argparse
import dataclasses
import importlib

from microgpt_jax.errors import positive_int
from microgpt_jax.rundir import RunConfig

COMMANDS = (
    "train",
    "sweep",
    "compare",
    "prepare",
    "plot",
    "sample",
    "eval",
    "export",
    "check",
    "reproduce",
    "bench",
)  # as --help lists them

FLAG_VALUED = ("--variant",)  # flags whose value is itself flags (compare --variant "--qk-norm")

DATA_HELP = "text file, one document per line (default: the names dataset shipped with the package)"


def modules() -> list:
    """The command modules, in COMMANDS' order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]


def add_vocab_size(parser):
    """--vocab-size: model.vocab_size, which comes from the data, asked for (None: not given)."""
    parser.add_argument(
        "--vocab-size",
        dest="vocab_size",
        type=positive_int,
        default=None,
        help="the vocabulary of --tokenizer bpe, BOS included, at least 257 (default 512); with char and byte it comes "
        "from the data, and a value given must match it",
    )


class GivenFlag(argparse.Action):
    """Stores the value and records that the flag was typed: `train --resume` checks typed flags against the run."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {**getattr(namespace, "given", {}), self.dest: values}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class GivenSwitch(argparse.BooleanOptionalAction):
    """--name / --no-name for a bool field, recorded as typed like GivenFlag."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        GivenFlag.__call__(self, parser, namespace, getattr(namespace, self.dest), option_string)


def add_config_flags(parser, tables: dict):
    """One --flag per field of each table ({table: fields, or None for every field but those from the data}),
    typed, defaulted and explained by the field itself (a bool field is a pair of switches, --name and --no-name)."""
    for table, only in tables.items():
        cls = RunConfig.TABLES[table]
        names = only or [f.name for f in dataclasses.fields(cls) if f.name not in RunConfig.FROM_DATA]
        group = parser.add_argument_group(f"{table} ({cls.__name__})")
        for f in dataclasses.fields(cls):
            if f.name not in names:
                continue
            choices = f.metadata.get("choices")
            one_of = f"one of {', '.join(choices)}; " if choices else ""
            typed = {"action": GivenFlag, "type": type(f.default), "choices": choices}
            kind = {"action": GivenSwitch} if type(f.default) is bool else typed
            described = f"{f.metadata['help']} ({one_of}default {f.default})"
            group.add_argument(flag(f.name), dest=f.name, default=f.default, help=described, **kind)


def given_configs(args) -> dict:
    """{table: {field: value}}: the config file's values (--config), then the typed flags over them (and a field
    that comes from the data, such as --vocab-size, where given)."""
    given = getattr(args, "given", {}) | {n: getattr(args, n) for n in RunConfig.FROM_DATA if getattr(args, n, None) is not None}
    tables = RunConfig.read_toml(args.config) if getattr(args, "config", None) else {}
    data_path = tables.get("data", {}).pop("path", None)  # [data] path: --data, unless the flag is typed
    if data_path is not None and getattr(args, "data", None) is None:
        args.data = data_path
    return {
        table: {**tables.get(table, {}), **{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}}
        for table, cls in RunConfig.TABLES.items()
    }
