"""Config files, fine-tuning from another run's weights, extending a run, and RUN_DIR@STEP."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from microgpt_jax import cli, hf, loop, memory, train
from microgpt_jax.rundir import SCHEDULE_RULE, RunConfig, RunDir, load_weights
from tests.helpers import ROOT, TINY, assert_one_line_error, run_in_process

FLAGS = [*TINY, "--steps", "6", "--batch-size", "2", "--save-every", "2", "--log-every", "2", "--eval-every", "2"]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4, 6 (tests copy it)."""
    run_dir = tmp_path_factory.mktemp("configs") / "run"
    cli.main(["train", *FLAGS, "--out", str(run_dir)])
    return run_dir


def printed_config(capsys, *args):
    code, out = run_in_process(capsys, "train", *args, "--print-config")
    assert code == 0, out.err
    return out.out


# -- config files -----------------------------------------------------------------------------


def test_a_config_file_with_flags_over_it(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_embd = 32\nn_head = 8\n[train]\nlr = 0.02\nsteps = 50\n[data]\nmode = "stream"\n')
    text = printed_config(capsys, "--config", path, "--lr", "0.005", "--data", path, "--tokenizer", "bpe", "--vocab-size", "300")
    assert "n_embd = 32" in text and "n_head = 8" in text and "steps = 50" in text and 'mode = "stream"' in text
    assert "lr = 0.005" in text  # the flag wins over the file
    assert f"path = {json.dumps(str(path))}" in text and "vocab_size = 300" in text  # the run's data and bpe size, too
    again = tmp_path / "again.toml"
    again.write_text(text)  # what --print-config prints is a config file that resolves to itself
    assert printed_config(capsys, "--config", again) == text


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[train]\nlr_max = 1\n", "[train] has no key 'lr_max' (its keys: steps,"),
        ("[optim]\nlr = 1\n", "unknown table [optim]; the tables are [model], [train], [data], [checkpoint]"),
        ("[model]\nvocab_size = 30\n", "[model] vocab_size 30 differs from the 27 ids the char tokenizer gives"),  # no flag blamed
        ("[data]\npath = 3\n", "[data] path must be a str, got 3"),
        ("[checkpoint]\nkeep = 0\n", "[checkpoint] keep must be positive, got 0"),
        ('[train]\nsteps = "ten"\n', "[train] steps must be an integer, got 'ten'"),
        ("[train\nlr = 1\n", "is not valid TOML"),
        ("lr = 1\n", "lr is outside any table; put it below [train]"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_table_and_key(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code, out = run_in_process(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert_one_line_error(code, out.err, str(path), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_ready_config_files_load(path):
    tables = RunConfig.read_toml(path)
    configs = RunConfig.of(tables)
    assert tables and all(getattr(getattr(configs, t), key) == value for t in tables for key, value in tables[t].items())
    if path.name == "microgpt.toml":  # microgpt's own run is every default
        assert configs == RunConfig()
    if path.name == "nanogpt-cpu.toml":  # nanoGPT's CPU recipe shape
        model, tcfg = configs.model, configs.train
        shape = (model.n_layer, model.n_head, model.n_embd, model.block_size, tcfg.batch_size, tcfg.steps)
        assert shape == (4, 4, 128, 64, 12, 2000) and configs.data.mode == "stream"
    arch = {"gpt2-arch.toml": "GPT2LMHeadModel", "gpt2-small.toml": "GPT2LMHeadModel", "llama-arch.toml": "LlamaForCausalLM"}
    if path.name in arch:  # exactly that architecture: every field it fixes (hf.FIXED), so it exports as one
        assert hf.architecture(configs.model) == arch[path.name]
    if path.name == "gpt2-small.toml":  # GPT-2 small's own parameter count, with its vocabulary
        assert memory.num_params(dataclasses.replace(configs.model, vocab_size=50257)) == 124_439_808


def test_the_shakespeare_config_trains(tmp_path, capsys, shakespeare_path):
    run_dir = tmp_path / "run"
    code, out = run_in_process(
        capsys, "train", "--config", ROOT / "configs" / "nanogpt-cpu.toml", "--data", shakespeare_path,
        "--steps", "4", "--warmup", "1", "--eval-size", "4", "--out", run_dir,
    )  # fmt: skip
    assert code == 0, out.err
    assert json.loads((run_dir / "run.json").read_text())["model"]["n_embd"] == 128


# -- fine-tuning: a new run from another run's weights --------------------------------------------


def test_init_from_a_checkpoint_starts_a_new_run_from_its_weights(tmp_path, capsys, finished, names_path):
    from microgpt_jax.session import Session

    weights = load_weights(f"{finished}@4")
    assert weights.origin == {"run": str(finished.resolve()), "step": 4}
    configs = RunConfig(model=weights.cfg, train=train.TrainConfig(steps=3, lr=0.001))
    state = Session(configs, names_path).state_from(weights)
    assert int(state.step) == 0  # a fresh optimizer and schedule
    assert all(np.array_equal(state.params[k], weights.params[k]) for k in weights.params)
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))  # Adam's moments and count at zero

    new = tmp_path / "new"
    code, out = run_in_process(capsys, "train", "--init-from", f"{finished}@4", "--steps", "3", "--lr", "0.001", "--out", new)
    assert code == 0, out.err
    meta = json.loads((new / "run.json").read_text())
    assert meta["init_from"] == {"run": str(finished.resolve()), "step": 4}
    assert meta["model"] == json.loads((finished / "run.json").read_text())["model"] and meta["train"]["steps"] == 3


def test_init_from_refuses_another_model_or_another_vocabulary(tmp_path, capsys, finished, shakespeare_path):
    code, out = run_in_process(capsys, "train", "--init-from", finished, "--n-embd", "16", "--out", tmp_path / "a")
    assert_one_line_error(code, out.err, "--n-embd 16 differs from the model of --init-from", "(8)")
    code, out = run_in_process(capsys, "train", "--init-from", finished, "--data", shakespeare_path, "--out", tmp_path / "b")
    assert_one_line_error(code, out.err, "the data has 38 characters the weights of", "fine-tune on data within their 26 characters")
    code, out = run_in_process(capsys, "train", "--init-from", f"{finished}@5", "--out", tmp_path / "c")
    assert_one_line_error(code, out.err, "has no checkpoint 5 (its checkpoints: 2, 4, 6)")
    assert not any((tmp_path / name).exists() for name in "abc")


# -- extending a run ---------------------------------------------------------------------------------


def test_an_extended_run_equals_a_run_planned_for_the_new_steps_from_there(tmp_path, capsys, finished, names_path):
    from microgpt_jax.session import Session

    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    code, out = run_in_process(capsys, "train", "--resume", run_dir, "--steps", "10")
    assert code == 0, out.err
    assert "extending it from 6 to 10 steps" in out.out
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["train"]["steps"] == 10
    assert meta["extensions"] == [{"at_step": 6, "from_steps": 6, "to_steps": 10, "schedule": SCHEDULE_RULE}]
    extended = RunDir.open(run_dir).store.restore()

    # the same state at step 6, trained on by a run planned for 10 steps: the rule, bit for bit
    run = RunDir.open(finished)
    configs = run.configs.replace(train=dataclasses.replace(run.tcfg, steps=10))
    session = Session(configs, names_path)
    planned = loop.fit(session.trainer, session.trainer.replicate(run.store.restore().state), session.data)
    assert extended.step == int(planned.step) == 10
    assert all(np.array_equal(extended.params[k], planned.params[k]) for k in planned.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(extended.state.opt_state), jax.tree.leaves(planned.opt_state)))


def test_a_run_cannot_be_shortened(capsys, finished):
    code, out = run_in_process(capsys, "train", "--resume", finished, "--steps", "4")
    assert_one_line_error(code, out.err, "--steps 4 differs from the run's 6")


# -- RUN_DIR@STEP and exported files -------------------------------------------------------------------


def test_sample_export_and_check_take_a_step_or_an_export(tmp_path, capsys, finished):
    samples = {}
    for spec in (finished, f"{finished}@6", f"{finished}@2"):
        code, out = run_in_process(capsys, "sample", spec, "--num-samples", "4", "--json")
        assert code == 0, out.err
        samples[str(spec)] = [json.loads(line) for line in out.out.splitlines()]
    assert samples[str(finished)] == samples[f"{finished}@6"] != samples[f"{finished}@2"]

    exported = tmp_path / "two.safetensors"
    code, out = run_in_process(capsys, "export", f"{finished}@2", exported)
    assert code == 0 and "step 2" in out.out, out.err
    code, out = run_in_process(capsys, "sample", exported, "--num-samples", "4", "--json")
    assert code == 0, out.err
    assert [json.loads(line) for line in out.out.splitlines()] == samples[f"{finished}@2"]

    code, out = run_in_process(capsys, "check", f"{finished}@4", "--steps", "2")
    assert code == 0 and "failed" in out.out, out.err
    code, out = run_in_process(capsys, "check", exported, "--doc", "anna", "--steps", "2")
    assert code == 0, out.err
    code, out = run_in_process(capsys, "sample", f"{finished}@3")
    assert_one_line_error(code, out.err, "has no checkpoint 3 (its checkpoints: 2, 4, 6)")
