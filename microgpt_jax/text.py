"""Text files and documents (spec section 1): which file (`resolve_data_path`), read in blocks or whole,
hashed, checked as UTF-8; split into documents and shuffled like microgpt; code points. No jax here.

A data file is UTF-8 text with one document per line, plain or gzipped. The
default dataset is makemore's names.txt (github.com/karpathy/makemore, MIT),
shipped with the package as microgpt_jax/datasets/names.txt.gz and checked
against its sha256 whenever it is read: nothing is downloaded.
"""

import gzip
import hashlib
import os
import random
import zlib
from pathlib import Path

import numpy as np

from microgpt_jax.errors import UserError

NAMES_PATH = Path(__file__).resolve().parent / "datasets" / "names.txt.gz"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"  # of the decompressed text
DATA_ENV = "MICROGPT_JAX_DATA"  # a local file to use instead of the default dataset
REFERENCE_SEED = 42
BLOCK = 1 << 20  # bytes read at a time when hashing


def resolve_data_path(path=None) -> Path:
    """--data if given, else $MICROGPT_JAX_DATA, else the names dataset shipped with the package."""
    if path is not None:
        return Path(path)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return NAMES_PATH


BOM = b"\xef\xbb\xbf"


def read_blocks(path, size=BLOCK):
    """The file's bytes, gzip-decompressed for a .gz file, `size` at a time (the last block may be shorter).

    A missing or damaged file is a one-line error; the shipped names
    dataset is checked against its sha256 as it is read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}; pass an existing text file")
    if not path.is_file():  # a directory is seen to (dataset.is_dataset) before this
        raise UserError(f"data file {path} is not a regular file (a pipe or a device?); it is read more than once: save it to a file")
    shipped = hashlib.sha256() if path.resolve() == NAMES_PATH else None
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(len(BOM))  # a byte order mark is no text: dropped, so it becomes no character
            if head != BOM and head:
                if shipped:
                    shipped.update(head)
                yield head
            for block in iter(lambda: f.read(size), b""):
                if shipped:
                    shipped.update(block)
                yield block
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged gzip stream
        raise UserError(f"could not read {path} ({e}); pass an intact file") from None
    if shipped and shipped.hexdigest() != NAMES_SHA256:
        raise UserError(f"the shipped names dataset {path} does not match its sha256 {NAMES_SHA256}; reinstall microgpt-jax")


def text_sha256(path) -> str:
    """sha256 of the file's text (decompressed for a .gz file): what a run records of its data."""
    h = hashlib.sha256()
    for block in read_blocks(path):
        h.update(block)
    return h.hexdigest()


def decode_utf8(raw: bytes, path, line_offset=0) -> str:
    """raw as text; bytes that are not UTF-8 are a one-line error naming the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + raw[: e.start].count(b"\n") + 1
        raise UserError(f"data file {path} is not valid UTF-8 at line {line}; re-encode it as UTF-8") from None


def read_text(path) -> str:
    """The whole file as text, with a one-line error for each way it can be unusable."""
    raw = b"".join(read_blocks(path, -1))  # one block: the file is never held twice
    if not raw:
        raise UserError(f"data file is empty: {path}; pass a text file with one document per line")
    return decode_utf8(raw, path)


def split_docs(text: str) -> list[str]:
    """Spec section 1: split on newlines, strip each line, drop empty ones."""
    return list(filter(None, map(str.strip, text.split("\n"))))  # C loops: this runs over whole corpora


def no_docs(path):
    return UserError(f"data file {path} has no non-blank line; pass a file with one document per line")


def load_docs(path) -> list[str]:
    """The documents of a data file (spec section 1)."""
    docs = split_docs(read_text(path))
    if not docs:
        raise no_docs(path)
    return docs


def reference_docs(path, seed=REFERENCE_SEED):
    """microgpt's documents in microgpt's order, and the random stream that continues after the shuffle."""
    rng = random.Random(seed)
    docs = load_docs(path)
    rng.shuffle(docs)
    return docs, rng


def utf32(text: str) -> np.ndarray:
    """The code points of text, one uint32 each."""
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def code_points(text: str) -> np.ndarray:
    """The code points of text: uint8 for ASCII text (the common case, 4x less to go through), else uint32."""
    return np.frombuffer(text.encode("ascii"), np.uint8) if text.isascii() else utf32(text)
