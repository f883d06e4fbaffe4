"""The cross-check: the JAX model against the scalar engine, in float64.

Both engines start from identical weights; we compare the logits of every
position, every weight's gradient of the loss, and the losses and weights
over a few Adam steps. `microgpt-jax check` prints the table this builds.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import reference
from microgpt_jax.layout import padded_batch
from microgpt_jax.model import GPTConfig, forward, loss_fn
from microgpt_jax.train import TrainConfig, Trainer

# |jax - ref| <= ATOL + RTOL * |ref|, element by element.
ATOL, RTOL = 1e-12, 1e-10
# Weights after several Adam steps: |jax - ref| <= PARAM_ATOL.
PARAM_ATOL = 1e-10


def require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError("the cross-check runs in float64: call jax.config.update('jax_enable_x64', True) first")


def to_reference_state(params) -> dict:
    """JAX params -> the scalar engine's state dict (fresh Value leaves)."""
    return {name: [[reference.Value(float(x)) for x in row] for row in np.asarray(w, np.float64)] for name, w in params.items()}


def from_reference_state(state, attr="data") -> dict:
    """The scalar engine's state dict -> arrays of each node's `data` (or `grad`)."""
    return {name: np.array([[getattr(v, attr) for v in row] for row in m], np.float64) for name, m in state.items()}


def reference_grads(params, cfg, tokens):
    """(loss, {name: grad}) from the scalar engine."""
    state = to_reference_state(params)
    loss = reference.loss(state, cfg, tokens)
    loss.backward()
    return loss.data, from_reference_state(state, "grad")


_value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)
_forward = jax.jit(forward, static_argnums=2)


def jax_grads(params, cfg, tokens):
    batch = jax.tree.map(jnp.asarray, padded_batch([tokens], cfg.block_size))
    loss, grads = _value_and_grad(params, batch, cfg)
    return float(loss), jax.tree.map(np.asarray, grads)


@dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    ok: bool


def compare(name, got, want, atol=ATOL, rtol=RTOL) -> Row:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    ok = bool(got.shape == want.shape and np.all(err <= atol + rtol * np.abs(want)))
    return Row(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), ok)


def check_logits(params, cfg, tokens) -> Row:
    """The vectorized forward against the scalar engine's token-by-token logits."""
    tokens = tokens[: cfg.block_size]
    want = [[v.data for v in row] for row in reference.sequence_logits(to_reference_state(params), cfg, tokens)]
    got = _forward(params, jnp.asarray([tokens]), cfg)[0]
    return compare("logits", got, want)


def check_grads(params, cfg, tokens) -> list[Row]:
    """The loss and every weight's gradient, element by element."""
    ref_loss, ref_g = reference_grads(params, cfg, tokens)
    jax_loss, jax_g = jax_grads(params, cfg, tokens)
    return [compare("loss", jax_loss, ref_loss)] + [compare(f"grad {k}", jax_g[k], ref_g[k]) for k in ref_g]


def check_training(params, cfg, docs_tokens, steps) -> list[Row]:
    """`steps` Adam steps at batch 1 in spec order on both engines: losses, then final weights."""
    state = to_reference_state(params)
    adam = reference.Adam(reference.parameters(state), steps)
    ref_losses = [reference.train_step(state, cfg, adam, s, docs_tokens[s % len(docs_tokens)]) for s in range(steps)]
    trainer = Trainer(cfg, TrainConfig(steps=steps, dtype="float64"))
    train_state = trainer.init(jax.tree.map(jnp.asarray, params))
    jax_losses = []
    for s in range(steps):
        batch = jax.tree.map(jnp.asarray, padded_batch([docs_tokens[s % len(docs_tokens)]], cfg.block_size))
        train_state, loss = trainer.step(train_state, batch)
        jax_losses.append(float(loss))
    p = train_state.params
    final = from_reference_state(state)
    return [compare("train losses", jax_losses, ref_losses)] + [
        compare(f"after {steps} steps {k}", p[k], final[k], atol=PARAM_ATOL, rtol=0.0) for k in final
    ]


def run_check(cfg: GPTConfig, params, tokens, steps=0) -> list[Row]:
    require_x64()
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float64), params)
    rows = [check_logits(params, cfg, tokens)] + check_grads(params, cfg, tokens)
    if steps:
        rows += check_training(params, cfg, [tokens], steps)
    return rows


def format_table(rows) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'parameter':<{width}}  {'max abs err':>12}  {'max rel err':>12}  result"]
    lines += [f"{r.name:<{width}}  {r.max_abs:12.3e}  {r.max_rel:12.3e}  {'pass' if r.ok else 'FAIL'}" for r in rows]
    return "\n".join(lines)
