"""The loop (loop.py): chunks, one compiled executable, the hooks that are due, the records they make, the NaN policy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax import checkpoint, loop, train
from microgpt_jax import train as train_module
from microgpt_jax.data import DataConfig, DocumentSource
from microgpt_jax.errors import UserError
from microgpt_jax.loop import Log, NonFinite, Progress, chunk_ends, fit
from microgpt_jax.metrics import MetricsFile
from microgpt_jax.model import GPTConfig, init_params
from microgpt_jax.train import TrainConfig, Trainer


def test_fit_compiles_once_across_chunks_and_evals(names_docs, monkeypatch, tmp_path):
    traces = {"step": 0, "evaluate": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            traces[name] += 1  # runs only while JAX traces
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(train_module, "_step", counting("step", train_module._step))
    monkeypatch.setattr(train_module, "_row_losses", counting("evaluate", train_module._row_losses))
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[:400]]
    # 23 steps in chunks of at most 5, ending at every multiple of 5 and of 6: short chunks, and four evals
    tcfg = TrainConfig(steps=23, batch_size=4, log_every=5, eval_every=6)
    cfg = GPTConfig(vocab_size=tokenizer.size, block_size=8)
    trainer = Trainer(cfg, tcfg)
    state = trainer.init(init_params(cfg, jax.random.key(0), jnp.float32))
    data = DocumentSource(enc[:300], enc[300:], DataConfig(eval_size=40), tcfg.batch_size, cfg.block_size)
    chunks, seen = [], []
    on_device = trainer.put(data.eval_set())
    evaluate = lambda params: trainer.evaluate(params, on_device)  # noqa: E731

    class Seen:  # a sink beside the metrics file: it gets the same records
        write = staticmethod(seen.append)

    def watch(info):  # after every chunk, after the hooks above it
        chunks.append((info.step, info.metrics["loss"]))

    watch.every = None
    hooks = [
        NonFinite(),
        Log([MetricsFile(tmp_path), Progress(tcfg.steps, bar=False), Seen()], trainer.lr, tcfg.log_every, tcfg.eval_every, evaluate),
        watch,
    ]
    state = fit(trainer, state, data, hooks)
    assert int(state.step) == 23
    assert [step for step, _ in chunks] == [5, 6, 10, 12, 15, 18, 20, 23]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6, 10, 12, 15, 18, 20, 23]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12, 18, 23]
    assert traces == {"step": 2, "evaluate": 1}  # the step: once for its metrics' shapes, once in the loop
    assert seen == records and np.isfinite(records[-1]["val_loss"])
    # each record's loss is the mean over the steps since the record before it
    losses = np.concatenate([chunk_losses for _, chunk_losses in chunks])
    assert len(losses) == 23 and np.all(np.isfinite(losses))
    for previous, record in zip([0] + [r["step"] for r in records], records):
        assert record["loss"] == pytest.approx(float(np.mean(losses[previous : record["step"]])), rel=1e-12)
    assert records[-1]["lr"] == pytest.approx(0.01 * (1 - 22 / 23), rel=1e-6)


def test_chunk_ends():
    assert list(chunk_ends(0, 23, 5, (5, 6))) == [5, 6, 10, 12, 15, 18, 20, 23]
    assert list(chunk_ends(0, 23, 5, (6,))) == [5, 6, 11, 12, 17, 18, 23]
    assert list(chunk_ends(7, 12, 100)) == [12]


def test_progress_bar_shows_loss_val_rate_and_eta(capsys):
    with Progress(100, bar=True) as progress:
        progress.write({"step": 10, "loss": 2.5, "val_loss": 2.6, "tokens_per_s": 12345.0, "elapsed": 1.0})
    err = capsys.readouterr().err
    assert "loss 2.5000" in err and "val 2.6000" in err and "12,345 tok/s" in err and "10/100" in err and "<" in err


def hook_chain(tmp_path, save_every=4):
    """The NaN policy and the checkpoint hook over a store, as the loop calls them: (store, end_chunk)."""
    arrays = jax.ShapeDtypeStruct((2,), np.float64)  # the stand-in state's: {"w": [2]}, {"m": [2]}
    like = train.TrainState({"w": arrays}, {"m": arrays}, jax.ShapeDtypeStruct((), np.int32))
    store = checkpoint.CheckpointStore(tmp_path / "checkpoints", GPTConfig(), train.TrainConfig(steps=8), like=like)
    chain = [loop.NonFinite(store.latest), loop.Checkpoints(store, save_every, lambda step: step, tmp_path)]

    def end_chunk(first, losses, params, opt_state):
        state = train.TrainState(params, opt_state, np.int32(first + len(losses)))
        metrics = {"loss": np.asarray(losses)}
        info = loop.StepInfo(state, first + len(losses), 8, metrics, 0.0, None, ((first, metrics, 0, 1.0),))
        for hook in chain:
            if loop._due(hook, info):
                hook(info)

    return store, end_chunk


def test_a_nan_mid_chunk_keeps_nothing_of_the_chunk(tmp_path):
    store, end_chunk = hook_chain(tmp_path)
    params, opt_state = {"w": np.ones(2)}, {"m": np.zeros(2)}
    end_chunk(0, [3.0, 2.0, 1.0, 1.0], params, opt_state)
    with pytest.raises(UserError, match=r"^loss is inf at step 6: .* the latest checkpoint is step 4"):
        end_chunk(4, [1.0, np.inf, 1.0, 1.0], params, opt_state)
    assert store.steps() == [4]


def test_a_state_unlike_the_runs_is_refused_before_anything_is_written(tmp_path):
    store = checkpoint.CheckpointStore(tmp_path / "checkpoints", GPTConfig(), train.TrainConfig(steps=8))
    state = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), store.like)  # float64 weights for a float32 run
    with pytest.raises(ValueError, match=r"^checkpoint 0: params\['[\w.]+'\] is float64\[\d+(, \d+)?\], the run's config makes it float32"):
        store.save(state, 0)  # (it would read back as damaged)
    assert store.steps() == [] and not any(store.directory.glob("*/*"))


def test_weights_that_overflow_with_a_finite_loss_are_never_saved(tmp_path):
    """A finite loss computed from good weights, whose update overflowed them (--lr 1e19 does this at step 2)."""
    store, end_chunk = hook_chain(tmp_path, save_every=2)
    end_chunk(0, [3.0, 2.0], {"w": np.ones(2)}, {"m": np.zeros(2)})
    with pytest.raises(UserError, match=r"^weights are NaN or infinite after step 4 \(its loss was finite\).* step 2"):
        end_chunk(2, [1.0, 1.0], {"w": np.array([1.0, np.nan])}, {"m": np.zeros(2)})
    with pytest.raises(UserError, match=r"^weights are NaN or infinite after step 4"):
        end_chunk(2, [1.0, 1.0], {"w": np.ones(2)}, {"m": np.array([np.inf, 0.0])})
    assert store.steps() == [2]


# -- damaged checkpoints ------------------------------------------------------------------
