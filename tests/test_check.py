"""The heart of the suite: the JAX model equals the scalar engine, in float64.

Identical weights go into both engines; every logit, the loss, every
parameter's gradient and 20 Adam steps must agree element by element within
|jax - ref| <= ATOL + RTOL * |ref| (weights after training: <= PARAM_ATOL).
"""

import random

import jax.numpy as jnp
import numpy as np
import pytest

import reference
from microgpt_jax.check import (
    ATOL,
    PARAM_ATOL,
    RTOL,
    _forward,  # the jitted forward: one compile per shape, not one per op
    check_grads,
    check_logits,
    check_training,
    from_reference_state,
    jax_grads,
    run_check,
)
from microgpt_jax.model import GPTConfig, init_params_reference
from microgpt_jax.text import reference_docs
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig
from tests.helpers import MODEL_VARIANTS, all_variants

assert (ATOL, RTOL, PARAM_ATOL) == (1e-12, 1e-10, 1e-10)  # the tolerances, never looser


@pytest.fixture(scope="module")
def names(names_path):
    docs, rng = reference_docs(names_path)
    return docs, CharTokenizer.from_docs(docs), rng


def assert_rows_pass(rows):
    failed = [(r.name, r.max_abs, r.max_rel) for r in rows if not r.ok]
    assert not failed, failed


def test_reference_init_draws_the_scalar_engines_weights():
    cfg = GPTConfig(vocab_size=7, n_embd=8, n_head=2, n_layer=2, block_size=5)
    ours = init_params_reference(cfg, random.Random(3))
    theirs = from_reference_state(reference.init_state(cfg, random.Random(3)))
    assert list(ours) == list(theirs)  # same keys, same (creation) order
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_reference_init_leaves_the_stream_where_the_scalar_engine_does():
    cfg = GPTConfig()
    a, b = random.Random(5), random.Random(5)
    init_params_reference(cfg, a)
    reference.init_state(cfg, b)
    assert a.random() == b.random()


@pytest.mark.parametrize("doc_index", range(5))
def test_default_config_gradients_over_five_names(names, doc_index):
    docs, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size)
    params = init_params_reference(cfg, random.Random(doc_index))
    tokens = tokenizer.encode(docs[doc_index])
    assert_rows_pass([check_logits(params, cfg, tokens)] + check_grads(params, cfg, [tokens]))


def test_two_layer_two_head_config(names):
    docs, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size, n_layer=2, n_head=2, n_embd=8)
    params = init_params_reference(cfg, random.Random(11))
    assert_rows_pass(run_check(cfg, params, [tokenizer.encode(docs[7])], steps=3))


def test_document_longer_than_block_size_is_cut(names):
    _, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size, block_size=8)
    doc = "abcdefghijklmnopqrstuvwxyz"  # 28 tokens with the two BOS: only 8 positions trained
    params = init_params_reference(cfg, random.Random(12))
    rows = run_check(cfg, params, [tokenizer.encode(doc)], steps=2)
    assert_rows_pass(rows)
    # the cut is the spec's: the whole document trains exactly as its first block_size + 1 tokens
    params = {k: jnp.asarray(v) for k, v in params.items()}
    whole = jax_grads(params, cfg, [tokenizer.encode(doc)])
    prefix = jax_grads(params, cfg, [tokenizer.encode(doc)[: cfg.block_size + 1]])
    assert whole[0] == prefix[0]


def test_twenty_training_steps_in_spec_order(names):
    docs, tokenizer, rng = names
    cfg = GPTConfig(vocab_size=tokenizer.size)
    params = init_params_reference(cfg, random.Random(42))
    encoded = [tokenizer.encode(d) for d in docs[:20]]
    rows = check_training(params, cfg, TrainConfig(steps=20, dtype="float64"), encoded)
    assert_rows_pass(rows)
    assert rows[0].name == "train losses" and len(rows) == 1 + len(params)


def test_check_catches_a_real_difference(names, monkeypatch):
    """The comparison can fail: a scalar engine with another norm epsilon does not pass."""
    import reference.gpt

    docs, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size)
    params = init_params_reference(cfg, random.Random(1))

    def rmsnorm_other_eps(x, eps):
        scale = (sum(xi * xi for xi in x) / len(x) + 1e-4) ** -0.5
        return [xi * scale for xi in x]

    monkeypatch.setitem(reference.gpt.NORMS, "rmsnorm", rmsnorm_other_eps)
    rows = [check_logits(params, cfg, tokenizer.encode(docs[0]))] + check_grads(params, cfg, [tokenizer.encode(docs[0])])
    assert not all(r.ok for r in rows)


def test_vectorized_forward_of_a_batch_equals_each_row_alone(names):
    docs, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size)
    params = {k: jnp.asarray(v) for k, v in init_params_reference(cfg, random.Random(2)).items()}
    rows = [tokenizer.encode(d)[: cfg.block_size] for d in docs[:3]]
    T = max(len(r) for r in rows)
    batch = jnp.asarray([r + [tokenizer.bos] * (T - len(r)) for r in rows])
    logits = _forward(params, batch, cfg)
    for i, r in enumerate(rows):
        alone = _forward(params, jnp.asarray([r]), cfg)[0]
        np.testing.assert_allclose(logits[i, : len(r)], alone, rtol=RTOL, atol=ATOL)


# Every variant (issue 11) alone, then all at once: logits, loss, every gradient and a few training steps.
TRAIN_VARIANTS = {
    "weight_decay": dict(weight_decay=0.5),
    "grad_clip": dict(grad_clip=0.05),
    "cosine": dict(schedule="cosine", min_lr=0.002, warmup=1),
    "grad_accum": dict(batch_size=4, grad_accum=2),
}
ALL_AT_ONCE = (
    all_variants(activation="gelu_exact", n_layer=2, n_head=4, n_kv_head=2),
    {k: v for d in TRAIN_VARIANTS.values() for k, v in d.items()},
)
# the training variants alone are proven against numpy transcriptions (tests/test_variants.py); here all at once
# (gpt2_block's pieces are all in ALL_AT_ONCE, gelu_exact its activation: no case of its own)
CASES = {name: (m, {}) for name, m in MODEL_VARIANTS.items() if name != "gpt2_block"}


@pytest.mark.parametrize("model, train", [*CASES.values(), ALL_AT_ONCE], ids=[*CASES, "all_at_once"])
def test_variant_against_the_scalar_engine(names, model, train):
    docs, tokenizer, _ = names
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=8, block_size=8, **model)
    params = init_params_reference(cfg, random.Random(21))
    tcfg = TrainConfig(**{"batch_size": 2} | train)
    rows = run_check(cfg, params, [tokenizer.encode(d) for d in docs[:12]], steps=3, tcfg=tcfg)
    assert_rows_pass(rows)
    assert len(rows) == 1 + 1 + len(params) + 1 + len(params)  # logits, loss, gradients, losses, weights: all compared
