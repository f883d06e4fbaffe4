"""A 2-process run (2 virtual CPU devices each, gloo on loopback) stops together on a signal, and a
dead peer ends the survivor within the timeout with one `error:` line: no hang, no C++ abort.

The processes are tests/peer_worker.py; each is bounded by a timeout and killed on failure.
"""

import signal
import subprocess
import sys
import threading
import time

import pytest

from microgpt_jax import parallel
from microgpt_jax.errors import run_cli
from tests.helpers import ROOT
from tests.test_multiprocess import env, free_port

T = 3  # the peer timeout of these runs, in seconds
MARGIN = 3  # a survivor exits within T + MARGIN of its peer's death
C_TRACE = ("F0000", "Check failure", "*** ", "SIGABRT", "Traceback", "terminate called")


class Worker:
    def __init__(self, port, process_id, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "peer_worker.py"), str(port), str(process_id), str(T), *args],
            cwd=ROOT,
            env=env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out, self.err = [], []
        self.readers = [
            threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
            for s, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for r in self.readers:
            r.start()

    def wait_for(self, line, timeout=60):
        deadline = time.monotonic() + timeout
        while f"{line}\n" not in self.out:
            assert self.proc.poll() is None and time.monotonic() < deadline, (line, self.out, self.err)
            time.sleep(0.02)

    def wait(self, timeout):
        code = self.proc.wait(timeout)
        for r in self.readers:
            r.join(5)
        return code

    @property
    def stderr(self):
        return "".join(self.err)


def run(*args_by_process, during, timeout=60):
    """Start process 0 and 1 (args_by_process: their extra flags), call during(workers), then wait for both."""
    port = free_port()
    workers = [Worker(port, i, *args) for i, args in enumerate(args_by_process)]
    try:
        during(workers)
        for w in workers:
            if w.proc.poll() is None:
                w.wait(timeout)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    return workers


def stopped_at(w):
    lines = [l for l in w.out if l.startswith("stopped at chunk")]
    assert len(lines) == 1, (w.out, w.stderr)
    return lines[0]


@pytest.mark.parametrize("targets", [[0, 1]], ids=["sigterm-both"])
def test_sigterm_stops_both_at_the_same_chunk(targets):
    """Both signalled, each maybe in another chunk: they agree on one. (One signalled: the command line's
    test, tests/test_multiprocess.py, which runs this agreement under `train`.)"""
    for attempt in range(1):

        def during(workers):
            for w in workers:
                w.wait_for("chunk 1")
            for i in targets:
                workers[i].proc.send_signal(signal.SIGTERM)

        workers = run([], [], during=during)
        for w in workers:
            assert w.proc.returncode == 128 + signal.SIGTERM, (attempt, w.out, w.stderr)
            assert "error" not in w.stderr, w.stderr
        assert stopped_at(workers[0]) == stopped_at(workers[1])


PHASES = {  # the survivor's state when its peer dies -> the flags of the victim
    "step": ["--sleep-before-chunk", "3:60"],  # the survivor waits in chunk 3's all-reduce
    "agree_on_stop": ["--sleep-before-stop", "2:60"],
    "barrier": ["--sleep-before-stop", "2:60", "--barrier"],
}


@pytest.mark.parametrize("victim,phase", [(1, "step"), (1, "agree_on_stop"), (0, "barrier")])  # 0 hosts the coordinator
def test_a_dead_peer_ends_the_survivor_with_one_line(victim, phase):
    survivor = 1 - victim
    flags = [[], []]
    flags[victim] = PHASES[phase]
    if phase == "barrier":
        flags[survivor] = ["--barrier"]
    killed = []

    def during(workers):
        workers[survivor].wait_for("chunk 2")
        workers[victim].wait_for("chunk 2")
        time.sleep(0.5)  # the survivor is now waiting for the victim
        assert workers[survivor].proc.poll() is None, workers[survivor].stderr
        workers[victim].proc.kill()
        killed.append(time.monotonic())

    workers = run(*flags, during=during, timeout=T + MARGIN + 30)
    w = workers[survivor]
    took = time.monotonic() - killed[0]  # an upper bound: run() returned just after the survivor exited
    assert w.proc.returncode == 1, (w.out, w.stderr)
    assert took < T + MARGIN, took
    errors = [l for l in w.err if l.startswith("error:")]
    assert len(errors) == 1, w.stderr
    assert f"process {victim} of this run" in errors[0] and "resume with: worker --resume" in errors[0], errors
    assert not any(t in w.stderr for t in C_TRACE), w.stderr


def test_a_slow_peer_is_not_a_dead_one():
    def during(workers):
        pass

    workers = run(["--chunks", "3"], ["--chunks", "3", "--sleep-before-chunk", f"1:{T + 2}"], during=during)
    for w in workers:
        assert w.proc.returncode == 0 and "done\n" in w.out, w.stderr


@pytest.mark.parametrize("process_id", [0, 1])
@pytest.mark.parametrize(
    "address,text",
    [
        ("notahost", "'notahost' is not HOST:PORT"),
        ("127.0.0.1:abc", "'127.0.0.1:abc' is not HOST:PORT"),
        ("127.0.0.1:70000", "has port 70000, outside 1..65535"),
        ("127.0.0.1:0", "has port 0, outside 1..65535"),
    ],
)
def test_a_bad_coordinator_is_one_line(address, text, process_id, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: parallel.initialize(address, 2, process_id))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and text in err and "for example" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bad_coordinator_on_the_command_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "microgpt_jax",
            "train",
            "--out",
            str(tmp_path / "run"),
            "--coordinator",
            "notahost",
            "--num-processes",
            "2",
            "--process-id",
            "0",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "is not HOST:PORT" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists(), out.stderr
