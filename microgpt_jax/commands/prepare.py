"""`microgpt-jax prepare`: tokenize a text once into a dataset directory; --verify checks one."""

import time

from microgpt_jax.commands import add_vocab_size
from microgpt_jax.errors import UserError

PARSER = {"help": "tokenize a text once into a dataset directory that `train --data DIR` reads step by step (corpora larger than memory)"}
CONFIG_FLAGS = {"data": ("mode", "tokenizer", "val_fraction")}  # what a dataset fixes


def add_arguments(p):
    p.add_argument(
        "text",
        nargs="?",
        default=None,
        metavar="TEXT",
        help="the text file (UTF-8, plain or .gz), read in chunks: any size (required, with --out, unless --verify: no default)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DATASET_DIR",
        help="the new dataset directory, which must not exist (required with TEXT: no default)",
    )
    add_vocab_size(p)
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="docs mode: the seed of microgpt's shuffle of the documents, which fixes their training order (default %(default)s)",
    )
    p.add_argument(
        "--verify",
        default=None,
        metavar="DATASET_DIR",
        help="check a dataset directory written by prepare and print what it holds, instead of writing one (default: prepare TEXT)",
    )


def run(args):
    if args.verify:
        if args.text or args.out:
            raise UserError("--verify checks a dataset and writes none: pass --verify DATASET_DIR alone, or TEXT --out DATASET_DIR")
        # TODO(integrator): microgpt_jax.dataset (the dataset reader's branch) provides verify(path) -> str
        from microgpt_jax.dataset import verify

        return print(verify(args.verify))
    if not (args.text and args.out):
        raise UserError("prepare needs a text and where to write it: pass TEXT --out DATASET_DIR (or --verify DATASET_DIR)")
    from microgpt_jax.prepare import prepare
    from microgpt_jax.rundir import RunConfig

    start = time.perf_counter()
    meta = prepare(args.text, args.out, RunConfig.of(args.given_configs).data, args.vocab_size, args.seed)
    counts = f"{meta['docs']:,} documents, " if meta["mode"] == "docs" else ""
    split = meta["split"]
    print(
        f"wrote {args.out}: {counts}{meta['tokens']:,} tokens ({meta['dtype']}), {meta['tokenizer']['kind']} tokenizer of "
        f"{meta['vocab_size']} ids; {split['train']:,} training and {split['validation']:,} validation {split['unit']}; "
        f"{meta['source']['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - start:.1f}s"
    )
    print(f"train on it with: microgpt-jax train --data {args.out}")
