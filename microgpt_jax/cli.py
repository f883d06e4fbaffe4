"""`microgpt-jax`: the command line. Thin: parse flags, call the package, print.

Model and training flags are derived from the GPTConfig and TrainConfig
fields, so a new field is a new flag with no code here.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

from microgpt_jax.checkpoint import CheckpointConfig
from microgpt_jax.config import ConfigError, read_toml, to_toml
from microgpt_jax.data import DataConfig
from microgpt_jax.errors import ArgumentParser, UserError, positive_int, run_cli
from microgpt_jax.model import GPTConfig
from microgpt_jax.runtime import set_deterministic, set_precision, use_compilation_cache
from microgpt_jax.train import TrainConfig

CONFIGS = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig}
NOT_FLAGS = {"vocab_size"}  # comes from the data
# what `check` takes of TrainConfig: what the step computes (not its length, dtype or cadences)
CHECKED_TRAINING = (
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "schedule",
    "min_lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "grad_clip",
    "seed",
)


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


def add_config_flags(parser, tables, only=None):
    """One --flag per field of each config class (or only those named), typed, defaulted and explained by the
    field itself (a bool field is a pair of switches, --name and --no-name)."""
    for table in tables:
        cls = CONFIGS[table]
        group = parser.add_argument_group(f"{table} ({cls.__name__})")
        for f in dataclasses.fields(cls):
            if f.name in NOT_FLAGS or (only is not None and f.name not in only):
                continue
            choices = f.metadata.get("choices")
            one_of = f"one of {', '.join(choices)}; " if choices else ""
            typed = {"action": GivenFlag, "type": type(f.default), "choices": choices}
            kind = {"action": GivenSwitch} if type(f.default) is bool else typed
            described = f"{f.metadata['help']} ({one_of}default {f.default})"
            group.add_argument(flag(f.name), dest=f.name, default=f.default, help=described, **kind)


def given_configs(args) -> dict:
    """{table: {field: value}}: the config file's values (--config), then the typed flags over them."""
    given = getattr(args, "given", {})
    tables = read_toml(args.config, CONFIGS, NOT_FLAGS) if getattr(args, "config", None) else {}
    return {
        table: {**tables.get(table, {}), **{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}}
        for table, cls in CONFIGS.items()
    }


def configs_from_args(args, tables=tuple(CONFIGS)) -> dict:
    """{table: config}: each field's default, the config file's value over it, the typed flag over that."""
    given = given_configs(args)
    return {table: CONFIGS[table](**given[table]) for table in tables}


def open_run(args, held):
    """(run, configs, data file, weights to start from): --resume's run (locked) and its configs with the
    given ones over them; else the given configs, with --init-from's model (and --data, None for the default)."""
    from microgpt_jax.dataset import adopt, is_dataset
    from microgpt_jax.rundir import RunDir, load_weights
    from microgpt_jax.text import resolve_data_path

    if args.resume and (args.out or args.init_from):
        raise UserError("--resume continues a run as it is; --out (with --init-from) starts a new one: pass one of them")
    if args.resume:
        run = held.enter_context(RunDir.open(args.resume).lock())
        data_path = Path(args.data) if args.data else run.data_path
        run.check_data(data_path)
        return run, run.resumed_configs(given_configs(args)), data_path, None
    configs, init = configs_from_args(args), load_weights(args.init_from) if args.init_from else None
    given_data = given_configs(args)["data"]
    if init and "tokenizer" not in given_data:  # the weights' own tokenizer, unless another is asked for (and refused)
        configs["data"] = dataclasses.replace(configs["data"], tokenizer=init.tokenizer.kind)
    if is_dataset(resolve_data_path(args.data)):  # a prepared dataset fixes the data's mode, tokenizer and split
        configs["data"] = adopt(resolve_data_path(args.data), configs["data"], given_data)
    if init:  # the model is the weights' own: a flag or config value that disagrees is refused
        for name, value in given_configs(args)["model"].items():
            if getattr(init.cfg, name) != value:
                raise ConfigError(
                    name, f"{value!r} differs from the model of --init-from {args.init_from} ({getattr(init.cfg, name)!r}); drop it"
                )
        configs["model"] = init.cfg
    return None, configs, args.data, init


def chosen_loggers(args) -> list:
    """--tensorboard and --wandb PROJECT, their packages checked before anything is loaded or compiled."""
    from microgpt_jax.loggers import require

    if args.tensorboard and not (args.out or args.resume):
        raise UserError("--tensorboard writes into the run directory (RUN_DIR/tb); pass --out RUN_DIR")
    chosen = ([("tensorboard",)] if args.tensorboard else []) + ([("wandb", args.wandb)] if args.wandb else [])
    for name, *_ in chosen:
        require(name)
    return chosen


def cmd_train(args):
    from microgpt_jax import parallel

    if args.deterministic:
        set_deterministic()  # XLA reads its flags once, when the backend starts: before anything below
    # before anything touches a JAX backend: join the other processes, if any
    parallel.initialize(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout, args.peer_timeout)
    if not parallel.is_main_process():
        sys.stdout = open(os.devnull, "w")  # only process 0 logs; errors still go to stderr
    from microgpt_jax.rundir import RunDir
    from microgpt_jax.session import Session
    from microgpt_jax.text import resolve_data_path

    loggers = chosen_loggers(args)
    with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
        run, configs, data_path, init = open_run(args, held)
        if args.print_config:
            return print(to_toml(configs, NOT_FLAGS), end="")
        set_precision(configs["train"].dtype)
        tokenizer = run.tokenizer if run else init.tokenizer if init else None  # a bpe run goes on with its own
        vocab_size = given_configs(args)["model"].get("vocab_size")
        session = Session(configs, resolve_data_path(data_path), args.devices, vocab_size, tokenizer)
        print(session.describe())
        if args.dry_run:
            return print(session.dry_run())
        session.compile_step()  # XLA's own figure refuses a step that cannot fit, before anything is made
        start = session.state_from(init) if init else None  # (before --out is made: the weights must fit the data)
        if args.out:
            run = held.enter_context(RunDir.create(args.out, session.configs, session.tokenizer, session.data_path, init and init.origin))
        session.train(run, resume=bool(args.resume), peer_timeout=args.peer_timeout, start=start, loggers=loggers)


def cmd_prepare(args):
    import time

    from microgpt_jax.prepare import prepare

    start = time.perf_counter()
    meta = prepare(args.text, args.out, configs_from_args(args, ["data"])["data"], getattr(args, "vocab_size", None), args.seed)
    counts = f"{meta['docs']:,} documents, " if meta["mode"] == "docs" else ""
    split = meta["split"]
    print(
        f"wrote {args.out}: {counts}{meta['tokens']:,} tokens ({meta['dtype']}), {meta['tokenizer']['kind']} tokenizer of "
        f"{meta['vocab_size']} ids; {split['train']:,} training and {split['validation']:,} validation {split['unit']}; "
        f"{meta['source']['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - start:.1f}s"
    )
    print(f"train on it with: microgpt-jax train --data {args.out}")


def cmd_plot(args):
    from microgpt_jax.plot import plot_runs

    out = args.out or (Path(args.run_dirs[0]) / "loss.png" if len(args.run_dirs) == 1 else Path("loss.png"))
    print(f"loss curves: {plot_runs(args.run_dirs, out)}")


def cmd_sample(args):
    import itertools

    import numpy as np

    from microgpt_jax.rundir import load_weights
    from microgpt_jax.sample import (
        breaks_lines,
        check_options,
        encode_prompt,
        frame,
        print_samples,
        sample_batches,
        sample_reference,
        start_token,
    )

    if args.reference:
        given = {"--top-k": args.top_k, "--top-p": args.top_p, "--batch-size": args.batch_size, "--max-new-tokens": args.max_new_tokens}
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise UserError(
                f"{', '.join(extra)} cannot be used with --reference "
                "(microgpt draws one sample at a time from the whole softmax, until the block is full); drop them"
            )
    check_options(args.temperature, args.top_k, args.top_p)
    cfg, tokenizer, params, _, run = load_weights(args.run_dir)
    prompt = encode_prompt(tokenizer, args.prompt, cfg)
    if args.reference or any(np.asarray(w).dtype == np.float64 for w in params.values()):
        set_precision("float64")  # microgpt's Python floats, or the run's own float64
    if args.reference:
        batches = [sample_reference(params, cfg, random.Random(args.seed), args.num_samples, args.temperature, prompt)]
    else:
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        options |= dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        options |= dict(start=start_token(tokenizer, run.dcfg.mode if run else "docs"))  # an export: BOS
        batches = sample_batches(params, cfg, args.num_samples, prompt=prompt, **options)
    framed = not args.json and breaks_lines(tokenizer)

    def render(number, s):
        text = tokenizer.decode([*prompt, *s.ids])  # decoded together: a character may span the prompt's last id and the next
        if args.json:
            return json.dumps({"sample": text, "logprob": s.logprob, "ids": [*prompt, *s.ids]})
        return frame(number, text) if framed else text

    numbers = itertools.count(1)
    print_samples(([render(next(numbers), s) for s in batch] for batch in batches), args.num_samples)


def cmd_eval(args):
    from microgpt_jax.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, data=args.data, step=args.step)
    print(json.dumps(result.to_json()) if args.json else result.table())


def cmd_check(args):
    set_precision("float64")
    from microgpt_jax.check import format_table, run_check
    from microgpt_jax.dataset import first_document, is_dataset
    from microgpt_jax.model import init_params_reference
    from microgpt_jax.rundir import load_weights
    from microgpt_jax.text import load_docs, reference_docs, resolve_data_path
    from microgpt_jax.tokenizer import CharTokenizer

    if args.run_dir:  # a run's (or an export's) config, tokenizer and weights; the documents from its data
        cfg, tokenizer, params, _, run = load_weights(args.run_dir)
        data_path = Path(args.data) if args.data else run.data_path if run else resolve_data_path()
        docs = [] if args.doc is not None else [first_document(data_path)] if is_dataset(data_path) else load_docs(data_path)
    else:  # microgpt's initial weights for the flags' config
        docs, rng = reference_docs(resolve_data_path(args.data))
        tokenizer = CharTokenizer.from_docs(docs)
        cfg = dataclasses.replace(configs_from_args(args, ["model"])["model"], vocab_size=tokenizer.size)
        params = init_params_reference(cfg, rng)
    tcfg = dataclasses.replace(configs_from_args(args, ["train"])["train"], steps=args.steps)
    docs = [args.doc] if args.doc is not None else docs[: args.steps * tcfg.batch_size]
    unknown = tokenizer.unknown(args.doc) if args.doc is not None else []
    if unknown:
        raise UserError(f"--doc has characters outside the vocabulary {unknown}; the vocabulary is {tokenizer.chars!r}")
    rows = run_check(cfg, params, [tokenizer.encode(d) for d in docs], steps=args.steps, tcfg=tcfg)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print(f"training: {json.dumps({k: getattr(tcfg, k) for k in CHECKED_TRAINING})}  first document: {docs[0]!r}")
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_reproduce(args):
    from microgpt_jax.reproduce import reproduce
    from microgpt_jax.text import resolve_data_path

    reproduce(resolve_data_path(args.data), steps=args.steps)


def cmd_export(args):
    from microgpt_jax.rundir import export_safetensors

    step = export_safetensors(args.run_dir, args.out)
    print(f"wrote {args.out}: the parameters of step {step}, tokenizer and configs in its metadata")


def cmd_bench(args):
    from microgpt_jax import bench

    bench.CORPUS["mb"] = args.corpus_mb
    bench.run(args.cases, args.json, data=args.data, text=args.text)


def build_parser():
    from microgpt_jax import __version__, bench

    parser = ArgumentParser(
        prog="microgpt-jax",
        description="A fast, exact JAX reimplementation of microgpt.",
        epilog="`microgpt-jax COMMAND --help` explains a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"microgpt-jax {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser, help="one of:")
    data_help = "text file, one document per line (default: the names dataset shipped with the package)"
    vocab_help = (
        "the vocabulary of --tokenizer bpe, BOS included, at least 257 (default 512); with char and byte it comes "
        "from the data, and a value given must match it"
    )

    p = sub.add_parser("train", help="train a model (default: microgpt's model and hyperparameters on names)")
    add_config_flags(p, CONFIGS)
    p.add_argument("--vocab-size", dest="vocab_size", action=GivenFlag, type=positive_int, default=None, help=vocab_help)
    p.add_argument(
        "--data",
        default=None,
        help=data_help + "; with --mode stream, any text; or a dataset directory written by `microgpt-jax prepare`",
    )
    p.add_argument(
        "--out", default=None, metavar="RUN_DIR", help="a new run directory: configs, vocabulary, checkpoints (default: nothing is saved)"
    )
    p.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue this run from its latest good checkpoint (default: start a new run)"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="config values in tables [model], [train], [data], [checkpoint]; flags override them (default: none)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML (a config file) and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the training step for this config and print its memory (parameters, optimizer state, XLA's figure, "
        "the device's free memory, the estimate), then exit: nothing is trained or written, not even --out",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic GPU kernels (XLA_FLAGS=--xla_gpu_deterministic_ops=true): the same run gives the same bits, "
        "somewhat slower; no effect on a CPU (default: XLA's fastest kernels)",
    )
    p.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard in RUN_DIR/tb (needs: pip install 'microgpt-jax[tensorboard]')"
    )
    p.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log to this Weights & Biases project (needs: pip install 'microgpt-jax[wandb]'; WANDB_MODE=offline keeps it local; "
        "default: no W&B)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR[@STEP]",
        help="start a new run from these weights (a run's latest checkpoint, a checkpoint STEP, or a .safetensors export): "
        "fine-tuning (default: new weights)",
    )
    group = p.add_argument_group("devices and processes (see README, Beyond one device)")
    group.add_argument("--devices", type=positive_int, default=None, help="devices to split the batch over (default: all)")
    group.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (default: $JAX_COORDINATOR_ADDRESS, else one process)"
    )
    group.add_argument("--num-processes", type=int, default=None, help="processes in the run (default: $JAX_NUM_PROCESSES, else 1)")
    group.add_argument("--process-id", type=int, default=None, help="this process's id, 0..N-1 (default: $JAX_PROCESS_ID, else 0)")
    group.add_argument(
        "--coordinator-timeout",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="give up joining after this long (default %(default)s)",
    )
    group.add_argument(
        "--peer-timeout",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="a process whose peer is gone gives up after this long, naming the last good checkpoint (default %(default)s)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "prepare",
        help="tokenize a text once into a dataset directory that `train --data DIR` reads step by step (corpora larger than memory)",
    )
    p.add_argument("text", metavar="TEXT", help="the text file (UTF-8, plain or .gz), read in chunks: any size")
    p.add_argument(
        "--out", required=True, metavar="DATASET_DIR", help="the new dataset directory, which must not exist (required: no default)"
    )
    add_config_flags(p, ["data"], only=("mode", "tokenizer", "val_fraction"))
    p.add_argument("--vocab-size", dest="vocab_size", action=GivenFlag, type=positive_int, default=None, help=vocab_help)
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="docs mode: the seed of microgpt's shuffle of the documents, which fixes their training order (default %(default)s)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("plot", help="training and validation loss curves of one or more runs, overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `microgpt-jax train --out`")
    p.add_argument(
        "--out",
        default=None,
        metavar="IMAGE",
        help="image to write, .png, .svg, .pdf, ... (default: RUN_DIR/loss.png for one run, ./loss.png for several)",
    )
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "sample",
        help="sample from a trained run",
        description="Sample from a trained run. Samples are printed as each batch completes, one per line; when the "
        "run's vocabulary can produce a line break (a text run), each sample is instead preceded by a line "
        "`--- sample N (C characters) ---` and is exactly the C characters after it, then a newline. --json is "
        "one JSON object per line either way.",
    )
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint), RUN_DIR@STEP, or an exported .safetensors file")
    p.add_argument("--num-samples", type=positive_int, default=20, help="samples to draw (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.5, help="softmax temperature; 0 means greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="draw only from the K most likely tokens (default: all tokens)")
    p.add_argument("--top-p", type=float, default=None, help="draw only from the top tokens holding probability P (default: all tokens)")
    p.add_argument("--prompt", default="", help="every sample continues this text, e.g. ka (default: none, samples start fresh)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the draws (default %(default)s)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples generated (and printed) together (default: all, at most 1000; fewer for long samples, 16 past block_size)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens to draw per sample, past block_size too: the context then slides, each token predicted from the last "
        "block_size tokens (default: until the sample fills block_size); a sample still ends at BOS",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"sample": text, prompt included, "logprob": its log-probability, '
        '"ids": its token ids} (default: plain text)',
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="draw from Python's random stream as microgpt does, exactly the scalar engine's samples (default: the compiled sampler)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval",
        help="a run's loss, perplexity and bits per character, on its validation split or on a file",
        description="Evaluate a run's checkpoint. On the validation split (the default) this is the training's own "
        "evaluation: the loss is the val_loss the training recorded at that step (on the same devices). "
        "loss is measured as the training measures it (docs: the mean over documents of their mean token loss; "
        "stream: the mean token loss); perplexity is exp(the mean loss per token) and bits per character "
        "the summed loss in bits over the characters the predicted tokens stand for (a document's end counting as one).",
    )
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint) or RUN_DIR@STEP")
    p.add_argument("--step", type=int, default=None, help="evaluate checkpoint N (default: the latest good one)")
    p.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="evaluate on this text file instead, laid out in the run's data mode: every document (docs) or the whole "
        "text in windows of block_size + 1 tokens (stream) (default: the run's validation split)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's parameters as safetensors, vocabulary in the metadata")
    p.add_argument("run_dir", help="a run directory (its latest good checkpoint) or RUN_DIR@STEP")
    p.add_argument("out", metavar="OUT.safetensors", help="the .safetensors file to write (must not exist)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="cross-check JAX gradients and Adam steps against the scalar engine")
    p.add_argument(
        "run_dir",
        nargs="?",
        default=None,
        help="check these weights: RUN_DIR, RUN_DIR@STEP or a .safetensors export (default: microgpt's initial weights)",
    )
    add_config_flags(p, ["model"])
    add_config_flags(p, ["train"], only=CHECKED_TRAINING)
    p.add_argument("--doc", default=None, help="the one document every row of every step trains on (default: the data's, in order)")
    p.add_argument("--steps", type=positive_int, default=20, help="training steps to compare (default %(default)s)")
    p.add_argument("--data", default=None, help=data_help)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("reproduce", help="microgpt's exact run (1000 steps, 20 samples) on the JAX engine")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (default %(default)s, microgpt's)")
    p.add_argument("--data", default=None, help=data_help)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "bench",
        help="benchmarks, measured side by side, printed as a table",
        epilog="cases:\n" + "\n".join(f"  {name:<16}{line}" for name, line in bench.describe_cases()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cases", nargs="*", metavar="CASE", help="cases to run, listed below (default: all of them)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to this path (default: the table only)")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="continuous text for the large case (default: tinyshakespeare.txt beside the names file)",
    )
    p.add_argument(
        "--corpus-mb",
        type=positive_int,
        default=1024,
        metavar="MB",
        help="size in MiB of the text the prepared case generates in a temporary directory (default %(default)s)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        # No command is a question, not a mistake: answer it with the commands on stdout and exit 0,
        # as cargo, docker and pip do (git's exit 1 would make `microgpt-jax | less` look like a failure).
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    use_compilation_cache()
    from microgpt_jax.memory import TooBig

    try:
        return args.func(args)
    except ConfigError as e:  # a config value is wrong: name the flag that sets it
        raise UserError(f"{flag(e.field)} {e.problem}") from None
    except TooBig as e:  # a run that cannot fit: name the flags that lower it
        raise UserError(e.with_flags(flag)) from None


def entry():
    run_cli(main, sys.argv[1:])
