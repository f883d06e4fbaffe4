"""Test setup: float64 everywhere, and the datasets from ../shared/data."""

import os
import shutil
import tempfile

import jax
import pytest

from tests.helpers import NAMES, SHAKESPEARE

# The cross-checks compare against Python floats: the JAX side must be float64 too.
jax.config.update("jax_enable_x64", True)
# Every command and test reads names from ../shared/data; nothing goes to the network.
os.environ.setdefault("MICROGPT_JAX_DATA", str(NAMES))
# The compiled-program cache of this test session: never the user's. One per test run, made by the process that
# starts it (pytest-xdist's workers inherit it), shared by the workers and the commands they start, removed at the end.
_owner = "MICROGPT_JAX_TEST_CACHE" not in os.environ
if _owner:
    os.environ["MICROGPT_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="microgpt-jax-test-cache-")
os.environ["MICROGPT_JAX_CACHE"] = os.environ["MICROGPT_JAX_TEST_CACHE"]


def pytest_sessionfinish(session):
    if _owner:  # after every worker has finished
        shutil.rmtree(os.environ["MICROGPT_JAX_TEST_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def names_path():
    assert NAMES.is_file(), f"the names dataset is expected at {NAMES} (set MICROGPT_JAX_SHARED_DATA)"
    return NAMES


@pytest.fixture(scope="session")
def shakespeare_path():
    assert SHAKESPEARE.is_file(), f"tinyshakespeare is expected at {SHAKESPEARE}"
    return SHAKESPEARE


@pytest.fixture(scope="session")
def names_docs(names_path):
    """names' documents in the file's order, and their char tokenizer."""
    from microgpt_jax.text import load_docs
    from microgpt_jax.tokenizer import CharTokenizer

    docs = load_docs(names_path)
    return docs, CharTokenizer.from_docs(docs)
