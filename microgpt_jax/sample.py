"""Sampling names from a trained model.

`sample_compat` is the seed's inference (spec section 5) run by the JAX
model: every draw is `random.choices(range(vocab_size), weights=probs)` on
the caller's Python `random` stream, so the same weights and the same stream
give the seed's very samples. The whole generation is one compiled loop: the
uniforms that `random.choices` would consume are drawn up front, and the
stream is then advanced by exactly the number of draws the samples used.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from microgpt_jax.model import GPTConfig, forward


def _cumsum_in_order(p_V):
    """Left-to-right running sum, as itertools.accumulate adds (so rounding matches)."""
    return jax.lax.scan(lambda acc, p: (acc + p, acc + p), jnp.zeros((), p_V.dtype), p_V)[1]


def choices_index(probs_V, u):
    """The index `random.choices(range(V), weights=probs)` picks when its random() returns u."""
    cum_V = _cumsum_in_order(probs_V)
    # bisect_right(cum, u * total, 0, V - 1): how many running sums are <= u * total
    return jnp.minimum(jnp.sum(cum_V <= u * cum_V[-1]), probs_V.shape[0] - 1)


def seed_probs(logits_V, temperature):
    """softmax(logits / T) computed in the scalar engine's order: exp(z - max) * (1 / sum)."""
    z_V = logits_V / temperature
    e_V = jnp.exp(z_V - jnp.max(z_V))
    return e_V * (1.0 / jnp.sum(e_V))


@partial(jax.jit, static_argnames=("cfg", "num_samples", "temperature"))
def _generate_compat(params, uniforms, cfg: GPTConfig, num_samples, temperature):
    """Samples one after another, one token per loop iteration, each draw taking the next uniform.

    Returns tokens [num_samples, block_size] (each sample ends at its first
    BOS, or fills the row) and the number of uniforms used.
    """
    T, bos = cfg.block_size, cfg.vocab_size - 1
    fresh_T = jnp.full((T,), bos, jnp.int32)

    def body(carry):
        i, pos, used, seq_T, out_NT = carry
        logits_V = forward(params, seq_T[None], cfg)[0, pos]
        token = choices_index(seed_probs(logits_V, temperature), uniforms[used]).astype(jnp.int32)
        out_NT = out_NT.at[i, pos].set(token)
        done = (token == bos) | (pos == T - 1)
        seq_T = jnp.where(done, fresh_T, seq_T.at[pos + 1].set(token, mode="drop"))
        return i + done, jnp.where(done, 0, pos + 1), used + 1, seq_T, out_NT

    init = (0, 0, 0, fresh_T, jnp.full((num_samples, T), bos, jnp.int32))
    _, _, used, _, out_NT = jax.lax.while_loop(lambda c: c[0] < num_samples, body, init)
    return out_NT, used


def sample_compat(params, cfg: GPTConfig, rng, num_samples=20, temperature=0.5):
    """Token ids of num_samples samples (BOS excluded), drawn as the seed draws them from rng."""
    state = rng.getstate()
    uniforms = np.array([rng.random() for _ in range(num_samples * cfg.block_size)])
    out_NT, used = _generate_compat(params, uniforms, cfg, num_samples, float(temperature))
    rng.setstate(state)
    for _ in range(int(used)):  # leave rng exactly where the seed's draws would
        rng.random()
    bos = cfg.vocab_size - 1
    rows = np.asarray(out_NT).tolist()
    return [row[: row.index(bos)] if bos in row else row for row in rows]
