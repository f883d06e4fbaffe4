"""Will a training run fit? An estimate of its memory, before anything is allocated.

`estimate` counts, in bytes, what a run of the compiled chunk loop
(train.Trainer.steps) holds at its peak: weights, Adam's state, gradients,
one step's activations and the chunk's batches. It is integer arithmetic on
Python ints (no arrays, no overflow at sizes of 1e9), so it answers at once
even for a model that would need petabytes. It is meant as an upper bound
of XLA's own figure (tests/test_memory.py compares it with the compiled
loop's memory_analysis) within a small factor.

`check_fits` compares it with `available_bytes` and raises a UserError of
one sentence when it does not fit. `check_compiled` does the same with
XLA's own figure for the compiled chunk loop (`StepMemory`, read from
`compiled.memory_analysis()`), once the estimate has passed. Sizes are
printed in SI units (1 KB = 1000 bytes).
"""

import os
from typing import NamedTuple

import jax
import numpy as np

from microgpt_jax.errors import UserError
from microgpt_jax.model import QUERY_BLOCK, GPTConfig

BATCH_INT32_BYTES = 4 * 4  # per position: tokens, targets, positions, segments (int32); the weights are in param_dtype
CHUNKS_IN_FLIGHT = 2  # run_steps sends the next chunk's batches while the current one runs
FLATTEN_COPIES = 2  # optax.flatten ravels the gradients into one vector and the updates come out as one
OPT_COUNT_BYTES = 8  # two int32 step counts: Adam's and the learning-rate schedule's


LOWER = ("n_embd", "n_layer", "block_size", "batch_size")  # the config values a run that does not fit should lower


class TooBig(UserError):
    """A run does not fit: `head` says by how much, `fields` the config values to lower.

    str() names the values as the library spells them (block_size); the
    command line rewords them as its flags (`with_flags`).
    """

    def __init__(self, head, fields=LOWER):
        self.head, self.fields = head, tuple(fields)
        super().__init__(self.with_flags(str))

    def with_flags(self, flag) -> str:
        names = [flag(f) for f in self.fields]
        return f"{self.head}; lower {', '.join(names[:-1])} or {names[-1]}"


class Estimate(NamedTuple):
    """Bytes a training run needs, by what holds them. `total` is their sum.

    On a CPU the device is the host: everything counts against the same
    memory. On an accelerator `device` is what its memory must hold.
    """

    weights: int
    optimizer: int
    gradients: int
    activations: int
    batches: int  # on the device
    host_batches: int

    @property
    def device(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.batches

    @property
    def total(self) -> int:
        return self.device + self.host_batches

    def describe(self, host=True) -> str:
        """'weights 1.1 TB, optimizer state 2.2 TB, ...': the terms over 0 bytes, largest first."""
        terms = [
            ("weights", self.weights),
            ("optimizer state", self.optimizer),
            ("gradients", self.gradients),
            ("activations", self.activations),
            ("batches", self.batches + (self.host_batches if host else 0)),
        ]
        return ", ".join(f"{name} {format_bytes(n)}" for name, n in sorted(terms, key=lambda t: -t[1]) if n)


UNITS = ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def format_bytes(n) -> str:
    """Bytes in SI units (1 KB = 1000 B), 3 significant digits: 999 B, 1.5 KB, 21.4 GB, 3.2 TB."""
    value, unit = float(n), 0
    while value >= 999.5 and unit < len(UNITS) - 1:  # 999.5 would print as 1000
        value /= 1000
        unit += 1
    if unit == 0:
        return f"{int(n)} B"
    if value >= 1e5:  # beyond the largest unit
        return f"{value:.2e} {UNITS[unit]}"
    return f"{value:.3g} {UNITS[unit]}" if value < 100 else f"{value:.0f} {UNITS[unit]}"


def num_params(cfg: GPTConfig) -> int:
    """The number of weights: the sizes over model.param_shapes, in closed form (no dict of n_layer entries)."""
    V, D, T, L, E, F = cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.n_layer, kv_width(cfg), cfg.hidden
    gated = cfg.mlp == "gated"
    # wte [V, D], lm_head [V, D] unless tied, wpe [T, D] unless rope;
    # per layer wq, wo [D, D], wk, wv [E, D] (E = n_kv_head * head_dim), fc1 [F, D], fc2 [D, F], gate [F, D] if gated
    embeddings = V * D + (0 if cfg.tie_embeddings else V * D) + (T * D if cfg.pos == "learned" else 0)
    # a bias per output of every linear layer of a block; a gain (and a layernorm's bias) [D] per norm
    biases = L * (2 * D + 2 * E + (1 + gated) * F + D) if cfg.bias else 0
    gains = len(cfg.norm_sites()) * D * (1 + (cfg.norm == "layernorm")) if cfg.norm_gain else 0
    return embeddings + L * (2 * D * D + 2 * E * D + (2 + gated) * F * D) + biases + gains


def kv_width(cfg: GPTConfig) -> int:
    """The width of k and v: n_embd, or less with grouped-query attention."""
    return cfg.kv_heads * cfg.head_dim


def attention_scores(T: int) -> int:
    """Scores per row and head over all query blocks: block [t0, t1) scores its queries against keys 0..t1-1."""
    q = QUERY_BLOCK
    full, rest = divmod(T, q)
    return q * q * full * (full + 1) // 2 + rest * T


def estimate(cfg: GPTConfig, rows: int, chunk_steps: int, dtype, param_dtype, grad_accum=1, members=1) -> Estimate:
    """Bytes of a training run of cfg: `rows` batch rows of block_size, `chunk_steps` steps per compiled chunk.

    dtype is the compute dtype, param_dtype that of the weights and Adam's
    moments (train.TrainConfig.dtype and .param_dtype); grad_accum
    micro-batches per step (TrainConfig.grad_accum): the activations are one
    micro-batch's; members: a sweep's, each holding all of it. Only Python ints.
    """
    c = np.dtype(dtype).itemsize  # compute: the weights' cast under bfloat16
    p = np.dtype(param_dtype).itemsize  # weights, moments, gradients, batch weights
    # activations: at least float32 (XLA on a CPU computes bfloat16 elementwise ops in float32;
    # the loss's softmax is float32 anyway, model.loss_fn), so this overcounts bfloat16 elsewhere
    a = max(c, 4)
    P = num_params(cfg)
    # activations are one micro-batch's: B rows of the step's `rows`
    B, T, D, H, V, L = rows // grad_accum, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer
    BT, E = B * T, kv_width(cfg)
    F = cfg.hidden
    scores = B * H * attention_scores(T)  # attention scores of one layer, all query blocks

    # the weights, in param_dtype (donated: the updated ones reuse their buffers)
    weights = P * p
    # Adam's two moments, the vectors optax.flatten makes of the gradients and updates, the step count
    optimizer = (2 + FLATTEN_COPIES) * P * p + OPT_COUNT_BYTES
    # d(loss)/d(weights) in param_dtype (and their running sum with accumulation); under a cast compute
    # dtype also the cast weights and their raw gradients
    gradients = P * p * (1 if grad_accum == 1 else 2) + (2 * P * c if c != p else 0)

    # saved for the backward pass, per layer: the residual input, its norm, q, the heads' output, the
    # residual after attention and its norm (6 of [B, T, D]) and k and v ([B, T, E]); the normed and the
    # rotated q and k with qk_norm and rope; the centred inputs of layernorm's two norms; fc1's output and
    # its activation ([B, T, F] each, one more for gelu's tanh or relu2's relu; two more, the gate's output
    # and its activation, for a gated MLP); the two norms' outputs before their gains; the masked scores
    # and the probabilities of every query block; the blocks' masks (bools, counted as if broadcast over the heads)
    qk = BT * (D + E) * (cfg.qk_norm + (cfg.pos == "rope"))
    centred = 2 * BT * D * (cfg.norm != "rmsnorm")
    gains = 2 * BT * D * cfg.norm_gain
    mlp = (2 + (cfg.activation != "relu") + 2 * (cfg.mlp == "gated")) * BT * F
    per_layer = a * (6 * BT * D + 2 * BT * E + qk + centred + gains + mlp + 2 * scores) + scores
    # dropout: the dropped weights and branches, the masks in the compute dtype, their drawn bits
    # (uint32) and keep masks (bools); a micro-batch draws its own rows' masks
    if cfg.dropout:
        per_layer += a * (scores + B * H * T * T + 4 * BT * D) + (4 + 1) * (B * H * T * T + 2 * BT * D)
    # the embedding: both lookups, their sum and its norm (4 of [B, T, D]); rope's cos and sin tables;
    # the final norm's input and output
    embed = a * 4 * BT * D + (a * BT * cfg.head_dim if cfg.pos == "rope" else 0) + a * 2 * BT * D * cfg.final_norm
    # the attention mask [B, T, T] of bools, built once for all layers
    mask = B * T * T
    # the logits [B, T, V] and their gradient in the compute dtype; in float32 or wider the cast,
    # log-softmax, the masked pick of the target and the gradient; the one-hot target mask (bools)
    logits = BT * V * (2 * a + 4 * a + 1) + (BT * V * a if cfg.logit_softcap else 0)  # and the softcap's tanh
    # the largest transient of one layer's backward pass: the gradients of the last (largest) query
    # block's scores and probabilities and of its softmax, and those of the layer's [B, T, D] and
    # [B, T, F] activations
    last_block = B * H * min(T, QUERY_BLOCK) * T
    transient = a * (3 * last_block + 8 * BT * D + 2 * BT * F)
    # losses of the chunk's steps [chunk_steps], and the loss weights cast to float32 or wider [B, T]
    small = chunk_steps * a + BT * a
    activations = L * per_layer + embed + mask + max(logits, transient) + small

    positions = chunk_steps * BT
    # the chunk's batches on the device: the int32 fields and the weights in param_dtype, per chunk in flight
    batches = CHUNKS_IN_FLIGHT * positions * (BATCH_INT32_BYTES + p)
    # the same built on the host by data.TrainData.batches: the laid-out steps and their padded,
    # stacked copy (int32 fields, float64 weights), and the weights cast for the device
    host_batches = CHUNKS_IN_FLIGHT * positions * (2 * (BATCH_INT32_BYTES + 8) + p)
    return Estimate(*(members * n for n in (weights, optimizer, gradients, activations, batches, host_batches)))


def _host_available() -> int | None:
    """The host's available memory: MemAvailable of /proc/meminfo, else free pages times the page size."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device=None) -> int | None:
    """Memory a run may still take on device (default: JAX's first device), in bytes; None if unknown.

    On a CPU the host's available memory; on a GPU or TPU the device's
    bytes_limit minus bytes_in_use (memory_stats()), if it reports them.
    """
    if device is None:
        device = jax.devices()[0]
    if device.platform == "cpu":
        return _host_available()
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):  # a backend without it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None


def check_fits(
    cfg: GPTConfig, rows: int, chunk_steps: int, dtype, param_dtype, available=None, device=None, grad_accum=1, members=1
) -> Estimate:
    """Raise UserError (one sentence) if a run of cfg cannot fit in memory; else return the estimate (`estimate`'s arguments).

    available (bytes) defaults to available_bytes(device); device defaults
    to JAX's first device. On a CPU everything counts, the host's batches
    too (the host is the device); on an accelerator only what its memory holds.
    """
    est = estimate(cfg, rows, chunk_steps, dtype, param_dtype, grad_accum, members)
    if device is None and available is None:
        device = jax.devices()[0]
    on_host = device is None or device.platform == "cpu"
    if available is None:
        available = available_bytes(device)
        if available is None:
            return est  # the device reports no figure to compare with: let the run try
    need = est.total if on_host else est.device
    if need > available:
        where = "is available" if on_host else f"is free on {device.platform.upper()} {device.id}"
        raise TooBig(f"this run needs about {format_bytes(need)} ({est.describe(host=on_host)}) but {format_bytes(available)} {where}")
    return est


class StepMemory(NamedTuple):
    """XLA's figure for one call of a compiled program (its buffer assignment), in bytes.

    `aliased` are the donated arguments whose buffers the outputs reuse: they count once.
    """

    arguments: int
    outputs: int
    temporaries: int
    aliased: int

    @classmethod
    def of(cls, compiled) -> "StepMemory | None":
        """From a jax Compiled's memory_analysis(); None where the backend gives none."""
        try:
            m = compiled.memory_analysis()
        except (NotImplementedError, RuntimeError):
            return None
        if m is None:
            return None
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    def describe(self) -> str:
        return (
            f"arguments {format_bytes(self.arguments)}, outputs {format_bytes(self.outputs)}, "
            f"temporaries {format_bytes(self.temporaries)}, aliased (donated) {format_bytes(self.aliased)}"
        )


def beyond_compiled(est: Estimate, on_host: bool) -> int:
    """What a run holds besides the compiled call's own buffers: the next chunk's batches, sent to the
    device while the current chunk runs, and (when the device is the host) the host's batches."""
    return est.batches - est.batches // CHUNKS_IN_FLIGHT + (est.host_batches if on_host else 0)


def check_compiled(step: StepMemory, est: Estimate, available=None, device=None) -> int:
    """Raise TooBig (one sentence naming XLA's figure) if the compiled chunk loop `step`, with what
    `beyond_compiled` adds, cannot fit in `available` bytes (default: available_bytes(device)).

    Returns the bytes needed. est is the same run's estimate (check_fits).
    """
    if device is None and available is None:
        device = jax.devices()[0]
    on_host = device is None or device.platform == "cpu"
    extra = beyond_compiled(est, on_host)
    need = step.total + extra
    if available is None:
        available = available_bytes(device)
        if available is None:
            return need
    if need > available:
        where = "is available" if on_host else f"is free on {device.platform.upper()} {device.id}"
        raise TooBig(
            f"the compiled training step needs {format_bytes(step.total)} (XLA: {step.describe()}) and its batches "
            f"{format_bytes(extra)} more, {format_bytes(need)} in all, but {format_bytes(available)} {where}"
        )
    return need
