"""`microgpt-jax plot`: loss curves of one or more runs, overlaid."""

from pathlib import Path

PARSER = {"help": "training and validation loss curves of one or more runs, overlaid"}


def add_arguments(p):
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `microgpt-jax train --out`")
    p.add_argument(
        "--out",
        default=None,
        metavar="IMAGE",
        help="a new image to write, .png, .svg, .pdf, ... (default: RUN_DIR/loss.png for one run, which is redrawn; "
        "./loss.png for several)",
    )


def run(args):
    from microgpt_jax.errors import UserError
    from microgpt_jax.plot import plot_runs

    own = Path(args.run_dirs[0]) / "loss.png" if len(args.run_dirs) == 1 else None  # the run's own plot, redrawn by train too
    out = Path(args.out) if args.out else own or Path("loss.png")
    if out.exists() and out != own:
        raise UserError(f"{out} already exists; pass a new file name with --out so nothing is overwritten")
    print(f"loss curves: {plot_runs(args.run_dirs, out)}")
