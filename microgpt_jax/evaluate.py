"""Evaluation of a trained run: loss, perplexity and bits per character on its validation split or on a text file.

On the validation split the evaluation is the training's own: the same
data source builds the same eval set (`Source.eval_set`) and the same
compiled `Evaluator.evaluate` measures it (no optimizer, no training
session), so `loss` is the val_loss the training recorded for that
checkpoint, to the bit, on any number of devices: each row's loss is
computed alone and the rows are added exactly.

On another file (--data FILE) the file is laid out as the run's data mode
lays out its data: every document, as training lays documents out (docs),
or the whole text in windows of block_size + 1 tokens (stream). `loss` is
then computed as the training computes it, over all of it.

Either way `nats` is the summed loss of every predicted token (the same
evaluation, every position weighing 1), so perplexity = exp(nats / tokens)
and bits per character = nats / ln 2 / characters, where each predicted
token counts the characters it stands for (`token_units`).
"""

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from microgpt_jax import parallel
from microgpt_jax.data import DocumentSource, Source, load_train_data
from microgpt_jax.dataset import is_dataset
from microgpt_jax.errors import UserError
from microgpt_jax.layout import Batch, windows_batch
from microgpt_jax.runtime import set_precision
from microgpt_jax.text import load_docs, read_text
from microgpt_jax.train import Evaluator


class Evaluation(NamedTuple):
    loss: float  # as the training reports val_loss: docs, the mean over documents of their mean token loss; stream, per token
    nats: float  # the loss summed over every predicted token
    tokens: int  # predicted tokens
    units: int  # the characters (bytes, for a byte-level tokenizer) they stand for
    unit: str  # "char" or "byte"
    step: int
    data: str  # what was evaluated, in words

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)

    @property
    def bits_per_unit(self) -> float:
        return self.nats / math.log(2) / self.units

    def to_json(self) -> dict:
        units = {"char": "characters", "byte": "bytes"}[self.unit]
        return {
            "step": self.step,
            "data": self.data,
            "loss": self.loss,
            "perplexity": self.perplexity,
            f"bits_per_{self.unit}": self.bits_per_unit,
            "tokens": self.tokens,
            units: self.units,
            "nats": self.nats,
        }

    def table(self) -> str:
        rows = [(key.replace("_", " "), value) for key, value in self.to_json().items() if key not in ("data", "nats")]
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {value:.6f}" if isinstance(value, float) else f"{key:<{width}}  {value}" for key, value in rows]
        return "\n".join([f"evaluated: {self.data}", *lines])


# --- the tokenizer: what the integration of other tokenizers points at ---


def token_units(tokenizer) -> tuple[str, np.ndarray]:
    """(unit, how many of it each token id stands for [V]): what bits per character (or byte) divides by.

    BOS counts 1: as a target it is the newline that ends a document.
    """
    lengths_V = np.array(tokenizer.unit_lengths(), np.int64)
    lengths_V[tokenizer.bos] = 1
    return {"character": "char", "byte": "byte"}[tokenizer.unit], lengths_V


def check_encodable(tokenizer, text, path):
    """A UserError naming the characters of text (what is to be encoded) the run's tokenizer cannot encode, if any."""
    unknown = tokenizer.unknown(text)
    if unknown:
        shown = "".join(unknown[:20]) + ("..." if len(unknown) > 20 else "")
        raise UserError(
            f"{path} has {len(unknown)} character(s) outside the run's vocabulary ({shown!r}); "
            "evaluate on text made of the run's characters"
        )


# --- what is evaluated ---


class Windows(Source):
    """A whole text as windows of block_size + 1 tokens, every token after the first predicted once.

    The windows do not overlap, as the validation windows; a last one ends at
    the text's end, its positions already predicted weighing 0. Every other
    position weighs 1 / the number predicted: the loss is the mean per token.
    """

    def __init__(self, ids, block_size, rows):
        T, self.rows = block_size, rows
        offsets = np.arange((len(ids) - 1) // T) * T
        tail = len(ids) - 1 - len(offsets) * T  # tokens no full window predicts
        whole = windows_batch(ids, np.append(offsets, len(ids) - T - 1) if tail else offsets, T)
        counted = np.ones(whole.weights.shape, bool)
        if tail:
            counted[-1, : T - tail] = False
        self.whole = whole._replace(weights=counted / counted.sum())

    def eval_set(self) -> Batch:
        return self._eval_stacked(self.whole)


def read_checked(path) -> str:
    """The text of --data FILE, with a one-line error for each way it can be unusable."""
    path = Path(path)
    try:
        return read_text(path)
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e}); pass a readable text file") from None


def file_source(path, tokenizer, cfg, tcfg, dcfg) -> tuple[Source, str]:
    """(a source whose eval_set is the whole file laid out as the run's data, a description of it)."""
    text = read_checked(path)
    if dcfg.mode == "stream":
        check_encodable(tokenizer, text, path)
        ids = tokenizer.ids(text)
        if len(ids) < cfg.block_size + 1:
            raise UserError(
                f"{path} has {len(ids)} tokens, fewer than the run's block_size + 1 = {cfg.block_size + 1} "
                "(one window); evaluate a longer text"
            )
        return Windows(ids, cfg.block_size, tcfg.batch_size), f"{path} ({len(ids)} tokens, stream)"
    docs = load_docs(path)
    check_encodable(tokenizer, "".join(docs), path)
    encoded = [tokenizer.encode(doc) for doc in docs]
    every = dataclasses.replace(dcfg, eval_size=len(encoded))  # the whole file, not eval_size documents of it
    return DocumentSource(encoded, encoded, every, tcfg.batch_size, cfg.block_size), f"{path} ({len(encoded)} documents)"


def validation_data(run, data_path=None):
    """(mesh, source) of the run's data as its training laid it out: the eval set is the one val_loss was measured on.

    data_path: another prepared dataset (its validation split, tokenized with the run's tokenizer)."""
    path = Path(data_path or run.data_path)
    if not path.exists():
        raise UserError(
            f"the run's data file {path} is missing (its validation split comes from it); "
            "restore it, or evaluate on another file with --data FILE"
        )
    if data_path is None:
        run.check_data(path)
    # all devices where they divide the batch, else one: either way each row's loss is the same
    mesh = parallel.make_mesh(None if run.tcfg.batch_size % jax.device_count() == 0 else 1)
    rows = mesh.devices.size * run.tcfg.grad_accum
    tcfg, cfg = run.tcfg, run.cfg
    local = parallel.local_rows if jax.process_count() > 1 else None
    tokenizer, source = load_train_data(path, run.dcfg, tcfg.batch_size, cfg.block_size, tcfg.seed, rows, local, None, run.tokenizer)
    if tokenizer != run.tokenizer:
        raise UserError(f"{path} is tokenized with another tokenizer than the run's; prepare it with the run's --tokenizer")
    return mesh, source


def evaluate(evaluator: Evaluator, params, eval_set: Batch, lengths_V) -> tuple[float, float, int, int]:
    """(loss, nats, tokens, units) of a stacked eval set: the training's loss, then every position weighing 1."""
    counted = eval_set.weights > 0
    loss = evaluator.evaluate(params, evaluator.put(eval_set))
    nats = evaluator.evaluate(params, evaluator.put(eval_set._replace(weights=counted.astype(np.float64))))
    return loss, nats, int(counted.sum()), int(lengths_V[eval_set.targets[counted]].sum())


def evaluate_run(spec, data=None, step=None) -> Evaluation:
    """Evaluate RUN_DIR (its latest good checkpoint), RUN_DIR@STEP or step `step` of RUN_DIR.

    data: None for the run's validation split (exactly the training's
    val_loss), or a text file, laid out in the run's data mode.
    """
    from microgpt_jax.rundir import load_weights, split_step

    if step is not None:
        if split_step(spec)[1] is not None:
            raise UserError(f"{spec} names a step and so does --step; give the step once")
        spec = f"{spec}@{step}"
    weights = load_weights(spec)
    run = weights.run
    if run is None:
        raise UserError(f"{spec} is an exported file; pass a run directory (or RUN_DIR@STEP): evaluating needs the run's data config")
    set_precision(run.tcfg.dtype, allow_cpu_bfloat16=True)
    if data is None or is_dataset(data):  # a prepared dataset: its validation split
        mesh, source = validation_data(run, data)
        eval_set = source.eval_set()
        if eval_set is None:
            raise UserError(f"{data or run.path} holds out no validation data (val_fraction 0); evaluate on a file with --data FILE")
        what = f"the validation split of {data or run.data_path}"
    else:
        source, what = file_source(data, run.tokenizer, run.cfg, run.tcfg, run.dcfg)
        mesh, eval_set = None, source.eval_set()
    evaluator = Evaluator(run.cfg, run.tcfg.dtype, run.tcfg.param_dtype, mesh)
    params = evaluator.replicate({k: np.asarray(w, run.tcfg.param_dtype) for k, w in weights.params.items()})
    unit, lengths_V = token_units(run.tokenizer)
    return Evaluation(*evaluate(evaluator, params, eval_set, lengths_V), unit, weights.origin["step"], what)
