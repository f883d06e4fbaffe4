"""bfloat16, the GPU's dtype, through the library on the CPU (the CLI refuses it there, as a policy).

On the CPU XLA computes bfloat16 matmuls no faster than float32, so `train
--dtype bfloat16` is refused there; these tests switch that policy off
(`set_precision(..., allow_cpu_bfloat16=True)`) so the bfloat16 path is
trained, saved, read back, resumed and sampled before it meets a GPU.
"""

import shutil

import numpy as np
import pytest

from microgpt_jax import loop, runtime, train
from microgpt_jax.checkpoint import CheckpointConfig
from microgpt_jax.model import GPTConfig
from microgpt_jax.rundir import RunConfig, RunDir, load_weights
from microgpt_jax.sample import sample
from microgpt_jax.session import Session

# After 20 steps of the same run, bfloat16's mean loss over the last 10 steps is within this
# relative distance of float32's (measured: 2.1e-4; bfloat16 keeps 8 bits of mantissa, 0.4% per rounding).
BF16_LOSS_RTOL = 2e-3


def configs(dtype, steps=6):
    return RunConfig(
        model=GPTConfig(n_embd=16, n_head=2, block_size=16),
        train=train.TrainConfig(steps=steps, batch_size=8, dtype=dtype, log_every=2, eval_every=2),
        checkpoint=CheckpointConfig(save_every=2),
    )


class Losses:
    """A hook that keeps every step's loss."""

    every = None

    def __init__(self):
        self.losses = []

    def __call__(self, info):
        self.losses.extend(np.asarray(info.metrics["loss"], np.float64))


def test_bfloat16_loss_is_near_float32s(names_path):
    runtime.set_precision("bfloat16", allow_cpu_bfloat16=True)
    means = {}
    for dtype in ("float32", "bfloat16"):
        session = Session(configs(dtype, steps=20), names_path)
        losses = Losses()
        loop.fit(session.trainer, session.initial_state(), session.data, [losses])
        assert len(losses.losses) == 20 and np.isfinite(losses.losses).all()
        means[dtype] = np.mean(losses.losses[10:])
    assert means["bfloat16"] != means["float32"]  # it really computed in bfloat16
    assert means["bfloat16"] == pytest.approx(means["float32"], rel=BF16_LOSS_RTOL)


def test_bfloat16_runs_save_read_resume_bitwise_and_sample(tmp_path, names_path):
    runtime.set_precision("bfloat16", allow_cpu_bfloat16=True)
    session = Session(configs("bfloat16"), names_path)
    with RunDir.create(tmp_path / "run", session.configs, session.tokenizer, names_path) as run:
        state = session.initial_state()
        whole = loop.fit(session.trainer, state, session.data, session.hooks(state, run))
    assert run.store.steps() == [2, 4, 6]
    read = run.store.read(6)
    assert all(w.dtype == np.float32 for w in read.params.values())  # bfloat16 compute keeps float32 weights
    assert all(np.array_equal(read.params[k], whole.params[k]) for k in read.params)
    shutil.rmtree(run.store.directory / "6")
    with RunDir.open(run.path).lock() as again:
        state = session.resumed_state(again)
        assert int(state.step) == 4
        resumed = loop.fit(session.trainer, state, session.data, session.hooks(state, again))
    assert all(np.array_equal(resumed.params[k], whole.params[k]) for k in whole.params)
    assert not (run.path / "damaged").exists()

    weights = load_weights(run.path)
    drawn = sample(weights.params, weights.cfg, 8, temperature=1.0, seed=0)
    assert len(drawn) == 8 and all(np.isfinite(s.logprob) for s in drawn)
    assert any(s.ids for s in drawn) and all(0 <= i < weights.tokenizer.bos for s in drawn for i in s.ids)
