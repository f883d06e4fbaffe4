"""Prepared datasets: what `prepare` writes, numpy alone reads (np.memmap); training on one is training on the text file
(same batches, exact resume); memory bounded by the chunk; a process reads only its own rows; bad input is one line."""

import json
import os
import random
import signal
import socket
import tracemalloc

import numpy as np
import pytest

from microgpt_jax import cli
from microgpt_jax.data import DataConfig, load_train_data
from microgpt_jax.dataset import FileArray, adopt, open_dataset
from microgpt_jax.errors import UserError
from microgpt_jax.prepare import prepare
from microgpt_jax.rundir import RunDir, load_weights
from microgpt_jax.text import load_docs
from microgpt_jax.tokenizer import train_bpe
from tests.helpers import TINY, assert_one_line_error, run_in_process
from tests.test_checkpoint import Spy, assert_same_state, final_state, share_trainers

SHAPE = ["--batch-size", "3", "--log-every", "2"]  # one compiled step shared by the runs on names below (2 steps a chunk)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, shakespeare_path):
    """200 kB of tinyshakespeare, with a few non-ASCII lines: quick to train a BPE on."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare_path.read_text()[:200_000] + "\nCafé naïve, Здравствуй 世界\n  spaced  \n")
    return path


def same_batches(a, b, steps=(0, 3, 1000)):
    for start in steps:
        for x, y in zip(a.batches(start, 2, 3), b.batches(start, 2, 3)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    for x, y in zip(a.eval_set(), b.eval_set()):
        assert np.array_equal(x, y)
    assert (a.rows, a.describe(), a.notes()) == (b.rows, b.describe(), b.notes())


@pytest.mark.parametrize(
    "data,mode,tokenizer,layout",
    [
        ("names", "docs", "char", "packed"),
        ("names", "docs", "char", "padded"),
        ("shakespeare", "stream", "char", "packed"),
        ("shakespeare", "docs", "char", "packed"),  # long documents: cut, with a note
        ("small", "docs", "byte", "padded"),
        ("small", "stream", "byte", "packed"),
        ("small", "docs", "bpe", "packed"),
        ("small", "stream", "bpe", "packed"),
    ],
)
def test_a_prepared_dataset_gives_the_batches_of_its_text_file(request, tmp_path, data, mode, tokenizer, layout):
    path = request.getfixturevalue({"names": "names_path", "shakespeare": "shakespeare_path", "small": "small_text"}[data])
    dcfg = DataConfig(mode=mode, tokenizer=tokenizer, layout=layout)
    size = 300 if tokenizer == "bpe" else None
    prepare(path, tmp_path / "ds", dcfg, vocab_size=size, chunk_bytes=1 << 14)  # many chunks: their seams must not show
    tokenizer, plain = load_train_data(path, dcfg, 8, 16, 42, vocab_size=size)
    tok_dir, prepared = load_train_data(tmp_path / "ds", dcfg, 8, 16, 42)
    mapped = prepared.text if mode == "stream" else prepared.train.flat
    assert tok_dir == tokenizer and type(prepared) is type(plain) and isinstance(mapped, FileArray)
    same_batches(plain, prepared)


def test_the_dataset_format_reads_with_numpy_alone(tmp_path, names_path):
    prepare(names_path, tmp_path / "ds", DataConfig(val_fraction=0.2), seed=7)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    tokens = np.memmap(tmp_path / "ds" / "tokens.bin", dtype=meta["dtype"], mode="r")
    docs = np.memmap(tmp_path / "ds" / "docs.bin", dtype=np.uint64, mode="r")
    order = np.memmap(tmp_path / "ds" / "order.bin", dtype=np.uint32, mode="r")
    chars, bos = meta["tokenizer"]["chars"], meta["bos"]
    assert (meta["docs"], meta["vocab_size"], bos, len(tokens)) == (32033, 27, 26, meta["tokens"]) and tokens[0] == bos
    text = lambda k: "".join(chars[i] for i in tokens[int(docs[k]) + 1 : int(docs[k + 1])])
    expected = load_docs(names_path)
    assert [text(k) for k in (0, 1, 32032)] == [expected[0], expected[1], expected[-1]]
    shuffled = list(range(32033))
    random.Random(7).shuffle(shuffled)  # microgpt's shuffle, seed 7
    assert order.tolist() == shuffled and meta["split"] == {
        "val_fraction": 0.2,
        "unit": "documents",
        "train": 32033 - 6406,
        "validation": 6406,
        "seed": 7,
    }
    assert meta["source"]["sha256"] == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
    lengths = dict(zip(meta["doc_lengths"]["tokens"], meta["doc_lengths"]["count"]))
    assert lengths == {n: sum(len(d) == n for d in expected) for n in lengths} and sum(lengths.values()) == 32033


def test_long_documents_are_cut_with_one_note(shakespeare_path):
    docs = load_docs(shakespeare_path)
    cut = sum(len(d) + 1 > 16 for d in docs)
    _, data = load_train_data(shakespeare_path, DataConfig(), 8, 16, 42)
    assert data.notes() == [
        f"note: {cut:,} of {len(docs):,} documents are longer than block_size 16 and are cut "
        "(their last tokens are not trained); --mode stream trains on all of the text"
    ]
    assert load_train_data(shakespeare_path, DataConfig(), 8, 1024, 42)[1].notes() == []


def test_each_process_reads_only_its_own_rows(tmp_path, names_path, shakespeare_path):
    half = lambda rows: slice(rows // 2, rows)  # the second of two processes
    prepare(names_path, tmp_path / "ds", DataConfig())
    (_, whole), (_, mine) = (load_train_data(tmp_path / "ds", DataConfig(), 8, 16, 42, 2, local) for local in (None, half))
    _, stream = load_train_data(shakespeare_path, DataConfig(mode="stream"), 8, 16, 42, local_rows=half)
    _, stream_whole = load_train_data(shakespeare_path, DataConfig(mode="stream"), 8, 16, 42)
    for a, b in ((whole, mine), (stream_whole, stream)):
        for x, y in (a.batches(5, 3, 3), b.batches(5, 3, 3)), (a.eval_set(), b.eval_set()):
            R = a.rows
            assert np.array_equal(x.tokens[:, R // 2 :], y.tokens[:, R // 2 :]) and not y.tokens[:, : R // 2].any()
            assert np.array_equal(x.weights, y.weights)  # every row's weights: the token count stays global
            assert x.tokens[:, : R // 2].any()


def test_prepare_reads_in_chunks_whatever_the_size(tmp_path):
    """The peak of Python's and numpy's allocations does not grow with the text (stream mode; docs mode adds
    4 bytes per document for the shuffle)."""
    rng = np.random.default_rng(0)
    words = np.array(["the", "king", "speaks", "and", "thou", "art", "here", "é"])
    peaks, lines = {}, "\n".join(" ".join(words) for words in rng.choice(words, (20_000, 5)).tolist())
    for mb in (1, 4):
        path = tmp_path / f"{mb}.txt"
        path.write_text("\n".join([lines] * mb))
        for mode in ("stream", "docs"):
            tracemalloc.start()
            meta = prepare(path, tmp_path / f"{mb}-{mode}", DataConfig(mode=mode), chunk_bytes=1 << 16)
            peaks[mb, mode] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert meta["docs"] == mb * 20_000 and meta["source"]["bytes"] > mb * 4 * 10**5
    assert peaks[4, "stream"] < 1.1 * peaks[1, "stream"] < 3.5e6  # the 0x110000 character mask, a chunk, its ids
    assert peaks[4, "docs"] - peaks[1, "docs"] < 5 * 60_000 + 0.1 * peaks[1, "docs"]


def test_resume_on_a_prepared_dataset_is_bitwise_identical(tmp_path, names_path, monkeypatch, capsys):
    share_trainers(monkeypatch)
    spy = Spy()
    from microgpt_jax import loop

    monkeypatch.setattr(loop, "run_steps", spy(loop.run_steps))
    prepare(names_path, tmp_path / "ds", DataConfig())
    flags = [*TINY, "--data", str(tmp_path / "ds"), *SHAPE, "--steps", "4", "--save-every", "4"]
    cli.main(["train", *flags, "--out", str(tmp_path / "whole")])
    whole = spy.array(4)
    spy.losses, spy.before = {}, lambda step: step == 2 and os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(UserError, match="SIGTERM at step 2"):
        cli.main(["train", *flags, "--out", str(tmp_path / "cut")])
    first = spy.array(2)
    spy.losses, spy.before = {}, None
    cli.main(["train", "--resume", str(tmp_path / "cut")])
    assert np.array_equal(np.concatenate([first, [spy.losses[s] for s in range(2, 4)]]), whole)
    assert_same_state(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
    run = RunDir.open(tmp_path / "cut")
    assert run.data_path == (tmp_path / "ds").resolve() and run.dcfg.mode == "docs" and run.tokenizer.size == 27
    capsys.readouterr()


def test_a_bpe_run_keeps_its_tokenizer_for_sample_export_and_check(tmp_path, small_text, capsys):
    flags = [*TINY, "--data", small_text, "--tokenizer", "bpe", "--vocab-size", "300", "--steps", "3", "--layout", "padded"]
    code, out = run_in_process(capsys, "train", *flags, "--out", tmp_path / "run")
    assert code == 0 and "vocab size: 300 (bpe tokenizer)" in out.out, out
    cfg, tokenizer, params, _, run = load_weights(tmp_path / "run")[:5]
    assert (tmp_path / "run" / "tokenizer.json").is_file() and tokenizer.kind == "bpe" and tokenizer.size == cfg.vocab_size == 300
    assert tokenizer == load_train_data(small_text, run.dcfg, 1, 8, 42, vocab_size=300)[0]  # the tokenizer trained on this text
    assert tokenizer.decode(tokenizer.encode("Café, 世界")) == "Café, 世界"  # what sample decodes its ids with
    code, out = run_in_process(capsys, "export", tmp_path / "run", tmp_path / "m.safetensors")
    assert code == 0 and load_weights(tmp_path / "m.safetensors").tokenizer == tokenizer
    code, out = run_in_process(capsys, "check", tmp_path / "run", "--steps", "1", "--doc", "é世")  # a BPE-tokenized document
    assert code == 0 and "passed, 0 failed" in out.out
    code, out = run_in_process(capsys, "sample", tmp_path / "run", "--prompt", "Caf", "--num-samples", "3", "--json")
    samples = [json.loads(line) for line in out.out.splitlines()]
    assert code == 0 and len(samples) == 3, out.err
    assert all(s["sample"] == tokenizer.decode(s["ids"]) and s["sample"].startswith("Caf") for s in samples)  # decoded whole
    code, out = run_in_process(capsys, "eval", tmp_path / "run", "--json")
    result = json.loads(out.out)
    assert code == 0 and result["bytes"] > result["tokens"] > 0 and "bits_per_byte" in result, out.err  # bpe: per byte
    other = train_bpe(["abc abd"], 300)  # a run resumed (or fine-tuned) goes on with its own tokenizer, not a new one
    assert load_train_data(small_text, run.dcfg, 1, 8, 42, tokenizer=other)[0] is other
    code, out = run_in_process(
        capsys, "train", "--init-from", tmp_path / "run", "--data", small_text, "--steps", "1", "--out", tmp_path / "b"
    )
    assert code == 0 and load_weights(tmp_path / "b").tokenizer == tokenizer, out  # fine-tuned: the weights' bpe, without --tokenizer
    tokenizer_file = tmp_path / "b" / "tokenizer.json"
    for swapped, fragment in [(other.hf_json.encode(), "is not the tokenizer the run was trained with"), (b"\xff{", "not valid UTF-8")]:
        tokenizer_file.write_bytes(swapped)
        code, out = run_in_process(capsys, "sample", tmp_path / "b")
        assert_one_line_error(code, out.err, str(tokenizer_file), fragment)


def test_training_with_the_byte_tokenizer(tmp_path, small_text, capsys):
    flags = [*TINY, "--data", small_text, "--tokenizer", "byte", "--mode", "stream", "--steps", "2", "--batch-size", "2"]
    code, out = run_in_process(capsys, "train", *flags, "--out", tmp_path / "run")
    assert code == 0 and "vocab size: 257 (byte tokenizer)" in out.out and RunDir.open(tmp_path / "run").tokenizer.kind == "byte"


def test_the_main_command_needs_no_network(tmp_path, monkeypatch, capsys):
    """README's `microgpt-jax train --out runs/names` with nothing but the package: names ships with it."""

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("MICROGPT_JAX_DATA")
    code, out = run_in_process(capsys, "train", *TINY, *SHAPE, "--steps", "2", "--out", tmp_path / "names")
    assert code == 0 and out.out.startswith("num docs: 28830 train, 3203 validation"), out
    assert RunDir.open(tmp_path / "names").data_sha256 == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"


def test_a_dataset_fixes_mode_tokenizer_and_split(tmp_path, names_path):
    prepare(names_path, tmp_path / "ds", DataConfig(mode="stream", tokenizer="byte", val_fraction=0.05))
    assert adopt(tmp_path / "ds", DataConfig(layout="padded"), given={"layout"}) == DataConfig(
        mode="stream", tokenizer="byte", val_fraction=0.05, layout="padded"
    )
    ds = open_dataset(tmp_path / "ds")
    assert ds.meta["split"]["train"] + ds.meta["split"]["validation"] == ds.meta["tokens"] == len(names_path.read_bytes())


def broken(directory, what):
    if what == "meta":
        (directory / "meta.json").write_text("{not json")
    elif what == "version":
        meta = json.loads((directory / "meta.json").read_text())
        (directory / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    else:
        (directory / "tokens.bin").write_bytes((directory / "tokens.bin").read_bytes()[:-2])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, names_path):
    """ds: names prepared; meta, version, tokens: the same, each damaged in one way."""
    root = tmp_path_factory.mktemp("datasets")
    for name in ("ds", "meta", "version", "tokens"):
        prepare(names_path, root / name, DataConfig())
    (root / "meta" / "meta.json").write_text("{not json")
    meta = json.loads((root / "version" / "meta.json").read_text())
    (root / "version" / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    (root / "tokens" / "tokens.bin").write_bytes((root / "tokens" / "tokens.bin").read_bytes()[:-2])
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["prepare", "nope.txt", "--out", "ds2"], "file not found: nope.txt"),
        (["prepare", "NAMES", "--out", "ds"], "ds already exists; pass a new directory"),
        (["prepare", "NAMES", "--out", "ds2", "--vocab-size", "30"], "--vocab-size is for --tokenizer bpe"),
        (["prepare", "NAMES", "--out", "ds2", "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be at least 257"),
        (["train", "--vocab-size", "30", "--steps", "1"], "--vocab-size 30 differs from the 27 ids the char tokenizer gives"),
        (["train", "--data", "ds", "--mode", "stream"], "--mode 'stream' differs from the prepared dataset's 'docs'"),
        (["train", "--data", "ds", "--vocab-size", "40"], "--vocab-size 40 differs from the prepared dataset's 27"),
        (["train", "--data", "meta"], "meta.json is damaged"),
        (["train", "--data", "version"], "meta.json: version is 99; this microgpt-jax reads datasets of version 1"),
        (["train", "--data", "tokens"], "tokens.bin has 456292 bytes, where meta.json says 228147 entries of uint16"),
        (["train", "--data", "."], "is a directory but no dataset (no meta.json)"),
    ],
)
def test_bad_input_is_one_line(datasets, names_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(datasets)
    code, out = run_in_process(capsys, *[str(names_path) if a == "NAMES" else a for a in args])
    assert_one_line_error(code, out.err, message)
    assert not (datasets / "ds2").exists()


def test_the_prepared_bench_case_measures_in_fresh_processes(tmp_path):
    from microgpt_jax import bench

    size = bench.generate_text(tmp_path / "corpus.txt", 1)
    docs = load_docs(tmp_path / "corpus.txt")
    assert size >= 2**20 and 20_000 < len(docs) < 40_000 and len(set(docs)) > 0.9 * len(docs)  # single words repeat
    prepare(tmp_path / "corpus.txt", tmp_path / "ds", DataConfig())
    done = bench.in_process("startup_worker", tmp_path / "ds", "docs")
    assert done["seconds"] < 10 and 20 < done["peak_rss_mb"] < 1000
