"""Loss curves from RUN_DIR/metrics.jsonl: `microgpt-jax plot RUN_DIR [RUN_DIR ...]`.

matplotlib is an optional extra (`pip install 'microgpt-jax[plot]'`);
training writes RUN_DIR/loss.png when it is installed.
"""

import os
from pathlib import Path

from microgpt_jax.errors import UserError
from microgpt_jax.metrics import read_metrics


def legend_labels(run_dirs) -> list[str]:
    """Each run's label: the shortest tail of its path that no other run shares (`a/run`, `b/run`; `run` when alone)."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]  # `.`, `..` and trailing slashes named as folders

    def tail(p, k):
        return str(Path(*p[-k:]))

    labels = []
    for i, p in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i and q != p]  # the same run twice cannot be told apart
        k = 1
        while k < len(p) and any(tail(q, k) == tail(p, k) for q in others):
            k += 1
        labels.append(tail(p, k))
    return labels


def plot_runs(run_dirs, out_path):
    """Training (solid) and validation (dashed, dots) loss against step, one colour per run, saved to out_path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with: pip install 'microgpt-jax[plot]'") from None
    out_path = Path(out_path)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if out_path.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"cannot write a plot as {out_path.name}: name the file with one of .{', .'.join(sorted(formats))}")
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((_, records), label) in enumerate(zip(runs, legend_labels(run_dirs))):
        color = f"C{i % 10}"
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{label} train")
        val = [r for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=120)
    except OSError as e:
        raise UserError(f"could not write {out_path} ({e.strerror or e}); pass a writable path") from None
    finally:
        plt.close(fig)
    return out_path
