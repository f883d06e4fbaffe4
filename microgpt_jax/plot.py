"""Loss curves from RUN_DIR/metrics.jsonl: `microgpt-jax plot RUN_DIR [RUN_DIR ...]`.

matplotlib is an optional extra (`pip install 'microgpt-jax[plot]'`);
training writes RUN_DIR/loss.png when it is installed.
"""

import os
from pathlib import Path

import numpy as np

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


def _pyplot(out_path):
    """matplotlib's pyplot, files only, once out_path's format is known to be one it writes."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with: pip install 'microgpt-jax[plot]'") from None
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if Path(out_path).suffix.lstrip(".").lower() not in formats:
        raise UserError(f"cannot write a plot as {Path(out_path).name}: name the file with one of .{', .'.join(sorted(formats))}")
    return plt


def _save(plt, fig, ax, out_path):
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
    return Path(out_path)


def plot_sweep(summary: dict, records: list, out_path):
    """A sweep's training loss: one colour per setting, the mean over its seeds as a line, their range as a band;
    the validation loss's means as dashed dots. records: each member's metrics records."""
    plt = _pyplot(out_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, setting in enumerate(summary["settings"]):
        color = f"C{i % 10}"
        idx = [j for j, m in enumerate(summary["members"]) if m["values"] == setting["settings"] and not m["frozen"]]
        steps = sorted(set.intersection(*[{r["step"] for r in records[j]} for j in idx])) if idx else []
        if not steps:
            continue
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            by_step = [[r[key] for j in idx for r in records[j] if r["step"] == s and key in r] for s in steps]
            points = [(s, v) for s, v in zip(steps, by_step) if len(v) == len(idx)]
            if not points:
                continue
            xs, vs = [s for s, _ in points], np.asarray([v for _, v in points])
            label = f"{setting['label']} ({len(idx)} seeds){' val' if key == 'val_loss' else ''}"
            ax.plot(xs, vs.mean(axis=1), style, color=color, ms=3, label=label)
            if key == "loss" and len(idx) > 1:
                ax.fill_between(xs, vs.min(axis=1), vs.max(axis=1), color=color, alpha=0.2)
    return _save(plt, fig, ax, out_path)


def plot_runs(run_dirs, out_path):
    """Training (solid) and validation (dashed, dots) loss against step, one colour per run, saved to out_path."""
    plt = _pyplot(out_path)
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((_, records), label) in enumerate(zip(runs, legend_labels(run_dirs))):
        color = f"C{i % 10}"
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{label} train")
        val = [r for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=3, label=f"{label} val")
    return _save(plt, fig, ax, out_path)
