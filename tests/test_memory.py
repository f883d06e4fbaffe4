"""memory.py: absurd runs are refused at once, modest ones fit, the estimate bounds XLA's own figure."""

import re
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax import memory
from microgpt_jax.errors import UserError
from microgpt_jax.layout import Batch
from microgpt_jax.model import GPTConfig, init_params, param_shapes
from microgpt_jax.train import TrainConfig, Trainer

F32 = jnp.dtype("float32")
# The estimate of the compiled chunk loop is at least XLA's figure and at most this many times it
# (measured on a CPU, jax 0.10.2: 1.2-2.1 in float32 and float64, 1.4-2.1 in bfloat16).
XLA_FACTOR = 2.5
GB = 10**9

ABSURD = [  # (config, batch rows): what `train --n-embd 100000` etc. ask for
    (GPTConfig(n_embd=100_000), 1),
    (GPTConfig(n_layer=1_000_000), 1),
    (GPTConfig(block_size=1_000_000_000), 1),
    (GPTConfig(), 1_000_000_000),
]
MODEST = [  # (config, rows, chunk_steps): runs this project makes on a laptop
    (GPTConfig(), 1, 10),
    (GPTConfig(n_embd=64, n_head=4, n_layer=4, block_size=64), 32, 100),
    (GPTConfig(vocab_size=65, n_embd=128, n_head=4, n_layer=4, block_size=128), 16, 10),
]


@pytest.fixture(scope="module", autouse=True)
def backend():
    jax.devices()  # start the backend now, not inside a timed call


@pytest.mark.parametrize("cfg, rows", ABSURD)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_absurd_runs_are_refused_at_once(cfg, rows, dtype):
    tcfg = TrainConfig(dtype=dtype)
    est = memory.estimate(cfg, rows, 10, jnp.dtype(dtype), tcfg.param_dtype)
    clock = time.perf_counter()
    with pytest.raises(UserError) as info:
        memory.check_fits(cfg, rows, 10, jnp.dtype(dtype), tcfg.param_dtype)
    assert time.perf_counter() - clock < 0.1  # no allocation, no compilation
    message = str(info.value)
    assert "\n" not in message
    assert f"needs about {memory.format_bytes(est.total)} (" in message
    assert re.search(r"but \d[\d.]* [KMGTP]?B is available; lower n_embd, n_layer, block_size or batch_size$", message), message
    # with a stated amount, that amount is named
    with pytest.raises(UserError, match=re.escape("but 21.4 GB is available")):
        memory.check_fits(cfg, rows, 10, jnp.dtype(dtype), tcfg.param_dtype, available=21_400_000_000)


def test_estimate_allocates_nothing():
    cfg = GPTConfig(vocab_size=10**6, n_embd=10**5, n_layer=10**6, block_size=10**9)
    tracemalloc.start()
    try:
        est = memory.estimate(cfg, 10**9, 10**6, F32, F32)
        with pytest.raises(UserError):
            memory.check_fits(cfg, 10**9, 10**6, F32, F32, available=10**12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    assert est.total > 10**30  # exact Python ints, no overflow to negative or inf
    assert all(isinstance(n, int) and n > 0 for n in est)


@pytest.mark.parametrize("cfg, rows, chunk", MODEST)
def test_modest_runs_fit(cfg, rows, chunk):
    for dtype in ("float32", "bfloat16", "float64"):
        tcfg = TrainConfig(dtype=dtype)
        est = memory.check_fits(cfg, rows, chunk, jnp.dtype(dtype), tcfg.param_dtype, available=GB)
        assert 0 < est.total < GB
    assert memory.check_fits(cfg, rows, chunk, F32, F32).total == est_total(cfg, rows, chunk)  # and on this machine


def est_total(cfg, rows, chunk):
    return memory.estimate(cfg, rows, chunk, F32, F32).total


def test_default_run_is_small():
    assert est_total(GPTConfig(), 1, 10) < 1_000_000  # the seed's model: under a megabyte all told


@pytest.mark.parametrize(
    "cfg",
    [GPTConfig(), GPTConfig(vocab_size=65, n_embd=48, n_head=6, n_layer=3, block_size=100), GPTConfig(n_layer=7, block_size=3)],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_weights_and_optimizer_are_exact(cfg, dtype):
    tcfg = TrainConfig(dtype=dtype)
    p = tcfg.param_dtype
    count = sum(o * i for o, i in param_shapes(cfg).values())
    assert memory.num_params(cfg) == count
    est = memory.estimate(cfg, 2, 5, jnp.dtype(dtype), p)
    assert est.weights == count * p.itemsize
    assert est.optimizer == (2 + memory.FLATTEN_COPIES) * count * p.itemsize + memory.OPT_COUNT_BYTES

    # ... and what the run's arrays take: their shapes and dtypes, traced without computing them
    state = jax.eval_shape(lambda key: Trainer(cfg, tcfg).init(init_params(cfg, key, p)), jax.random.PRNGKey(0))
    params, opt_state = state.params, state.opt_state
    nbytes = lambda tree: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))
    assert est.weights == nbytes(params)
    assert est.optimizer == nbytes(opt_state) + memory.FLATTEN_COPIES * count * p.itemsize


def xla_bytes(cfg, rows, chunk, dtype):
    """XLA's figure for the compiled chunk loop: arguments, outputs and temporaries, less the donated (aliased) buffers."""
    tcfg = TrainConfig(dtype=dtype)
    trainer = Trainer(cfg, tcfg)
    params = init_params(cfg, jax.random.PRNGKey(0), tcfg.param_dtype)
    state = trainer.init(params)
    zeros = np.zeros((chunk, rows, cfg.block_size), np.int32)
    batches = trainer.put(Batch(zeros, zeros, zeros, zeros, np.zeros(zeros.shape)))
    m = trainer.steps.lower(state, batches, 0).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.parametrize(
    "cfg, rows, chunk",
    [
        (GPTConfig(), 1, 10),  # measured ratio 1.73
        (GPTConfig(vocab_size=65, n_embd=32, n_head=4, n_layer=1, block_size=192), 8, 10),  # attention leads: 1.55
        (GPTConfig(n_embd=256, n_head=4, n_layer=1, block_size=16), 1, 10),  # weights lead: 1.24
    ],
)
def test_estimate_bounds_xla(cfg, rows, chunk):
    xla = xla_bytes(cfg, rows, chunk, "float32")
    est = memory.estimate(cfg, rows, chunk, F32, F32).device
    assert xla <= est <= XLA_FACTOR * xla, f"estimate {est:,} is {est / xla:.2f} x XLA's {xla:,}"


def test_estimate_grows_with_every_size():
    base = GPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=16)
    total = est_total(base, 2, 10)
    for bigger in (
        GPTConfig(vocab_size=54, n_embd=16, n_head=4, n_layer=1, block_size=16),
        GPTConfig(vocab_size=27, n_embd=32, n_head=4, n_layer=1, block_size=16),
        GPTConfig(vocab_size=27, n_embd=16, n_head=8, n_layer=1, block_size=16),
        GPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=2, block_size=16),
        GPTConfig(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=32),
    ):
        assert est_total(bigger, 2, 10) > total, bigger
    assert est_total(base, 3, 10) > total
    assert est_total(base, 2, 11) > total


def test_attention_scores_match_the_query_blocks():
    for T in (1, 5, 63, 64, 65, 128, 200, 1000):
        blocks = range(0, T, memory.QUERY_BLOCK)
        assert memory.attention_scores(T) == sum((min(T, t0 + memory.QUERY_BLOCK) - t0) * min(T, t0 + memory.QUERY_BLOCK) for t0 in blocks)


def test_format_bytes():
    cases = {
        0: "0 B",
        999: "999 B",
        1000: "1 KB",
        1500: "1.5 KB",
        999_999: "1 MB",
        21_400_000_000: "21.4 GB",
        3_200_000_000_000: "3.2 TB",
        123_456_789: "123 MB",
        10**22: "10 ZB",
    }
    assert {n: memory.format_bytes(n) for n in cases} == cases


def test_available_bytes_on_this_host():
    available = memory.available_bytes()
    assert isinstance(available, int) and 10**7 < available
    with open("/proc/meminfo") as fh:
        total = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1]) * 1024
    assert available <= total


class FakeDevice:
    platform, id = "gpu", 0

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_available_bytes_on_an_accelerator():
    assert memory.available_bytes(FakeDevice({"bytes_limit": 80 * GB, "bytes_in_use": 5 * GB})) == 75 * GB
    assert memory.available_bytes(FakeDevice(None)) is None


def test_accelerator_counts_only_its_own_memory():
    cfg = GPTConfig(n_embd=512, n_head=8, n_layer=8, block_size=256)
    est = memory.estimate(cfg, 64, 100, F32, F32)
    device = FakeDevice({"bytes_limit": est.device + 1000, "bytes_in_use": 0})
    assert est.host_batches > 1000
    assert memory.check_fits(cfg, 64, 100, F32, F32, device=device) == est  # the host's batches are not on it
    device.stats["bytes_in_use"] = 2000
    with pytest.raises(UserError, match=r"is free on GPU 0; lower"):
        memory.check_fits(cfg, 64, 100, F32, F32, device=device)
    assert memory.check_fits(cfg, 64, 100, F32, F32, device=FakeDevice(None)) == est  # no figure: no refusal
