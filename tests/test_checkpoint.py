"""Run directories, orbax checkpoints, exact resume, faults, export, determinism.

Every run here is tiny (n_embd 8, a few steps) and goes through the real
`microgpt-jax train` (in-process, or as a subprocess for real signals). A spy
on `loop.run_steps` records every loss at full precision and can act between
chunks (send a signal, fill the disk) exactly where a real fault would land.
In-process runs of one config share one Trainer, so each chunk length
compiles once for the whole file; the subprocess compiles its own.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from microgpt_jax import checkpoint, cli, loop, train
from microgpt_jax.errors import UserError
from microgpt_jax.model import param_shapes
from microgpt_jax.rundir import RunDir, load_weights
from tests.helpers import ROOT, SLOW_TRAIN, TINY

TRAINERS = {}


def share_trainers(monkeypatch):
    real = train.Trainer
    monkeypatch.setattr(train, "Trainer", lambda cfg, tcfg, mesh=None: TRAINERS.setdefault((cfg, tcfg, mesh), real(cfg, tcfg, mesh)))


@pytest.fixture(autouse=True)
def shared_trainers(monkeypatch):
    share_trainers(monkeypatch)


class Spy:
    """Replaces loop.run_steps: records losses by step; `before(step)` runs before a chunk ending at step is reported."""

    def __init__(self):
        self.losses, self.chunk, self.before = {}, None, None

    def __call__(self, run_steps):
        def spied(*args, **kwargs):
            if self.chunk:
                kwargs["length"] = self.chunk
            for chunk in run_steps(*args, **kwargs):
                self.losses.update({chunk.start + i: loss for i, loss in enumerate(chunk.metrics["loss"])})
                if self.before:
                    self.before(chunk.start + len(chunk.metrics["loss"]))
                yield chunk

        return spied

    def array(self, n):
        assert sorted(self.losses) == list(range(n))
        return np.array([self.losses[s] for s in range(n)])


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(loop, "run_steps", s(loop.run_steps))
    return s


def final_state(run_dir):
    """(step, params, opt_state leaves) of a run's latest checkpoint, as numpy."""
    ck = RunDir.open(run_dir).store.restore()
    return ck.step, ck.params, jax.tree.leaves(ck.state.opt_state)


def assert_same_state(a, b):
    step_a, params_a, opt_a = a
    step_b, params_b, opt_b = b
    assert step_a == step_b
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        assert params_a[k].dtype == params_b[k].dtype and np.array_equal(params_a[k], params_b[k]), k
    assert len(opt_a) == len(opt_b) and all(np.array_equal(x, y) for x, y in zip(opt_a, opt_b))


def train_cli(*argv):
    return cli.main(["train", *TINY, *argv])


# -- exact resume -----------------------------------------------------------------------


RESUME_FLAGS = {
    1: ["--steps", "12", "--batch-size", "1", "--save-every", "4"],  # float32
    3: ["--steps", "12", "--batch-size", "3", "--save-every", "4", "--dtype", "float64"],
}


@pytest.mark.parametrize("batch, signum", [(1, signal.SIGTERM), (3, signal.SIGHUP)])  # SIGHUP: the terminal closed
def test_resume_after_sigterm_is_bitwise_identical(tmp_path, spy, capsys, batch, signum):
    steps, flags = 12, RESUME_FLAGS[batch]
    spy.chunk = 2  # so that the signal lands between two saves
    train_cli(*flags, "--out", str(tmp_path / "whole"))
    whole = spy.array(steps)

    spy.losses = {}
    spy.before = lambda step: step == 6 and os.kill(os.getpid(), signum)
    with pytest.raises(UserError) as stopped:
        train_cli(*flags, "--out", str(tmp_path / "cut"))
    assert stopped.value.exit_code == 128 + signum
    hint = f"resume with `microgpt-jax train --resume {tmp_path / 'cut'}`"
    assert str(stopped.value) == f"{signal.Signals(signum).name} at step 6: saved checkpoint 6; {hint}"
    assert RunDir.open(tmp_path / "cut").store.steps() == [4, 6]
    first_part = spy.array(6)

    spy.losses, spy.before = {}, None
    cli.main(["train", "--resume", str(tmp_path / "cut")])
    assert f"resuming {tmp_path / 'cut'} at step 6" in capsys.readouterr().out
    assert sorted(spy.losses) == list(range(6, steps))
    resumed = np.concatenate([first_part, [spy.losses[s] for s in range(6, steps)]])
    assert np.array_equal(resumed, whole)  # every loss, bit for bit
    assert_same_state(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
    assert RunDir.open(tmp_path / "cut").store.steps() == [6, 8, 12]  # --keep 3


def test_chunks_end_on_save_steps_wherever_the_run_starts():
    def ends(start):  # chunks of 3 steps (fit passes its chunk length among `every`), saves every 5
        return list(loop.chunk_ends(start, 20, 3, every=(3, 5)))

    assert ends(0) == [3, 5, 6, 9, 10, 12, 15, 18, 20]
    assert ends(7) == [9, 10, 12, 15, 18, 20]  # a resumed run meets the same boundaries


FINISHED_FLAGS = ["--steps", "6", "--batch-size", "2", "--save-every", "2"]
FINISHED_LOSSES = {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints 2, 4, 6 (never modified: tests copy it); its losses in FINISHED_LOSSES."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    spy = Spy()
    with pytest.MonkeyPatch.context() as mp:
        share_trainers(mp)
        mp.setattr(loop, "run_steps", spy(loop.run_steps))
        train_cli(*FINISHED_FLAGS, "--out", str(run_dir))
    FINISHED_LOSSES[run_dir] = spy.array(6)
    return run_dir


def test_two_runs_are_identical(tmp_path, spy, finished_run):
    train_cli(*FINISHED_FLAGS, "--out", str(tmp_path / "again"))
    assert np.array_equal(spy.array(6), FINISHED_LOSSES[finished_run])
    assert_same_state(final_state(tmp_path / "again"), final_state(finished_run))


# -- a real signal to a real process --------------------------------------------------


def test_sigint_finishes_the_step_saves_and_resumes_exactly(tmp_path, spy):
    """Ctrl-C to a real training process (SIGTERM takes the same path, in-process, above)."""
    flags = [*TINY, *RESUME_FLAGS[3], "--log-every", "1"]  # 12 steps, saves at 4, 8, 12, a line per step
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", *flags, "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = [proc.stdout.readline()]
    while not lines[-1].startswith("step"):
        assert lines[-1], "".join(lines) + proc.stderr.read()
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    out, err = proc.stdout.read(), proc.stderr.read()  # (not communicate(): readline has buffered some of stdout)
    proc.wait(timeout=60)
    printed = [line for line in "".join(lines + [out]).splitlines() if line.startswith("step")]
    last = len(printed)
    assert proc.returncode == 128 + signal.SIGINT
    assert 1 <= last < 12, out + err  # the running step finished, then it stopped
    assert "Traceback" not in err
    hint = f"resume with `microgpt-jax train --resume {run_dir}`"
    assert err.splitlines()[-1] == f"error: SIGINT at step {last}: saved checkpoint {last}; {hint}"
    assert RunDir.open(run_dir).store.steps() == sorted({s for s in (4, 8) if s < last} | {last})

    spy.chunk = 2  # (not the subprocess's chunk length: chunking changes no bit)
    cli.main(["train", "--resume", str(run_dir)])
    assert sorted(spy.losses) == list(range(last, 12))
    spy.losses = {}
    cli.main(["train", *flags, "--out", str(tmp_path / "whole")])
    assert_same_state(final_state(run_dir), final_state(tmp_path / "whole"))
    # what the interrupted process printed (4 decimals) is what the uninterrupted run computed
    # (one line per step there: one step per chunk; each line is "step S / 12 | loss L | ...")
    assert [line.split(" | ")[:2] for line in printed] == [[f"step {s + 1:2d} / 12", f"loss {spy.losses[s]:.4f}"] for s in range(last)]


# -- non-finite loss --------------------------------------------------------------------


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, spy, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as stopped:  # weights ~1e17 after step 1, NaN in step 2
        train_cli("--steps", "20", "--lr", "1e17", "--save-every", "1", "--log-every", "1", "--out", str(run_dir))
    assert str(stopped.value) == (
        f"loss is nan at step 2: training stopped there and saved nothing after it; the latest checkpoint is "
        f"step 1 in {run_dir / 'checkpoints'} ({loop.ADVICE})"
    )
    assert stopped.value.exit_code == 1
    assert sorted(spy.losses) == [0, 1]  # it stopped there: no step 3
    assert RunDir.open(run_dir).store.steps() == [1]
    ck = final_state(run_dir)
    assert ck[0] == 1 and all(np.isfinite(x).all() for x in [*ck[1].values(), *ck[2]])
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert printed == ["1"]  # step 2's NaN is not a record (no line, no metrics): the message names it


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def largest_file(directory):
    return max((p for p in Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, finished_run, capsys, damage):
    run_dir = copy_run(finished_run, tmp_path / "run")
    victim = largest_file(run_dir / "checkpoints" / "6" / "params")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "flip":
        flip_byte(victim)
    else:
        victim.unlink()
    capsys.readouterr()
    params = load_weights(run_dir).params  # what sample reads: step 4, with a warning, nothing moved
    err = capsys.readouterr().err
    assert err.startswith(f"warning: checkpoint {run_dir / 'checkpoints' / '6'} is damaged (")
    assert len(err.splitlines()) == 2 and "using checkpoint 4, the latest good one" in err
    assert all(np.array_equal(params[k], RunDir.open(finished_run).store.read(4).params[k]) for k in params)
    assert RunDir.open(run_dir).store.steps() == [2, 4, 6]


def test_resume_moves_a_damaged_checkpoint_aside_and_retrains_it_exactly(tmp_path, finished_run, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    victim = largest_file(run_dir / "checkpoints" / "6" / "params")
    victim.write_bytes(victim.read_bytes()[:10])
    cli.main(["train", "--resume", str(run_dir)])
    captured = capsys.readouterr()
    assert f"moved it to {run_dir / 'damaged' / '6'}" in captured.err
    assert f"resuming {run_dir} at step 4" in captured.out
    assert_same_state(final_state(run_dir), final_state(finished_run))  # the new step 6 is the lost one, bit for bit
    moved = run_dir / "damaged" / "6" / victim.relative_to(run_dir / "checkpoints" / "6")
    assert len(moved.read_bytes()) == 10  # kept as it was found, never overwritten


def test_arrays_are_checked_against_their_sha256(tmp_path, finished_run, capsys):
    """A step without its file manifest (the process died right after orbax finished it) is
    accepted on its arrays' sha256s alone, and refused when an array differs from what was saved."""
    run_dir = copy_run(finished_run, tmp_path / "run")
    (run_dir / "checkpoints" / "6" / checkpoint.MANIFEST).unlink()
    assert RunDir.open(run_dir).store.restore().step == 6
    meta_file = run_dir / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["sha256"]["params"]["['wte']"] = "0" * 64  # as if wte had silently changed since
    meta_file.write_text(json.dumps(meta))
    assert RunDir.open(run_dir).store.restore().step == 4
    assert "params['wte'] does not match the sha256 recorded when it was saved" in capsys.readouterr().err


def test_every_checkpoint_damaged_is_an_error(tmp_path, finished_run):
    run_dir = copy_run(finished_run, tmp_path / "run")
    for step in (2, 4, 6):
        (run_dir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{")
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged \(steps 6, 4, 2\)"):
        cli.main(["train", "--resume", str(run_dir)])
    assert sorted(p.name for p in (run_dir / "damaged").iterdir()) == ["2", "4", "6"]  # kept, not deleted


def test_damaged_run_json(tmp_path, finished_run):
    run_dir = copy_run(finished_run, tmp_path / "run")
    (run_dir / "run.json").write_text('{"format": "microgpt-jax run", "model": {')
    with pytest.raises(UserError, match=r"run.json is damaged"):
        cli.main(["sample", str(run_dir)])


# -- a full disk while saving --------------------------------------------------------------


@pytest.fixture
def disk_full():
    """disk_full(True) makes every write past 300 bytes fail with EFBIG, as on a full disk; disk_full(False) undoes it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill the process
    limit = lambda full: resource.setrlimit(resource.RLIMIT_FSIZE, (300 if full else soft, hard))  # noqa: E731
    yield limit
    limit(False)
    signal.signal(signal.SIGXFSZ, previous)


def test_disk_error_while_saving_keeps_the_previous_checkpoint(tmp_path, spy, disk_full, finished_run, capsys):
    run_dir = tmp_path / "run"  # (capsys: what the run prints stays in memory, off the full disk)
    spy.before = lambda step: step == 4 and disk_full(True)
    with pytest.raises(UserError) as failed:
        train_cli(*FINISHED_FLAGS, "--out", str(run_dir))
    message = str(failed.value)
    assert message.startswith(f"could not save checkpoint 4 in {run_dir / 'checkpoints'} (")
    assert "File too large" in message and "checkpoint 2 is intact" in message
    assert capsys.readouterr().err == ""  # orbax's threads said nothing: the error is the one line
    disk_full(False)
    spy.before = None
    run = RunDir.open(run_dir)
    assert [p.name for p in run.store.directory.iterdir()] == ["2"]  # no half-written step left behind
    assert np.array_equal(run.store.restore().params["wte"], RunDir.open(finished_run).store.read(2).params["wte"])
    # and the run resumes to the same end as one that never failed
    cli.main(["train", "--resume", str(run_dir)])
    assert_same_state(final_state(run_dir), final_state(finished_run))


# -- refusals ------------------------------------------------------------------------------


def test_out_on_an_existing_run_is_refused(tmp_path, finished_run):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"is an existing run; continue it with `microgpt-jax train --resume"):
        train_cli("--steps", "6", "--out", str(run_dir))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already exists and is not empty"):
        train_cli("--steps", "6", "--out", str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"--resume continues a run as it is; --out \(with --init-from\) starts a new one: pass one"):
        cli.main(["train", "--resume", str(run_dir), "--out", str(tmp_path / "new")])


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--n-embd", "16"], "--n-embd 16 differs from the run's 8"),
        (["--lr", "0.02"], "--lr 0.02 differs from the run's 0.01"),
        (["--steps", "6", "--n-layer", "2"], "--n-layer 2 differs from the run's 1"),
    ],
)
def test_resume_with_another_config_names_the_field(finished_run, flags, field):
    with pytest.raises(UserError, match=field):
        cli.main(["train", "--resume", str(finished_run), *flags])


def test_resume_with_other_data_is_refused(tmp_path, finished_run, shakespeare_path):
    with pytest.raises(UserError, match=r"differs from the one the run was trained on"):
        cli.main(["train", "--resume", str(finished_run), "--data", str(shakespeare_path)])


def test_not_a_run(tmp_path):
    for command in (
        ["sample", str(tmp_path)],
        ["export", str(tmp_path), str(tmp_path / "x.safetensors")],
        ["train", "--resume", str(tmp_path)],
    ):
        with pytest.raises(UserError, match=r"is not a run directory"):
            cli.main(command)


# -- export -------------------------------------------------------------------------------------


def test_export_safetensors(tmp_path, finished_run, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = tmp_path / "model.safetensors"
    cli.main(["export", str(finished_run), str(out)])
    cfg, tokenizer, params, _, _ = load_weights(finished_run)[:5]
    loaded = load_file(str(out))
    assert list(loaded) == sorted(param_shapes(cfg))
    assert all(np.array_equal(loaded[k], params[k]) and loaded[k].dtype == np.float32 for k in params)
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["vocab"] == tokenizer.chars and meta["step"] == "6"
    assert json.loads(meta["model"])["n_embd"] == 8
    with pytest.raises(UserError, match=r"already exists"):
        cli.main(["export", str(finished_run), str(out)])


def test_a_second_signal_quits_at_once_without_saving(tmp_path, spy, finished_run):
    run_dir = tmp_path / "run"
    spy.chunk = 1

    def twice(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the first asks for a save, the second quits

    spy.before = twice
    with pytest.raises(KeyboardInterrupt):
        train_cli(*FINISHED_FLAGS, "--out", str(run_dir))
    assert RunDir.open(run_dir).store.steps() == [2]  # nothing saved after the second signal
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    RunDir.open(run_dir).lock().unlock()  # and the run directory is free again
