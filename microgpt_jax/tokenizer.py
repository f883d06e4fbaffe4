"""Tokenizers: char (the seed's), byte (UTF-8 bytes) and bpe (byte-level BPE); `make_tokenizer`, the one
constructor of a kind for some data (`check_size` checks --vocab-size against it). No jax here.

Each answers the same questions: `size` ids, the last one BOS (`bos`);
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

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.text import code_points, utf32

KINDS = ("char", "byte", "bpe")
BYTES = 256
BPE_VOCAB_SIZE = 512  # bpe's vocabulary without --vocab-size, BOS included
# Where a text can be cut without changing its BPE ids: before a newline that follows anything but
# whitespace. The pre-tokenizer's pieces never end in whitespace unless they are all whitespace, so a
# piece ends there in the whole text and in each part alike.
SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")


def bos_id(vocab_size: int) -> int:
    """BOS (beginning and end of a document) is the last id of a vocabulary: the one place that says so."""
    return vocab_size - 1


@dataclass(frozen=True)
class CharTokenizer:
    """The char tokenizer (the seed's): characters sorted; a character's id is its index; BOS is the last id."""

    chars: str
    kind: ClassVar[str] = "char"
    unit: ClassVar[str] = "character"  # what one token of text is made of

    @classmethod
    def from_docs(cls, docs):
        return cls("".join(sorted(set("".join(docs)))))

    @property
    def bos(self) -> int:
        return bos_id(self.size)

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def unknown(self, text: str) -> list[str]:
        """The characters of text outside the vocabulary, sorted."""
        return sorted(set(text) - set(self.chars))

    @functools.cached_property
    def _lut(self) -> np.ndarray:
        """Code point -> id, for code points up to 255 at least; those outside the vocabulary -> -1."""
        codes = utf32(self.chars)
        lut = np.full(max(int(codes.max(initial=0)) + 1, 256), -1, np.int32)
        lut[codes] = np.arange(len(codes), dtype=np.int32)
        return lut

    def _map(self, text: str, newline_is_bos=False) -> np.ndarray:
        codes = code_points(text)
        ids = self._lut[codes if codes.dtype == np.uint8 else np.minimum(codes, len(self._lut) - 1)]
        if newline_is_bos:
            ids[codes == 10] = self.bos
        if len(ids) and (ids.min() < 0 or codes.max() >= len(self._lut)):
            raise UserError(f"the text has characters outside the vocabulary {self.unknown(text)}; the vocabulary is {self.chars!r}")
        return ids

    def ids(self, text: str) -> np.ndarray:
        """The ids of every character of text, no BOS (stream mode)."""
        return self._map(text)

    def joined(self, docs) -> np.ndarray:
        """The ids of the documents (lines: no newline inside) with one BOS between consecutive ones, none around them."""
        return self._map("\n".join(docs), newline_is_bos=True)

    def encode(self, doc: str) -> list[int]:
        """[BOS] + ids + [BOS]."""
        return [self.bos, *self.ids(doc).tolist(), self.bos]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i != self.bos)

    def unit_lengths(self) -> np.ndarray:
        """Characters of text each id stands for: 1, and 0 for BOS."""
        return np.append(np.ones(self.size - 1, np.int64), 0)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


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
        hf_vocab = self.hf.get_vocab()
        self.pieces = [b""] * len(hf_vocab)
        for token, i in hf_vocab.items():
            self.pieces[i] = bytes(by_char[c] for c in token)
        self.size = len(hf_vocab) + 1
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


def tokenizer_sha256(tokenizer) -> str:
    """The sha256 of a tokenizer's JSON (canonical): run.json and each checkpoint record it, so a swapped one shows."""
    return hashlib.sha256(json.dumps(tokenizer.to_json(), sort_keys=True).encode()).hexdigest()


def from_json(meta) -> "CharTokenizer | ByteTokenizer | BPETokenizer":
    """A tokenizer from its to_json(); a value that is none is a one-line error."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "char" and isinstance(meta.get("chars"), str):
        chars = meta["chars"]
        if len(set(chars)) != len(chars) or "".join(sorted(chars)) != chars:
            raise UserError("a char tokenizer's chars must be distinct characters in sorted order")
        return CharTokenizer(chars)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(meta.get("hf"), dict):
        return BPETokenizer(json.dumps(meta["hf"]))
    raise UserError(f"not a tokenizer: {str(meta)[:80]!r}; it must be {{'kind': one of {', '.join(KINDS)}, ...}}")


def make_tokenizer(kind, texts=(), vocab_size=None, given=None, chars=None):
    """The tokenizer of kind, its size checked against vocab_size (--vocab-size, if given).

    char: the characters that occur in chars (texts; default: texts);
    byte; bpe: given, if it is a bpe (a run's own), else one trained on
    texts (an iterable of strings, read only here) to vocab_size ids.
    """
    if kind == "char":
        tokenizer = CharTokenizer.from_docs(texts if chars is None else chars)
        if isinstance(given, CharTokenizer) and set(tokenizer.chars) <= set(given.chars):
            tokenizer = given  # a fine-tune on some of the weights' characters: their ids
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif given is not None and given.kind == "bpe":
        tokenizer = given
    else:
        tokenizer = train_bpe(texts, vocab_size or BPE_VOCAB_SIZE)
    check_size(tokenizer, vocab_size)
    return tokenizer


def check_size(tokenizer, requested):
    """A --vocab-size given with char or byte must be the size the data gives; bpe was trained to it (or fewer)."""
    if requested is None or tokenizer.kind == "bpe" or requested == tokenizer.size:
        return
    raise ConfigError(
        "vocab_size",
        f"{requested} differs from the {tokenizer.size} ids the {tokenizer.kind} tokenizer gives this data; "
        "drop it (only --tokenizer bpe trains a vocabulary of a chosen size)",
    )
