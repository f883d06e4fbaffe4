"""Tokenizers: char (the seed's), byte and bpe round-trip any text, decode never fails, save and load."""

import json

import numpy as np
import pytest

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.text import load_docs
from microgpt_jax.tokenizer import (
    SAFE_CUT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    check_size,
    from_json,
    make_tokenizer,
    train_bpe,
)

TEXT = "héllo wörld, naïve café\nЗдравствуй мир 世界 🙂 ok\n  spaced   out  \n\tend"


@pytest.fixture(scope="module")
def bpe(names_path):
    return train_bpe(load_docs(names_path) + TEXT.split("\n"), 320)


@pytest.fixture(scope="module")
def tokenizers(bpe):
    return {"char": CharTokenizer.from_docs([TEXT]), "byte": ByteTokenizer(), "bpe": bpe}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_units(tokenizers, kind):
    tokenizer = tokenizers[kind]
    ids = tokenizer.ids(TEXT)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tokenizer.bos and tokenizer.bos == tokenizer.size - 1
    assert tokenizer.decode(ids.tolist()) == TEXT and tokenizer.decode(tokenizer.encode(TEXT)) == TEXT  # BOS skipped
    assert tokenizer.encode("ok") == [tokenizer.bos, *tokenizer.ids("ok").tolist(), tokenizer.bos]
    units = len(TEXT) if tokenizer.unit == "character" else len(TEXT.encode())
    assert tokenizer.unit_lengths()[ids].sum() == units and tokenizer.unit_lengths()[tokenizer.bos] == 0  # bits per character or byte
    docs = ["ab", "café", "世界"] if kind != "char" else ["hé", "w"]
    assert [tokenizer.bos, *tokenizer.joined(docs).tolist(), tokenizer.bos] == [i for d in docs for i in tokenizer.encode(d)[:-1]] + [
        tokenizer.bos
    ]
    assert from_json(json.loads(json.dumps(tokenizer.to_json()))) == tokenizer and tokenizer.kind == kind


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_decoding_never_fails_on_a_cut_character(tokenizers, kind):
    tokenizer = tokenizers[kind]
    text = "世界🙂é"
    ids = tokenizer.ids(text).tolist()
    assert len(ids) > len(text)  # the characters span several ids: most cuts fall inside one
    for cut in range(len(ids) + 1):  # U+FFFD stands in for the cut character
        head, tail = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
        assert text.startswith(head.rstrip("\ufffd")) and text.endswith(tail.lstrip("\ufffd"))
    rng = np.random.default_rng(0)
    for _ in range(20):  # any ids at all: a string, never an exception
        assert isinstance(tokenizer.decode(rng.integers(0, tokenizer.size, 12).tolist()), str)


def test_char_is_the_seeds_vocabulary_and_refuses_unknown_characters():
    tokenizer = CharTokenizer.from_docs(["emma", "olivia"])
    assert (tokenizer.chars, tokenizer.size, tokenizer.bos, tokenizer.kind, tokenizer.unit) == ("aeilmov", 8, 7, "char", "character")
    assert tokenizer.encode("mia") == [7, 4, 2, 0, 7] and tokenizer.unknown("maxé") == ["x", "é"]
    with pytest.raises(UserError, match=r"characters outside the vocabulary \['x'\]"):
        tokenizer.ids("max")


def test_bpe_learns_merges_and_cuts_text_where_nothing_changes(bpe, names_path, shakespeare_path):
    assert bpe.size == 320 and max(bpe.unit_lengths()) > 2  # merged tokens of several bytes
    names = names_path.read_text()
    assert len(bpe.ids(names)) < 0.8 * len(names)  # 63 merges: 0.71
    text = shakespeare_path.read_text()[:60_000]
    whole = np.asarray(bpe.hf.encode(text, add_special_tokens=False).ids)
    assert len(SAFE_CUT.split(text)) > 100 and np.array_equal(bpe.ids(text), whole)  # encoding the parts = encoding the whole


def test_bpe_is_trained_on_text_and_saved_as_json(bpe, names_path):
    docs = load_docs(names_path)
    again = train_bpe(docs[::-1] + TEXT.split("\n")[::-1], 320)  # the order of the training text does not matter
    assert again == bpe and BPETokenizer(bpe.hf_json) == bpe
    short = train_bpe(["abab"], 5000)  # a text with few pairs: fewer ids than asked
    assert short.size < 300 and short.decode(short.encode("abba")) == "abba"
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe(docs, 100)


def test_one_constructor_for_every_kind(bpe):
    assert make_tokenizer("char", ["ba", "c"]) == CharTokenizer("abc")
    assert make_tokenizer("char", ["ba"], chars=["ba", "dc"]) == CharTokenizer("abcd")  # chars: both sides, or the ones scanned
    assert make_tokenizer("byte", ["ba"], 257) == ByteTokenizer()
    assert make_tokenizer("bpe", iter(()), 320, given=bpe) is bpe  # a run's own: not trained again (texts not read)
    trained = make_tokenizer("bpe", ["abab abba"] * 3, 260)
    assert trained.kind == "bpe" and trained.size <= 260 and trained != bpe
    with pytest.raises(ConfigError, match="5 differs from the 4 ids the char tokenizer gives"):
        make_tokenizer("char", ["abc"], 5)


def test_vocab_size_must_match_char_and_byte():
    check_size(ByteTokenizer(), 257)
    check_size(ByteTokenizer(), None)
    with pytest.raises(ConfigError, match="30 differs from the 257 ids the byte tokenizer gives"):
        check_size(ByteTokenizer(), 30)


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"kind": "word"}, "not a tokenizer"),
        ("char", "not a tokenizer"),
        ({"kind": "char", "chars": "ba"}, "distinct characters in sorted order"),
        ({"kind": "bpe", "hf": {"model": 3}}, "not a tokenizer saved by microgpt-jax"),
    ],
)
def test_bad_tokenizer_json_is_one_line(meta, message):
    with pytest.raises(UserError, match=message) as e:
        from_json(meta)
    assert "\n" not in str(e.value)
