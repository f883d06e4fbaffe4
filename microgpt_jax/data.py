"""A run's training data: its config, the train/validation split, and two sources of batches.

Both sources answer the same few questions: the batches of steps [start,
start + n) (`batches`, a pure function of the steps, so a resumed run sees
the very batches it would have), where a step starts in the data order
(`position`, recorded in checkpoints), the validation set (`eval_set`) and
a one-line description. `DocumentSource`: one document per line, step s
trains documents (s * batch_size + i) % len(train), microgpt's order at
batch 1. `StreamSource`: continuous text, step s trains batch_size windows
of block_size + 1 tokens at offsets drawn from (seed, s).
"""

import warnings
from dataclasses import dataclass

import numpy as np

from microgpt_jax.config import field, fraction, positive, validate
from microgpt_jax.errors import UserError
from microgpt_jax.layout import (
    Batch,
    fill,
    flatten,
    pack,
    packed_batch,
    packed_rows,
    padded_batch,
    step_docs,
    trained_positions,
    windows_batch,
)
from microgpt_jax.text import Vocab, read_text, reference_docs

MODES = ("docs", "stream")  # one document per line, or continuous text cut into windows
LAYOUTS = ("packed", "padded")  # several documents per row, or one


@dataclass(frozen=True)
class DataConfig:
    """What a step trains on and what the validation loss is measured on."""

    mode: str = field("docs", "docs: one document per line; stream: continuous text cut into windows", choices=MODES)
    layout: str = field("packed", "docs mode: several documents per row, or one per row", choices=LAYOUTS)
    val_fraction: float = field(0.1, "the last fraction of the documents or text, held out for validation", check=fraction)
    eval_size: int = field(1024, "most validation documents or windows evaluated", check=positive, resumable=True)

    def __post_init__(self):
        validate(self)


def split(items, val_fraction, what):
    """(train, validation): the last val_fraction of the items (documents or characters) are held out."""
    n_val = int(len(items) * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == len(items)):
        side = "validation" if n_val == 0 else "training"
        raise UserError(
            f"a validation fraction of {val_fraction} of {len(items)} {what} leaves no {what[:-1]} for {side}; "
            "choose a fraction that leaves some on both sides (or 0 for no validation)"
        )
    return items[: len(items) - n_val], items[len(items) - n_val :]


class Source:
    """What both sources share: `rows` per batch (a multiple of the device count), stacking, one step's batch."""

    rows: int

    def batch(self, step) -> Batch:
        """The batch of training step `step` (0-based), as numpy arrays [rows, block_size]."""
        return Batch(*(a[0] for a in self.batches(step, 1, 1)))

    def _stacked(self, found: Batch, num_batches, length) -> Batch:
        """Rows of num_batches batches -> [length, rows, T], the entries past num_batches all padding."""
        T, R = found.tokens.shape[-1], self.rows
        pad = length * R - found.tokens.shape[0]
        return Batch(*(np.concatenate([a, np.zeros((pad, T), a.dtype)]).reshape(length, R, T) for a in found))

    def _eval_stacked(self, whole: Batch) -> Batch:
        return self._stacked(whole, None, -(-whole.tokens.shape[0] // self.rows))


class DocumentSource(Source):
    """Documents, padded (one per row) or packed (several per row); every batch has the same rows."""

    def __init__(self, train, val, dcfg: DataConfig, batch_size, block_size, row_multiple=1):
        self.layout, self.batch_size, self.block_size, self.eval_size = dcfg.layout, batch_size, block_size, dcfg.eval_size
        self.flat, self.starts, lengths = flatten(train)
        self.n = trained_positions(lengths, block_size)
        self.val = val
        rows = packed_rows(self.n, batch_size, block_size) if self.layout == "packed" else batch_size
        self.rows = -(-rows // row_multiple) * row_multiple  # extra rows are padding: weight 0
        self._warned = False

    def describe(self) -> str:
        layout = f"{self.rows} packed rows" if self.layout == "packed" else "padded"
        return f"num docs: {len(self.n)} train, {len(self.val)} validation ({self.batch_size} per step, {layout})"

    def position(self, step) -> int:
        """The index of step `step`'s first document."""
        return int(step_docs(step, self.batch_size, len(self.n))[0])

    def batches(self, start, num_steps, length) -> Batch:
        """Steps [start, start + num_steps) stacked, then all-padding batches up to `length` entries.

        All steps are laid out in one go (one set of numpy calls per chunk,
        not per step): on a CPU the host shares the cores with the step.
        """
        T, B, R = self.block_size, self.batch_size, self.rows
        idx = np.concatenate([step_docs(s, B, len(self.n)) for s in range(start, start + num_steps)])
        n = self.n[idx]
        if self.layout == "padded":
            rows, offsets = np.arange(len(idx)), np.zeros(len(idx), np.int64)
        else:
            placed = [pack(n[i * B : (i + 1) * B], T, R) for i in range(num_steps)]
            rows = np.concatenate([np.where(r < 0, -1, r + i * R) for i, (r, _) in enumerate(placed)])  # rows of the chunk
            offsets = np.concatenate([o for _, o in placed])
            if rows.min() < 0 and not self._warned:
                self._warned = True
                left_out = np.sum(rows < 0)
                message = f"steps {start}-{start + num_steps - 1}: {left_out} documents did not fit in {R} packed rows"
                warnings.warn(message + " and were left out", stacklevel=2)
        found = fill(self.flat, self.starts[idx], n, rows, offsets, num_steps * R, T, np.repeat(np.arange(num_steps), B))
        return self._stacked(found, num_steps, length)

    def eval_set(self) -> Batch | None:
        """At most eval_size validation documents, laid out like training, stacked [E, rows, T]; None without any."""
        if not self.val:
            return None
        docs = self.val[: self.eval_size]
        whole = packed_batch(docs, self.block_size) if self.layout == "packed" else padded_batch(docs, self.block_size)
        return self._eval_stacked(whole)


class StreamSource(Source):
    """Continuous token ids: batch_size windows of block_size + 1 per step, every position trained."""

    def __init__(self, train, val, dcfg: DataConfig, batch_size, block_size, seed):
        for ids, side, fix in ((train, "training", "use a longer text"), (val, "validation", "raise val_fraction")):
            if (side == "training" or len(ids)) and len(ids) < block_size + 1:
                raise UserError(
                    f"the {side} text has {len(ids)} characters, fewer than block_size + 1 = {block_size + 1}; {fix} or lower block_size"
                )
        self.text, self.val_text = train, val
        self.batch_size, self.block_size, self.seed, self.eval_size = batch_size, block_size, seed, dcfg.eval_size
        self.rows = batch_size  # the device count divides it (parallel.check_batch)

    def describe(self) -> str:
        return f"num characters: {len(self.text)} train, {len(self.val_text)} validation (stream, {self.rows} windows per step)"

    def position(self, step) -> int:
        """The step itself: its windows are drawn from (seed, step)."""
        return step

    def batches(self, start, num_steps, length) -> Batch:
        T, B = self.block_size, self.batch_size
        steps = range(start, start + num_steps)
        offsets = [np.random.default_rng([self.seed, s]).integers(0, len(self.text) - T, size=B) for s in steps]
        found = windows_batch(self.text, np.concatenate(offsets), T, B)
        return self._stacked(found, num_steps, length)

    def eval_set(self) -> Batch | None:
        """At most eval_size non-overlapping validation windows, stacked [E, rows, T]; None without any."""
        T = self.block_size
        count = min(self.eval_size, (len(self.val_text) - 1) // T)
        if count <= 0:
            return None
        return self._eval_stacked(windows_batch(self.val_text, np.arange(count) * T, T))


def load_train_data(path, dcfg: DataConfig, batch_size, block_size, seed, row_multiple=1):
    """(vocab, source) for a run: documents or text, the split, the layout.

    Documents are shuffled like microgpt's (random.Random(seed)) and the
    last val_fraction held out; in stream mode the last val_fraction of the
    text is. The vocabulary covers both sides.
    """
    if dcfg.mode == "stream":
        text = read_text(path)
        vocab = Vocab.from_docs([text])
        train, val = split(text, dcfg.val_fraction, "characters")
        return vocab, StreamSource(vocab.ids(train), vocab.ids(val), dcfg, batch_size, block_size, seed)
    docs, _ = reference_docs(path, seed)
    vocab = Vocab.from_docs(docs)
    train, val = split(docs, dcfg.val_fraction, "documents")
    encoded = [vocab.encode(d) for d in train], [vocab.encode(d) for d in val]
    return vocab, DocumentSource(*encoded, dcfg, batch_size, block_size, row_multiple)
