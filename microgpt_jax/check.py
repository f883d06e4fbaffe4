"""The cross-check: the JAX model against the scalar engine, in float64.

Both engines start from identical weights; we compare the logits of every
position, every weight's gradient of the loss, and the losses and weights
over a few Adam steps. `microgpt-jax check` prints the table this builds.
"""

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import reference
from microgpt_jax.dataset import first_document, is_dataset
from microgpt_jax.errors import UserError
from microgpt_jax.flops import compiler_options, jitted
from microgpt_jax.layout import padded_batch, step_docs
from microgpt_jax.model import GPTConfig, dropout_masks, forward, init_params_reference, loss_fn
from microgpt_jax.rundir import Weights, load_weights
from microgpt_jax.text import load_docs, reference_docs, resolve_data_path
from microgpt_jax.tokenizer import CharTokenizer
from microgpt_jax.train import TrainConfig, Trainer, dropout_key

# what the check takes of TrainConfig: what the step computes (not its length, dtype or cadences)
CHECKED_TRAINING = (
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "schedule",
    "min_lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "grad_clip",
    "seed",
)
# |jax - ref| <= ATOL + RTOL * |ref|, element by element.
ATOL, RTOL = 1e-12, 1e-10
# Weights after several Adam steps: |jax - ref| <= PARAM_ATOL.
PARAM_ATOL = 1e-10


def require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError("the cross-check runs in float64: call jax.config.update('jax_enable_x64', True) first")


def to_reference_state(params) -> dict:
    """JAX params -> the scalar engine's state dict (fresh Value leaves: lists of rows, or of entries for a vector)."""
    values = lambda w: [values(row) for row in w] if w.ndim > 1 else [reference.Value(float(x)) for x in w]
    return {name: values(np.asarray(w, np.float64)) for name, w in params.items()}


def from_reference_state(state, attr="data") -> dict:
    """The scalar engine's state dict -> arrays of each node's `data` (or `grad`)."""
    numbers = lambda w: [numbers(row) for row in w] if isinstance(w, list) else getattr(w, attr)
    return {name: np.array(numbers(m), np.float64) for name, m in state.items()}


def reference_grads(params, cfg, docs, grad_accum=1, masks=None):
    """(loss, {name: grad}) of a batch of encoded documents from the scalar engine."""
    state = to_reference_state(params)
    loss = reference.backward_batch(state, cfg, docs, grad_accum, masks)
    return loss, from_reference_state(state, "grad")


def _jit(fn):
    """fn jitted (the config static) as check's programs are: as small as the scalar engine can follow, so on a CPU
    compiled cheaply (flops.compiler_options), as a small training run is."""
    return jitted(fn, compiler_options(jax.default_backend(), 0.0), static_argnums=2)


_value_and_grad = jax.value_and_grad(loss_fn)


def _forward(params, tokens_BT, cfg, masks=None):
    return _jit(forward)(params, tokens_BT, cfg, masks=masks)


def jax_grads(params, cfg, docs, masks=None):
    batch = jax.tree.map(jnp.asarray, padded_batch(docs, cfg.block_size))
    loss, grads = _jit(_value_and_grad)(params, batch, cfg, masks=masks)
    return float(loss), jax.tree.map(np.asarray, grads)


def step_masks(cfg, tcfg, step, rows):
    """Training step `step`'s dropout masks, as the Trainer draws them: (JAX's, each row's for the scalar engine), or Nones."""
    masks = dropout_masks(dropout_key(tcfg.seed, step), cfg, rows, cfg.block_size, jnp.float64)
    if masks is None:
        return None, None
    return masks, [{name: np.asarray(m[b]).tolist() for name, m in masks.items()} for b in range(rows)]


def batch_docs(docs, step, batch_size):
    """The documents of training step `step`, in the order training uses (layout.step_docs)."""
    return [docs[i] for i in step_docs(step, batch_size, len(docs))]


@dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    ok: bool


def compare(name, got, want, atol=ATOL, rtol=RTOL) -> Row:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    ok = bool(got.shape == want.shape and np.all(err <= atol + rtol * np.abs(want)))
    return Row(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), ok)


def check_logits(params, cfg, tokens, masks=(None, None)) -> Row:
    """The vectorized forward against the scalar engine's token-by-token logits (with row 0 of step_masks' masks)."""
    tokens = tokens[: cfg.block_size]
    n, (batch_masks, row_masks) = len(tokens), masks
    row = None if row_masks is None else row_masks[0]
    want = [[v.data for v in out] for out in reference.sequence_logits(to_reference_state(params), cfg, tokens, row)]
    # row 0's masks at the first n positions: the positions this forward has
    cut = None if batch_masks is None else {k: m[:1, :n] if m.ndim == 3 else m[:1, :, :n, :n] for k, m in batch_masks.items()}
    got = _forward(params, jnp.asarray([tokens]), cfg, masks=cut)[0]
    return compare("logits", got, want)


def check_grads(params, cfg, docs, grad_accum=1, masks=(None, None)) -> list[Row]:
    """The loss of a batch of documents and every weight's gradient, element by element."""
    ref_loss, ref_g = reference_grads(params, cfg, docs, grad_accum, masks[1])
    jax_loss, jax_g = jax_grads(params, cfg, docs, masks[0])
    return [compare("loss", jax_loss, ref_loss)] + [compare(f"grad {k}", jax_g[k], ref_g[k]) for k in ref_g]


def reference_optimizer(params, tcfg: TrainConfig):
    """The scalar engine's Adam with the training config's options."""
    options = ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "schedule", "min_lr", "warmup")
    return reference.Adam(reference.parameters(params), tcfg.steps, **{k: getattr(tcfg, k) for k in options})


def check_training(params, cfg, tcfg: TrainConfig, docs, progress=lambda message: None) -> list[Row]:
    """tcfg.steps steps on both engines, step s on batch_docs(docs, s, batch_size): losses, then final weights."""
    state = to_reference_state(params)
    adam = reference_optimizer(state, tcfg)
    trainer = Trainer(cfg, tcfg)
    train_state = trainer.init(jax.tree.map(jnp.asarray, params))
    ref_losses, jax_losses = [], []
    for s in range(tcfg.steps):
        progress(f"training step {s + 1} of {tcfg.steps} on both engines")
        this_step = batch_docs(docs, s, tcfg.batch_size)
        row_masks = step_masks(cfg, tcfg, s, tcfg.batch_size)[1]
        ref_losses.append(reference.train_batch(state, cfg, adam, s, this_step, tcfg.grad_accum, row_masks))
        # the training loop itself, compiled as a run compiles it, one step a call
        batches = trainer.put(jax.tree.map(lambda a: a[None], padded_batch(this_step, cfg.block_size)))
        train_state, metrics = trainer.compiled_steps(train_state, batches)[0](train_state, batches, 1)
        jax_losses.append(float(metrics["loss"][0]))
    p = train_state.params
    final = from_reference_state(state)
    return [compare("train losses", jax_losses, ref_losses)] + [
        compare(f"after {tcfg.steps} steps {k}", p[k], final[k], atol=PARAM_ATOL, rtol=0.0) for k in final
    ]


def run_check(cfg: GPTConfig, params, docs, steps=0, tcfg: TrainConfig | None = None, progress=lambda message: None) -> list[Row]:
    """The whole table: logits of docs[0], loss and gradients of step 0's batch, then `steps` training steps.

    docs: encoded documents (one is enough: a step then repeats it); tcfg: the
    training options both engines use (batch_size, grad_accum, the optimizer
    and its schedule, the seed of the dropout masks); its steps and dtype are
    set here.
    """
    require_x64()
    tcfg = dataclasses.replace(tcfg or TrainConfig(), steps=max(steps, tcfg.warmup + 1 if tcfg else 1), dtype="float64")
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float64), params)
    masks = step_masks(cfg, tcfg, 0, tcfg.batch_size)
    progress("logits of the first document, then the loss and gradients of step 0's batch, on both engines")
    rows = [check_logits(params, cfg, docs[0], masks)]
    rows += check_grads(params, cfg, batch_docs(docs, 0, tcfg.batch_size), tcfg.grad_accum, masks)
    if steps:
        rows += check_training(params, cfg, tcfg, docs, progress)
    return rows


class Subject(NamedTuple):
    """What `microgpt-jax check` compares the engines on: a model, its weights and the documents steps train on."""

    cfg: GPTConfig
    tokenizer: object
    params: dict
    docs: list  # the documents (text), step s training docs[(s * batch_size + i) % len(docs)]


def subject(run_dir=None, data=None, doc=None, model: GPTConfig | None = None, tcfg: TrainConfig | None = None) -> Subject:
    """The model, weights and documents of the check (tcfg.steps steps of tcfg.batch_size documents).

    run_dir: its (or an export's) config, tokenizer and weights, with the
    documents of its data in file order (data: another file; a prepared
    dataset: its first document). Else microgpt's initial weights for model,
    its vocabulary from data's documents, which microgpt's shuffle orders:
    both drawn from the stream of tcfg.seed (42, microgpt's, by default).
    doc: the one document every row of every step trains on.
    """
    tcfg = tcfg or TrainConfig()
    if run_dir:
        cfg, tokenizer, params, _, run = (run_dir if isinstance(run_dir, Weights) else load_weights(run_dir))[:5]
        data_path = resolve_data_path(data) if data or not run else run.data_path
        docs = [] if doc is not None else [first_document(data_path)] if is_dataset(data_path) else load_docs(data_path)
    else:
        docs, rng = reference_docs(resolve_data_path(data), tcfg.seed)
        tokenizer = CharTokenizer.from_docs(docs)
        cfg = dataclasses.replace(model or GPTConfig(), vocab_size=tokenizer.size)
        params = init_params_reference(cfg, rng)
    unknown = tokenizer.unknown(doc) if doc is not None else []
    if unknown:
        raise UserError(f"--doc has characters outside the vocabulary {unknown}; the vocabulary is {tokenizer.chars!r}")
    return Subject(cfg, tokenizer, params, [doc] if doc is not None else docs[: tcfg.steps * tcfg.batch_size])


def format_table(rows) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'parameter':<{width}}  {'max abs err':>12}  {'max rel err':>12}  result"]
    lines += [f"{r.name:<{width}}  {r.max_abs:12.3e}  {r.max_rel:12.3e}  {'pass' if r.ok else 'FAIL'}" for r in rows]
    return "\n".join(lines)
