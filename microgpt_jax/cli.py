"""`microgpt-jax`: the command line. Thin: parse flags, call the package, print.

Model and training flags are derived from the GPTConfig and TrainConfig
fields, so a new field is a new flag with no code here.
"""

import dataclasses
import json
import random
import sys
from pathlib import Path

from microgpt_jax.errors import ArgumentParser, UserError, positive_int, run_cli
from microgpt_jax.model import GPTConfig
from microgpt_jax.train import TrainConfig

DERIVED = (GPTConfig, TrainConfig)
NOT_FLAGS = {"vocab_size"}  # comes from the data


def add_config_flags(parser, cls, defaults=None):
    """One --flag per dataclass field, typed and defaulted from the field."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in NOT_FLAGS:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = type(f.default)
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            help=f"{cls.__name__}.{f.name} (default {default})",
        )


def config_from_args(cls, args, **extra):
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{n: getattr(args, n) for n in names}, **extra)


def cmd_train(args):
    import jax

    from microgpt_jax.checkpoint import save_run
    from microgpt_jax.data import load_train_data, resolve_data_path
    from microgpt_jax.model import init_params, param_shapes
    from microgpt_jax.train import Trainer, fit

    tcfg = config_from_args(TrainConfig, args)
    cfg = config_from_args(GPTConfig, args, vocab_size=1)  # checked now; the vocabulary comes from the data
    if args.out and Path(args.out).exists():
        raise UserError(f"--out {args.out} already exists; choose a new directory so nothing saved is overwritten")
    if tcfg.dtype == "bfloat16" and jax.default_backend() == "cpu":
        # refused rather than warned: on the CPU bfloat16 is no faster than float32, only less precise
        raise UserError("--dtype bfloat16 is for GPUs and this run is on the CPU, where it is no faster; use --dtype float32")
    if tcfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    vocab, data = load_train_data(resolve_data_path(args.data), tcfg, cfg.block_size)
    cfg = dataclasses.replace(cfg, vocab_size=vocab.size)
    print(data.describe())
    print(f"vocab size: {vocab.size}")
    params = init_params(cfg, jax.random.key(tcfg.seed), tcfg.param_dtype)
    print(f"num params: {sum(o * i for o, i in param_shapes(cfg).values())}")

    trainer = Trainer(cfg, tcfg)
    opt_state = trainer.init(params)
    if args.out:
        Path(args.out).mkdir(parents=True)
    params, opt_state, _ = fit(trainer, params, opt_state, data, run_dir=args.out)
    if args.out:
        save_run(args.out, cfg, tcfg, vocab, params)
        print(f"saved to {args.out}; sample with: microgpt-jax sample {args.out}")
        save_plot([args.out], Path(args.out) / "loss.png")


def save_plot(run_dirs, out_path):
    from microgpt_jax.plot import plot_runs

    try:
        print(f"loss curves: {plot_runs(run_dirs, out_path)}")
    except UserError as e:  # matplotlib missing: the run itself is saved, say how to get the plot
        print(f"no loss plot: {e}")


def cmd_plot(args):
    from microgpt_jax.plot import plot_runs

    out = args.out or (Path(args.run_dirs[0]) / "loss.png" if len(args.run_dirs) == 1 else Path("loss.png"))
    print(f"loss curves: {plot_runs(args.run_dirs, out)}")


def cmd_sample(args):
    from microgpt_jax.checkpoint import load_run
    from microgpt_jax.sample import sample_compat

    cfg, _, vocab, params = load_run(args.run_dir)
    rng = random.Random(args.seed)
    for ids in sample_compat(params, cfg, rng, args.num_samples, args.temperature):
        print(vocab.decode(ids))


def cmd_check(args):
    import jax

    jax.config.update("jax_enable_x64", True)
    from microgpt_jax.check import format_table, run_check
    from microgpt_jax.data import Vocab, resolve_data_path, spec_docs
    from microgpt_jax.model import init_params_compat

    docs, rng = spec_docs(resolve_data_path(args.data))
    vocab = Vocab.from_docs(docs)
    cfg = config_from_args(GPTConfig, args, vocab_size=vocab.size)
    doc = docs[0] if args.doc is None else args.doc
    unknown = sorted(set(doc) - set(vocab.chars))
    if unknown:
        raise UserError(f"--doc has characters outside the vocabulary {unknown}; the vocabulary is {vocab.chars!r}")
    params = init_params_compat(cfg, rng)
    rows = run_check(cfg, params, vocab.encode(doc), steps=args.steps)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}  document: {doc!r}")
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_reproduce(args):
    from microgpt_jax.data import resolve_data_path
    from microgpt_jax.reproduce import reproduce

    reproduce(resolve_data_path(args.data), steps=args.steps)


def cmd_bench(args):
    from microgpt_jax import bench

    bench.run(args.cases, args.json, data=args.data, text=args.text)


def build_parser():
    parser = ArgumentParser(prog="microgpt-jax", description="A fast, exact JAX reimplementation of microgpt.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    data_help = "text file, one document per line (default: the names dataset, downloaded and cached)"

    p = sub.add_parser("train", help="train a model (default: the seed's model and hyperparameters on names)")
    add_config_flags(p, GPTConfig)
    add_config_flags(p, TrainConfig)
    p.add_argument("--data", default=None, help=data_help + "; with --mode stream, any text")
    p.add_argument("--out", default=None, help="run directory to save the trained model in")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="training and validation loss curves of one or more runs, overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `microgpt-jax train --out`")
    p.add_argument("--out", default=None, help="image to write (default: RUN_DIR/loss.png for one run, ./loss.png for several)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("sample", help="sample from a trained run")
    p.add_argument("run_dir", help="a run directory written by `microgpt-jax train --out`")
    p.add_argument("--num-samples", type=positive_int, default=20)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("check", help="cross-check JAX gradients and Adam steps against the scalar engine")
    add_config_flags(p, GPTConfig)
    p.add_argument("--doc", default=None, help="the document to check on (default: the first after the shuffle)")
    p.add_argument("--steps", type=positive_int, default=20, help="Adam steps to compare at batch 1")
    p.add_argument("--data", default=None, help=data_help)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("reproduce", help="the seed's exact run (1000 steps, 20 samples) on the JAX engine")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--data", default=None, help=data_help)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="benchmarks, measured side by side, printed as a table")
    p.add_argument("cases", nargs="*", help="cases to run (default: all)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--text", default=None, help="continuous text for the large case (default: tinyshakespeare.txt beside the names file)")
    p.set_defaults(func=cmd_bench)
    return parser


def use_compilation_cache():
    """Keep compiled programs on disk in CACHE/xla, so a command run again skips XLA's compilation.

    CACHE is $MICROGPT_JAX_CACHE or ~/.cache/microgpt-jax; JAX's own
    JAX_COMPILATION_CACHE_DIR, when set, wins.
    """
    import jax

    from microgpt_jax.data import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the steps and the sampler, not tiny ops


def main(argv=None):
    args = build_parser().parse_args(argv)
    use_compilation_cache()
    return args.func(args)


def entry():
    run_cli(main, sys.argv[1:])
