"""`microgpt-jax check`: JAX gradients and Adam steps against the scalar engine, as a table."""

import dataclasses
import json
import sys

from microgpt_jax.check import CHECKED_TRAINING
from microgpt_jax.commands import DATA_HELP
from microgpt_jax.errors import positive_int

PARSER = {"help": "cross-check JAX gradients and Adam steps against the scalar engine"}
CONFIG_FLAGS = {"model": None, "train": CHECKED_TRAINING}


def add_arguments(p):
    p.add_argument(
        "run_dir",
        nargs="?",
        default=None,
        help="check these weights: RUN_DIR, RUN_DIR@STEP or a .safetensors export, with its training settings but those given "
        "(default: microgpt's initial weights)",
    )
    p.add_argument("--doc", default=None, help="the one document every row of every step trains on (default: the data's, in order)")
    p.add_argument("--steps", type=positive_int, default=20, help="training steps to compare (default %(default)s)")
    p.add_argument("--data", default=None, help=DATA_HELP)


def run(args):
    from microgpt_jax.runtime import set_precision

    set_precision("float64")
    from microgpt_jax.check import format_table, run_check, subject
    from microgpt_jax.rundir import RunConfig, load_weights

    weights = load_weights(args.run_dir) if args.run_dir else None
    given = args.given_configs.get("train", {})
    run_train = {k: v for k, v in ((weights and weights.settings) or {}).get("train", {}).items() if k in CHECKED_TRAINING}
    train = run_train | given  # a run's own step (its lr, batch, optimizer), but what is given
    configs = RunConfig.of({**args.given_configs, "train": {**train, "steps": max(args.steps, train.get("warmup", 0) + 1)}})
    tcfg = dataclasses.replace(configs.train, steps=args.steps)
    checked = subject(weights, args.data, args.doc, configs.model, tcfg)
    docs = [checked.tokenizer.encode(d) for d in checked.docs]
    say = lambda message: print(f"check: {message}...", file=sys.stderr, flush=True)  # noqa: E731 (the scalar engine is slow)
    rows = run_check(checked.cfg, checked.params, docs, steps=args.steps, tcfg=tcfg, progress=say)
    print(f"config: {json.dumps(dataclasses.asdict(checked.cfg))}")
    print(f"training: {json.dumps({k: getattr(tcfg, k) for k in CHECKED_TRAINING})}  first document: {checked.docs[0]!r}")
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
