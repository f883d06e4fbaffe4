"""Batch layout: documents and windows laid out in rows of block_size positions.

A `Batch` holds everything the loss needs. Documents are laid out one per
row (padded) or several per row (packed, best-fit decreasing), each in its
own segment so attention never crosses documents; stream windows fill a
row each.
"""

from typing import NamedTuple

import numpy as np


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


def flatten(encoded_docs):
    """(all tokens concatenated, where each document starts, each document's length)."""
    lengths = np.array([len(enc) for enc in encoded_docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.concatenate([np.asarray(enc, np.int32) for enc in encoded_docs]) if len(encoded_docs) else np.zeros(0, np.int32)
    return flat, starts, lengths


class Docs:
    """Documents as spans of one flat token array, in training order: what a DocumentSource reads.

    Document k is flat[starts[k] : ends[k] + 1], a BOS at each end; the
    i-th document in training order is k = order[i] (i itself without an
    order). Every array may be a dataset.FileArray: only what a step asks for is read.
    """

    def __init__(self, flat, starts, ends, order=None, bounds=None):
        self.flat, self.starts, self.ends, self.order, self.bounds = flat, starts, ends, order, bounds

    @classmethod
    def of(cls, encoded_docs) -> "Docs":
        """Encoded documents ([BOS] + ids + [BOS] each), in training order."""
        flat, starts, lengths = flatten(encoded_docs)
        return cls(flat, starts, starts + lengths - 1)

    @classmethod
    def separated(cls, flat, bos_at, order=None) -> "Docs":
        """flat = BOS doc BOS doc ... BOS, with bos_at the index of every BOS: neighbours share the BOS between them."""
        return cls(flat, bos_at[:-1], bos_at[1:], order, bounds=bos_at)

    def __len__(self):
        return len(self.starts) if self.order is None else len(self.order)

    def locate(self, idx):
        """(starts, lengths) of the documents at positions idx of the training order."""
        k = np.asarray(idx) if self.order is None else np.asarray(self.order[np.asarray(idx)], np.int64)
        if self.bounds is None:
            starts, ends = np.asarray(self.starts[k], np.int64), np.asarray(self.ends[k], np.int64)
        else:  # a document's two BOS are neighbours in bounds: one read for both
            local, at = read_spans(self.bounds, k, np.full(len(k), 2))
            starts, ends = np.asarray(local[at], np.int64), np.asarray(local[at + 1], np.int64)
        return starts, ends - starts + 1

    def lengths(self):
        """Every document's length, BOS included (reads the whole boundary array)."""
        return np.asarray(self.ends, np.int64) - np.asarray(self.starts, np.int64) + 1


def read_spans(flat, starts, lengths):
    """(local, at): the spans flat[starts[i] : starts[i] + lengths[i]] are local[at[i] : at[i] + lengths[i]].

    An array in memory is its own local copy; a file (dataset.FileArray) reads
    the spans, and nothing else.
    """
    return flat.spans(starts, lengths) if hasattr(flat, "spans") else (flat, np.asarray(starts))


def trained_positions(lengths, block_size):
    """n = min(block_size, len - 1): how many positions of an encoded document are trained (spec section 4)."""
    return np.minimum(block_size, np.asarray(lengths) - 1)


def fill(flat, starts, n, rows, offsets, num_rows, block_size, batches=None, read_rows=None) -> Batch:
    """Lay documents out in rows: document i's n[i] positions go to row rows[i] from column offsets[i].

    Documents with rows[i] < 0 are left out. Each document gets its own
    segment id within its row and positions 0..n-1, and every document of a
    batch weighs the same in its loss, whatever its length. `batches[i]`
    says which batch document i belongs to (default: all in one), for
    laying out several steps' batches in one go. read_rows: a mask of the
    rows whose tokens are read from flat (default all; the others keep
    token 0, with their positions, segments and weights).
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
    r, c = rows[doc], offsets[doc] + within
    read = np.ones(len(n), bool) if read_rows is None else np.asarray(read_rows)[rows]
    local, at = read_spans(flat, starts[read], n[read] + 1)  # each document read: its positions and last target
    first = np.zeros(len(n), np.int64)
    first[read] = at
    mine = read[doc]
    src = first[doc[mine]] + within[mine]
    tokens[r[mine], c[mine]] = local[src]
    targets[r[mine], c[mine]] = local[src + 1]
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
    flat, starts, lengths = flatten(encoded_docs)
    d = len(encoded_docs)
    return fill(flat, starts, trained_positions(lengths, block_size), np.arange(d), np.zeros(d, np.int64), d, block_size)


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
    flat, starts, lengths = flatten(encoded_docs)
    n = trained_positions(lengths, block_size)
    rows, offsets = pack(n, block_size, num_rows)
    return fill(flat, starts, n, rows, offsets, num_rows or int(rows.max(initial=-1)) + 1, block_size)


def step_docs(step, batch_size, num_docs):
    """Indices of the documents step `step` trains: (step * batch_size + i) % num_docs, i < batch_size."""
    return (step * batch_size + np.arange(batch_size)) % num_docs


def packed_rows(n_of, num_docs, batch_size, block_size, samples=64):
    """How many rows of block_size hold any step's batch_size documents, packed.

    The batch shape must not change from step to step (one compiled step),
    so the row count is fixed up front: the most rows best-fit decreasing
    needs over `samples` steps spread across the whole cycle through the
    documents, plus 4% and 2 rows of room. A step whose documents still do
    not fit (not seen on names or tinyshakespeare at any batch size we
    tried) leaves the last ones out, with a warning. n_of(idx): the trained
    positions of the documents at positions idx of num_docs.
    """
    period = num_docs // np.gcd(num_docs, batch_size)
    steps = np.unique(np.linspace(0, period - 1, min(samples, period)).astype(np.int64))
    most = max(int(pack(n_of(step_docs(s, batch_size, num_docs)), block_size)[0].max()) + 1 for s in steps)
    return min(batch_size, int(np.ceil(most * 1.04)) + 2)


def windows_batch(ids, offsets, block_size, windows_per_batch=None, read_rows=None) -> Batch:
    """One window of block_size + 1 tokens per row from ids at each offset; every position trained.

    Each position weighs 1 / (windows_per_batch * block_size): the mean
    over a batch of that many windows (default: all of them). read_rows: a
    mask of the rows read from ids (default all; the others hold token 0).
    """
    T = block_size
    offsets = np.asarray(offsets)
    read = np.ones(len(offsets), bool) if read_rows is None else np.asarray(read_rows)
    window = np.zeros((len(offsets), T + 1), np.int32)
    local, at = read_spans(ids, offsets[read], np.full(int(read.sum()), T + 1))
    window[read] = local[at[:, None] + np.arange(T + 1)]
    shape = window[:, :T].shape
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy()
    weights = np.full(shape, 1.0 / ((windows_per_batch or shape[0]) * T))
    return Batch(window[:, :T], window[:, 1:], positions, np.ones(shape, np.int32), weights)
