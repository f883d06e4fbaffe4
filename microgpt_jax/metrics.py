"""RUN_DIR/metrics.jsonl: one JSON record per line, only ever appended (a sink of the loop's Log hook).

A record is {"step", each step metric ("loss", "grad_norm", ...), "lr",
"tokens_per_s", "elapsed"} and "val_loss" where one was measured. A resumed run appends {"resumed_at": S}
before its own records: a reader drops the records after step S written
before it (steps trained again), so the file reads as one history. A torn
line (a kill or a full disk mid-write) is dropped with a warning.
"""

import json
import sys
from pathlib import Path

from microgpt_jax.errors import UserError

METRICS = "metrics.jsonl"


class MetricsFile:
    """Appends records to RUN_DIR/metrics.jsonl, each one whole line, flushed."""

    def __init__(self, run_dir, resumed_at=None):
        self.path = Path(run_dir) / METRICS
        self.resumed_at, self.file = resumed_at, None

    def __enter__(self):
        self.file = open(self.path, "ab")
        if self.file.tell() and self._last_byte() != b"\n":
            self.file.write(b"\n")  # end a torn line, so it stays one unreadable line and no record joins it
        if self.resumed_at is not None:
            self.write({"resumed_at": self.resumed_at})
        return self

    def _last_byte(self):
        with open(self.path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1)

    def write(self, record: dict):
        self.file.write((json.dumps(record) + "\n").encode())
        self.file.flush()

    def __exit__(self, *exc):
        self.file.close()


def read_metrics(run_dir, warn=None) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl as one history, in step order."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    path = Path(run_dir) / METRICS
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a file (a directory?); move it away: a run's metrics are that file")
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run directory written by `microgpt-jax train --out DIR`")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e})") from None
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "resumed_at" in record:
                history = [r for r in history if r["step"] <= int(record["resumed_at"])]
                continue
            record["step"], record["loss"] = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            warn(f"{path} line {number} is not a whole metrics record (a write cut short?); skipped")
            continue
        history = [r for r in history if r["step"] < record["step"]] + [record]
    return history
