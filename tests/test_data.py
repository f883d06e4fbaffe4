"""Documents, vocabulary and batches (spec section 1), and the default dataset shipped with the package."""

import gzip
import hashlib
import random

import numpy as np
import pytest

import microgpt_jax.text as text
from microgpt_jax.errors import UserError
from microgpt_jax.layout import padded_batch
from microgpt_jax.text import load_docs, reference_docs
from microgpt_jax.tokenizer import CharTokenizer
from tests.helpers import reference_batches


def test_docs_follow_the_spec(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("\n  anna \n\n\t\nbob\n  \n")
    assert load_docs(path) == ["anna", "bob"]


def test_names_dataset_and_vocabulary(names_path):
    assert hashlib.sha256(names_path.read_bytes()).hexdigest() == text.NAMES_SHA256
    docs, rng = reference_docs(names_path)
    expected = load_docs(names_path)
    random.Random(42).shuffle(expected)
    assert docs == expected and len(docs) == 32033
    tokenizer = CharTokenizer.from_docs(docs)
    assert (tokenizer.chars, tokenizer.bos, tokenizer.size) == ("abcdefghijklmnopqrstuvwxyz", 26, 27)
    assert tokenizer.encode("abz") == [26, 0, 1, 25, 26]
    assert tokenizer.decode(tokenizer.encode("emma")) == "emma"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "data file is empty"),
        (b"\n \n\t\n", "has no non-blank line"),
        (b"anna\nbob\nca\xffrl\n", "is not valid UTF-8 at line 3"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_docs(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="^data file not found: .*; pass an existing text file"):
        load_docs(tmp_path / "nope.txt")


def test_padded_batch_weights_average_per_document_then_over_documents():
    encoded = [[5, 0, 1, 5], [5, 2, 5], [5, 0, 1, 2, 3, 4, 0, 1, 5]]  # 3, 2 and (cut) 4 positions
    b = padded_batch(encoded, block_size=4)
    assert b.tokens.shape == (3, 4)
    np.testing.assert_array_equal(b.tokens[0], [5, 0, 1, 0])
    np.testing.assert_array_equal(b.targets[0, :3], [0, 1, 5])
    np.testing.assert_array_equal(b.tokens[2], [5, 0, 1, 2])
    np.testing.assert_array_equal(b.targets[2], [0, 1, 2, 3])
    np.testing.assert_array_equal(b.segments, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(b.weights.sum(axis=1), [1 / 3] * 3)
    np.testing.assert_allclose(b.weights[1], [1 / 6, 1 / 6, 0, 0])


def test_docs_mode_batches_take_docs_in_order():
    encoded = [[9, i, 9] for i in range(5)]
    b = reference_batches(encoded, start_step=3, num_steps=2, batch_size=2, block_size=3)
    assert b.tokens.shape == (2, 2, 3)
    # step 3 trains docs 6 % 5 and 7 % 5, step 4 docs 8 % 5 and 9 % 5
    np.testing.assert_array_equal(b.tokens[:, :, 1], [[1, 2], [3, 4]])


def test_the_names_dataset_ships_with_the_package(names_path, monkeypatch):
    monkeypatch.delenv(text.DATA_ENV, raising=False)
    assert text.resolve_data_path(None) == text.NAMES_PATH and text.NAMES_PATH.is_file()
    assert text.read_text(text.NAMES_PATH) == names_path.read_text()  # makemore's names.txt, byte for byte
    assert text.text_sha256(text.NAMES_PATH) == text.NAMES_SHA256 == text.text_sha256(names_path)


def test_a_damaged_shipped_dataset_is_one_line(names_path, tmp_path, monkeypatch):
    changed = tmp_path / "names.txt.gz"
    changed.write_bytes(gzip.compress(names_path.read_bytes().replace(b"emma", b"emmy"), mtime=0))
    monkeypatch.setattr(text, "NAMES_PATH", changed)
    with pytest.raises(UserError, match="does not match its sha256.*reinstall") as e:
        text.load_docs(changed)
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(changed.read_bytes()[:5000])
    with pytest.raises(UserError, match="could not read .*cut.txt.gz") as cut:
        text.load_docs(truncated)
    assert "\n" not in str(e.value) + str(cut.value)


def test_data_env_and_flag_take_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(text.DATA_ENV, str(tmp_path / "env.txt"))
    assert text.resolve_data_path(None) == tmp_path / "env.txt"
    assert text.resolve_data_path(tmp_path / "flag.txt") == tmp_path / "flag.txt"
