"""The variants of GPTConfig and TrainConfig (issue 11) in the JAX engine, in float64.

Each variant alone and all at once: the weights it has, the math of its
contract (/work/notes/variants.md) against numpy, the KV cache against the
full forward, gradient accumulation against the full batch, dropout's masks
as a pure function of (seed, step), the optimizer against a numpy AdamW,
and the one-line errors of bad values.
"""

import dataclasses
import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from microgpt_jax import memory
from microgpt_jax.config import ConfigError
from microgpt_jax.flops import flops_per_token
from microgpt_jax.model import (
    ACTIVATIONS,
    NORMS,
    GPTConfig,
    attention_implementation,
    decode_step,
    dropout_keep,
    dropout_masks,
    forward,
    forward_cached,
    init_cache,
    init_params,
    loss_fn,
    output_logits,
    param_shapes,
    rope_table,
    rotate,
)
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import (
    TrainConfig,
    Trainer,
    TrainState,
    _loss_and_grads,
    dropout_key,
    make_optimizer,
    make_schedule,
    micro_batches,
)
from tests.helpers import MODEL_VARIANTS, all_variants, assert_close, assert_one_line_error, reference_batches, run_in_process

DOCS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia"]
VOCAB = CharTokenizer.from_docs(DOCS)
ENCODED = [VOCAB.encode(d) for d in DOCS]
BASE = dict(vocab_size=VOCAB.size, n_embd=8, n_head=4, n_layer=2, block_size=8)  # head size 2: rope fits
ALL = all_variants(activation="gelu", n_kv_head=2)
VARIANTS = {**MODEL_VARIANTS, "all": ALL}
CACHED = ["rope", "gqa", "qk_norm", "llama_block", "all"]  # the variants that change what the KV cache holds

full = jax.jit(forward, static_argnames=("cfg", "attention"))
cached = jax.jit(forward_cached, static_argnames="cfg")
loss = jax.jit(loss_fn, static_argnames=("cfg", "attention"))
masks_of = jax.jit(dropout_masks, static_argnums=(1, 2, 3, 4))
keep_of = jax.jit(dropout_keep, static_argnums=(1, 3))
loss_and_grads = jax.jit(_loss_and_grads, static_argnames=("grad_accum", "groups", "cfg", "dtype"))


def config(**variant) -> GPTConfig:
    return GPTConfig(**{**BASE, **variant})


def params_of(cfg, seed=0, scale=3.0):
    """float64 weights, scaled up so that every variant moves the logits visibly."""
    return jax.tree.map(lambda w: scale * w, init_params(cfg, jax.random.key(seed), jnp.float64))


def tokens(B=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.concatenate([np.full((B, 1), VOCAB.bos), rng.integers(0, VOCAB.size, (B, 7))], 1), jnp.int32)


def batches(steps, rows):
    return jax.tree.map(jnp.asarray, reference_batches(ENCODED, 0, steps, rows, BASE["block_size"]))


# --- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_has_its_weights_and_changes_the_logits(name):
    cfg = config(**VARIANTS[name])
    shapes = param_shapes(cfg)
    K, G = cfg.head_dim, cfg.kv_heads
    assert ("wpe" in shapes) == (cfg.pos == "learned")
    assert ("lm_head" in shapes) == (not cfg.tie_embeddings)
    assert shapes["layer1.attn_wk"] == shapes["layer1.attn_wv"] == (G * K, cfg.n_embd)
    # the creation order the scalar engine draws its weights in: wte, [wpe], [lm_head], then the layers
    default_order = [k for k in param_shapes(config()) if k in shapes]
    assert [k for k in shapes if k in default_order] == default_order
    params = params_of(cfg)
    assert {k: v.shape for k, v in params.items()} == shapes

    logits = full(params, tokens(), cfg)
    assert logits.shape == (3, 8, VOCAB.size) and bool(jnp.all(jnp.isfinite(logits)))
    if cfg.logit_softcap:
        assert float(jnp.max(jnp.abs(logits))) < cfg.logit_softcap
    # the same weights where they exist, in the default model: the variant is not a no-op
    default = params_of(config())
    same = {k: params.get(k, default[k]) if params.get(k, default[k]).shape == default[k].shape else default[k] for k in default}
    if name != "dropout":  # dropout is training only: the same logits outside it (test below)
        assert not np.allclose(logits, full(same, tokens(), config()))


def test_norms_activations_softcap_and_rope_are_the_contracts_formulas():
    x = np.random.default_rng(1).normal(size=(5, 6)) * 3
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(NORMS["layernorm"](jnp.asarray(x)), (x - mu) * (var + 1e-5) ** -0.5, rtol=1e-14)
    np.testing.assert_allclose(NORMS["rmsnorm"](jnp.asarray(x)), x * ((x * x).mean(-1, keepdims=True) + 1e-5) ** -0.5, rtol=1e-14)
    gelu = 0.5 * x * (1 + np.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x**3)))
    # (XLA's float64 tanh is within a few ulps of libm's: 1 + tanh(x) near -1 keeps them as absolute error)
    np.testing.assert_allclose(ACTIVATIONS["gelu"](jnp.asarray(x)), gelu, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ACTIVATIONS["relu2"](jnp.asarray(x)), np.maximum(x, 0) ** 2, rtol=1e-15)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(ACTIVATIONS["gelu_exact"](jnp.asarray(x)), 0.5 * x * (1 + erf(x / 2**0.5)), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ACTIVATIONS["silu"](jnp.asarray(x)), x / (1 + np.exp(-x)), rtol=1e-14)

    head = {"lm_head": jnp.asarray(np.random.default_rng(3).normal(size=(7, 6)))}
    plain = x @ head["lm_head"].T
    np.testing.assert_allclose(output_logits(head, jnp.asarray(x), config(logit_softcap=2.5)), 2.5 * np.tanh(plain / 2.5), rtol=1e-14)

    # rope: out[i] = x[i] c - x[i + half] s, out[i + half] = x[i] s + x[i + half] c, angle p * 10000 ** (-2 i / K)
    K, half = 6, 3
    q = np.random.default_rng(2).normal(size=(1, 1, 4, K))
    p = np.array([[0, 5, 2, 7]])
    angle = p[0, :, None] * 10000.0 ** (-2 * np.arange(half) / K)
    c, s = np.cos(angle), np.sin(angle)
    want = np.concatenate([q[..., :half] * c - q[..., half:] * s, q[..., :half] * s + q[..., half:] * c], -1)
    np.testing.assert_allclose(rotate(jnp.asarray(q), rope_table(jnp.asarray(p), K, jnp.float64)), want, rtol=1e-14, atol=1e-15)


def test_rope_sees_only_positions_within_the_document():
    """A rope model's logits: the same with every position shifted (no wpe to notice), and a document packed
    after another in a row (its positions restarting at 0) is the same document alone."""
    cfg = config(pos="rope", qk_norm=True)
    params, tokens_BT = params_of(cfg), tokens()
    packed_T = jnp.concatenate([tokens_BT[0, :3], tokens_BT[1, :5]])
    tokens_BT = tokens_BT.at[0].set(packed_T)
    positions_BT = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4]] + [list(range(8))] * 2)
    segments_BT = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2]] + [[1] * 8] * 2)
    logits = full(params, tokens_BT, cfg, positions_BT, segments_BT)
    assert_close(logits[0, 3:], logits[1, :5], "a packed document")
    assert_close(full(params, tokens_BT, cfg, positions_BT + 5, segments_BT), logits, "every position + 5")


def test_gqa_is_multi_head_attention_with_each_key_head_shared_by_its_group():
    """n_kv_head = G: query head h reads key/value head h // (H / G), as if wk and wv were repeated per query head."""
    gqa, mha = config(n_kv_head=2), config()
    params = params_of(gqa)
    K, R = gqa.head_dim, gqa.n_head // gqa.kv_heads
    repeat = lambda w: jnp.repeat(w.reshape(gqa.kv_heads, K, -1), R, axis=0).reshape(gqa.n_embd, -1)  # noqa: E731
    repeated = {k: repeat(w) if k.endswith(("attn_wk", "attn_wv")) else w for k, w in params.items()}
    want = full(repeated, tokens(), mha)
    assert_close(full(params, tokens(), gqa), want, "GQA vs repeated keys")
    # jax.nn.dot_product_attention takes the key heads as they are (its XLA implementation is not float64-exact: 1e-7)
    np.testing.assert_allclose(full(params, tokens(), gqa, attention="xla"), want, rtol=1e-5, atol=1e-6)
    # one key/value head per query head is the default model, bit for bit
    params = params_of(mha)
    chex.assert_trees_all_equal(full(params, tokens(), config(n_kv_head=4)), full(params, tokens(), mha))


def test_fused_attention_only_without_dropout():
    fits = config(n_embd=64, n_head=4, n_kv_head=2, block_size=16)  # head size 16
    assert attention_implementation("gpu", "bfloat16", fits) == "cudnn"
    assert attention_implementation("gpu", "bfloat16", config(n_embd=64, block_size=16, dropout=0.1)) == "einsum"
    # masks given to the fused path anyway: it falls back to `attend`
    cfg = config(**ALL, n_layer=1)  # the shapes of test_dropout_masks_come_from_seed_and_step_in_training_only: one compile less
    params, batch = params_of(cfg), jax.tree.map(lambda a: a[0], batches(1, 2))
    masks = masks_of(dropout_key(7, 0), cfg, 2, 8, jnp.float64)
    chex.assert_trees_all_equal(loss(params, batch, cfg, "xla", masks), loss(params, batch, cfg, "einsum", masks))


@pytest.mark.parametrize("name", CACHED)
def test_kv_cache_decoding_equals_the_full_forward(name):
    cfg = config(**VARIANTS[name])
    params, tokens_BT = params_of(cfg), tokens()
    want = full(params, tokens_BT, cfg)
    cache = init_cache(cfg, 3, jnp.float64)
    assert cache.k[0].shape == (3, cfg.kv_heads, cfg.block_size, cfg.head_dim)  # n_head / n_kv_head times smaller

    for prompt in (0, 3) if name == "all" else (0,):  # token by token; after a prompt of 3 in one forward_cached pass
        cache, got = init_cache(cfg, 3, jnp.float64), []
        if prompt:
            logits_BTV, cache = cached(params, tokens_BT[:, :prompt], cache, 0, cfg)
            got.append(logits_BTV)
        for pos in range(prompt, cfg.block_size):
            logits_BV, cache = decode_step(params, tokens_BT[:, pos], cache, pos, cfg)
            got.append(logits_BV[:, None])
        assert_close(jnp.concatenate(got, 1), want, f"cached decoding after a prompt of {prompt}")


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_masks_are_the_contracts():
    cfg = config(dropout=0.25)
    assert dropout_masks(jax.random.key(0), config(), 2, 8, jnp.float64) is None
    masks = masks_of(jax.random.key(0), cfg, 50, 8, jnp.float64)
    shapes = {"attn": (50, 4, 8, 8), "attn_out": (50, 8, 8), "mlp_out": (50, 8, 8)}
    assert {k: v.shape for k, v in masks.items()} == {f"layer{i}.{s}": shape for i in range(2) for s, shape in shapes.items()}
    for name, m in masks.items():
        assert set(np.unique(m)) == {0.0, 1 / 0.75}, name
        assert abs(float(np.mean(m == 0)) - 0.25) < 0.05, name
    assert not np.array_equal(masks["layer0.attn_out"], masks["layer0.mlp_out"])  # every site its own entries
    # a pure function of the key; any rows drawn alone are those rows of the whole batch's draw
    chex.assert_trees_all_equal(masks, masks_of(jax.random.key(0), cfg, 50, 8, jnp.float64))
    some = keep_of(jax.random.key(0), cfg, jnp.asarray([7, 3]), 8)
    chex.assert_trees_all_equal(some, jax.tree.map(lambda m: m[np.array([7, 3])] != 0, masks))
    assert not np.array_equal(masks["layer0.attn"], masks_of(jax.random.key(1), cfg, 50, 8, jnp.float64)["layer0.attn"])


@pytest.fixture(scope="module")
def all_variants_run():
    """4 steps of every variant at once (1 layer), dropout on, grad_accum 2, in one compiled chunk."""
    cfg, tcfg = config(**ALL, n_layer=1), TrainConfig(steps=4, batch_size=2, grad_accum=2, dtype="float64", seed=7)
    params, data = params_of(cfg, scale=1.0), batches(4, 2)
    trainer = Trainer(cfg, tcfg)
    state, metrics = trainer.steps(trainer.init(jax.tree.map(jnp.copy, params)), data, 4)
    losses = metrics["loss"]
    return SimpleNamespace(cfg=cfg, tcfg=tcfg, params=params, data=data, state=state, losses=losses, trainer=trainer)


def test_dropout_masks_come_from_seed_and_step_in_training_only(all_variants_run):
    """Step s's masks are dropout_masks(dropout_key(seed, s), ...) of the whole batch, whatever grad_accum,
    so 2 steps, the state through the host and 2 more are the 4 steps at once, bit for bit; evaluation has none."""
    run = all_variants_run
    trainer, params, data = run.trainer, run.params, run.data
    state, metrics_a = trainer.steps(trainer.init(jax.tree.map(jnp.copy, params)), data, 2)
    saved = jax.tree.map(np.asarray, state)  # what a checkpoint holds
    resumed = TrainState(*jax.tree.map(jnp.asarray, saved))
    rest = jax.tree.map(lambda a: jnp.roll(a, -2, axis=0), data)  # steps 2 and 3 are this chunk's first two
    state, metrics_b = trainer.steps(resumed, rest, 2)
    chex.assert_trees_all_equal(state, run.state)
    assert np.array_equal(np.concatenate([metrics_a["loss"][:2], metrics_b["loss"][:2]]), run.losses)

    batch = jax.tree.map(lambda a: a[0], data)
    masks = masks_of(dropout_key(7, 0), run.cfg, 2, 8, jnp.float64)
    assert_close(run.losses[0], loss(params, batch, run.cfg, masks=masks), "step 0: the documented masks")
    evaluated = trainer.evaluate(params, jax.tree.map(lambda a: a[None], batch))
    ones = jax.tree.map(jnp.ones_like, masks)
    assert_close(evaluated, loss(params, batch, run.cfg, masks=ones), "evaluation: no dropout")
    assert abs(float(run.losses[0]) - float(evaluated)) > 1e-5


# --- gradient accumulation -----------------------------------------------------------------------


def test_micro_batches_are_consecutive_rows():
    rows = jnp.arange(8)
    assert micro_batches(rows, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # over 2 devices (rows 0-3 on one, 4-7 on the other) each micro-batch takes a slice of each: no row moves
    assert micro_batches(rows, 2, groups=2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ConfigError, match="grad_accum"):
        micro_batches(jnp.arange(6), 4)


def test_accumulated_gradients_are_the_full_batchs():
    """The loss and every gradient; with dropout on too in test_accumulated_training_is_the_full_batchs."""
    cfg = config(n_layer=1)
    params, batch = params_of(cfg, scale=1.0), jax.tree.map(lambda a: a[0], batches(1, 4))
    args = dict(cfg=cfg, dtype=jnp.float64, key=dropout_key(42, 0))
    loss1, grads1 = loss_and_grads(params, batch, 1, 1, **args)
    loss4, grads4 = loss_and_grads(params, batch, 4, 1, **args)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-13)
    for k in grads1:
        np.testing.assert_allclose(grads4[k], grads1[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_accumulated_training_is_the_full_batchs(all_variants_run):
    """4 steps of every variant, dropout on: grad_accum 2 against 1, the losses (step 0's: the loss) and the weights."""
    run = all_variants_run
    trainer = Trainer(run.cfg, dataclasses.replace(run.tcfg, grad_accum=1))
    state, metrics = trainer.steps(trainer.init(jax.tree.map(jnp.copy, run.params)), run.data, 4)
    np.testing.assert_allclose(run.losses, metrics["loss"], rtol=1e-13)
    for k in run.params:
        np.testing.assert_allclose(run.state.params[k], state.params[k], rtol=0, atol=1e-13, err_msg=k)


def test_micro_batches_must_split_over_the_devices():
    four = SimpleNamespace(devices=np.empty(4))
    with pytest.raises(ConfigError, match="micro-batches of 2 rows, which do not split over the 4 devices") as e:
        Trainer(config(), TrainConfig(batch_size=8, grad_accum=4), mesh=four)
    assert e.value.field == "grad_accum"


# --- the optimizer --------------------------------------------------------------------------------


def numpy_adamw(tcfg, params, grads_seq):
    """The contract's formulas, step by step, on one vector of every weight."""
    p, m, v = params.copy(), np.zeros_like(params), np.zeros_like(params)
    lr, lo, w, n = tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.steps
    for s, g in enumerate(grads_seq):
        u = (s - w) / (n - w)
        shape = 0.5 * (1 + math.cos(math.pi * u)) if tcfg.schedule == "cosine" else 1 - u
        lr_s = lr * s / w if s < w else lo + (lr - lo) * shape
        norm = np.sum(g * g) ** 0.5
        if tcfg.grad_clip and norm > tcfg.grad_clip:
            g = g * (tcfg.grad_clip / norm)
        m = tcfg.beta1 * m + (1 - tcfg.beta1) * g
        v = tcfg.beta2 * v + (1 - tcfg.beta2) * g * g
        m_hat, v_hat = m / (1 - tcfg.beta1 ** (s + 1)), v / (1 - tcfg.beta2 ** (s + 1))
        p = p - lr_s * (m_hat / (v_hat**0.5 + tcfg.eps) + tcfg.weight_decay * p)
    return p


@pytest.mark.parametrize(
    "options",
    [
        dict(weight_decay=0.1),
        dict(grad_clip=0.3),
        dict(schedule="cosine", min_lr=0.002, warmup=1),
        dict(min_lr=0.002),
        dict(weight_decay=0.1, grad_clip=0.3, schedule="cosine", min_lr=0.002, warmup=1),
    ],
)
def test_optimizer_is_the_contracts_adamw(options):
    tcfg = TrainConfig(steps=4, lr=0.05, dtype="float64", **options)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    scales = [1.0, 0.01, 1.0]  # the middle step's gradients below grad_clip: not clipped
    grads_seq = [{k: s * rng.normal(size=v.shape) for k, v in params.items()} for s in scales]
    opt = make_optimizer(tcfg)
    state, got = opt.init(jax.tree.map(jnp.asarray, params)), jax.tree.map(jnp.asarray, params)
    for g in grads_seq:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, got)
        got = optax.apply_updates(got, updates)
    flat = lambda tree: np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])  # noqa: E731
    want = numpy_adamw(tcfg, flat(params), [flat(g) for g in grads_seq])
    np.testing.assert_allclose(flat(got), want, rtol=1e-13, atol=1e-15)
    assert not np.allclose(want, numpy_adamw(TrainConfig(steps=4, lr=0.05), flat(params), [flat(g) for g in grads_seq]))


def test_defaults_are_the_seeds_adam_and_schedule():
    tcfg = TrainConfig(steps=7, dtype="float64")
    params = {"w": jnp.zeros(3)}
    seeds = optax.flatten(optax.adam(lambda count: 0.01, b1=0.85, b2=0.99, eps=1e-8)).init(params)
    assert jax.tree.structure(make_optimizer(tcfg).init(params)) == jax.tree.structure(seeds)  # checkpoints still load
    lr = make_schedule(tcfg)
    assert [float(lr(s)) for s in range(7)] == [0.01 * (1 - s / 7) for s in range(7)]  # bit for bit


# --- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_and_flops_follow_the_shapes(name):
    cfg = config(**VARIANTS[name])
    shapes = param_shapes(cfg)
    assert memory.num_params(cfg) == sum(math.prod(s) for s in shapes.values())
    # every matrix but the embeddings' lookups is a matmul; a tied wte is one too (gains and biases are not)
    matrices = {k: s for k, s in shapes.items() if len(s) == 2 and k not in ("wte", "wpe")}
    matmul = sum(o * i for o, i in matrices.values()) + cfg.tie_embeddings * cfg.vocab_size * cfg.n_embd
    assert flops_per_token(cfg) == 6 * matmul + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def test_estimate_of_every_variant_with_accumulation_bounds_xla(all_variants_run):
    run, f64 = all_variants_run, jnp.dtype("float64")
    state = run.trainer.init(jax.tree.map(jnp.copy, run.params))
    m = run.trainer.steps.lower(state, run.data, 0).compile().memory_analysis()  # the fixture's executable, cached
    xla = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    est = memory.estimate(run.cfg, 2, 4, f64, f64, grad_accum=2)
    assert xla <= est.device <= 2.5 * xla, f"estimate {est.device:,} is {est.device / xla:.2f} x XLA's {xla:,}"
    assert est.activations < memory.estimate(run.cfg, 2, 4, f64, f64).activations  # one micro-batch's


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--n-kv-head", "3"], "--n-kv-head (3) must divide n_head (4)"),
        (["--pos", "rope", "--n-embd", "12"], "--pos rope needs an even head size, got n_embd / n_head = 3"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--logit-softcap", "-1"], "--logit-softcap must be at least 0"),
        (["--min-lr", "0.1"], "--min-lr must be at most lr (0.01), got 0.1"),
        (["--batch-size", "4", "--grad-accum", "3"], "--grad-accum must divide batch_size (4), got 3"),
        (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
        (["--grad-clip", "-1"], "--grad-clip must be at least 0"),
        (["--norm", "batchnorm"], "--norm: invalid choice"),
        (["--qk-norm", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_values_are_one_line(capsys, flags, fragment):
    code, out = run_in_process(capsys, "train", *flags, "--print-config")
    assert_one_line_error(code, out.err, fragment)


def test_switches_and_print_config(capsys):
    code, out = run_in_process(capsys, "train", "--tie-embeddings", "--qk-norm", "--no-qk-norm", "--pos", "rope", "--print-config")
    assert code == 0
    assert "tie_embeddings = true" in out.out and "qk_norm = false" in out.out and 'pos = "rope"' in out.out
