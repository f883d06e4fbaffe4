"""Generation past block_size (a sliding window, exactly a fresh forward of the cropped context) and its output:
streamed batch by batch, framed when a sample can hold a newline."""

import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax import cli
from microgpt_jax import sample as sampling
from microgpt_jax.config import ConfigError
from microgpt_jax.data import DataConfig
from microgpt_jax.model import GPTConfig
from microgpt_jax.rundir import RunConfig
from microgpt_jax.sample import _generate, frame, keyed_draw, print_samples, sample, sample_batches
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig
from tests import helpers
from tests.helpers import assert_close
from tests.test_sample import full, random_params

VOCAB = CharTokenizer("\n !,.:abcdefghijklmnopqrstuvwxyz")  # a text run's: newlines are characters
BOS, T = VOCAB.bos, 8
CFG = GPTConfig(vocab_size=VOCAB.size, n_embd=16, n_head=2, n_layer=2, block_size=T)
PROMPT = tuple(VOCAB.ids("ab").tolist())
P = len(PROMPT) + 1  # with the BOS every sample starts from
OPTIONS = dict(temperature=0.8, top_k=20, top_p=0.95)
N = 3 * T  # tokens drawn: the tests share one compiled shape (batches of 4, N tokens)


def knobs(temperature, top_k, top_p):
    return jnp.float64(temperature), jnp.int32(top_k), jnp.float64(top_p)


def fresh_logits(params, context_BS):
    """The next-token logits of each row of context (at most block_size tokens) by a forward of it alone.

    (Padded to one compiled shape: causal attention ignores what follows the context.)
    """
    S = context_BS.shape[1]
    padded_BT = np.pad(context_BS, ((0, 0), (0, T - S)), constant_values=BOS)
    return full(params, jnp.asarray(padded_BT), CFG)[:, S - 1]


def test_every_token_past_the_block_is_a_fresh_forward_of_the_cropped_context():
    """The logits of every drawn position, recorded inside the compiled loop, against forward(last block_size tokens)."""
    params, B = random_params(CFG), 10
    prompt_P = jnp.asarray([BOS, *PROMPT], jnp.int32)
    keyed, seen = keyed_draw(jax.random.key(0), jnp.arange(B), *knobs(1.0, CFG.vocab_size, 1.0)), {}

    def draw(logits_BV, step):
        jax.debug.callback(lambda s, logits: seen.__setitem__(int(s), np.asarray(logits)), step, logits_BV)
        return keyed(logits_BV.at[:, BOS].set(-jnp.inf), step)  # never BOS: every row runs all N draws

    out_BN, _, steps = jax.jit(lambda p: _generate(p, prompt_P, CFG, B, draw, N))(params)
    jax.effects_barrier()
    assert int(steps) == N and sorted(seen) == list(range(N))
    seq_BL = np.concatenate([np.broadcast_to(prompt_P, (B, P)), out_BN], 1)
    for step in range(N):
        context_BS = seq_BL[:, : P + step][:, -T:]  # all of it while it fits, then the last block_size tokens
        assert_close(seen[step], fresh_logits(params, context_BS), f"logits of draw {step}")


def scratch_samples(params, num, new_tokens, seed, temperature, top_k, top_p):
    """The definition, one token at a time for all rows at once: row i draws from a fresh forward of its last
    block_size tokens, with the uniforms `sample` gives row i."""
    draw = jax.jit(keyed_draw(jax.random.key(seed), jnp.arange(num), *knobs(temperature, top_k, top_p)))
    seq, done = np.tile([BOS, *PROMPT], (num, 1)), np.zeros(num, bool)
    for step in range(new_tokens):
        new = np.where(done, BOS, draw(fresh_logits(params, seq[:, -T:]), step))
        seq, done = np.concatenate([seq, new[:, None]], 1), done | (new == BOS)
    drawn = [row[P:].tolist() for row in seq]
    return [row[: row.index(BOS)] if BOS in row else row for row in drawn]


def test_sliding_samples_equal_the_definition_whatever_the_batch():
    """In batches of 4 (the last one padded), the samples of the batch-free definition; one compilation."""
    params = random_params(CFG, scale=2.0)
    want = scratch_samples(params, 10, N, seed=3, **OPTIONS)
    assert max(map(len, want)) > T and min(map(len, want)) < N  # past the block, and some ended at BOS
    got = sample(params, CFG, 10, prompt=PROMPT, seed=3, batch_size=4, max_new_tokens=N, **OPTIONS)
    assert [s.ids for s in got] == want
    size = sampling.sampler(CFG)._cache_size()
    sample(params, CFG, 7, prompt=PROMPT, seed=5, batch_size=4, max_new_tokens=N, temperature=0.3)
    assert sampling.sampler(CFG)._cache_size() == size >= 1  # one compilation per (batch, length)


def test_batches_are_handed_over_as_they_complete(monkeypatch):
    """The next batch is dispatched before this one is read back: never more than one ahead."""
    dispatched, real = [], sampling.sample_rows
    monkeypatch.setattr(sampling, "sample_rows", lambda *a, **k: dispatched.append(1) or real(*a, **k))
    batches = sample_batches(random_params(CFG), CFG, 10, prompt=PROMPT, batch_size=4, max_new_tokens=N)
    assert [len(dispatched) for _ in batches] == [2, 3, 3]
    with pytest.raises(ConfigError, match="temperature"):
        sample_batches(random_params(CFG), CFG, 10, temperature=-1)  # checked when called, not when first iterated


class Flushes(io.StringIO):
    """A stdout that records what had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_each_batch_is_printed_and_flushed_as_it_completes(capsys):
    out = Flushes()
    print_samples(iter([["a", "b"], ["c"]]), 3, file=out, bar=False)
    assert out.flushed == ["a\nb\n", "a\nb\nc\n"]
    out = Flushes()
    print_samples(iter([["a", "b"], ["c"]]), 3, file=out, bar=True)  # through the progress bar: the same text
    assert out.getvalue() == "a\nb\nc\n" and "3/3" in capsys.readouterr().err


def unframe(text) -> list[str]:
    """The samples of framed output: each header says how many characters follow it (then one newline)."""
    samples = []
    while text:
        header, text = text.split("\n", 1)
        number, length = map(int, re.fullmatch(r"--- sample (\d+) \((\d+) characters\) ---", header).groups())
        assert number == len(samples) + 1 and text[length] == "\n"
        samples.append(text[:length])
        text = text[length + 1 :]
    return samples


def test_framing_is_unambiguous():
    tricky = ["x\n--- sample 2 (1 characters) ---\ny", "\n", "", "z\n"]
    assert unframe("".join(frame(i, s) + "\n" for i, s in enumerate(tricky, 1))) == tricky


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    configs = RunConfig(CFG, TrainConfig(dtype="float64"), DataConfig(mode="stream"))
    path = tmp_path_factory.mktemp("generate") / "run"
    return str(helpers.save_run(path, random_params(CFG, seed=1, scale=2.0), configs, VOCAB, "ab\ncd, ef.\n" * 20))


def test_cli_text_run_samples_are_framed_and_json(text_run, capsys):
    args = ["sample", text_run, "--prompt", "ab", "--max-new-tokens", N, "--num-samples", "5", "--batch-size", "4", "--seed", "3"]
    params = random_params(CFG, seed=1, scale=2.0)  # the run's
    start = int(VOCAB.ids("\n")[0])  # a stream run's samples start from a line break
    want = sample(params, CFG, 5, prompt=PROMPT, temperature=0.5, seed=3, batch_size=4, max_new_tokens=N, start=start)
    texts = ["ab" + VOCAB.decode(s.ids) for s in want]
    assert any("\n" in t for t in texts) and max(map(len, texts)) > T  # what framing and sliding are for
    cli.main(list(map(str, args)))
    assert unframe(capsys.readouterr().out) == texts
    cli.main([*map(str, args), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in rows] == texts and [VOCAB.decode(r["ids"]) for r in rows] == texts
    assert_close([r["logprob"] for r in rows], [s.logprob for s in want], "logprob")


def test_cli_reference_refuses_max_new_tokens(text_run, capsys):
    code, out = helpers.run_in_process(capsys, "sample", text_run, "--reference", "--max-new-tokens", "50")
    helpers.assert_one_line_error(code, out.err, "--max-new-tokens cannot be used with --reference")


def test_stream_runs_start_from_a_line_break_not_bos():
    """Stream training never sees BOS as an input: a stream run's samples start where a line of its text does."""
    newline = int(VOCAB.ids("\n")[0])
    assert sampling.start_token(VOCAB, "stream") == newline
    assert sampling.start_token(VOCAB, "docs") == VOCAB.bos  # documents start at BOS, as in training
    assert sampling.start_token(CharTokenizer("abc"), "stream") == CharTokenizer("abc").bos  # no line break to start from
    params = random_params(CFG, seed=4, scale=3.0)
    for start in (newline, VOCAB.bos):  # greedy: the first token is the argmax after the start token
        (s,) = sample(params, CFG, 1, temperature=0.0, start=start, max_new_tokens=1)
        assert s.ids == [int(jnp.argmax(full(params, jnp.asarray([[start]]), CFG)[0, 0]))]
