"""A run directory: run.json (create, open, validate), the lock, and where the rest lives.

    RUN_DIR/
      run.json          the configs (model, train, data, checkpoint tables), the vocabulary
                        (char tokenizer), the data file or dataset (absolute path and sha256)
      tokenizer.json    the bpe tokenizer (Hugging Face `tokenizers` format), for --tokenizer bpe
      checkpoints/      the checkpoint store (checkpoint.py)
      damaged/          checkpoints that failed their check, moved aside on resume
      metrics.jsonl     one record per line, appended (metrics.py)
      loss.png          the loss curves
      profile/          a JAX profiler trace of some steps (train --profile START:STOP)
      .lock             held by the process training the run (its pid inside)

run.json is validated on open by the same config classes as the flags: a
wrong value is refused naming the table and field, before anything is read
or moved.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from microgpt_jax import hf, parallel
from microgpt_jax.checkpoint import CheckpointConfig, CheckpointStore
from microgpt_jax.config import ConfigError, from_dict, read_toml, resumable_fields, to_toml
from microgpt_jax.data import DataConfig
from microgpt_jax.dataset import adopt, data_sha256, is_dataset
from microgpt_jax.errors import UserError
from microgpt_jax.jsonfile import check_format, read_json
from microgpt_jax.model import GPTConfig, param_shapes
from microgpt_jax.text import resolve_data_path
from microgpt_jax.tokenizer import BPETokenizer, CharTokenizer, from_json, tokenizer_sha256
from microgpt_jax.train import TrainConfig

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".lock"
FORMAT = "microgpt-jax run"
VERSION = 2
SCHEDULE_RULE = (
    "an extended run continues on the schedule of a run planned for the new number of steps N: "
    "from the step it was extended at, the learning rate is lr * (1 - step / N) (after any warmup)"
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's configs: one per table of run.json and of a config file, [model], [train], [data], [checkpoint]."""

    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    TABLES: ClassVar[dict] = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig}
    FROM_DATA: ClassVar[tuple] = ("vocab_size",)  # set from the data (a config file's is the size asked for: bpe's)
    FILE_ONLY: ClassVar[dict] = {"data": {"path": str}}  # a config file's keys beyond the fields: the data, as --data

    @classmethod
    def of(cls, tables: dict) -> "RunConfig":
        """From {table: {field: value}}: each field's default, the given value over it (checked by its class)."""
        return cls(**{table: config_class(**tables.get(table, {})) for table, config_class in cls.TABLES.items()})

    @classmethod
    def from_json(cls, meta: dict) -> "RunConfig":
        """From run.json's tables, every field present (but those added `since`): a ConfigError names table.field."""
        configs = {}
        for table, config_class in cls.TABLES.items():
            try:
                configs[table] = from_dict(config_class, meta.get(table))
            except ConfigError as e:
                raise ConfigError(f"{table}.{e.field}".rstrip("."), e.problem) from None
        return cls(**configs)

    def to_json(self) -> dict:
        return {table: dataclasses.asdict(config) for table, config in self.items()}

    def items(self) -> list:
        """[(table, config)] in the tables' order, as a dict's items (config.to_toml and the loggers read them)."""
        return [(table, getattr(self, table)) for table in self.TABLES]

    def replace(self, **tables) -> "RunConfig":
        return dataclasses.replace(self, **tables)

    @classmethod
    def read_toml(cls, path) -> dict:
        """A config file's {table: {field: value}}, each table checked by its class (config.read_toml)."""
        return read_toml(path, cls.TABLES, extra=cls.FILE_ONLY)

    def to_toml(self, data_path=None, vocab_known=True) -> str:
        """These configs as a config file that read_toml reads back: the data file too, if given; vocab_known False
        leaves the vocabulary size out (the data will give it)."""
        extra = {"data": {"path": (str(data_path), "the data file or dataset (--data)")}} if data_path else {}
        return to_toml(dict(self.items()), () if vocab_known else self.FROM_DATA, extra)


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)  # whole or absent
    finally:
        tmp.unlink(missing_ok=True)


def lock_directory(path: Path):
    """Hold path/.lock (an open file, the lock released when it closes); refuse if another process holds it."""
    lock_path = Path(path) / LOCK_FILE
    try:
        f = open(lock_path, "a+")
    except OSError as e:
        raise UserError(f"could not open {lock_path} ({e.strerror or e}); the directory must be writable") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{path} is in use by another microgpt-jax process (pid {holder}); wait for it to finish or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class RunDir:
    """An open run directory: its configs (by table name), tokenizer and data file."""

    def __init__(self, path, configs: RunConfig, tokenizer, data_path, data_sha256, history=None):
        self.path, self.configs, self.tokenizer = Path(path), configs, tokenizer
        self.data_path, self.data_sha256 = Path(data_path), data_sha256
        self.history = dict(history or {})  # "init_from": where the weights came from; "extensions": steps added
        self.extends = None  # the steps this session extends the run from (resumed_configs)
        self._lock = None

    cfg = property(lambda self: self.configs.model)
    tcfg = property(lambda self: self.configs.train)
    dcfg = property(lambda self: self.configs.data)
    ccfg = property(lambda self: self.configs.checkpoint)
    run_file = property(lambda self: self.path / RUN_FILE)

    def resume_hint(self) -> str:
        """Where the run stands and how to go on: for the message of a run that stopped."""
        steps = self.store.steps()
        if not steps:
            return f"no checkpoint was saved in {self.path}"
        return f"the latest checkpoint is step {steps[-1]}; resume with `microgpt-jax train --resume {self.path}`"

    @functools.cached_property
    def store(self) -> CheckpointStore:
        """One store per open run (its restore target is traced once; an odd directory is warned about once)."""
        extensions = self.history.get("extensions", [])
        extended_from = {self.extends} | {e.get(k) for e in extensions if isinstance(e, dict) for k in ("from_steps", "to_steps")}
        return CheckpointStore(
            self.path / "checkpoints",
            self.cfg,
            self.tcfg,
            self.ccfg.keep,
            self.path / "damaged",
            extended_from - {None},
            tokenizer_sha256(self.tokenizer),
        )

    # -- create and open ------------------------------------------------------------------

    @classmethod
    def create(cls, path, configs: RunConfig, tokenizer, data_path, init_from=None) -> "RunDir":
        """A new run directory, locked. Refuses a path that holds anything, above all an existing run.

        In a multi-process run every process checks, then process 0 writes.
        """
        path = Path(path)
        if (path / RUN_FILE).exists():
            raise UserError(f"{path} is an existing run; continue it with `microgpt-jax train --resume {path}`, or pass a new directory")
        if path.exists() and (not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir())):
            raise UserError(f"{path} already exists and is not empty; pass a new directory so nothing is overwritten")
        data_path = Path(data_path).resolve()
        run = cls(path, configs, tokenizer, data_path, data_sha256(data_path), {"init_from": init_from} if init_from else None)
        parallel.barrier("run-create-checked")  # no process checks a directory process 0 has begun writing
        if parallel.is_main_process():
            made = not path.exists()
            try:
                path.mkdir(parents=True, exist_ok=True)
                run.lock()
                if isinstance(tokenizer, BPETokenizer):  # before run.json: a run never lacks its tokenizer
                    _atomic_write(path / TOKENIZER_FILE, tokenizer.hf_json)
                _atomic_write(path / RUN_FILE, json.dumps(run.to_json(), indent=2) + "\n")
            except OSError as e:
                run.unlock()
                if made and path.is_dir():  # leave nothing half-made that would block the same command afterwards
                    shutil.rmtree(path, ignore_errors=True)
                raise UserError(f"could not create the run directory {path} ({e.strerror or e}); pass a writable path") from None
        parallel.barrier("run-created")
        return run

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.configs.to_json(),
            **({"vocab": self.tokenizer.chars} if self.tokenizer.kind == "char" else {}),
            "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
            "data_file": {"path": str(self.data_path), "sha256": self.data_sha256},
            **self.history,
        }

    @classmethod
    def open(cls, path) -> "RunDir":
        path = Path(path)
        run_file = path / RUN_FILE
        if not run_file.is_file():
            raise UserError(f"{path} is not a run directory (no {RUN_FILE}); pass one written by `microgpt-jax train --out DIR`")
        return cls.from_json(path, read_json(run_file, "restore it from a copy, or start a new run with --out"))

    @classmethod
    def from_json(cls, path, meta) -> "RunDir":
        run_file = Path(path) / RUN_FILE

        def bad(key, problem):
            return UserError(f"{run_file}: {key} {problem}; correct it (or restore run.json from a copy)")

        check_format(meta, FORMAT, VERSION, "run directories", bad)
        try:
            configs = RunConfig.from_json(meta)
        except ConfigError as e:
            raise bad(e.field, e.problem) from None
        tokenizer = cls.read_tokenizer(path, configs.data.tokenizer, meta.get("vocab"), bad)
        recorded = meta.get("tokenizer_sha256", tokenizer_sha256(tokenizer))  # a run.json from before it was recorded: none
        if recorded != tokenizer_sha256(tokenizer) and tokenizer.kind == "bpe":
            raise UserError(
                f"{Path(path) / TOKENIZER_FILE} is not the tokenizer the run was trained with (its sha256 is not run.json's "
                "tokenizer_sha256); restore it from a copy"
            )
        if recorded != tokenizer_sha256(tokenizer):
            raise bad("vocab", "is not the vocabulary the run was trained with (tokenizer_sha256 differs)")
        if tokenizer.size != configs.model.vocab_size:
            what = "characters" if tokenizer.kind == "char" else "ids"
            raise bad("vocab", f"has {tokenizer.size - 1} {what} (+ BOS), but model.vocab_size is {configs.model.vocab_size}")
        data = meta.get("data_file")
        if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not isinstance(data.get("sha256"), str):
            raise bad("data_file", 'must be {"path": ..., "sha256": ...}')
        history = {key: meta[key] for key in ("init_from", "extensions") if key in meta}
        if not isinstance(history.get("init_from", {}), dict):
            raise bad("init_from", 'must be {"run" or "file": path, "step": n}')
        steps = ("at_step", "from_steps", "to_steps")
        extensions = history.get("extensions", [])
        if not isinstance(extensions, list) or not all(
            isinstance(e, dict) and all(type(e.get(k)) is int for k in steps) for e in extensions
        ):
            raise bad("extensions", f"must be a list of {{{', '.join(steps)}: int, ...}} as train --steps recorded them")
        return cls(path, configs, tokenizer, data["path"], data["sha256"], history)

    @staticmethod
    def read_tokenizer(path, kind, chars, bad):
        """The run's tokenizer: char from run.json's vocab, byte, or bpe from RUN_DIR/tokenizer.json."""
        if kind == "char":
            if not isinstance(chars, str) or len(set(chars)) != len(chars) or "".join(sorted(chars)) != chars:
                raise bad("vocab", "must be a string of distinct characters in sorted order")
            return CharTokenizer(chars)
        if kind == "byte":
            return from_json({"kind": kind})
        tokenizer_file = Path(path) / TOKENIZER_FILE
        try:
            return BPETokenizer(tokenizer_file.read_text())
        except OSError as e:
            raise UserError(f"could not read the run's tokenizer {tokenizer_file} ({e.strerror or e}); restore it from a copy") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{tokenizer_file} is not valid UTF-8 (byte {e.start}); restore it from a copy") from None
        except UserError as e:
            raise UserError(f"{tokenizer_file}: {e}") from None

    def remove_if_empty(self) -> bool:
        """Remove this new run's directory if no step left anything in it (no checkpoint, no metrics record): True if removed."""
        metrics = self.path / "metrics.jsonl"
        if not parallel.is_main_process() or self.store.steps() or (metrics.exists() and metrics.stat().st_size):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return not self.path.exists()

    # -- one process at a time --------------------------------------------------------------

    def lock(self) -> "RunDir":
        """Hold RUN_DIR/.lock until unlock() or the process ends; refuse if another process holds it."""
        if parallel.is_main_process() and self._lock is None:  # process 0 holds it for the whole multi-process run
            self._lock = lock_directory(self.path)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unlock()

    def unlock(self):
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    # -- checks before a resume ----------------------------------------------------------

    def resumed_configs(self, given: dict) -> RunConfig:
        """The run's configs with the given {table: {field: value}} applied: only resumable fields may differ.

        They are this run's configs from now on (its checkpoints follow a new --keep); run.json stays as written.
        """
        configs = {}
        for table, config in self.configs.items():
            changes = given.get(table, {})
            for name, value in changes.items():
                if (table, name) == ("train", "steps") and value > config.steps:
                    self.extends = config.steps  # more steps: the run is extended (SCHEDULE_RULE)
                    continue
                if name not in resumable_fields(type(config)) and getattr(config, name) != value:
                    raise ConfigError(
                        name,
                        f"{value!r} differs from the run's {getattr(config, name)!r} ({self.run_file}); "
                        "drop it to resume the run as it was, or start a new run",
                    )
            configs[table] = dataclasses.replace(config, **changes)
        self.configs = RunConfig(**configs)
        self.__dict__.pop("store", None)  # a new --keep: the store is made again from these configs
        return self.configs

    def record_extension(self, at_step: int):
        """run.json takes the new number of steps, and says from where and by which rule (written atomically)."""
        steps = self.tcfg.steps
        extension = {"at_step": at_step, "from_steps": self.extends, "to_steps": steps, "schedule": SCHEDULE_RULE}
        self.history["extensions"] = [*self.history.get("extensions", []), extension]
        if parallel.is_main_process():
            try:
                _atomic_write(self.run_file, json.dumps(self.to_json(), indent=2) + "\n")
            except OSError as e:
                raise UserError(f"could not write {self.run_file} ({e.strerror or e}); it is unchanged") from None
        self.extends = None

    def check_data(self, data_path):
        """The data must be the very file (or dataset) the run was trained on: its order and vocabulary decide every step."""
        data_path = Path(data_path)
        if not (data_path.is_file() or is_dataset(data_path)):
            raise UserError(f"the run's data file {data_path} is missing; pass a copy of it (train --data PATH)")
        if data_sha256(data_path) != self.data_sha256:
            raise UserError(
                f"data file {data_path} differs from the one the run was trained on ({self.data_path}, "
                f"sha256 {self.data_sha256[:12]}...); pass that file"
            )


class Weights(NamedTuple):
    """A model to sample, check or start from: its config, tokenizer, params and where they come from."""

    cfg: GPTConfig
    tokenizer: object  # a tokenizer.py tokenizer: CharTokenizer, ByteTokenizer or BPETokenizer
    params: dict
    origin: dict  # {"run": path, "step": n} or {"file": path, "step": n}
    run: "RunDir | None" = None
    settings: dict | None = None  # the train and data tables they were trained with, where known: {table: {field: value}}


def split_step(spec) -> tuple[Path, int | None]:
    """RUN_DIR@STEP -> (RUN_DIR, STEP); anything else -> (path, None). A run's @ with no step number after it is refused."""
    match = re.fullmatch(r"(.+)@([^@/]*)", str(spec))
    if not match or Path(spec).exists():
        return Path(spec), None
    if not match[2].isascii() or not match[2].isdigit():
        if (Path(match[1]) / RUN_FILE).is_file():
            raise UserError(f"{spec}: a step is a checkpoint's number (RUN_DIR@500), got {match[2]!r}; pass RUN_DIR@STEP")
        return Path(spec), None
    return Path(match[1]), int(match[2])


def load_weights(spec) -> Weights:
    """RUN_DIR (its latest good checkpoint), RUN_DIR@STEP (that checkpoint) or an exported FILE.safetensors."""
    path, step = split_step(spec)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path} is neither a run directory nor an exported .safetensors file; pass one of them")
    run = RunDir.open(path)
    checkpoint = run.store.restore(with_opt_state=False) if step is None else run.store.checkpoint(step)
    settings = {t: dataclasses.asdict(getattr(run.configs, t)) for t in ("train", "data")}
    return Weights(run.cfg, run.tokenizer, checkpoint.params, {"run": str(path.resolve()), "step": checkpoint.step}, run, settings)


def _load_safetensors(path) -> Weights:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta, params = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        cfg = from_dict(GPTConfig, json.loads(meta["model"]))
        tokenizer = from_json(json.loads(meta["tokenizer"])) if "tokenizer" in meta else CharTokenizer(meta["vocab"])
        settings = {t: json.loads(meta[t]) for t in ("train", "data") if t in meta}  # the run's own (a fine-tune inherits them)
        if not all(isinstance(values, dict) for values in settings.values()):
            raise ValueError("its train and data metadata must be JSON objects")
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, UserError) as e:
        raise UserError(f"{path} is not a model exported by `microgpt-jax export` ({e})") from None
    shapes = param_shapes(cfg)
    wrong = [k for k in sorted(shapes) if k in params and (params[k].shape != tuple(shapes[k]) or params[k].dtype.kind != "f")]
    if tokenizer.size != cfg.vocab_size or set(params) != set(shapes) or wrong:
        what = (
            f" ({wrong[0]} is {params[wrong[0]].dtype} {list(params[wrong[0]].shape)}, not float {list(shapes[wrong[0]])})" if wrong else ""
        )
        raise UserError(f"{path} does not hold the weights its metadata describes{what}; export it again")
    bad = [k for k in sorted(params) if not np.isfinite(params[k]).all()]
    if bad:  # NaN logits: every sample would be BOS, every loss NaN
        raise UserError(f"{path} holds weights that are not finite (NaN or Inf) in {', '.join(bad)}; export them again from a good run")
    return Weights(cfg, tokenizer, params, {"file": str(path.resolve()), "step": int(meta.get("step", 0))}, None, settings)


class Start(NamedTuple):
    """What a training run starts from (open_for_training)."""

    run: RunDir | None  # the run resumed (locked), or None: a new run
    configs: RunConfig
    data_path: Path  # the data file or dataset directory
    init: Weights | None  # the weights a new run starts from, or None: new weights
    tokenizer: object  # the resumed run's or the weights' own (a bpe run goes on with it), or None: made from the data
    vocab_size: int | None  # the vocabulary asked for, if any


@contextlib.contextmanager
def open_for_training(given: dict, data=None, resume=None, init_from=None, out=None):
    """The Start of `train`, given {table: {field: value}} (a config file's values and the typed flags).

    resume: that run, locked until the with block ends, with the given
    values over its configs (RunDir.resumed_configs) and its own data file
    checked (data: a copy of it). Else a new run of the given configs on
    data (default: resolve_data_path's), a prepared dataset's mode,
    tokenizer and split adopted; init_from: its weights and model (a given
    model value that differs is refused) and its tokenizer, unless another
    is given. out: the new run's directory, if any (refused with resume; the
    caller creates it once the step compiles).
    """
    if resume and (out or init_from):
        raise UserError("--resume continues a run as it is; --out (with --init-from) starts a new one: pass one of them")
    vocab_size = given.get("model", {}).get("vocab_size")
    if not resume:
        yield _new_start(given, data, init_from, vocab_size)
        return
    with RunDir.open(resume).lock() as run:
        data_path = Path(data) if data else run.data_path
        run.check_data(data_path)
        yield Start(run, run.resumed_configs(given), data_path, None, run.tokenizer, vocab_size)


def inherited(given: dict, init: Weights, init_from) -> RunConfig:
    """A fine-tune's configs: the weights' own train and data settings (where known), the given values over them."""
    tables = {t: dict(given.get(t, {})) for t in RunConfig.TABLES}
    for table, values in (init.settings or {}).items():
        fields = {f.name for f in dataclasses.fields(RunConfig.TABLES[table])}
        tables[table] = {k: v for k, v in values.items() if k in fields} | tables[table]
    try:
        return RunConfig.of(tables)
    except ConfigError as e:  # values taken from the weights' run, with some given: say where they came from
        name = f"--{e.field.replace('_', '-')}"
        if any(e.field in given.get(t, {}) for t in RunConfig.TABLES):
            raise UserError(f"{name} {e.problem} (the values not given are --init-from {init_from}'s; pass them to change them)") from None
        raise UserError(f"{e} (taken from --init-from {init_from}; pass {name} to change it)") from None


def _new_start(given: dict, data, init_from, vocab_size) -> Start:
    init = start_weights(init_from) if init_from else None
    configs = inherited(given, init, init_from) if init else RunConfig.of(given)
    given_data, data_path = given.get("data", {}), resolve_data_path(data)
    if (
        init and init.tokenizer is not None and "tokenizer" not in given_data
    ):  # the weights' own tokenizer, unless another is asked for (and refused)
        configs = configs.replace(data=dataclasses.replace(configs.data, tokenizer=init.tokenizer.kind))
    if is_dataset(data_path):  # a prepared dataset fixes the data's mode, tokenizer and split
        configs = configs.replace(data=adopt(data_path, configs.data, given_data))
    if init:  # the model is the weights' own: a flag or config value that disagrees is refused
        for name, value in given.get("model", {}).items():
            if getattr(init.cfg, name) != value:
                raise ConfigError(
                    name, f"{value!r} differs from the model of --init-from {init_from} ({getattr(init.cfg, name)!r}); drop it"
                )
        configs = configs.replace(model=init.cfg)
    return Start(None, configs, data_path, init, init and init.tokenizer, vocab_size)


def start_weights(spec) -> Weights:
    """--init-from's weights: load_weights', or a Hugging Face checkpoint directory's (its tokenizer None without tokenizer.json)."""
    if hf.is_checkpoint_dir(spec):
        cfg, tokenizer, params = hf.load(spec)
        return Weights(cfg, tokenizer, params, {"hf": str(Path(spec).resolve()), "step": 0})
    return load_weights(spec)


def export_hf(run_dir, out_dir) -> tuple[str, int]:
    """A run's (or an export's) latest good params as a Hugging Face checkpoint directory (hf.save): (architecture, step)."""
    weights = load_weights(run_dir)
    return hf.save(weights.cfg, weights.params, weights.tokenizer, out_dir), weights.origin["step"]


def export_safetensors(run_dir, out_path) -> int:
    """The latest good params as safetensors (spec keys), vocabulary and configs in the metadata: the step."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    out_path = Path(out_path)
    if out_path.exists():
        raise UserError(f"{out_path} already exists; pass a new file name so nothing is overwritten")
    if not out_path.parent.is_dir():
        raise UserError(f"directory {out_path.parent} does not exist; create it or pass another path")
    weights = load_weights(run_dir)
    if weights.run is None:
        raise UserError(f"{run_dir} is a file; pass a run directory (or RUN_DIR@STEP) to export")
    run, step = weights.run, weights.origin["step"]
    meta = run.to_json()
    metadata = {"format": "microgpt-jax", "tokenizer": json.dumps(run.tokenizer.to_json()), "step": str(step)}
    metadata |= {"vocab": run.tokenizer.chars} if run.tokenizer.kind == "char" else {}
    metadata |= {table: json.dumps(meta[table]) for table in RunConfig.TABLES}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)  # a name no one else has
        os.close(fd)
        save_file({k: np.ascontiguousarray(v) for k, v in weights.params.items()}, tmp, metadata=metadata)
        os.link(tmp, out_path)  # atomic, and never over a file: of two exports to one path, the second is refused
    except FileExistsError:
        raise UserError(f"{out_path} already exists (written meanwhile); pass a new file name so nothing is overwritten") from None
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        reason = getattr(e, "strerror", None) or str(e).split(": ", 1)[-1]
        raise UserError(f"could not write {out_path} ({reason}); nothing was written") from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return step
