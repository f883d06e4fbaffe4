"""`microgpt-jax reproduce`: microgpt's exact run on the JAX engine."""

from microgpt_jax.commands import DATA_HELP
from microgpt_jax.errors import positive_int

PARSER = {"help": "microgpt's exact run (1000 steps, 20 samples) on the JAX engine"}


def add_arguments(p):
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (default %(default)s, microgpt's)")
    p.add_argument("--data", default=None, help=DATA_HELP)


def run(args):
    from microgpt_jax.reproduce import reproduce
    from microgpt_jax.text import resolve_data_path

    reproduce(resolve_data_path(args.data), steps=args.steps)
