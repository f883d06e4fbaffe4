"""Training: TrainConfig, the optimizer, the jitted step and the jitted loop of many steps, and evaluation.

The step is microgpt's: loss, gradients of every weight, one Adam update
with a learning rate that decays linearly to zero over the run (after an
optional linear warmup). TrainConfig's variants, microgpt's at their
defaults: decoupled weight decay (AdamW), global-norm gradient clipping,
a cosine decay and a floor (min_lr), gradient accumulation over
micro-batches, and the model's dropout, its masks a pure function of the
seed and the step. The step takes a `TrainState` and returns the next one
and a dict of metrics (the loop stacks each over a chunk's steps). The
loop that runs a whole training run, and its hooks, are in loop.py.
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from microgpt_jax import parallel
from microgpt_jax.config import ConfigError, field, fits_64_bits, fraction, non_negative, positive, validate
from microgpt_jax.flops import compiler_options, flops_per_token
from microgpt_jax.layout import Batch
from microgpt_jax.model import (
    ATTENTIONS,
    GPTConfig,
    attention_implementation,
    dropout_keep,
    init_params,
    keep_to_masks,
    loss_fn,
    param_shapes,
    part,
)

DTYPES = ("float32", "float64", "bfloat16")
SCHEDULES = ("linear", "cosine")  # the learning rate's decay from lr to min_lr after the warmup
MAX_STEPS = 2**31 - 1  # the step counters (ours and Adam's) are int32


def step_count(value):
    return positive(value) or (f"must be at most {MAX_STEPS} (steps are counted in int32)" if value > MAX_STEPS else None)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults are microgpt's (spec section 4)."""

    steps: int = field(1000, "optimizer steps in the run", check=step_count)
    batch_size: int = field(1, "documents or windows per step", check=positive)
    grad_accum: int = field(
        1, "micro-batches a step's batch is split into (gradient accumulation); divides batch_size", check=positive, since="0.2"
    )
    lr: float = field(0.01, "peak learning rate", check=positive)
    warmup: int = field(0, "steps of linear warmup before the decay", check=non_negative)
    schedule: str = field("linear", "the learning rate's decay from lr to min_lr after the warmup", choices=SCHEDULES, since="0.2")
    min_lr: float = field(0.0, "the learning rate at the end of the decay, at most lr", check=non_negative, since="0.2")
    beta1: float = field(0.85, "Adam's first-moment decay", check=fraction)
    beta2: float = field(0.99, "Adam's second-moment decay", check=fraction)
    eps: float = field(1e-8, "Adam's epsilon", check=positive)
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW) of every weight; 0 means Adam", check=non_negative, since="0.2")
    grad_clip: float = field(0.0, "the gradients' global L2 norm is clipped to this; 0 means off", check=non_negative, since="0.2")
    seed: int = field(42, "random seed: initial weights, data order", check=fits_64_bits)
    dtype: str = field("float32", "compute dtype; bfloat16 keeps float32 weights", choices=DTYPES)
    eval_every: int = field(100, "validation loss every N steps", check=positive, resumable=True)
    log_every: int = field(10, "a metrics record every N steps", check=positive, resumable=True)

    def __post_init__(self):
        validate(self)
        if self.warmup >= self.steps:
            raise ConfigError("warmup", f"must be below steps ({self.steps}), got {self.warmup}")
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be at most lr ({self.lr}), got {self.min_lr}; lower it or raise lr")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                "grad_accum", f"must divide batch_size ({self.batch_size}), got {self.grad_accum}; use a divisor of batch_size"
            )

    @property
    def param_dtype(self):
        """Weights and Adam moments: float32 under bfloat16 compute, else the compute dtype."""
        return jnp.dtype("float32" if self.dtype == "bfloat16" else self.dtype)


class TrainState(NamedTuple):
    """Everything a step changes: what the step takes and returns, the loop carries and a checkpoint stores."""

    params: dict
    opt_state: tuple
    step: jax.Array  # steps done, int32


def make_schedule(tcfg: TrainConfig):
    """Step s's learning rate: lr * s / w for s < w (warmup w), then with u = (s - w) / (steps - w)
    min_lr + (lr - min_lr) * (1 - u) (linear) or min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi u)) (cosine).

    At the defaults (no warmup, min_lr 0, linear) this is microgpt's lr * (1 - s / steps), bit for bit.
    tcfg may also be a sweep member's `Hyper` (arrays, under vmap): the same arithmetic, the branches selected.
    """
    lr, lo, w, n = tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.steps
    cosine = tcfg.schedule == "cosine" if isinstance(tcfg.schedule, str) else tcfg.schedule

    def schedule(count):
        # optax counts in int32, and int32 / int is float32 in JAX: evaluate the
        # schedule in the weights' dtype so a float64 run gets a float64 lr.
        s = jnp.asarray(count, tcfg.param_dtype)
        u = (s - w) / (n - w)
        if isinstance(cosine, bool):
            shape = 0.5 * (1 + jnp.cos(math.pi * u)) if cosine else 1 - u
        else:
            shape = jnp.where(cosine, 0.5 * (1 + jnp.cos(math.pi * u)), 1 - u)
        decay = lo + (lr - lo) * shape
        if isinstance(w, int):
            return jnp.where(s < w, lr * s / w, decay) if w else decay
        return jnp.where(s < w, lr * s / jnp.where(w > 0, w, 1), decay)

    return schedule


def make_optimizer(tcfg: TrainConfig, every_option=False) -> optax.GradientTransformation:
    """Adam (AdamW with weight_decay), after clipping the gradients' global norm to grad_clip if it is set.

    Each option off leaves its transformation out: at the defaults this is
    the seed's Adam, its arithmetic and its state's structure unchanged.
    every_option: each transformation in, a no-op at 0 (clipping selected
    away, a decay of 0 * w), for a sweep member's `Hyper` of arrays: the
    same arithmetic and the same state arrays as its solo run's optimizer.
    """
    adam = dict(learning_rate=make_schedule(tcfg), b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps)
    if every_option:
        return optax.flatten(optax.chain(_clip_if_set(tcfg.grad_clip), optax.adamw(**adam, weight_decay=tcfg.weight_decay)))
    opt = optax.adamw(**adam, weight_decay=tcfg.weight_decay) if tcfg.weight_decay else optax.adam(**adam)
    if tcfg.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), opt)
    # optax.flatten: the update on one vector of all weights, a handful of fused
    # kernels instead of a handful per weight matrix (same arithmetic, element by element).
    return optax.flatten(opt)


def _clip_if_set(max_norm) -> optax.GradientTransformation:
    """optax.clip_by_global_norm(max_norm) where max_norm (an array) is above 0, else the updates as they are."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        clipped, state = clip.update(updates, state, params)
        return jax.tree.map(lambda c, u: jnp.where(max_norm > 0, c, u), clipped, updates), state

    return optax.GradientTransformation(clip.init, update)


def dropout_key(seed, step):
    """The key of training step `step`'s dropout masks: a pure function of the seed and the step, so a resumed run draws the same."""
    return jax.random.fold_in(jax.random.key(seed), step)


def check_accumulation(tcfg: TrainConfig, devices: int):
    """With a mesh of `devices`, each micro-batch (batch_size / grad_accum rows) must split over them."""
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % devices:
        raise ConfigError(
            "grad_accum",
            f"({tcfg.grad_accum}) leaves micro-batches of {micro} rows, which do not split over the {devices} devices; "
            f"use a grad_accum that makes batch_size / grad_accum a multiple of {devices}",
        )


def micro_batches(a, grad_accum, groups=1):
    """[B, ...] -> [grad_accum, B / grad_accum, ...]: micro-batch k is rows k*b..(k+1)*b-1 (b = B / grad_accum).

    With groups > 1 (the rows split in `groups` blocks over a mesh's devices)
    micro-batch k takes the k-th slice of every device's block instead, so no
    row moves between devices; the rows of one group are still consecutive.
    """
    B, rest = a.shape[0], a.shape[1:]
    if B % (groups * grad_accum):
        raise ConfigError(
            "grad_accum",
            f"({grad_accum}) must divide the {B} rows of a batch over {groups} device(s); "
            f"lay the data out in a multiple of {groups * grad_accum} rows",
        )
    return a.reshape(groups, grad_accum, B // (groups * grad_accum), *rest).swapaxes(0, 1).reshape(grad_accum, B // grad_accum, *rest)


def _loss(params, batch, cfg, dtype, attention="einsum", key=None, rows_B=None, per_row=False, dropout=None, packed=True):
    """loss_fn with the weights cast to the compute dtype (a no-op unless bfloat16); with a key, dropout's
    masks of the batch's rows rows_B (their indices in the step's whole batch) drawn from it. per_row: each row's sum.
    dropout: (keep probability, scale) arrays of a sweep member, in place of cfg.dropout's. packed: rows may hold
    several documents (the attention mask from the batch's segments); else one each from position 0 (stream windows,
    padded documents: the causal mask alone, a constant the compiler folds into the scores, is the same mask)."""
    keep_prob, scale = dropout or (None, None)
    keep = None if key is None else dropout_keep(key, cfg, rows_B, batch.tokens.shape[1], keep_prob)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    batch = batch if packed else batch._replace(segments=None)
    return loss_fn(params, batch, cfg, attention, keep_to_masks(keep, cfg, dtype, scale), per_row=per_row)


def _loss_and_grads(params, batch, grad_accum, groups, **loss_args):
    """The batch's loss and gradients; with grad_accum > 1 summed over its micro-batches in a scan.

    The batch's weights already average over the whole batch, so the sum of
    the micro-batches' losses and gradients is the full batch's, and each
    micro-batch draws its own rows' dropout masks: only one micro-batch's
    activations and masks are live at a time.
    """
    grad_fn = jax.value_and_grad(lambda p, b, rows_B: _loss(p, b, rows_B=rows_B, **loss_args))
    rows_B = jnp.arange(batch.tokens.shape[0])
    if grad_accum == 1:
        return grad_fn(params, batch, rows_B)
    micro = jax.tree.map(lambda a: micro_batches(a, grad_accum, groups), (batch, rows_B))

    def add(total, xs):
        return jax.tree.map(jnp.add, total, grad_fn(params, *xs)), None

    first = jax.tree.map(lambda a: a[0], micro)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(grad_fn, params, *first))
    return jax.lax.scan(add, zeros, micro)[0]


def _step(state: TrainState, batch, cfg, optimizer, dtype, attention="einsum", seed=0, grad_accum=1, groups=1, dropout=None, packed=True):
    """One optimizer step: (the new state, its metrics). A metric added here is logged, stacked and shown everywhere."""
    key = dropout_key(seed, state.step)  # unused without dropout
    loss_args = dict(cfg=cfg, dtype=dtype, attention=attention, key=key, dropout=dropout, packed=packed)
    loss, grads = _loss_and_grads(state.params, batch, grad_accum, groups, **loss_args)
    with part("optimizer"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, opt_state, state.step + 1), metrics


def _steps(state: TrainState, batches, num_steps, step=None, **step_args):
    """The first num_steps entries of the leading (step) axis of batches, one step each: every metric stacked [len(batches)].

    num_steps is traced, so a shorter chunk (the last of a run, or one that
    ends where a hook is due) runs the same compiled loop and skips the rest.
    step: the step function (default _step; a sweep's _sweep_step).
    """
    step = step or _step

    def body(i, carry):
        state, metrics = carry
        state, step_metrics = step(state, jax.tree.map(lambda a: a[i], batches), **step_args)
        return state, jax.tree.map(lambda stacked, m: stacked.at[i].set(m), metrics, step_metrics)

    first = jax.tree.map(lambda a: a[0], batches)
    shapes = jax.eval_shape(lambda s, b: step(s, b, **step_args)[1], state, first)
    metrics = jax.tree.map(lambda m: jnp.zeros((batches.tokens.shape[0], *m.shape), m.dtype), shapes)
    return jax.lax.fori_loop(0, num_steps, body, (state, metrics))


def _row_losses(params, batches, cfg, dtype, attention="einsum", packed=True):
    """Each row's summed loss [E, rows] of a stacked validation set (its weights already average over all of it)."""
    return jax.lax.map(lambda batch: _loss(params, batch, cfg, dtype, attention, per_row=True, packed=packed), batches)


def run_flops(cfg: GPTConfig, tcfg: TrainConfig) -> float:
    """About what a whole run computes: tcfg.steps steps of batch_size rows of block_size tokens."""
    return flops_per_token(cfg) * tcfg.steps * tcfg.batch_size * cfg.block_size


class Evaluator:
    """The compiled evaluation of one model config, and where its arrays live (one device, or a mesh).

    With a mesh (see parallel.py) the weights are replicated on its devices
    and the batch rows split over its `data` axis; the arrays passed in must
    be placed that way: `replicate` and `put` do it.

    `evaluate(params, batches)` is the summed loss of a stacked eval set:
    each row's loss computed on its device, then all of them added exactly
    (math.fsum) on the host, so the sum does not depend on how the rows
    were split over devices or padded.

    attention: one of model.ATTENTIONS; by default the backend's and dtype's
    (model.attention_implementation: cuDNN for bfloat16 on a GPU, else the
    exact `attend`). `self.attention` says which. packed: whether a row may hold
    several documents (DataConfig.packed); if not, the causal mask alone (see _loss).
    """

    def __init__(self, cfg: GPTConfig, dtype, param_dtype, mesh=None, attention=None, packed=True):
        self.cfg, self.mesh, self.param_dtype = cfg, mesh, jnp.dtype(param_dtype)
        self.dtype = jnp.dtype(dtype)
        self.platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        self.attention = attention or attention_implementation(jax.default_backend(), self.dtype, cfg)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        row_losses = partial(_row_losses, cfg=cfg, dtype=self.dtype, attention=self.attention, packed=packed)
        self._row_losses = jax.jit(row_losses, **self._shardings((None, 1)))

    def evaluate(self, params, batches) -> float:
        return math.fsum(np.asarray(self._row_losses(params, batches), np.float64).ravel().tolist())

    def _shardings(self, row_axes):
        """(batch row axis of each argument, or None for a replicated one) -> in/out shardings."""
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
        batches = batches._replace(weights=batches.weights.astype(self.param_dtype))
        if self.mesh is None:
            return jax.device_put(batches)
        rows = batches.tokens.shape[1]
        mine = parallel.local_rows(rows)
        return parallel.put_batch(Batch(*(a[:, mine] for a in batches)), self.mesh, rows, batch_axis=1)


class Trainer(Evaluator):
    """The compiled step and loop (and evaluation) for one model config and one optimizer.

    `step(state, batch)` does one update; `steps(state, batches, num_steps)`
    does one per leading entry of batches (the first num_steps) in one
    compiled call. Each returns the new state and the step's metrics (a dict;
    `steps` stacks each over the steps). Both donate the state: the caller
    must use the returned one. With a mesh XLA adds the all-reduce of the
    gradients.

    Step s draws its dropout masks (with cfg.dropout > 0) from
    dropout_key(tcfg.seed, s), row by row (model.dropout_keep): those of
    model.dropout_masks(dropout_key(seed, s), cfg, rows, T, dtype) for the
    whole batch, whatever grad_accum, the mesh, or where the run was resumed.
    """

    def __init__(self, cfg: GPTConfig, tcfg: TrainConfig, mesh=None, attention=None, packed=True):
        groups = 1 if mesh is None else mesh.devices.size
        check_accumulation(tcfg, groups)
        super().__init__(cfg, tcfg.dtype, tcfg.param_dtype, mesh, attention, packed)
        self.tcfg = tcfg
        self.compiler_options = compiler_options(self.platform, run_flops(cfg, tcfg))
        self.optimizer = make_optimizer(tcfg)
        self.lr = make_schedule(tcfg)
        fixed = dict(cfg=cfg, optimizer=self.optimizer, dtype=self.dtype, attention=self.attention, packed=packed)
        fixed |= dict(seed=tcfg.seed, grad_accum=tcfg.grad_accum, groups=groups)
        self.step = jax.jit(partial(_step, **fixed), donate_argnums=0, **self._shardings((None, 0)))
        self.steps = jax.jit(partial(_steps, **fixed), donate_argnums=0, **self._shardings((None, 1, None)))
        self._init = jax.jit(self.optimizer.init, **self._shardings((None,)))
        self._compiled = {}

    def compiled_steps(self, state, batches):
        """`steps` compiled ahead of time for these argument shapes, once per Trainer: (executable, seconds spent now).

        Calling the executable never traces or compiles again; arguments of
        another shape are an error instead of a silent recompilation. It is
        compiled with the run's compiler_options: a small run on a CPU compiles
        cheaply (flops.compiler_options), as every chunk and resume of it does.
        """
        leaves, tree = jax.tree.flatten((state, batches))
        key = (tree, tuple((a.shape, str(a.dtype)) for a in leaves))
        if key in self._compiled:
            return self._compiled[key], 0.0
        clock = time.perf_counter()
        self._compiled[key] = self.steps.lower(state, batches, 0).compile(compiler_options=dict(self.compiler_options) or None)
        return self._compiled[key], time.perf_counter() - clock

    def init(self, params) -> TrainState:
        """The state before step 0 for params (Adam's moments at zero), placed like params."""
        return TrainState(params, self._init(params), self.replicate(jnp.zeros((), jnp.int32)))


def init_state(cfg: GPTConfig, tcfg: TrainConfig, trainer: "Trainer") -> TrainState:
    """A new run's state: weights drawn from tcfg.seed in the weights' dtype, the optimizer at zero."""
    return trainer.init(trainer.replicate(init_params(cfg, jax.random.key(tcfg.seed), tcfg.param_dtype)))


def abstract_state(cfg: GPTConfig, tcfg: TrainConfig) -> TrainState:
    """Shapes and dtypes of a run's state, nothing allocated: what a checkpoint is read into."""
    params = {name: jax.ShapeDtypeStruct(shape, tcfg.param_dtype) for name, shape in param_shapes(cfg).items()}
    return TrainState(params, jax.eval_shape(make_optimizer(tcfg).init, params), jax.ShapeDtypeStruct((), jnp.int32))


# -- sweeps: many runs of one model shape, trained together ------------------------------------

# the training fields a sweep member may set for itself (model.dropout too): none changes an array's shape or the code
MEMBER_FIELDS = ("lr", "min_lr", "warmup", "schedule", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "seed")


class Hyper(NamedTuple):
    """The members' hyperparameters as arrays [M] (under vmap, one member's scalars)."""

    lr: jax.Array
    min_lr: jax.Array
    warmup: jax.Array
    schedule: jax.Array  # True: cosine
    beta1: jax.Array
    beta2: jax.Array
    eps: jax.Array
    weight_decay: jax.Array
    grad_clip: jax.Array
    seed: jax.Array
    keep_prob: jax.Array  # 1 - dropout
    drop_scale: jax.Array  # 1 / (1 - dropout)

    @classmethod
    def of(cls, tcfgs, dropouts, param_dtype) -> "Hyper":
        """The members' TrainConfigs and dropouts, stacked; each value computed on the host as a solo run computes it."""
        float_ = lambda values: np.asarray(values, param_dtype)  # noqa: E731
        columns = {name: float_([getattr(t, name) for t in tcfgs]) for name in MEMBER_FIELDS if name not in ("schedule", "seed")}
        return cls(
            **columns,
            schedule=np.asarray([t.schedule == "cosine" for t in tcfgs]),
            seed=np.asarray([t.seed for t in tcfgs], jax.dtypes.canonicalize_dtype(np.int64)),  # as the device holds it
            keep_prob=float_([1 - d for d in dropouts]),
            drop_scale=float_([1 / (1 - d) for d in dropouts]),
        )


class Members(NamedTuple):
    """A sweep state's optimizer slot: every member's optimizer state, hyperparameters, and where it froze."""

    opt_state: tuple
    hyper: Hyper
    frozen_at: jax.Array  # int32 [M]: the steps a member had done when its loss or weights went non-finite; -1 while it trains


def member_optimizer(hyper: Hyper, steps, param_dtype) -> optax.GradientTransformation:
    """One member's optimizer (hyper: its scalars): make_optimizer's with every option in."""
    return make_optimizer(SimpleNamespace(**hyper._asdict(), steps=steps, param_dtype=param_dtype), every_option=True)


def _member_step(state: TrainState, batch, hyper: Hyper, frozen_at, cfg, dtype, attention, grad_accum, groups, steps, param_dtype, packed):
    """One member's step (under vmap): its solo run's step, or nothing once it has gone non-finite."""
    optimizer = member_optimizer(hyper, steps, param_dtype)
    dropout = (hyper.keep_prob, hyper.drop_scale) if cfg.dropout else None
    args = dict(cfg=cfg, optimizer=optimizer, dtype=dtype, attention=attention, seed=hyper.seed, grad_accum=grad_accum, groups=groups)
    new, metrics = _step(state, batch, dropout=dropout, packed=packed, **args)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    finite &= jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new.params)]))
    ok = (frozen_at < 0) & finite
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), (new.params, new.opt_state), (state.params, state.opt_state))
    return kept, jnp.where((frozen_at < 0) & ~finite, state.step, frozen_at), metrics


def _sweep_step(state: TrainState, batch, **step_args):
    """Every member's step at once (vmap): params, optimizer states, hyperparameters and the batch have a leading member axis."""
    members = state.opt_state

    def member(params, opt_state, batch, hyper, frozen_at):
        return _member_step(TrainState(params, opt_state, state.step), batch, hyper, frozen_at, **step_args)

    (params, opt_state), frozen_at, metrics = jax.vmap(member)(state.params, members.opt_state, batch, members.hyper, members.frozen_at)
    return TrainState(params, Members(opt_state, members.hyper, frozen_at), state.step + 1), metrics


def spreads_members(members: int, devices: int) -> bool:
    """A sweep puts whole members on each device when their number divides over several; else it splits each member's rows."""
    return devices > 1 and members % devices == 0


class SweepTrainer(Trainer):
    """The compiled step, loop and evaluation of a sweep: members of one model shape, each with its own TrainConfig.

    The state is a TrainState whose params have a leading member axis [M, ...],
    whose opt_state is `Members` (optimizer states [M, ...], the members'
    hyperparameters as arrays, where each froze) and whose step is shared;
    batches are [steps, M, rows, T]. One compilation serves every member and
    any hyperparameter values. With a mesh whose device count divides M, the
    members are spread over the devices (no all-reduce between them); else
    each member's rows are split over the devices, as in a solo run.

    cfg: the members' model (with dropout > 0 if any member's is: each
    member's own rate is in its hyperparameters).
    """

    def __init__(self, cfg: GPTConfig, tcfgs, dropouts, mesh=None, attention=None, packed=True):
        base = tcfgs[0]
        Evaluator.__init__(self, cfg, base.dtype, base.param_dtype, mesh, attention, packed)
        self.compiler_options = compiler_options(self.platform, len(tcfgs) * run_flops(cfg, base))
        self.tcfg, self.tcfgs, self.dropouts = base, list(tcfgs), list(dropouts)
        self.hyper = Hyper.of(tcfgs, dropouts, base.param_dtype)
        devices = 1 if mesh is None else mesh.devices.size
        self.by_member = spreads_members(len(tcfgs), devices)
        groups = 1 if mesh is None or self.by_member else devices
        check_accumulation(base, groups)
        fixed = dict(cfg=cfg, dtype=self.dtype, attention=self.attention, grad_accum=base.grad_accum, groups=groups, packed=packed)
        fixed |= dict(steps=base.steps, param_dtype=base.param_dtype)
        self.step = jax.jit(partial(_sweep_step, **fixed), donate_argnums=0, **self._sweep_shardings(0, 1))
        self.steps = jax.jit(partial(_steps, step=_sweep_step, **fixed), donate_argnums=0, **self._sweep_shardings(1, 2, looped=True))
        self._compiled = {}
        row_losses = jax.vmap(partial(_row_losses, cfg=cfg, dtype=self.dtype, attention=self.attention, packed=packed))
        self._row_losses = jax.jit(row_losses, **self._sweep_shardings(0, 2, evaluation=True))

    def _sweep_shardings(self, member_axis, rows_axis, looped=False, evaluation=False):
        """in/out shardings of the step, the loop (and its step count) or the evaluation, their batches' member and row
        axes where given: members over the devices (by_member), else the members' weights replicated and their rows split."""
        if self.mesh is None:
            return {}
        repl = parallel.replicated(self.mesh)
        if self.by_member:
            members = parallel.batch_sharding(self.mesh, 0)
            state, batches, out = TrainState(members, members, repl), parallel.batch_sharding(self.mesh, member_axis), members
        else:
            state, batches, out = repl, parallel.batch_sharding(self.mesh, rows_axis), repl
        if evaluation:
            return dict(in_shardings=(members if self.by_member else repl, batches), out_shardings=out)
        metrics = parallel.batch_sharding(self.mesh, member_axis) if self.by_member else repl
        return dict(in_shardings=(state, batches, *((repl,) if looped else ())), out_shardings=(state, metrics))

    def evaluate(self, params, batches) -> list[float]:
        """Each member's summed validation loss (batches [M, E, rows, T]), added exactly as a solo run's."""
        rows = np.asarray(self._row_losses(params, batches), np.float64)
        return [math.fsum(r.ravel().tolist()) for r in rows]

    def _place(self, tree, axis):
        """Arrays with a member axis at `axis` onto the mesh: members over the devices, or (rows split) per member."""
        if self.mesh is None:
            return jax.device_put(tree)
        if self.by_member:
            return jax.device_put(tree, parallel.batch_sharding(self.mesh, axis))
        return jax.device_put(tree, parallel.replicated(self.mesh))

    def put(self, batches: Batch, member_axis=1) -> Batch:
        """Stacked member batches [steps, M, rows, T] (or an eval set [M, E, rows, T], member_axis 0) -> device arrays."""
        batches = batches._replace(weights=batches.weights.astype(self.param_dtype))
        if self.mesh is None or self.by_member:
            return self._place(batches, member_axis)
        return jax.device_put(batches, parallel.batch_sharding(self.mesh, 2))  # [steps or M, M or E, rows, T]: the rows

    def put_state(self, state: TrainState) -> TrainState:
        """A sweep state read from a checkpoint (host arrays) -> placed as init places it."""
        return TrainState(self._place(state.params, 0), self._place(state.opt_state, 0), self.replicate(jnp.asarray(state.step)))

    def _opt_init(self, params_M, hyper):
        tcfg = self.tcfg
        return jax.vmap(lambda params, h: member_optimizer(h, tcfg.steps, tcfg.param_dtype).init(params))(params_M, hyper)

    def init(self, params_M) -> TrainState:
        """The state before step 0 of members with these stacked params: each optimizer at zero, none frozen."""
        params_M, hyper = self._place(params_M, 0), self._place(self.hyper, 0)
        frozen_at = self._place(np.full(len(self.tcfgs), -1, np.int32), 0)
        members = Members(jax.jit(self._opt_init)(params_M, hyper), hyper, frozen_at)
        return TrainState(params_M, members, self.replicate(jnp.zeros((), jnp.int32)))

    def abstract_state(self) -> TrainState:
        """The sweep state's shapes and dtypes, nothing allocated: what a sweep checkpoint is read into."""
        M = len(self.tcfgs)
        params = {k: jax.ShapeDtypeStruct((M, *a.shape), a.dtype) for k, a in abstract_state(self.cfg, self.tcfg).params.items()}
        hyper = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.hyper)
        opt_state = jax.eval_shape(self._opt_init, params, hyper)
        members = Members(opt_state, hyper, jax.ShapeDtypeStruct((M,), jnp.int32))
        return TrainState(params, members, jax.ShapeDtypeStruct((), jnp.int32))

    def member_state(self, state: TrainState, m: int) -> TrainState:
        """Member m's state as its solo run's: host arrays, its own optimizer's state structure, the steps it trained."""
        params, opt_state = jax.tree.map(lambda a: np.asarray(a)[m], (state.params, state.opt_state.opt_state))
        frozen_at = int(np.asarray(state.opt_state.frozen_at)[m])
        solo = jax.tree.structure(abstract_state(self.cfg_of(m), self.tcfgs[m]).opt_state)
        opt_state = jax.tree.unflatten(solo, jax.tree.leaves(opt_state))
        return TrainState(params, opt_state, np.int32(frozen_at if frozen_at >= 0 else int(state.step)))

    def cfg_of(self, m) -> GPTConfig:
        """Member m's own model config (its dropout)."""
        return dataclasses.replace(self.cfg, dropout=self.dropouts[m])
