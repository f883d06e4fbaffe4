"""`microgpt-jax sweep`: seeds and settings of one model shape, trained together as one compiled program."""

import contextlib

from microgpt_jax.commands import DATA_HELP, add_vocab_size
from microgpt_jax.errors import UserError, positive_int

PARSER = {
    "help": "train many runs of one model shape at once: seeds x --set lists, each member an ordinary run directory",
    "epilog": "e.g. microgpt-jax sweep --out sweeps/lr --seeds 4 --set lr=0.01,0.003 (8 members)",
}
CONFIG_FLAGS = {"model": None, "train": None, "data": None, "checkpoint": None}


def add_arguments(p):
    add_vocab_size(p)
    p.add_argument("--data", default=None, help=DATA_HELP + "; or a dataset directory written by `microgpt-jax prepare`")
    p.add_argument("--out", default=None, metavar="SWEEP_DIR", help="a new sweep directory (default: nothing is saved)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="SWEEP_DIR",
        help="continue this sweep from its latest good checkpoint (default: start a new sweep)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="config values in tables [model], [train], [data], [checkpoint]; flags override them (default: none)",
    )
    add_member_arguments(p)
    p.add_argument(
        "--dry-run", action="store_true", help="compile the sweep's step and print its memory, then exit: nothing is trained or written"
    )
    p.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="devices: the members spread over them when their count divides the members (default: all)",
    )


def add_seeds(p, default):
    p.add_argument(
        "--seeds",
        default=default,
        metavar="N|A-B|A,B,...",
        help="the seeds: N means 0..N-1, A-B a range, A,B,... a list (default %(default)s)",
    )


def add_member_arguments(p):
    add_seeds(p, "3")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=None,
        metavar="FIELD=V1,V2,...",
        help="values of a field that changes no shape (lr, min_lr, warmup, schedule, beta1, beta2, eps, weight_decay, grad_clip, "
        "dropout); several --set make a product (default: none, only the seeds vary)",
    )


def run(args):
    from microgpt_jax.rundir import RunConfig
    from microgpt_jax.runtime import set_precision
    from microgpt_jax.sweep import Sweep, SweepDir, members_of, parse_seeds, parse_set
    from microgpt_jax.text import resolve_data_path

    with contextlib.ExitStack() as held:
        if args.resume:
            if args.out or args.sets or any(args.given_configs.values()):
                raise UserError("--resume continues a sweep as it is: pass no --out, --set or config flags with it")
            directory = held.enter_context(SweepDir.open(args.resume))
            members, data_path = directory.members, directory.data_path
            tokenizers = [run.tokenizer for run in directory.runs]
            directory.runs[0].check_data(args.data or data_path)
        else:
            directory, tokenizers = None, None
            if args.out:
                SweepDir.check_new(args.out)  # before anything is loaded or compiled
            base = RunConfig.of(args.given_configs)
            members = members_of(base, parse_seeds(args.seeds), [parse_set(s) for s in args.sets or ()])
            data_path = resolve_data_path(args.data)
        set_precision(members[0].configs.train.dtype)
        sweep = Sweep(members, data_path, args.devices, args.given_configs["model"].get("vocab_size"), tokenizers)
        print(sweep.describe())
        if args.dry_run:
            return print(sweep.dry_run())
        sweep.compile_step()
        if args.out:
            members = [m._replace(configs=c) for m, c in zip(members, sweep.member_configs)]
            directory = held.enter_context(SweepDir.create(args.out, sweep.configs, members, sweep.tokenizers, sweep.data_path))
        sweep.train(directory, resume=bool(args.resume))
