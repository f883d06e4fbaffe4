"""Optional experiment loggers: TensorBoard and Weights & Biases, each a sink of the loop's `Log` hook (loop.py).

RUN_DIR/metrics.jsonl stays the record of a run; these mirror each of its
records as scalars, at the record's step: every metric of the step as
train/NAME (train/loss, train/grad_norm, ...), train/lr, train/tokens_per_s,
and val/loss where one was measured; plus the run's configs once as text.
Each needs an extra (`pip install 'microgpt-jax[tensorboard]'`, `[wandb]`);
without it, constructing the sink is one UserError saying so. Only process
0 should have them.
"""

import dataclasses
import importlib
import os
import secrets
import time
from pathlib import Path

from microgpt_jax.config import to_toml
from microgpt_jax.errors import UserError

EXTRAS = {"tensorboard": ("tensorboardX", "--tensorboard"), "wandb": ("wandb", "--wandb")}  # extra: (module, flag)
TB_DIR = "tb"


def require(extra: str):
    """The module behind an extra ("tensorboard" or "wandb"), or a UserError naming what to install."""
    module, flag = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # a missing package says what to install; a broken one (a dependency of it missing) also says why
        broken = f" (importing it failed: {e})" if e.name not in (module, None) else ""
        raise UserError(f"{flag} needs the {module} package{broken}; install it with: pip install 'microgpt-jax[{extra}]'") from None


def scalars(record: dict) -> dict:
    """A metrics record's values under the loggers' names: train/NAME, and val/loss where the record has a val_loss."""
    values = {("val/loss" if name == "val_loss" else f"train/{name}"): value for name, value in record.items()}
    return {name: float(value) for name, value in values.items() if name not in ("train/step", "train/elapsed")}


def config_dict(configs: dict) -> dict:
    """{table: config dataclass} -> {table: {field: value}}."""
    return {table: dataclasses.asdict(cfg) for table, cfg in configs.items()}


class TensorBoard:
    """Scalars of each record, and the configs as text, in RUN_DIR/tb (tensorboardX event files).

    A resumed run (resumed_at: the step it resumed from) appends to the same
    directory and marks the restart, so TensorBoard drops what the first run
    logged after that step (the steps trained again), as metrics.jsonl does.
    """

    def __init__(self, run_dir, configs: dict, resumed_at=None):
        self._tensorboardX = require("tensorboard")
        self.directory, self.configs, self.resumed_at = Path(run_dir) / TB_DIR, configs, resumed_at
        self.writer = None

    def __enter__(self):
        purge = None if self.resumed_at is None else self.resumed_at + 1  # keeps the resumed-from step's record
        # tensorboardX names a file by the second and the host, and truncates one of that name: a run resumed
        # within the same second would wipe the first's events. The suffix keeps names apart, in the order written.
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self.writer = self._tensorboardX.SummaryWriter(str(self.directory), purge_step=purge, filename_suffix=suffix)
        # indented: TensorBoard renders text as Markdown, and an indented block shows as it is
        text = "\n".join("    " + line for line in to_toml(self.configs).splitlines())
        self.writer.add_text("config", text, global_step=self.resumed_at or 0)
        self.writer.flush()
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None

    def write(self, record: dict):
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()  # a reader (or a kill) sees every record the loop has made


class WandB:
    """A Weights & Biases run (named after the run directory, its files in RUN_DIR/wandb) with the scalars of each record.

    WANDB_MODE=offline (or `wandb offline`) keeps it local for `wandb sync`
    later. The W&B run's id is kept in RUN_DIR/wandb/run_id, so a resumed run
    continues the same W&B run (W&B keeps the steps it already has).
    """

    def __init__(self, project: str, run_dir, configs: dict):
        self._wandb = require("wandb")
        self.project, self.run_dir, self.configs = project, run_dir and Path(run_dir), configs
        self.run = None

    def _run_id(self) -> str | None:
        """The id of this run directory's W&B run: the one kept there, else a new one, kept (None: no run directory)."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "wandb" / "run_id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            run_id = secrets.token_hex(8)  # W&B accepts any id of letters and digits
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(run_id + "\n")
            return run_id

    def __enter__(self):
        where = {} if self.run_dir is None else dict(dir=str(self.run_dir), name=self.run_dir.name, id=self._run_id(), resume="allow")
        try:
            self.run = self._wandb.init(project=self.project, config=config_dict(self.configs), **where)
        except self._wandb.errors.Error as e:  # not logged in, no network, a bad project name
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not start the W&B run ({first}); run `wandb login`, or set WANDB_MODE=offline") from None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.run is not None:
            self.run.finish(exit_code=0 if exc_type is None else 1)
            self.run = None

    def write(self, record: dict):
        self.run.log(scalars(record), step=record["step"])
