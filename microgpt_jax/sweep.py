"""Sweeps: many runs of one model shape trained together, as one compiled program.

`microgpt-jax sweep` trains the product of some seeds and `--set` lists of
training values as the members of one program (train.SweepTrainer: the
step vmapped over a leading member axis, hyperparameters as arrays). Each
member trains exactly as `train --seed S` with its values would: its seed's
weights, data order and split, dropout masks.

    SWEEP_DIR/
      sweep.json       the common configs, the data file, every member (name, seed, values)
      checkpoints/     the sweep's checkpoint store: all members in one checkpoint
      runs/NAME/       each member an ordinary run directory (run.json, metrics.jsonl, its
                       checkpoint at the end or a stop): sample, eval, export, check, plot,
                       --init-from and train --resume work on it as on any run
      summary.json     each member's and each setting's losses, at the end or a stop
      loss.png         one colour per setting, its seeds as a band
      .lock

A member whose loss or weights go non-finite is frozen at its last good
step (its run directory gets that state); the others go on.
"""

import dataclasses
import itertools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from microgpt_jax import memory, parallel
from microgpt_jax.checkpoint import CheckpointStore
from microgpt_jax.config import ConfigError
from microgpt_jax.data import Stacked, load_train_data
from microgpt_jax.errors import UserError
from microgpt_jax.jsonfile import check_format, read_json
from microgpt_jax.loop import Checkpoints, Signals, StepInfo, Stopped, chunk_length, fit
from microgpt_jax.metrics import MetricsFile, read_metrics
from microgpt_jax.model import init_params
from microgpt_jax.rundir import RunConfig, RunDir, lock_directory
from microgpt_jax.session import Session
from microgpt_jax.train import MEMBER_FIELDS, SweepTrainer, TrainState, make_schedule, spreads_members

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
FORMAT = "microgpt-jax sweep"
VERSION = 1
# what --set may vary, by table: the fields that change no array's shape and no code
SETTABLE = {**{name: "train" for name in MEMBER_FIELDS if name != "seed"}, "dropout": "model"}


# -- members -----------------------------------------------------------------------------------


def parse_seeds(spec: str) -> list[int]:
    """`N` (seeds 0..N-1), `A-B` (A..B) or `A,B,...` -> the seeds; a bad spec is one line."""
    try:
        if "," in spec:
            seeds = [int(s) for s in spec.split(",")]
        elif "-" in spec.strip("-"):
            a, b = spec.split("-", 1)
            seeds = list(range(int(a), int(b) + 1))
        else:
            seeds = list(range(int(spec)))
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {spec!r}: pass a count N (seeds 0..N-1), a range A-B or a list A,B,... of distinct seeds >= 0")
    return seeds


def parse_set(spec: str) -> tuple[str, str, list]:
    """`FIELD=V1,V2,...` -> (table, field, typed values); a field that changes shapes or code is refused."""
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        raise UserError(f"--set {spec!r}: write FIELD=V1,V2,... (e.g. --set lr=0.01,0.003)")
    if name == "seed":
        raise UserError("--set seed: pass the seeds with --seeds (N, A-B or A,B,...)")
    table = SETTABLE.get(name)
    if table is None:
        known = {f.name for cls in RunConfig.TABLES.values() for f in dataclasses.fields(cls)}
        if name in known:
            raise UserError(
                f"--set {name}: members of a sweep share every array shape and the code; {name} is not one of "
                f"{', '.join(SETTABLE)}: compare such settings with `microgpt-jax compare --variant '--{name.replace('_', '-')} ...'`"
            )
        raise UserError(f"--set {name}: no such field; one of {', '.join(SETTABLE)}")
    kind = type(next(f.default for f in dataclasses.fields(RunConfig.TABLES[table]) if f.name == name))
    try:
        typed = [kind(v) for v in values.split(",")]
    except ValueError:
        raise UserError(f"--set {spec!r}: each value of {name} must be a {kind.__name__}") from None
    if len(set(typed)) != len(typed):
        raise UserError(f"--set {spec!r}: the values repeat; list each once")
    return table, name, typed


class Member(NamedTuple):
    name: str  # seed=3,lr=0.01: its run directory's name
    seed: int
    values: dict  # {field: value} of its --set values
    configs: RunConfig


def members_of(base: RunConfig, seeds, sets) -> list[Member]:
    """The product of the seeds and every --set list ((table, field, values)), each a validated RunConfig."""
    if len({name for _, name, _ in sets}) != len(sets):
        raise UserError("--set: each field once (list its values after one =)")
    members = []
    for seed, *values in itertools.product(seeds, *[v for _, _, v in sets]):
        chosen = {name: value for (_, name, _), value in zip(sets, values)}
        name = ",".join([f"seed={seed}", *(f"{k}={v}" for k, v in chosen.items())])
        tables = {table: {} for table in RunConfig.TABLES}
        tables["train"]["seed"] = seed
        for (table, field, _), value in zip(sets, values):
            tables[table][field] = value
        try:
            configs = base.replace(**{t: dataclasses.replace(getattr(base, t), **v) for t, v in tables.items() if v})
        except ConfigError as e:
            raise UserError(f"member {name}: {e.field} {e.problem}") from None
        members.append(Member(name, seed, chosen, configs))
    return members


def settings_label(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()) or "all"


def settings_groups(members) -> dict:
    """{setting's label: indices of its members (its seeds)}, in the members' order."""
    groups = {}
    for i, member in enumerate(members):
        groups.setdefault(settings_label(member.values), []).append(i)
    return groups


# -- the sweep directory -----------------------------------------------------------------------


class SweepDir:
    """An open sweep directory: its configs, members, their run directories and the sweep's checkpoint store."""

    def __init__(self, path, base: RunConfig, members, data_path, runs):
        self.path, self.base, self.members, self.data_path, self.runs = Path(path), base, members, Path(data_path), runs
        self.store, self._lock = None, None

    @staticmethod
    def check_new(path):
        """Refuse a path that holds anything (an existing sweep above all): nothing is overwritten."""
        path = Path(path)
        if (path / SWEEP_FILE).exists():
            raise UserError(f"{path} is an existing sweep; continue it with `microgpt-jax sweep --resume {path}`, or pass a new directory")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} already exists and is not empty; pass a new directory so nothing is overwritten")

    @classmethod
    def create(cls, path, base: RunConfig, members, tokenizers, data_path) -> "SweepDir":
        """A new sweep directory, locked, with every member's run directory; on a failure nothing of it is left."""
        path = Path(path)
        cls.check_new(path)
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = lock_directory(path)
            runs = [RunDir.create(path / "runs" / m.name, m.configs, t, data_path) for m, t in zip(members, tokenizers)]
            sweep = cls(path, base, members, data_path, runs)
            sweep._lock = lock
            text = json.dumps(sweep.to_json(), indent=2) + "\n"
            (path / (SWEEP_FILE + ".tmp")).write_text(text)
            (path / (SWEEP_FILE + ".tmp")).replace(path / SWEEP_FILE)
        except (OSError, UserError) as e:
            if made:  # leave nothing half-made that would block the same command afterwards
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(e, UserError):
                raise
            raise UserError(f"could not create the sweep directory {path} ({e.strerror or e}); pass a writable path") from None
        return sweep

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.base.to_json(),
            "data_file": str(self.data_path),
            "members": [{"name": m.name, "seed": m.seed, "values": m.values} for m in self.members],
        }

    @classmethod
    def open(cls, path) -> "SweepDir":
        path = Path(path)
        if not (path / SWEEP_FILE).is_file():
            raise UserError(f"{path} is not a sweep directory (no {SWEEP_FILE}); pass one written by `microgpt-jax sweep --out DIR`")
        meta = read_json(path / SWEEP_FILE, "restore it from a copy")

        def bad(key, problem):
            return UserError(f"{path / SWEEP_FILE}: {key} {problem}; restore it from a copy")

        check_format(meta, FORMAT, VERSION, "sweep directories", bad)
        try:
            base = RunConfig.from_json(meta)
            entries, data_file = meta["members"], meta["data_file"]
            if not isinstance(data_file, str):
                raise TypeError("data_file must be a path")
            sets = [(SETTABLE[k], k, [e["values"][k] for e in entries]) for k in entries[0]["values"]]
            members = members_of(
                base, list(dict.fromkeys(e["seed"] for e in entries)), [(t, k, list(dict.fromkeys(v))) for t, k, v in sets]
            )
        except (ConfigError, KeyError, TypeError, IndexError, UserError) as e:
            raise bad("members", f"do not describe a sweep ({e})") from None
        if [m.name for m in members] != [e["name"] for e in entries]:
            raise bad("members", "do not match their seeds and values")
        lock = lock_directory(path)
        runs = [RunDir.open(path / "runs" / m.name).lock() for m in members]
        sweep = cls(path, base, members, data_file, runs)
        sweep._lock = lock
        return sweep

    def unlock(self):
        for run in self.runs:
            run.unlock()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unlock()

    def resume_hint(self) -> str:
        steps = self.store.steps() if self.store else []
        if not steps:
            return f"no checkpoint was saved in {self.path}"
        return f"the latest checkpoint is step {steps[-1]}; resume with `microgpt-jax sweep --resume {self.path}`"


# -- training ----------------------------------------------------------------------------------


class Sweep(Session):
    """The members (Member list) on a data file: the mesh, every member's data source, the sweep trainer.

    Each member loads the data with its own seed (its order and split);
    tokenizers: each member's (a resumed sweep's members' own), or None.
    """

    def __init__(self, members, data_path, devices=None, vocab_size=None, tokenizers=None):
        base = members[0].configs
        cfg, tcfg, dcfg, ccfg = base.model, base.train, base.data, base.checkpoint
        self.members, M = members, len(members)
        self.member_axis = (M,)
        self.mesh = parallel.make_mesh(devices)
        parallel.check_batch(tcfg.batch_size, self.mesh)
        row_multiple = tcfg.grad_accum * (1 if spreads_members(M, self.mesh.devices.size) else self.mesh.devices.size)
        self.chunk_steps = chunk_length((tcfg.log_every, tcfg.eval_every, ccfg.save_every), tcfg.steps)
        fits = dict(rows=tcfg.batch_size, chunk_steps=self.chunk_steps, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype)
        memory.check_fits(cfg, **fits, grad_accum=tcfg.grad_accum, members=M)
        loaded = [
            load_train_data(data_path, dcfg, tcfg.batch_size, cfg.block_size, m.seed, row_multiple, None, vocab_size, t)
            for m, t in zip(members, tokenizers or [None] * M)
        ]
        self.tokenizers = [t for t, _ in loaded]
        self.tokenizer = self.tokenizers[0]
        if len({t.size for t in self.tokenizers}) > 1:
            raise UserError("the members' vocabularies differ in size; pass --vocab-size for a bpe tokenizer")
        cfg = dataclasses.replace(cfg, vocab_size=self.tokenizer.size)
        memory.check_fits(cfg, **fits, grad_accum=tcfg.grad_accum, members=M)
        self.data = Stacked([source for _, source in loaded])
        self.configs, self.data_path = base.replace(model=cfg), data_path
        self.member_configs = [m.configs.replace(model=dataclasses.replace(cfg, dropout=m.configs.model.dropout)) for m in members]
        dropouts = [m.configs.model.dropout for m in members]
        model = dataclasses.replace(cfg, dropout=max(dropouts))  # the dropout code in if any member drops out
        self.trainer = SweepTrainer(model, [m.configs.train for m in members], dropouts, self.mesh, packed=dcfg.packed)
        self.step_memory, self._compile_s = None, 0.0

    def describe(self) -> str:
        names = ", ".join(m.name for m in self.members[:4]) + (", ..." if len(self.members) > 4 else "")
        return f"members: {len(self.members)} ({names})\n{super().describe()}"

    def _abstract_state(self):
        return self.trainer.abstract_state()

    def estimate(self) -> memory.Estimate:
        tcfg = self.configs.train
        args = (self.configs.model, self.data.rows, self.chunk_steps, tcfg.dtype, tcfg.param_dtype, tcfg.grad_accum)
        return memory.estimate(*args, members=len(self.members))

    def initial_state(self) -> TrainState:
        """Each member's weights drawn from its own seed, as its solo run draws them, stacked."""
        per_member = [init_params(c.model, jax.random.key(c.train.seed), c.train.param_dtype) for c in self.member_configs]
        return self.trainer.init({k: np.stack([np.asarray(p[k]) for p in per_member]) for k in per_member[0]})

    def open_store(self, sweep: SweepDir):
        tcfg, ccfg = self.configs.train, self.configs.checkpoint
        sweep.store = CheckpointStore(
            sweep.path / "checkpoints", self.trainer.cfg, tcfg, ccfg.keep, sweep.path / "damaged", like=self.trainer.abstract_state()
        )
        return sweep.store

    def resumed_state(self, sweep: SweepDir) -> TrainState | None:
        store = self.open_store(sweep)
        store.remove_partial()
        if not store.steps():
            return None
        checkpoint = store.restore(move_damaged=True)
        if checkpoint.data_position != self.data.position(checkpoint.step):
            raise UserError(f"checkpoint {checkpoint.step} does not match this data's order; resume with the sweep's data and version")
        return self.trainer.put_state(checkpoint.state)

    def train(self, sweep: SweepDir | None = None, resume=False, peer_timeout=60.0, quiet=False) -> TrainState:
        """Train every member to the end (or a stop), then write their run directories' checkpoints and the summary."""
        state = self.resumed_state(sweep) if resume else None
        if sweep is not None and not resume:
            self.open_store(sweep)
        if resume:
            print(f"resuming {sweep.path} at step {int(state.step) if state else 0}")
        if not sweep and not quiet:
            print("no --out: nothing of this sweep will be saved (pass --out SWEEP_DIR to keep it)")
        self.compile_step()
        if self._compile_s:
            print(f"compiled the sweep's step ({len(self.members)} members) in {self._compile_s:.1f}s")
            self._compile_s = 0.0
        state = state or self.initial_state()
        self.result = None
        try:
            stop = Signals(peer_timeout, sweep.resume_hint if sweep else (lambda: "no checkpoint was saved"))
            hooks = self.hooks(state, sweep)
            if int(state.step) == self.configs.train.steps:  # saved at the end, stopped before the members' runs were written
                hooks[-1](StepInfo(state, int(state.step), int(state.step), {}, 0.0, None, ()))
            state = fit(self.trainer, state, self.data, hooks, stop, self.chunk_steps)
        except BrokenPipeError:
            raise
        except OSError as e:
            where = sweep.resume_hint() if sweep else "nothing was saved"
            raise UserError(f"could not write {e.filename or 'a file'} ({e.strerror or e}); {where}") from None
        if sweep:
            print(f"saved to {sweep.path}; each member is a run in {sweep.path / 'runs'}")
        return state

    def hooks(self, state: TrainState, sweep: SweepDir | None = None, loggers=()) -> list:
        """Freezing's notes, the log (each member's records and the live table), checkpoints, the members' runs and summary."""
        tcfg, start = self.configs.train, int(state.step)
        eval_set = self.data.eval_set()
        evaluate = None
        if eval_set is not None:
            on_device = self.trainer.put(eval_set, member_axis=0)
            evaluate = lambda params: self.trainer.evaluate(params, on_device)  # noqa: E731
        sinks = [MetricsFile(run.path, resumed_at=start or None) for run in sweep.runs] if sweep else None
        log = SweepLog(self.members, self.member_configs, tcfg.log_every, tcfg.eval_every, evaluate, sinks)
        hooks = [log]
        if sweep:
            hooks.append(Checkpoints(sweep.store, self.configs.checkpoint.save_every, self.data.position, sweep.path, command="sweep"))
        hooks.append(Finish(self, log, sweep))
        return hooks


class SweepLog:
    """The sweep's Log: each member's record (to its run's metrics.jsonl), the live table, and a note when a member freezes.

    A member's record is what its solo run would log: the means of its
    metrics since the last record, its learning rate, the validation loss at
    eval_every and at the end; tokens_per_s is the sweep's over its members.
    A frozen member's records stop at the step it froze.
    """

    def __init__(self, members, member_configs, log_every, eval_every, evaluate=None, sinks=None, out=None):
        self.members, self.evaluate, self.eval_every, self.sinks = members, evaluate, eval_every, sinks
        self.lrs = [make_schedule(c.train) for c in member_configs]
        self.every = (log_every, eval_every) if evaluate else (log_every,)
        self.last, self.records, self.frozen = None, [[] for _ in members], {}
        self.groups = settings_groups(members)
        self.out = out or sys.stdout

    def __enter__(self):
        for sink in self.sinks or ():
            sink.__enter__()
        return self

    def __exit__(self, *exc):
        for sink in self.sinks or ():
            sink.__exit__(*exc)

    def __call__(self, info: StepInfo):
        means, tokens, seconds = info.since(self.last)
        frozen_at = np.asarray(info.state.opt_state.frozen_at)
        val = None
        if self.evaluate is not None and (info.final or info.step % self.eval_every == 0):
            val = self.evaluate(info.state.params)
        for m, member in enumerate(self.members):
            if frozen_at[m] >= 0:
                if m not in self.frozen:
                    self.frozen[m] = int(frozen_at[m])
                    print(
                        f"member {member.name}: loss or weights non-finite at step {frozen_at[m] + 1}: frozen at step {frozen_at[m]}",
                        file=self.out,
                        flush=True,
                    )
                continue
            record = {"step": info.step, **{k: float(v[m]) for k, v in means.items()}, "lr": float(self.lrs[m](info.step - 1))}
            record |= {"tokens_per_s": tokens / len(self.members) / seconds, "elapsed": info.elapsed}
            if val is not None:
                record["val_loss"] = val[m]
            self.records[m].append(record)
            if self.sinks:
                self.sinks[m].write(record)
        self.last = info.step
        print(self.table_line(info, tokens / seconds), file=self.out, flush=True)
        if len(self.frozen) == len(self.members):
            raise Stopped(f"every member went non-finite by step {info.step}; lower the learning rate or change the config")

    def table_line(self, info: StepInfo, tokens_per_s) -> str:
        """step | each setting's loss (and validation loss) as mean ± std over its seeds | the sweep's tokens/s."""

        def spread(values):
            return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")

        parts = []
        for label, idx in self.groups.items():
            last = [self.records[i][-1] for i in idx if i not in self.frozen and self.records[i]]
            last = [r for r in last if r["step"] == info.step]
            if not last:
                parts.append(f"{label}: frozen")
                continue
            val = [r["val_loss"] for r in last if "val_loss" in r]
            parts.append(f"{label}: loss {spread([r['loss'] for r in last])}" + (f" val {spread(val)}" if val else ""))
        return f"step {info.step:{len(str(info.last_step))}d} / {info.last_step} | " + " | ".join(parts) + f" | {tokens_per_s:,.0f} tok/s"


class Finish:
    """At the end (or a stop): each member's state into its run directory, summary.json and the sweep's plot."""

    every = None

    def __init__(self, sweep: Sweep, log: SweepLog, directory: SweepDir | None):
        self.sweep, self.log, self.directory = sweep, log, directory

    def __call__(self, info: StepInfo):
        if not info.final:
            return
        frozen_at = np.asarray(info.state.opt_state.frozen_at)
        if info.history:
            _, tokens, seconds = info.since(None)
            self.sweep.tokens_per_s = tokens / seconds
        if self.directory is None:
            self.sweep.records = self.log.records
            self.sweep.result = summary(self.sweep.members, self.log.records, frozen_at, info.step)
            return
        for m, run in enumerate(self.directory.runs):
            state = self.sweep.trainer.member_state(info.state, m)
            run.store.remove_partial()
            run.store.save(state, self.sweep.data.sources[m].position(int(state.step)))
        records = [read_metrics(run.path) for run in self.directory.runs]  # the whole history, a resumed sweep's too
        self.sweep.records = records
        self.sweep.result = summary(self.sweep.members, records, frozen_at, info.step)
        path = self.directory.path
        (path / (SUMMARY_FILE + ".tmp")).write_text(json.dumps(self.sweep.result, indent=2) + "\n")
        (path / (SUMMARY_FILE + ".tmp")).replace(path / SUMMARY_FILE)
        from microgpt_jax.plot import plot_sweep

        try:
            plot_sweep(self.sweep.result, records, path / "loss.png")
        except UserError as e:
            print(f"no loss plot: {e}")
        return f"the members' runs are in {path / 'runs'}"


def summary(members, records, frozen_at, step) -> dict:
    """Each member's last losses and where it froze (records: each member's metrics records; frozen_at: the
    sweep state's); each setting's validation loss, mean and standard deviation over its seeds."""
    rows = []
    for member, history, frozen in zip(members, records, frozen_at):
        val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
        row = {"name": member.name, "seed": member.seed, "values": member.values, "steps": int(frozen) if frozen >= 0 else step}
        row |= {"frozen": bool(frozen >= 0), "loss": history[-1]["loss"] if history else None, "val_loss": val}
        rows.append(row | {"run": f"runs/{member.name}"})
    groups = []
    for label, idx in settings_groups(members).items():
        vals = [rows[i]["val_loss"] for i in idx if not rows[i]["frozen"] and rows[i]["val_loss"] is not None]
        groups.append(
            {
                "settings": members[idx[0]].values,
                "label": label,
                "seeds": [members[i].seed for i in idx],
                "frozen": [members[i].name for i in idx if rows[i]["frozen"]],
                "val_loss_mean": float(np.mean(vals)) if vals else None,
                "val_loss_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            }
        )
    return {"step": step, "members": rows, "settings": groups}


# -- compare: variants against a baseline, paired by seed ----------------------------------------


def paired_interval(diffs, confidence=0.95) -> tuple[float, float, float]:
    """(mean, low, high): a t interval of the mean of paired differences (one per seed); NaN bounds for one seed."""
    from scipy import stats

    d = np.asarray(diffs, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


class Variant(NamedTuple):
    label: str  # "baseline", or its flags
    configs: RunConfig


def shape_key(configs: RunConfig):
    """What members of one compiled sweep share: everything but the member fields (train's and dropout)."""
    train = dataclasses.replace(configs.train, **{k: v for k, v in dataclasses.asdict(type(configs.train)()).items() if k in MEMBER_FIELDS})
    return (dataclasses.replace(configs.model, dropout=0.0), train, configs.data, configs.checkpoint)


def compare(variants, seeds, data_path, devices=None, vocab_size=None, out=None) -> dict:
    """Train every variant (the baseline first) on the same seeds, those of one shape as one sweep; then each
    variant's validation loss over the seeds and its difference to the baseline's, paired by seed, with a
    95% t interval. Returns everything (every member's numbers too)."""
    groups = {}
    for v in variants:
        groups.setdefault(shape_key(v.configs), []).append(v)
    val, speed, curves = {}, {}, {}
    for i, group in enumerate(groups.values()):
        members = [
            Member(f"{v.label},seed={s}", s, {"variant": v.label}, v.configs.replace(train=dataclasses.replace(v.configs.train, seed=s)))
            for v in group
            for s in seeds
        ]
        labels = ", ".join(v.label for v in group)
        print(f"group {i + 1} of {len(groups)}: {labels} ({len(members)} members, one compiled program)", file=out, flush=True)
        sweep = Sweep(members, data_path, devices, vocab_size)
        sweep.train(quiet=True)
        for member, row, history in zip(members, sweep.result["members"], sweep.records):
            val[member.name] = math.nan if row["frozen"] or row["val_loss"] is None else row["val_loss"]
            curves[member.name] = [[r["step"], r["loss"]] for r in history]
        for v in group:
            speed[v.label] = sweep.tokens_per_s
    return _statistics(variants, seeds, val, speed, curves)


def _statistics(variants, seeds, val, speed, curves) -> dict:
    base = variants[0]
    rows = []
    for v in variants:
        losses = [val[f"{v.label},seed={s}"] for s in seeds]
        row = {
            "variant": v.label,
            "val_loss": dict(zip(map(str, seeds), losses)),
            "mean": float(np.mean(losses)),
            "std": float(np.std(losses, ddof=1)) if len(seeds) > 1 else math.nan,
            "tokens_per_s": speed[v.label],
            "loss_curves": {str(s): curves[f"{v.label},seed={s}"] for s in seeds},  # [step, training loss] per record
        }
        if v is not base:
            diffs = [a - b for a, b in zip(losses, (val[f"{base.label},seed={s}"] for s in seeds))]
            mean, low, high = paired_interval(diffs)
            row |= {"diff": mean, "ci95": [low, high], "distinguishable": bool(low > 0 or high < 0)}
        rows.append(row)
    return {"seeds": list(seeds), "baseline": base.label, "variants": rows}


def format_comparison(result: dict) -> str:
    """The table of `compare`, then in words which differences are distinguishable from zero."""
    n = len(result["seeds"])
    lines = [f"validation loss over {n} seeds (mean ± std); difference to the baseline paired by seed, 95% t interval"]
    width = max(len(r["variant"]) for r in result["variants"])
    for r in result["variants"]:
        diff = ""
        if "diff" in r:
            low, high = r["ci95"]
            diff = f" | {r['diff']:+.4f} [{low:+.4f}, {high:+.4f}]"
        lines.append(f"{r['variant']:<{width}} | {r['mean']:.4f} ± {r['std']:.4f}{diff} | {r['tokens_per_s']:,.0f} tok/s")
    for r in result["variants"][1:]:
        if math.isnan(r["ci95"][0]):
            verdict = "cannot be told from zero with one seed (pass --seeds 2 or more)"
        elif r["distinguishable"]:
            verdict = f"{'raises' if r['diff'] > 0 else 'lowers'} the validation loss by {abs(r['diff']):.4f}: distinguishable from zero"
        else:
            verdict = "is not distinguishable from zero at these seeds (the interval contains 0)"
        lines.append(f"{r['variant']}: {verdict}")
    return "\n".join(lines)
