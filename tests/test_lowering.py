"""The GPU paths, checked on the CPU: the attention switch, and the compiled functions lowered for CUDA.

`jax.export.export(fn, platforms=["cuda"])` lowers for CUDA on a machine
without a GPU, from abstract arguments (jax.ShapeDtypeStruct: nothing big is
allocated). The one thing it needs from a GPU machine is cuDNN's version,
asked while tracing `jax.nn.dot_product_attention(implementation="cudnn")`:
where the installed jaxlib has no CUDA (cuda_versions is None) the
`cudnn_version` fixture stands in a fixed one. cuDNN's custom calls carry no
serialization-compatibility guarantee, so the export is told to allow them
(DisabledSafetyCheck): these modules are inspected, never stored.
"""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax import parallel
from microgpt_jax.layout import Batch, packed_batch, padded_batch
from microgpt_jax.model import GPTConfig, attention_implementation, forward, init_params, loss_fn
from microgpt_jax.sample import compiled_sampler
from microgpt_jax.train import TrainConfig, Trainer, abstract_state

# the model shapes of configs/*.toml (vocabularies: names, tinyshakespeare, GPT-2's)
CONFIGS = {
    "microgpt": GPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=16),
    "shakespeare": GPTConfig(vocab_size=65, n_embd=128, n_head=4, n_layer=4, block_size=64),
    "gpt2-small": GPTConfig(vocab_size=50257, n_embd=768, n_head=12, n_layer=12, block_size=1024),
}
CUDNN_CALLS = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")
EXPORT = dict(platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in CUDNN_CALLS])
# float32, "xla" against "einsum": the same sums in another order (measured: logits 1.2e-7, gradients 7.5e-9 apart at most)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def cudnn_version(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo
    from jax._src.lib import cuda_versions

    if cuda_versions is None:  # a CPU-only jaxlib: tracing for cuDNN asks for a version all the same
        monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


def test_attention_choice():
    gpt2, micro = CONFIGS["gpt2-small"], CONFIGS["microgpt"]
    for dtype in ("float32", "float64", "bfloat16"):
        assert attention_implementation("cpu", dtype, gpt2) == "einsum"  # the CPU never changes
    assert attention_implementation("gpu", "bfloat16", gpt2) == "cudnn"
    assert attention_implementation("gpu", "bfloat16", CONFIGS["shakespeare"]) == "cudnn"
    assert attention_implementation("gpu", "float32", gpt2) == "einsum"
    assert attention_implementation("gpu", "bfloat16", micro) == "einsum"  # head size 4: cuDNN wants a multiple of 8
    assert Trainer(micro, TrainConfig(steps=2)).attention == "einsum"
    with pytest.raises(ValueError, match="attention"):
        Trainer(micro, TrainConfig(steps=2), attention="flash")


def _docs(n, vocab_size, longest, seed=0):
    rng = random.Random(seed)
    bos = vocab_size - 1
    return [[bos] + [rng.randrange(bos) for _ in range(rng.randint(1, longest))] + [bos] for _ in range(n)]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_xla_attention_matches_einsum_in_float32(layout):
    # block_size 80 > QUERY_BLOCK: the einsum side runs its query blocks
    cfg = GPTConfig(vocab_size=27, n_embd=16, n_head=2, n_layer=2, block_size=80)
    docs = _docs(12, cfg.vocab_size, 70)
    batch = packed_batch(docs, cfg.block_size) if layout == "packed" else padded_batch(docs, cfg.block_size)
    batch = Batch(*(jnp.asarray(a, jnp.float32 if a.dtype == np.float64 else a.dtype) for a in batch))
    if layout == "packed":
        assert int(batch.segments.max()) > 1  # several documents share a row
    params = init_params(cfg, jax.random.key(0), jnp.float32)

    def both(fn):
        return [jax.jit(fn, static_argnames="attention")(params, attention=a) for a in ("einsum", "xla")]

    einsum, xla = both(lambda p, attention: forward(p, batch.tokens, cfg, batch.positions, batch.segments, attention))
    trained = np.asarray(batch.weights) > 0  # padding positions: outputs nobody reads
    np.testing.assert_allclose(np.asarray(xla)[trained], np.asarray(einsum)[trained], rtol=RTOL, atol=ATOL)
    (loss_e, grads_e), (loss_x, grads_x) = both(lambda p, attention: jax.value_and_grad(loss_fn)(p, batch, cfg, attention))
    np.testing.assert_allclose(loss_x, loss_e, rtol=RTOL, atol=ATOL)
    for name in grads_e:
        np.testing.assert_allclose(grads_x[name], grads_e[name], rtol=RTOL, atol=ATOL, err_msg=name)


def _batches(steps, rows, cfg):
    i32 = jax.ShapeDtypeStruct((steps, rows, cfg.block_size), jnp.int32)
    return Batch(i32, i32, i32, i32, jax.ShapeDtypeStruct((steps, rows, cfg.block_size), jnp.float32))


def _cudnn_calls(module):
    return sum(module.count("@" + c + "(") for c in CUDNN_CALLS)


# (config, dtype, steps per chunk, rows, with a 1-device mesh)
STEP_CASES = [
    ("microgpt", "float32", 4, 1, False),
    ("microgpt", "bfloat16", 4, 1, True),
    ("shakespeare", "float32", 2, 12, True),
    ("shakespeare", "bfloat16", 2, 12, False),
    ("shakespeare", "bfloat16", 2, 12, True),
    ("gpt2-small", "bfloat16", 1, 2, True),
]


@pytest.mark.parametrize("name,dtype,steps,rows,sharded", STEP_CASES)
def test_train_step_and_evaluation_lower_for_cuda(cudnn_version, name, dtype, steps, rows, sharded):
    cfg = CONFIGS[name]
    tcfg = TrainConfig(steps=10, dtype=dtype)
    mesh = parallel.make_mesh(1) if sharded else None
    trainer = Trainer(cfg, tcfg, mesh, attention=attention_implementation("gpu", dtype, cfg))
    state = abstract_state(cfg, tcfg)
    fused = trainer.attention == "cudnn"
    assert fused == (dtype == "bfloat16" and name != "microgpt")

    step = jax.export.export(trainer.steps, **EXPORT)(state, _batches(steps, rows, cfg), jax.ShapeDtypeStruct((), jnp.int32))
    module = step.mlir_module()
    assert step.platforms == ("cuda",)
    # forward and backward of every layer's attention inside the loop body, traced once
    assert _cudnn_calls(module) == (2 * cfg.n_layer if fused else 0)
    # the donated state: every leaf of it aliases an output
    n_state = len(jax.tree.leaves(state))
    assert module.count("tf.aliasing_output") == n_state, "the state is no longer donated"
    if sharded:
        assert step.nr_devices == 1 and "sdy.mesh" in module and "sdy.sharding" in module  # Shardy's annotations

    if name != "gpt2-small":  # the evaluation: a forward per batch, no donation
        evaluate = jax.export.export(trainer._row_losses, **EXPORT)(state.params, _batches(3, rows, cfg))
        module = evaluate.mlir_module()
        assert evaluate.platforms == ("cuda",)
        assert module.count("@__cudnn$fmhaScaleBiasSoftmax(") == (cfg.n_layer if fused else 0)
        assert "tf.aliasing_output" not in module


@pytest.mark.parametrize("name", ["microgpt", "shakespeare"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_lowers_for_cuda(name, dtype):
    """The compiled generation (prefill, then decode steps over the KV cache): always `attend`, never cuDNN."""
    cfg = CONFIGS[name]
    params = {k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in abstract_state(cfg, TrainConfig(steps=2)).params.items()}
    rows = jax.ShapeDtypeStruct((8,), jnp.int32)
    knobs = (jax.ShapeDtypeStruct((), dtype), jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), dtype))
    prompt_P = jnp.asarray([cfg.bos, 1, 2], jnp.int32)
    exported = jax.export.export(compiled_sampler(), platforms=["cuda"])(params, prompt_P, jax.random.key(0), rows, *knobs, cfg=cfg)
    assert exported.platforms == ("cuda",)
    assert "cudnn$fmha" not in exported.mlir_module()
    assert [o.shape for o in exported.out_avals] == [(8, cfg.block_size - 2), (8,)]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
def test_cudnn_attention_on_a_gpu_is_close_to_einsum():  # not yet run on a GPU
    cfg = CONFIGS["shakespeare"]
    docs = _docs(40, cfg.vocab_size, 30)
    batch = Batch(*(jnp.asarray(a, jnp.float32 if a.dtype == np.float64 else a.dtype) for a in packed_batch(docs, cfg.block_size)))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0)))
    loss = {a: float(jax.jit(loss_fn, static_argnums=(2, 3))(params, batch, cfg, a)) for a in ("einsum", "cudnn")}
    np.testing.assert_allclose(loss["cudnn"], loss["einsum"], rtol=2e-2)
