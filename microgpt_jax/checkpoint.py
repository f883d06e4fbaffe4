"""The checkpoint store: save, read, verify and restore a run's TrainState with orbax.

    checkpoints/<step>/   orbax CheckpointManager steps, the last `keep` of them:
      params/             the weights, spec keys (`wte`, `layer0.attn_wq`, ...)
      opt_state/          Adam's state
      meta/               step, data position, the model and training configs, sha256 of every array (JSON)
      files.sha256.json   size and sha256 of every file above

A checkpoint is good when every file has the size and sha256 recorded when it
was written, orbax reads it, and every array read matches the sha256 recorded
with it. Only such evidence makes a checkpoint damaged: an OS error while
reading (too many open files, permission, I/O) is reported as what it is,
and a step removed while it was being read (by a training process's `keep`)
is passed over. Nothing here deletes or rewrites a good checkpoint: orbax
writes each step into a temporary directory and renames it into place, and
drops the oldest only after the new one is complete.
"""

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from microgpt_jax import parallel
from microgpt_jax.config import field, positive, validate, with_added_defaults
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig
from microgpt_jax.train import TrainConfig, TrainState, abstract_state

MANIFEST = "files.sha256.json"  # in each step directory, written once orbax has finished it
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written
STEP_NAME = re.compile(r"0|[1-9][0-9]*")  # a step directory's name, as orbax writes it


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    save_every: int = field(250, "save a checkpoint every N steps and at the end", check=positive, resumable=True)
    keep: int = field(3, "checkpoints kept; the oldest is removed once a new one is complete", check=positive, resumable=True)

    def __post_init__(self):
        validate(self)


class Damaged(Exception):
    """Evidence that a checkpoint is not what was saved: a checksum mismatch, a missing or truncated file."""


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


def _write_manifest(step_dir: Path):
    """Record the size and sha256 of every file orbax wrote for a step, so any damaged byte is found."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(step_dir)): [p.stat().st_size, file_sha256(p)] for p in files}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    tmp.replace(step_dir / MANIFEST)


def _check_manifest(step_dir: Path):
    """Raise Damaged naming the first file that is missing or differs from when it was saved.

    A step without a manifest (the process died between orbax's rename and the
    manifest) is checked by its arrays' sha256s alone.
    """
    path = step_dir / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise Damaged(f"{MANIFEST} is damaged") from None
    for name, (size, digest) in manifest.items():
        f = step_dir / name
        if not f.is_file():
            raise Damaged(f"{name} is missing")
        if f.stat().st_size != size:
            raise Damaged(f"{name} has {f.stat().st_size} bytes, {size} when saved")
        if file_sha256(f) != digest:
            raise Damaged(f"{name} does not match the sha256 recorded when it was saved")


@dataclasses.dataclass
class Checkpoint:
    """What one checkpoint holds: a whole TrainState, or (state.opt_state None) only the params."""

    state: TrainState
    data_position: int = 0

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self) -> dict:
        return self.state.params


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


def check_like(step, tree, like):
    """A state to save must be what the run reads back (abstract_state): else it would read as damaged. One line if not."""
    got, want = jax.tree.leaves_with_path(tree), jax.tree.leaves(like)
    if len(got) != len(want):
        raise ValueError(f"checkpoint {step}: the state has {len(got)} arrays, the run's config {len(want)}")
    for (path, a), w in zip(got, want):
        if (a.shape, a.dtype) != (w.shape, w.dtype):
            where = ("params", "opt_state")[path[0].idx] + jax.tree_util.keystr(path[1:])
            raise ValueError(f"checkpoint {step}: {where} is {a.dtype}{list(a.shape)}, the run's config makes it {w.dtype}{list(w.shape)}")


class CheckpointStore:
    """The checkpoints of one run, each a TrainState of the run's model config and weights' dtype.

    like: the state's shapes and dtypes, if not a run's (abstract_state): a sweep's, with its member axis.
    """

    def __init__(self, directory, cfg: GPTConfig, tcfg: TrainConfig, keep=3, damaged_dir=None, extended_from=(), tokenizer=None, like=None):
        self.directory, self.cfg, self.tcfg, self.keep = Path(directory), cfg, tcfg, keep
        self.tokenizer = tokenizer  # the run's tokenizer's sha256: each checkpoint records it, a read checks it
        self.extended_from = set(extended_from)  # step counts the run was extended from: a checkpoint may record them
        self.damaged_dir = Path(damaged_dir) if damaged_dir else self.directory.parent / "damaged"
        self.like = like or abstract_state(cfg, tcfg)  # the weights' dtype comes from here, and only here
        self._warned = set()

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
        with _quiet_orbax(), ocp.CheckpointManager(self.directory.resolve(), options=options) as manager:
            yield manager

    def steps(self) -> list:
        """Steps of the complete checkpoints, oldest first (damaged or not); odd names are skipped with a warning."""
        try:
            entries = [p for p in self.directory.iterdir() if p.is_dir()] if self.directory.is_dir() else []
        except OSError as e:
            raise UserError(f"could not list {self.directory} ({e.strerror or e})") from None
        steps = []
        for p in entries:
            if STEP_NAME.fullmatch(p.name):
                steps.append(int(p.name))
            elif TMP_MARK not in p.name and p.name not in self._warned:
                self._warned.add(p.name)
                print(f"warning: skipping {p}: not a checkpoint step directory (steps are named 0, 1, 2, ...)", file=sys.stderr)
        return sorted(steps)

    def latest(self) -> str:
        steps = self.steps()
        return f"the latest checkpoint is step {steps[-1]} in {self.directory}" if steps else "no checkpoint was saved"

    def check_no_files(self):
        """A file named as a step (checkpoints/30) would be deleted by orbax's save of that step: refused first."""
        files = sorted(p.name for p in self.directory.glob("*") if STEP_NAME.fullmatch(p.name) and not p.is_dir())
        if files:
            raise UserError(
                f"{self.directory} holds the file {files[0]} where checkpoint {files[0]} would be saved; "
                "move it out of the way (nothing was changed)"
            )

    def remove_partial(self):
        """Delete steps orbax never finished writing (a crash or a full disk mid-save): never a checkpoint."""
        self.check_no_files()
        if self.directory.is_dir() and parallel.is_main_process():
            for p in self.directory.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, state: TrainState, data_position: int):
        """Write checkpoint state.step; on any failure the checkpoints already there stay as they were.

        In a multi-process run every process calls this with the same
        (replicated) values: orbax has process 0 write the arrays and the
        processes wait for one another; process 0 writes the manifest.
        """
        import orbax.checkpoint as ocp

        step = int(state.step)
        if step in self.steps():
            return  # never overwrite a checkpoint in place
        self.check_no_files()
        params, opt_state = jax.tree.map(np.asarray, (state.params, state.opt_state))
        check_like(step, (params, opt_state), (self.like.params, self.like.opt_state))
        meta = {
            "step": step,
            "data_position": data_position,
            "model": dataclasses.asdict(self.cfg),
            "train": dataclasses.asdict(self.tcfg),  # what decides the rest of the run: a resume is checked against it
            **({"tokenizer_sha256": self.tokenizer} if self.tokenizer else {}),
            "sha256": {"params": tree_sha256(params), "opt_state": tree_sha256(opt_state)},
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
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
            self.remove_partial()
            kept = self.steps()
            intact = f"checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint was saved"
            raise UserError(f"could not save checkpoint {step} in {self.directory} ({_reason(e)}); {intact}") from None
        try:
            if parallel.is_main_process():
                _write_manifest(self.directory / str(step))
        except OSError as e:  # the checkpoint is whole: its arrays' sha256s still vouch for it
            (self.directory / str(step) / (MANIFEST + ".tmp")).unlink(missing_ok=True)
            print(
                f"warning: could not write {MANIFEST} of checkpoint {step} ({_reason(e)}); it will be checked by its arrays alone",
                file=sys.stderr,
            )
        parallel.barrier(f"saved-{step}")

    def _meta(self, step) -> dict:
        try:
            meta = json.loads((self.directory / str(step) / "meta" / "metadata").read_text())
        except (ValueError, UnicodeDecodeError, FileNotFoundError) as e:
            raise Damaged(f"meta/metadata is unreadable ({_reason(e)})") from None
        if not isinstance(meta, dict) or meta.get("step") != step or not isinstance(meta.get("sha256"), dict):
            raise Damaged("its meta/metadata does not describe this step")
        model = meta.get("model")
        model = with_added_defaults(GPTConfig, model) if isinstance(model, dict) else model  # a checkpoint older than a field
        if isinstance(model, dict) and model != dataclasses.asdict(self.cfg):
            name = next((k for k in sorted(model) if model[k] != getattr(self.cfg, k, None)), "model")
            raise UserError(
                f"checkpoint {step} was trained with {name} = {model.get(name)!r}, but run.json says "
                f"{getattr(self.cfg, name, None)!r}; restore run.json's model table (nothing was moved)"
            )
        self._check_training(step, meta.get("train"))
        recorded = meta.get("tokenizer_sha256")
        if recorded and self.tokenizer and recorded != self.tokenizer:
            raise UserError(
                f"checkpoint {step} was trained with another vocabulary than the run's (tokenizer_sha256 {recorded[:12]}...); "
                "restore run.json's vocab or tokenizer.json (nothing was moved)"
            )
        return meta

    def _check_training(self, step, recorded):
        """Checkpoint `step` was trained with the training config run.json has: an edit (lr, the schedule, the seed,
        ...) would silently change the rest of the run, or (grad_clip, weight_decay) the optimizer state's structure.
        Refused before any array is read, so nothing is taken for damage. Only the steps may differ, by an extension."""
        if not isinstance(recorded, dict):
            return  # written before checkpoints recorded their training config
        recorded = with_added_defaults(TrainConfig, recorded)
        for f in dataclasses.fields(TrainConfig):
            was, now = recorded.get(f.name), getattr(self.tcfg, f.name)
            if f.metadata.get("resumable") or was == now or (f.name == "steps" and was in self.extended_from):
                continue
            raise UserError(
                f"checkpoint {step} was trained with train.{f.name} = {was!r}, but run.json says {now!r}; restore run.json's "
                f"train table (nothing was moved; to train with another {f.name}, start a new run with --init-from)"
            )

    def read(self, step, with_opt_state=True) -> Checkpoint:
        """Checkpoint `step`, verified. Raises Damaged on evidence of damage, OSError on a failed read."""
        import orbax.checkpoint as ocp

        _check_manifest(self.directory / str(step))
        meta = self._meta(step)
        numpy_like = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)  # noqa: E731
        items = {"params": ocp.args.StandardRestore(numpy_like(self.like.params))}
        if with_opt_state:
            items["opt_state"] = ocp.args.StandardRestore(numpy_like(self.like.opt_state))
        try:
            with self._manager(read_only=True) as manager:
                got = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            os_error = _os_error(e)
            if os_error is not None:
                raise os_error from None
            raise Damaged(_reason(e)) from None
        for item in items:
            want = meta["sha256"].get(item, {})
            for path, digest in tree_sha256(got[item]).items():
                if want.get(path) != digest:
                    raise Damaged(f"{item}{path} does not match the sha256 recorded when it was saved")
        state = TrainState(got["params"], got.get("opt_state"), np.int32(step))
        return Checkpoint(state, meta.get("data_position", 0))

    def restore(self, with_opt_state=True, move_damaged=False, warn=None) -> Checkpoint:
        """The latest good checkpoint. A damaged one is named in a warning and skipped
        (moved to RUN_DIR/damaged/ with move_damaged, so the next save never meets it).
        """
        warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        damaged, gone = [], set()
        while True:
            left = [s for s in reversed(self.steps()) if s not in damaged and s not in gone]
            if not left:
                break
            step = left[0]
            try:
                checkpoint = self.read(step, with_opt_state)
            except Exception as e:
                if not (self.directory / str(step)).is_dir():
                    gone.add(step)  # removed while we read it (another process's `keep`): not damage
                    continue
                if isinstance(e, OSError):
                    raise UserError(
                        f"could not read checkpoint {step} in {self.directory} ({e.strerror or e}); nothing was moved: "
                        "fix the cause and try again"
                    ) from None
                if not isinstance(e, Damaged):
                    raise
                damaged.append(step)
                moved = f"; moved it to {self._move_aside(step)}" if move_damaged else ""
                warn(f"checkpoint {self.directory / str(step)} is damaged ({e}){moved}")
                continue
            if damaged:
                warn(f"using checkpoint {checkpoint.step}, the latest good one")
            return checkpoint
        if damaged:
            raise UserError(f"every checkpoint in {self.directory} is damaged (steps {', '.join(map(str, damaged))}); start a new run")
        raise UserError(
            f"{self.directory.parent} has no checkpoint yet; train it with `microgpt-jax train --resume {self.directory.parent}`"
        )

    def checkpoint(self, step) -> Checkpoint:
        """The params of checkpoint `step` (RUN_DIR@STEP): that one or an error, never another."""
        steps = self.steps()
        if step not in steps:
            kept = ", ".join(map(str, steps)) or "none"
            raise UserError(f"{self.directory.parent} has no checkpoint {step} (its checkpoints: {kept})")
        try:
            return self.read(step, with_opt_state=False)
        except Damaged as e:
            raise UserError(f"checkpoint {step} in {self.directory} is damaged ({e}); pass another step") from None
        except OSError as e:
            raise UserError(f"could not read checkpoint {step} in {self.directory} ({e.strerror or e})") from None

    def _move_aside(self, step) -> Path:
        target = self.damaged_dir / str(step)
        n = 1
        while target.exists():
            target = self.damaged_dir / f"{step}.{n}"
            n += 1
        try:
            target.parent.mkdir(exist_ok=True)
            os.rename(self.directory / str(step), target)
        except OSError as e:
            raise UserError(
                f"checkpoint {step} is damaged, and could not be moved to {target} ({e.strerror or e}); "
                f"{self.damaged_dir} must be a writable directory: move what is there away and try again (nothing was moved)"
            ) from None
        return target


def _os_error(e: BaseException):
    """The OSError behind an exception orbax raised (it wraps them), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            return e
        e = e.__cause__ or e.__context__
    return None
