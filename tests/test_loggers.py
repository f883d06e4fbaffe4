"""The optional loggers (loggers.py): TensorBoard and W&B (offline) sinks of the loop's Log hook in a real run, read back
with their own readers."""

import json
import struct
import sys

import numpy as np
import pytest

from microgpt_jax import loggers, loop, train
from microgpt_jax.checkpoint import CheckpointConfig
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig
from microgpt_jax.rundir import RunConfig


def tiny_configs(steps=6):
    return RunConfig(
        model=GPTConfig(n_embd=8, n_head=2, block_size=8),
        train=train.TrainConfig(steps=steps, batch_size=2, log_every=2, eval_every=4),
        checkpoint=CheckpointConfig(save_every=100),
    )


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, names_path):
    """A 6-step run with both loggers among the Log hook's sinks, W&B offline: (run_dir, the records the loop made, configs)."""
    from microgpt_jax.session import Session

    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
            mp.setenv(name, value)
        for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_CONFIG_DIR", str(run_dir.parent / "wandb-config"))
        mp.setenv("WANDB_CACHE_DIR", str(run_dir.parent / "wandb-cache"))
        session = Session(tiny_configs(), names_path)
        state = session.initial_state()
        chain = session.hooks(state)
        records = []
        keep = type("Keep", (), {"write": lambda self, record: records.append(record)})
        (log,) = [hook for hook in chain if isinstance(hook, loop.Log)]
        log.sinks[:0] = [
            loggers.TensorBoard(run_dir, session.configs),
            loggers.WandB("microgpt-jax-test", run_dir, session.configs),
            keep(),
        ]
        loop.fit(session.trainer, state, session.data, chain)
    return run_dir, records, session.configs


def test_the_run_made_records_with_and_without_a_validation_loss(logged_run):
    _, records, _ = logged_run
    assert [r["step"] for r in records] == [2, 4, 6]
    assert ["val_loss" in r for r in records] == [False, True, True]  # eval_every 4, and at the end


# -- TensorBoard --------------------------------------------------------------------------


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_holds_every_record_at_its_step_and_the_configs(logged_run):
    run_dir, records, configs = logged_run
    acc = read_events(run_dir / "tb")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss"}
    names = [("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")]
    for tag, key in [*names, ("val/loss", "val_loss")]:
        want = [(r["step"], r[key]) for r in records if key in r]
        got = scalar_series(acc, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=tag)  # stored as float32
    (text,) = [tag for tag in tags["tensors"] if tag.startswith("config")]
    written = acc.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert "[model]" in written and "[train]" in written and "[data]" in written and "[checkpoint]" in written
    assert f"n_embd = {configs.model.n_embd}" in written and "log_every = 2" in written


def record(step, loss):
    return {"step": step, "loss": loss, "lr": 0.01, "tokens_per_s": 100.0, "elapsed": 1.0}


def test_a_resumed_run_appends_and_tensorboard_drops_the_steps_trained_again(tmp_path):
    configs = tiny_configs(steps=100)
    with loggers.TensorBoard(tmp_path, configs) as tb:
        for step in (2, 4, 6):
            tb.write(record(step, float(step)))
    # the run died after step 6 with its latest checkpoint at step 4: it resumes there and logs 6 and 8 again
    with loggers.TensorBoard(tmp_path, configs, resumed_at=4) as tb:
        for step in (6, 8):
            tb.write(record(step, 100.0 + step))
    assert len(list((tmp_path / "tb").iterdir())) == 2  # one event file per process run, same directory
    assert scalar_series(read_events(tmp_path / "tb"), "train/loss") == [(2, 2.0), (4, 4.0), (6, 106.0), (8, 108.0)]


# -- W&B ----------------------------------------------------------------------------------


def read_wandb_records(path):
    """The protobuf Records of a .wandb transaction log (wandb 0.31 ships no Python reader for it).

    The format is LevelDB's log: a 7-byte header (":W&B", magic 0xBEE1,
    version 0), then 32 KiB blocks of chunks, each [crc32 (4), length (2),
    type (1): 1 full, 2 first, 3 middle, 4 last] and its bytes; a block's
    tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path} is not a W&B transaction log"
    block, pos, pieces, out = 32 * 1024, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += block - pos % block
            continue
        pieces.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(pieces))
            out.append(rec)
            pieces = []
    return out


def wandb_history(run_dir):
    """{step: {key: value}} of the one offline W&B run under RUN_DIR/wandb, and its config record."""
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for rec in read_wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            history[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind in ("config", "run"):
            cfg = rec.config if kind == "config" else rec.run.config
            config.update({i.key: json.loads(i.value_json) for i in cfg.update})
    return history, config


def test_wandb_offline_run_holds_every_record_at_its_step(logged_run):
    run_dir, records, configs = logged_run
    history, config = wandb_history(run_dir)
    assert sorted(history) == [r["step"] for r in records]
    for r in records:
        assert history[r["step"]] == pytest.approx(loggers.scalars(r), rel=1e-12)
    assert "val/loss" in history[4] and "val/loss" not in history[2]
    assert config["model"]["n_embd"] == configs.model.n_embd and config["train"]["steps"] == 6


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run_dir = tmp_path / "run"
    ids = []
    for step in (2, 4):  # the run, then its resume
        with loggers.WandB("microgpt-jax-test", run_dir, tiny_configs()) as sink:
            sink.write(record(step, 1.0))
            ids.append(sink.run.id)
    kept = (run_dir / "wandb" / "run_id").read_text().strip()
    assert ids == [kept, kept]  # the same W&B run, not a new one
    assert {p.name for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")} == {f"run-{kept}.wandb"}


# -- a missing extra ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, extra, make",
    [
        ("tensorboardX", "tensorboard", lambda run_dir: loggers.TensorBoard(run_dir, tiny_configs())),
        ("wandb", "wandb", lambda run_dir: loggers.WandB("p", run_dir, tiny_configs())),
    ],
)
def test_a_missing_extra_is_one_line_saying_what_to_install(monkeypatch, tmp_path, module, extra, make):
    monkeypatch.setitem(sys.modules, module, None)  # its import fails as if it were not installed
    for attempt in (lambda: loggers.require(extra), lambda: make(tmp_path)):
        with pytest.raises(UserError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message
        assert message.endswith(f"pip install 'microgpt-jax[{extra}]'") and module in message
    assert not (tmp_path / "tb").exists()


# -- through the command line ----------------------------------------------------------------


def test_train_with_tensorboard_and_wandb_flags(tmp_path, capsys, monkeypatch):
    from microgpt_jax.metrics import read_metrics
    from tests.helpers import TINY, run_in_process

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run_dir = tmp_path / "run"
    flags = [*TINY, "--steps", "6", "--log-every", "2", "--eval-every", "4", "--tensorboard", "--wandb", "microgpt-jax-test"]
    code, out = run_in_process(capsys, "train", *flags, "--out", run_dir)
    assert code == 0, out.err
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == [2, 4, 6]
    assert [s for s, _ in scalar_series(read_events(run_dir / "tb"), "train/loss")] == steps
    history, config = wandb_history(run_dir)
    assert sorted(history) == steps and config["train"]["steps"] == 6


@pytest.mark.parametrize("module, flags", [("tensorboardX", ["--tensorboard"]), ("wandb", ["--wandb", "p"])])
def test_train_with_a_missing_extra_says_what_to_install_before_anything_else(tmp_path, capsys, monkeypatch, module, flags):
    from tests.helpers import assert_one_line_error, run_in_process

    monkeypatch.setitem(sys.modules, module, None)
    code, out = run_in_process(capsys, "train", *flags, "--out", tmp_path / "run")
    assert_one_line_error(code, out.err, "pip install 'microgpt-jax[")
    assert not (tmp_path / "run").exists()
    code, out = run_in_process(capsys, "train", "--tensorboard")
    assert_one_line_error(code, out.err, "--tensorboard writes into the run directory")
