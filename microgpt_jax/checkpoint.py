"""Run directories: what `train --out` writes and `sample` reads.

RUN_DIR/run.json holds the model config, the training config and the
vocabulary; RUN_DIR/params.npz the weights with the spec's keys.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from microgpt_jax.data import Vocab
from microgpt_jax.errors import UserError
from microgpt_jax.model import GPTConfig
from microgpt_jax.train import TrainConfig


def save_run(run_dir, cfg: GPTConfig, tcfg: TrainConfig, vocab: Vocab, params):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # train --out made it, empty, before training
    meta = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg), "vocab": vocab.chars}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    np.savez(run_dir / "params.npz", **{k: np.asarray(v) for k, v in params.items()})


def load_run(run_dir):
    """(GPTConfig, TrainConfig, Vocab, params) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "params.npz").is_file():
        raise UserError(f"{run_dir} is not a run directory; pass one written by `microgpt-jax train --out DIR`")
    meta = json.loads((run_dir / "run.json").read_text())
    with np.load(run_dir / "params.npz") as f:
        params = {k: f[k] for k in f.files}
    return GPTConfig(**meta["model"]), TrainConfig(**meta["train"]), Vocab(meta["vocab"]), params
