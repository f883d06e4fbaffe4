"""Run directories: configs, vocabulary and orbax checkpoints; exact resume; faults.

    RUN_DIR/
      run.json              model config, training config, vocabulary, the data file
                            (absolute path and sha256) and the checkpoint schedule
      checkpoints/<step>/   orbax CheckpointManager steps, the last `keep` of them:
        params/             the weights, spec keys (`wte`, `layer0.attn_wq`, ...)
        train_state/        the optimizer state and the random key
        meta/               step, data position, sha256 of every array saved (JSON)
        files.sha256.json   size and sha256 of every file above
      damaged/<step>/       checkpoints that failed their check, moved aside on resume

A checkpoint is good when every file has the size and sha256 recorded when it
was written, orbax reads it, and every array read matches the sha256 recorded
with it: a flipped, truncated or missing byte anywhere is caught, even in a
file the storage format would not read or would not check. Nothing here deletes
or rewrites a good checkpoint: orbax writes each step into a temporary
directory and renames it into place, and drops the oldest only after the new
one is complete.

The training loop uses `Keeper` at the end of each compiled chunk of steps: it
stops on a non-finite loss (saving nothing), saves on schedule and at the end,
and turns SIGINT/SIGTERM into "finish this chunk, save, exit".
"""

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from microgpt_jax import parallel
from microgpt_jax.data import Vocab
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig, param_shapes
from microgpt_jax.train import TrainConfig

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged"
FORMAT = "microgpt-jax run"
VERSION = 1
MANIFEST = "files.sha256.json"  # in each step directory, written once orbax has finished it
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_sha256(x) -> str:
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def tree_sha256(tree) -> dict:
    """{path: sha256 of dtype, shape and bytes} for every array of a pytree."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): _array_sha256(leaf) for path, leaf in leaves}


def step_key(seed: int, step: int):
    """The random key a run continues with after `step` steps (a pure function of seed and step)."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), step))


def _write_manifest(step_dir: Path):
    """Record the size and sha256 of every file orbax wrote for a step, so any damaged byte is found."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(step_dir)): [p.stat().st_size, file_sha256(p)] for p in files}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    tmp.replace(step_dir / MANIFEST)


def _check_manifest(step_dir: Path):
    """Raise ValueError naming the first file that is missing or differs from when it was saved.

    A step without a manifest (the process died between orbax's rename and the
    manifest) is checked by its arrays' sha256s alone.
    """
    path = step_dir / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{MANIFEST} is damaged") from None
    for name, (size, digest) in manifest.items():
        f = step_dir / name
        if not f.is_file():
            raise ValueError(f"{name} is missing")
        if f.stat().st_size != size:
            raise ValueError(f"{name} has {f.stat().st_size} bytes, {size} when saved")
        if file_sha256(f) != digest:
            raise ValueError(f"{name} does not match the sha256 recorded when it was saved")


@dataclasses.dataclass
class Checkpoint:
    """What one checkpoint holds. opt_state and key are None when only the params were read."""

    step: int
    params: dict
    opt_state: object = None
    key: np.ndarray = None
    data_position: int = 0


def _numpy_like(tree):
    """A restore target: orbax reads into host numpy arrays of these shapes and dtypes."""
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax reports a failed write or an unreadable file from several threads, through absl
    and asyncio logs and thread tracebacks; we report it ourselves, in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    hooks = threading.excepthook, sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    threading.excepthook = sys.unraisablehook = lambda *args: None
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        threading.excepthook, sys.unraisablehook = hooks


class Run:
    """A run directory: its run.json, and its checkpoints through an orbax CheckpointManager."""

    def __init__(self, path, meta):
        self.path = Path(path)
        self.meta = meta
        self.cfg = GPTConfig(**meta["model"])
        self.tcfg = TrainConfig(**meta["train"])
        self.vocab = Vocab(meta["vocab"])
        self.data_path = Path(meta["data"]["path"])
        self.data_sha256 = meta["data"]["sha256"]
        self.save_every = meta["checkpoints"]["save_every"]
        self.keep = meta["checkpoints"]["keep"]

    # -- the run directory ------------------------------------------------------------

    @classmethod
    def create(cls, path, cfg: GPTConfig, tcfg: TrainConfig, vocab: Vocab, data_path, save_every=1000, keep=3):
        """A new run directory. Refuses a path that holds anything, above all an existing run.

        In a multi-process run every process checks, then process 0 writes.
        """
        path = Path(path)
        if (path / RUN_FILE).exists():
            raise UserError(
                f"{path} is an existing run; continue it with `microgpt-jax train --resume {path}`, "
                "or pass a new directory to --out"
            )
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"--out {path} already exists and is not empty; pass a new directory so nothing is overwritten")
        data_path = Path(data_path).resolve()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": dataclasses.asdict(cfg),
            "train": dataclasses.asdict(tcfg),
            "vocab": vocab.chars,
            "data": {"path": str(data_path), "sha256": file_sha256(data_path)},
            "checkpoints": {"save_every": save_every, "keep": keep},
        }
        parallel.barrier("run-create-checked")  # no process checks a directory process 0 has begun writing
        if parallel.is_main_process():
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / (RUN_FILE + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            tmp.replace(path / RUN_FILE)  # atomic: run.json is whole or absent
        parallel.barrier("run-created")
        return cls(path, meta)

    @classmethod
    def open(cls, path):
        path = Path(path)
        run_file = path / RUN_FILE
        if not run_file.is_file():
            raise UserError(f"{path} is not a run directory (no {RUN_FILE}); pass one written by `microgpt-jax train --out DIR`")
        try:
            meta = json.loads(run_file.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
            return cls(path, meta)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{run_file} is damaged ({_reason(e)}); restore it from a copy, or start a new run with --out"
            ) from None

    def check_config(self, given: dict):
        """Every config flag given on resume must equal the run's: name the first that does not."""
        saved = {**self.meta["model"], **self.meta["train"]}
        for name, value in given.items():
            if name in saved and saved[name] != value:
                flag = "--" + name.replace("_", "-")
                raise UserError(
                    f"{flag} {value} does not match the run's {name} = {saved[name]!r} ({self.path / RUN_FILE}); "
                    f"drop {flag} to resume the run as it was, or start a new run with --out"
                )

    def check_data(self, data_path):
        """The data must be the very file the run was trained on: its order and vocabulary decide every step."""
        data_path = Path(data_path)
        if not data_path.is_file():
            raise UserError(f"the run's data file {data_path} is missing; pass a copy of it with --data PATH")
        if file_sha256(data_path) != self.data_sha256:
            raise UserError(
                f"data file {data_path} differs from the one the run was trained on ({self.data_path}, "
                f"sha256 {self.data_sha256[:12]}...); pass that file with --data PATH"
            )

    # -- checkpoints ------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @contextlib.contextmanager
    def _manager(self, read_only=False):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else self.keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=False,  # a save has succeeded or failed when save() returns
            read_only=read_only,
            create=not read_only,
        )
        with _quiet_orbax(), ocp.CheckpointManager(self.checkpoint_dir.resolve(), options=options) as manager:
            yield manager

    def steps(self) -> list:
        """Steps of the complete checkpoints, oldest first (damaged or not)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def _remove_partial(self):
        """Delete steps orbax never finished writing (a crash or a full disk mid-save): never a checkpoint."""
        if self.checkpoint_dir.is_dir() and parallel.is_main_process():
            for p in self.checkpoint_dir.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, params, opt_state, key, data_position: int):
        """Write checkpoint `step`; on any failure the checkpoints already there stay as they were.

        In a multi-process run every process calls this with the same
        (replicated) values: orbax has process 0 write the arrays and the
        processes wait for one another; process 0 writes the manifest.
        """
        import orbax.checkpoint as ocp

        if step in self.steps():
            return  # never overwrite a checkpoint in place
        params = jax.tree.map(np.asarray, params)
        train_state = {"opt_state": jax.tree.map(np.asarray, opt_state), "key": np.asarray(key)}
        meta = {
            "step": step,
            "data_position": data_position,
            "sha256": {"params": tree_sha256(params), "train_state": tree_sha256(train_state)},
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            with self._manager() as manager:
                manager.save(step, args=args, force=True)
        except Exception as e:
            with _quiet_orbax():
                # orbax raises at the first failed write while others are still in flight:
                # let them fail quietly before the partial step is deleted
                time.sleep(0.5)
                gc.collect()
            self._remove_partial()
            kept = self.steps()
            intact = f"checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint was saved"
            raise UserError(
                f"could not save checkpoint {step} in {self.checkpoint_dir} ({_reason(e)}); {intact}; "
                f"fix the disk and resume with `microgpt-jax train --resume {self.path}`"
            ) from None
        try:
            if parallel.is_main_process():
                _write_manifest(self.checkpoint_dir / str(step))
        except OSError as e:  # the checkpoint is whole: its arrays' sha256s still vouch for it
            (self.checkpoint_dir / str(step) / (MANIFEST + ".tmp")).unlink(missing_ok=True)
            print(f"warning: could not write {MANIFEST} of checkpoint {step} ({_reason(e)}); "
                  "it will be checked by its arrays alone", file=sys.stderr)
        parallel.barrier(f"saved-{step}")

    def read(self, step, opt_state_like=None) -> Checkpoint:
        """Checkpoint `step`, checked against its sha256s; raises ValueError saying what is wrong."""
        import orbax.checkpoint as ocp

        _check_manifest(self.checkpoint_dir / str(step))
        params_like = {name: np.zeros(shape, self.tcfg.dtype) for name, shape in param_shapes(self.cfg).items()}
        items = {"params": ocp.args.StandardRestore(params_like), "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            state_like = {"opt_state": _numpy_like(opt_state_like), "key": np.zeros_like(step_key(0, 0))}
            items["train_state"] = ocp.args.StandardRestore(state_like)
        try:
            with self._manager(read_only=True) as manager:
                got = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise ValueError(_reason(e)) from None
        meta = got["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step or "sha256" not in meta:
            raise ValueError("its meta/metadata does not describe this step")
        for item in [k for k in ("params", "train_state") if k in got]:
            want = meta["sha256"].get(item, {})
            for path, digest in tree_sha256(got[item]).items():
                if want.get(path) != digest:
                    raise ValueError(f"{item}{path} does not match the sha256 recorded when it was saved")
        state = got.get("train_state") or {}
        return Checkpoint(step, got["params"], state.get("opt_state"), state.get("key"), meta["data_position"])

    def restore(self, opt_state_like=None, move_damaged=False, warn=None) -> Checkpoint:
        """The latest good checkpoint. A damaged one is named in a warning and skipped
        (moved to RUN_DIR/damaged/ with move_damaged, so the next save never meets it).

        With opt_state_like (an optimizer state of the right structure), the optimizer
        state and key are read too; without it, only the params.
        """
        warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        steps = self.steps()
        if not steps:
            raise UserError(f"{self.path} has no checkpoint yet; train it with `microgpt-jax train --resume {self.path}`")
        damaged = []
        for step in reversed(steps):
            try:
                checkpoint = self.read(step, opt_state_like)
            except ValueError as e:
                damaged.append(step)
                moved = f"; moved it to {self._move_aside(step)}" if move_damaged else ""
                warn(f"checkpoint {self.checkpoint_dir / str(step)} is damaged ({e}){moved}")
                continue
            if damaged:
                warn(f"using checkpoint {checkpoint.step}, the latest good one")
            return checkpoint
        raise UserError(
            f"every checkpoint of {self.path} is damaged (steps {', '.join(map(str, damaged))}); "
            "start a new run with --out"
        )

    def resume(self, opt_state_like, data_position):
        """The checkpoint to continue from (None: none saved yet, start at step 0).

        Damaged checkpoints are moved aside, half-written ones deleted, and the
        checkpoint's data position must be where this data puts its step. In
        a multi-process run process 0 does the moving and deleting, and
        every process continues from the same checkpoint.
        """
        self._remove_partial()
        parallel.barrier("resume-cleaned")
        if not self.steps():
            return None
        main = parallel.is_main_process()
        checkpoint = self.restore(opt_state_like, move_damaged=main, warn=None if main else (lambda message: None))
        steps = parallel.gather_int(checkpoint.step)  # also waits for process 0's moving aside
        if len(set(steps)) > 1:
            raise UserError(
                f"the processes found different latest good checkpoints (steps {steps}) in {self.checkpoint_dir}; "
                "every process must see the same run directory (a shared file system)"
            )
        if checkpoint.data_position != data_position(checkpoint.step):
            raise UserError(
                f"checkpoint {checkpoint.step} was at data position {checkpoint.data_position}, but this data order "
                f"puts step {checkpoint.step} at {data_position(checkpoint.step)}; resume with the run's data and version"
            )
        return checkpoint

    def _move_aside(self, step) -> Path:
        target = self.path / DAMAGED / str(step)
        n = 1
        while target.exists():
            target = self.path / DAMAGED / f"{step}.{n}"
            n += 1
        target.parent.mkdir(exist_ok=True)
        os.replace(self.checkpoint_dir / str(step), target)
        return target


def load_run(run_dir):
    """(GPTConfig, TrainConfig, Vocab, params) of a run directory: params of its latest good checkpoint."""
    run = Run.open(run_dir)
    return run.cfg, run.tcfg, run.vocab, run.restore().params


def export_safetensors(run_dir, out_path):
    """The latest good params as safetensors (spec keys), vocabulary and configs in the metadata."""
    from safetensors.numpy import save_file

    out_path = Path(out_path)
    if out_path.exists():
        raise UserError(f"{out_path} already exists; pass a new file name so nothing is overwritten")
    if not out_path.parent.is_dir():
        raise UserError(f"directory {out_path.parent} does not exist; create it or pass another OUT path")
    run = Run.open(run_dir)
    checkpoint = run.restore()
    metadata = {
        "format": "microgpt-jax",
        "vocab": run.vocab.chars,
        "model": json.dumps(run.meta["model"]),
        "train": json.dumps(run.meta["train"]),
        "step": str(checkpoint.step),
    }
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in checkpoint.params.items()}, str(tmp), metadata=metadata)
    tmp.replace(out_path)  # atomic: OUT is whole or absent
    return checkpoint.step


# -- the training loop's side: signals, non-finite losses, the save schedule ----------------


class Stopped(UserError):
    """Training stopped early; the message says where things stand. Exit 128 + signal number for a signal."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def first_nonfinite(losses):
    """Index of the first NaN or infinite loss, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses)))
    return int(bad[0]) if bad.size else None


def all_finite(tree) -> bool:
    """No NaN or infinity in any floating-point array of the tree."""
    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.inexact))


class Keeper:
    """Checkpointing for a training loop that runs compiled chunks of steps.

    Inside `with Keeper(...)`, SIGINT and SIGTERM set a flag instead of
    interrupting (a second one interrupts at once): the running chunk finishes,
    `end_chunk` saves it and raises Stopped. `end_chunk` also raises Stopped at
    the first NaN or infinite loss of a chunk, saving nothing of that chunk, so
    the latest checkpoint stays the last good one. It saves every `save_every`
    steps and at the last step; chunks must end on those steps (`run_steps(...,
    align=save_every)`).
    """

    def __init__(self, run: Run, total_steps: int, save_every: int, data_position):
        self.run, self.total, self.save_every = run, total_steps, save_every
        self.data_position = data_position  # step -> position of that step's first document in the data order
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing the current steps, then saving "
            "(send it again to quit without saving)",
            file=sys.stderr,
            flush=True,
        )

    def _latest(self):
        steps = self.run.steps() if self.run else []
        return f"the latest checkpoint is step {steps[-1]} in {self.run.path}" if steps else "no checkpoint was saved"

    def end_chunk(self, first: int, losses, params, opt_state):
        """After the chunk of steps [first, first + len(losses)) (0-based): stop, save, or go on."""
        advice = "lower --lr or change the config, and start a new run with --out"
        bad = first_nonfinite(losses)
        if bad is not None:
            raise Stopped(
                f"loss is {float(losses[bad])} at step {first + bad + 1}: training stopped there and saved nothing "
                f"after it; {self._latest()} ({advice})"
            )
        step = first + len(losses)
        if jax.process_count() > 1:  # a signal to any process stops all of them at the same step
            self.signum = next((s for s in parallel.gather_int(self.signum or 0) if s), None)
        if self.run and (step % self.save_every == 0 or step == self.total or self.signum is not None):
            # a finite loss can still come with weights that just overflowed: never save those
            params, opt_state = jax.tree.map(np.asarray, (params, opt_state))
            if not all_finite((params, opt_state)):
                raise Stopped(
                    f"weights are NaN or infinite after step {step} (its loss was finite): training stopped there "
                    f"and saved nothing after it; {self._latest()} ({advice})"
                )
            self.run.save(step, params, opt_state, step_key(self.run.tcfg.seed, step), self.data_position(step))
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            if self.run:
                message = f"{name} at step {step}: saved checkpoint {step}; resume with `microgpt-jax train --resume {self.run.path}`"
            else:
                message = f"{name} at step {step}: nothing saved (no --out); pass --out RUN_DIR to be able to resume"
            raise Stopped(message, exit_code=128 + self.signum)
