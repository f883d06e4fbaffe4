"""`microgpt-jax`: the command line. The shared config flags, then each command (commands/) runs.

A config field is a flag with no code here: its type, default, choices
and help are the field's own (config.field), and a command names the
tables whose fields it takes (CONFIG_FLAGS).
"""

import signal
import sys

from microgpt_jax import commands
from microgpt_jax.commands import add_config_flags, flag, given_configs
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import ArgumentParser, UserError, exit_at_once, run_cli
from microgpt_jax.rundir import RunConfig
from microgpt_jax.runtime import use_compilation_cache


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


def joined_values(argv) -> list:
    """`--variant "--qk-norm"` as `--variant=--qk-norm`: a value of flags that argparse would take for a flag of its own."""
    out, it = [], iter(argv)
    for arg in it:
        value = next(it, None) if arg in commands.FLAG_VALUED else None
        out.append(arg if value is None else f"{arg}={value}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        # No command is a question, not a mistake: answer it with the commands on stdout and exit 0,
        # as cargo, docker and pip do (git's exit 1 would make `microgpt-jax | less` look like a failure).
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(joined_values(argv))
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
