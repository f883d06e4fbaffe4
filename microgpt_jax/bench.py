"""`microgpt-jax bench`: speed measured side by side in one run, printed as a table.

Each case is a function decorated with @case that returns {metric: value};
ratios are computed inside a case from numbers measured in the same run, so
they mean something on a shared, noisy machine. Compile time is reported
apart from steady-state time.
"""

import json
import time

CASES = {}


def case(fn):
    """Register a benchmark case under its function name."""
    CASES[fn.__name__] = fn
    return fn


def timed(fn, *args):
    """(result, seconds) of fn(*args), waiting for any JAX arrays in the result."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run(names=None, json_path=None, print=print):
    names = names or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        from microgpt_jax.errors import UserError

        raise UserError(f"unknown bench case(s) {unknown}; choose from {sorted(CASES)}")
    results = {}
    for name in names:
        results |= CASES[name]()
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


# --- sampling: the KV-cache generation loop against the scalar engine and against recomputing ---


def _draws(out_BW, bos):
    """Tokens drawn (= decode steps): each row's tokens up to and including its BOS, or the whole row."""
    import numpy as np

    out_BW = np.asarray(out_BW)
    ended_B = (out_BW == bos).any(axis=1)
    return int(np.where(ended_B, (out_BW == bos).argmax(axis=1) + 1, out_BW.shape[1]).sum())


def _best_rate(generate, bos, repeats=3):
    """Best tokens/s over a few runs of generate(i) (i = 1..repeats) after a compiling run generate(0)."""
    _, compile_s = timed(generate, 0)
    rates = []
    for i in range(1, repeats + 1):
        out_BW, seconds = timed(generate, i)
        rates.append(_draws(out_BW, bos) / seconds)
    return max(rates), compile_s


def generate_recompute(params, prompt_P, key, rows_B, temperature, top_k, top_p, cfg):
    """The baseline the KV cache is measured against: sample_rows's loop and draws, with no cache.

    Every step runs `forward` over the whole block again and reads the
    logits at the current position (later positions are placeholders that
    causal attention ignores). Returns the drawn tokens [B, W], as sample_rows.
    """
    import jax
    import jax.numpy as jnp

    from microgpt_jax.model import forward
    from microgpt_jax.sample import keyed_draw

    P, T, bos, B = prompt_P.shape[0], cfg.block_size, cfg.vocab_size - 1, rows_B.shape[0]
    draw = keyed_draw(key, rows_B, temperature, top_k, top_p)

    def body(carry):
        pos, seq_BT, done_B, out_BW = carry
        logits_BV = forward(params, seq_BT, cfg)[:, pos]
        step = pos - (P - 1)
        new_B = jnp.where(done_B, bos, draw(logits_BV, step).astype(jnp.int32))
        seq_BT = seq_BT.at[:, pos + 1].set(new_B, mode="drop")
        return pos + 1, seq_BT, done_B | (new_B == bos), out_BW.at[:, step].set(new_B)

    seq_BT = jnp.full((B, T), bos, jnp.int32).at[:, :P].set(prompt_P)
    init = (jnp.int32(P - 1), seq_BT, jnp.zeros(B, bool), jnp.full((B, T - P + 1), bos, jnp.int32))
    return jax.lax.while_loop(lambda c: (c[0] < T) & ~jnp.all(c[2]), body, init)[3]


def _sampling_setup(cfg):
    """Random float32 weights and sample_rows's arguments for plain sampling at temperature 1 from BOS."""
    import jax
    import jax.numpy as jnp

    from microgpt_jax.model import init_params

    params = init_params(cfg, jax.random.key(0), jnp.float32)
    knobs = (jnp.float32(1.0), jnp.int32(cfg.vocab_size), jnp.float32(1.0))
    return params, jnp.asarray([cfg.vocab_size - 1], jnp.int32), jax.random.key(0), knobs


@case
def sampling():
    """Tokens/s of the compiled sampler at the default model, batch 1 and 1000, and of the scalar engine."""
    import random

    import jax.numpy as jnp

    import reference
    from microgpt_jax.check import to_reference_state
    from microgpt_jax.model import GPTConfig
    from microgpt_jax.sample import sample_rows

    cfg = GPTConfig(vocab_size=27)
    bos = cfg.vocab_size - 1
    params, prompt_P, key, knobs = _sampling_setup(cfg)

    def batch_of(size):
        # call i generates rows [i * size, (i + 1) * size): new draws, same shapes
        return lambda i: sample_rows(params, prompt_P, key, jnp.arange(i * size, (i + 1) * size), *knobs, cfg=cfg)[0]

    rate_1, _ = _best_rate(lambda i: [batch_of(1)(20 * i + j) for j in range(20)], bos)  # 20 samples, one at a time
    rate_1000, compile_s = _best_rate(batch_of(1000), bos)

    # the seed's inference on the scalar engine, same weights, a few samples
    state, rng, drawn = to_reference_state(params), random.Random(0), 0
    start = time.perf_counter()
    for _ in range(3):
        drawn += min(len(reference.sample(state, cfg, rng, bos, temperature=1.0)) + 1, cfg.block_size)
    rate_scalar = drawn / (time.perf_counter() - start)
    return {
        "sample_tokens_per_s_batch1": rate_1,
        "sample_tokens_per_s_batch1000": rate_1000,
        "sample_compile_s_batch1000": compile_s,
        "scalar_sample_tokens_per_s": rate_scalar,
        "sample_vs_scalar_ratio": rate_1000 / rate_scalar,
    }


@case
def sampling_cache():
    """The KV-cache loop against recomputing the whole block per token (n_embd 128, n_layer 4, block 256, batch 1)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from microgpt_jax.model import GPTConfig
    from microgpt_jax.sample import sample_rows

    cfg = GPTConfig(vocab_size=27, n_embd=128, n_head=4, n_layer=4, block_size=256)
    params, prompt_P, key, knobs = _sampling_setup(cfg)
    recompute = jax.jit(generate_recompute, static_argnames="cfg")
    outs = {}

    def run(fn, name):
        def generate(i):  # rows 2i and 2i + 1, one at a time
            out = [fn(params, prompt_P, key, jnp.arange(r, r + 1), *knobs, cfg=cfg) for r in (2 * i, 2 * i + 1)]
            outs.setdefault(name, []).extend(out)
            return jnp.concatenate(out)

        return _best_rate(generate, cfg.vocab_size - 1, repeats=2)

    rate_cache, _ = run(lambda *a, **k: sample_rows(*a, **k)[0], "cache")
    rate_recompute, _ = run(recompute, "recompute")
    if not all(np.array_equal(a, b) for a, b in zip(outs["cache"], outs["recompute"])):
        raise AssertionError("the cached and the recomputing sampler drew different tokens")
    return {
        "sample_tokens_per_s_cache": rate_cache,
        "sample_tokens_per_s_recompute": rate_recompute,
        "cache_vs_recompute_ratio": rate_cache / rate_recompute,
    }
