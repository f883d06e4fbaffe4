"""Documents, the character vocabulary, and batches (spec section 1).

A data file is UTF-8 text with one document per line. The default dataset is
makemore's names.txt: downloaded once from its public address, checked
against its sha256 and cached. No jax here: the scalar engine's command line
reads its data through this module too.
"""

import hashlib
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from microgpt_jax.errors import UserError

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
DATA_ENV = "MICROGPT_JAX_DATA"  # a local file to use instead of the default dataset
CACHE_ENV = "MICROGPT_JAX_CACHE"  # where the downloaded dataset is cached
SPEC_SEED = 42


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "microgpt-jax"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_dataset() -> Path:
    """The names dataset: from the cache if it is there and intact, else downloaded."""
    path = cache_dir() / "names.txt"
    if path.is_file() and _sha256(path) == NAMES_SHA256:
        return path
    offline_fix = f"pass a local copy with --data PATH (or set {DATA_ENV}=PATH)"
    try:
        with urllib.request.urlopen(NAMES_URL, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download the names dataset from {NAMES_URL} ({reason}); {offline_fix}") from None
    if hashlib.sha256(payload).hexdigest() != NAMES_SHA256:
        raise UserError(f"the download from {NAMES_URL} does not match its sha256 {NAMES_SHA256}; {offline_fix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)  # atomic: a half-written cache file never has the final name
    return path


def resolve_data_path(path=None) -> Path:
    """--data if given, else $MICROGPT_JAX_DATA, else the cached names dataset."""
    if path is not None:
        return Path(path)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return default_dataset()


def read_text(path) -> str:
    """The whole file as text, with a one-line error for each way it can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}; pass an existing text file with --data PATH")
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"data file is empty: {path}; pass a text file with one document per line")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"data file {path} is not valid UTF-8 at line {line}; re-encode it as UTF-8") from None


def load_docs(path) -> list[str]:
    """Spec section 1: strip the text, split on newlines, strip each line, drop empty ones."""
    docs = [line.strip() for line in read_text(path).strip().split("\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"data file {path} has no non-blank line; pass a file with one document per line")
    return docs


def spec_docs(path, seed=SPEC_SEED):
    """The seed's documents in the seed's order, and the random stream that continues after the shuffle."""
    rng = random.Random(seed)
    docs = load_docs(path)
    rng.shuffle(docs)
    return docs, rng


@dataclass(frozen=True)
class Vocab:
    """Characters sorted; a character's id is its index; BOS is the last id."""

    chars: str

    @classmethod
    def from_docs(cls, docs):
        return cls("".join(sorted(set("".join(docs)))))

    @property
    def bos(self) -> int:
        return len(self.chars)

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def encode(self, doc: str) -> list[int]:
        """[BOS] + ids + [BOS]."""
        index = {ch: i for i, ch in enumerate(self.chars)}
        return [self.bos] + [index[ch] for ch in doc] + [self.bos]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i != self.bos)


class Batch(NamedTuple):
    """Rows of tokens with everything the loss needs; every array is [..., B, T].

    positions restart at 0 for each document; segments say which document a
    position belongs to (0 = padding), so attention never crosses documents;
    weights hold each position's share of the batch loss: 1 / (n * D) for a
    document of n trained positions in a batch of D documents, 0 for padding.
    The loss is then sum(weights * nll): the mean over documents of each
    document's mean loss, exactly as the spec averages one document.
    """

    tokens: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    weights: np.ndarray


def padded_batch(encoded_docs, block_size) -> Batch:
    """One document per row, cut to block_size trained positions, padding masked out."""
    shape = (len(encoded_docs), block_size)
    tokens, targets, segments = (np.zeros(shape, np.int32) for _ in range(3))
    weights = np.zeros(shape, np.float64)
    for row, enc in enumerate(encoded_docs):
        n = min(block_size, len(enc) - 1)
        tokens[row, :n] = enc[:n]
        targets[row, :n] = enc[1 : n + 1]
        segments[row, :n] = 1
        weights[row, :n] = 1.0 / (n * len(encoded_docs))
    positions = np.broadcast_to(np.arange(block_size, dtype=np.int32), shape).copy()
    return Batch(tokens, targets, positions, segments, weights)


def spec_order_position(step, batch_size, num_docs) -> int:
    """Index of the first document step `step` trains (the data position a checkpoint records)."""
    return step * batch_size % num_docs


def spec_order_batches(encoded_docs, start_step, num_steps, batch_size, block_size) -> Batch:
    """Batches for steps [start_step, start_step + num_steps), stacked on a leading step axis.

    Step s trains documents (s * batch_size + i) % len(docs) for i < batch_size:
    with batch_size 1 that is the spec's docs[s % len(docs)].
    """
    rows = []
    for s in range(start_step, start_step + num_steps):
        first = spec_order_position(s, batch_size, len(encoded_docs))
        idx = [(first + i) % len(encoded_docs) for i in range(batch_size)]
        rows.append(padded_batch([encoded_docs[i] for i in idx], block_size))
    return Batch(*(np.stack(field) for field in zip(*rows)))
