"""Reading a dataset directory: every open checks what is cheap (meta.json's checksum, sizes, sampled hashes), every
read checks what it reads (ids, bounds), verify checks every byte; each damage is one line and changes nothing."""

import json
import re
import shutil

import numpy as np
import pytest

from microgpt_jax.data import DataConfig, load_train_data
from microgpt_jax.dataset import SAMPLE_BYTES, binding, file_checksums, meta_checksum, open_dataset, sample_starts, verify
from microgpt_jax.errors import UserError
from microgpt_jax.prepare import prepare
from microgpt_jax.text import load_docs
from tests.helpers import assert_one_line_error, run_in_process


@pytest.fixture(scope="module")
def good(tmp_path_factory, names_path):
    """names prepared (docs, and stream with bytes), and `other`: names with one character moved from the first
    document to the second (the same documents, tokens and vocabulary; other bounds)."""
    root = tmp_path_factory.mktemp("good")
    prepare(names_path, root / "docs", DataConfig())
    prepare(names_path, root / "stream", DataConfig(mode="stream", tokenizer="byte"))
    docs = load_docs(names_path)
    docs[:2] = [docs[0][:-1], docs[0][-1] + docs[1]]
    (root / "other.txt").write_text("\n".join(docs) + "\n")
    prepare(root / "other.txt", root / "other", DataConfig())
    return root


def copy_of(good, tmp_path, name="docs", checksums=True):
    """A copy of a good dataset; without checksums, as a microgpt-jax from before them wrote it."""
    shutil.copytree(good / name, tmp_path / name)
    if not checksums:
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        del meta["files"], meta["checksum"]
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    return tmp_path / name


def poke(path, dtype, entry, value):
    """Entry `entry` of the array file at path set to value, the file's size unchanged."""
    array = np.fromfile(path, dtype)
    array[entry] = value
    array.tofile(path)


def edit_meta(directory, change):
    meta = json.loads((directory / "meta.json").read_text())
    change(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def split_train(meta):
    meta["split"]["train"] -= 1000
    meta["split"]["validation"] += 1000


def consistent(edit):
    """An edit of meta.json whose own checksum is made again (and the files' too): only the binding or the content shows it."""

    def change(meta):
        edit(meta)
        meta["checksum"] = meta_checksum(meta)

    return change


def rehashed_order(d, good):
    """order.bin with a duplicate, its checksums in meta.json made again to match."""
    poke(d / "order.bin", "<u4", 5, np.fromfile(d / "order.bin", "<u4")[6])
    edit_meta(d, consistent(lambda m: m["files"].update({"order.bin": file_checksums(d / "order.bin", bound=binding(m))})))


ATTACKS = {  # each: (damage, what the refusal at open names)
    "token id past the vocabulary": (lambda d, good: poke(d / "tokens.bin", "<u2", 1, 27), "tokens.bin does not match the sampled hash"),
    "docs.bin of another dataset": (lambda d, good: shutil.copy(good / "other" / "docs.bin", d / "docs.bin"), "docs.bin does not match"),
    "bound past the end": (lambda d, good: poke(d / "docs.bin", "<u8", -1, 228147 + 5), "docs.bin does not match the sampled hash"),
    "order.bin with a duplicate": (lambda d, good: poke(d / "order.bin", "<u4", 5, np.fromfile(d / "order.bin", "<u4")[6]), "order.bin"),
    "meta.json mode": (lambda d, good: edit_meta(d, lambda m: m.update(mode="stream")), "meta.json does not match its checksum"),
    "meta.json split": (lambda d, good: edit_meta(d, split_train), "meta.json does not match its checksum"),
    "meta.json tokenizer": (
        lambda d, good: edit_meta(d, lambda m: m.update(tokenizer={"kind": "byte"}, vocab_size=257, bos=256)),
        "meta.json does not match its checksum",
    ),
    "meta.json mode, rehashed": (lambda d, good: edit_meta(d, consistent(lambda m: m.update(mode="stream"))), "meta.json: files names"),
    "meta.json split, rehashed": (lambda d, good: edit_meta(d, consistent(split_train)), "does not match the sampled hash"),
    "meta.json tokenizer, rehashed": (
        lambda d, good: edit_meta(d, consistent(lambda m: m.update(tokenizer={"kind": "byte"}, vocab_size=257, bos=256))),
        "does not match the sampled hash",
    ),
    "meta.json doc_lengths junk, rehashed": (
        lambda d, good: edit_meta(d, consistent(lambda m: m.update(doc_lengths={"tokens": "x", "count": None}))),
        "doc_lengths must be",
    ),
    "order.bin with a duplicate, rehashed": (rehashed_order, "order.bin is not a permutation"),
}


def contents(directory):
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_damaged_dataset_is_refused_at_open_with_one_line(good, tmp_path, monkeypatch, capsys, attack):
    damage, message = ATTACKS[attack]
    ds = copy_of(good, tmp_path)
    damage(ds, good)
    before = contents(ds)
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(capsys, "train", "--data", ds, "--steps", "1", "--out", tmp_path / "run")
    assert_one_line_error(code, out.err, message, f"prepare the dataset again, or run `microgpt-jax prepare --verify {ds}`")
    with pytest.raises(UserError, match=message) as e:
        verify(ds)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() and contents(ds) == before


@pytest.mark.parametrize(
    "attack,message",
    [
        ("token id past the vocabulary", "tokens.bin has 27 at entry 1, not below 27 (the vocabulary size)"),
        ("docs.bin of another dataset", "docs.bin has 4 at entry 1, where tokens.bin's BOS number 1 is at 5"),
        ("bound past the end", "docs.bin has 228152 at entry 32033, not below 228147 (the 228147 entries of tokens.bin)"),
        ("order.bin with a duplicate", "order.bin is not a permutation of the 32033 documents"),
    ],
)
def test_verify_names_the_problem_of_a_dataset_without_checksums(good, tmp_path, attack, message):
    ds = copy_of(good, tmp_path, checksums=False)
    ATTACKS[attack][0](ds, good)
    with pytest.raises(UserError, match=re.escape(message)):
        verify(ds)


def test_verify_passes_on_a_good_dataset_and_an_old_one(good, tmp_path):
    assert verify(good / "docs") == (
        f"{good / 'docs'}: ok: 228,147 tokens, every id below 27, 32,033 documents between BOS, order.bin a permutation of them; "
        "every file matches its sha256"
    )
    assert verify(good / "stream").endswith("ok: 228,145 tokens, every id below 257; every file matches its sha256")
    old = copy_of(good, tmp_path, checksums=False)  # meta.json as a microgpt-jax from before checksums wrote it: still read
    assert verify(old).endswith("no checksums to compare (written before prepare recorded them)")
    (_, a), (_, b) = (load_train_data(d, DataConfig(), 8, 16, 42) for d in (good / "docs", old))
    assert all(np.array_equal(x, y) for x, y in zip(a.batches(3, 2, 2), b.batches(3, 2, 2)))


def unsampled(ds, entries):
    """The first of the token entries that no block of the sampled hash covers: damage there shows at read, not at open."""
    covered = np.zeros(ds.tokens.count, bool)
    for start in sample_starts(ds.tokens.count * 2).tolist():
        covered[start // 2 : (start + SAMPLE_BYTES) // 2] = True
    return next((int(e) for e in entries if not covered[e]), None)


def test_each_read_checks_the_token_ids_it_reads(good, tmp_path):
    """Damage away from the sampled blocks passes the open; the batch, or the validation set, that reads it is refused."""
    ds = copy_of(good, tmp_path)
    opened = open_dataset(ds)
    bounds, order = np.asarray(opened.docs), np.asarray(opened.order)
    doc_entries = lambda k: range(bounds[k] + 1, bounds[k + 1])
    position = next(i for i, k in enumerate(order[: opened.n_train]) if unsampled(opened, doc_entries(k)) is not None)
    entry = unsampled(opened, doc_entries(order[position]))
    poke(ds / "tokens.bin", "<u2", entry, 40)
    _, source = load_train_data(ds, DataConfig(), 8, 16, 42)
    source.batches(position // 8 + 1, 1, 1)  # another step: nothing wrong read
    with pytest.raises(UserError, match=f"tokens.bin has 40 at entry {entry}, not below 27 \\(the vocabulary size\\); prepare the"):
        source.batches(position // 8, 1, 1)
    with pytest.raises(UserError, match=f"has 40 at entry {entry}"):
        verify(ds)
    stream = copy_of(good, tmp_path, "stream")
    n_train = open_dataset(stream).n_train
    entry = unsampled(open_dataset(stream), range(n_train, n_train + 8000))  # eval_set reads 1024 windows of 16
    assert entry is not None
    poke(stream / "tokens.bin", "<u2", entry, 300)
    _, source = load_train_data(stream, DataConfig(mode="stream", tokenizer="byte"), 8, 16, 42)
    with pytest.raises(UserError, match=f"tokens.bin has 300 at entry {entry}, not below 257"):
        source.eval_set()


@pytest.mark.parametrize(
    "entry,value,doc,message",
    [
        (1000, 10**9, 1000, "docs.bin has 1000000000 at entry 1000, not below 228147 (the 228147 entries of tokens.bin)"),
        (2000, 3, 1999, "docs.bin does not increase at entry 2000"),  # document 1999 ends before it starts
    ],
)
def test_each_read_checks_the_bounds_it_reads(good, tmp_path, entry, value, doc, message):
    """A bound outside tokens.bin, or one below the one before, is refused by the step that reads it (no checksums here:
    the open leaves them to the read)."""
    ds = copy_of(good, tmp_path, checksums=False)
    poke(ds / "docs.bin", "<u8", entry, value)
    position = int(np.flatnonzero(np.asarray(open_dataset(ds).order) == doc)[0])
    _, source = load_train_data(ds, DataConfig(layout="padded"), 8, 16, 42)
    with pytest.raises(UserError, match=re.escape(message)):
        source.batches(position // 8, 1, 1)
