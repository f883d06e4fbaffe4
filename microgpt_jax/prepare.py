"""`microgpt-jax prepare`: a text tokenized once into a dataset directory that training reads step by step.

This module only writes; dataset.py describes the format, and opens, checks
and verifies what is written here.

The text is read in chunks of CHUNK bytes, a few times over: to count and
check it (and collect its characters), to train a BPE (when asked), to
write the tokens. Memory: a chunk and what it encodes to, plus in docs mode
4 bytes per document for the shuffle (and 1 more with bpe); never the text.
The files are then read back once for their checksums.
"""

import array
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.data import DataConfig, split_point
from microgpt_jax.dataset import BOUND, DOCS, FORMAT, META, ORDER, TOKENS, VERSION, binding, file_checksums, meta_checksum
from microgpt_jax.errors import UserError
from microgpt_jax.text import REFERENCE_SEED, code_points, decode_utf8, no_docs, read_blocks, split_docs
from microgpt_jax.tokenizer import make_tokenizer

CHUNK = 4 << 20  # bytes of text read at a time (larger is no faster, and holds more)
# A stream chunk ends before a space or newline that follows a printable ASCII character: a cut that
# changes no token of any tokenizer (see tokenizer.SAFE_CUT). Failing one near the end, at a character.
STREAM_CUT = re.compile(rb"(?<=[!-~])(?=[ \n])")
TAIL = 1 << 16  # how far back from a chunk's end a stream cut is looked for


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
    chars = None if seen is None else ["".join(map(chr, np.flatnonzero(seen)))]  # the characters scanned: no second pass
    tokenizer = make_tokenizer(dcfg.tokenizer, training_texts(read(), dcfg.mode, n_train, order), vocab_size, chars=chars)
    dtype = np.dtype("<u2" if tokenizer.size <= 1 << 16 else "<u4")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")

    def changed():
        return UserError(f"{path} changed while it was read; nothing was written: prepare it again once it stays the same")

    try:
        tmp.mkdir(parents=True)
        written = SourceHash()  # the text as this last pass read it: the first pass's, or the dataset is not one text's
        if dcfg.mode == "docs":
            tokens, lengths = write_docs(read(written), tokenizer, tmp, dtype, changed)
            width = np.dtype("<u4" if count < 1 << 32 else "<u8")
            (tmp / ORDER).write_bytes(np.frombuffer(order, width).tobytes())
            split = {"unit": "documents", "train": n_train, "validation": count - n_train, "seed": seed}
            extra = {"docs": count, "doc_lengths": {"tokens": lengths[0].tolist(), "count": lengths[1].tolist()}}
        else:
            tokens, train_tokens = write_stream(read(written), tokenizer, tmp / TOKENS, dtype, n_train, changed)
            split = {"unit": "tokens", "train": train_tokens, "validation": tokens - train_tokens, "train_characters": n_train}
            extra = {}
        if written.sha.digest() != source.sha.digest():
            raise changed()
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
            "bound": list(BOUND),  # the files' hashes begin with these fields (dataset.binding)
        }
        meta["files"] = {f.name: file_checksums(f, bound=binding(meta)) for f in sorted(tmp.iterdir())}
        meta["checksum"] = meta_checksum(meta)
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


def encoded(encode, text, changed):
    """encode(text); a character outside the vocabulary, which the first pass collected, means the text changed since."""
    try:
        return encode(text)
    except UserError:
        raise changed() from None


def write_docs(texts, tokenizer, directory, dtype, changed):
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
            joined = encoded(tokenizer.joined, docs, changed)
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


def write_stream(texts, tokenizer, path, dtype, n_train, changed):
    """tokens.bin: the training side's tokens, then the validation side's: (tokens, training tokens)."""
    written, train_tokens, seen = 0, 0, 0
    with open(path, "wb") as f:
        for text in texts:
            cut = min(max(n_train - seen, 0), len(text))  # the sides are tokenized apart, as from the text file
            for part, training in ((text[:cut], True), (text[cut:], False)):
                ids = encoded(tokenizer.ids, part, changed).astype(dtype)
                f.write(ids.tobytes())
                written += len(ids)
                train_tokens += len(ids) if training else 0
            seen += len(text)
    return written, train_tokens
