"""The jitted training step and loop: batches, donation, one compile, scan == step by step."""

import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from microgpt_jax.check import ATOL, RTOL, from_reference_state, to_reference_state
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.flops import CHEAP_COMPILE, compiler_options
from microgpt_jax.layout import padded_batch
from microgpt_jax.model import GPTConfig, init_params, init_params_reference, loss_fn, param_shapes
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, Trainer, TrainState, make_optimizer, make_schedule
from tests.helpers import reference_batches

DOCS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia"]
VOCAB = CharTokenizer.from_docs(DOCS)
ENCODED = [VOCAB.encode(d) for d in DOCS]
CFG = GPTConfig(vocab_size=VOCAB.size, n_embd=8, n_head=2, n_layer=1, block_size=8)


def as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def test_config_validation():
    with pytest.raises(UserError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)
    for field in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size"):
        with pytest.raises(ConfigError, match=f"^{field} must be positive, got 0$") as e:
            GPTConfig(**{field: 0})
        assert isinstance(e.value, UserError) and e.value.field == field
    with pytest.raises(ConfigError, match="^steps must be positive, got 0$") as e:
        TrainConfig(steps=0)
    assert isinstance(e.value, UserError) and e.value.field == "steps"
    with pytest.raises(ConfigError, match="dtype") as e:
        TrainConfig(dtype="float16")
    assert isinstance(e.value, UserError) and e.value.field == "dtype"


def test_init_params_shapes_and_scale():
    cfg = GPTConfig(vocab_size=27, n_embd=32, n_head=4, n_layer=2, block_size=16)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    assert {k: v.shape for k, v in params.items()} == param_shapes(cfg)
    assert all(v.dtype == jnp.float32 for v in params.values())
    flat = np.concatenate([np.ravel(v) for v in params.values()])
    assert abs(flat.std() - 0.08) < 0.005 and abs(flat.mean()) < 0.005
    assert param_shapes(GPTConfig(vocab_size=27)) == dict(reference.param_shapes(GPTConfig(vocab_size=27)))


def test_batch_loss_and_grads_are_the_mean_over_documents_of_the_scalar_engine():
    params = init_params_reference(CFG, random.Random(0))
    docs = [ENCODED[0], ENCODED[3], ENCODED[6]]  # different lengths; charlotte is cut at block_size
    ref_losses, ref_grads = [], []
    for tokens in docs:
        state = to_reference_state(params)
        out = reference.loss(state, CFG, tokens)
        out.backward()
        ref_losses.append(out.data)
        ref_grads.append(from_reference_state(state, "grad"))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)(as_jax(params), as_jax(padded_batch(docs, CFG.block_size)), CFG)
    np.testing.assert_allclose(float(loss), np.mean(ref_losses), rtol=RTOL, atol=ATOL)
    for k in params:
        want = np.mean([g[k] for g in ref_grads], axis=0)
        np.testing.assert_allclose(grads[k], want, rtol=RTOL, atol=ATOL, err_msg=k)


def test_scan_loop_equals_stepping_one_by_one_and_compiles_once():
    tcfg = TrainConfig(steps=6, batch_size=2, dtype="float64")
    trainer = Trainer(CFG, tcfg)
    params0 = init_params(CFG, jax.random.key(1), jnp.float64)
    batches = reference_batches(ENCODED, 0, 6, 2, CFG.block_size)

    s = trainer.init(jax.tree.map(jnp.copy, params0))  # the steps donate the state: each run gets its own copy
    assert isinstance(s, TrainState) and int(s.step) == 0
    step_losses = []
    for i in range(6):
        s, metrics = trainer.step(s, as_jax(jax.tree.map(lambda b: b[i], batches)))
        step_losses.append(float(metrics["loss"]))
    assert trainer.step._cache_size() == 1  # six steps, one trace
    assert int(s.step) == 6

    t = trainer.init(jax.tree.map(jnp.copy, params0))
    scan_losses = []
    for start in (0, 3):  # two calls of 3 steps each: one trace
        chunk = as_jax(jax.tree.map(lambda b: b[start : start + 3], batches))
        t, metrics = trainer.steps(t, chunk, 3)
        scan_losses += [float(x) for x in metrics["loss"]]
    assert trainer.steps._cache_size() == 1

    # identical, bit for bit: the scan body is the step (weights, Adam's moments and the step count)
    assert scan_losses == step_losses
    chex.assert_trees_all_equal(t, s)


def test_a_small_run_compiles_its_loop_cheaply_on_a_cpu_and_a_large_one_fully():
    assert dict(Trainer(CFG, TrainConfig(steps=1000)).compiler_options) == CHEAP_COMPILE  # microgpt's run: compiling would dominate
    assert Trainer(CFG, TrainConfig(steps=10**6, batch_size=256)).compiler_options == ()
    assert compiler_options("gpu", 0.0) == ()  # the options are XLA:CPU's


def test_step_donates_params_and_optimizer_state():
    trainer = Trainer(CFG, TrainConfig(steps=2, dtype="float64"))
    params = init_params(CFG, jax.random.key(2), jnp.float64)
    state = trainer.init(params)
    batch = as_jax(padded_batch([ENCODED[0]], CFG.block_size))
    new_state, _ = trainer.step(state, batch)
    assert all(p.is_deleted() for p in jax.tree.leaves(params))
    assert all(p.is_deleted() for p in jax.tree.leaves(state.opt_state))
    assert not any(p.is_deleted() for p in jax.tree.leaves(new_state))


def test_float32_training_stays_float32_and_learns():
    tcfg = TrainConfig(steps=40, batch_size=4, dtype="float32")
    trainer = Trainer(CFG, tcfg)
    state = trainer.init(init_params(CFG, jax.random.key(3), jnp.float32))
    batches = trainer.put(reference_batches(ENCODED, 0, 40, 4, CFG.block_size))
    state, metrics = trainer.steps(state, batches, 40)
    losses = metrics["loss"]
    assert losses.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in state.params.values())
    assert int(state.step) == 40
    assert float(losses[-5:].mean()) < float(losses[:5].mean()) - 0.5


def test_learning_rate_decays_linearly_to_zero():
    tcfg = TrainConfig(steps=10, lr=0.01, dtype="float64")
    opt = make_optimizer(tcfg)
    # with a gradient of 1 and fresh moments, Adam's step is lr_s * 1 / (1 + eps): read lr_s off it
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    lrs = []
    for _ in range(10):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]) * (1 + tcfg.eps))
    np.testing.assert_allclose(lrs, [0.01 * (1 - s / 10) for s in range(10)], rtol=1e-12)


def test_warmup_schedule():
    lr = make_schedule(TrainConfig(steps=10, warmup=4, lr=1.0))
    assert [float(lr(s)) for s in (0, 2, 4, 7, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    seed = make_schedule(TrainConfig(steps=10, lr=1.0, dtype="float64"))
    assert [float(seed(s)) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights(names_docs):
    docs, tokenizer = names_docs
    cfg = GPTConfig(vocab_size=tokenizer.size)
    tcfg = TrainConfig(steps=3, batch_size=4, dtype="bfloat16")
    trainer = Trainer(cfg, tcfg)
    params = init_params(cfg, jax.random.key(0), tcfg.param_dtype)
    batch = padded_batch([tokenizer.encode(d) for d in docs[:4]], 16)
    batch = jax.tree.map(jnp.asarray, batch._replace(weights=batch.weights.astype(np.float32)))
    state = trainer.init(params)
    jaxpr = str(jax.make_jaxpr(trainer.step)(state, batch))
    assert "bf16[4,16,16]" in jaxpr  # activations in bfloat16
    new, metrics = jax.eval_shape(trainer.step, state, batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((new.params, new.opt_state)) if p.ndim)  # weights and moments
    assert metrics["loss"].dtype == jnp.float32  # the softmax and the loss in float32
