"""A run's training data: its config, the train/validation split, and two sources of batches.

Both sources answer the same few questions: the batches of steps [start,
start + n) (`batches`, a pure function of the steps, so a resumed run sees
the very batches it would have), where a step starts in the data order
(`position`, recorded in checkpoints), the validation set (`eval_set`) and
a one-line description. `DocumentSource`: one document per line, step s
trains documents (s * batch_size + i) % len(train), microgpt's order at
batch 1. `StreamSource`: continuous text, step s trains batch_size windows
of block_size + 1 tokens at offsets drawn from (seed, s).

The data is a text file (read whole, tokenized here) or a dataset
directory written by `microgpt-jax prepare` (dataset.py: read as needed, a
step's rows at a time, each read checked). Either way a process reads the
tokens of its own rows only (`local_rows`).
"""

import warnings
from dataclasses import dataclass

import numpy as np

from microgpt_jax.config import field, fraction, positive, validate
from microgpt_jax.dataset import is_dataset, load_prepared
from microgpt_jax.errors import UserError
from microgpt_jax.layout import (
    Batch,
    Docs,
    fill,
    pack,
    packed_rows,
    step_docs,
    trained_positions,
    windows_batch,
)
from microgpt_jax.text import read_text, reference_docs
from microgpt_jax.tokenizer import KINDS, make_tokenizer

MODES = ("docs", "stream")  # one document per line, or continuous text cut into windows
LAYOUTS = ("packed", "padded")  # several documents per row, or one


@dataclass(frozen=True)
class DataConfig:
    """What a step trains on and what the validation loss is measured on."""

    mode: str = field("docs", "docs: one document per line; stream: continuous text cut into windows", choices=MODES)
    layout: str = field("packed", "docs mode: several documents per row, or one per row", choices=LAYOUTS)
    tokenizer: str = field(
        "char",
        "char: one id per character (the seed's); byte: UTF-8 bytes; bpe: a byte-level BPE trained on the training text "
        "(its size: --vocab-size)",
        choices=KINDS,
        since="0.2",
    )
    val_fraction: float = field(0.1, "the last fraction of the documents or text, held out for validation", check=fraction)
    eval_size: int = field(1024, "most validation documents or windows evaluated", check=positive, resumable=True)

    def __post_init__(self):
        validate(self)

    @property
    def packed(self) -> bool:
        """Whether a row may hold several documents (the model then masks attention by document, not by position alone)."""
        return self.mode == "docs" and self.layout == "packed"


def split(items, val_fraction, what):
    """(train, validation): the last val_fraction of the items (documents or characters) are held out."""
    n_train = split_point(len(items), val_fraction, what)
    return items[:n_train], items[n_train:]


def split_point(count, val_fraction, what) -> int:
    """How many of count items (documents or characters) are for training: all but the last val_fraction."""
    n_val = int(count * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == count):
        side = "validation" if n_val == 0 else "training"
        raise UserError(
            f"a validation fraction of {val_fraction} of {count} {what} leaves no {what[:-1]} for {side}; "
            "choose a fraction that leaves some on both sides (or 0 for no validation)"
        )
    return count - n_val


def row_mask(rows, local_rows=None):
    """The rows a process reads the tokens of: a mask of local_rows(rows) (a slice, parallel.local_rows); None: all."""
    if local_rows is None:
        return None
    mask = np.zeros(rows, bool)
    mask[local_rows(rows)] = True
    return mask


def cut_note(lengths, counts, block_size) -> list[str]:
    """A note, once, when documents are longer than the block: they are cut (lengths: tokens, no BOS)."""
    lengths, counts = np.asarray(lengths, np.int64), np.asarray(counts, np.int64)
    cut = int(counts[lengths + 1 > block_size].sum())
    if not cut:
        return []
    return [
        f"note: {cut:,} of {int(counts.sum()):,} documents are longer than block_size {block_size} and are cut "
        "(their last tokens are not trained); --mode stream trains on all of the text"
    ]


class Source:
    """What both sources share: `rows` per batch (a multiple of the device count), stacking, one step's batch."""

    rows: int
    read_rows = None  # mask of the rows this process reads (None: all)

    def batch(self, step) -> Batch:
        """The batch of training step `step` (0-based), as numpy arrays [rows, block_size]."""
        return Batch(*(a[0] for a in self.batches(step, 1, 1)))

    def notes(self) -> list[str]:
        """Lines worth saying once at the start of a run."""
        return []

    def _read(self, num_rows):
        """The read mask of num_rows rows laid out batch after batch."""
        return None if self.read_rows is None else np.resize(self.read_rows, num_rows)

    def _stacked(self, found: Batch, num_batches, length) -> Batch:
        """Rows of num_batches batches -> [length, rows, T], the entries past num_batches all padding."""
        T, R = found.tokens.shape[-1], self.rows
        pad = length * R - found.tokens.shape[0]
        return Batch(*(np.concatenate([a, np.zeros((pad, T), a.dtype)]).reshape(length, R, T) for a in found))

    def _eval_stacked(self, whole: Batch) -> Batch:
        return self._stacked(whole, None, -(-whole.tokens.shape[0] // self.rows))


class DocumentSource(Source):
    """Documents, padded (one per row) or packed (several per row); every batch has the same rows.

    train, val: `layout.Docs` (or lists of encoded documents), in training order.
    length_counts: (lengths, counts) of every document's tokens, for the
    note on cut documents (default: counted from train and val); notes:
    more lines for notes().
    """

    def __init__(self, train, val, dcfg: DataConfig, batch_size, block_size, row_multiple=1, local_rows=None, length_counts=None, notes=()):
        self.train, self.val = (docs if isinstance(docs, Docs) else Docs.of(docs) for docs in (train, val))
        self.layout, self.batch_size, self.block_size, self.eval_size = dcfg.layout, batch_size, block_size, dcfg.eval_size
        self.length_counts, self._notes = length_counts, list(notes)
        rows = packed_rows(self.trained, len(self.train), batch_size, block_size) if self.layout == "packed" else batch_size
        self.rows = -(-rows // row_multiple) * row_multiple  # extra rows are padding: weight 0
        self.read_rows = row_mask(self.rows, local_rows)
        self._warned = False

    def trained(self, idx):
        """Trained positions of the training documents at idx."""
        return trained_positions(self.train.locate(idx)[1], self.block_size)

    def describe(self) -> str:
        layout = f"{self.rows} packed rows" if self.layout == "packed" else "padded"
        return f"num docs: {len(self.train)} train, {len(self.val)} validation ({self.batch_size} per step, {layout})"

    def notes(self) -> list[str]:
        if self.length_counts is None:
            lengths = np.concatenate([self.train.lengths(), self.val.lengths()]) - 2
            self.length_counts = np.unique(lengths, return_counts=True)
        return self._notes + cut_note(*self.length_counts, self.block_size)

    def position(self, step) -> int:
        """The index of step `step`'s first document."""
        return int(step_docs(step, self.batch_size, len(self.train))[0])

    def batches(self, start, num_steps, length) -> Batch:
        """Steps [start, start + num_steps) stacked, then all-padding batches up to `length` entries.

        All steps are laid out in one go (one set of numpy calls per chunk,
        not per step): on a CPU the host shares the cores with the step.
        """
        T, B, R = self.block_size, self.batch_size, self.rows
        idx = np.concatenate([step_docs(s, B, len(self.train)) for s in range(start, start + num_steps)])
        starts, lengths = self.train.locate(idx)
        n = trained_positions(lengths, T)
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
        batch_of = np.repeat(np.arange(num_steps), B)
        found = fill(self.train.flat, starts, n, rows, offsets, num_steps * R, T, batch_of, self._read(num_steps * R))
        return self._stacked(found, num_steps, length)

    def eval_set(self) -> Batch | None:
        """At most eval_size validation documents, laid out like training, stacked [E, rows, T]; None without any."""
        if not len(self.val):
            return None
        T = self.block_size
        starts, lengths = self.val.locate(np.arange(min(self.eval_size, len(self.val))))
        n = trained_positions(lengths, T)
        rows, offsets = pack(n, T) if self.layout == "packed" else (np.arange(len(n)), np.zeros(len(n), np.int64))
        num_rows = int(rows.max()) + 1
        return self._eval_stacked(fill(self.val.flat, starts, n, rows, offsets, num_rows, T, read_rows=self._read(num_rows)))


class StreamSource(Source):
    """Continuous token ids: batch_size windows of block_size + 1 per step, every position trained."""

    def __init__(self, train, val, dcfg: DataConfig, batch_size, block_size, seed, local_rows=None):
        for ids, side, fix in ((train, "training", "use a longer text"), (val, "validation", "raise val_fraction")):
            if (side == "training" or len(ids)) and len(ids) < block_size + 1:
                raise UserError(
                    f"the {side} text has {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}; {fix} or lower block_size"
                )
        self.text, self.val_text = train, val
        self.batch_size, self.block_size, self.seed, self.eval_size = batch_size, block_size, seed, dcfg.eval_size
        self.rows = batch_size  # the device count divides it (parallel.check_batch)
        self.read_rows = row_mask(self.rows, local_rows)

    def describe(self) -> str:
        return f"num tokens: {len(self.text)} train, {len(self.val_text)} validation (stream, {self.rows} windows per step)"

    def position(self, step) -> int:
        """The step itself: its windows are drawn from (seed, step)."""
        return step

    def batches(self, start, num_steps, length) -> Batch:
        T, B = self.block_size, self.batch_size
        steps = range(start, start + num_steps)
        offsets = [np.random.default_rng([self.seed, s]).integers(0, len(self.text) - T, size=B) for s in steps]
        found = windows_batch(self.text, np.concatenate(offsets), T, B, self._read(num_steps * B))
        return self._stacked(found, num_steps, length)

    def eval_set(self) -> Batch | None:
        """At most eval_size non-overlapping validation windows, stacked [E, rows, T]; None without any."""
        T = self.block_size
        count = min(self.eval_size, (len(self.val_text) - 1) // T)
        if count <= 0:
            return None
        return self._eval_stacked(windows_batch(self.val_text, np.arange(count) * T, T, read_rows=self._read(count)))


class Stacked(Source):
    """The sources of a sweep's members side by side: batches [steps, M, rows, T], eval sets [M, E, rows, T].

    Each member reads its own source (its seed's order and split); a source
    with fewer rows (or eval batches) than the most is padded with rows of
    weight 0, which add exactly nothing to its loss and gradients.
    """

    def __init__(self, sources):
        self.sources = list(sources)
        self.rows = max(s.rows for s in self.sources)

    def describe(self) -> str:
        return f"{self.sources[0].describe()}, for each of {len(self.sources)} members"

    def notes(self) -> list[str]:
        return self.sources[0].notes()

    def position(self, step) -> int:
        return self.sources[0].position(step)  # a step's place in the order is the same for every seed's order

    def batches(self, start, num_steps, length) -> Batch:
        return _stack([s.batches(start, num_steps, length) for s in self.sources], axis=1)

    def eval_set(self) -> Batch | None:
        sets = [s.eval_set() for s in self.sources]
        return None if any(e is None for e in sets) else _stack(sets, axis=0)


def _stack(batches, axis) -> Batch:
    """Batches [..., rows, T] of several members -> one with a member axis at `axis`, padded (weight 0) to the most of each dim."""
    shape = np.max([b.tokens.shape for b in batches], axis=0)

    def pad(a):
        return np.pad(a, [(0, n - k) for n, k in zip(shape, a.shape)])

    return Batch(*(np.stack([pad(a) for a in field], axis=axis) for field in zip(*batches)))


def load_train_data(path, dcfg: DataConfig, batch_size, block_size, seed, row_multiple=1, local_rows=None, vocab_size=None, tokenizer=None):
    """(tokenizer, source) for a run: documents or text, the split, the layout.

    A directory is a prepared dataset (dataset.load_prepared: its own
    tokenizer and split). In a text file, documents are shuffled like
    microgpt's (random.Random(seed)) and the last val_fraction held out; in
    stream mode the last val_fraction of the text's characters is. A char
    vocabulary covers both sides; a BPE is trained on the training side
    (unless `tokenizer`, a run's own, is given). vocab_size: the size asked
    for (--vocab-size), if any. local_rows: parallel.local_rows, where
    several processes each read only their own rows.
    """
    if is_dataset(path):  # nothing but meta.json (and a few checked blocks) is read until a batch asks for its tokens
        ds = load_prepared(path, dcfg, vocab_size)
        if ds.mode == "stream":
            return ds.tokenizer, StreamSource(*ds.sides(), dcfg, batch_size, block_size, seed, local_rows)
        return ds.tokenizer, DocumentSource(
            *ds.sides(), dcfg, batch_size, block_size, row_multiple, local_rows, ds.length_counts(), ds.notes(seed)
        )
    if dcfg.mode == "stream":
        text = read_text(path)
        train, val = split(text, dcfg.val_fraction, "characters")
        tokenizer = make_tokenizer(dcfg.tokenizer, [train], vocab_size, tokenizer, chars=[text])  # chars: both sides
        return tokenizer, StreamSource(tokenizer.ids(train), tokenizer.ids(val), dcfg, batch_size, block_size, seed, local_rows)
    docs, _ = reference_docs(path, seed)
    train, val = split(docs, dcfg.val_fraction, "documents")
    tokenizer = make_tokenizer(dcfg.tokenizer, train, vocab_size, tokenizer, chars=docs)
    sides = [Docs.separated(*separated(tokenizer, side)) for side in (train, val)]
    return tokenizer, DocumentSource(*sides, dcfg, batch_size, block_size, row_multiple, local_rows)


def separated(tokenizer, docs):
    """(flat, bos_at): BOS doc BOS doc ... BOS, and where each BOS is."""
    flat = np.concatenate([[tokenizer.bos], tokenizer.joined(docs), [tokenizer.bos]]).astype(np.int32) if docs else np.zeros(0, np.int32)
    return flat, np.flatnonzero(flat == tokenizer.bos)
