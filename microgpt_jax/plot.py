"""Loss curves from RUN_DIR/metrics.jsonl: `microgpt-jax plot RUN_DIR [RUN_DIR ...]`.

matplotlib is an optional extra (`pip install 'microgpt-jax[plot]'`);
training writes RUN_DIR/loss.png when it is installed.
"""

import json
from pathlib import Path

from microgpt_jax.errors import UserError

METRICS = "metrics.jsonl"


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl in step order; where a resumed run logged a step twice, the later record."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run directory written by `microgpt-jax train --out DIR`")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {number} is not a metrics record; was it written by microgpt-jax train?") from None
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(run_dirs, out_path):
    """Training (solid) and validation (dashed, dots) loss against step, one colour per run, saved to out_path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with: pip install 'microgpt-jax[plot]'") from None
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (run_dir, records) in enumerate(runs):
        color = f"C{i % 10}"
        label = run_dir.name or str(run_dir)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{label} train")
        val = [r for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)
