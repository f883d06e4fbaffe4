"""bench's own pieces: the torch baseline is our GPT, the breakdown charges every op to its part, the report names the machine."""

import os

import jax
import numpy as np
import pytest

from microgpt_jax import bench, bench_torch
from microgpt_jax.data import DataConfig, load_train_data
from microgpt_jax.layout import windows_batch
from microgpt_jax.model import PARTS, GPTConfig, init_params, loss_fn
from microgpt_jax.train import TrainConfig, Trainer
from tests.helpers import SHAKESPEARE

torch = pytest.importorskip("torch")  # the [hf] extra; CI installs it

TOLERANCE = dict(rtol=1e-10, atol=1e-12)  # check's float64 tolerance: the same arithmetic, summed in another order


@pytest.mark.parametrize("segments", ["given", "none"])
def test_the_torch_model_is_ours_in_float64(segments):
    """Both of our masks: from the batch's segments (packed rows), and the causal one alone (one document per row)."""
    cfg = GPTConfig(vocab_size=11, n_embd=8, n_head=2, n_layer=2, block_size=6)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3), np.float64))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 40).astype(np.int32)
    batch = windows_batch(ids, [0, 9, 30], cfg.block_size)  # stream mode's rows: every position trained, equal weights
    batch = batch if segments == "given" else batch._replace(segments=None)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg)
    model = bench_torch.make_model(params, cfg)
    theirs = model(torch.from_numpy(batch.tokens.astype(np.int64)), torch.from_numpy(batch.targets.astype(np.int64)))
    theirs.backward()
    np.testing.assert_allclose(theirs.item(), float(loss), **TOLERANCE)
    for name, grad in grads.items():
        np.testing.assert_allclose(model.w[name.replace(".", "_")].grad.numpy(), grad, **TOLERANCE, err_msg=name)


def test_a_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="qk_norm"):
        bench_torch.make_model({}, GPTConfig(qk_norm=True))


@pytest.mark.parametrize(
    "op_name, expected",
    [
        ("jit(_steps)/while/body/jvp(mlp)/jit(relu)/max", ("mlp", "forward")),
        ("jit(_steps)/while/body/transpose(jvp(attn_core))/jvp(attn_core)/exp", ("attn_core", "backward")),
        ("jit(_steps)/while/body/jvp(embed)/norm/rsqrt", ("norm", "forward")),  # the innermost scope
        ("jit(_steps)/while/body/optimizer/jit(_where)/select_n", ("optimizer", "update")),
        ("jit(_steps)/while/body/transpose(jvp(loss))/jit(log_softmax)/exp", ("loss", "backward")),
        ("jit(_steps)/while/body/add", ("other", "forward")),
    ],
)
def test_an_op_is_charged_to_its_innermost_part(op_name, expected):
    assert bench.part_of(op_name) == expected


def test_busy_time_is_the_union_of_the_ops():
    assert bench.busy_us([(0, 10), (5, 10), (30, 5), (31, 1)]) == 20


def test_the_breakdown_covers_every_part_forward_and_backward():
    tcfg = TrainConfig(steps=10, batch_size=4)
    tokenizer, data = load_train_data(SHAKESPEARE, DataConfig(mode="stream"), 4, 16, tcfg.seed)
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=16, n_head=2, n_layer=2, block_size=16)
    trainer = Trainer(cfg, tcfg)
    rows = bench.breakdown(trainer, trainer.init(init_params(cfg, jax.random.key(0))), data, chunk=2)
    for part in set(PARTS) - {"optimizer", "head"}:  # the head's matmul may fuse into the loss's ops
        assert rows[f"{part}_forward_ms"] > 0 and rows[f"{part}_backward_ms"] > 0, part
    assert rows["optimizer_update_ms"] > 0
    parts = sum(v for k, v in rows.items() if k.endswith(("_forward_ms", "_backward_ms", "_update_ms")))
    assert parts + rows["dispatch_and_idle_ms"] == pytest.approx(rows["traced_step_ms"], rel=1e-6)
    assert "attn_core" in bench.format_breakdown(rows)


def test_bench_names_the_machine():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    text = bench.machine()
    assert model is None or text.startswith(model), text
    assert f"({os.cpu_count()} cores; " in text
