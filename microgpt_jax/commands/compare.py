"""`microgpt-jax compare`: variants against a baseline over the same seeds, with paired confidence intervals."""

import argparse
import json
import shlex

from microgpt_jax.commands import DATA_HELP, add_config_flags, add_vocab_size, given_configs
from microgpt_jax.commands.sweep import add_seeds
from microgpt_jax.errors import ArgumentParser, UserError, positive_int

PARSER = {
    "help": "train a baseline and variants (--variant FLAGS) over the same seeds; their validation losses with 95%% intervals",
    "epilog": "e.g. microgpt-jax compare --steps 500 --seeds 5 --variant '--qk-norm' --variant '--pos rope'",
}
CONFIG_FLAGS = {"model": None, "train": None, "data": None}


def add_arguments(p):
    add_vocab_size(p)
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="config values in tables [model], [train], [data]; flags override them (default: none)",
    )
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=None,
        metavar="FLAGS",
        help="config flags of a variant, over the baseline's (the flags alone), e.g. '--qk-norm --n-kv-head 1'; once per variant "
        "(at least one; default: none)",
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="also write every number (each member's too) as JSON here (default: only the table)"
    )
    p.add_argument("--devices", type=positive_int, default=None, help="devices (default: all)")
    add_seeds(p, "5")


def variant_configs(flags: str, base_given: dict) -> dict:
    """A variant's flags (a string), parsed as the config flags they are, over the baseline's given values."""
    parser = ArgumentParser(prog=f"--variant {flags!r}", add_help=False)
    add_config_flags(parser, CONFIG_FLAGS)
    try:
        args = parser.parse_args(shlex.split(flags))
    except (ValueError, SystemExit, argparse.ArgumentError):
        raise UserError(f"--variant {flags!r}: not config flags of train (see `microgpt-jax train --help`)") from None
    given = given_configs(args)
    return {table: {**base_given.get(table, {}), **values} for table, values in given.items()}


def run(args):
    from microgpt_jax.rundir import RunConfig
    from microgpt_jax.runtime import set_precision
    from microgpt_jax.sweep import Variant, compare, format_comparison, parse_seeds
    from microgpt_jax.text import resolve_data_path

    if not args.variants:
        raise UserError("pass at least one --variant FLAGS to compare with the baseline (e.g. --variant '--qk-norm')")
    base = args.given_configs
    variants = [Variant("baseline", RunConfig.of(base))]
    for flags in args.variants:
        variants.append(Variant(flags, RunConfig.of(variant_configs(flags, base))))
    set_precision(variants[0].configs.train.dtype)
    result = compare(variants, parse_seeds(args.seeds), resolve_data_path(args.data), args.devices, base["model"].get("vocab_size"))
    print(format_comparison(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            raise UserError(f"could not write {args.json} ({e.strerror or e}); the table above is the result") from None
