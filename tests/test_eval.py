"""`microgpt-jax eval`: the training's val_loss to the bit, and loss, perplexity and bits per character of a file."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microgpt_jax.data import DataConfig
from microgpt_jax.evaluate import evaluate_run
from microgpt_jax.metrics import read_metrics
from microgpt_jax.model import GPTConfig
from microgpt_jax.rundir import RunConfig
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig
from tests import helpers
from tests.helpers import assert_close
from tests.test_sample import full, random_params

T = 8


def eval_json(capsys, *args):
    code, out = helpers.run_in_process(capsys, "eval", *args, "--json")
    assert code == 0, out.err
    (line,) = out.out.splitlines()
    return json.loads(line)


@pytest.mark.parametrize("mode", ["docs", "stream", "prepared"])
def test_eval_reproduces_the_val_loss_the_training_recorded(tmp_path, capsys, mode):
    run = tmp_path / "run"
    data = ["--data", helpers.SHAKESPEARE, "--mode", "stream", "--batch-size", "4"] if mode == "stream" else []
    if mode == "prepared":  # names as a prepared dataset: the same documents and split as the text file
        assert helpers.run_in_process(capsys, "prepare", helpers.NAMES, "--out", tmp_path / "ds")[0] == 0
        data = ["--data", tmp_path / "ds"]
    cadence = ["--steps", "4", "--eval-every", "2", "--save-every", "2", "--log-every", "2"]
    code, out = helpers.run_in_process(capsys, "train", *helpers.TINY, *cadence, *data, "--out", run)
    assert code == 0, out.err
    recorded = {r["step"]: r["val_loss"] for r in read_metrics(run)}
    assert sorted(recorded) == [2, 4]
    for args, step in (([f"{run}@2"], 2), ([run, "--step", "2"], 2), ([run], 4)):
        result = eval_json(capsys, *args)
        assert result["step"] == step and result["loss"] == recorded[step]  # the very float, not a close one
    if mode == "prepared":  # --data DATASET_DIR: that dataset's validation split
        assert eval_json(capsys, run, "--data", tmp_path / "ds")["loss"] == recorded[4]
    # the eval set is the training's: at most eval_size (1024) documents or windows
    assert result["tokens"] == (1024 * T if mode == "stream" else sum(min(len(d) + 1, T) for d in validation_docs()))
    if mode == "stream":  # every window position weighs the same: the loss is the mean per token
        assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-5)
        assert math.isclose(result["bits_per_char"], result["loss"] / math.log(2), rel_tol=1e-5)


def test_eval_on_another_device_count_equals_the_recorded_val_loss(tmp_path, capsys):
    """Trained on 2 (virtual) devices, evaluated on 1: each row's loss alone, the rows added exactly."""
    env = lambda n: {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}  # noqa: E731
    flags = [*helpers.TINY, "--steps", "2", "--batch-size", "6", "--eval-every", "2", "--eval-size", "200"]
    done = helpers.cli("train", *flags, "--out", tmp_path / "run", env=env(2))
    assert done.returncode == 0 and "devices: 2" in done.stdout, done.stderr
    (recorded,) = [r["val_loss"] for r in read_metrics(tmp_path / "run")]
    assert eval_json(capsys, tmp_path / "run")["loss"] == recorded  # in this process, on its one device


def validation_docs():
    from microgpt_jax.data import split
    from microgpt_jax.text import reference_docs

    docs, _ = reference_docs(helpers.NAMES)
    return split(docs, 0.1, "documents")[1][:1024]


# --- a file, against the definition ---

VOCAB = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz")
CFG = GPTConfig(vocab_size=VOCAB.size, n_embd=16, n_head=2, n_layer=2, block_size=T)
PARAMS = random_params(CFG, seed=2, scale=2.0)


def saved_run(path, **data):
    tcfg = TrainConfig(dtype="float64", batch_size=3)
    configs = RunConfig(CFG, tcfg, DataConfig(**data))
    return helpers.save_run(path, PARAMS, configs, VOCAB, "\n".join(["ab cd", "efg", "hij k"] * 4) + "\n")


def nll(context, target):
    """-log p(target | context), from a fresh forward of the context (padded to one compiled shape: causal)."""
    logits_V = full(PARAMS, jnp.asarray([context + [0] * (T - len(context))]), CFG)[0, len(context) - 1]
    return -float(jax.nn.log_softmax(logits_V)[target])


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_eval_of_a_file_of_documents(tmp_path, layout):
    docs = ["hello world", "ab", "a much longer document than the block", "xyz"]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n\n")
    result = evaluate_run(saved_run(tmp_path / "run", layout=layout), data=path)
    # each document: its first block_size positions (as training lays them out); BOS ends it, counting 1 character
    per_doc = [[nll(enc[:t], enc[t]) for t in range(1, min(len(enc), T + 1))] for enc in map(VOCAB.encode, docs)]
    assert_close(result.loss, np.mean([np.mean(d) for d in per_doc]), "loss")
    assert_close(result.nats, sum(map(sum, per_doc)), "nats")
    assert result.tokens == result.units == sum(map(len, per_doc)) and result.step == 1
    assert_close(result.bits_per_unit, result.nats / math.log(2) / result.units, "bits per char")


@pytest.mark.parametrize("length", [4 * T + 1, 4 * T + 4])  # whole windows; a tail of 3 more
def test_eval_of_a_text_covers_every_token_once(tmp_path, length):
    text = ("the cat sat\non a mat\n" * 4)[:length]
    path = tmp_path / "text.txt"
    path.write_text(text)
    result = evaluate_run(saved_run(tmp_path / "run", mode="stream"), data=path)
    ids = VOCAB.ids(text).tolist()
    # target j: predicted in the non-overlapping window holding it, or else in one window ending at the text's end
    whole = (len(ids) - 1) // T
    start = [(j - 1) // T * T if (j - 1) // T < whole else len(ids) - T - 1 for j in range(1, len(ids))]
    want = [nll(ids[s:j], ids[j]) for s, j in zip(start, range(1, len(ids)))]
    assert result.tokens == result.units == len(text) - 1
    assert_close(result.nats, sum(want), "nats")
    assert_close(result.loss, np.mean(want), "loss")
    assert_close(result.perplexity, math.exp(np.mean(want)), "perplexity")


# --- bad input: one line each ---


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return saved_run(tmp_path_factory.mktemp("eval") / "run")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{tmp}/nothing"], "is not a run directory"),
        (["{run}@7"], "has no checkpoint 7 (its checkpoints: 1)"),
        (["{run}", "--step", "3"], "has no checkpoint 3"),
        (["{run}@1", "--step", "1"], "give the step once"),
        (["{run}", "--data", "{tmp}/missing.txt"], "data file not found"),
        (["{run}", "--data", "{tmp}"], "is a directory but no dataset (no meta.json)"),
        (["{run}", "--data", "{tmp}/accents.txt"], "outside the run's vocabulary ('É')"),
        (["{run}", "--data", "{tmp}/empty.txt"], "data file is empty"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, run_dir, args, fragment):
    (tmp_path / "accents.txt").write_text("abc\nÉmile\n")
    (tmp_path / "empty.txt").write_text("")
    code, out = helpers.run_in_process(capsys, "eval", *(a.format(tmp=tmp_path, run=run_dir) for a in args))
    helpers.assert_one_line_error(code, out.err, fragment)


def test_a_missing_data_file_or_short_text_is_one_line(tmp_path, capsys):
    run = saved_run(tmp_path / "run", mode="stream")
    (tmp_path / "short.txt").write_text("ab cd")
    code, out = helpers.run_in_process(capsys, "eval", run, "--data", tmp_path / "short.txt")
    helpers.assert_one_line_error(code, out.err, "has 5 tokens, fewer than the run's block_size + 1 = 9")
    (tmp_path / "run-data.txt").unlink()
    code, out = helpers.run_in_process(capsys, "eval", run)
    helpers.assert_one_line_error(code, out.err, "the run's data file", "is missing", "--data FILE")
