"""Documents, vocabulary and batches (spec section 1), and the default dataset's download."""

import hashlib
import io
import random
import urllib.error

import numpy as np
import pytest

import microgpt_jax.text as text
from microgpt_jax.errors import UserError
from microgpt_jax.layout import padded_batch
from microgpt_jax.text import Vocab, load_docs, reference_docs
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
    vocab = Vocab.from_docs(docs)
    assert (vocab.chars, vocab.bos, vocab.size) == ("abcdefghijklmnopqrstuvwxyz", 26, 27)
    assert vocab.encode("abz") == [26, 0, 1, 25, 26]
    assert vocab.decode(vocab.encode("emma")) == "emma"


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


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_default_dataset_downloads_verifies_and_caches(names_path, tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return FakeResponse(names_path.read_bytes())

    monkeypatch.setattr(text.urllib.request, "urlopen", fake_urlopen)
    path = text.default_dataset()
    assert path == tmp_path / "cache" / "names.txt" and path.read_bytes() == names_path.read_bytes()
    assert text.default_dataset() == path and calls == [text.NAMES_URL]  # the second time from the cache


def test_a_corrupt_download_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(text.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"not names\n"))
    with pytest.raises(UserError, match="does not match its sha256.*pass a local copy as the data file"):
        text.default_dataset()
    assert not (tmp_path / "names.txt").exists()


def test_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(text.urllib.request, "urlopen", offline)
    monkeypatch.delenv(text.DATA_ENV, raising=False)
    with pytest.raises(UserError, match="could not download.*pass a local copy as the data file"):
        text.resolve_data_path(None)


def test_data_env_and_flag_take_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(text.DATA_ENV, str(tmp_path / "env.txt"))
    assert text.resolve_data_path(None) == tmp_path / "env.txt"
    assert text.resolve_data_path(tmp_path / "flag.txt") == tmp_path / "flag.txt"
