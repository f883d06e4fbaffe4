"""`microgpt-jax`: the command line. The shared config flags, then each command (commands/) runs.

A config field is a flag with no code here: its type, default, choices
and help are the field's own (config.field), and a command names the
tables whose fields it takes (CONFIG_FLAGS).
"""

import argparse
import dataclasses
import signal
import sys

from microgpt_jax import commands
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import ArgumentParser, UserError, exit_at_once, run_cli
from microgpt_jax.rundir import RunConfig
from microgpt_jax.runtime import use_compilation_cache


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


def build_parser():
    from microgpt_jax import __version__

    parser = ArgumentParser(
        prog="microgpt-jax",
        description="A fast, exact JAX reimplementation of microgpt.",
        epilog="`microgpt-jax COMMAND --help` explains a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"microgpt-jax {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser, help="one of:")
    for name, module in zip(commands.COMMANDS, commands.modules()):
        p = sub.add_parser(name, **module.PARSER)
        add_config_flags(p, getattr(module, "CONFIG_FLAGS", {}))
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    parser.subcommands = sub.choices  # a mistyped flag is answered by its command's parser (ArgumentParser.unknown)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        # No command is a question, not a mistake: answer it with the commands on stdout and exit 0,
        # as cargo, docker and pip do (git's exit 1 would make `microgpt-jax | less` look like a failure).
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.subcommands[args.command].unknown(extra)
    if signal.getsignal(signal.SIGINT) is exit_at_once:  # loaded: ctrl-C unwinds the command from here on
        signal.signal(signal.SIGINT, signal.default_int_handler)
    use_compilation_cache()
    from microgpt_jax.memory import TooBig

    try:
        args.given_configs = given_configs(args)
        return args.run(args)
    except (ConfigError, TooBig) as e:  # a config value is wrong, or a run cannot fit: name the flags that set it
        raise UserError(worded(e, args)) from None


def worded(e, args) -> str:
    """A ConfigError as the flag that set it, or as the config file's key where the file set it and no flag did."""
    typed = set(getattr(args, "given", {})) | {n for n in RunConfig.FROM_DATA if getattr(args, n, None) is not None}
    in_file = [t for t, values in args.given_configs.items() if getattr(e, "field", None) in values] if "given_configs" in args else []
    if isinstance(e, ConfigError) and e.field not in typed and in_file and getattr(args, "config", None):
        return f"{args.config}: [{in_file[0]}] {e}"
    return e.with_flags(flag)


def entry():
    run_cli(main, sys.argv[1:])
