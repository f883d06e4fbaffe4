"""What a training step computes and what the device could: FLOPs per token and the vendors' peaks.

The MFU (`bench`'s large and gpu cases) is flops_per_token * tokens/s over
a peak; `train` names the device's vendor peak in its start-up lines.
"""

import functools
import re

import jax
import numpy as np

from microgpt_jax.model import GPTConfig

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets, by matmul input type: the other peak the
# MFU is measured against. First match wins: a pattern searched (case-insensitively) in jax's device_kind.
VENDOR_PEAKS = (
    (r"H100.*NVL", {"bfloat16": 835, "tf32": 417.5, "float32": 60}),
    (r"H100.*PCIe", {"bfloat16": 756, "tf32": 378, "float32": 51}),
    (r"H100", {"bfloat16": 989, "tf32": 494.5, "float32": 67}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", {"bfloat16": 835, "tf32": 417.5, "float32": 60}),
    (r"H200", {"bfloat16": 989, "tf32": 494.5, "float32": 67}),
    (r"A100", {"bfloat16": 312, "tf32": 156, "float32": 19.5}),
    (r"\bL4\b", {"bfloat16": 121, "tf32": 60, "float32": 30.3}),  # not L40, L40S
)


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per trained token (forward + backward = 3x forward), matmuls only.

    Forward, per token: 2 FLOPs per weight of every matmul (per layer wq
    and wo, 2 n_embd^2, fc1 and fc2 (and a gated MLP's gate), 2 (3) n_embd *
    hidden, and wk and wv, 2 n_embd * n_kv_head * head_dim; and the output
    layer, lm_head or the tied wte; wte and wpe as
    embeddings are lookups), plus attention's two T x T x n_embd products per
    layer (q.k and weights.v, 2 * 2 * T * n_embd, every query head whatever
    the key heads, counted over the full T x T square as the kernels compute
    it, masked or not). Elementwise work (norms, softmax, activations, rope,
    dropout, biases, gains, Adam) is not counted. By default this is the usual
    6N + 12 L T D. Accumulation changes nothing per token.
    """
    D, mlp_matrices = cfg.n_embd, 3 if cfg.mlp == "gated" else 2
    n_matmul = cfg.n_layer * (2 * D**2 + mlp_matrices * D * cfg.hidden + 2 * D * cfg.kv_heads * cfg.head_dim) + cfg.vocab_size * D
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.block_size * D


def matmul_type(dtype) -> str:
    """The tensor-core type a dtype's matmuls run in: float32 runs in tf32 under JAX's default precision on a GPU."""
    import jax

    dtype = str(np.dtype(dtype)) if dtype != "bfloat16" else dtype
    if dtype == "float32" and str(jax.config.jax_default_matmul_precision or "default").lower() in ("default", "bfloat16", "tensorfloat32"):
        return "tf32"
    return dtype


def vendor_peak(device_kind: str, dtype="bfloat16"):
    """(FLOP/s, matmul type) of the vendor's dense peak for a device kind and a compute dtype, or None if unknown."""
    kind = matmul_type(dtype)
    for pattern, peaks in VENDOR_PEAKS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return (peaks[kind] * 1e12, kind) if kind in peaks else None
    return None


def describe_peak(device_kind: str, dtype="bfloat16") -> str:
    """'vendor peak 989 TFLOP/s (bfloat16, dense)', or 'vendor peak unknown for DEVICE (dtype)'."""
    found = vendor_peak(device_kind, dtype)
    if found is None:
        return f"vendor peak unknown for {device_kind} ({dtype})"
    return f"vendor peak {found[0] / 1e12:g} TFLOP/s ({found[1]}, dense)"


# XLA:CPU's cheap pipeline (its loop emitters, LLVM at -O1) compiles a step about 2x faster than the default one and
# runs it slower (bench reproduce: microgpt's loop 0.92 -> 0.41 s): the better deal for a program whose whole run is
# less work than CHEAP_COMPILE_FLOPS, where compiling takes longer than running. (-O0 would compile faster still, but
# then a loop of steps and the steps one by one differ in the last bit.)
CHEAP_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
CHEAP_COMPILE_FLOPS = 1e10


def compiler_options(platform: str, flops: float) -> tuple:
    """XLA's options for a program that will compute about `flops` in all on platform, as (name, value) items:
    CHEAP_COMPILE's, or () for the default."""
    return tuple(sorted(CHEAP_COMPILE.items())) if platform == "cpu" and flops < CHEAP_COMPILE_FLOPS else ()


@functools.cache
def jitted(fn, options: tuple = (), **static):
    """jax.jit(fn, **static) compiled with these options (compiler_options'): one jit for each."""
    return jax.jit(fn, compiler_options=dict(options) or None, **static)
