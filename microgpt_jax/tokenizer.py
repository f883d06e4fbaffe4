"""Tokenizers: char (the seed's, text.Vocab), byte (UTF-8 bytes) and bpe (byte-level BPE). No jax here.

Each answers as text.Vocab does: `size` ids, the last one BOS (`bos`);
`encode(doc)` is [BOS] + ids + [BOS]; `ids(text)` the ids of a text, no
BOS; `joined(docs)` the ids of documents with a BOS between consecutive
ones; `decode(ids)` the text, BOS skipped, never failing on a cut UTF-8
sequence (U+FFFD stands in for it); `unit` ("character" or "byte") and
`unit_lengths()` (how many of them each id stands for, 0 for BOS); `unknown(text)`
(characters it cannot encode: only char has any); `to_json()`, read back
by `from_json`.

bpe is trained with the Hugging Face `tokenizers` library on the training
text: GPT-2's byte-level pre-tokenizer (text split into words, spaces and
punctuation, each as UTF-8 bytes), then merges up to the vocabulary size.
"""

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.text import Vocab, bos_id

KINDS = ("char", "byte", "bpe")
BYTES = 256
BPE_VOCAB_SIZE = 512  # bpe's vocabulary without --vocab-size, BOS included
# Where a text can be cut without changing its BPE ids: before a newline that follows anything but
# whitespace. The pre-tokenizer's pieces never end in whitespace unless they are all whitespace, so a
# piece ends there in the whole text and in each part alike.
SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")


def _decode_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes: ids 0-255, BOS 256. Nothing to train; any text encodes."""

    kind: ClassVar[str] = "byte"
    unit: ClassVar[str] = "byte"
    size: ClassVar[int] = BYTES + 1
    bos: ClassVar[int] = bos_id(BYTES + 1)

    def ids(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def joined(self, docs) -> np.ndarray:
        ids = self.ids("\n".join(docs))
        ids[ids == 10] = self.bos  # documents hold no newline: each one is a separator
        return ids

    def encode(self, doc: str) -> list[int]:
        return [self.bos, *self.ids(doc).tolist(), self.bos]

    def decode(self, ids) -> str:
        return _decode_bytes(bytes(int(i) for i in ids if i != self.bos))

    def unit_lengths(self) -> np.ndarray:
        return np.append(np.ones(BYTES, np.int64), 0)

    def unknown(self, text: str) -> list[str]:
        return []

    def to_json(self) -> dict:
        return {"kind": self.kind}


def byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte -> the byte.

    Printable Latin-1 bytes stand for themselves; the others, in order, for 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(BYTES) if b not in printable]
    return {chr(b): b for b in printable} | {chr(BYTES + i): b for i, b in enumerate(others)}


class BPETokenizer:
    """A byte-level BPE (Hugging Face `tokenizers`): its ids, then BOS."""

    kind = "bpe"
    unit = "byte"

    def __init__(self, hf_json: str):
        from tokenizers import Tokenizer

        try:
            self.hf = Tokenizer.from_str(hf_json)
        except Exception as e:  # the library raises its own exception types for a bad file
            raise UserError(f"not a tokenizer saved by microgpt-jax ({str(e).splitlines()[0]}); prepare or train again") from None
        self.hf_json = self.hf.to_str()  # the library's own serialization: equal tokenizers, equal strings
        by_char = byte_chars()
        vocab = self.hf.get_vocab()
        self.pieces = [b""] * len(vocab)
        for token, i in vocab.items():
            self.pieces[i] = bytes(by_char[c] for c in token)
        self.size = len(vocab) + 1
        self.bos = bos_id(self.size)

    def __eq__(self, other):
        return isinstance(other, BPETokenizer) and other.hf_json == self.hf_json

    def __hash__(self):
        return hash(self.hf_json)

    def _encode(self, texts) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def ids(self, text: str) -> np.ndarray:
        """The text cut where cutting changes nothing (SAFE_CUT), the parts encoded in parallel."""
        parts = SAFE_CUT.split(text) if text else []
        return np.concatenate([np.zeros(0, np.int32), *self._encode(parts)])

    def joined(self, docs) -> np.ndarray:
        encoded = self._encode(list(docs))
        if not encoded:
            return np.zeros(0, np.int32)
        bos = np.full(1, self.bos, np.int32)
        return np.concatenate([x for e in encoded for x in (bos, e)][1:])

    def encode(self, doc: str) -> list[int]:
        return [self.bos, *self.ids(doc).tolist(), self.bos]

    def decode(self, ids) -> str:
        return _decode_bytes(b"".join(self.pieces[int(i)] for i in ids if i != self.bos))

    def unit_lengths(self) -> np.ndarray:
        return np.array([len(p) for p in self.pieces] + [0], np.int64)

    def unknown(self, text: str) -> list[str]:
        return []

    def to_json(self) -> dict:
        return {"kind": self.kind, "hf": json.loads(self.hf_json)}


def train_bpe(texts, vocab_size=BPE_VOCAB_SIZE) -> BPETokenizer:
    """A byte-level BPE of vocab_size ids (BOS included) trained on texts (an iterable of strings, read once).

    Fewer ids where the text has no more pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTES + 1:
        raise ConfigError("vocab_size", f"must be at least {BYTES + 1} for bpe (every byte, and BOS), got {vocab_size}")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=alphabet, show_progress=False, special_tokens=[])
    hf.train_from_iterator(texts, trainer)
    return BPETokenizer(hf.to_str())


def from_json(meta) -> "Vocab | ByteTokenizer | BPETokenizer":
    """A tokenizer from its to_json(); a value that is none is a one-line error."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "char" and isinstance(meta.get("chars"), str):
        chars = meta["chars"]
        if len(set(chars)) != len(chars) or "".join(sorted(chars)) != chars:
            raise UserError("a char tokenizer's chars must be distinct characters in sorted order")
        return Vocab(chars)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(meta.get("hf"), dict):
        return BPETokenizer(json.dumps(meta["hf"]))
    raise UserError(f"not a tokenizer: {str(meta)[:80]!r}; it must be {{'kind': one of {', '.join(KINDS)}, ...}}")


def check_size(tokenizer, requested):
    """A --vocab-size given with char or byte must be the size the data gives; bpe was trained to it (or fewer)."""
    if requested is None or tokenizer.kind == "bpe" or requested == tokenizer.size:
        return
    raise ConfigError(
        "vocab_size",
        f"{requested} differs from the {tokenizer.size} ids the {tokenizer.kind} tokenizer gives this data; "
        "drop it (only --tokenizer bpe trains a vocabulary of a chosen size)",
    )
