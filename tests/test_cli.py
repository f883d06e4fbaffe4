"""The command line: bad input is one line on stderr, a non-zero exit and no traceback."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from microgpt_jax.cli import main
from microgpt_jax.commands import COMMANDS
from tests.helpers import ROOT, assert_one_line_error, cli, run_in_process


@pytest.fixture
def bad_files(tmp_path):
    files = {
        "empty": b"",
        "blank": b"\n   \n\n",
        "latin1": "anna\nzoë\n".encode("latin-1"),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return tmp_path


def test_missing_data_file_as_a_real_process(tmp_path):
    out = cli("train", "--steps", "1", "--data", str(tmp_path / "missing.txt"))
    assert_one_line_error(out.returncode, out.stderr, "data file not found", "missing.txt")


def test_bad_model_config_as_a_real_process():
    out = cli("train", "--n-embd", "10", "--n-head", "4")
    assert_one_line_error(out.returncode, out.stderr, "--n-embd (10) must be divisible by n_head (4)")


@pytest.mark.parametrize(
    "name,fragment",
    [("empty", "data file is empty"), ("blank", "no non-blank line"), ("latin1", "not valid UTF-8 at line 2")],
)
@pytest.mark.parametrize("command", ["train", "check", "reproduce"])
def test_bad_data_files(capsys, bad_files, name, fragment, command):
    code, out = run_in_process(capsys, command, "--data", str(bad_files / name))
    assert_one_line_error(code, out.err, fragment)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--steps", "0"], "--steps must be positive, got 0"),
        (["train", "--steps", "-3"], "--steps must be positive, got -3"),
        (["train", "--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["train", "--n-layer", "0"], "--n-layer must be positive, got 0"),
        (["train", "--n-embd", "-16"], "--n-embd must be positive, got -16"),
        (["train", "--block-size", "0"], "--block-size must be positive, got 0"),
        (["train", "--n-head", "3"], "--n-embd (16) must be divisible by n_head (3)"),
        (["train", "--steps", "ten"], "invalid int value"),
        (["check", "--n-head", "5"], "--n-embd (16) must be divisible by n_head (5)"),
        (["check", "--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["reproduce", "--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["sample", "/nonexistent/run"], "is not a run directory"),
    ],
)
def test_bad_flags(capsys, args, fragment):
    code, out = run_in_process(capsys, *args)
    assert_one_line_error(code, out.err, fragment)


def test_the_scalar_engines_command_checks_its_input_too(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, fragment in [(["--data", str(tmp_path / "empty.txt")], "data file is empty"), (["--steps", "0"], "positive")]:
        out = subprocess.run([sys.executable, "-m", "reference", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert_one_line_error(out.returncode, out.stderr, fragment)


def test_check_prints_a_table_and_passes(capsys):
    code, out = run_in_process(capsys, "check", "--steps", "2", "--doc", "emma")
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert lines[2].split()[:5] == ["parameter", "max", "abs", "err", "max"]
    names = [line.rsplit(None, 3)[0] for line in lines[3:-1]]
    assert {"logits", "loss", "grad wte", "grad layer0.mlp_fc2", "train losses", "after 2 steps wpe"} <= set(names)
    assert all(line.rstrip().endswith("pass") for line in lines[3:-1])
    assert lines[-1] == f"{len(lines) - 4} passed, 0 failed"


def test_check_takes_every_variant_flag(capsys):
    flags = "--pos rope --tie-embeddings --n-kv-head 2 --dropout 0.2 --batch-size 2 --grad-accum 2 --schedule cosine --grad-clip 0.1"
    code, out = run_in_process(capsys, "check", "--steps", "2", "--n-embd", "8", *flags.split())
    assert code == 0, out.err
    config, training = (json.loads(line.split(": ", 1)[1].split("  first document")[0]) for line in out.out.splitlines()[:2])
    assert (config["pos"], config["tie_embeddings"], config["n_kv_head"], config["dropout"]) == ("rope", True, 2, 0.2)
    assert (training["batch_size"], training["grad_accum"], training["schedule"], training["grad_clip"]) == (2, 2, "cosine", 0.1)
    names = [line.rsplit(None, 3)[0] for line in out.out.splitlines()[3:-1]]
    assert "grad wpe" not in names and "grad lm_head" not in names and "after 2 steps wte" in names  # rope, tied
    assert out.out.splitlines()[-1] == f"{len(names)} passed, 0 failed"


def test_check_exits_1_on_a_mismatch(capsys, monkeypatch):
    import reference.gpt

    monkeypatch.setattr(reference.gpt, "linear", lambda x, w, b=None: [sum(wi * xi for wi, xi in zip(r, x)) * 1.001 for r in w])
    code, out = run_in_process(capsys, "check", "--steps", "1", "--n-embd", "8", "--doc", "ava")
    assert code == 1
    assert "FAIL" in out.out and out.out.splitlines()[-1].endswith("failed") and " 0 failed" not in out.out


def test_check_refuses_a_document_outside_the_vocabulary(capsys):
    code, out = run_in_process(capsys, "check", "--doc", "Émile")
    assert_one_line_error(code, out.err, "outside the vocabulary", "'É'")


def test_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    code, out = run_in_process(capsys, "train", "--steps", "30", "--out", str(run))
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert lines[:3] == ["num docs: 28830 train, 3203 validation (1 per step, 1 packed rows)", "vocab size: 27", "num params: 4192"]
    steps = [line.split(" | ")[0] for line in lines if line.startswith("step ")]
    assert steps == ["step 10 / 30", "step 20 / 30", "step 30 / 30"]  # a line per --log-every (10) steps
    code, out = run_in_process(capsys, "sample", str(run), "--num-samples", "5")
    assert code == 0, out.err
    samples = out.out.splitlines()
    assert len(samples) == 5 and all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples)
    # nothing saved is overwritten: training into the same directory again is refused
    code, out = run_in_process(capsys, "train", "--steps", "1", "--out", str(run))
    assert_one_line_error(code, out.err, "is an existing run", "--resume")


def test_check_a_trained_run(tmp_path, capsys):
    """`check RUN_DIR` reads the run's config, vocabulary, trained weights and training settings, saying its progress."""
    run = tmp_path / "run"
    flags = ["--steps", "20", "--n-embd", "8", "--n-head", "2", "--batch-size", "2", "--lr", "0.02"]
    code, out = run_in_process(capsys, "train", *flags, "--out", str(run))
    assert code == 0, out.err
    code, out = run_in_process(capsys, "check", str(run), "--steps", "2", "--lr", "0.005")
    assert code == 0, out.err
    assert '"n_embd": 8' in out.out.splitlines()[0]  # the run's config, not the defaults
    assert '"batch_size": 2, "grad_accum": 1, "lr": 0.005' in out.out  # the run's batch, not microgpt's 1; the lr given
    assert out.err.splitlines()[-1] == "check: training step 2 of 2 on both engines..."  # (the scalar engine is slow)
    assert out.out.splitlines()[-1].endswith(" 0 failed")
    code, out = run_in_process(capsys, "check", str(tmp_path / "nothing"))
    assert_one_line_error(code, out.err, "not a run directory")


# --- the commands: cli.py parses the shared flags, each commands/ module runs ---

MINIMAL_ARGV = {"sample": ["RUN"], "eval": ["RUN"], "export": ["RUN", "OUT"], "plot": ["RUN"]}


@pytest.mark.parametrize("name", COMMANDS)
def test_cli_main_reaches_each_commands_run_with_the_given_configs(monkeypatch, name):
    module = importlib.import_module(f"microgpt_jax.commands.{name}")
    reached = []
    monkeypatch.setattr(module, "run", lambda args: reached.append(args) or 0)
    assert main([name, *MINIMAL_ARGV.get(name, [])]) == 0
    (args,) = reached
    assert args.command == name and set(args.given_configs) == {"model", "train", "data", "checkpoint"}


def test_given_configs_are_the_config_file_with_the_typed_flags_over_it(tmp_path, monkeypatch):
    from microgpt_jax.commands import train

    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_embd = 32\n[train]\nlr = 0.02\nsteps = 50\n")
    reached = []
    monkeypatch.setattr(train, "run", reached.append)
    main(["train", "--config", str(path), "--lr", "0.005", "--vocab-size", "300", "--steps", "1000"])
    given = reached[0].given_configs
    assert given["model"] == {"n_embd": 32, "vocab_size": 300} and given["train"] == {"lr": 0.005, "steps": 1000}
    assert given["data"] == given["checkpoint"] == {}  # a default typed is given too (--steps 1000): resume checks it


def test_export_runs_through_cli_main_without_training(tmp_path, capsys):
    code, out = run_in_process(capsys, "export", tmp_path / "no-run", tmp_path / "out.safetensors")
    assert_one_line_error(code, out.err, "is not a run directory")
    assert not (tmp_path / "out.safetensors").exists()


def test_prepare_verify_prints_one_line_or_refuses_a_damaged_dataset(tmp_path, capsys, names_path):
    assert run_in_process(capsys, "prepare", names_path, "--out", tmp_path / "ds")[0] == 0
    code, out = run_in_process(capsys, "prepare", "--verify", tmp_path / "ds")
    assert code == 0 and len(out.out.splitlines()) == 1 and str(tmp_path / "ds") in out.out, out
    tokens = tmp_path / "ds" / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, somewhere no sampled block need look
    tokens.write_bytes(bytes(data))
    code, out = run_in_process(capsys, "prepare", "--verify", tmp_path / "ds")
    assert_one_line_error(code, out.err, "tokens.bin")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--verify", "ds", "names.txt"], "--verify checks a dataset and writes none"),
        (["--verify", "ds", "--out", "ds2"], "pass --verify DATASET_DIR alone, or TEXT --out DATASET_DIR"),
        (["names.txt"], "pass TEXT --out DATASET_DIR (or --verify DATASET_DIR)"),
        (["--out", "ds2"], "pass TEXT --out DATASET_DIR (or --verify DATASET_DIR)"),
    ],
)
def test_prepare_takes_a_text_and_out_or_verify_alone(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(capsys, "prepare", *args)
    assert_one_line_error(code, out.err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_check_seed_draws_microgpts_weights_and_order_at_42_and_others_at_other_seeds(names_path):
    from microgpt_jax.check import subject
    from microgpt_jax.model import GPTConfig, init_params_reference
    from microgpt_jax.text import reference_docs
    from microgpt_jax.train import TrainConfig

    docs, rng = reference_docs(names_path)  # microgpt's order and weights
    microgpt = subject(data=names_path, tcfg=TrainConfig(steps=2))
    assert microgpt.docs == docs[:2]
    want = init_params_reference(GPTConfig(vocab_size=27), rng)
    assert all(np.array_equal(microgpt.params[k], want[k]) for k in want)
    other = subject(data=names_path, tcfg=TrainConfig(steps=2, seed=7))
    assert other.docs == reference_docs(names_path, 7)[0][:2] != microgpt.docs
    assert not np.array_equal(other.params["wte"], microgpt.params["wte"])
