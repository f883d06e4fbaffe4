"""The training loop: compiled chunks of steps, and the hooks that run between them.

`fit(trainer, state, data, hooks, stop)` trains from state.step to the run's
last step. Steps run in compiled chunks (`run_steps`: one executable, the next
chunk's batches built on the host while the current one runs). After each
chunk `stop` is asked whether the run ends here (a signal: `Signals`), then the
hooks that are due see a read-only `StepInfo`. A hook is a callable with an
`every` attribute: None (after every chunk), N or a tuple of Ns (after the
chunk ending at each multiple, and after the last one); it may also have
`at`, a tuple of steps where a chunk ends and it is due, and `before(step,
state)`, called before each chunk runs (with the step it starts at). One that
is a context manager is entered around the loop. A hook stops the run by
raising; what it returns (a string) is said in the message of a run that
stops early.

Chunks end exactly where some hook is due. Their length, the shape of the one
compiled executable, is `chunk_length(cadences, steps)`: it does not depend on
where the run starts, so a new, a resumed and an extended run run (and cache)
the same executable.

The hooks of a run, in the order `Session.hooks` puts them: Profile (a
profiler trace of some steps, train --profile), NonFinite (stop at a NaN
loss), Log (one record per log_every steps, with the validation loss every
eval_every, handed to its sinks: metrics.jsonl, the progress display,
TensorBoard, W&B), Checkpoints, Plot.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from microgpt_jax import parallel
from microgpt_jax.errors import UserError
from microgpt_jax.train import Trainer, TrainState

MAX_CHUNK = 1000  # steps per compiled call when no hook asks for less
ADVICE = "lower the learning rate or change the config, and start a new run with --out in a new directory"


def cadences(hooks) -> tuple:
    """Every interval any hook runs at, sorted."""
    every = [getattr(hook, "every", None) for hook in hooks]
    return tuple(sorted({k for e in every if e is not None for k in ((e,) if isinstance(e, int) else e)}))


def fixed_steps(hooks) -> tuple:
    """Every step some hook is due at (its `at`), sorted."""
    return tuple(sorted({step for hook in hooks for step in getattr(hook, "at", ())}))


def chunk_length(cadences, steps) -> int:
    """Steps per compiled call: the shortest cadence, at most MAX_CHUNK and the run's steps. Not where it starts."""
    return max(1, min(MAX_CHUNK, steps, *cadences))


def chunk_ends(start, stop, length, every=(), at=()):
    """Where each chunk of at most `length` steps ends: at multiples of every interval, at each step of `at`,
    and at stop (lazily)."""
    step = start
    while step < stop:
        step = min([stop, step + length] + [(step // k + 1) * k for k in every] + [a for a in at if a > step])
        yield step


class Chunk(NamedTuple):
    state: TrainState
    start: int  # the first step of the chunk (0-based)
    metrics: dict  # each of the step's metrics, one per step of the chunk (numpy)
    tokens: int  # trained (non-padding) positions in the chunk
    compile_s: float  # seconds spent compiling before this chunk (the first one only)


def run_steps(trainer: Trainer, state: TrainState, data, stop, length, every=(), at=(), before=None):
    """Train from the state's step to `stop`, in compiled chunks of at most `length` steps; yield a Chunk after each.

    Every chunk runs one executable, compiled once before the first (the
    batches are always `length` steps long; a shorter chunk skips the tail).
    While a chunk runs, the next chunk's batches are built on the host and
    sent to the device, so the step never waits for its data. Chunks end as
    chunk_ends(every, at) says; before(step, state), if given, is called just
    before each chunk runs.
    """
    first = int(state.step)

    def prepare(first, end):
        batches = data.batches(first, end - first, length)
        return trainer.put(batches), int(np.count_nonzero(batches.weights))

    ends = chunk_ends(first, stop, length, every, at)
    end = next(ends, None)
    if end is None:
        return
    batches, tokens = prepare(first, end)
    compiled, compile_s = trainer.compiled_steps(state, batches)
    while end is not None:
        if before is not None:
            before(first, state)
        state, metrics = compiled(state, batches, end - first)  # runs asynchronously
        following = next(ends, None)
        if following is not None:
            next_batches, next_tokens = prepare(end, following)
        yield Chunk(state, first, {k: np.asarray(v)[: end - first] for k, v in metrics.items()}, tokens, compile_s)
        if following is not None:
            batches, tokens = next_batches, next_tokens
        first, end, compile_s = end, following, 0.0


class Stopped(UserError):
    """Training stopped early; the message says where things stand. Exit 128 + signal number for a signal."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class StepInfo(NamedTuple):
    """What a hook sees after a chunk: read-only, the same for every hook of that chunk."""

    state: TrainState
    step: int  # steps done
    last_step: int  # where the run ends
    metrics: dict  # this chunk's metrics, each one value per step
    elapsed: float  # seconds since fit began
    stopping: str | None  # why the run stops after this chunk (a signal's name), else None
    history: tuple  # (first step, metrics, tokens, seconds) of the recent chunks

    @property
    def final(self) -> bool:
        """The run ends after this chunk: its last step, or a stop. Hooks with a cadence run here too."""
        return self.step == self.last_step or self.stopping is not None

    def since(self, step) -> tuple[dict, int, float]:
        """({metric: mean}, trained tokens, training seconds) of the steps after `step` (None: since fit began)."""
        chunks = [c for c in self.history if step is None or c[0] >= step]
        names = sorted(chunks[-1][1], key=lambda k: k != "loss")  # the loss first, as a reader expects it
        means = {k: np.mean(np.concatenate([c[1][k] for c in chunks]), axis=0) for k in names}  # a sweep's: one per member
        return means, sum(c[2] for c in chunks), sum(c[3] for c in chunks)


def _due(hook, info: StepInfo) -> bool:
    every, at = cadences([hook]), fixed_steps([hook])
    return not (every or at) or info.final or info.step in at or any(info.step % k == 0 for k in every)


def fit(trainer: Trainer, state: TrainState, data, hooks=(), stop=None, length=None) -> TrainState:
    """Train from state.step to tcfg.steps; after each compiled chunk, call the hooks that are due.

    stop: asked after each chunk, before the hooks (`poll()`: None, or (why, exit
    code) to stop after this chunk, the hooks still running as at the end);
    entered as a context manager around the loop. length: steps per compiled
    chunk (default chunk_length of the hooks' cadences).
    """
    every, at, steps = cadences(hooks), fixed_steps(hooks), trainer.tcfg.steps
    length = length or chunk_length(every, steps)
    befores = [hook.before for hook in hooks if hasattr(hook, "before")]
    history, window = [], max(every, default=1)
    with contextlib.ExitStack() as stack:
        for hook in [stop, *hooks]:
            if hasattr(hook, "__enter__"):
                stack.enter_context(hook)
        began = last = time.perf_counter()
        before = (lambda step, state: [b(step, state) for b in befores]) if befores else None
        for chunk in run_steps(trainer, state, data, stop=steps, length=length, every=every, at=at, before=before):
            state, n = chunk.state, len(chunk.metrics["loss"])
            seconds = max(time.perf_counter() - last - chunk.compile_s, 1e-9)
            history = [c for c in history if c[0] + len(c[1]["loss"]) > chunk.start - window]
            history.append((chunk.start, chunk.metrics, chunk.tokens, seconds))
            stopping = stop.poll() if stop is not None else None
            why, code = stopping or (None, 1)
            info = StepInfo(state, chunk.start + n, steps, chunk.metrics, time.perf_counter() - began, why, tuple(history))
            notes = [note for hook in hooks if _due(hook, info) for note in [hook(info)] if note]
            if stopping:
                raise Stopped(f"{why} at step {info.step}: {'; '.join(notes) or 'nothing saved'}", exit_code=code)
            last = time.perf_counter()  # time spent in hooks (evaluation, saving) is not training time
    return state


# -- the hooks ------------------------------------------------------------------------------


class NonFinite:
    """Stop at the first NaN or infinite loss, saving nothing of that chunk: the latest checkpoint stays the last good one."""

    every = None

    def __init__(self, latest=lambda: "no checkpoint was saved"):
        self.latest = latest

    def __call__(self, info: StepInfo):
        losses = info.metrics["loss"]
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = info.step - len(losses) + int(bad[0]) + 1
            raise Stopped(
                f"loss is {float(losses[bad[0]])} at step {step}: training stopped there and saved nothing "
                f"after it; {self.latest()} ({ADVICE})"
            )


class Signals:
    """SIGINT, SIGTERM and SIGHUP ask the run to stop after the running chunk (and save); a second one quits at once.

    The loop's `stop`. The handler only sets a flag. After each chunk every
    process calls one collective that tells all of them whether any got a
    signal, so a multi-process run stops at the same step everywhere; a peer
    that dies ends the others within peer_timeout seconds, with `where()` (the
    latest checkpoint and how to resume) in their one line.
    """

    def __init__(self, peer_timeout=60.0, where=lambda: "no checkpoint was saved"):
        self.signum, self.peer_timeout, self.where, self._previous = 0, peer_timeout, where, {}
        self._peers = parallel.watch_peers(peer_timeout, where)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
                self._previous[s] = signal.signal(s, self._on_signal)
        self._peers.__enter__()
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return self._peers.__exit__(*exc)

    def _on_signal(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        message = f"\n{signal.Signals(signum).name}: finishing the current steps, then saving (send it again to quit without saving)\n"
        if signum == signal.SIGHUP:  # the terminal is gone: what would go to it goes nowhere (a write there fails)
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                if os.isatty(fd):
                    os.dup2(null, fd)
        with contextlib.suppress(OSError):
            os.write(2, message.encode())

    def poll(self):
        """(the signal's name, its exit code) once any process got one, else None."""
        try:
            signum = parallel.agree_on_stop(self.signum, self.peer_timeout)
        except parallel.PeerLost as e:
            raise parallel.PeerLost(f"{e}; {self.where()}") from None
        return (signal.Signals(signum).name, 128 + signum) if signum else None


class Log:
    """One metrics record every log_every steps, at eval_every and at the end, made once and written to every sink.

    A record: the step, the mean of each step metric since the last record,
    the learning rate of the last step, trained tokens/s, elapsed seconds, and
    `val_loss` (evaluate(params)) at multiples of eval_every and at the end.
    A sink has write(record) and may be a context manager (entered with the loop).
    """

    def __init__(self, sinks, lr, log_every, eval_every=None, evaluate=None):
        self.sinks, self.lr, self.eval_every, self.evaluate = list(sinks), lr, eval_every, evaluate
        self.every = (log_every, eval_every) if evaluate else (log_every,)
        self.last, self._stack = None, contextlib.ExitStack()

    def __enter__(self):
        for sink in self.sinks:
            if hasattr(sink, "__enter__"):
                self._stack.enter_context(sink)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def __call__(self, info: StepInfo):
        means, tokens, seconds = info.since(self.last)
        record = {"step": info.step, **{k: float(v) for k, v in means.items()}, "lr": float(self.lr(info.step - 1))}
        record["tokens_per_s"] = tokens / seconds
        record["elapsed"] = info.elapsed
        if self.evaluate is not None and (info.final or info.step % self.eval_every == 0):
            record["val_loss"] = self.evaluate(info.state.params)
        self.last = info.step
        for sink in self.sinks:
            sink.write(record)


class Progress:
    """A Log sink: a tqdm bar on a terminal (step, loss, validation loss, tokens/s, ETA); plain lines otherwise."""

    def __init__(self, total, initial=0, bar=None, file=None):
        self.total, self.start, self.last = total, initial, initial
        self.file, self.bar = file or sys.stdout, None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.file = sys.stderr
            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.file, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def write(self, record):
        """Show one metrics record."""
        val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
        step = record["step"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}{val} | {record['tokens_per_s']:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.last)
        else:
            elapsed = record["elapsed"]
            rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else 0.0
            print(
                f"step {step:{len(str(self.total))}d} / {self.total} | loss {record['loss']:.4f}{val} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {elapsed:.1f}s elapsed | eta {eta:.0f}s",
                file=self.file,
                flush=True,
            )
        self.last = step

    def note(self, text):
        (self.bar.write if self.bar is not None else partial(print, file=self.file, flush=True))(text)


class Checkpoints:
    """Saves every `every` steps, at the end and on a stop; never weights that are NaN or infinite."""

    def __init__(self, store, every, data_position, run_path, command="train"):
        self.store, self.every, self.data_position, self.run_path, self.command = store, every, data_position, run_path, command

    def __call__(self, info: StepInfo):
        state = jax.tree.map(np.asarray, info.state)
        finite = all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))
        if not finite:  # a finite loss can still come with weights that just overflowed
            raise Stopped(
                f"weights are NaN or infinite after step {info.step} (its loss was finite): training stopped there "
                f"and saved nothing after it; {self.store.latest()} ({ADVICE})"
            )
        self.store.save(state, self.data_position(info.step))
        return f"saved checkpoint {info.step}; resume with `microgpt-jax {self.command} --resume {self.run_path}`"


class Plot:
    """RUN_DIR/loss.png at the end (or a stop); a missing matplotlib or an unwritable file is a note, not a failure."""

    every = None

    def __init__(self, run_dir, note=print):
        self.run_dir, self.note = run_dir, note

    def __call__(self, info: StepInfo):
        if not info.final:
            return
        from microgpt_jax.plot import plot_runs

        try:
            self.note(f"loss curves: {plot_runs([self.run_dir], self.run_dir / 'loss.png')}")
        except UserError as e:
            self.note(f"no loss plot: {e}")


class Profile:
    """A JAX profiler trace of steps start..stop (counted as state.step counts them) in `directory`.

    Chunks end at start and stop (`at`), so the trace holds exactly those
    steps: it starts just before the chunk that begins at start and stops
    after the one that ends at stop, once its state is ready, before the hooks
    after it (evaluation, saving) run. A run that stops earlier stops the
    trace there. The trace is what jax.profiler.start_trace writes:
    directory/plugins/profile/TIME/HOST.xplane.pb (TensorBoard's profile
    plugin) and perfetto_trace.json.gz (ui.perfetto.dev). directory None: no
    trace, only the chunk plan (the other processes of a multi-process run,
    whose chunks must end where process 0's do). note: says, at the end,
    where the trace is.
    """

    every = None

    def __init__(self, start, stop, directory, note=print):
        self.at, self.directory, self.note = (start, stop), directory and Path(directory), note
        self.tracing, self.traced = False, None  # traced: the trace is written, whole (True) or cut short (False)

    def before(self, step, state):
        if step == self.at[0] and self.directory is not None:
            jax.block_until_ready(state)  # nothing of the steps before start in the trace
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.tracing = True

    def __call__(self, info: StepInfo):  # due at start, stop and the run's last chunk
        if self.tracing and (info.step >= self.at[1] or info.final):
            jax.block_until_ready(info.state)  # the last chunk's work in the trace, whole
            self._stop(whole=info.step >= self.at[1])

    def _stop(self, whole):
        self.tracing = False
        jax.profiler.stop_trace()
        self.traced = whole

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tracing:  # the run ended mid-trace (an error, ctrl-C): keep what was traced
            self._stop(whole=False)
        if self.traced is None:
            return
        start, stop = self.at
        traces = sorted(self.directory.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        steps = f"steps {start}:{stop}" + ("" if self.traced else f" (cut short: the run stopped before step {stop})")
        perfetto = f", or open {traces[-1]} at ui.perfetto.dev" if traces else ""
        self.note(f"profile of {steps} in {self.directory}: view it with `tensorboard --logdir {self.directory}` (profile tab){perfetto}")
