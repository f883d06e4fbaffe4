"""Sweeps and compare: each member is its solo run (float64, within check's tolerances), an ordinary run directory,
resumed bit for bit; a member gone NaN is frozen; one trace serves every member and step; compare's paired intervals."""

import json
import math
import signal

import numpy as np
import pytest

from microgpt_jax import train as train_module
from microgpt_jax.rundir import load_weights
from microgpt_jax.sweep import paired_interval
from tests.helpers import TINY, assert_close, assert_one_line_error, run_in_process

# 4 docs per step in 2 micro-batches, dropout on: every member's flags a solo run can have
COMMON = [*TINY, "--dtype", "float64", "--batch-size", "4", "--grad-accum", "2", "--steps", "6"]
COMMON += ["--log-every", "3", "--eval-every", "3", "--save-every", "3", "--eval-size", "32"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "step" in line]


def test_members_are_their_solo_runs_in_float64_and_ordinary_runs(capsys, tmp_path):
    """Seeds 3 and 8 x lr 0.01, 0.004 x dropout 0, 0.1 (8 members) in one program; two of them against their solo runs."""
    sweep_dir = tmp_path / "s"
    sets = ["--seeds", "3,8", "--set", "lr=0.01,0.004", "--set", "dropout=0.0,0.1"]
    assert run_in_process(capsys, "sweep", "--out", sweep_dir, *COMMON, *sets)[0] == 0
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["members"]) == 8 and len(summary["settings"]) == 4
    for setting in summary["settings"]:
        vals = [m["val_loss"] for m in summary["members"] if m["values"] == setting["settings"]]
        assert setting["seeds"] == [3, 8]
        assert setting["val_loss_mean"] == pytest.approx(np.mean(vals)) and setting["val_loss_std"] == pytest.approx(np.std(vals, ddof=1))
    assert (sweep_dir / "loss.png").stat().st_size > 0
    for seed, lr, dropout in [(8, 0.004, 0.0), (3, 0.01, 0.1)]:
        member = sweep_dir / "runs" / f"seed={seed},lr={lr},dropout={dropout}"
        solo = tmp_path / f"solo{seed}"
        code, _ = run_in_process(capsys, "train", "--out", solo, *COMMON, "--seed", seed, "--lr", lr, "--dropout", dropout)
        assert code == 0
        got, want = records(member), records(solo)
        assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6]
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            assert_close([r[key] for r in got], [r[key] for r in want], key)
        weights, solo_weights = load_weights(member), load_weights(solo)
        assert weights.origin["step"] == 6
        for name, w in solo_weights.params.items():
            assert_close(weights.params[name], w, name)
    # an ordinary run: it trains on alone as its solo twin does (its checkpoint holds its own optimizer's state)
    for run in (member, solo):
        code, _ = run_in_process(capsys, "train", "--resume", run, "--steps", "8")
        assert code == 0
    for name, w in load_weights(solo).params.items():
        assert_close(load_weights(member).params[name], w, name)


def test_a_stopped_sweep_resumes_bit_for_bit(capsys, tmp_path, monkeypatch):
    flags = [*TINY, "--steps", "8", "--log-every", "2", "--eval-every", "4", "--save-every", "2", "--seeds", "2", "--set", "lr=0.01,0.02"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_in_process(capsys, "sweep", "--out", whole, *flags)[0] == 0
    from microgpt_jax.loop import Signals

    calls = []

    def poll(self):  # a SIGTERM after the second chunk (step 4)
        calls.append(1)
        return ("SIGTERM", 128 + signal.SIGTERM) if len(calls) == 2 else None

    monkeypatch.setattr(Signals, "poll", poll)
    code, out = run_in_process(capsys, "sweep", "--out", stopped, *flags)
    assert code == 128 + signal.SIGTERM and "saved checkpoint 4" in out.err and f"sweep --resume {stopped}" in out.err
    monkeypatch.undo()
    # the members' runs got their state at the stop; then a resume finishes the sweep
    assert load_weights(stopped / "runs" / "seed=1,lr=0.02").origin["step"] == 4
    assert run_in_process(capsys, "sweep", "--resume", stopped)[0] == 0
    for member in ("seed=0,lr=0.01", "seed=1,lr=0.02"):
        a, b = load_weights(whole / "runs" / member), load_weights(stopped / "runs" / member)
        assert a.origin["step"] == b.origin["step"] == 8
        for name in a.params:
            np.testing.assert_array_equal(a.params[name], b.params[name], name)
        assert [r["loss"] for r in records(whole / "runs" / member)] == [r["loss"] for r in records(stopped / "runs" / member)]
    # a sweep saved at its end but stopped before its members' runs were written: the resume writes them
    member_checkpoints = stopped / "runs" / "seed=0,lr=0.01" / "checkpoints"
    for step in member_checkpoints.iterdir():
        if step.name == "8":
            step.rename(member_checkpoints / "8.orbax-checkpoint-tmp-1")
    assert run_in_process(capsys, "sweep", "--resume", stopped)[0] == 0
    assert load_weights(stopped / "runs" / "seed=0,lr=0.01").origin["step"] == 8


def test_a_member_gone_nan_is_frozen_and_the_others_train_on_one_trace_for_all(capsys, tmp_path, monkeypatch):
    """A member whose weights blow up stops at its last good step; the sweep's member step is traced twice (its
    metrics' shapes, the loop) whatever the members and chunks: no retracing per member or per step."""
    traces = []
    real = train_module._member_step
    monkeypatch.setattr(train_module, "_member_step", lambda *a, **k: traces.append(1) or real(*a, **k))
    out = tmp_path / "s"
    flags = [*TINY, "--steps", "7", "--log-every", "2", "--eval-every", "3", "--seeds", "2", "--set", "lr=0.01,1e30"]
    code, printed = run_in_process(capsys, "sweep", "--out", out, *flags)
    assert code == 0, printed.err
    assert len(traces) == 2
    assert "member seed=0,lr=1e+30: loss or weights non-finite" in printed.out
    summary = {m["name"]: m for m in json.loads((out / "summary.json").read_text())["members"]}
    frozen, live = summary["seed=1,lr=1e+30"], summary["seed=1,lr=0.01"]
    assert frozen["frozen"] and frozen["steps"] < 7 and not live["frozen"] and live["steps"] == 7
    weights = load_weights(out / "runs" / "seed=1,lr=1e+30")  # its last good state
    assert weights.origin["step"] == frozen["steps"] and all(np.isfinite(w).all() for w in weights.params.values())
    assert all(r["step"] <= frozen["steps"] for r in records(out / "runs" / "seed=1,lr=1e+30"))


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--set", "n_embd=8,16"], ["--set n_embd", "compare"]),
        (["--set", "seed=1,2"], ["--seeds"]),
        (["--set", "lr=fast"], ["must be a float"]),
        (["--set", "lr"], ["FIELD=V1,V2"]),
        (["--set", "warmup=0,20"], ["member seed=0,warmup=20", "warmup"]),
        (["--seeds", "3-"], ["--seeds"]),
        (["--seeds", "1,1"], ["distinct"]),
        (["--set", "lr=0.1", "--set", "lr=0.2"], ["each field once"]),
    ],
)
def test_bad_members_are_one_line(capsys, tmp_path, flags, fragments):
    code, out = run_in_process(capsys, "sweep", "--out", tmp_path / "s", "--steps", "10", *flags)
    assert_one_line_error(code, out.err, *fragments)
    assert not (tmp_path / "s").exists()


def test_paired_interval_is_the_t_interval_of_the_differences():
    diffs = [0.01, 0.03, -0.005, 0.02, 0.012]
    mean, low, high = paired_interval(diffs)
    half = 2.7764451051977987 * np.std(diffs, ddof=1) / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert mean == pytest.approx(np.mean(diffs)) and (low, high) == pytest.approx((mean - half, mean + half))
    assert all(math.isnan(x) for x in paired_interval([0.1])[1:])


def test_compare_pairs_each_variant_with_the_baseline_by_seed(capsys, tmp_path):
    """A same-shape variant (lr) shares the baseline's program, another shape (qk-norm) gets its own; every number is a
    member's validation loss, and its difference the paired one."""
    path = tmp_path / "c.json"
    flags = [*TINY, "--steps", "4", "--eval-every", "4", "--eval-size", "32", "--seeds", "3"]
    code, out = run_in_process(capsys, "compare", *flags, "--variant", "--lr 0.03", "--variant", "--qk-norm", "--json", path)
    assert code == 0, out.err
    assert "group 1 of 2: baseline, --lr 0.03" in out.out and "group 2 of 2: --qk-norm" in out.out
    result = json.loads(path.read_text())
    base, lr, qk = result["variants"]
    assert [v["variant"] for v in result["variants"]] == ["baseline", "--lr 0.03", "--qk-norm"]
    for v in (lr, qk):
        diffs = [v["val_loss"][s] - base["val_loss"][s] for s in ("0", "1", "2")]
        assert (v["diff"], *v["ci95"]) == pytest.approx(paired_interval(diffs))
        assert v["distinguishable"] == (not v["ci95"][0] <= 0 <= v["ci95"][1])
        verdict = next(line for line in out.out.splitlines() if line.startswith(f"{v['variant']}: "))
        assert ("is not distinguishable" in verdict) == (not v["distinguishable"]), verdict


def test_a_used_directory_and_a_missing_sweep_are_one_line(capsys, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    code, out = run_in_process(capsys, "sweep", "--out", used, "--steps", "10")
    assert_one_line_error(code, out.err, "not empty")
    assert (used / "notes.txt").read_text() == "mine"
    code, out = run_in_process(capsys, "sweep", "--resume", used)
    assert_one_line_error(code, out.err, "not a sweep directory")
    (used / "sweep.json").write_text(json.dumps({"format": "microgpt-jax sweep", "version": 1, "members": 3}))
    code, out = run_in_process(capsys, "sweep", "--resume", used)  # an edited sweep.json
    assert_one_line_error(code, out.err, "sweep.json", "restore it from a copy")
    code, out = run_in_process(capsys, "compare", "--steps", "10")
    assert_one_line_error(code, out.err, "--variant")
