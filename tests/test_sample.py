"""Sampling: the KV-cache decode against the full forward and the scalar engine, the sampler, the CLI."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import reference
import reference.gpt
from microgpt_jax import cli
from microgpt_jax.check import to_reference_state
from microgpt_jax.flops import CHEAP_COMPILE
from microgpt_jax.model import (
    GPTConfig,
    decode_step,
    forward,
    forward_cached,
    init_cache,
    init_params,
    init_params_reference,
)
from microgpt_jax.rundir import RunConfig, RunDir
from microgpt_jax.sample import (
    draw_tokens,
    kept_mask,
    keyed_draw,
    model_options,
    sample,
    sample_reference,
    sample_rows,
    sampler,
)
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, TrainState, make_optimizer
from tests import helpers
from tests.helpers import assert_close

VOCAB = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
BOS = VOCAB.bos
CFG = GPTConfig(vocab_size=VOCAB.size)  # microgpt's model
PROMPT = (10, 0)  # "ka"
ROWS = jnp.arange(16)  # the sampler tests share one compiled shape


def random_params(cfg, seed=0, scale=4.0):
    """float64 weights, scaled up from the init so that distributions are peaked, like a trained model's."""
    return jax.tree.map(lambda w: scale * w, init_params(cfg, jax.random.key(seed), jnp.float64))


def generate_recompute(params, prompt_P, key, rows_B, temperature, top_k, top_p, cfg):
    """The oracle of the KV cache: sample_rows's loop and draws, with no cache.

    Every step runs `forward` over the whole block again and reads the
    logits at the current position (later positions are placeholders that
    causal attention ignores). Returns the drawn tokens [B, W], as sample_rows.
    """
    P, T, bos, B = prompt_P.shape[0], cfg.block_size, cfg.bos, rows_B.shape[0]
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


full = jax.jit(forward, static_argnames="cfg")
cached = jax.jit(forward_cached, static_argnames="cfg")
recompute = jax.jit(generate_recompute, static_argnames="cfg")


# --- the cached decode is the model ---


@pytest.mark.parametrize("n_layer, prompt_len", [(1, 1), (2, 5)])
def test_cached_decode_equals_full_forward(n_layer, prompt_len):
    """Prefill prompt_len tokens in one cached pass, decode the rest one at a time: every position's logits match."""
    cfg = GPTConfig(vocab_size=VOCAB.size, n_layer=n_layer, block_size=12)
    params = random_params(cfg, seed=n_layer)
    rng = np.random.default_rng(0)
    tokens_BT = jnp.asarray(np.concatenate([np.full((3, 1), BOS), rng.integers(0, BOS + 1, (3, 11))], 1), jnp.int32)

    cache = init_cache(cfg, 3, jnp.float64)
    logits, cache = cached(params, tokens_BT[:, :prompt_len], cache, 0, cfg)
    got = [logits]
    for pos in range(prompt_len, cfg.block_size):
        logits_BV, cache = decode_step(params, tokens_BT[:, pos], cache, pos, cfg)
        got.append(logits_BV[:, None])
    assert_close(jnp.concatenate(got, axis=1), full(params, tokens_BT, cfg), "cached logits")


def test_decode_step_equals_scalar_engine():
    """Identical weights: the scalar engine's token-by-token logits are the JAX decode step's."""
    cfg = GPTConfig(vocab_size=VOCAB.size, n_layer=2, block_size=8)
    params = init_params_reference(cfg, random.Random(3))
    tokens = [BOS, 3, 7, 0, 12, BOS, 5, 4]
    want = [[v.data for v in row] for row in reference.sequence_logits(to_reference_state(params), cfg, tokens)]
    params, cache, got = jax.tree.map(jnp.asarray, params), init_cache(cfg, 1, jnp.float64), []
    for pos, token in enumerate(tokens):
        logits_BV, cache = decode_step(params, jnp.asarray([token], jnp.int32), cache, pos, cfg)
        got.append(logits_BV[0])
    assert_close(jnp.stack(got), want, "decode step vs scalar engine")


# --- the sampler ---


def knobs(temperature=1.0, top_k=CFG.vocab_size, top_p=1.0):
    return jnp.float64(temperature), jnp.int32(top_k), jnp.float64(top_p)


@pytest.mark.parametrize("prompt", [(), PROMPT])
def test_greedy_with_cache_equals_greedy_recompute(prompt):
    params = random_params(CFG)
    prompt_P = jnp.asarray([BOS, *prompt], jnp.int32)
    want = recompute(params, prompt_P, jax.random.key(0), ROWS, *knobs(0.0), cfg=CFG)
    got, _ = sample_rows(params, prompt_P, jax.random.key(0), ROWS, *knobs(0.0), cfg=CFG)
    np.testing.assert_array_equal(got, want)
    got_ids = sample(params, CFG, 1, prompt=prompt, temperature=0, batch_size=16)[0].ids
    assert len(got_ids) >= 3  # a real continuation, not one BOS
    # greedy means: each token is the argmax of the full forward on everything before it
    seq = [BOS, *prompt, *got_ids]
    logits = full(params, jnp.asarray([seq + [BOS] * (CFG.block_size - len(seq))]), CFG)[0]
    assert [int(i) for i in jnp.argmax(logits[len(prompt) : len(seq) - 1], -1)] == got_ids


def test_sampling_with_cache_equals_recompute():
    """Same keys, same draws: temperature, top-k and top-p through both loops give the same tokens."""
    params = random_params(CFG)
    args = (params, jnp.asarray([BOS, *PROMPT], jnp.int32), jax.random.key(7), ROWS, *knobs(0.8, 6, 0.9))
    got, _ = sample_rows(*args, cfg=CFG)
    np.testing.assert_array_equal(got, recompute(*args, cfg=CFG))


def test_logprob_is_the_models():
    """Each sample's log-probability is the sum of the full forward's log-softmax over its drawn tokens."""
    params, prompt = random_params(CFG), PROMPT
    samples = sample(params, CFG, 8, prompt=prompt, temperature=0.7, top_k=10, seed=3, batch_size=16)
    # each sample with its ending BOS (unless it filled the block), padded to one [8, block_size + 1] batch
    seqs = [[BOS, *prompt, *s.ids, BOS][: CFG.block_size + 1] for s in samples]
    padded = jnp.asarray([q + [BOS] * (CFG.block_size + 1 - len(q)) for q in seqs])
    logp_NTV = jax.nn.log_softmax(full(params, padded[:, :-1], CFG), -1)
    want = [sum(float(logp_NTV[n, t, q[t + 1]]) for t in range(len(prompt), len(q) - 1)) for n, q in enumerate(seqs)]
    assert_close([s.logprob for s in samples], want, "logprob")


def test_samples_end_at_bos_or_block_size_whatever_the_batch():
    cfg, prompt = CFG, PROMPT
    params = random_params(cfg, scale=1.0)  # near uniform: many samples run to block_size
    samples = sample(params, cfg, 40, prompt=prompt, temperature=1.5, seed=1, batch_size=16)
    assert all(BOS not in s.ids and len(prompt) + len(s.ids) <= cfg.block_size for s in samples)
    lengths = {len(s.ids) for s in samples}
    assert max(lengths) == cfg.block_size - len(prompt) and min(lengths) < max(lengths)
    # row i draws with its own key: the batch size does not change the samples
    again = sample(params, cfg, 40, prompt=prompt, temperature=1.5, seed=1, batch_size=40)
    assert [s.ids for s in again] == [s.ids for s in samples]
    assert [s.ids for s in sample(params, cfg, 40, prompt=prompt, temperature=1.5, seed=2)] != [s.ids for s in samples]


def test_a_small_models_sampler_compiles_cheaply_on_a_cpu_and_a_large_ones_fully():
    assert dict(model_options(CFG)) == CHEAP_COMPILE  # whatever the batch and the count
    assert model_options(GPTConfig(vocab_size=65, n_embd=512, n_layer=8, n_head=8, block_size=256)) == ()


def test_sampler_compiles_once_per_shape():
    params = random_params(CFG)
    sample(params, CFG, 20, prompt=PROMPT, batch_size=16)
    size = sampler(CFG)._cache_size()
    assert size >= 1  # the sampler this model's samples use
    # new values, same shapes (the last batch of 20 or 21 samples runs padded to 16 rows)
    sample(params, CFG, 21, prompt=PROMPT, batch_size=16, seed=1, temperature=0.3, top_k=5, top_p=0.5)
    sample(params, CFG, 40, prompt=PROMPT, batch_size=16, seed=2, temperature=0)
    assert sampler(CFG)._cache_size() == size


# --- top-k and top-p: a property test against a plain-Python statement of the rule ---

V = 12
# integers make ties common. Nothing near the subnormal range, even once divided by the
# temperature: XLA on CPU flushes subnormals to zero, so 2e-309 ties with 0 there while the
# numpy oracle ranks it above.
logit = st.one_of(st.integers(-3, 3).map(float), st.floats(-8, 8).map(lambda x: x if abs(x) > 1e-300 else 0.0))


def kept_set(z, top_k, top_p):
    """Rank by z (ties: lower id first), keep the top_k, then the ranks before which less than top_p is held."""
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))[:top_k]
    e = np.exp(np.array([z[i] for i in order]) - max(z))
    held = np.concatenate([[0.0], np.cumsum(e / e.sum())[:-1]])
    assume(top_p >= 1 or np.all(np.abs(held - top_p) > 1e-9))  # not decided by rounding
    return {i for i, h in zip(order, held) if top_p >= 1 or h < top_p}


_kept_mask = jax.jit(kept_mask)
_draw = jax.jit(draw_tokens)


STAIRS = [float(x) for x in range(V, 0, -1)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    logits=st.lists(logit, min_size=V, max_size=V),
    top_k=st.one_of(st.just(V), st.integers(1, V)),  # top_k = V: top-p alone
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),  # top_p = 1: top-k alone
    temperature=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**31),
)
@example(logits=STAIRS, top_k=V, top_p=0.5, temperature=1.0, seed=0)  # top-p keeps 1 token of 12
@example(logits=STAIRS, top_k=2, top_p=1.0, temperature=4.0, seed=0)  # top-k keeps 2 of 12 near-equal ones
@example(logits=[0.0] * V, top_k=3, top_p=0.3, temperature=1.0, seed=0)  # ties: the lowest ids win
def test_top_k_top_p_never_emit_a_dropped_token(logits, top_k, top_p, temperature, seed):
    z = [x / temperature for x in logits]
    want = kept_set(z, top_k, top_p)
    got = np.flatnonzero(_kept_mask(jnp.asarray([z]), jnp.int32(top_k), jnp.float64(top_p))[0])
    assert set(got.tolist()) == want
    # 256 draws, with the uniforms at the ends of [0, 1) among them
    u = jnp.concatenate([jnp.asarray([0.0, 0.5, 1 - 2**-53]), jax.random.uniform(jax.random.key(seed), (253,))])
    drawn = _draw(u, jnp.tile(jnp.asarray(logits), (256, 1)), *knobs(temperature, top_k, top_p))
    assert set(np.asarray(drawn).tolist()) <= want


def test_draws_follow_the_kept_distribution():
    """Not just inside the kept set: the frequencies are the renormalised probabilities."""
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    u = jax.random.uniform(jax.random.key(0), (20000,))
    drawn = np.asarray(_draw(u, jnp.tile(logits, (20000, 1)), *knobs(1.0, 4, 0.9)))
    # top-4 ranks: 5, 0, 1, 2; top-p 0.9 over their softmax drops token 2 (the first three hold 0.93)
    p = np.exp([3.0, 2.0, 1.0]) / np.exp([3.0, 2.0, 1.0]).sum()
    freq = np.bincount(drawn, minlength=6) / drawn.size
    np.testing.assert_allclose(freq[[5, 0, 1]], p, atol=0.015)
    assert freq[[2, 3, 4]].sum() == 0


# --- microgpt's draws ---


def scalar_samples(params, cfg, rng, n, temperature, prompt):
    """microgpt's inference loop (spec section 5), continuing a prompt, on the scalar engine."""
    state, out = to_reference_state(params), []
    for _ in range(n):
        keys, values = [[] for _ in range(cfg.n_layer)], [[] for _ in range(cfg.n_layer)]
        for pos, token in enumerate([BOS, *prompt][:-1]):
            reference.gpt.gpt(state, cfg, token, pos, keys, values)
        token, ids = ([BOS, *prompt])[-1], []
        for pos in range(len(prompt), cfg.block_size):
            logits = reference.gpt.gpt(state, cfg, token, pos, keys, values)
            probs = reference.softmax([v / temperature for v in logits])
            token = rng.choices(range(cfg.vocab_size), weights=[p.data for p in probs])[0]
            if token == BOS:
                break
            ids.append(token)
        out.append(ids)
    return out


# the variants that change the KV cache: rotated keys, shared key heads, normed keys (and softcapped, tied logits)
CACHE_VARIANTS = GPTConfig(vocab_size=VOCAB.size, pos="rope", n_kv_head=2, qk_norm=True, logit_softcap=5.0, tie_embeddings=True)


@pytest.mark.parametrize("prompt, cfg", [((), CFG), (PROMPT, CFG), (PROMPT, CACHE_VARIANTS)], ids=["seed", "prompt", "cache_variants"])
def test_reference_draws_the_scalar_engines_samples(prompt, cfg):
    params = random_params(cfg, scale=3.0)
    rng_ref, rng_jax = random.Random(5), random.Random(5)
    want = scalar_samples(params, cfg, rng_ref, 6, 0.5, prompt)
    assert [s.ids for s in sample_reference(params, cfg, rng_jax, 6, 0.5, prompt)] == want
    assert rng_jax.getstate() == rng_ref.getstate()  # the stream goes on exactly where microgpt's does


# --- the command line ---


def make_run(path, dtype):
    """A run directory as `train --out` writes it (run.json and one checkpoint), with peaked weights."""
    params = {k: np.asarray(v, dtype) for k, v in random_params(CFG, seed=1, scale=3.0).items()}
    tcfg = TrainConfig(steps=1, dtype=np.dtype(dtype).name)
    data = path.parent / f"{path.name}-data.txt"
    data.write_text(VOCAB.chars + "\n")
    configs = RunConfig(CFG, tcfg)
    with RunDir.create(path, configs, VOCAB, data) as run:
        run.store.save(TrainState(params, make_optimizer(tcfg).init(params), np.int32(1)), data_position=0)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample") / "run", np.float64)


def test_cli_prompt_json(tmp_path):
    """End to end on a float32 run: one sample per line, each continuing the prompt, with its log-probability."""
    out = helpers.cli("sample", make_run(tmp_path / "run", np.float32), "--prompt", "ka", "--num-samples", "6", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 6 and all(r["sample"].startswith("ka") and r["logprob"] < 0 for r in rows)
    assert len({r["sample"] for r in rows}) > 1


def test_cli_plain_output_and_reference(run_dir, capsys):
    cli.main(["sample", run_dir, "--prompt", "ka", "--num-samples", "6", "--seed", "3", "--batch-size", "16"])
    plain = capsys.readouterr().out.splitlines()
    params = random_params(CFG, seed=1, scale=3.0)  # the run's weights
    want = sample(params, CFG, 6, prompt=PROMPT, temperature=0.5, seed=3, batch_size=16)
    assert plain == ["ka" + VOCAB.decode(s.ids) for s in want]

    cli.main(["sample", run_dir, "--reference", "--num-samples", "6", "--seed", "11"])
    want = scalar_samples(params, CFG, random.Random(11), 6, 0.5, ())
    assert capsys.readouterr().out.splitlines() == [VOCAB.decode(ids) for ids in want]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "kA"], "outside the run's vocabulary ['A']; the vocabulary is 'abcdefghijklmnopqrstuvwxyz'"),
        (["--prompt", "a" * 16], "block_size is 16"),
        (["--prompt", "a" * 20], "at most 15 tokens"),
        (["--temperature", "-0.5"], "--temperature must be a number >= 0"),
        (["--temperature", "nan"], "--temperature must be a number >= 0"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.01"], "--top-p must be in (0, 1]"),
        (["--reference", "--top-p", "0.5"], "--top-p cannot be used with --reference"),
        (["--reference", "--temperature", "0"], "use one > 0"),
    ],
)
def test_cli_bad_input(run_dir, capsys, args, message):
    code, err = helpers.run_in_process(capsys, "sample", run_dir, *args)
    assert code == 2 and err.out == ""
    helpers.assert_one_line_error(code, err.err, message)
    assert err.err.count("\n") == 1


def test_cli_not_a_run(tmp_path, capsys):
    code, err = helpers.run_in_process(capsys, "sample", tmp_path)
    assert code == 2
    helpers.assert_one_line_error(code, err.err, "is not a run directory")
    assert err.err.count("\n") == 1


def test_a_tiny_temperature_is_greedy():
    """1e-15: logits / T overflow, and the draw would fall back to BOS (empty samples). (A batch is at most the samples.)"""
    params = random_params(CFG)
    greedy, tiny = (sample(params, CFG, 4, prompt=PROMPT, temperature=t, batch_size=b) for t, b in ((0.0, None), (1e-15, 10**9)))
    assert [s.ids for s in tiny] == [s.ids for s in greedy]
