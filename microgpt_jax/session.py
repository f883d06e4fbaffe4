"""One training run put together: devices, data, the trainer, its state and its hooks.

`cli.cmd_train` opens or creates the run directory and calls these; a
notebook or a script can call them the same way.
"""

import dataclasses

import jax
import numpy as np

from microgpt_jax import memory, parallel
from microgpt_jax.data import load_train_data
from microgpt_jax.errors import UserError
from microgpt_jax.hooks import (
    Checkpoints,
    Evaluate,
    NonFinite,
    Plot,
    Progress,
    Record,
    ShowProgress,
    Signals,
    WriteMetrics,
)
from microgpt_jax.loggers import TensorBoard, WandB
from microgpt_jax.metrics import MetricsFile
from microgpt_jax.model import param_shapes
from microgpt_jax.rundir import SCHEDULE_RULE
from microgpt_jax.train import MAX_CHUNK, Trainer, TrainState, fit, init_state


class Session:
    """configs ({table: config}) and a data file -> the mesh, the data source, the trainer."""

    def __init__(self, configs: dict, data_path, devices=None):
        cfg, tcfg, dcfg, ccfg = (configs[t] for t in ("model", "train", "data", "checkpoint"))
        self.mesh = parallel.make_mesh(devices)
        parallel.check_batch(tcfg.batch_size, self.mesh)
        chunk = min(MAX_CHUNK, tcfg.log_every, tcfg.eval_every, ccfg.save_every, tcfg.steps)
        fits = dict(rows=tcfg.batch_size, chunk_steps=chunk, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype)
        memory.check_fits(cfg, **fits)  # before the data is laid out: a huge block_size is refused, not allocated
        self.vocab, self.data = load_train_data(
            data_path, dcfg, tcfg.batch_size, cfg.block_size, tcfg.seed, row_multiple=self.mesh.devices.size
        )
        cfg = dataclasses.replace(cfg, vocab_size=self.vocab.size)
        memory.check_fits(cfg, **fits)  # again with the data's vocabulary
        self.configs, self.data_path = {**configs, "model": cfg}, data_path
        self.trainer = Trainer(cfg, tcfg, self.mesh)

    def describe(self) -> str:
        cfg = self.configs["model"]
        return "\n".join(
            [
                self.data.describe(),
                f"vocab size: {self.vocab.size}",
                f"num params: {sum(o * i for o, i in param_shapes(cfg).values())}",
                f"devices: {self.mesh.devices.size} ({jax.process_count()} process(es), {jax.default_backend()})",
                f"attention: {self.trainer.attention} (cudnn: a GPU in bfloat16; einsum: exact, elsewhere)",
            ]
        )

    def initial_state(self) -> TrainState:
        return init_state(self.configs["model"], self.configs["train"], self.trainer)

    def state_from(self, weights) -> TrainState:
        """A new run's state from another model's weights (fine-tuning): the same model and vocabulary, a fresh optimizer."""
        if weights.vocab != self.vocab:
            raise UserError(
                f"the data's vocabulary ({self.vocab.size - 1} characters) differs from that of the weights "
                f"({weights.vocab.size - 1}, {weights.origin}); fine-tune on data with the same characters"
            )
        dtype = self.configs["train"].param_dtype
        return self.trainer.init(self.trainer.replicate({k: np.asarray(w, dtype) for k, w in weights.params.items()}))

    def resumed_state(self, run) -> TrainState | None:
        """The latest good checkpoint of run, placed on the mesh (None: none saved yet).

        Damaged checkpoints are moved aside, half-written ones deleted, and
        the checkpoint's data position must be where this data puts its
        step. Every process continues from the same checkpoint.
        """
        if run.vocab != self.vocab:
            raise UserError(f"the data's vocabulary differs from the run's ({run.run_file}); pass the run's data file")
        store = run.store
        store.remove_partial()
        parallel.barrier("resume-cleaned")
        if not store.steps():
            return None
        main = parallel.is_main_process()
        checkpoint = store.restore(move_damaged=main, warn=None if main else (lambda message: None))
        steps = parallel.gather_int(checkpoint.step)  # also waits for process 0's moving aside
        if len(set(steps)) > 1:
            raise UserError(
                f"the processes found different latest good checkpoints (steps {steps}) in {store.directory}; "
                "every process must see the same run directory (a shared file system)"
            )
        if checkpoint.data_position != self.data.position(checkpoint.step):
            raise UserError(
                f"checkpoint {checkpoint.step} was at data position {checkpoint.data_position}, but this data order puts "
                f"step {checkpoint.step} at {self.data.position(checkpoint.step)}; resume with the run's data and version"
            )
        return self.trainer.replicate(checkpoint.state)

    def train(self, run=None, resume=False, peer_timeout=60.0, start=None, loggers=()) -> TrainState | None:
        """Train a new run (from the state `start`, if given), or resume run from its latest good checkpoint,
        to the end (or a stop)."""
        state = self.resumed_state(run) if resume else start
        if resume:
            print(f"resuming {run.path} at step {int(state.step) if state else 0}")
            if run.extends:
                print(f"extending it from {run.extends} to {self.configs['train'].steps} steps: {SCHEDULE_RULE}")
                run.record_extension(int(state.step) if state else 0)
        if state and int(state.step) == self.configs["train"].steps:
            return print(f"{run.path} has trained all {int(state.step)} steps; sample with: microgpt-jax sample {run.path}")
        if not run:
            print("no --out: nothing of this run will be saved (pass --out RUN_DIR to keep it)")
        state = state or self.initial_state()
        try:
            state = fit(self.trainer, state, self.data, self.hooks(state, run, peer_timeout, loggers))
        except BrokenPipeError:
            raise  # the reader of our output went away: errors.run_cli says so
        except OSError as e:  # metrics, a plot, a checkpoint: whatever failed, what was saved before stays
            where = run.resume_hint() if run else "nothing was saved"
            raise UserError(f"could not write {e.filename or 'a file'} ({e.strerror or e}); {where}") from None
        if run:
            print(f"saved to {run.path}; sample with: microgpt-jax sample {run.path}")
        return state

    def hooks(self, state: TrainState, run=None, peer_timeout=60.0, loggers=()) -> list:
        """The hooks of a run, in order: stop on NaN, signals, evaluation, metrics, loggers, progress, checkpoints, plot.

        loggers: ("tensorboard",) and/or ("wandb", PROJECT), process 0 only (loggers.py).
        """
        tcfg, main = self.configs["train"], parallel.is_main_process()
        logged = (tcfg.log_every, tcfg.eval_every)
        start = int(state.step)
        where = run.resume_hint if run else (lambda: "no checkpoint was saved")
        hooks = [NonFinite(run.store.latest if run else where), Signals(peer_timeout, where)]
        eval_set = self.data.eval_set()
        if eval_set is not None:
            hooks.append(Evaluate(self.trainer, eval_set, tcfg.eval_every))
        hooks.append(Record(self.trainer.lr, logged))
        resumed_at = start if start else None
        if run and main:
            hooks.append(WriteMetrics(MetricsFile(run.path, resumed_at=resumed_at), logged))
        for name, *project in loggers if main else ():
            if name == "tensorboard":
                hooks.append(TensorBoard(run.path, self.configs, logged, resumed_at=resumed_at))
            else:
                hooks.append(WandB(project[0], run.path if run else None, self.configs, logged))
        hooks.append(ShowProgress(Progress(tcfg.steps, start, bar=None if main else False), logged))
        if run:
            hooks.append(Checkpoints(run.store, run.ccfg.save_every, self.data.position, run.path))
            if main:
                hooks.append(Plot(run.path))
        return hooks
