"""`microgpt-jax bench`: benchmarks measured side by side, printed as a table."""

import argparse

from microgpt_jax import bench
from microgpt_jax.commands import DATA_HELP
from microgpt_jax.errors import positive_int

PARSER = {
    "help": "benchmarks, measured side by side, printed as a table",
    "epilog": "cases:\n" + "\n".join(f"  {name:<16}{line}" for name, line in bench.describe_cases()),
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def add_arguments(p):
    p.add_argument("cases", nargs="*", metavar="CASE", help="cases to run, listed below (default: all of them)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="large: also print one step's time by part (attention, MLP, norms, loss, forward and backward, the update, data, "
        "dispatch), from a profile of one compiled chunk",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to this path (default: the table only)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="continuous text for the large case (default: tinyshakespeare.txt beside the names file)",
    )
    p.add_argument(
        "--corpus-mb",
        type=positive_int,
        default=bench.CORPUS_MB,
        metavar="MB",
        help="size in MiB of the text the prepared case generates in a temporary directory (default %(default)s)",
    )


def run(args):
    bench.run(args.cases, args.json, inputs=bench.Inputs(args.data, args.text, args.corpus_mb, args.breakdown))
