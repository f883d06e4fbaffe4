"""Optional experiment loggers: TensorBoard and Weights & Biases, each a training-loop hook (hooks.py).

RUN_DIR/metrics.jsonl stays the record of a run; these mirror each of its
records (set on `info.record` by the `Record` hook, which must come before
them) as scalars: train/loss, train/lr, train/tokens_per_s and val/loss
where one was measured, at the record's step, plus the run's configs once
as text. Each needs an extra (`pip install 'microgpt-jax[tensorboard]'`,
`[wandb]`); without it, constructing the hook is one UserError saying so.
Only process 0 should have them.
"""

import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

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
    """A metrics record's values under the loggers' names (val/loss only where the record has a val_loss)."""
    values = {"train/loss": record["loss"], "train/lr": record["lr"], "train/tokens_per_s": record["tokens_per_s"]}
    if "val_loss" in record:
        values["val/loss"] = record["val_loss"]
    return {name: float(value) for name, value in values.items()}


def config_dict(configs: dict) -> dict:
    """{table: config dataclass} -> {table: {field: value}}."""
    return {table: dataclasses.asdict(cfg) for table, cfg in configs.items()}


def config_text(configs: dict) -> str:
    """The configs as TOML (the tables of `microgpt-jax train`'s flags)."""
    lines = []
    for table, values in config_dict(configs).items():
        lines += ([""] if lines else []) + [f"[{table}]"]
        lines += [f"{name} = {json.dumps(value)}" for name, value in values.items() if value is not None]
    return "\n".join(lines)


class TensorBoard:
    """Scalars of each record, and the configs as text, in RUN_DIR/tb (tensorboardX event files).

    A resumed run (resumed_at: the step it resumed from) appends to the same
    directory and marks the restart, so TensorBoard drops what the first run
    logged after that step (the steps trained again), as metrics.jsonl does.
    """

    def __init__(self, run_dir, configs: dict, every, resumed_at=None):
        self._tensorboardX = require("tensorboard")
        self.directory, self.configs, self.every, self.resumed_at = Path(run_dir) / TB_DIR, configs, every, resumed_at
        self.writer = None

    def __enter__(self):
        purge = None if self.resumed_at is None else self.resumed_at + 1  # keeps the resumed-from step's record
        # tensorboardX names a file by the second and the host, and truncates one of that name: a run resumed
        # within the same second would wipe the first's events. The suffix keeps names apart, in the order written.
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self.writer = self._tensorboardX.SummaryWriter(str(self.directory), purge_step=purge, filename_suffix=suffix)
        # indented: TensorBoard renders text as Markdown, and an indented block shows as it is
        text = "\n".join("    " + line for line in config_text(self.configs).splitlines())
        self.writer.add_text("config", text, global_step=self.resumed_at or 0)
        self.writer.flush()
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None

    def __call__(self, info):
        if info.record:
            step = info.record["step"]
            for name, value in scalars(info.record).items():
                self.writer.add_scalar(name, value, global_step=step)
            self.writer.flush()  # a reader (or a kill) sees every record the loop has made


class WandB:
    """A Weights & Biases run (named after the run directory, its files in RUN_DIR/wandb) with the scalars of each record.

    WANDB_MODE=offline (or `wandb offline`) keeps it local for `wandb sync`
    later. A resumed run is a new W&B run, starting at the resumed step.
    """

    def __init__(self, project: str, run_dir, configs: dict, every):
        self._wandb = require("wandb")
        self.project, self.run_dir, self.configs, self.every = project, run_dir and Path(run_dir), configs, every
        self.run = None

    def __enter__(self):
        where = {} if self.run_dir is None else dict(dir=str(self.run_dir), name=self.run_dir.name)
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

    def __call__(self, info):
        if info.record:
            self.run.log(scalars(info.record), step=info.record["step"])
