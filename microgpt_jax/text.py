"""Text files, documents and the character vocabulary (spec section 1). No jax here.

A data file is UTF-8 text with one document per line. The default dataset is
makemore's names.txt: downloaded once from its public address, checked
against its sha256 and cached.
"""

import hashlib
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
DATA_ENV = "MICROGPT_JAX_DATA"  # a local file to use instead of the default dataset
CACHE_ENV = "MICROGPT_JAX_CACHE"  # where the downloaded dataset is cached
REFERENCE_SEED = 42


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
    offline_fix = f"pass a local copy as the data file (or set {DATA_ENV}=PATH)"
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
        raise ConfigError("data", f"file not found: {path}; pass an existing text file")
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


def reference_docs(path, seed=REFERENCE_SEED):
    """microgpt's documents in microgpt's order, and the random stream that continues after the shuffle."""
    rng = random.Random(seed)
    docs = load_docs(path)
    rng.shuffle(docs)
    return docs, rng


def bos_id(vocab_size: int) -> int:
    """BOS (beginning and end of a document) is the last id of a vocabulary: the one place that says so."""
    return vocab_size - 1


@dataclass(frozen=True)
class Vocab:
    """Characters sorted; a character's id is its index; BOS is the last id."""

    chars: str

    @classmethod
    def from_docs(cls, docs):
        return cls("".join(sorted(set("".join(docs)))))

    @property
    def bos(self) -> int:
        return bos_id(self.size)

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def encode(self, doc: str) -> list[int]:
        """[BOS] + ids + [BOS]."""
        index = {ch: i for i, ch in enumerate(self.chars)}
        return [self.bos] + [index[ch] for ch in doc] + [self.bos]

    def ids(self, text: str) -> np.ndarray:
        """The ids of every character of text, no BOS (stream mode)."""
        lut = np.zeros(max(map(ord, self.chars)) + 1, np.int32)
        lut[[ord(ch) for ch in self.chars]] = np.arange(len(self.chars))
        return lut[np.frombuffer(text.encode("utf-32-le"), np.uint32)] if text else np.zeros(0, np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i != self.bos)
