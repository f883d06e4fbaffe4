"""Test setup: float64 everywhere, and the datasets from ../shared/data (never downloaded)."""

import os
import tempfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MICROGPT_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))
NAMES = SHARED_DATA / "names.txt"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

# The cross-checks compare against Python floats: the JAX side must be float64 too.
jax.config.update("jax_enable_x64", True)
# Every command and test reads names from ../shared/data; nothing goes to the network.
os.environ.setdefault("MICROGPT_JAX_DATA", str(NAMES))
# The download cache and the compiled-program cache of this test session: never the user's.
os.environ["MICROGPT_JAX_CACHE"] = tempfile.mkdtemp(prefix="microgpt-jax-test-cache-")


@pytest.fixture(scope="session")
def names_path():
    assert NAMES.is_file(), f"the names dataset is expected at {NAMES} (set MICROGPT_JAX_SHARED_DATA)"
    return NAMES


@pytest.fixture(scope="session")
def shakespeare_path():
    assert SHAKESPEARE.is_file(), f"tinyshakespeare is expected at {SHAKESPEARE}"
    return SHAKESPEARE


def reference_batches(encoded_docs, start_step, num_steps, batch_size, block_size):
    """Padded batches of steps [start_step, start_step + num_steps), stacked: step s trains
    documents (s * batch_size + i) % len(docs), the spec's order at batch 1 (TrainData's docs mode)."""
    from microgpt_jax.data import TrainData
    from microgpt_jax.train import TrainConfig

    tcfg = TrainConfig(steps=start_step + num_steps, batch_size=batch_size, layout="padded", val_fraction=0.0)
    return TrainData(tcfg, block_size, encoded_docs, []).batches(start_step, num_steps, num_steps)
