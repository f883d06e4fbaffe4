"""The run directory at its edges: edited run.json, locks, OS errors, torn metrics, bad paths, closed pipes.

Each case is what a user does by accident; each must end in one line and a
non-zero exit, with nothing already saved lost, moved or overwritten.
"""

import dataclasses
import errno
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from microgpt_jax import checkpoint, cli, loop, train
from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError
from microgpt_jax.metrics import read_metrics
from microgpt_jax.rundir import RunDir, load_weights
from tests.helpers import ROOT, TINY, assert_one_line_error, run_in_process

FLAGS = [*TINY, "--steps", "6", "--batch-size", "2", "--save-every", "2", "--log-every", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4, 6 (tests copy it)."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    cli.main(["train", *FLAGS, "--out", str(run_dir)])
    return run_dir


def copy_of(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def snapshot(directory):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file() and p.name != ".lock"}


def edit_run_json(run_dir, edit):
    meta = json.loads((run_dir / "run.json").read_text())
    edit(meta)
    (run_dir / "run.json").write_text(json.dumps(meta))


# -- an edited run.json ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, key, value, fragment",
    [
        ("checkpoint", "keep", 0, "checkpoint.keep must be positive, got 0"),
        ("checkpoint", "save_every", -5, "checkpoint.save_every must be positive, got -5"),
        ("model", "n_embd", "8", "model.n_embd must be an integer, got '8'"),
        ("model", "block_size", 0, "model.block_size must be positive, got 0"),
        ("train", "lr", None, "train.lr must be a number, got None"),
        ("data", "mode", "lines", "data.mode must be one of docs, stream, got 'lines'"),
        ("train", "lr_max", 1.0, "train.lr_max is not a TrainConfig field"),
        ("model", "vocab_size", 30, "vocab has 26 characters (+ BOS), but model.vocab_size is 30"),
    ],
)
@pytest.mark.parametrize("command", ["resume", "sample"])
def test_an_edited_run_json_is_refused_naming_the_field(tmp_path, capsys, finished, table, key, value, fragment, command):
    run_dir = copy_of(finished, tmp_path)
    edit_run_json(run_dir, lambda meta: meta[table].__setitem__(key, value))
    before = snapshot(run_dir)
    args = ["train", "--resume", run_dir] if command == "resume" else ["sample", run_dir]
    code, out = run_in_process(capsys, *args)
    assert_one_line_error(code, out.err, f"{run_dir / 'run.json'}: {fragment}")
    assert snapshot(run_dir) == before  # nothing deleted, moved or rewritten


@pytest.mark.parametrize("key, value, fragment", [("n_head", 4, "n_head = 2"), ("n_layer", 3, "n_layer = 1")])
def test_a_run_json_that_disagrees_with_the_checkpoints_moves_nothing(tmp_path, capsys, finished, key, value, fragment):
    """One flipped field samples a different model or moves every good checkpoint aside: neither happens."""
    run_dir = copy_of(finished, tmp_path)
    edit_run_json(run_dir, lambda meta: meta["model"].__setitem__(key, value))
    before = snapshot(run_dir)
    for args in (["sample", run_dir], ["train", "--resume", run_dir], ["export", run_dir, tmp_path / "w.safetensors"]):
        code, out = run_in_process(capsys, *args)
        assert_one_line_error(code, out.err, f"checkpoint 6 was trained with {fragment}", "nothing was moved")
    assert snapshot(run_dir) == before and not (run_dir / "damaged").exists()


@pytest.mark.parametrize("key, value", [("lr", 0.02), ("seed", 7), ("schedule", "cosine"), ("steps", 10), ("grad_clip", 1.0)])
def test_a_training_field_edited_in_run_json_is_refused_on_resume(tmp_path, capsys, finished, key, value):
    """The checkpoint records the training config: an edit would silently change the rest of the run (steps: only by --steps)."""
    run_dir = copy_of(finished, tmp_path)
    recorded = json.loads((run_dir / "run.json").read_text())["train"][key]
    edit_run_json(run_dir, lambda meta: meta["train"].__setitem__(key, value))
    before = snapshot(run_dir)
    code, out = run_in_process(capsys, "train", "--resume", run_dir)
    assert_one_line_error(code, out.err, f"checkpoint 6 was trained with train.{key} = {recorded!r}, but ", f"says {value!r}")
    assert snapshot(run_dir) == before


# -- damage is only evidence of damage ------------------------------------------------------


def test_an_os_error_while_reading_is_not_damage(tmp_path, capsys, finished, monkeypatch):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)

    def too_many_files(path):
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(checkpoint, "file_sha256", too_many_files)
    code, out = run_in_process(capsys, "train", "--resume", run_dir)
    assert_one_line_error(code, out.err, "could not read checkpoint 6", "Too many open files", "nothing was moved")
    assert snapshot(run_dir) == before and not (run_dir / "damaged").exists()


def test_a_checkpoint_removed_while_it_is_read_is_not_damage(tmp_path, capsys, finished, monkeypatch):
    """`keep` of a training process removes the oldest step while `sample` reads it."""
    run_dir = copy_of(finished, tmp_path)
    real_read = checkpoint.CheckpointStore.read

    def read_while_removed(self, step, with_opt_state=True):
        if step == 6:
            shutil.rmtree(self.directory / "6")
            raise checkpoint.Damaged("meta/metadata is unreadable")
        return real_read(self, step, with_opt_state)

    monkeypatch.setattr(checkpoint.CheckpointStore, "read", read_while_removed)
    run = load_weights(run_dir).run
    assert "damaged" not in capsys.readouterr().err
    assert run.store.steps() == [2, 4] and not (run_dir / "damaged").exists()


def test_odd_step_directory_names_are_skipped_with_a_warning(tmp_path, capsys, finished):
    run_dir = copy_of(finished, tmp_path)
    for name in ("0400", "²", "notes"):
        (run_dir / "checkpoints" / name).mkdir()
    run = load_weights(run_dir).run
    err = capsys.readouterr().err
    assert run.store.restore().step == 6
    assert all(f"skipping {run_dir / 'checkpoints' / name}" in err for name in ("0400", "²", "notes"))


def test_resume_may_change_how_often_it_saves_and_how_many_it_keeps(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    shutil.rmtree(run_dir / "checkpoints" / "4")
    cli.main(["train", "--resume", str(run_dir), "--save-every", "1", "--keep", "2"])
    assert RunDir.open(run_dir).store.steps() == [5, 6]  # saved at 3, 4, 5, 6; kept the last 2
    assert json.loads((run_dir / "run.json").read_text())["checkpoint"] == {"save_every": 2, "keep": 3}  # as written


# -- one process at a time -------------------------------------------------------------------


def test_a_second_process_on_the_same_run_is_refused_naming_the_holder(tmp_path, capsys, finished):
    run_dir = copy_of(finished, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from microgpt_jax.rundir import RunDir; run = RunDir.open({str(run_dir)!r}).lock(); print('held', flush=True); input()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        code, out = run_in_process(capsys, "train", "--resume", run_dir, "--steps", "8")  # the holder: another process
        assert_one_line_error(code, out.err, f"{run_dir} is in use by another microgpt-jax process (pid {holder.pid})")
        code, out = run_in_process(capsys, "train", *FLAGS, "--out", run_dir)
        assert_one_line_error(code, out.err, "is an existing run")
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunDir(empty, {}, None, ROOT, "").lock():  # a new run's directory, locked before run.json exists
        code, out = run_in_process(capsys, "train", *FLAGS, "--out", empty)  # flock: another open file, even in this process
        assert_one_line_error(code, out.err, f"{empty} is in use by another microgpt-jax process")
    assert [p.name for p in empty.iterdir()] == [".lock"]


# -- metrics.jsonl: appended, never rewritten ---------------------------------------------------


def test_metrics_are_appended_and_read_as_one_history(tmp_path, capsys, finished):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    shutil.rmtree(run_dir / "checkpoints" / "4")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 8, "loss": 1.0')  # a torn last line (a kill mid-write)
    before = metrics.read_bytes()
    cli.main(["train", "--resume", str(run_dir)])
    after = metrics.read_bytes()
    assert after.startswith(before)  # appended: the history before the resume is still there, byte for byte
    records = read_metrics(run_dir)
    assert "is not a whole metrics record" in capsys.readouterr().err
    assert [r["step"] for r in records] == [2, 4, 6]  # steps 4 and 6 trained again: their first records dropped
    first = [json.loads(line) for line in before.splitlines()[:3]]
    assert records[0] == first[0] and records[1:] != first[1:]
    assert np.allclose([r["loss"] for r in records[1:]], [r["loss"] for r in first[1:]])  # the same steps, retrained


# -- bad paths, full disks, closed pipes -----------------------------------------------------------


def test_unwritable_paths_are_one_line_and_leave_nothing_behind(tmp_path, capsys, finished):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    for args, fragment in [
        (["train", *FLAGS, "--out", a_file / "run"], "could not create the run directory"),
        (["train", *FLAGS, "--out", "/proc/microgpt-run"], "could not create the run directory"),
        (["export", finished, "/proc/w.safetensors"], "could not write /proc/w.safetensors"),
        (["export", finished, a_file / "w.safetensors"], "does not exist"),
        (["plot", finished, "--out", "/proc/loss.png"], "could not write /proc/loss.png"),
        (["plot", finished, "--out", tmp_path / "loss.txt"], "cannot write a plot as loss.txt"),
    ]:
        code, out = run_in_process(capsys, *args)
        assert_one_line_error(code, out.err, fragment)
    assert not Path("/proc/microgpt-run").exists()
    run_dir = tmp_path / "new"  # the same command, once the path is fine, is accepted
    assert cli.main(["train", *FLAGS, "--steps", "2", "--out", str(run_dir)]) is None


def test_a_full_disk_while_writing_metrics_loses_nothing(tmp_path, capsys, finished, monkeypatch):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    from microgpt_jax import metrics

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(metrics.MetricsFile, "write", full)
    code, out = run_in_process(capsys, "train", "--resume", run_dir)
    assert_one_line_error(code, out.err, "No space left on device", "the latest checkpoint is step 4")
    assert RunDir.open(run_dir).store.steps() == [2, 4]


# -- values that cannot work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
        (["--beta2", "-0.1"], "--beta2 must be in [0, 1), got -0.1"),
        (["--eps", "0"], "--eps must be positive, got 0.0"),
        (["--keep", "0"], "--keep must be positive, got 0"),
        (["--save-every", "-5"], "--save-every must be positive, got -5"),
        (["--n-embd", "100000", "--n-head", "4"], "this run needs about"),
        (["--n-layer", "1000000"], "this run needs about"),
        (["--block-size", "1000000000"], "this run needs about"),
        (["--batch-size", "1000000000"], "this run needs about"),
    ],
)
def test_values_that_cannot_work_are_one_line(capsys, tmp_path, flags, fragment):
    clock = time.perf_counter()
    code, out = run_in_process(capsys, "train", "--out", tmp_path / "run", *flags)
    assert_one_line_error(code, out.err, fragment)
    assert time.perf_counter() - clock < 30 and not (tmp_path / "run").exists()


def test_a_run_without_out_says_nothing_is_saved(capsys):
    cli.main(["train", *TINY, "--steps", "2"])
    assert capsys.readouterr().out.count("nothing of this run will be saved") == 1


def test_a_run_that_fails_before_any_checkpoint_names_a_step_that_is_accepted(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out = run_in_process(capsys, "train", *TINY, "--steps", "20", "--lr", "1e17", "--out", run_dir)
    assert_one_line_error(code, out.err, "loss is nan", "no checkpoint was saved", "--out in a new directory")
    code, _ = run_in_process(capsys, "train", *TINY, "--steps", "2", "--out", tmp_path / "new")  # what it says to do
    assert code == 0


def test_a_step_count_past_int32_is_one_line(capsys, tmp_path):
    code, out = run_in_process(capsys, "train", "--steps", 10**12, "--out", tmp_path / "run")
    assert_one_line_error(code, out.err, "--steps must be at most 2147483647 (steps are counted in int32), got 1000000000000")


def test_a_huge_step_count_is_not_materialised():
    ends = loop.chunk_ends(0, 10**12, 10, every=(4, 10))
    assert list(itertools.islice(ends, 5)) == [4, 8, 10, 12, 16]


def test_config_errors_name_the_field_not_a_flag():
    with pytest.raises(ConfigError) as e:
        train.TrainConfig(lr=float("inf"))
    assert (e.value.field, str(e.value)) == ("lr", "lr must be a finite number, got inf")
    with pytest.raises(UserError, match="^keep must be positive"):
        checkpoint.CheckpointConfig(keep=0)


def test_a_run_from_before_the_variants_resumes_and_samples(tmp_path, capsys, monkeypatch):
    """run.json and checkpoints written before the fields added `since` 0.2 read as those fields' defaults."""
    from microgpt_jax import checkpoint
    from microgpt_jax.model import GPTConfig
    from microgpt_jax.train import TrainConfig

    added = {
        t: [f.name for f in dataclasses.fields(c) if f.metadata.get("since")] for t, c in (("model", GPTConfig), ("train", TrainConfig))
    }
    assert "n_kv_head" in added["model"] and "grad_accum" in added["train"]

    class Before:  # the checkpoints' meta as 0.1 wrote it: the model config without the added fields
        def __getattr__(self, name):
            return getattr(dataclasses, name)

        def asdict(self, cfg):
            return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in added["model"]}

    monkeypatch.setattr(checkpoint, "dataclasses", Before())
    run_dir = tmp_path / "run"
    assert run_in_process(capsys, "train", *FLAGS, "--out", run_dir)[0] == 0
    monkeypatch.undo()
    edit_run_json(run_dir, lambda meta: [meta[t].pop(k) for t, keys in added.items() for k in keys])
    code, out = run_in_process(capsys, "sample", run_dir, "--num-samples", "2")
    assert code == 0, out.err
    code, out = run_in_process(capsys, "train", "--resume", run_dir, "--steps", "8")
    assert code == 0, out.err
    edit_run_json(run_dir, lambda meta: meta["model"].pop("n_embd"))  # a field every run.json has is still required
    code, out = run_in_process(capsys, "sample", run_dir)
    assert_one_line_error(code, out.err, "model.n_embd is missing")


# -- the fault campaign of issue 23: one line each, nothing lost ---------------------------------------


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory):
    """finished's latest checkpoint exported, and its metadata and arrays (cases write edited copies)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = tmp_path_factory.mktemp("exported") / "w.safetensors"
    cli.main(["export", str(finished), str(path)])
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    return path, meta, load_file(str(path))


def edited_export(exported, tmp_path, edit):
    from safetensors.numpy import save_file

    _, meta, params = exported
    params = dict(params)
    edit(params)
    save_file(params, str(tmp_path / "e.safetensors"), metadata=meta)
    return tmp_path / "e.safetensors"


def nan_at_0(params):
    params["wte"] = params["wte"].copy()
    params["wte"][0, 0] = np.nan


def junk_history(key, value):
    def case(finished, tmp_path, exported=None):
        run_dir = copy_of(finished, tmp_path)
        edit_run_json(run_dir, lambda meta: meta.__setitem__(key, value))
        return ["sample", run_dir]

    return case


def damaged_beside_a_file(finished, tmp_path, exported=None):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "damaged").write_text("a note")
    shutil.rmtree(run_dir / "checkpoints" / "6" / "params")
    return ["train", "--resume", run_dir]


def a_file_named_as_a_step(finished, tmp_path, exported=None):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    (run_dir / "checkpoints" / "6").write_text("a note")
    return ["train", "--resume", run_dir]


def vocab_edited_and_rehashed(finished, tmp_path, exported=None):
    """A vocabulary of the same length, its sha256 in run.json made again: the checkpoints' record refuses it."""
    from microgpt_jax.tokenizer import CharTokenizer, tokenizer_sha256

    run_dir = copy_of(finished, tmp_path)
    chars = "0" + RunDir.open(run_dir).tokenizer.chars[1:]
    edit_run_json(run_dir, lambda meta: meta.update(vocab=chars, tokenizer_sha256=tokenizer_sha256(CharTokenizer(chars))))
    return ["sample", run_dir]


def vocab_edited(finished, tmp_path, exported=None):
    run_dir = copy_of(finished, tmp_path)
    edit_run_json(run_dir, lambda meta: meta.update(vocab="0" + meta["vocab"][1:]))
    return ["train", "--resume", run_dir]


def a_file(name, content):
    def case(finished, tmp_path, exported=None):
        (tmp_path / name).write_bytes(content)
        return tmp_path / name

    return case


def metrics_a_directory(finished, tmp_path, exported=None):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()
    return ["train", "--resume", run_dir]


def a_fifo(finished, tmp_path, exported=None):
    import os

    os.mkfifo(tmp_path / "fifo")
    return ["train", *TINY, "--steps", "1", "--data", tmp_path / "fifo"]


CAMPAIGN = {  # each: (args, or a function of (finished, tmp_path) giving them; the fragments of the one line)
    "RUN@-1": (lambda f, t, e: ["sample", f"{f}@-1"], ["a step is a checkpoint's number (RUN_DIR@500), got '-1'"]),
    "RUN@abc": (lambda f, t, e: ["export", f"{f}@abc", t / "w.safetensors"], ["got 'abc'"]),
    "a text file as weights": (lambda f, t, e: ["sample", a_file("x.txt", b"emma\n")(f, t, e)], ["is neither a run directory nor"]),
    "safetensors of the wrong shape": (
        lambda f, t, e: ["sample", edited_export(e, t, lambda p: p.update(wte=np.zeros((3, 3), np.float32)))],
        ["does not hold the weights its metadata describes (wte is float32 [3, 3], not float [27, 8])"],
    ),
    "safetensors of ints": (
        lambda f, t, e: ["train", "--init-from", edited_export(e, t, lambda p: p.update(wte=p["wte"].astype(np.int32)))],
        ["(wte is int32 [27, 8], not float [27, 8])"],
    ),
    "safetensors holding a NaN": (
        lambda f, t, e: ["train", "--init-from", edited_export(e, t, nan_at_0), "--steps", "1"],
        ["holds weights that are not finite (NaN or Inf) in wte"],
    ),
    "run.json extensions junk": (junk_history("extensions", "x"), ["run.json: extensions must be a list"]),
    "run.json extension of strings": (junk_history("extensions", [{"at_step": "a"}]), ["run.json: extensions must be a list"]),
    "run.json init_from junk": (junk_history("init_from", 3), ["run.json: init_from must be"]),
    "a plain file named damaged": (damaged_beside_a_file, ["checkpoint 6 is damaged, and could not be moved", "nothing was moved"]),
    "a plain file named as a step": (a_file_named_as_a_step, ["holds the file 6 where checkpoint 6 would be saved"]),
    "vocab edited": (vocab_edited, ["run.json: vocab is not the vocabulary the run was trained with"]),
    "vocab edited, its hash too": (vocab_edited_and_rehashed, ["checkpoint 6 was trained with another vocabulary"]),
    "seed past int64": (["train", "--seed", 2**64], ["--seed must fit in 64 bits"]),
    "seed past int64 in a file": (
        lambda f, t, e: ["train", "--config", a_file("c.toml", b"[train]\nseed = 99999999999999999999\n")(f, t, e)],
        ["c.toml: [train] seed must fit in 64 bits"],
    ),
    "sample seed past int64": (lambda f, t, e: ["sample", f, "--seed", 2**63], ["--seed: must fit in 64 bits"]),
    "TOML not UTF-8": (lambda f, t, e: ["train", "--config", a_file("c.toml", b'[train]\nlr = "\xff"\n')(f, t, e)], ["is not valid UTF-8"]),
    "max-new-tokens past int32": (lambda f, t, e: ["sample", f, "--max-new-tokens", 10**11], ["the most is 2,147,483,647"]),
    "a batch past memory": (
        lambda f, t, e: ["sample", f, "--num-samples", 10**9, "--batch-size", 10**9, "--max-new-tokens", 10**5],
        ["1,000,000,000 samples of 100,001 tokens at once need about", "lower --batch-size"],
    ),
    "data a directory": (lambda f, t, e: ["train", "--data", t], ["is a directory but no dataset"]),
    "data a FIFO": (a_fifo, ["is not a regular file (a pipe or a device?)"]),
    "data missing": (["train", "--data", "/nonexistent.txt"], ["data file not found: /nonexistent.txt"]),
    "a mistyped flag": (["train", "--n_layer", "2"], ["microgpt-jax train: unrecognized arguments", "did you mean --n-layer?"]),
    "metrics.jsonl a directory, resumed": (metrics_a_directory, ["(Is a directory); move that directory away first; the latest"]),
    "metrics.jsonl a directory, plotted": (
        lambda f, t, e: ["plot", metrics_a_directory(f, t)[-1]],
        ["metrics.jsonl is not a file (a directory?); move it away"],
    ),
    "plot over a file": (lambda f, t, e: ["plot", f, "--out", a_file("mine.png", b"mine")(f, t, e)], ["mine.png already exists"]),
    "init-from: an inherited value against a given one": (
        lambda f, t, e: ["train", "--init-from", f, "--warmup", "8"],  # the parent's 6 steps are inherited
        ["--warmup must be below steps (6), got 8 (the values not given are --init-from"],
    ),
}


@pytest.mark.parametrize("case", CAMPAIGN)
def test_the_campaigns_faults_are_one_line_and_lose_nothing(case, tmp_path, capsys, finished, exported):
    args, fragments = CAMPAIGN[case]
    before = snapshot(finished)
    args = args(finished, tmp_path, exported) if callable(args) else args
    run_dirs = [a for a in args if isinstance(a, Path) and (a / "run.json").exists()]
    kept = {d: snapshot(d) for d in run_dirs}
    code, out = run_in_process(capsys, *args)
    assert_one_line_error(code, out.err, *fragments)
    assert snapshot(finished) == before and all(snapshot(d) == kept[d] for d in run_dirs)


def test_a_fine_tune_inherits_the_runs_settings_and_keeps_its_ids(tmp_path, capsys, finished):
    """The parent's batch and schedule, not microgpt's defaults, said in one line; data with some of its characters."""
    some = tmp_path / "some.txt"
    some.write_text("abba\nbob\nada\n" * 20)
    code, out = run_in_process(capsys, "train", "--init-from", finished, "--data", some, "--steps", "2", "--out", tmp_path / "ft")
    assert code == 0, out.err
    said = out.out.splitlines()[0]
    assert said.startswith(f"fine-tuning from {finished} (step 6): its weights, model and tokenizer; its settings: batch_size 2")
    assert said.endswith("given: --steps")
    meta, parent = (json.loads((d / "run.json").read_text()) for d in (tmp_path / "ft", finished))
    assert meta["train"] == {**parent["train"], "steps": 2} and meta["data"] == parent["data"]
    assert meta["vocab"] == parent["vocab"] and meta["model"] == parent["model"]  # the weights' ids, not the data's 4 characters


def test_an_export_samples_as_its_run_does(tmp_path, capsys):
    """A stream run's samples start at a line, not BOS: its export's too (the mode is in its metadata)."""
    run_dir = tmp_path / "stream"
    assert run_in_process(capsys, "train", *TINY, "--mode", "stream", "--steps", "2", "--out", run_dir)[0] == 0
    assert run_in_process(capsys, "export", run_dir, tmp_path / "w.safetensors")[0] == 0
    drawn = [
        run_in_process(capsys, "sample", source, "--json", "--num-samples", "4")[1].out for source in (run_dir, tmp_path / "w.safetensors")
    ]
    assert drawn[0] == drawn[1] and drawn[0].count("\n") == 4


def test_the_readmes_checkpoints_are_kept_by_the_main_command():
    """`runs/names@STEP` in the README names a checkpoint that `train --out runs/names` (1000 steps, the defaults) keeps."""
    import re

    ccfg, steps = checkpoint.CheckpointConfig(), train.TrainConfig().steps
    kept = sorted({*range(ccfg.save_every, steps + 1, ccfg.save_every), steps})[-ccfg.keep :]
    named = {int(s) for s in re.findall(r"runs/names@(\d+)", (ROOT / "README.md").read_text())}
    assert named and named <= set(kept), (named, kept)


def test_a_failed_wandb_start_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    from microgpt_jax import loggers

    def offline(self):
        raise UserError("could not start the W&B run (No API key configured); run `wandb login`, or set WANDB_MODE=offline")

    monkeypatch.setattr(loggers.WandB, "__enter__", offline)
    args = ["train", *TINY, "--steps", "2", "--out", tmp_path / "run"]
    code, out = run_in_process(capsys, *args, "--wandb", "p")
    assert_one_line_error(code, out.err, "set WANDB_MODE=offline", f"({tmp_path / 'run'}, which held nothing yet, was removed)")
    assert not (tmp_path / "run").exists()
    assert run_in_process(capsys, *args)[0] == 0  # the retry it suggests runs


def test_prepare_stopped_or_fed_a_changing_text_leaves_nothing(tmp_path, capsys, monkeypatch):
    import signal

    from microgpt_jax import errors, prepare

    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbf" + b"emma\nolivia\nava\n" * 50)  # a BOM: no character of the vocabulary
    real_scan = prepare.scan

    for more in ("ava\n", "zoe\n"):  # more documents; a character the first pass did not see

        def scan_then_append(*args):
            counted = real_scan(*args)
            with open(text, "a") as f:
                f.write(more)
            return counted

        monkeypatch.setattr(prepare, "scan", scan_then_append)
        code, out = run_in_process(capsys, "prepare", text, "--out", tmp_path / "ds")
        assert_one_line_error(code, out.err, f"{text} changed while it was read; nothing was written")
    monkeypatch.setattr(prepare, "scan", real_scan)
    monkeypatch.setattr(prepare, "write_docs", lambda *args: errors._stop(signal.SIGTERM, None))  # as SIGTERM's handler does
    code, out = run_in_process(capsys, "prepare", text, "--out", tmp_path / "ds")
    assert (code, out.err) == (128 + signal.SIGTERM, "error: interrupted (SIGTERM)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]  # no dataset, no ds.tmp-PID
    monkeypatch.undo()
    meta = prepare.prepare(text, tmp_path / "ds", prepare.DataConfig())
    assert meta["tokenizer"]["chars"] == "aeilmovz"


def test_an_export_never_overwrites(tmp_path, capsys, monkeypatch, finished):
    import safetensors.numpy

    out_path = tmp_path / "w.safetensors"
    (tmp_path / "w.safetensors.tmp").write_text("mine")  # a user's file, where a fixed temp name would write
    real_save = safetensors.numpy.save_file

    def another_export_meanwhile(params, path, metadata):
        real_save(params, path, metadata=metadata)
        out_path.write_text("the other export")

    monkeypatch.setattr(safetensors.numpy, "save_file", another_export_meanwhile)
    code, out = run_in_process(capsys, "export", finished, out_path)
    assert_one_line_error(code, out.err, "already exists (written meanwhile)")
    assert out_path.read_text() == "the other export" and (tmp_path / "w.safetensors.tmp").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.safetensors.tmp"]  # no temp left


def test_closed_or_full_output_and_ctrl_c_at_start_up_are_one_line(finished, exported, tmp_path):
    """Real processes (a closed fd or pipe and a signal need one), run side by side."""
    import os
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "microgpt_jax", "sample", str(finished)]
    never_ends = edited_export(exported, tmp_path, lambda p: p.update(lm_head=np.zeros_like(p["lm_head"])))
    procs = {
        "closed": subprocess.Popen(["bash", "-c", f"{' '.join(run)} >&-"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True),
        "full": subprocess.Popen(["bash", "-c", f"{' '.join(run)} > /dev/full"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True),
        "ctrl-c": subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        "long": subprocess.Popen(  # one batch of minutes (all logits 0: greedy never draws BOS): ctrl-C stops it while it runs
            [*run[:-1], str(never_ends), "--temperature", "0", "--max-new-tokens", "100000000", "--num-samples", "1"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    time.sleep(1.0)  # importing (earlier, the interpreter itself is starting: a plain kill)
    procs["ctrl-c"].send_signal(signal.SIGINT)
    tiny = " ".join(TINY)
    for name, command in (
        ("head: sample", f"sample {finished} --num-samples 20000"),
        ("head: train", f"train {tiny} --steps 3000 --log-every 1"),
    ):
        script = f"set -o pipefail; {sys.executable} -m microgpt_jax {command} | head -c 1 > /dev/null"  # more than a pipe holds
        procs[name] = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    procs["full"].wait(timeout=120)  # the same start-up as "long": past it, "long" is compiling or sampling
    time.sleep(3)
    procs["long"].send_signal(signal.SIGINT)
    done = {name: (p.wait(timeout=30), p.stderr.read()) for name, p in procs.items()}
    assert done["long"] == (130, "error: interrupted\n") and procs["long"].stdout.read() == ""
    assert_one_line_error(*done["closed"], "the standard output is closed (>&-)")
    assert_one_line_error(*done["full"], "could not write the output (No space left on device)")
    for name in ("head: sample", "head: train"):  # 141: 128 + SIGPIPE
        assert done[name][0] == 141 and done[name][1].startswith("error: the output was closed early"), done[name]
        assert_one_line_error(*done[name], "the output was closed early")
    assert done["ctrl-c"][0] == 130 and done["ctrl-c"][1].strip() == "error: interrupted"
