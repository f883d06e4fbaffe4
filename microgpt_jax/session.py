"""One training run put together: devices, memory check, data, the trainer, its state, its hooks and the loop.

The train command opens or creates the run directory and calls these; a
notebook or a script can call them the same way.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from microgpt_jax import memory, parallel
from microgpt_jax.data import load_train_data
from microgpt_jax.errors import UserError
from microgpt_jax.flops import describe_peak, flops_per_token
from microgpt_jax.layout import Batch
from microgpt_jax.loggers import TensorBoard, WandB
from microgpt_jax.loop import Checkpoints, Log, NonFinite, Plot, Profile, Progress, Signals, chunk_length, fit
from microgpt_jax.metrics import MetricsFile
from microgpt_jax.rundir import SCHEDULE_RULE, RunConfig
from microgpt_jax.train import Trainer, TrainState, abstract_state, check_accumulation, init_state


def vocabulary_mismatch(data, weights) -> str:
    """Why the data's tokenizer is not the weights': new characters named, or the two kinds and sizes."""
    where = weights.origin.get("run") or weights.origin.get("file")
    new = sorted(set(data.chars) - set(weights.tokenizer.chars)) if data.kind == weights.tokenizer.kind == "char" else []
    if new:
        shown = "".join(new[:20]) + ("..." if len(new) > 20 else "")
        return (
            f"the data has {len(new)} characters the weights of {where} have no id for ({shown!r}); fine-tune on data "
            f"within their {len(weights.tokenizer.chars)} characters"
        )
    return (
        f"the data's {data.kind} vocabulary ({data.size} ids, BOS included) is not that of the weights of {where} "
        f"({weights.tokenizer.kind}, {weights.tokenizer.size} ids); fine-tune with their tokenizer (drop --tokenizer) "
        "or on a dataset prepared with it"
    )


class Session:
    """configs (a RunConfig) and a data file (or dataset directory) -> the mesh, the data source, the trainer.

    vocab_size: the vocabulary asked for (--vocab-size), if any; tokenizer:
    the bpe tokenizer of the run resumed or the weights started from (a
    new run trains its own).
    """

    member_axis = ()  # a sweep's batches have one: (members,)

    def __init__(self, configs: RunConfig, data_path, devices=None, vocab_size=None, tokenizer=None):
        cfg, tcfg, dcfg, ccfg = configs.model, configs.train, configs.data, configs.checkpoint
        self.mesh = parallel.make_mesh(devices)
        parallel.check_batch(tcfg.batch_size, self.mesh)
        check_accumulation(tcfg, self.mesh.devices.size)  # before the data is loaded
        # steps per compiled chunk: the hooks' cadences (checkpoints or not), the same wherever the run starts
        self.chunk_steps = chunk_length((tcfg.log_every, tcfg.eval_every, ccfg.save_every), tcfg.steps)
        fits = dict(
            rows=tcfg.batch_size, chunk_steps=self.chunk_steps, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype, grad_accum=tcfg.grad_accum
        )
        memory.check_fits(cfg, **fits)  # before the data is laid out: a huge block_size is refused, not allocated
        local = parallel.local_rows if jax.process_count() > 1 else None  # each process reads only its own rows
        self.tokenizer, self.data = load_train_data(
            data_path,
            dcfg,
            tcfg.batch_size,
            cfg.block_size,
            tcfg.seed,
            self.mesh.devices.size * tcfg.grad_accum,
            local,
            vocab_size,
            tokenizer,
        )
        cfg = dataclasses.replace(cfg, vocab_size=self.tokenizer.size)
        memory.check_fits(cfg, **fits)  # again with the data's vocabulary
        self.configs, self.data_path = configs.replace(model=cfg), data_path
        self.trainer = Trainer(cfg, tcfg, self.mesh, packed=dcfg.packed)
        self.step_memory = None  # XLA's figure for the compiled chunk loop, once compile_step has run
        self._compile_s = 0.0  # compile time not yet reported

    def describe(self) -> str:
        cfg, dtype = self.configs.model, self.configs.train.dtype
        kind = self.mesh.devices.flat[0].device_kind
        return "\n".join(
            [
                self.data.describe(),
                f"vocab size: {self.tokenizer.size}" + ("" if self.tokenizer.kind == "char" else f" ({self.tokenizer.kind} tokenizer)"),
                f"num params: {memory.num_params(cfg)}",
                f"devices: {self.mesh.devices.size} ({jax.process_count()} process(es), {jax.default_backend()})",
                f"attention: {self.trainer.attention} (cudnn: a GPU in bfloat16; einsum: exact, elsewhere)",
                f"device kind: {kind}, {describe_peak(kind, dtype)}, {flops_per_token(cfg):,.0f} FLOPs per token",
                *self.data.notes(),
            ]
        )

    # -- the compiled step, before anything is allocated --------------------------------------

    def abstract_args(self):
        """(state, batches) of the chunk loop as shapes and dtypes only: what the run will pass it, nothing allocated."""
        cfg, tcfg = self.configs.model, self.configs.train
        positions = jax.ShapeDtypeStruct((self.chunk_steps, *self.member_axis, self.data.rows, cfg.block_size), jnp.int32)
        weights = jax.ShapeDtypeStruct(positions.shape, tcfg.param_dtype)
        return self._abstract_state(), Batch(positions, positions, positions, positions, weights)

    def _abstract_state(self) -> TrainState:
        return abstract_state(self.configs.model, self.configs.train)

    def estimate(self) -> memory.Estimate:
        tcfg = self.configs.train
        return memory.estimate(self.configs.model, self.data.rows, self.chunk_steps, tcfg.dtype, tcfg.param_dtype, tcfg.grad_accum)

    def compile_step(self, available=None) -> memory.StepMemory | None:
        """Compile the chunk loop for the run's shapes (on abstract arguments: no weights allocated) and
        raise memory.TooBig if XLA's figure for it, with the batches, exceeds the available memory.

        The executable is the one fit runs (Trainer.compiled_steps caches it by
        shapes and dtypes), so this costs no second compilation. Returns XLA's
        figure (None where the backend gives none). available: bytes, default
        memory.available_bytes() of the first device.
        """
        compiled, seconds = self.trainer.compiled_steps(*self.abstract_args())
        self._compile_s += seconds
        self.step_memory = memory.StepMemory.of(compiled)
        if self.step_memory is not None:
            device = self.mesh.devices.flat[0] if available is None else None
            memory.check_compiled(self.step_memory, self.estimate(), available=available, device=device)
        return self.step_memory

    def dry_run(self) -> str:
        """Compile the step (compile_step) and say what the run would hold: weights, optimizer, XLA's figure,
        the device's memory and the estimate. Trains nothing, allocates no weights, writes nothing."""
        cfg, tcfg = self.configs.model, self.configs.train
        step = self.compile_step()
        state = self._abstract_state()
        nbytes = lambda tree: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))
        device = self.mesh.devices.flat[0]
        available = memory.available_bytes(device)
        est = self.estimate()
        on_host = device.platform == "cpu"
        lines = [
            f"parameters: {memory.num_params(cfg):,}{f' x {self.member_axis[0]} members' if self.member_axis else ''} "
            f"({memory.format_bytes(nbytes(state.params))} in {tcfg.param_dtype})",
            f"optimizer state: {memory.format_bytes(nbytes(state.opt_state))}",
        ]
        if step is None:
            lines.append(f"compiled step ({self.chunk_steps} steps per chunk): XLA gives no memory figure on this backend")
        else:
            lines.append(
                f"compiled step ({self.chunk_steps} steps per chunk): {memory.format_bytes(step.total)} "
                f"({step.describe()}); with the batches {memory.format_bytes(step.total + memory.beyond_compiled(est, on_host))}"
            )
        where = f"{device.platform} {device.id}" + (", the host's available memory" if on_host else ", free")
        lines += [
            f"device memory: {memory.format_bytes(available) if available is not None else 'unknown'} ({where})",
            f"estimate: {memory.format_bytes(est.total if on_host else est.device)} ({est.describe(host=on_host)})",
            f"dry run: compiled in {self._compile_s:.1f}s; nothing trained or written",
        ]
        return "\n".join(lines)

    def initial_state(self) -> TrainState:
        return init_state(self.configs.model, self.configs.train, self.trainer)

    def state_from(self, weights) -> TrainState:
        """A new run's state from another model's weights (fine-tuning): the same model and vocabulary, a fresh optimizer."""
        if weights.tokenizer is None:  # a Hugging Face checkpoint without tokenizer.json: the data's tokenizer, of its size
            if self.tokenizer.size != weights.cfg.vocab_size:
                raise UserError(
                    f"{weights.origin['hf']} has no tokenizer.json and {weights.cfg.vocab_size} token ids, the data's "
                    f"{self.tokenizer.kind} tokenizer {self.tokenizer.size}; pass --tokenizer byte (257 ids) or data of that many ids, "
                    "or add its tokenizer.json"
                )
        elif weights.tokenizer != self.tokenizer:
            raise UserError(vocabulary_mismatch(self.tokenizer, weights))
        dtype = self.configs.train.param_dtype
        return self.trainer.init(self.trainer.replicate({k: np.asarray(w, dtype) for k, w in weights.params.items()}))

    def resumed_state(self, run) -> TrainState | None:
        """The latest good checkpoint of run, placed on the mesh (None: none saved yet).

        Damaged checkpoints are moved aside, half-written ones deleted, and
        the checkpoint's data position must be where this data puts its
        step. Every process continues from the same checkpoint.
        """
        if run.tokenizer != self.tokenizer:
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

    def train(self, run=None, resume=False, peer_timeout=60.0, start=None, loggers=(), profile=None) -> TrainState | None:
        """Train a new run (from the state `start`, if given), or resume run from its latest good checkpoint,
        to the end (or a stop). profile: (START, STOP), a profiler trace of those steps in RUN_DIR/profile."""
        state = self.resumed_state(run) if resume else start
        if resume:
            print(f"resuming {run.path} at step {int(state.step) if state else 0}")
            if run.extends:
                print(f"extending it from {run.extends} to {self.configs.train.steps} steps: {SCHEDULE_RULE}")
                run.record_extension(int(state.step) if state else 0)
        if profile and profile[0] < (first := int(state.step) if state else 0):
            window = f"--profile {profile[0]}:{profile[1]}"
            raise UserError(f"{window}: {run.path} resumes at step {first}, after START; pass a START of at least {first}")
        if state and int(state.step) == self.configs.train.steps:
            return print(f"{run.path} has trained all {int(state.step)} steps; sample with: microgpt-jax sample {run.path}")
        if not run:
            print("no --out: nothing of this run will be saved (pass --out RUN_DIR to keep it)")
        self.compile_step()  # refused here, before the weights are made
        if self._compile_s:
            print(f"compiled the training step in {self._compile_s:.1f}s")
            self._compile_s = 0.0
        state = state or self.initial_state()
        try:
            stop = Signals(peer_timeout, run.resume_hint if run else (lambda: "no checkpoint was saved"))
            state = fit(self.trainer, state, self.data, self.hooks(state, run, loggers, profile), stop, self.chunk_steps)
        except BrokenPipeError:
            raise  # the reader of our output went away: errors.run_cli says so
        except OSError as e:  # metrics, a plot, a checkpoint: whatever failed, what was saved before stays
            where = run.resume_hint() if run else "nothing was saved"
            fix = "; move that directory away first" if isinstance(e, IsADirectoryError) else ""  # else a resume fails the same way
            raise UserError(f"could not write {e.filename or 'a file'} ({e.strerror or e}){fix}; {where}") from None
        if run:
            print(f"saved to {run.path}; sample with: microgpt-jax sample {run.path}")
        return state

    def hooks(self, state: TrainState, run=None, loggers=(), profile=None) -> list:
        """The hooks of a run, in order: the profile, stop on NaN, the log (validation loss, metrics file, loggers,
        progress), checkpoints, plot.

        loggers: ("tensorboard",) and/or ("wandb", PROJECT), process 0 only (loggers.py). profile: (START, STOP),
        a trace of those steps in RUN_DIR/profile, process 0 only (the others end their chunks at the same steps).
        """
        tcfg, main, start = self.configs.train, parallel.is_main_process(), int(state.step)
        resumed_at = start if start else None
        sinks = [MetricsFile(run.path, resumed_at=resumed_at)] if run and main else []
        for name, *project in loggers if main else ():
            if name == "tensorboard":
                sinks.append(TensorBoard(run.path, self.configs, resumed_at=resumed_at))
            else:
                sinks.append(WandB(project[0], run.path if run else None, self.configs))
        sinks.append(Progress(tcfg.steps, start, bar=None if main else False))
        eval_set = self.data.eval_set()
        evaluate = None
        if eval_set is not None:
            on_device = self.trainer.put(eval_set)
            evaluate = lambda params: self.trainer.evaluate(params, on_device)  # noqa: E731
        hooks = [Profile(*profile, run.path / "profile" if main else None)] if profile else []  # first: stops before the rest
        hooks.append(NonFinite(run.store.latest if run else (lambda: "no checkpoint was saved")))
        hooks.append(Log(sinks, self.trainer.lr, tcfg.log_every, tcfg.eval_every, evaluate))
        if run:
            hooks.append(Checkpoints(run.store, run.ccfg.save_every, self.data.position, run.path))
            if main:
                hooks.append(Plot(run.path))
        return hooks
