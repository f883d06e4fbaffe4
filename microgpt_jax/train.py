"""Training: the optimizer, the jitted step, and a jitted loop of many steps.

The step is the seed's: loss, gradients of every weight, one Adam update
with a learning rate that decays linearly to zero over the run.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from microgpt_jax.data import spec_order_batches
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig, loss_fn


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults are the seed's (spec section 4)."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 0.01
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    seed: int = 42
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"dtype must be float32 or float64, got {self.dtype!r}")


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Adam; step s uses lr * (1 - s / steps)."""
    linear = optax.linear_schedule(init_value=tcfg.lr, end_value=0.0, transition_steps=tcfg.steps)

    def schedule(count):
        # optax counts in int32, and int32 / int is float32 in JAX: evaluate the
        # schedule in the training dtype so a float64 run gets a float64 lr.
        return linear(jnp.asarray(count, tcfg.dtype))

    return optax.adam(schedule, b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps)


def _step(params, opt_state, batch, cfg, optimizer):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _steps(params, opt_state, batches, cfg, optimizer):
    """lax.scan of _step over the leading (step) axis of batches: losses [S]."""

    def body(carry, batch):
        params, opt_state, loss = _step(*carry, batch, cfg, optimizer)
        return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
    return params, opt_state, losses


class Trainer:
    """The compiled step and loop for one model config and one optimizer.

    `step(params, opt_state, batch)` does one update; `steps(params,
    opt_state, batches)` does one per leading entry of batches in one
    compiled call. Both donate params and opt_state: the caller must use the
    returned ones.
    """

    def __init__(self, cfg: GPTConfig, tcfg: TrainConfig):
        self.cfg, self.tcfg = cfg, tcfg
        self.optimizer = make_optimizer(tcfg)
        fixed = dict(cfg=cfg, optimizer=self.optimizer)
        self.step = jax.jit(partial(_step, **fixed), donate_argnums=(0, 1))
        self.steps = jax.jit(partial(_steps, **fixed), donate_argnums=(0, 1))

    def init(self, params):
        """The optimizer state for params (moments at zero, step count 0)."""
        return self.optimizer.init(params)

    @staticmethod
    def as_dtype(params, dtype):
        return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)


def run_steps(trainer: Trainer, params, opt_state, encoded_docs, start, num_steps, chunk=100, align=None):
    """Train steps [start, start + num_steps) in spec order, `chunk` steps per compiled call.

    Yields (params, opt_state, first_step, losses) after each call; losses is
    a numpy array, one per step. Calls end at multiples of chunk and of
    `align` (the steps a checkpoint is saved after), wherever the run started.
    """
    step = start
    while step < start + num_steps:
        n = min(chunk - step % chunk, start + num_steps - step, align - step % align if align else chunk)
        batches = spec_order_batches(encoded_docs, step, n, trainer.tcfg.batch_size, trainer.cfg.block_size)
        params, opt_state, losses = trainer.steps(params, opt_state, jax.tree.map(jnp.asarray, batches))
        yield params, opt_state, step, np.asarray(losses)
        step += n
