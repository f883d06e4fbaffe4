"""`python -m reference`: microgpt's whole run on the scalar engine (spec sections 1-5).

With every default it prints exactly what the seed program prints. The model
and training flags are the variants of issue 11 (the contract in the notes);
`--save` writes the final weights as float64 safetensors. It stands alone:
nothing from microgpt_jax, nothing beyond the standard library.

Dropout masks are drawn from their own `random.Random(SEED + 1)`, so the
seed's stream (shuffle, weights, samples) is the same with or without them:
per step, per document, per layer, the attention weights' masks [head][p][s],
then the attention branch's [p][j], then the MLP branch's [p][j].
"""

import argparse
import gzip
import json
import os
import random
import struct
import sys
from array import array
from pathlib import Path

from reference.gpt import (
    ACTIVATIONS,
    MLPS,
    NORMS,
    POSITIONS,
    SCHEDULES,
    Adam,
    Config,
    check_config,
    dropout_masks,
    entries,
    init_state,
    parameters,
    sample,
    train_batch,
)

SEED, NUM_SAMPLES = 42, 20
DATA_ENV = "MICROGPT_JAX_DATA"
PACKAGED_NAMES = Path(__file__).resolve().parents[1] / "microgpt_jax" / "datasets" / "names.txt.gz"
PROG = "python -m reference"


def fail(message):
    """A user's mistake: one line on stderr, exit 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """This docstring as written; each flag's default after its help, where it has one."""

    def _get_help_string(self, action):
        shown = action.default not in (None, argparse.SUPPRESS)
        return f"{action.help} (default: %(default)s)" if shown else action.help


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block and all, as one line
        fail(f"{PROG}: {message} (see {PROG} --help)")


def checked(kind, ok, what):
    """An argparse type: text -> kind, refused unless ok(value)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "a positive integer")
COUNT = checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = checked(float, lambda v: v > 0, "a number > 0")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "a number >= 0")
RATE = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
MODEL_FIELDS = ("n_layer", "n_embd", "n_head", "block_size", "norm", "activation", "pos")
MODEL_FIELDS += ("tie_embeddings", "qk_norm", "n_kv_head", "logit_softcap", "dropout")
MODEL_FIELDS += ("norm_gain", "embed_norm", "final_norm", "bias", "mlp", "mlp_hidden", "rope_theta", "norm_eps")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=POSITIVE_INT, default=1000, metavar="N", help="training steps")
    p.add_argument("--data", default=None, metavar="FILE", help=f"one document per line (default: ${DATA_ENV}, else the packaged names)")
    p.add_argument("--save", default=None, metavar="PATH.safetensors", help="write the trained weights there, float64")
    d = Config(vocab_size=0)
    model = p.add_argument_group("model")
    model.add_argument("--n-layer", type=POSITIVE_INT, default=d.n_layer, metavar="N", help="transformer layers")
    model.add_argument("--n-embd", type=POSITIVE_INT, default=d.n_embd, metavar="N", help="embedding width")
    model.add_argument("--n-head", type=POSITIVE_INT, default=d.n_head, metavar="N", help="attention heads, a divisor of n_embd")
    model.add_argument("--block-size", type=POSITIVE_INT, default=d.block_size, metavar="N", help="most positions trained")
    model.add_argument("--norm", choices=NORMS, default=d.norm, help="the norm")
    model.add_argument("--norm-eps", type=POSITIVE, default=d.norm_eps, metavar="E", help="every norm's epsilon")
    flag = argparse.BooleanOptionalAction
    model.add_argument("--norm-gain", action=flag, default=d.norm_gain, help="gains (and layernorm biases) on the norms")
    model.add_argument("--embed-norm", action=flag, default=d.embed_norm, help="the norm after the embedding")
    model.add_argument("--final-norm", action=flag, default=d.final_norm, help="a norm before the output layer")
    model.add_argument("--bias", action=flag, default=d.bias, help="biases in the blocks' linear layers")
    model.add_argument("--mlp", choices=MLPS, default=d.mlp, help="plain, or gated: fc2(act(gate x) * fc1 x)")
    model.add_argument("--mlp-hidden", type=COUNT, default=d.mlp_hidden, metavar="F", help="the MLP's width (0: 4 * n_embd)")
    model.add_argument("--rope-theta", type=POSITIVE, default=d.rope_theta, metavar="B", help="rope's base")
    model.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="the MLP's activation")
    model.add_argument("--pos", choices=POSITIONS, default=d.pos, help="a learned wpe, or rotary q and k")
    model.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=d.tie_embeddings, help="logits from wte")
    model.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=d.qk_norm, help="rmsnorm each head's q and k")
    model.add_argument("--n-kv-head", type=COUNT, default=d.n_kv_head, metavar="N", help="key/value heads, a divisor of n_head (0: n_head)")
    model.add_argument("--logit-softcap", type=NON_NEGATIVE, default=d.logit_softcap, metavar="C", help="C * tanh(logits / C) (0: off)")
    model.add_argument("--dropout", type=RATE, default=d.dropout, metavar="P", help="dropout rate in training")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=POSITIVE_INT, default=1, metavar="B", help="documents per step")
    train.add_argument("--grad-accum", type=POSITIVE_INT, default=1, metavar="K", help="micro-batches per step, a divisor of B")
    train.add_argument("--lr", type=POSITIVE, default=0.01, help="peak learning rate")
    train.add_argument("--warmup", type=COUNT, default=0, metavar="STEPS", help="steps of linear rise from 0 to lr")
    train.add_argument("--schedule", choices=SCHEDULES, default="linear", help="the decay from lr to min-lr after the warmup")
    train.add_argument("--min-lr", type=NON_NEGATIVE, default=0.0, metavar="LR", help="the learning rate at the end")
    train.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, metavar="W", help="decoupled, as AdamW")
    train.add_argument("--grad-clip", type=NON_NEGATIVE, default=0.0, metavar="NORM", help="largest global gradient norm (0: off)")
    args = p.parse_args(argv)
    save_dir = args.save and Path(args.save).resolve().parent
    problems = [
        check_config(Config(1, **{f: getattr(args, f) for f in MODEL_FIELDS})),
        args.warmup >= args.steps and f"--warmup ({args.warmup}) must be below --steps ({args.steps})",
        args.min_lr > args.lr and f"--min-lr ({args.min_lr}) must be at most --lr ({args.lr})",
        args.batch_size % args.grad_accum and f"--grad-accum ({args.grad_accum}) must divide --batch-size ({args.batch_size})",
        save_dir and not save_dir.is_dir() and f"--save: no directory {save_dir}; create it first",
    ]
    for problem in filter(None, problems):
        p.error(problem)
    return args


def data_path(path):
    """--data, else $MICROGPT_JAX_DATA, else the names dataset the package ships."""
    path = path or os.environ.get(DATA_ENV) or PACKAGED_NAMES
    if not Path(path).is_file():
        fail(f"data file not found: {path}; pass --data FILE (or set {DATA_ENV})")
    return Path(path)


def read_docs(path):
    """Spec section 1: the whole text stripped, split on newlines, each line stripped, empty ones dropped."""
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except UnicodeDecodeError:
        fail(f"data file {path} is not valid UTF-8; re-encode it as UTF-8")
    except OSError as e:  # unreadable, or a broken .gz
        fail(f"cannot read data file {path} ({e}); pass a readable text file")
    docs = [line.strip() for line in text.strip().split("\n")]
    docs = [d for d in docs if d]
    if not docs:
        fail(f"data file is empty: {path} has no non-blank line; pass a text file with one document per line")
    return docs


def save_safetensors(path, state):
    """Every weight as float64: an 8-byte little-endian header length, a JSON header, the raw bytes."""
    header, blobs, offset = {}, [], 0
    for name, matrix in state.items():
        blob = array("d", (p.data for p in entries(matrix)))
        if sys.byteorder == "big":
            blob.byteswap()  # the format is little-endian
        shape = [len(matrix), len(matrix[0])] if isinstance(matrix[0], list) else [len(matrix)]  # a gain or bias: a vector
        header[name] = {"dtype": "F64", "shape": shape, "data_offsets": [offset, offset + 8 * len(blob)]}
        blobs.append(blob.tobytes())
        offset += 8 * len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(SEED)
    docs = read_docs(data_path(args.data))
    rng.shuffle(docs)
    uchars = sorted(set("".join(docs)))
    bos = len(uchars)
    print(f"num docs: {len(docs)}")
    print(f"vocab size: {len(uchars) + 1}")

    cfg = Config(vocab_size=len(uchars) + 1, **{f: getattr(args, f) for f in MODEL_FIELDS})
    state = init_state(cfg, rng)
    params = parameters(state)
    print(f"num params: {len(params)}")

    options = ("lr", "weight_decay", "grad_clip", "schedule", "min_lr", "warmup")
    adam = Adam(params, args.steps, **{o: getattr(args, o) for o in options})
    mask_rng = random.Random(SEED + 1)  # dropout's own stream: the seed's is untouched
    index = {ch: i for i, ch in enumerate(uchars)}
    B = args.batch_size
    for step in range(args.steps):
        # step s trains documents (s * B + b) % len(docs): the seed's docs[s % len(docs)] at B = 1
        batch = [[bos] + [index[ch] for ch in docs[(step * B + b) % len(docs)]] + [bos] for b in range(B)]
        masks = [dropout_masks(cfg, min(cfg.block_size, len(t) - 1), mask_rng) for t in batch] if cfg.dropout else None
        step_loss = train_batch(state, cfg, adam, step, batch, args.grad_accum, masks)
        print(f"step {step + 1:4d} / {args.steps:4d} | loss {step_loss:.4f}")
    if args.save:
        save_safetensors(args.save, state)

    print("\n--- inference (new, hallucinated names) ---")
    for i in range(NUM_SAMPLES):
        name = "".join(uchars[t] for t in sample(state, cfg, rng, bos))
        print(f"sample {i + 1:2d}: {name}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
