"""A dataset directory written by `microgpt-jax prepare`: opened, checked, read as needed, verified.

    DATASET_DIR/
      meta.json    format, version, mode, tokenizer, counts, dtype, split, source (path, sha256, bytes),
                   files (each .bin's bytes, sha256 and sampled hash) and checksum (the sha256 of all the rest)
      tokens.bin   the token ids, flat, little-endian uint16 (vocabularies up to 65,536 ids) or uint32
      docs.bin     docs mode: uint64 [docs + 1], where each BOS is: document k is tokens[docs[k] + 1 : docs[k + 1]]
      order.bin    docs mode: uint32 (uint64 from 2**32 documents) [docs], the training order, microgpt's
                   shuffle (random.Random(seed).shuffle of the document indices): its first split.train
                   entries are the training documents, the rest the validation ones

In docs mode tokens.bin is BOS doc BOS doc ... BOS, the documents in the
text's order; in stream mode it is the text's tokens (never a BOS), the
training side (the first split.train tokens) then the validation side. With
the char tokenizer a run trains on the very batches it would train on from
the text file itself.

A file's sampled hash is the sha256 of SAMPLES blocks of SAMPLE_BYTES spread
evenly over it (all of a file under SAMPLES * SAMPLE_BYTES): as cheap on
many GiB as on a few. meta.json's checksum is the sha256 of its other fields
as canonical JSON.

Checks, each failure one line naming the file: every open (cheap, whatever
the size) checks meta.json's fields and checksum, each file's size and
sampled hash, and docs.bin's first and last bounds; every read checks the
entries read: token ids below the vocabulary size, document bounds inside
tokens.bin and increasing, document indices below the document count.
`verify` reads everything: each file's sha256, every id, a BOS at every
bound and nowhere else, order.bin a permutation.
"""

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.jsonfile import check_format, read_json
from microgpt_jax.layout import Docs
from microgpt_jax.text import split_docs, text_sha256
from microgpt_jax.tokenizer import from_json

FORMAT = "microgpt-jax dataset"
VERSION = 1
META, TOKENS, DOCS, ORDER = "meta.json", "tokens.bin", "docs.bin", "order.bin"
SAMPLES, SAMPLE_BYTES = 64, 4096  # the sampled hash: 256 KiB read, whatever the file's size
VERIFY_ENTRIES = 1 << 22  # entries verify reads at a time


def is_dataset(path) -> bool:
    return Path(path).is_dir()


def data_sha256(path) -> str:
    """What a run records of its data: the text's sha256, or its dataset's meta.json's (which records the text's)."""
    return text_sha256(Path(path) / META) if is_dataset(path) else text_sha256(path)


def refused(file, problem, key=None) -> UserError:
    """One line for a dataset file that is not as `prepare` wrote it (key: the meta.json field at fault)."""
    file = Path(file)
    where = f"{file}: {key}" if key else str(file)
    return UserError(
        f"{where} {problem}; prepare the dataset again, or run `microgpt-jax prepare --verify {file.parent}` to check all of it"
    )


# -- checksums ---------------------------------------------------------------------------------


def sample_starts(size: int) -> np.ndarray:
    """Where the sampled hash's blocks start in a file of size bytes (8-byte aligned: whole entries of any dtype)."""
    return np.unique(np.linspace(0, max(size - SAMPLE_BYTES, 0), SAMPLES).astype(np.int64) // 8 * 8)


BOUND = ("mode", "tokenizer", "vocab_size", "bos", "dtype", "tokens", "docs", "doc_lengths", "split")


def binding(meta: dict) -> bytes:
    """The meta.json fields that say how to read the files, as canonical JSON: each file's hashes begin with them, so
    an edit to one (mode, tokenizer, split, ...) fails the files' checksums even where meta.json's own was recomputed."""
    if "bound" not in meta:
        return b""  # written before the hashes were bound
    return json.dumps({k: meta.get(k) for k in BOUND}, sort_keys=True, separators=(",", ":")).encode()


def file_checksums(path, full=True, bound=b"") -> dict:
    """{bytes, sampled, sha256} of the file at path, each hash begun with bound; full=False: no sha256 (reads 256 KiB at most)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        sampled = hashlib.sha256(bound)
        for start in sample_starts(size).tolist():
            sampled.update(os.pread(f.fileno(), SAMPLE_BYTES, start))
        sums = {"bytes": size, "sampled": sampled.hexdigest()}
        if full:
            sha = hashlib.sha256(bound)
            while block := f.read(1 << 20):
                sha.update(block)
            sums["sha256"] = sha.hexdigest()
    return sums


def meta_checksum(meta: dict) -> str:
    """The sha256 of meta.json's fields but its checksum, as canonical JSON: an edit to any of them shows."""
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_file(path, recorded, full=False, bound=b""):
    """The file at path matches what meta.json records of it (sizes and sampled hash; full: its sha256 too)."""
    for key, value in file_checksums(path, full, bound).items():
        if not isinstance(recorded, dict) or recorded.get(key) != value:
            what = {"bytes": "size", "sampled": "sampled hash"}.get(key, key)
            raise refused(
                path, f"does not match the {what} meta.json records for it (it, or meta.json, changed after `prepare` wrote them)"
            )


# -- the arrays --------------------------------------------------------------------------------


class FileArray:
    """A flat little-endian array in a file, read with os.pread: only the entries asked for are read.

    Not a memory map: a map's pages count as the process's own memory, and
    with large page-cache folios the kernel maps far more of the file than
    was touched (measured: all of a 512 MiB tokens.bin after 10 steps).
    Slicing gives a view; indexing with an array, or spans(), reads.
    Every read is checked: entries below `below` = (limit, what the limit
    is), and increasing if `increasing`.
    """

    GAP = 4096  # bytes: spans closer than this are read in one call

    def __init__(self, path, dtype, count, below=None, increasing=False):
        self.path, self.dtype, self.count, self.start = Path(path), np.dtype(dtype), count, 0
        self.below, self.increasing = below, increasing
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        if isinstance(key, slice):
            first, stop, _ = key.indices(self.count)
            view = copy.copy(self)  # the same file and checks
            view.start, view.count = self.start + first, max(0, stop - first)
            return view
        idx = np.asarray(key)
        local, at = self.spans(idx.ravel(), np.ones(idx.size, np.int64))
        return local[at].reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        return self._read(0, self.count).astype(dtype or self.dtype)

    def _read(self, first, count) -> np.ndarray:
        size = self.dtype.itemsize
        data = os.pread(self.fd, count * size, (self.start + first) * size)
        if len(data) != count * size:
            raise refused(self.path, "ends before its meta.json says")
        values = np.frombuffer(data, self.dtype)
        self._check(values, self.start + first)
        return values

    def _check(self, values, first):
        """values, entries first.. of the file, are as prepare wrote them; else one line naming the first bad one."""
        if self.below is not None and len(values) and values.max() >= self.below[0]:
            at = int(np.argmax(values >= self.below[0]))
            raise refused(self.path, f"has {values[at]} at entry {first + at}, not below {self.below[0]} ({self.below[1]})")
        if self.increasing and len(values) > 1 and (values[1:] <= values[:-1]).any():
            at = int(np.argmax(values[1:] <= values[:-1]))
            raise refused(self.path, f"does not increase at entry {first + at + 1} ({values[at]}, then {values[at + 1]})")

    def spans(self, starts, lengths):
        """(local, at): entries [starts[i], starts[i] + lengths[i]) are local[at[i] : at[i] + lengths[i]] (layout.read_spans).
        Spans that overlap or nearly touch are read together."""
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        if not len(starts):
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        order = np.argsort(starts, kind="stable")
        begin, end = starts[order], starts[order] + lengths[order]
        new = np.concatenate([[True], begin[1:] > np.maximum.accumulate(end)[:-1] + self.GAP // self.dtype.itemsize])
        group, heads = np.cumsum(new) - 1, np.flatnonzero(new)
        group_begin, group_end = begin[heads], np.maximum.reduceat(end, heads)
        parts = [self._read(a, b - a) for a, b in zip(group_begin.tolist(), group_end.tolist())]
        base = np.concatenate([[0], np.cumsum(group_end - group_begin)[:-1]])
        at = np.empty(len(starts), np.int64)
        at[order] = base[group] + begin - group_begin[group]
        return np.concatenate(parts), at

    def pieces(self):
        """(first entry, entries) of the whole array, VERIFY_ENTRIES at a time, each read checked."""
        for first in range(0, self.count, VERIFY_ENTRIES):
            yield first, np.asarray(self[first : first + VERIFY_ENTRIES])


def _file_array(path, dtype, count, below, increasing=False) -> FileArray:
    """count entries of dtype in the file at path; a file of another size is a one-line error."""
    size = path.stat().st_size if path.is_file() else None
    if size != count * np.dtype(dtype).itemsize:
        found = "is missing" if size is None else f"has {size} bytes"
        raise refused(path, f"{found}, where meta.json says {count} entries of {np.dtype(dtype).name}")
    return FileArray(path, dtype, count, below, increasing)


# -- opening -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """An open dataset directory: its meta.json, tokenizer and arrays, read as needed (docs and order: docs mode)."""

    path: Path
    meta: dict
    tokenizer: object
    tokens: FileArray
    docs: FileArray | None = None
    order: FileArray | None = None

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def n_train(self) -> int:
        return self.meta["split"]["train"]

    def files(self) -> list[FileArray]:
        return [a for a in (self.tokens, self.docs, self.order) if a is not None]

    def sides(self):
        """(train, validation): token arrays (stream mode), or `layout.Docs` in training order (docs mode)."""
        if self.mode == "stream":
            return self.tokens[: self.n_train], self.tokens[self.n_train :]
        return tuple(Docs.separated(self.tokens, self.docs, order) for order in (self.order[: self.n_train], self.order[self.n_train :]))

    def length_counts(self):
        """(lengths, counts) of the documents' tokens, as prepare counted them."""
        lengths = self.meta.get("doc_lengths", {})
        return lengths.get("tokens", []), lengths.get("count", [])

    def notes(self, seed) -> list[str]:
        """Lines to say once at the start of a run with this seed."""
        shuffled_with = self.meta["split"]["seed"]
        if seed == shuffled_with:
            return []
        return [f"note: the documents keep the order `prepare` shuffled them in (seed {shuffled_with}); --seed {seed} draws the rest"]


def open_dataset(path) -> Dataset:
    """The dataset directory at path, checked as far as that is cheap: one line for each way it can be unusable."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise UserError(
            f"{path} is a directory but no dataset (no {META}); pass a text file or a directory written by `microgpt-jax prepare`"
        )
    meta = read_json(meta_file, "prepare the dataset again")
    bad = lambda key, problem: refused(meta_file, problem, key)
    check_format(meta, FORMAT, VERSION, "datasets", bad)
    # a dataset written before meta.json held checksums has neither field: it still opens, with the other checks alone
    checked = "checksum" in meta or "files" in meta
    if checked and meta.get("checksum") != meta_checksum(meta):
        raise refused(meta_file, "does not match its checksum (it was edited after `prepare` wrote it)")
    counts = ["tokens"] + (["docs"] if meta.get("mode") == "docs" else [])
    for key, ok in [("mode", meta.get("mode") in ("docs", "stream")), ("dtype", meta.get("dtype") in ("uint16", "uint32"))] + [
        (key, isinstance(meta.get(key), int) and meta[key] >= 0) for key in counts
    ]:
        if not ok:
            raise bad(key, f"is {meta.get(key)!r}")
    lengths = meta.get("doc_lengths", {"tokens": [], "count": []})
    if not (isinstance(lengths, dict) and all(isinstance(lengths.get(k), list) for k in ("tokens", "count"))) or not (
        len(lengths["tokens"]) == len(lengths["count"]) and all(type(x) is int and x >= 0 for x in lengths["tokens"] + lengths["count"])
    ):
        raise bad("doc_lengths", 'must be {"tokens": [int, ...], "count": [int, ...]} of one length')
    split = meta.get("split")
    total = meta.get("docs") if meta["mode"] == "docs" else meta["tokens"]
    if not isinstance(split, dict) or not isinstance(split.get("train"), int) or not 0 < split["train"] <= total:
        raise bad("split", f"is {split!r}")
    if meta["mode"] == "docs" and not isinstance(split.get("seed"), int):
        raise bad("split.seed", f"is {split.get('seed')!r}")
    try:
        tokenizer = from_json(meta.get("tokenizer"))
    except UserError as e:
        raise bad("tokenizer", f"is unusable ({e})") from None
    if tokenizer.size != meta.get("vocab_size"):
        raise bad("vocab_size", f"is {meta.get('vocab_size')!r}, but the tokenizer has {tokenizer.size} ids")
    n_tokens = meta["tokens"]
    dtype = "<" + ("u2" if meta["dtype"] == "uint16" else "u4")
    ds = Dataset(path, meta, tokenizer, _file_array(path / TOKENS, dtype, n_tokens, (tokenizer.size, "the vocabulary size")))
    if meta["mode"] == "docs":
        n = meta["docs"]
        ds.docs = _file_array(path / DOCS, "<u8", n + 1, (n_tokens, f"the {n_tokens} entries of {TOKENS}"), increasing=True)
        ds.order = _file_array(path / ORDER, "<u4" if n < 1 << 32 else "<u8", n, (n, f"the {n} documents"))
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    if checked and set(files) != {a.path.name for a in ds.files()}:
        raise bad(
            "files", f"names {', '.join(sorted(files))}, but a {meta['mode']} dataset has {', '.join(a.path.name for a in ds.files())}"
        )
    for array in ds.files() if checked else []:
        check_file(array.path, files.get(array.path.name), bound=binding(meta))
    ends = ds.docs[np.array([0, n])].tolist() if meta["mode"] == "docs" else None
    if ends is not None and ends != [0, n_tokens - 1]:
        raise refused(ds.docs.path, f"does not span {TOKENS} (bounds {ends[0]} to {ends[1]}, for {n_tokens} tokens)")
    return ds


def dataset_fields(dataset: Dataset) -> dict:
    """The DataConfig values the dataset fixes."""
    return {"mode": dataset.mode, "tokenizer": dataset.tokenizer.kind, "val_fraction": dataset.meta["split"]["val_fraction"]}


def adopt(path, dcfg, given=()):
    """The DataConfig dcfg with the dataset's mode, tokenizer and val_fraction, except those in given (typed by the
    user: checked against the dataset when it is loaded)."""
    return dataclasses.replace(dcfg, **{k: v for k, v in dataset_fields(open_dataset(path)).items() if k not in given})


def load_prepared(path, dcfg, vocab_size=None) -> Dataset:
    """The dataset at path, for a run of the DataConfig dcfg (and --vocab-size, if given): a value that differs is refused."""
    ds = open_dataset(path)
    for key, value in dataset_fields(ds).items():
        if getattr(dcfg, key) != value:
            raise ConfigError(
                key,
                f"{getattr(dcfg, key)!r} differs from the prepared dataset's {value!r} ({path}); "
                f"drop it, or prepare the text again with --{key.replace('_', '-')} {getattr(dcfg, key)}",
            )
    if vocab_size is not None and vocab_size != ds.tokenizer.size:
        raise ConfigError("vocab_size", f"{vocab_size} differs from the prepared dataset's {ds.tokenizer.size} ({path}); drop it")
    if ds.mode == "docs":
        check_permutation(ds)  # 4 bytes a document, read once: a repeated document would train twice, silently
    return ds


def check_permutation(ds: Dataset):
    n = ds.meta["docs"]
    seen = np.zeros(n, bool)
    for _, k in ds.order.pieces():  # each entry checked below the document count as it is read
        seen[k] = True
    if not seen.all():
        missing = int(np.argmin(seen))
        raise refused(ds.order.path, f"is not a permutation of the {n} documents (document {missing} is missing, another repeats)")


def first_document(path) -> str:
    """The dataset's first document in the text's order (stream mode: the text's first non-blank line)."""
    ds = open_dataset(path)
    if ds.mode == "docs":
        bounds = np.asarray(ds.docs[:2])
        return ds.tokenizer.decode(np.asarray(ds.tokens[int(bounds[0]) + 1 : int(bounds[1])]).tolist())
    lines = split_docs(ds.tokenizer.decode(np.asarray(ds.tokens[:4096]).tolist()))
    if not lines:
        raise UserError(f"{path} begins with no non-blank line; pass --doc TEXT")
    return lines[0]


# -- verifying ---------------------------------------------------------------------------------


def verify(path) -> str:
    """Every check, over every byte (`prepare --verify`): a one-line summary, or a UserError naming the first problem."""
    ds = open_dataset(path)
    bos, n_tokens = ds.tokenizer.bos, ds.meta["tokens"]
    found = 0  # BOS matched with docs.bin's entries so far
    for first, ids in ds.tokens.pieces():  # each piece's ids are checked below the vocabulary size as they are read
        at = np.flatnonzero(ids == bos) + first
        if ds.mode == "stream" and len(at):
            raise refused(ds.tokens.path, f"has BOS (id {bos}) at entry {at[0]}, which a stream dataset never has")
        if not len(at):
            continue
        marked = np.asarray(ds.docs[found : found + len(at)], np.int64)  # checked inside tokens.bin and increasing
        if len(marked) < len(at):
            raise refused(ds.tokens.path, f"has a BOS (id {bos}) at entry {at[len(marked)]}, inside a document of {DOCS}")
        wrong = np.flatnonzero(marked != at)
        if len(wrong):
            k = int(wrong[0])
            raise refused(ds.docs.path, f"has {marked[k]} at entry {found + k}, where {TOKENS}'s BOS number {found + k} is at {at[k]}")
        found += len(at)
    if ds.mode == "docs":
        n = ds.meta["docs"]
        if found != n + 1:
            raise refused(ds.docs.path, f"has {n + 1} bounds, where {TOKENS} has {found} BOS")
        check_permutation(ds)
    recorded = ds.meta.get("files")
    for array in ds.files() if recorded is not None else []:
        check_file(array.path, recorded.get(array.path.name), full=True, bound=binding(ds.meta))
    docs = f", {ds.meta['docs']:,} documents between BOS, order.bin a permutation of them" if ds.mode == "docs" else ""
    sums = "every file matches its sha256" if recorded is not None else "no checksums to compare (written before prepare recorded them)"
    return f"{path}: ok: {n_tokens:,} tokens, every id below {ds.tokenizer.size}{docs}; {sums}"
