"""Process-wide JAX settings: precision, deterministic GPU kernels, the on-disk compilation cache.

Each is decided here only, before the first array is made: x64 and XLA's
flags are read once per process.
"""

import os
from pathlib import Path

import jax
import numpy as np

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError


def set_precision(dtype: str, allow_cpu_bfloat16=False):
    """The one place that decides JAX's precision for a dtype: float64 needs x64 on; bfloat16 wants a GPU."""
    if dtype == "float64" or dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    elif dtype == "bfloat16" and not allow_cpu_bfloat16 and jax.default_backend() == "cpu":
        # refused rather than warned: on the CPU bfloat16 is no faster than float32, only less precise
        raise ConfigError("dtype", "bfloat16 is for GPUs and this run is on the CPU, where it is no faster; use float32")


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def set_deterministic():
    """Make XLA's GPU kernels deterministic (the same run gives the same bits), at some speed: scatters,
    reductions and autotuning choices that would otherwise vary between runs. No effect on a CPU.

    XLA reads its flags (XLA_FLAGS) once, when the backend starts, and jax has
    no config option for it: this adds --xla_gpu_deterministic_ops=true to
    XLA_FLAGS, so it must run before anything starts a JAX backend (UserError
    otherwise, unless XLA_FLAGS already had it).
    """
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "").split()
    if DETERMINISTIC_FLAG in flags:
        return
    if xla_bridge.backends_are_initialized():
        raise UserError(
            "deterministic GPU ops must be set before JAX starts its backend; "
            f"start the process with XLA_FLAGS={DETERMINISTIC_FLAG} (or pass --deterministic on the command line)"
        )
    os.environ["XLA_FLAGS"] = " ".join([*flags, DETERMINISTIC_FLAG])


def cache_dir() -> Path:
    """$MICROGPT_JAX_CACHE, else $XDG_CACHE_HOME/microgpt-jax, else ~/.cache/microgpt-jax."""
    if os.environ.get("MICROGPT_JAX_CACHE"):
        return Path(os.environ["MICROGPT_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "microgpt-jax"


def use_compilation_cache():
    """Keep compiled programs on disk in CACHE/xla, so a command run again skips XLA's compilation.

    CACHE is cache_dir(); JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins.
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the steps and the sampler, not tiny ops
