"""`microgpt-jax`: the command line. The shared config flags, then each command (commands/) runs.

A config field is a flag with no code here: its type, default, choices
and help are the field's own (config.field), and a command names the
tables whose fields it takes (CONFIG_FLAGS).
"""

import sys

from microgpt_jax import commands
from microgpt_jax.commands import add_config_flags, flag, given_configs
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import ArgumentParser, UserError, run_cli
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
    args = parser.parse_args(joined_values(argv))
    use_compilation_cache()
    from microgpt_jax.memory import TooBig

    try:
        args.given_configs = given_configs(args)
        return args.run(args)
    except (ConfigError, TooBig) as e:  # a config value is wrong, or a run cannot fit: name the flags that set it
        raise UserError(e.with_flags(flag)) from None


def entry():
    run_cli(main, sys.argv[1:])
