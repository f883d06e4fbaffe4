"""Layouts (packed, padded, stream windows), batches as a pure function of the step, the split, and the train command's metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax.check import PARAM_ATOL
from microgpt_jax.data import DataConfig, DocumentSource, StreamSource, load_train_data, split
from microgpt_jax.errors import UserError
from microgpt_jax.layout import Batch, pack, packed_batch, padded_batch
from microgpt_jax.loop import run_steps
from microgpt_jax.model import GPTConfig, init_params, loss_fn
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, Trainer
from tests.helpers import assert_close, assert_one_line_error, run_in_process

# --- layouts ---


def test_pack_places_every_document_without_overlap():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 17, size=200)
    rows, offsets = pack(n, 16)
    assert rows.min() >= 0
    used = np.zeros((rows.max() + 1, 16), int)
    for r, o, k in zip(rows, offsets, n):
        assert o + k <= 16
        used[r, o : o + k] += 1
    assert used.max() == 1  # no position holds two documents
    assert rows.max() + 1 <= 1.15 * np.ceil(n.sum() / 16)  # and it packs tightly: near the least possible rows
    # with a fixed number of rows, what does not fit is left out, never overlapped
    rows, _ = pack(n, 16, num_rows=10)
    assert (rows < 0).any() and set(rows[rows >= 0]) <= set(range(10))


def test_packed_batch_is_the_padded_batch_rearranged(names_docs):
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[:40]] + [tokenizer.encode("abcdefghijklmnopqrstuvwxyz")]  # one cut at block_size
    packed, padded = packed_batch(enc, 16), padded_batch(enc, 16)
    assert packed.tokens.shape[0] < len(enc) / 1.5
    for field in ("tokens", "targets", "positions"):
        real = padded.weights > 0
        assert sorted(getattr(packed, field)[packed.weights > 0].tolist()) == sorted(getattr(padded, field)[real].tolist())
    assert packed.weights.sum() == pytest.approx(1.0) and padded.weights.sum() == pytest.approx(1.0)
    # every packed document starts with BOS at position 0, in its own segment
    starts = (packed.positions == 0) & (packed.weights > 0)
    assert np.all(packed.tokens[starts] == tokenizer.bos)
    assert starts.sum() == len(enc)


def test_packed_loss_and_gradients_equal_padded_in_float64(names_docs):
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[100:124]] + [tokenizer.encode("abcdefghijklmnopqrstuvwxyz")]
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=8, n_head=2, n_layer=2, block_size=16)
    params = init_params(cfg, jax.random.key(1), jnp.float64)
    packed, padded = packed_batch(enc, 16), padded_batch(enc, 16)
    assert packed.tokens.shape[0] <= 13 < padded.tokens.shape[0] == 25
    # topped up with empty rows to the padded batch's shape: one compiled function for both
    empty = padded.tokens.shape[0] - packed.tokens.shape[0]
    packed = Batch(*(np.concatenate([a, np.zeros((empty, 16), a.dtype)]) for a in packed))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)
    loss_packed, g_packed = grad_fn(params, jax.tree.map(jnp.asarray, packed), cfg)
    loss_padded, g_padded = grad_fn(params, jax.tree.map(jnp.asarray, padded), cfg)
    assert_close(loss_packed, loss_padded)
    for k in params:
        assert_close(g_packed[k], g_padded[k])


def test_attention_in_query_blocks_matches_the_scalar_engine():
    """Past QUERY_BLOCK positions queries attend in blocks: logits, loss and gradients still match in float64."""
    import random

    from microgpt_jax.check import run_check
    from microgpt_jax.model import QUERY_BLOCK, init_params_reference

    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    cfg = GPTConfig(vocab_size=tokenizer.size, n_embd=8, n_head=2, block_size=QUERY_BLOCK + 8)
    rows = run_check(cfg, init_params_reference(cfg, random.Random(3)), [tokenizer.encode(tokenizer.chars * 3)])
    assert len(rows) == 2 + len(init_params_reference(cfg, random.Random(3)))
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_packed_and_padded_training_runs_match_step_by_step(names_docs):
    """Same documents per step, two layouts, chunks with a short last one: the same losses and weights."""
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[:300]]
    cfg = GPTConfig(vocab_size=tokenizer.size)
    results = []
    for layout in ("packed", "padded"):
        tcfg = TrainConfig(steps=7, batch_size=32, dtype="float64")
        trainer = Trainer(cfg, tcfg)
        state = trainer.init(init_params(cfg, jax.random.key(0), jnp.float64))
        data = DocumentSource(enc, [], DataConfig(layout=layout, val_fraction=0.0), tcfg.batch_size, cfg.block_size)
        built, built_by_yield, batches = [], [], data.batches
        data.batches = lambda start, n, length: built.append(start) or batches(start, n, length)
        losses, starts = [], []
        for chunk in run_steps(trainer, state, data, 7, 3):
            built_by_yield.append(list(built))
            state = chunk.state
            starts.append(chunk.start)
            losses.extend(chunk.metrics["loss"])
        # each chunk's batches are built while the chunk before it runs, before its results are waited for
        assert built_by_yield == [[0, 3], [0, 3, 6], [0, 3, 6]]
        assert starts == [0, 3, 6] and int(state.step) == 7
        results.append((np.array(losses), state.params))
        if layout == "packed":
            assert data.rows < 24
    (loss_a, p_a), (loss_b, p_b) = results
    assert len(loss_a) == 7
    assert_close(loss_a, loss_b)
    for k in p_a:
        assert_close(p_a[k], p_b[k], atol=PARAM_ATOL, rtol=0)

    # and the chunked loop equals the one-step function called 7 times
    tcfg = TrainConfig(steps=7, batch_size=32, dtype="float64")
    trainer = Trainer(cfg, tcfg)
    state = trainer.init(init_params(cfg, jax.random.key(0), jnp.float64))
    data = DocumentSource(enc, [], DataConfig(layout="padded", val_fraction=0.0), tcfg.batch_size, cfg.block_size)
    for s in range(7):
        state, metrics = trainer.step(state, jax.tree.map(jnp.asarray, data.batch(s)))
        assert_close(metrics["loss"], loss_b[s])
    for k in state.params:
        assert_close(state.params[k], p_b[k], atol=PARAM_ATOL, rtol=0)


# --- batches are a pure function of the step ---


def test_batch_is_a_pure_function_of_the_step(names_docs, shakespeare_path):
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[:1000]]
    for make in (
        lambda: DocumentSource(enc, [], DataConfig(), 16, 16),
        lambda: StreamSource(np.arange(500) % 7, [], DataConfig(mode="stream"), 4, 16, seed=42),
    ):
        a, b = make(), make()
        later = a.batch(9)
        _ = [a.batch(s) for s in range(5)]  # whatever was asked before
        for x, y, z in zip(later, b.batch(9), a.batches(8, 2, 4)):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z[1])
        stacked = a.batches(8, 2, 4)
        assert stacked.tokens.shape[0] == 4 and not stacked.weights[2:].any()  # the tail is all padding
        assert not np.array_equal(a.batch(9).tokens, a.batch(10).tokens)


def test_docs_mode_at_batch_1_is_the_spec_order(names_docs):
    docs, tokenizer = names_docs
    enc = [tokenizer.encode(d) for d in docs[:50]]
    data = DocumentSource(enc, [], DataConfig(layout="padded"), 1, 16)
    for s in (0, 1, 49, 50, 123):
        np.testing.assert_array_equal(data.batch(s).tokens, padded_batch([enc[s % 50]], 16).tokens)


def test_stream_windows(shakespeare_path):
    tokenizer, data = load_train_data(shakespeare_path, DataConfig(mode="stream"), 8, 32, seed=42)
    assert isinstance(data, StreamSource)
    text = shakespeare_path.read_text()
    b = data.batch(3)
    assert b.tokens.shape == (8, 32)
    np.testing.assert_array_equal(b.tokens[:, 1:], b.targets[:, :-1])  # windows of block_size + 1 characters
    assert np.all(b.weights == 1 / (8 * 32)) and np.all(b.segments == 1)
    for row in tokenizer.decode(b.tokens[0].tolist()), tokenizer.decode(b.targets[0].tolist()):
        assert row in text[: len(text) - len(text) // 10]  # from the training 90%
    assert data.eval_set().weights.sum() == pytest.approx(1.0)
    assert len(data.val_text) == len(text) // 10


# --- the split ---


def test_split_is_deterministic_and_refuses_an_empty_side(names_path):
    dcfg = DataConfig()
    (_, a), (_, b) = load_train_data(names_path, dcfg, 1, 16, 42), load_train_data(names_path, dcfg, 1, 16, 42)
    assert isinstance(a, DocumentSource)
    assert len(a.val) == 32033 // 10 and len(a.train) == 32033 - 32033 // 10
    assert all(np.array_equal(x, y) for x, y in zip(a.eval_set(), b.eval_set()))
    train, val = split(list(range(20)), 0.1, "documents")
    assert val == [18, 19] and train == list(range(18))
    assert split(list(range(5)), 0.0, "documents") == (list(range(5)), [])
    with pytest.raises(UserError, match="leaves no document for validation"):
        split(list(range(5)), 0.1, "documents")


# --- the compiled loop ---


# --- the command line ---


def test_train_writes_metrics_and_plot_and_plot_overlays(tmp_path, names_path, shakespeare_path, capsys):
    small = ["--steps", "12", "--log-every", "4", "--eval-every", "8", "--eval-size", "64", "--n-embd", "8", "--n-head", "2"]
    code, a = run_in_process(capsys, "train", "--batch-size", "16", *small, "--data", names_path, "--out", tmp_path / "a")
    assert code == 0, a.err
    assert "step  4 / 12 | loss" in a.out and "val" in a.out and "tok/s" in a.out and "eta" in a.out
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert set(records[1]) == {"step", "loss", "grad_norm", "val_loss", "lr", "tokens_per_s", "elapsed"}
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    stream = ["--mode", "stream", "--block-size", "32", "--batch-size", "4", *small, "--data", shakespeare_path]
    code, b = run_in_process(capsys, "train", *stream, "--out", tmp_path / "b")
    assert code == 0 and "stream" in b.out, b.err
    code, c = run_in_process(capsys, "plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "both.png")
    assert code == 0, c.err
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--block-size", "0"], "--block-size must be positive, got 0"),
        (["--eval-every", "-5"], "--eval-every must be positive, got -5"),
        (["--mode", "stream", "--block-size", "64", "--data", "tiny.txt"], "fewer than block_size + 1 = 65"),
        (["--val-fraction", "0.1", "--data", "three.txt"], "leaves no document for validation"),
        (["--dtype", "bfloat16"], "bfloat16 is for GPUs"),
        (["--layout", "ragged"], ("--layout: invalid choice: 'ragged'", "packed", "padded")),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    """In this process (run_cli, as `microgpt-jax` runs it): a real process's one line is tests/test_cli.py's."""
    if jax.default_backend() != "cpu" and "bfloat16" in args:
        pytest.skip("bfloat16 is allowed on an accelerator")
    (tmp_path / "tiny.txt").write_text("to be or not to be\n")
    (tmp_path / "three.txt").write_text("ann\nbob\ncid\n")
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(capsys, "train", "--steps", "2", *args, "--out", "run")
    assert code == 2
    assert_one_line_error(code, out.err, *((message,) if isinstance(message, str) else message))
    assert out.err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    code, out = run_in_process(capsys, "plot", tmp_path)
    assert code == 2 and "metrics.jsonl not found" in out.err and out.err.count("\n") == 1
