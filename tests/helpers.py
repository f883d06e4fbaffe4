"""What the tests share: paths, the CLI runners, one-line-error checks, microgpt's batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MICROGPT_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))
NAMES = SHARED_DATA / "names.txt"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
# `python -c SLOW_TRAIN ARGS` is `microgpt-jax ARGS` with one step per chunk, 0.3 s each: room to send a signal
SLOW_TRAIN = """
import time
import microgpt_jax.loop as t
run_steps = t.run_steps
def slow(*args, **kwargs):  # 1 step per chunk, 0.3 s each: a long run in miniature
    for out in run_steps(*args, **{**kwargs, "length": 1}):
        time.sleep(0.3)
        yield out
t.run_steps = slow
from microgpt_jax.cli import entry
entry()
"""
TINY = ["--n-embd", "8", "--n-head", "2", "--n-layer", "1", "--block-size", "8"]


def cli(*args, env=None, cwd=ROOT, timeout=600, **kwargs):
    """`python -m microgpt_jax ARGS` in a real process, as a user runs it: a CompletedProcess.

    env: the process's whole environment (default: this one's), PYTHONPATH set to the checkout.
    """
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "microgpt_jax", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_in_process(capsys, *args):
    """The command line in this process (shared compiled programs): (exit code, captured output)."""
    from microgpt_jax.cli import main
    from microgpt_jax.errors import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in args])
    return e.value.code, capsys.readouterr()


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def reference_batches(encoded_docs, start_step, num_steps, batch_size, block_size):
    """Padded batches of steps [start_step, start_step + num_steps), stacked: step s trains
    documents (s * batch_size + i) % len(docs), microgpt's order at batch 1 (DocumentSource)."""
    from microgpt_jax.data import DataConfig, DocumentSource

    dcfg = DataConfig(layout="padded", val_fraction=0.0)
    return DocumentSource(encoded_docs, [], dcfg, batch_size, block_size).batches(start_step, num_steps, num_steps)


def save_run(path, params, configs, tokenizer, data_text):
    """A run directory as `train --out` writes it: run.json (configs, vocabulary, a data file of data_text) and a
    checkpoint of params at step 1."""
    import numpy as np

    from microgpt_jax.rundir import RunDir
    from microgpt_jax.train import TrainState, make_optimizer

    data = path.parent / f"{path.name}-data.txt"
    data.write_text(data_text)
    with RunDir.create(path, configs, tokenizer, data) as run:
        run.store.save(TrainState(params, make_optimizer(configs.train).init(params), np.int32(1)), data_position=0)
    return path


# The model variants of issue 11, each alone: the one table the scalar engine's, the JAX model's and the cross-check's tests use.
MODEL_VARIANTS = {
    "layernorm": dict(norm="layernorm"),
    "gelu": dict(activation="gelu"),
    "relu2": dict(activation="relu2"),
    "rope": dict(pos="rope"),
    "tied": dict(tie_embeddings=True),
    "qk_norm": dict(qk_norm=True),
    "gqa": dict(n_kv_head=1),
    "softcap": dict(logit_softcap=2.0),
    "dropout": dict(dropout=0.3),
    # issue 21's pieces, as GPT-2's and Llama's blocks have them (each alone: tests/test_variants.py's shapes and formulas)
    "gpt2_block": dict(norm="layernorm", norm_gain=True, embed_norm=False, final_norm=True, bias=True, activation="gelu_exact"),
    "llama_block": dict(
        norm_gain=True,
        embed_norm=False,
        final_norm=True,
        mlp="gated",
        activation="silu",
        mlp_hidden=12,
        norm_eps=1e-3,
        pos="rope",
        rope_theta=500.0,
    ),
}


def all_variants(**over) -> dict:
    """Every model variant at once (the last activation of the table), with `over` on top."""
    return {k: v for fields in MODEL_VARIANTS.values() for k, v in fields.items()} | over


def assert_close(got, want, name="", atol=None, rtol=None):
    """|got - want| <= atol + rtol * |want| everywhere, shapes equal: `check`'s comparison and its tolerances by default."""
    from microgpt_jax.check import ATOL, RTOL, compare

    row = compare(name, got, want, ATOL if atol is None else atol, RTOL if rtol is None else rtol)
    assert row.ok, f"{name}: max abs err {row.max_abs:.3e}, max rel err {row.max_rel:.3e}"
