"""The commands of `microgpt-jax`, one module each: they parse, call the library, print.

Each module has PARSER (its help line, and a description or epilog where
it has one), CONFIG_FLAGS ({table: fields, or None for every field}: the
config fields cli.py makes flags of), add_arguments(parser) for its own
flags, and run(args). Before run, cli.py sets args.given_configs: {table:
{field: value}}, the config file's values (--config) with the typed config
flags over them. A command never imports cli.py: cli.py imports them.
"""

import importlib

from microgpt_jax.errors import positive_int

COMMANDS = ("train", "prepare", "plot", "sample", "eval", "export", "check", "reproduce", "bench")  # as --help lists them

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
