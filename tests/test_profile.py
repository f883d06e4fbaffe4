"""train --profile START:STOP: a JAX profiler trace of exactly those steps, the training unchanged; bad windows refused."""

import gzip
import json

import pytest

from microgpt_jax.loop import chunk_ends
from tests.helpers import TINY, assert_one_line_error, run_in_process

FLAGS = [*TINY, "--steps", "6", "--log-every", "3"]  # chunks of 3 steps: 3, 6


def test_the_chunk_plan_ends_chunks_at_the_profiles_steps():
    assert list(chunk_ends(0, 6, 3, (3,), at=(1, 4))) == [1, 3, 4, 6]
    assert list(chunk_ends(2, 6, 3, (3,), at=(1, 4))) == [3, 4, 6]  # a step behind the start: no chunk for it


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_profile_traces_its_steps_and_leaves_the_training_as_it_was(tmp_path, capsys):
    code, out = run_in_process(capsys, "train", *FLAGS, "--out", tmp_path / "profiled", "--profile", "1:4")
    assert code == 0, out.err
    directory = tmp_path / "profiled" / "profile"
    (trace_dir,) = (directory / "plugins" / "profile").iterdir()
    (xplane,) = trace_dir.glob("*.xplane.pb")
    assert xplane.stat().st_size > 0  # what TensorBoard's profile plugin reads
    perfetto = trace_dir / "perfetto_trace.json.gz"
    assert f"profile of steps 1:4 in {directory}: view it with `tensorboard --logdir {directory}`" in out.out
    assert str(perfetto) in out.out.splitlines()[-2]  # the line before "saved to"
    # the step's XLA operations, in the two chunks of steps 1 to 4 (1-3 and 3-4: the log's cadence ends one at 3), no other
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    ops = [e["args"] for e in events if e.get("args", {}).get("hlo_module") == "jit__steps"]
    names = {a["hlo_op"] for a in ops}
    assert len(names) > 20 and any(name.startswith("while") for name in names)  # the loop over the chunk's steps, and its body
    assert len({a["run_id"] for a in ops}) == 2
    # the same run without a profile: the same losses, and the same validation loss of the final weights
    code, out = run_in_process(capsys, "train", *FLAGS, "--out", tmp_path / "plain")
    assert code == 0, out.err
    assert "profile of" not in out.out and not (tmp_path / "plain" / "profile").exists()
    drop = ("tokens_per_s", "elapsed")
    plain, profiled = ([{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / run)] for run in ("plain", "profiled"))
    assert plain == profiled and [r["step"] for r in plain] == [3, 6] and "val_loss" in plain[-1]
    # a resumed run is past the window's start
    code, out = run_in_process(capsys, "train", "--resume", tmp_path / "plain", "--steps", "8", "--profile", "5:8")
    assert_one_line_error(code, out.err, "--profile 5:8: ", "resumes at step 6, after START; pass a START of at least 6")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--profile", "4"], "argument --profile: '4' is not START:STOP, two step numbers (e.g. 10:20)"),
        (["--profile", "a:b"], "'a:b' is not START:STOP"),
        (["--profile", "4:2"], "'4:2': START must be below STOP"),
        (["--profile", "3:3"], "'3:3': START must be below STOP"),
        (["--profile=-1:2"], "'-1:2': steps count from 0"),
        (["--profile", "-1:2"], "--profile: expected one argument (a value that starts with '-' goes as --profile=-1:2)"),
        (["--profile", "2:4"], "--profile 2:4 writes its trace into the run directory (RUN_DIR/profile); pass --out RUN_DIR"),
        (["--steps", "3", "--out", "RUN", "--profile", "2:4"], "--profile 2:4: the run ends at step 3; pass a STOP of at most 3"),
    ],
)
def test_a_bad_window_is_one_line(capsys, tmp_path, args, fragment):
    code, out = run_in_process(capsys, "train", *[tmp_path / "run" if a == "RUN" else a for a in args])
    assert_one_line_error(code, out.err, fragment)
    assert not (tmp_path / "run").exists()
