"""`microgpt-jax train` over 2 processes x 2 virtual CPU devices (gloo on loopback) equals 1 process.

Every run here is the real command line in subprocesses; each is bounded by
a timeout and killed, with the other processes of its run, on failure.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from microgpt_jax import cli as microgpt_cli
from microgpt_jax.metrics import read_metrics
from microgpt_jax.rundir import RunDir
from tests.helpers import ROOT, SLOW_TRAIN, assert_close, assert_one_line_error, cli, run_in_process

SMALL = (
    "--n-embd 8 --n-head 2 --n-layer 1 --block-size 16 --batch-size 8 --steps 10 "
    "--save-every 5 --log-every 5 --eval-every 5 --eval-size 16 --dtype float64"
).split()
TIMEOUT = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("XLA_FLAGS", None)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(name, None)
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def train(*args, devices=None):
    """One process: (returncode, stdout, stderr)."""
    out = cli("train", *args, env=env(devices), timeout=TIMEOUT)
    return out.returncode, out.stdout, out.stderr


def train_two_processes(*args, while_running=None, returncode=0, slow=False):
    """Two processes with 2 virtual devices each, process 0 the coordinator: [(stdout, stderr)] by process id.

    while_running(procs) is called once both are started; slow: one step per chunk, 0.3 s each.
    """
    port = free_port()
    program = ["-c", SLOW_TRAIN] if slow else ["-m", "microgpt_jax"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *program,
                "train",
                *args,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--coordinator-timeout",
                "30",
            ],
            cwd=ROOT,
            env=env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        if while_running:
            while_running(procs)
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:  # a process that failed leaves the other waiting at a barrier: never let it hang
            if p.poll() is None:
                p.kill()
                p.communicate()
    codes = returncode if isinstance(returncode, list) else [returncode] * 2
    for p, code, (_, err) in zip(procs, codes, outs):
        assert p.returncode == code, err[-3000:]
    return outs


def losses(run_dir):
    """(step, loss, val_loss) of each metrics record, read as one history (a resumed run's retrained steps once)."""
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(run_dir, warn=pytest.fail)]


def assert_same_run(got_dir, want_dir, step=10):
    got, want = losses(got_dir), losses(want_dir)
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == [5, 10]
    assert_close([l for _, l, _ in got], [l for _, l, _ in want])
    assert_close([v for _, _, v in got], [v for _, _, v in want])
    got_params, want_params = RunDir.open(got_dir).store.read(step).params, RunDir.open(want_dir).store.read(step).params
    assert got_params.keys() == want_params.keys()
    for name in want_params:
        assert got_params[name].dtype == np.float64
        assert_close(got_params[name], want_params[name])


def resume_from_step_5(src, dst):
    """A copy of run src with its last checkpoint (step 10) and its plot gone: resuming it trains steps 6..10 again."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "10")
    (dst / "loss.png").unlink()  # the resumed run draws its own
    return dst


def test_two_processes_resume_a_one_process_checkpoint_and_equal_one_process(tmp_path, capsys):
    """Steps 6..10 of a 1-process run, resumed from its checkpoint 5 in 2 processes, are the 1-process run's: the
    checkpoints do not depend on the process count, and the 2-process step, eval and save are the 1-process ones.
    (A fresh 2-process run's directory and its first step: the SIGTERM test below.)"""
    one = tmp_path / "one"
    code, _, err = train(*SMALL, "--out", str(one))
    assert code == 0, err
    two = resume_from_step_5(one, tmp_path / "one_then_two")
    (out0, _), (out1, _) = train_two_processes("--resume", str(two))
    assert "devices: 4 (2 process(es), cpu)" in out0 and "resuming" in out0 and "at step 5" in out0
    assert "step 10 / 10" in out0 and "step" not in out1  # only process 0 logs
    assert (two / "loss.png").is_file() and sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert_same_run(two, one)

    # sampling from the checkpoint the 2 processes saved, on one device: the samples of the 1-device run
    samples = []
    for run_dir in (one, two):
        microgpt_cli.main(["sample", str(run_dir), "--num-samples", "5", "--json"])
        samples.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert len(samples[0]) == 5 and [s["sample"] for s in samples[1]] == [s["sample"] for s in samples[0]]
    assert_close([s["logprob"] for s in samples[1]], [s["logprob"] for s in samples[0]])


def assert_usage_error(code, out, err, text):
    """Exit 2 and one line, `error: ...` with text in it, no traceback."""
    assert code == 2, (out, err)
    assert_one_line_error(code, err, text)


def test_batch_not_divisible_by_the_devices(tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = train(*SMALL, "--batch-size", "6", "--out", str(out_dir), devices=4)
    assert_usage_error(code, out, err, "the global batch size 6 is not divisible by the 4 devices; use a multiple of 4")
    assert not out_dir.exists()  # nothing written
    code, out, err = train(*SMALL, "--devices", "3", "--out", str(out_dir), devices=4)
    assert_usage_error(code, out, err, "is not divisible by the 3 devices")


def test_unreachable_coordinator_and_bad_process_id(tmp_path, capsys):
    """In this process: both are refused before JAX's distributed runtime is touched (a real process's one line: the
    bad coordinator of tests/test_peers.py)."""
    port = free_port()  # nobody listens there
    args = [*SMALL, "--out", tmp_path / "run", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    code, out = run_in_process(capsys, "train", *args, "--process-id", "1", "--coordinator-timeout", "2")
    assert_usage_error(code, out.out, out.err, f"could not reach the coordinator at 127.0.0.1:{port} within 2s")
    code, out = run_in_process(capsys, "train", *args, "--process-id", "2")
    assert_usage_error(code, out.out, out.err, "--process-id 2 is out of range: it must be in 0..1")
    assert not (tmp_path / "run").exists()


def wait_for_step(proc):
    """Read process 0's output until its first progress line."""
    line = proc.stdout.readline()
    while not line.startswith("step"):
        assert line, proc.stderr.read()
        line = proc.stdout.readline()


def first_loss(flags):
    """The loss of step 1 of the run `train FLAGS` makes (its seed's weights on its first batch), in this process."""
    import jax

    from microgpt_jax.cli import build_parser, given_configs
    from microgpt_jax.model import loss_fn
    from microgpt_jax.rundir import RunConfig
    from microgpt_jax.session import Session
    from microgpt_jax.text import resolve_data_path

    session = Session(RunConfig.of(given_configs(build_parser().parse_args(["train", *flags]))), resolve_data_path(None))
    batch = jax.tree.map(jax.numpy.asarray, session.data.batch(0))
    return float(jax.jit(loss_fn, static_argnums=2)(session.initial_state().params, batch, session.configs.model))


def test_a_signal_to_one_process_stops_all_at_the_same_step_and_saves_it(tmp_path):
    """SIGTERM to process 1 alone, and both save the same step, exit 143 and say so in one line (both signalled:
    tests/test_peers.py, at the worker level). And a fresh run in 2 processes: a 1-process run's files, and its first
    loss (the seed's weights, the first batch)."""
    run_dir, flags = tmp_path / "run", [*SMALL, "--log-every", "1", "--steps", "30"]

    def term(procs):
        wait_for_step(procs[0])
        procs[1].send_signal(signal.SIGTERM)

    (_, err0), (_, err1) = train_two_processes(
        *flags, "--out", str(run_dir), slow=True, while_running=term, returncode=128 + signal.SIGTERM
    )
    step = int(err0.strip().splitlines()[-1].split(" at step ")[1].split(":")[0])
    assert err0.strip().splitlines()[-1] == (
        f"error: SIGTERM at step {step}: saved checkpoint {step}; resume with `microgpt-jax train --resume {run_dir}`"
    )
    assert err1.strip().splitlines()[-1] == err0.strip().splitlines()[-1]  # the same step on both
    assert step < 30 and step in RunDir.open(run_dir).store.steps()
    assert "Traceback" not in err0 + err1
    assert {p.name for p in run_dir.iterdir()} - {"loss.png"} == {".lock", "checkpoints", "metrics.jsonl", "run.json"}

    # a fresh run: the seed's weights and the first batch in 2 processes are those of 1 (later steps: the resume test)
    first = losses(run_dir)[0]
    assert first[0] == 1 and len(losses(run_dir)) == step
    assert_close(first[1], first_loss(flags))


def test_a_dead_peer_ends_the_other_with_one_line_naming_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    died = {}

    def kill(procs):
        wait_for_step(procs[0])
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "checkpoints" / "5").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)  # past the save at step 5
        procs[1].kill()
        died["at"] = time.monotonic()

    (_, err0), _ = train_two_processes(
        *SMALL,
        "--log-every",
        "1",
        "--steps",
        "60",
        "--peer-timeout",
        "3",
        "--out",
        str(run_dir),
        slow=True,
        while_running=kill,
        returncode=[1, -signal.SIGKILL],
    )
    assert time.monotonic() - died["at"] < 3 + 10
    lines = err0.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and lines[-1].startswith("error: "), err0
    saved = RunDir.open(run_dir).store.steps()
    assert f"the latest checkpoint is step {saved[-1]}; resume with `microgpt-jax train --resume {run_dir}`" in lines[-1]
    for trace in ("Traceback", "F0000", "Check failure", "*** ", "SIGABRT"):
        assert trace not in err0
