"""`microgpt-jax train`: a new run, a resumed one (--resume) or a fine-tuned one (--init-from)."""

import argparse
import contextlib
import os
import sys
from pathlib import Path

from microgpt_jax.commands import DATA_HELP, add_vocab_size
from microgpt_jax.errors import UserError, positive_int

PARSER = {"help": "train a model (default: microgpt's model and hyperparameters on names)"}
CONFIG_FLAGS = {"model": None, "train": None, "data": None, "checkpoint": None}


def add_arguments(p):
    add_vocab_size(p)
    p.add_argument(
        "--data", default=None, help=DATA_HELP + "; with --mode stream, any text; or a dataset directory written by `microgpt-jax prepare`"
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
        help="config values in tables [model], [train], [data] (and path: the data), [checkpoint]; flags override them (default: none)",
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
        "--profile",
        type=profile_window,
        default=None,
        metavar="START:STOP",
        help="write a JAX profiler trace of the training steps from step START to step STOP, as the log counts them "
        "(0 <= START < STOP <= --steps; 2:4 traces the 3rd and 4th steps), into RUN_DIR/profile, for TensorBoard's profile "
        "tab (pip install tensorboard-plugin-profile) or ui.perfetto.dev; the training itself is unchanged (default: no trace)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR[@STEP]",
        help="start a new run from these weights (a run's latest checkpoint, a checkpoint STEP, a .safetensors export, or a "
        "Hugging Face GPT-2 or Llama checkpoint directory, its tokenizer.json if any), with their model, tokenizer and train "
        "and data settings but those given: fine-tuning (default: new weights)",
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


def profile_window(text) -> tuple[int, int]:
    """--profile START:STOP as (START, STOP), 0 <= START < STOP."""
    start, colon, stop = text.partition(":")
    try:
        window = int(start), int(stop)
    except ValueError:
        window = None
    if not colon or window is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP, two step numbers (e.g. 10:20)")
    if window[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: steps count from 0; pass a START of 0 or more")
    if window[0] >= window[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: START must be below STOP; pass START:STOP with START < STOP (e.g. 10:20)")
    return window


def check_profile(args, steps=None):
    """--profile writes into a run directory (checked first), within the run's steps (once they are known)."""
    if args.profile is None:
        return
    window = f"--profile {args.profile[0]}:{args.profile[1]}"
    if not (args.out or args.resume):
        raise UserError(f"{window} writes its trace into the run directory (RUN_DIR/profile); pass --out RUN_DIR")
    if steps is not None and args.profile[1] > steps:
        raise UserError(f"{window}: the run ends at step {steps}; pass a STOP of at most {steps} (or more --steps)")


def chosen_loggers(args) -> list:
    """--tensorboard and --wandb PROJECT, their packages checked before anything is loaded or compiled."""
    from microgpt_jax.loggers import require

    if args.tensorboard and not (args.out or args.resume):
        raise UserError("--tensorboard writes into the run directory (RUN_DIR/tb); pass --out RUN_DIR")
    chosen = ([("tensorboard",)] if args.tensorboard else []) + ([("wandb", args.wandb)] if args.wandb else [])
    for name, *_ in chosen:
        require(name)
    return chosen


def fine_tuning(start, init_from, given: dict) -> str:
    """The one line a fine-tune starts with: which weights, and which settings came with them (the rest: given)."""
    taken = {
        f"{name} {value}"
        for table in ("train", "data")
        for name, value in (start.init.settings or {}).get(table, {}).items()
        if name not in given.get(table, {}) and name in {"steps", "batch_size", "lr", "warmup", "schedule", "mode", "tokenizer"}
    }
    typed = [f"--{name.replace('_', '-')}" for table in given.values() for name in table]
    settings = f"; its settings: {', '.join(sorted(taken))} and the rest of its train and data tables" if start.init.settings else ""
    return f"fine-tuning from {init_from} (step {start.init.origin['step']}): its weights, model and tokenizer{settings}" + (
        f"; given: {', '.join(typed)}" if typed else ""
    )


def run(args):
    from microgpt_jax import parallel
    from microgpt_jax.runtime import set_deterministic, set_precision

    if args.deterministic:
        set_deterministic()  # XLA reads its flags once, when the backend starts: before anything below
    # before anything touches a JAX backend: join the other processes, if any
    parallel.initialize(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout, args.peer_timeout)
    if not parallel.is_main_process():
        sys.stdout = open(os.devnull, "w")  # only process 0 logs; errors still go to stderr
    from microgpt_jax.rundir import RunDir, open_for_training
    from microgpt_jax.session import Session

    loggers = chosen_loggers(args)
    check_profile(args)
    with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
        start = held.enter_context(open_for_training(args.given_configs, args.data, args.resume, args.init_from, args.out))
        if args.print_config:  # a config file of this very run: its data, and its vocabulary size where known before the data is read
            known = start.vocab_size is not None or start.run is not None or start.init is not None
            return print(start.configs.to_toml(Path(start.data_path).resolve(), vocab_known=known), end="")
        check_profile(args, start.configs.train.steps)
        if start.init:
            print(fine_tuning(start, args.init_from, args.given_configs))
        set_precision(start.configs.train.dtype)
        session = Session(start.configs, start.data_path, args.devices, start.vocab_size, start.tokenizer)
        print(session.describe())
        if args.dry_run:
            return print(session.dry_run())
        session.compile_step()  # XLA's own figure refuses a step that cannot fit, before anything is made
        init = session.state_from(start.init) if start.init else None  # (before --out is made: the weights must fit the data)
        run = start.run
        if args.out:
            origin = start.init and start.init.origin
            run = held.enter_context(RunDir.create(args.out, session.configs, session.tokenizer, session.data_path, origin))
        try:
            session.train(run, resume=bool(args.resume), peer_timeout=args.peer_timeout, start=init, loggers=loggers, profile=args.profile)
        except UserError as e:  # a new run that failed before it held anything (W&B would not start): gone, so the retry runs
            if args.out and run.remove_if_empty():
                raise UserError(f"{e} ({args.out}, which held nothing yet, was removed)") from None
            raise
