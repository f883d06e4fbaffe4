"""Training: the optimizer, the jitted step, the jitted loop of many steps, and `fit`.

The step is the seed's: loss, gradients of every weight, one Adam update
with a learning rate that decays linearly to zero over the run (after an
optional linear warmup). `fit` runs a whole training run: compiled chunks
of steps, the next chunk's batches built on the host while the current one
runs, validation loss, progress and RUN_DIR/metrics.jsonl.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from microgpt_jax import parallel
from microgpt_jax.data import LAYOUTS, MODES, Batch
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig, loss_fn

DTYPES = ("float32", "float64", "bfloat16")
# TrainConfig fields a resumed run may change: they decide what is logged and
# evaluated, never a number of the training itself.
RESUME_FREE = ("log_every", "eval_every", "eval_size")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults are the seed's (spec section 4), plus a validation split."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 0.01
    warmup: int = 0
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    seed: int = 42
    dtype: str = "float32"
    mode: str = "docs"
    layout: str = "packed"
    val_fraction: float = 0.1
    eval_every: int = 100
    eval_size: int = 1024
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name, allowed in (("dtype", DTYPES), ("mode", MODES), ("layout", LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < self.steps:
            raise UserError(f"warmup must be at least 0 and below steps ({self.steps}), got {self.warmup}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def param_dtype(self):
        """Weights and Adam moments: float32 under bfloat16 compute, else the compute dtype."""
        return jnp.dtype("float32" if self.dtype == "bfloat16" else self.dtype)


def make_schedule(tcfg: TrainConfig):
    """Step s uses lr * (1 - s / steps); with warmup w, lr * s / w for s < w, then a linear decay to 0."""
    decay = optax.linear_schedule(init_value=tcfg.lr, end_value=0.0, transition_steps=tcfg.steps - tcfg.warmup)
    if tcfg.warmup:
        warm = optax.linear_schedule(init_value=0.0, end_value=tcfg.lr, transition_steps=tcfg.warmup)
        decay = optax.join_schedules([warm, decay], [tcfg.warmup])

    def schedule(count):
        # optax counts in int32, and int32 / int is float32 in JAX: evaluate the
        # schedule in the weights' dtype so a float64 run gets a float64 lr.
        return decay(jnp.asarray(count, tcfg.param_dtype))

    return schedule


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    # optax.flatten: Adam on one vector of all weights, a handful of fused
    # kernels instead of a handful per weight matrix (same arithmetic, element by element).
    return optax.flatten(optax.adam(make_schedule(tcfg), b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps))


def _loss(params, batch, cfg, dtype):
    """loss_fn with the weights cast to the compute dtype (a no-op unless bfloat16)."""
    return loss_fn(jax.tree.map(lambda p: p.astype(dtype), params), batch, cfg)


def _step(params, opt_state, batch, cfg, optimizer, dtype):
    loss, grads = jax.value_and_grad(_loss)(params, batch, cfg, dtype)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _steps(params, opt_state, batches, num_steps, cfg, optimizer, dtype):
    """The first num_steps entries of the leading (step) axis of batches, one step each: losses [len(batches)].

    num_steps is traced, so a shorter chunk (the last of a run, or one that
    ends at an eval) runs the same compiled loop and skips the rest.
    """

    def body(i, carry):
        params, opt_state, losses = carry
        batch = jax.tree.map(lambda a: a[i], batches)
        params, opt_state, loss = _step(params, opt_state, batch, cfg, optimizer, dtype)
        return params, opt_state, losses.at[i].set(loss)

    losses = jnp.zeros(batches.tokens.shape[0], jnp.promote_types(dtype, jnp.float32))
    return jax.lax.fori_loop(0, num_steps, body, (params, opt_state, losses))


def _evaluate(params, batches, cfg, dtype):
    """The summed loss of a stacked validation set (its weights already average over all of it)."""
    return jnp.sum(jax.lax.map(lambda batch: _loss(params, batch, cfg, dtype), batches))


class Trainer:
    """The compiled step, loop and evaluation for one model config and one optimizer.

    `step(params, opt_state, batch)` does one update; `steps(params,
    opt_state, batches, num_steps)` does one per leading entry of batches
    (the first num_steps) in one compiled call. Both donate params and
    opt_state: the caller must use the returned ones. With a mesh (see
    parallel.py) params and the optimizer state are replicated on its
    devices and the batch rows split over its `data` axis; XLA adds the
    all-reduce of the gradients. The arrays passed in must be placed that
    way: `replicate` and `put` do it.
    """

    def __init__(self, cfg: GPTConfig, tcfg: TrainConfig, mesh=None):
        self.cfg, self.tcfg, self.mesh = cfg, tcfg, mesh
        self.optimizer = make_optimizer(tcfg)
        self.lr = make_schedule(tcfg)
        dtype = jnp.dtype(tcfg.dtype)
        fixed = dict(cfg=cfg, optimizer=self.optimizer, dtype=dtype)
        # (batch row axis of each argument, or None for a replicated one) -> in/out shardings
        self.step = jax.jit(partial(_step, **fixed), donate_argnums=(0, 1), **self._shardings((None, None, 0)))
        self.steps = jax.jit(partial(_steps, **fixed), donate_argnums=(0, 1), **self._shardings((None, None, 1, None)))
        self.evaluate = jax.jit(partial(_evaluate, cfg=cfg, dtype=dtype), **self._shardings((None, 1)))
        self._init = jax.jit(self.optimizer.init, **self._shardings((None,)))
        self._compiled = {}

    def _shardings(self, row_axes):
        if self.mesh is None:
            return {}
        repl = parallel.replicated(self.mesh)
        ins = tuple(repl if axis is None else parallel.batch_sharding(self.mesh, axis) for axis in row_axes)
        return dict(in_shardings=ins, out_shardings=repl)

    def replicate(self, tree):
        """Host or single-device values -> the mesh's replicated arrays (unchanged without a mesh)."""
        return tree if self.mesh is None else parallel.put_replicated(tree, self.mesh)

    def put(self, batches: Batch) -> Batch:
        """Stacked host batches [steps, rows, T] -> device arrays, rows split over the mesh.

        Every process passes the whole global batch; each transfers only its
        own rows (parallel.local_rows) to its own devices.
        """
        batches = batches._replace(weights=batches.weights.astype(self.tcfg.param_dtype))
        if self.mesh is None:
            return jax.device_put(batches)
        rows = batches.tokens.shape[1]
        mine = parallel.local_rows(rows)
        return parallel.put_batch(Batch(*(a[:, mine] for a in batches)), self.mesh, rows, batch_axis=1)

    def compiled_steps(self, params, opt_state, batches):
        """`steps` compiled ahead of time for these argument shapes, once per Trainer: (executable, seconds spent now).

        Calling the executable never traces or compiles again; arguments of
        another shape are an error instead of a silent recompilation.
        """
        leaves, tree = jax.tree.flatten((params, opt_state, batches))
        key = (tree, tuple((a.shape, str(a.dtype)) for a in leaves))
        if key in self._compiled:
            return self._compiled[key], 0.0
        clock = time.perf_counter()
        self._compiled[key] = self.steps.lower(params, opt_state, batches, 0).compile()
        return self._compiled[key], time.perf_counter() - clock

    def init(self, params):
        """The optimizer state for params (moments at zero, step count 0), placed like params."""
        return self._init(params)


def chunk_ends(start, stop, length, every=()):
    """Where each chunk of at most `length` steps ends: at multiples of every interval, and at stop."""
    step = start
    while step < stop:
        end = min([stop, step + length] + [(step // k + 1) * k for k in every])
        yield end
        step = end


class Chunk(NamedTuple):
    params: dict
    opt_state: tuple
    start: int  # the first step of the chunk (0-based)
    losses: np.ndarray  # one per step
    tokens: int  # trained (non-padding) positions in the chunk
    compile_s: float  # seconds spent compiling before this chunk (the first one only)


def run_steps(trainer: Trainer, params, opt_state, data, start, stop, chunk=100, every=()):
    """Train steps [start, stop) of data, in compiled chunks of at most `chunk` steps; yield a Chunk after each.

    Every chunk runs one executable, compiled once before the first (the
    batches are always `chunk` steps long; a shorter chunk skips the tail).
    While a chunk runs, the next chunk's batches are built on the host and
    sent to the device, so the step never waits for its data.
    """
    length = min(chunk, stop - start)
    bounds = list(chunk_ends(start, stop, length, every))
    firsts = [start] + bounds[:-1]

    def prepare(first, end):
        batches = data.batches(first, end - first, length)
        return trainer.put(batches), int(np.count_nonzero(batches.weights))

    batches, tokens = prepare(firsts[0], bounds[0])
    compiled, compile_s = trainer.compiled_steps(params, opt_state, batches)
    for i, (first, end) in enumerate(zip(firsts, bounds)):
        params, opt_state, losses = compiled(params, opt_state, batches, end - first)  # runs asynchronously
        if i + 1 < len(bounds):
            batches, next_tokens = prepare(firsts[i + 1], bounds[i + 1])
        yield Chunk(params, opt_state, first, np.asarray(losses)[: end - first], tokens, compile_s if i == 0 else 0.0)
        tokens = next_tokens if i + 1 < len(bounds) else 0


class Progress:
    """A tqdm bar on a terminal (step, loss, validation loss, tokens/s, ETA); plain lines otherwise."""

    def __init__(self, total, initial=0, bar=None, file=None):
        self.total, self.start = total, initial
        self.file, self.bar = file or sys.stdout, None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.file = sys.stderr
            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.file, dynamic_ncols=True)

    def update(self, record, steps_done):
        """Show one metrics record; steps_done is how many steps it covers."""
        val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}{val} | {record['tokens_per_s']:,.0f} tok/s", refresh=False)
            self.bar.update(steps_done)
            return
        step, elapsed = record["step"], record["elapsed"]
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        print(
            f"step {step:{len(str(self.total))}d} / {self.total} | loss {record['loss']:.4f}{val} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {elapsed:.1f}s elapsed | eta {eta:.0f}s",
            file=self.file,
            flush=True,
        )

    def note(self, text):
        (self.bar.write if self.bar is not None else partial(print, file=self.file, flush=True))(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def open_metrics(path: Path, start: int):
    """RUN_DIR/metrics.jsonl for appending, without the records of steps after `start` (trained again on a resume)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def fit(trainer: Trainer, params, opt_state, data, run_dir=None, start=0, progress=None, keeper=None):
    """Train from step `start` to tcfg.steps; returns (params, opt_state, the last metrics record).

    After each compiled chunk (log_every steps, or fewer where an eval is
    due) one metrics record: step (steps done), loss (the mean over the
    chunk's steps), val_loss (at multiples of eval_every and at the end),
    lr (of the chunk's last step), tokens_per_s (trained positions, padding
    not counted, per second of that chunk), elapsed (seconds since fit
    began, compilation included). Records go to the progress display and,
    with a run_dir, are appended to RUN_DIR/metrics.jsonl. In a
    multi-process run every process trains, only process 0 shows progress
    and writes metrics.
    """
    tcfg = trainer.tcfg
    main = parallel.is_main_process()
    if progress is None:
        progress = Progress(tcfg.steps, start) if main else Progress(tcfg.steps, start, bar=False, file=open(os.devnull, "w"))
    eval_set = data.eval_set()
    eval_set = None if eval_set is None else trainer.put(eval_set)
    metrics = open_metrics(Path(run_dir) / "metrics.jsonl", start) if run_dir and main else None
    every = (tcfg.log_every, tcfg.eval_every) + ((keeper.save_every,) if keeper else ())
    record = {}
    began = last = time.perf_counter()
    try:
        for chunk in run_steps(trainer, params, opt_state, data, start, tcfg.steps, chunk=tcfg.log_every, every=every):
            # --- after each compiled chunk: everything the host does between chunks is here ---
            params, opt_state = chunk.params, chunk.opt_state
            if chunk.compile_s:
                progress.note(f"compiled the training step in {chunk.compile_s:.1f}s")
            if np.isfinite(chunk.losses).all():  # a NaN/inf chunk is the keeper's to report, not a record
                now = time.perf_counter()
                step = chunk.start + len(chunk.losses)
                seconds = max(now - last - chunk.compile_s, 1e-9)
                record = {
                    "step": step,
                    "loss": float(np.mean(chunk.losses)),
                    "lr": float(trainer.lr(step - 1)),
                    "tokens_per_s": chunk.tokens / seconds,
                    "elapsed": now - began,
                }
                if eval_set is not None and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                    record["val_loss"] = float(trainer.evaluate(params, eval_set))
                last = time.perf_counter()  # eval time is not counted as training time
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                progress.update(record, len(chunk.losses))
            if keeper:
                keeper.end_chunk(chunk.start, chunk.losses, params, opt_state)  # saves; stops on a signal or NaN/inf
                last = time.perf_counter()  # nor is saving
    finally:
        progress.close()
        if metrics:
            metrics.close()
    return params, opt_state, record


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per trained token (forward + backward = 3x forward), matmuls only.

    Forward, per token: 2 FLOPs per weight of every matmul (the 12 n_embd^2
    of each layer and lm_head; the embeddings are lookups), plus attention's
    two T x T x n_embd products per layer (q.k and weights.v, 2 * 2 * T *
    n_embd, counted over the full T x T square as the kernels compute it,
    masked or not). Elementwise work (norms, softmax, relu, Adam) is not
    counted. This is the usual 6N + 12 L T D.
    """
    n_matmul = 12 * cfg.n_layer * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd

