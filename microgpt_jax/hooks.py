"""The training loop's hooks: everything the host does between compiled chunks of steps.

Each hook is a callable taking the loop's `Info` with an `every` attribute
(None: after every chunk; N or (N, M): at those multiples and at the end),
registered in order with `fit(..., hooks)` (train.py). `Session.hooks`
(session.py) assembles the usual list for a run.
"""

import os
import signal
import sys
import threading
from functools import partial

import jax
import numpy as np

from microgpt_jax import parallel
from microgpt_jax.train import Stopped

ADVICE = "lower the learning rate or change the config, and start a new run with --out in a new directory"


class NonFinite:
    """Stop at the first NaN or infinite loss, saving nothing of that chunk: the latest checkpoint stays the last good one."""

    every = None

    def __init__(self, latest=lambda: "no checkpoint was saved"):
        self.latest = latest

    def __call__(self, info):
        bad = np.flatnonzero(~np.isfinite(info.losses))
        if bad.size:
            step = info.step - len(info.losses) + int(bad[0]) + 1
            raise Stopped(
                f"loss is {float(info.losses[bad[0]])} at step {step}: training stopped there and saved nothing "
                f"after it; {self.latest()} ({ADVICE})"
            )


class Signals:
    """SIGINT and SIGTERM ask the run to stop after the running chunk (and save); a second one quits at once.

    The handler only sets a flag. After each chunk every process calls one
    collective that tells all of them whether any got a signal, so a
    multi-process run stops at the same step everywhere; a peer that dies
    ends the others within peer_timeout seconds, with `where()` (the latest
    checkpoint and how to resume) in their one line.
    """

    every = None

    def __init__(self, peer_timeout=60.0, where=lambda: "no checkpoint was saved"):
        self.signum, self.peer_timeout, self.where, self._previous = 0, peer_timeout, where, {}
        self._peers = parallel.watch_peers(peer_timeout, where)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
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
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: finishing the current steps, then saving (send it again to quit without saving)\n".encode(),
        )

    def __call__(self, info):
        try:
            signum = parallel.agree_on_stop(self.signum, self.peer_timeout)
        except parallel.PeerLost as e:
            raise parallel.PeerLost(f"{e}; {self.where()}") from None
        if signum:
            info.stopping, info.stop_code = signal.Signals(signum).name, 128 + signum


class Evaluate:
    """The validation loss, every `every` steps and at the end."""

    def __init__(self, trainer, eval_set, every):
        self.trainer, self.eval_set, self.every = trainer, trainer.put(eval_set), every

    def __call__(self, info):
        info.val_loss = float(self.trainer.evaluate(info.state.params, self.eval_set))


class Record:
    """The metrics record of the steps since the last one: mean loss, lr, tokens/s, elapsed, val_loss."""

    def __init__(self, lr, every):
        self.lr, self.every, self.last = lr, every, None

    def __call__(self, info):
        loss, tokens, seconds = info.since(self.last)
        info.record = {
            "step": info.step,
            "loss": loss,
            "lr": float(self.lr(info.step - 1)),
            "tokens_per_s": tokens / seconds,
            "elapsed": info.elapsed,
        }
        if info.val_loss is not None:
            info.record["val_loss"] = info.val_loss
        self.last = info.step


class WriteMetrics:
    """Appends each record to RUN_DIR/metrics.jsonl (metrics.py)."""

    def __init__(self, metrics_file, every):
        self.file, self.every = metrics_file, every

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        self.file.__exit__(*exc)

    def __call__(self, info):
        if info.record:
            self.file.write(info.record)


class Progress:
    """A tqdm bar on a terminal (step, loss, validation loss, tokens/s, ETA); plain lines otherwise."""

    def __init__(self, total, initial=0, bar=None, file=None):
        self.total, self.start = total, initial
        self.file, self.bar = file or sys.stdout, None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.file = sys.stderr
            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.file, dynamic_ncols=True)

    def update(self, record, steps_done):
        """Show one metrics record; steps_done is how many steps it covers."""
        val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}{val} | {record['tokens_per_s']:,.0f} tok/s", refresh=False)
            self.bar.update(steps_done)
            return
        step, elapsed = record["step"], record["elapsed"]
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        print(
            f"step {step:{len(str(self.total))}d} / {self.total} | loss {record['loss']:.4f}{val} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {elapsed:.1f}s elapsed | eta {eta:.0f}s",
            file=self.file,
            flush=True,
        )

    def note(self, text):
        (self.bar.write if self.bar is not None else partial(print, file=self.file, flush=True))(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class ShowProgress:
    """Shows each record (and the compile time, once) on a Progress display."""

    def __init__(self, progress: Progress, every):
        self.progress, self.every, self.last = progress, every, progress.start

    def __exit__(self, *exc):
        self.progress.close()

    def __enter__(self):
        return self

    def __call__(self, info):
        if info.compile_s:
            self.progress.note(f"compiled the training step in {info.compile_s:.1f}s")
        if info.record:
            self.progress.update(info.record, info.step - self.last)
            self.last = info.step


class Checkpoints:
    """Saves every `every` steps, at the end and on a stop; never weights that are NaN or infinite."""

    def __init__(self, store, every, data_position, run_path):
        self.store, self.every, self.data_position, self.run_path = store, every, data_position, run_path

    def __call__(self, info):
        state = jax.tree.map(np.asarray, info.state)
        finite = all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))
        if not finite:  # a finite loss can still come with weights that just overflowed
            raise Stopped(
                f"weights are NaN or infinite after step {info.step} (its loss was finite): training stopped there "
                f"and saved nothing after it; {self.store.latest()} ({ADVICE})"
            )
        self.store.save(state, self.data_position(info.step))
        info.notes.append(f"saved checkpoint {info.step}; resume with `microgpt-jax train --resume {self.run_path}`")


class Plot:
    """RUN_DIR/loss.png at the end (or a stop); a missing matplotlib or an unwritable file is a note, not a failure."""

    every = None

    def __init__(self, run_dir, note=print):
        self.run_dir, self.note = run_dir, note

    def __call__(self, info):
        if not info.final:
            return
        from microgpt_jax.errors import UserError
        from microgpt_jax.plot import plot_runs

        try:
            self.note(f"loss curves: {plot_runs([self.run_dir], self.run_dir / 'loss.png')}")
        except UserError as e:
            self.note(f"no loss plot: {e}")
