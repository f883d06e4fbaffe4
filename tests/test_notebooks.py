"""The notebooks run top to bottom (a cell that raises fails the test) and are committed without outputs."""

import os

import jax
import jax.numpy as jnp
import nbformat
import pytest
from nbclient import NotebookClient

import reference
from microgpt_jax.layout import Batch
from microgpt_jax.text import reference_docs
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, TrainState, make_optimizer
from tests.helpers import ROOT

NOTEBOOKS = ROOT / "notebooks"
STEPS = 2  # MICROGPT_NB_STEPS for the test runs: enough to exercise every cell
VARIANTS = 2  # MICROGPT_NB_VARIANTS (04's): the baseline and one variant exercise every cell, in one compiled group fewer


def execute(path, names_path, monkeypatch):
    monkeypatch.setenv("MICROGPT_NB_STEPS", str(STEPS))
    monkeypatch.setenv("MICROGPT_NB_VARIANTS", str(VARIANTS))
    monkeypatch.setenv("MICROGPT_JAX_DATA", str(names_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return book


def outputs(book, kind):
    """Every output of one kind: stream text, or the data of display outputs by mime type."""
    found = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


def test_quickstart_runs(names_path, monkeypatch):
    book = execute(NOTEBOOKS / "01_quickstart.ipynb", names_path, monkeypatch)
    text = "".join(outputs(book, "stream"))
    assert f"{STEPS} steps in" in text  # the step count came from the environment
    assert "grad wte" in text and "pass" in text and "FAIL" not in text  # the cross-check table
    assert len(outputs(book, "image/png")) == 2  # the loss curve and the attention heatmaps


def test_computation_graph_runs(names_path, monkeypatch):
    book = execute(NOTEBOOKS / "02_computation_graph.ipynb", names_path, monkeypatch)
    diagrams = [d for d in outputs(book, "text/markdown") if d.startswith("```mermaid")]
    assert len(diagrams) == 4  # microgpt's four diagrams, redrawn
    assert all("classDef" in d for d in diagrams)
    assert "classDef kv_cache fill:#ff9" in diagrams[2] and "classDef optimizer fill:#add8e6" in diagrams[3]
    text = "".join(outputs(book, "stream"))
    for line in seed_lines(names_path, STEPS):  # the scalar steps it measures are microgpt's very steps
        assert line in text
    # the train step donates every leaf of its TrainState (params, optimizer state, step), and reuses each one
    params = {k: jnp.zeros(s) for k, s in reference.param_shapes(reference.Config(vocab_size=27))}
    opt_state = make_optimizer(TrainConfig()).init(params)
    donated = len(params) + len(jax.tree.leaves(opt_state)) + 1
    assert donated == len(jax.tree.leaves(TrainState(params, opt_state, jnp.zeros((), jnp.int32))))
    batch_leaves = len(Batch._fields)
    assert f"{donated} of {donated + batch_leaves} input buffers donated, {donated} reused in place" in text


def seed_lines(names_path, steps):
    """microgpt's first training lines (of its 1000-step run), from the scalar engine."""
    docs, rng = reference_docs(names_path)
    tokenizer = CharTokenizer.from_docs(docs)
    cfg = reference.Config(vocab_size=tokenizer.size)
    state = reference.init_state(cfg, rng)
    adam = reference.Adam(reference.parameters(state), 1000)
    losses = [reference.train_step(state, cfg, adam, s, tokenizer.encode(docs[s])) for s in range(steps)]
    return [f"step {s + 1:4d} / 1000 | loss {loss:.4f}" for s, loss in enumerate(losses)]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


def test_prototype_a_change_runs(names_path, monkeypatch):
    book = execute(NOTEBOOKS / "03_prototype_a_change.ipynb", names_path, monkeypatch)
    text = "".join(outputs(book, "stream"))
    assert "'softplus']" in text  # added to both tables
    assert "grad layer0.mlp_fc1" in text and "after 5 steps wte" in text and "FAIL" not in text  # the cross-check, on softplus
    assert "relu: last training loss" in text and "softplus: last training loss" in text
    assert len(outputs(book, "image/png")) == 1  # the overlaid curves


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [
        "01_quickstart.ipynb",
        "02_computation_graph.ipynb",
        "03_prototype_a_change.ipynb",
        "04_compare_variants.ipynb",
    ]


def test_compare_notebook_runs(names_path, monkeypatch):
    book = execute(NOTEBOOKS / "04_compare_variants.ipynb", names_path, monkeypatch)
    text = "".join(outputs(book, "stream"))
    assert "group 2 of 2: --qk-norm (5 members, one compiled program)" in text and "--pos rope" not in text
    assert "--qk-norm: " in text and "95% t interval" in text
    assert len(outputs(book, "image/png")) == 1  # the bands and the paired differences
