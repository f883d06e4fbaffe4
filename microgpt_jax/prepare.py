"""`microgpt-jax prepare`: a text tokenized once into a dataset directory that training reads step by step.

    DATASET_DIR/
      meta.json    format, version, mode, tokenizer, counts, dtype, split, source (path, sha256, bytes)
      tokens.bin   the token ids, flat, little-endian uint16 (vocabularies up to 65,536 ids) or uint32
      docs.bin     docs mode: uint64 [docs + 1], where each BOS is: document k is tokens[docs[k] + 1 : docs[k + 1]]
      order.bin    docs mode: uint32 (uint64 from 2**32 documents) [docs], the training order, microgpt's
                   shuffle (random.Random(seed).shuffle of the document indices): its first split.train
                   entries are the training documents, the rest the validation ones

In docs mode tokens.bin is BOS doc BOS doc ... BOS, the documents in the
text's order; in stream mode it is the text's tokens, the training side
(the first split.train tokens) then the validation side. With the char
tokenizer a run trains on the very batches it would train on from the text
file itself.

The text is read in chunks of CHUNK bytes, a few times over: to count and
check it (and collect its characters), to train a BPE (when asked), to
write the tokens. Memory: a chunk and what it encodes to, plus in docs mode
4 bytes per document for the shuffle (and 1 more with bpe); never the text.
"""

import array
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.data import DataConfig, DocumentSource, StreamSource, split_point
from microgpt_jax.errors import UserError
from microgpt_jax.jsonfile import check_format, read_json
from microgpt_jax.layout import Docs
from microgpt_jax.text import REFERENCE_SEED, code_points, decode_utf8, no_docs, read_blocks, split_docs, text_sha256
from microgpt_jax.tokenizer import ByteTokenizer, CharTokenizer, from_json, train_bpe

FORMAT = "microgpt-jax dataset"
VERSION = 1
META, TOKENS, DOCS, ORDER = "meta.json", "tokens.bin", "docs.bin", "order.bin"
CHUNK = 4 << 20  # bytes of text read at a time (larger is no faster, and holds more)
ADOPTED = ("mode", "tokenizer", "val_fraction")  # the DataConfig fields a dataset fixes
# A stream chunk ends before a space or newline that follows a printable ASCII character: a cut that
# changes no token of any tokenizer (see tokenizer.SAFE_CUT). Failing one near the end, at a character.
STREAM_CUT = re.compile(rb"(?<=[!-~])(?=[ \n])")
TAIL = 1 << 16  # how far back from a chunk's end a stream cut is looked for


def is_dataset(path) -> bool:
    return Path(path).is_dir()


def data_sha256(path) -> str:
    """What a run records of its data: the text's sha256, or its dataset's meta.json's (which records the text's)."""
    return text_sha256(Path(path) / META) if is_dataset(path) else text_sha256(path)


# -- reading the text in chunks ----------------------------------------------------------------


def _cut(buffer: bytes, mode: str) -> int:
    """Where a chunk of buffer ends: after its last newline (docs), or before its last safe cut (stream).
    0: no place to cut, read more."""
    if mode == "docs":
        return buffer.rfind(b"\n") + 1
    cuts = [m.start() for m in STREAM_CUT.finditer(buffer, max(0, len(buffer) - TAIL))]
    if cuts:
        return cuts[-1]
    end = len(buffer)
    while end and (buffer[end - 1] & 0xC0) == 0x80:  # UTF-8 continuation bytes: back to the character's first
        end -= 1
    return end - 1 if end and buffer[end - 1] >= 0xC0 else end


def chunks(path, mode: str, chunk_bytes=CHUNK, hasher=None):
    """The file's text, chunk after chunk, each cut where _cut says (the last: the rest). hasher: updated
    with every byte."""
    buffer, line = b"", 0
    blocks = read_blocks(path, chunk_bytes)
    while True:
        block = next(blocks, b"")
        if hasher is not None:
            hasher.update(block)
        buffer += block
        end = _cut(buffer, mode) if block else len(buffer)
        if end:
            piece, buffer = buffer[:end], buffer[end:]
            yield decode_utf8(piece, path, line)
            line += piece.count(b"\n")
        if not block:
            return


# -- prepare ---------------------------------------------------------------------------------


def prepare(path, out, dcfg: DataConfig, vocab_size=None, seed=REFERENCE_SEED, chunk_bytes=CHUNK) -> dict:
    """Tokenize the text at path into the new dataset directory out (mode, tokenizer and split from
    dcfg; the documents shuffled with seed); returns its meta.json. out appears whole or not at all."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new directory for --out so nothing is overwritten")
    if vocab_size is not None and dcfg.tokenizer != "bpe":
        raise ConfigError("vocab_size", f"is for --tokenizer bpe; the {dcfg.tokenizer} tokenizer's size comes from the data: drop it")
    read = lambda hasher=None: chunks(path, dcfg.mode, chunk_bytes, hasher)
    source = SourceHash()
    count, seen = scan(read(source), dcfg.mode, dcfg.tokenizer == "char")
    if not count:
        raise no_docs(path) if dcfg.mode == "docs" else UserError(f"data file is empty: {path}; pass a text file")
    unit = "documents" if dcfg.mode == "docs" else "characters"
    n_train = split_point(count, dcfg.val_fraction, unit)
    order = shuffled(count, seed) if dcfg.mode == "docs" else None
    if dcfg.tokenizer == "char":
        tokenizer = CharTokenizer.from_codes(np.flatnonzero(seen))
    elif dcfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = train_bpe(training_texts(read(), dcfg.mode, n_train, order), *([vocab_size] if vocab_size else []))
    dtype = np.dtype("<u2" if tokenizer.size <= 1 << 16 else "<u4")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        if dcfg.mode == "docs":
            tokens, lengths = write_docs(read(), tokenizer, tmp, dtype)
            width = np.dtype("<u4" if count < 1 << 32 else "<u8")
            (tmp / ORDER).write_bytes(np.frombuffer(order, width).tobytes())
            split = {"unit": "documents", "train": n_train, "validation": count - n_train, "seed": seed}
            extra = {"docs": count, "doc_lengths": {"tokens": lengths[0].tolist(), "count": lengths[1].tolist()}}
        else:
            tokens, train_tokens = write_stream(read(), tokenizer, tmp / TOKENS, dtype, n_train)
            split = {"unit": "tokens", "train": train_tokens, "validation": tokens - train_tokens, "train_characters": n_train}
            extra = {}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "mode": dcfg.mode,
            "tokenizer": tokenizer.to_json(),
            "vocab_size": tokenizer.size,
            "bos": tokenizer.bos,
            "dtype": dtype.name,
            "tokens": tokens,
            **extra,
            "split": {"val_fraction": dcfg.val_fraction, **split},
            "source": {"path": str(Path(path).resolve()), "sha256": source.sha.hexdigest(), "bytes": source.bytes},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.rename(out)
    except OSError as e:
        raise UserError(f"could not write the dataset {out} ({e.strerror or e}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


class SourceHash:
    """The sha256 and the size of the text read through it."""

    def __init__(self):
        self.sha, self.bytes = hashlib.sha256(), 0

    def update(self, block):
        self.sha.update(block)
        self.bytes += len(block)


def scan(texts, mode, chars: bool):
    """The first pass: (documents or characters, a mask of the code points that occur in them if chars)."""
    count, seen = 0, np.zeros(0x110000, bool) if chars else None
    for text in texts:
        if mode == "docs":
            docs = split_docs(text)
            count += len(docs)
            text = "".join(docs)
        else:
            count += len(text)
        if chars:
            codes = code_points(text)
            if codes.dtype == np.uint8:  # ASCII: a count of 128 values is quicker than marking each
                seen[:128] |= np.bincount(codes, minlength=128) > 0
            else:
                seen[codes] = True
    return count, seen


def shuffled(count, seed) -> array.array:
    """microgpt's shuffle of count documents: random.Random(seed).shuffle, as text.reference_docs does."""
    width = "<u4" if count < 1 << 32 else "<u8"
    order = array.array("I" if width == "<u4" else "Q")
    order.frombytes(np.arange(count, dtype=width).tobytes())
    random.Random(seed).shuffle(order)
    return order


def training_texts(texts, mode, n_train, order):
    """The training side of the text, piece by piece: the training documents, or the first n_train characters."""
    if mode == "docs":
        validation = np.zeros(len(order), bool)
        validation[np.frombuffer(order, np.uint32 if order.itemsize == 4 else np.uint64)[n_train:]] = True
        first = 0
        for text in texts:
            docs = split_docs(text)
            yield from (d for d, val in zip(docs, validation[first : first + len(docs)]) if not val)
            first += len(docs)
        return
    seen = 0
    for text in texts:
        if seen < n_train:
            yield text[: n_train - seen]
        seen += len(text)


def write_docs(texts, tokenizer, directory, dtype):
    """tokens.bin (BOS doc BOS doc ... BOS) and docs.bin (where each BOS is): (tokens, (lengths, counts))."""
    counts = {}
    with open(directory / TOKENS, "wb") as tokens, open(directory / DOCS, "wb") as bounds:
        tokens.write(np.array([tokenizer.bos], dtype).tobytes())
        bounds.write(np.zeros(1, "<u8").tobytes())
        written, last_bos = 1, 0
        for text in texts:
            docs = split_docs(text)
            if not docs:
                continue
            joined = tokenizer.joined(docs)
            ids = np.empty(len(joined) + 1, dtype)  # the documents, then the BOS after the last
            ids[:-1], ids[-1] = joined, tokenizer.bos
            bos_at = np.flatnonzero(ids == tokenizer.bos) + written
            for length, n in zip(*np.unique(np.diff(bos_at, prepend=last_bos) - 1, return_counts=True)):
                counts[int(length)] = counts.get(int(length), 0) + int(n)
            tokens.write(ids.tobytes())
            bounds.write(bos_at.astype("<u8").tobytes())
            written, last_bos = written + len(ids), int(bos_at[-1])
    lengths = np.array(sorted(counts), np.int64)
    return written, (lengths, np.array([counts[k] for k in lengths.tolist()], np.int64))


def write_stream(texts, tokenizer, path, dtype, n_train):
    """tokens.bin: the training side's tokens, then the validation side's: (tokens, training tokens)."""
    written, train_tokens, seen = 0, 0, 0
    with open(path, "wb") as f:
        for text in texts:
            cut = min(max(n_train - seen, 0), len(text))  # the sides are tokenized apart, as from the text file
            for part, training in ((text[:cut], True), (text[cut:], False)):
                ids = tokenizer.ids(part).astype(dtype)
                f.write(ids.tobytes())
                written += len(ids)
                train_tokens += len(ids) if training else 0
            seen += len(text)
    return written, train_tokens


# -- reading a dataset ---------------------------------------------------------------------


class FileArray:
    """A flat little-endian array in a file, read with os.pread: only the entries asked for are read.

    Not a memory map: a map's pages count as the process's own memory, and
    with large page-cache folios the kernel maps far more of the file than
    was touched (measured: all of a 512 MiB tokens.bin after 10 steps).
    Slicing gives a view; indexing with an array, or spans(), reads.
    """

    GAP = 4096  # bytes: spans closer than this are read in one call

    def __init__(self, path, dtype, count, start=0, fd=None):
        self.path, self.dtype, self.count, self.start = path, np.dtype(dtype), count, start
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        if isinstance(key, slice):
            first, stop, _ = key.indices(self.count)
            return FileArray(self.path, self.dtype, max(0, stop - first), self.start + first, self.fd)
        idx = np.asarray(key)
        local, at = self.spans(idx.ravel(), np.ones(idx.size, np.int64))
        return local[at].reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        return self._read(0, self.count).astype(dtype or self.dtype)

    def _read(self, first, count) -> np.ndarray:
        size = self.dtype.itemsize
        data = os.pread(self.fd, count * size, (self.start + first) * size)
        if len(data) != count * size:
            raise UserError(f"{self.path} ends before its meta.json says; prepare the dataset again")
        return np.frombuffer(data, self.dtype)

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


def _file_array(path, dtype, count) -> FileArray:
    """count entries of dtype in the file at path; a file of another size is a one-line error."""
    size = path.stat().st_size if path.is_file() else None
    if size != count * np.dtype(dtype).itemsize:
        found = "is missing" if size is None else f"has {size} bytes"
        raise UserError(f"{path} {found}, where meta.json says {count} entries of {np.dtype(dtype).name}; prepare the dataset again")
    return FileArray(path, dtype, count)


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
    def n_train(self) -> int:
        return self.meta["split"]["train"]


def open_dataset(path) -> Dataset:
    """The dataset directory at path, its meta.json checked: one line for each way it can be unusable."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise UserError(
            f"{path} is a directory but no dataset (no {META}); pass a text file or a directory written by `microgpt-jax prepare`"
        )
    meta = read_json(meta_file, "prepare the dataset again")

    def bad(key, problem):
        return UserError(f"{meta_file}: {key} {problem}; prepare the dataset again")

    check_format(meta, FORMAT, VERSION, "datasets", bad)
    counts = ["tokens"] + (["docs"] if meta.get("mode") == "docs" else [])
    for key, ok in [("mode", meta.get("mode") in ("docs", "stream")), ("dtype", meta.get("dtype") in ("uint16", "uint32"))] + [
        (key, isinstance(meta.get(key), int) and meta[key] >= 0) for key in counts
    ]:
        if not ok:
            raise bad(key, f"is {meta.get(key)!r}")
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
    tokens = _file_array(path / TOKENS, "<" + ("u2" if meta["dtype"] == "uint16" else "u4"), meta["tokens"])
    if meta["mode"] == "stream":
        return Dataset(path, meta, tokenizer, tokens)
    n = meta["docs"]
    docs = _file_array(path / DOCS, "<u8", n + 1)
    order = _file_array(path / ORDER, "<u4" if n < 1 << 32 else "<u8", n)
    return Dataset(path, meta, tokenizer, tokens, docs, order)


def dataset_fields(dataset: Dataset) -> dict:
    """The DataConfig values the dataset fixes."""
    return {"mode": dataset.meta["mode"], "tokenizer": dataset.tokenizer.kind, "val_fraction": dataset.meta["split"]["val_fraction"]}


def adopt(path, dcfg: DataConfig, given=()) -> DataConfig:
    """dcfg with the dataset's mode, tokenizer and val_fraction, except those in given (typed by the user: checked
    against the dataset when it is loaded)."""
    return dataclasses.replace(dcfg, **{k: v for k, v in dataset_fields(open_dataset(path)).items() if k not in given})


def load_prepared(path, dcfg: DataConfig, batch_size, block_size, seed, row_multiple=1, local_rows=None, vocab_size=None):
    """(tokenizer, source) of a dataset directory: nothing but meta.json is read until a batch asks for its tokens."""
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
    if ds.meta["mode"] == "stream":
        train, val = ds.tokens[: ds.n_train], ds.tokens[ds.n_train :]
        return ds.tokenizer, StreamSource(train, val, dcfg, batch_size, block_size, seed, local_rows)
    train, val = (Docs.separated(ds.tokens, ds.docs, order) for order in (ds.order[: ds.n_train], ds.order[ds.n_train :]))
    lengths = ds.meta.get("doc_lengths", {})
    notes = []
    if seed != ds.meta["split"]["seed"]:
        shuffled_with = ds.meta["split"]["seed"]
        notes.append(f"note: the documents keep the order `prepare` shuffled them in (seed {shuffled_with}); --seed {seed} draws the rest")
    source = DocumentSource(
        train, val, dcfg, batch_size, block_size, row_multiple, local_rows, (lengths.get("tokens", []), lengths.get("count", [])), notes
    )
    return ds.tokenizer, source


def first_document(path) -> str:
    """The dataset's first document in the text's order (stream mode: the text's first non-blank line)."""
    ds = open_dataset(path)
    if ds.meta["mode"] == "docs":
        bounds = np.asarray(ds.docs[:2])
        return ds.tokenizer.decode(np.asarray(ds.tokens[int(bounds[0]) + 1 : int(bounds[1])]).tolist())
    lines = split_docs(ds.tokenizer.decode(np.asarray(ds.tokens[:4096]).tolist()))
    if not lines:
        raise UserError(f"{path} begins with no non-blank line; pass --doc TEXT")
    return lines[0]
