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
import warnings
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

    def ids(self, text: str) -> np.ndarray:
        """The ids of every character of text, no BOS (stream mode)."""
        lut = np.zeros(max(map(ord, self.chars)) + 1, np.int32)
        lut[[ord(ch) for ch in self.chars]] = np.arange(len(self.chars))
        return lut[np.frombuffer(text.encode("utf-32-le"), np.uint32)] if text else np.zeros(0, np.int32)

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


def _flatten(encoded_docs):
    """(all tokens concatenated, where each document starts, each document's length)."""
    lengths = np.array([len(enc) for enc in encoded_docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.concatenate([np.asarray(enc, np.int32) for enc in encoded_docs]) if len(encoded_docs) else np.zeros(0, np.int32)
    return flat, starts, lengths


def trained_positions(lengths, block_size):
    """n = min(block_size, len - 1): how many positions of an encoded document are trained (spec section 4)."""
    return np.minimum(block_size, np.asarray(lengths) - 1)


def _fill(flat, starts, n, rows, offsets, num_rows, block_size, batches=None) -> Batch:
    """Lay documents out in rows: document i's n[i] positions go to row rows[i] from column offsets[i].

    Documents with rows[i] < 0 are left out. Each document gets its own
    segment id within its row and positions 0..n-1, and every document of a
    batch weighs the same in its loss, whatever its length. `batches[i]`
    says which batch document i belongs to (default: all in one), for
    laying out several steps' batches in one go.
    """
    keep = np.flatnonzero(rows >= 0)
    n, rows, offsets, starts = n[keep], rows[keep], offsets[keep], starts[keep]
    batches = np.zeros(len(n), np.int64) if batches is None else np.asarray(batches)[keep]
    shape = (num_rows, block_size)
    tokens, targets, segments = (np.zeros(shape, np.int32) for _ in range(3))
    positions = np.broadcast_to(np.arange(block_size, dtype=np.int32), shape).copy()
    weights = np.zeros(shape, np.float64)
    doc = np.repeat(np.arange(len(n)), n)  # which document each trained position belongs to
    within = np.arange(len(doc)) - np.repeat(np.cumsum(n) - n, n)  # its position inside that document
    r, c, src = rows[doc], offsets[doc] + within, starts[doc] + within
    tokens[r, c] = flat[src]
    targets[r, c] = flat[src + 1]
    positions[r, c] = within
    # a document's segment id: 1 + how many documents sit before it in its row (0 is padding)
    order = np.lexsort((offsets, rows))
    first_in_row = np.searchsorted(rows[order], rows[order])
    seg = np.empty(len(n), np.int32)
    seg[order] = np.arange(len(n)) - first_in_row + 1
    segments[r, c] = seg[doc]
    weights[r, c] = (1.0 / (n * np.bincount(batches)[batches]))[doc]
    return Batch(tokens, targets, positions, segments, weights)


def padded_batch(encoded_docs, block_size) -> Batch:
    """One document per row, cut to block_size trained positions, padding masked out."""
    flat, starts, lengths = _flatten(encoded_docs)
    d = len(encoded_docs)
    return _fill(flat, starts, trained_positions(lengths, block_size), np.arange(d), np.zeros(d, np.int64), d, block_size)


def pack(n, block_size, num_rows=None):
    """Best-fit decreasing: (row, offset) of each document of n[i] positions in rows of block_size.

    Longest documents first, each into the fullest row that still has room
    for it. With num_rows given, a document that fits in no row gets row -1;
    without, a new row is opened for it.
    """
    sizes = np.asarray(n).tolist()
    rows, offsets = [-1] * len(sizes), [0] * len(sizes)
    free = [[] for _ in range(block_size + 1)]  # free[c]: rows with exactly c places left
    free[block_size] = list(range((num_rows or 0) - 1, -1, -1))  # pop() takes the lowest row first
    has_free = (1 << block_size) if num_rows else 0  # bit c set iff free[c] is not empty
    opened = num_rows or 0
    for i in sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True):
        need = sizes[i]
        above = has_free >> need
        if above:
            c = need + (above & -above).bit_length() - 1  # the smallest room that fits
            r = free[c].pop()
            if not free[c]:
                has_free ^= 1 << c
        elif num_rows is None:
            c, r, opened = block_size, opened, opened + 1
        else:
            continue
        rows[i], offsets[i] = r, block_size - c
        if c > need:
            free[c - need].append(r)
            has_free |= 1 << (c - need)
    return np.array(rows, np.int64), np.array(offsets, np.int64)


def packed_batch(encoded_docs, block_size, num_rows=None) -> Batch:
    """Several documents per row, each starting with its BOS at position 0, none seeing another.

    Every document is computed exactly as if it were alone in a padded
    row: same positions, causal attention within its own segment only, the
    same weight in the loss. Without num_rows, as many rows as it takes.
    """
    flat, starts, lengths = _flatten(encoded_docs)
    n = trained_positions(lengths, block_size)
    rows, offsets = pack(n, block_size, num_rows)
    return _fill(flat, starts, n, rows, offsets, num_rows or int(rows.max(initial=-1)) + 1, block_size)


def step_docs(step, batch_size, num_docs):
    """Indices of the documents step `step` trains: (step * batch_size + i) % num_docs, i < batch_size."""
    return (step * batch_size + np.arange(batch_size)) % num_docs


def stack(batches) -> Batch:
    """Batches stacked on a new leading axis."""
    return Batch(*(np.stack(field) for field in zip(*batches)))


# --- training data at scale: splits, layouts, stream windows ---

MODES = ("docs", "stream")  # one document per line, or continuous text cut into windows
LAYOUTS = ("packed", "padded")  # several documents per row, or one


def split(items, val_fraction, what):
    """(train, validation): the last val_fraction of the items (documents or characters) are held out."""
    n_val = int(len(items) * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == len(items)):
        side = "validation" if n_val == 0 else "training"
        raise UserError(
            f"--val-fraction {val_fraction} of {len(items)} {what} leaves no {what[:-1]} for {side}; "
            "choose a fraction that leaves some on both sides (or 0 for no validation)"
        )
    return items[: len(items) - n_val], items[len(items) - n_val :]


def packed_rows(n, batch_size, block_size, samples=64):
    """How many rows of block_size hold any step's batch_size documents, packed.

    The batch shape must not change from step to step (one compiled step),
    so the row count is fixed up front: the most rows best-fit decreasing
    needs over `samples` steps spread across the whole cycle through the
    documents, plus 4% and 2 rows of room. A step whose documents still do
    not fit (not seen on names or tinyshakespeare at any batch size we
    tried) leaves the last ones out, with a warning.
    """
    period = len(n) // np.gcd(len(n), batch_size)
    steps = np.unique(np.linspace(0, period - 1, min(samples, period)).astype(np.int64))
    most = max(int(pack(n[step_docs(s, batch_size, len(n))], block_size)[0].max()) + 1 for s in steps)
    return min(batch_size, int(np.ceil(most * 1.04)) + 2)


class TrainData:
    """A run's data: `batch(step)` is a pure function of the step, and a fixed validation set.

    docs mode: step s trains documents (s * batch_size + i) % len(train),
    the spec's order at batch 1, laid out padded or packed.
    stream mode: step s trains batch_size windows of block_size + 1
    characters at offsets drawn from a generator seeded with (seed, s);
    every position of every window is trained.

    Every batch has the same number of rows, a multiple of row_multiple
    (the device count, so the rows split evenly over the devices).
    """

    def __init__(self, tcfg, block_size, train, val, row_multiple=1):
        self.mode, self.layout = tcfg.mode, tcfg.layout
        self.batch_size, self.block_size, self.seed, self.eval_size = tcfg.batch_size, block_size, tcfg.seed, tcfg.eval_size
        if self.mode == "stream":
            self.text, self.val_text = train, val
            if len(train) < block_size + 1:
                raise UserError(
                    f"the training text has {len(train)} characters, fewer than block_size + 1 = {block_size + 1}; "
                    "use a longer text or a smaller --block-size"
                )
            if len(val) and len(val) < block_size + 1:
                raise UserError(
                    f"the validation text has {len(val)} characters, fewer than block_size + 1 = {block_size + 1}; "
                    "raise --val-fraction or lower --block-size"
                )
            self.rows = self.batch_size
        else:
            self.flat, self.starts, lengths = _flatten(train)
            self.n = trained_positions(lengths, block_size)
            self.val = val
            packed = self.layout == "packed"
            self.rows = packed_rows(self.n, self.batch_size, block_size) if packed else self.batch_size
        self.rows = -(-self.rows // row_multiple) * row_multiple  # extra rows are padding: weight 0
        self._warned = False

    def describe(self) -> str:
        if self.mode == "stream":
            return f"num characters: {len(self.text)} train, {len(self.val_text)} validation (stream, {self.rows} windows per step)"
        layout = f"{self.rows} packed rows" if self.layout == "packed" else "padded"
        return f"num docs: {len(self.n)} train, {len(self.val)} validation ({self.batch_size} per step, {layout})"

    def batch(self, step) -> Batch:
        """The batch of training step `step` (0-based), as numpy arrays [rows, block_size]."""
        return Batch(*(a[0] for a in self.batches(step, 1, 1)))

    def position(self, step) -> int:
        """Where step `step` starts in the data order (a checkpoint records it): the index of its
        first document, or in stream mode the step itself (its windows are drawn from (seed, step))."""
        if self.mode == "stream":
            return step
        return int(step_docs(step, self.batch_size, len(self.n))[0])

    def batches(self, start, num_steps, length) -> Batch:
        """Steps [start, start + num_steps) stacked, then all-padding batches up to `length` entries.

        All steps are laid out in one go (one set of numpy calls per chunk,
        not per step): on a CPU the host shares the cores with the step.
        """
        T, B, R = self.block_size, self.batch_size, self.rows
        steps = range(start, start + num_steps)
        if self.mode == "stream":
            offsets = [np.random.default_rng([self.seed, s]).integers(0, len(self.text) - T, size=B) for s in steps]
            found = windows_batch(self.text, np.concatenate(offsets), T, B)
        else:
            idx = np.concatenate([step_docs(s, B, len(self.n)) for s in steps])
            n = self.n[idx]
            if self.layout == "padded":
                rows, offsets = np.arange(len(idx)), np.zeros(len(idx), np.int64)
            else:
                placed = [pack(n[i * B : (i + 1) * B], T, R) for i in range(num_steps)]
                rows = np.concatenate([np.where(r < 0, -1, r + i * R) for i, (r, _) in enumerate(placed)])  # rows of the chunk
                offsets = np.concatenate([o for _, o in placed])
                if rows.min() < 0 and not self._warned:
                    self._warned = True
                    warnings.warn(f"steps {start}-{start + num_steps - 1}: {np.sum(rows < 0)} documents did not fit in {R} packed rows and were left out")
            found = _fill(self.flat, self.starts[idx], n, rows, offsets, num_steps * R, T, np.repeat(np.arange(num_steps), B))
        return Batch(*(np.concatenate([a, np.zeros(((length - num_steps) * R, T), a.dtype)]).reshape(length, R, T) for a in found))

    def eval_set(self) -> Batch | None:
        """The validation set, stacked [E, rows, block_size]; its loss is the mean over its documents or windows.

        At most eval_size documents (docs mode, packed or padded like
        training) or non-overlapping windows (stream mode); None without a
        validation split.
        """
        T = self.block_size
        if self.mode == "stream":
            count = min(self.eval_size, (len(self.val_text) - 1) // T)
            if count <= 0:
                return None
            whole = windows_batch(self.val_text, np.arange(count) * T, T)
        else:
            if not self.val:
                return None
            docs = self.val[: self.eval_size]
            whole = packed_batch(docs, T) if self.layout == "packed" else padded_batch(docs, T)
        num = -(-whole.tokens.shape[0] // self.rows)  # batches of self.rows rows, the last topped up with padding
        pad = num * self.rows - whole.tokens.shape[0]
        return Batch(*(np.concatenate([a, np.zeros((pad, T), a.dtype)]).reshape(num, self.rows, T) for a in whole))


def windows_batch(ids, offsets, block_size, windows_per_batch=None) -> Batch:
    """One window of block_size + 1 tokens per row from ids at each offset; every position trained.

    Each position weighs 1 / (windows_per_batch * block_size): the mean
    over a batch of that many windows (default: all of them).
    """
    T = block_size
    window = ids[np.asarray(offsets)[:, None] + np.arange(T + 1)]
    shape = window[:, :T].shape
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy()
    weights = np.full(shape, 1.0 / ((windows_per_batch or shape[0]) * T))
    return Batch(window[:, :T], window[:, 1:], positions, np.ones(shape, np.int32), weights)


def load_train_data(path, tcfg, block_size, row_multiple=1):
    """(vocab, TrainData) for a run: documents or text, the split, the layout.

    Documents are shuffled like the seed's (random.Random(seed)) and the
    last val_fraction held out; in stream mode the last val_fraction of the
    text is. The vocabulary covers both sides.
    """
    if tcfg.mode == "stream":
        text = read_text(path)
        vocab = Vocab.from_docs([text])
        train, val = split(text, tcfg.val_fraction, "characters")
        return vocab, TrainData(tcfg, block_size, vocab.ids(train), vocab.ids(val), row_multiple)
    docs, _ = spec_docs(path, tcfg.seed)
    vocab = Vocab.from_docs(docs)
    train, val = split(docs, tcfg.val_fraction, "documents")
    return vocab, TrainData(tcfg, block_size, [vocab.encode(d) for d in train], [vocab.encode(d) for d in val], row_multiple)
