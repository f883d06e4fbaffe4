"""`microgpt-jax bench`: speed measured side by side in one run, printed as a table.

Each case is a function decorated with @case that returns {metric: value};
ratios are computed inside a case from numbers measured in the same run, so
they mean something on a shared, noisy machine. Compile time is reported
apart from steady-state time.
"""

import functools
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from microgpt_jax.errors import UserError
from microgpt_jax.flops import describe_peak, flops_per_token, vendor_peak

CASES = {}
CORPUS_MB, PLAIN_MB = 1024, 256  # the prepared case's generated text and the plain-text comparison, in MiB


def case(fn):
    """Register a benchmark case under its function name."""
    CASES[fn.__name__] = fn
    return fn


def describe_cases():
    """[(name, the first line of its docstring)] of every case, for `bench --help`; needs no JAX."""
    return [(name, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "") for name, fn in CASES.items()]


def timed(fn, *args):
    """(result, seconds) of fn(*args), waiting for any JAX arrays in the result."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class Inputs(NamedTuple):
    """What the cases read: the names file (--data), the continuous text (--text), the generated corpus's size."""

    data: str | None = None
    text: str | None = None
    corpus_mb: int = CORPUS_MB
    breakdown: bool = False  # large: also its step's time by part

    def names_path(self) -> Path:
        from microgpt_jax.text import resolve_data_path

        return resolve_data_path(self.data)

    def text_path(self) -> Path:
        """--text, else tinyshakespeare.txt next to the names file."""
        path = Path(self.text or self.names_path().with_name("tinyshakespeare.txt"))
        if not path.is_file():
            raise UserError(f"the large case trains on continuous text and {path} is missing; pass --text PATH (e.g. tinyshakespeare.txt)")
        return path


def run(names=None, json_path=None, print=print, inputs=Inputs()):
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # compile times measured, not read from disk
    names = names or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise UserError(f"unknown bench case(s) {unknown}; choose from {sorted(CASES)}")
    results = {"machine": machine()}  # every report names what it ran on: figures compare only within one machine
    for name in names:
        results |= CASES[name](inputs)
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


# --- training: microgpt's steps, the reproduce command, packing, a large model ---


def steady_rate(trainer, params, data, chunk, chunks):
    """(steps/s, trained tokens/s, compile seconds, peak MB) of `run_steps`, the real training pipeline: the
    peak is XLA's buffer assignment for the compiled call (memory.StepMemory; None where the backend gives none).

    The first chunk compiles and warms up; each later chunk is timed end to
    end (host batch building and transfers included: they overlap the step)
    and the median chunk is reported, so a hiccup of a shared machine does
    not decide the result.
    """
    from microgpt_jax.loop import run_steps
    from microgpt_jax.memory import StepMemory

    state = trainer.init(params)
    seconds, tokens, clock = [], [], time.perf_counter()
    for i, c in enumerate(run_steps(trainer, state, data, stop=chunk * chunks, length=chunk)):
        now = time.perf_counter()
        if i == 0:
            compile_s = c.compile_s
        else:
            seconds.append(now - clock)
            tokens.append(c.tokens)
        clock = now
    median = int(np.argsort(seconds)[len(seconds) // 2])
    (compiled,) = trainer._compiled.values()
    step = StepMemory.of(compiled)
    return chunk / seconds[median], tokens[median] / seconds[median], compile_s, step and step.total / 2**20


def scalar_docs(names):
    """microgpt's model on the scalar engine, with its initial state and the names' documents in spec order."""
    import reference
    from microgpt_jax.model import GPTConfig
    from microgpt_jax.text import reference_docs
    from microgpt_jax.tokenizer import CharTokenizer

    docs, rng = reference_docs(names)
    tokenizer = CharTokenizer.from_docs(docs)
    cfg = GPTConfig(vocab_size=tokenizer.size)
    return cfg, reference.init_state(cfg, rng), [tokenizer.encode(d) for d in docs]


@functools.cache
def scalar_rate(names, steps=24):
    """The scalar engine's training steps per second (spec order, from microgpt's weights) and its peak memory,
    measured once per process."""
    import tracemalloc

    import reference

    cfg, state, encoded = scalar_docs(names)
    adam = reference.Adam(reference.parameters(state), 1000)
    reference.train_step(state, cfg, adam, 0, encoded[0])  # warm up
    start = time.perf_counter()
    for s in range(1, steps + 1):
        reference.train_step(state, cfg, adam, s, encoded[s])
    steps_per_s = steps / (time.perf_counter() - start)
    tracemalloc.start()  # memory apart: tracing allocations slows Python down
    reference.train_step(state, cfg, adam, steps + 1, encoded[steps + 1])
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"steps_per_s": steps_per_s, "peak_mb": peak_mb}


@case
def reference_mode(inputs):
    """microgpt's training (batch 1, spec order, float64) on JAX against the scalar engine, same documents."""
    import jax

    from microgpt_jax.data import DataConfig, DocumentSource
    from microgpt_jax.model import init_params_reference
    from microgpt_jax.train import TrainConfig, Trainer

    scalar = scalar_rate(inputs.names_path())
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        import random

        cfg, _, encoded = scalar_docs(inputs.names_path())
        tcfg = TrainConfig(steps=4000, dtype="float64")
        dcfg = DataConfig(layout="padded", val_fraction=0.0)
        data = DocumentSource(encoded, [], dcfg, tcfg.batch_size, cfg.block_size)
        params = jax.tree.map(jax.numpy.asarray, init_params_reference(cfg, random.Random(42)))
        steps_per_s, _, compile_s, mem = steady_rate(Trainer(cfg, tcfg, packed=dcfg.packed), params, data, 1000, 4)
    finally:
        jax.config.update("jax_enable_x64", x64)
    return {
        "scalar_steps_per_s": scalar["steps_per_s"],
        "reference_mode_steps_per_s": steps_per_s,
        "reference_mode_compile_s": compile_s,
        "reference_mode_vs_scalar_steps_ratio": steps_per_s / scalar["steps_per_s"],
        "scalar_peak_mb": scalar["peak_mb"],
        "reference_mode_peak_mb": mem,
    }


@case
def reproduce(inputs):
    """The whole `microgpt-jax reproduce` (start, compile, 1000 steps, 20 samples) against 1000 scalar steps.

    Run twice with a fresh compilation cache: cold (everything compiled) and
    warm (the compiled programs read from the cache, as any run after the first).
    """
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    scalar_s = 1000 / scalar_rate(inputs.names_path())["steps_per_s"]
    out = {"scalar_1000_steps_s": scalar_s}
    with tempfile.TemporaryDirectory() as cache:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), JAX_COMPILATION_CACHE_DIR=cache)
        for run in ("cold", "warm"):
            start = time.perf_counter()
            # the command as `python -m microgpt_jax` runs it, telling its own peak memory as it exits (see peak_rss_mb)
            code = "import atexit, sys; atexit.register(lambda: print(__import__('microgpt_jax.bench').bench.peak_rss_mb()))"
            code += "; from microgpt_jax.__main__ import entry; entry()"
            command = [sys.executable, "-c", code, "reproduce", "--data", str(inputs.names_path())]
            done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            out["reproduce_peak_rss_mb"] = max(out.get("reproduce_peak_rss_mb", 0.0), float(done.stdout.splitlines()[-1]))
            prefix = "reproduce_cold" if run == "cold" else "reproduce_warm"
            out |= {f"{prefix}_s": seconds, f"{prefix}_vs_scalar_ratio": scalar_s / seconds}
    return out


@case
def packing(inputs):
    """Trained tokens per second at the default model, batch 256 names, padded against packed (float32)."""
    import jax

    from microgpt_jax.data import DataConfig, load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    out = {}
    for layout in ("padded", "packed"):
        tcfg = TrainConfig(steps=220, batch_size=256)
        dcfg = DataConfig(layout=layout)
        tokenizer, data = load_train_data(inputs.names_path(), dcfg, tcfg.batch_size, 16, tcfg.seed)
        cfg = GPTConfig(vocab_size=tokenizer.size)
        params = init_params(cfg, jax.random.key(0))
        _, tokens_per_s, compile_s, mem = steady_rate(Trainer(cfg, tcfg, packed=dcfg.packed), params, data, 20, 11)
        out |= {f"{layout}_tokens_per_s": tokens_per_s, f"{layout}_compile_s": compile_s, f"{layout}_peak_mb": mem}
        out[f"{layout}_rows"] = data.rows
    out["packed_vs_padded_ratio"] = out["packed_tokens_per_s"] / out["padded_tokens_per_s"]
    return out


# which vector and matrix extensions the CPU has, by /proc/cpuinfo flag (those XLA's and torch's kernels use)
CPU_EXTENSIONS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16"}
CPU_EXTENSIONS |= {"avx512_fp16": "AVX512-FP16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "sve": "SVE", "asimd": "NEON"}


def machine() -> str:
    """'CPU model (N cores; its vector extensions)' and, with a GPU, its kind: named beside every bench report."""
    import os
    import platform

    import jax

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass  # not Linux: the model from platform, no extensions
    extensions = ", ".join(name for flag, name in CPU_EXTENSIONS.items() if flag in flags) or "extensions unknown"
    device = "" if jax.default_backend() == "cpu" else f"; {jax.devices()[0].device_kind}"
    return f"{model} ({os.cpu_count()} cores; {extensions}){device}"


PEAK_SIZES = {"cpu": (1024, 2048, 3072), "gpu": (4096, 8192, 16384)}


@functools.cache
def matmul_peak(dtype="float32", repeats=5):
    """FLOP/s of the best n x n matmul over sizes (PEAK_SIZES) and repeats, measured once per process and dtype: the peak
    every MFU of a run is measured against, so that the MFU moves with the step and not with one lucky or unlucky matmul."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in PEAK_SIZES.get(jax.default_backend(), PEAK_SIZES["gpu"]):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        best = max(best, 2 * n**3 / min(timed(f, a)[1] for _ in range(repeats)))
    return best


def mfu_case(text, prefix, cfg_kwargs, batch_size, dtype, chunk, chunks):
    """Tokens/s and MFU of stream-mode training on the text file: MFU = flops_per_token * tokens/s over a peak.

    `_mfu` is over the matmul peak measured in this run (matmul_peak), `_mfu_vendor` over the vendor's
    dense peak for the device and dtype (vendor_peak; a line saying it is unknown otherwise).
    """
    import jax

    from microgpt_jax.data import DataConfig, load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    tcfg = TrainConfig(steps=chunk * chunks, batch_size=batch_size, dtype=dtype)
    dcfg = DataConfig(mode="stream")
    tokenizer, data = load_train_data(text, dcfg, batch_size, cfg_kwargs["block_size"], tcfg.seed)
    cfg = GPTConfig(vocab_size=tokenizer.size, **cfg_kwargs)
    params = init_params(cfg, jax.random.key(0), tcfg.param_dtype)
    _, tokens_per_s, compile_s, mem = steady_rate(Trainer(cfg, tcfg, packed=dcfg.packed), params, data, chunk, chunks)
    peak = matmul_peak(dtype)
    kind = jax.devices()[0].device_kind
    vendor = vendor_peak(kind, dtype)
    flops_per_s = tokens_per_s * flops_per_token(cfg)
    return {
        f"{prefix}_tokens_per_s": tokens_per_s,
        f"{prefix}_mfu": flops_per_s / peak,
        f"{prefix}_mfu_vendor": flops_per_s / vendor[0] if vendor else describe_peak(kind, dtype),
        f"{prefix}_matmul_peak_gflops": peak / 1e9,
        **({f"{prefix}_vendor_peak_gflops": vendor[0] / 1e9} if vendor else {}),
        f"{prefix}_compile_s": compile_s,
        f"{prefix}_peak_mb": mem,
    }


LARGE = dict(n_layer=4, n_embd=128, n_head=4, block_size=128)


@case
def large(inputs):
    """n_layer 4, n_embd 128, n_head 4, block 128, batch 64, float32, stream mode on the text (--breakdown: its step by part)."""
    out = mfu_case(inputs.text_path(), "large", LARGE, 64, "float32", 2, 5)
    if inputs.breakdown:
        out |= breakdown_case(inputs.text_path(), "large", LARGE, 64)
    return out


# --- where a step's time goes: a profile of one compiled chunk, each XLA op charged to the model part it computes ---


def part_of(op_name: str) -> tuple[str, str]:
    """(part, direction) of an XLA op from its metadata's op_name: the innermost of model.PARTS's named scopes in it
    ("other" for none: residual adds, the mask, the gradient norm), "backward" under transpose(...) (JAX's
    reverse mode), else "forward"; the optimizer's update is its own part."""
    from microgpt_jax.model import PARTS

    names = [word for word in re.findall(r"[A-Za-z_]+", op_name.split(";")[0]) if word in PARTS]
    found = names[-1] if names else "other"
    return found, "update" if found == "optimizer" else "backward" if "transpose(" in op_name else "forward"


def op_parts(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (part, direction), from a compiled executable's text (each instruction's op_name)."""
    found = re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', hlo_text, re.M)
    return {m.group(1): part_of(m.group(2)) for m in found}


def traced_ops(trace_dir) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every complete event in the profiler's Perfetto trace under trace_dir."""
    import gzip

    (path,) = sorted(Path(trace_dir).rglob("*.trace.json.gz"))[-1:]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], e["ts"], e["dur"]) for e in events if e.get("ph") == "X" and "dur" in e]


def busy_us(intervals) -> float:
    """The length of the union of (start, duration) intervals: the time at least one op ran."""
    total, end = 0.0, -np.inf
    for start, duration in sorted(intervals):
        total += max(0.0, start + duration - max(start, end))
        end = max(end, start + duration)
    return total


def breakdown(trainer, state, data, chunk=4) -> dict:
    """One step's milliseconds by part (model.PARTS and "other", forward and backward, the update), data and dispatch.

    The steady step time (best of a few chunks) without a profiler, then one
    chunk traced (jax.profiler): each XLA op's duration is charged to its part,
    and the time the ops ran (at least one of them: the 2 cores overlap ops)
    is shared out by each part's op time, so the parts and "dispatch and idle"
    (the traced call's time no op ran) add up to the traced step. "data" is
    the host's batch building and transfer, timed apart: in training it
    overlaps the step, as run_steps prepares the next chunk while one runs.
    """
    import tempfile

    import jax

    clock = time.perf_counter()
    batches = trainer.put(data.batches(0, chunk, chunk))
    jax.block_until_ready(batches)
    data_ms = (time.perf_counter() - clock) / chunk * 1e3
    compiled, _ = trainer.compiled_steps(state, batches)
    state = jax.block_until_ready(compiled(state, batches, chunk)[0])
    seconds = []
    for _ in range(3):
        state, seconds_ = timed(lambda s: compiled(s, batches, chunk)[0], state)
        seconds.append(seconds_)
    parts = op_parts(compiled.as_text())
    with tempfile.TemporaryDirectory(prefix="microgpt-jax-profile-") as tmp:
        jax.profiler.start_trace(tmp)
        state, traced_s = timed(lambda s: compiled(s, batches, chunk)[0], state)
        jax.profiler.stop_trace()
        ops = [(parts[name], start, duration) for name, start, duration in traced_ops(tmp) if name in parts]
    op_us = {}
    for key, _, duration in ops:
        op_us[key] = op_us.get(key, 0.0) + duration
    busy = busy_us([(start, duration) for _, start, duration in ops])
    scale = busy / sum(op_us.values()) / chunk / 1e3  # op µs -> ms of the step's busy time
    rows = {f"{part}_{direction}_ms": us * scale for (part, direction), us in sorted(op_us.items())}
    return rows | {
        "dispatch_and_idle_ms": max(0.0, traced_s * 1e3 - busy / 1e3) / chunk,
        "traced_step_ms": traced_s * 1e3 / chunk,
        "step_ms": min(seconds) * 1e3 / chunk,
        "data_ms": data_ms,
        "ops_overlap": sum(op_us.values()) / busy,
    }


def format_breakdown(rows: dict) -> str:
    """The breakdown as a table: a part per line, its forward and backward ms and its share of the traced step."""
    from microgpt_jax.model import PARTS

    total = rows["traced_step_ms"]
    lines = [f"{'part':<12} {'forward ms':>10} {'backward ms':>11} {'share':>6}"]
    for part in (*PARTS, "other"):
        fwd, bwd = rows.get(f"{part}_forward_ms", 0.0), rows.get(f"{part}_backward_ms", 0.0) + rows.get(f"{part}_update_ms", 0.0)
        if fwd or bwd:
            lines.append(f"{part:<12} {fwd:>10.2f} {bwd:>11.2f} {(fwd + bwd) / total:>6.1%}")
    lines.append(f"{'dispatch and idle':<24} {rows['dispatch_and_idle_ms']:>11.2f} {rows['dispatch_and_idle_ms'] / total:>6.1%}")
    lines.append(f"step: {total:.1f} ms traced, {rows['step_ms']:.1f} ms without the profiler; ops overlap {rows['ops_overlap']:.2f}x")
    lines.append(f"data: {rows['data_ms']:.2f} ms a step on the host (overlapped with the step in training)")
    return "\n".join(lines)


def breakdown_case(text, prefix, cfg_kwargs, batch_size) -> dict:
    """`{prefix}_breakdown_*`: the breakdown of this shape's float32 step (stream mode on the text), printed as a table."""
    import jax

    from microgpt_jax.data import DataConfig, load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    tcfg, dcfg = TrainConfig(steps=100, batch_size=batch_size), DataConfig(mode="stream")
    tokenizer, data = load_train_data(text, dcfg, batch_size, cfg_kwargs["block_size"], tcfg.seed)
    cfg = GPTConfig(vocab_size=tokenizer.size, **cfg_kwargs)
    trainer = Trainer(cfg, tcfg, packed=dcfg.packed)
    rows = breakdown(trainer, trainer.init(init_params(cfg, jax.random.key(0))), data)
    print(format_breakdown(rows))
    return {f"{prefix}_breakdown_{k}": v for k, v in rows.items()}


# --- against PyTorch: the same GPT, the same batches, the same optimizer, side by side (bench_torch.py) ---

TORCH_SHAPES = {  # name -> (model fields, batch size, steps per timed chunk): the large case's shape, nanoGPT's CPU recipe's
    "large": (LARGE, 64, 4),
    "nanogpt_shape": (dict(n_layer=4, n_embd=128, n_head=4, block_size=64), 12, 25),
}


def torch_rates(text, cfg_kwargs, batch_size, chunk, chunks=4):
    """{ours, torch_eager, torch_compile: tokens/s; torch_compile_s: its compilation} of training this shape on the text in stream
    mode, from the same weights on the same batches, the nanoGPT recipe's optimizer settings; ours and torch eager measured
    twice in turn (the best of each), torch.compile once after them (its compilation takes long)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from microgpt_jax import bench_torch
    from microgpt_jax.data import load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import Trainer, make_schedule

    recipe = recipe_configs()
    tcfg = dataclasses.replace(recipe.train, batch_size=batch_size)  # its 2000 steps' schedule; chunk * chunks of them run
    tokenizer, data = load_train_data(text, recipe.data, batch_size, cfg_kwargs["block_size"], tcfg.seed)
    cfg = GPTConfig(vocab_size=tokenizer.size, **cfg_kwargs)
    params = init_params(cfg, jax.random.key(0), tcfg.param_dtype)
    lrs = np.asarray(jax.vmap(make_schedule(tcfg))(jnp.arange(tcfg.steps))).tolist()  # no JAX call inside torch's loop
    host = jax.tree.map(np.asarray, params)
    out = {}
    for _ in range(2):
        out["ours"] = max(out.get("ours", 0.0), steady_rate(Trainer(cfg, tcfg, packed=recipe.data.packed), params, data, chunk, chunks)[1])
        out["torch_eager"] = max(out.get("torch_eager", 0.0), bench_torch.train_rate(host, cfg, tcfg, data, chunk, chunks, lrs=lrs)[0])
    try:
        out["torch_compile"], out["torch_compile_s"] = bench_torch.train_rate(host, cfg, tcfg, data, chunk, chunks, True, lrs)
    except Exception as e:  # torch.compile needs a C++ compiler for the CPU; say why it could not run, in one line
        out["torch_compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return out


@case
def torch(inputs):
    """Our step against the same GPT in PyTorch (eager and torch.compile), same weights, batches and Adam, side by side:
    the large shape and nanoGPT's CPU recipe shape, float32, stream mode on the text (torch from the [hf] extra)."""
    from microgpt_jax import bench_torch

    torch = bench_torch.torch_or_none()
    if torch is None:
        return {"torch": "skipped: torch is not installed (pip install 'microgpt-jax[hf]')"}
    out = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    for name, (cfg_kwargs, batch_size, chunk) in TORCH_SHAPES.items():
        rates = torch_rates(inputs.text_path(), cfg_kwargs, batch_size, chunk)
        out |= {f"{name}_ours_tokens_per_s": rates["ours"], f"{name}_torch_eager_tokens_per_s": rates["torch_eager"]}
        out[f"{name}_vs_torch_eager_ratio"] = rates["ours"] / rates["torch_eager"]
        compiled = rates["torch_compile"]
        out[f"{name}_torch_compile_tokens_per_s"] = compiled
        if not isinstance(compiled, str):
            out[f"{name}_vs_torch_compile_ratio"] = rates["ours"] / compiled
            out[f"{name}_torch_compile_s"] = rates["torch_compile_s"]
    return out


# --- what each variant (issue 11) does: validation loss after the nanoGPT CPU recipe, and speed ---

VARIANT_RECIPE = "configs/nanogpt-cpu.toml"  # 4 layers, 128 wide, block 64, batch 12, 2000 steps, stream mode
VARIANTS = {  # name -> (model fields, training fields), each alone over the recipe
    "baseline": ({}, {}),
    "layernorm": ({"norm": "layernorm"}, {}),
    "gelu": ({"activation": "gelu"}, {}),
    "relu2": ({"activation": "relu2"}, {}),
    "rope": ({"pos": "rope"}, {}),
    "tied": ({"tie_embeddings": True}, {}),
    "qk_norm": ({"qk_norm": True}, {}),
    "gqa_1kv": ({"n_kv_head": 1}, {}),
    "softcap_15": ({"logit_softcap": 15.0}, {}),
    "dropout_0.1": ({"dropout": 0.1}, {}),
    "weight_decay_0.1": ({}, {"weight_decay": 0.1}),
    "grad_clip_1": ({}, {"grad_clip": 1.0}),
    "cosine": ({}, {"schedule": "cosine", "min_lr": 1e-4}),
    "grad_accum_2": ({}, {"grad_accum": 2}),
}


VARIANT_SEEDS = 5


def recipe_configs(model=None, train=None, steps=None):
    """The nanoGPT CPU recipe's RunConfig (configs/nanogpt-cpu.toml) with these fields over it."""
    import dataclasses

    from microgpt_jax.rundir import RunConfig

    tables = RunConfig.read_toml(Path(__file__).parents[1] / VARIANT_RECIPE)
    configs = RunConfig.of({**tables, "model": tables["model"] | (model or {}), "train": tables["train"] | (train or {})})
    return configs.replace(train=dataclasses.replace(configs.train, steps=steps or configs.train.steps))


@case
def variants(inputs, steps=None, seeds=VARIANT_SEEDS):
    """Each variant alone over the nanoGPT CPU recipe on the text, `compare`d with the baseline over 5 seeds: the validation
    loss's mean, its difference paired by seed with a 95% interval, tokens/s."""
    from microgpt_jax.sweep import Variant, compare, format_comparison

    variants = [Variant(name, recipe_configs(model, train, steps)) for name, (model, train) in VARIANTS.items()]
    result = compare(variants, list(range(seeds)), inputs.text_path())
    print(format_comparison(result))
    results = {}
    for row in result["variants"]:
        name = row["variant"]
        results[f"variants_{name}_val_loss_mean"] = row["mean"]
        results[f"variants_{name}_val_loss_std"] = row["std"]
        results[f"variants_{name}_tokens_per_s"] = row["tokens_per_s"]
        if "diff" in row:
            results[f"variants_{name}_minus_baseline"] = row["diff"]
            results[f"variants_{name}_minus_baseline_ci95_low"], results[f"variants_{name}_minus_baseline_ci95_high"] = row["ci95"]
    return results


def sweep_rates(configs, seeds, data_path, chunk, chunks):
    """(solo steps/s, sweep steps/s, solo compile s, sweep compile s, the sweep's tokens/s, the model) of `seeds` members
    of these configs and of one solo run (the first seed's), steady state, measured one after the other in this process."""
    import dataclasses

    from microgpt_jax.session import Session
    from microgpt_jax.sweep import Member, Sweep

    solo = Session(configs.replace(train=dataclasses.replace(configs.train, seed=seeds[0])), data_path)
    solo_rate, _, solo_compile, _ = steady_rate(solo.trainer, solo.initial_state().params, solo.data, chunk, chunks)
    members = [Member(f"seed={s}", s, {}, configs.replace(train=dataclasses.replace(configs.train, seed=s))) for s in seeds]
    sweep = Sweep(members, data_path)
    rate, tokens_per_s, compile_s, _ = steady_rate(sweep.trainer, sweep.initial_state().params, sweep.data, chunk, chunks)
    return solo_rate, rate, solo_compile, compile_s, tokens_per_s, sweep.configs.model


@case
def sweep(inputs):
    """16 seeds of microgpt's model (1000 steps) and 8 of the nanoGPT CPU recipe's shape as one vmapped sweep, against one solo run."""
    import jax

    from microgpt_jax.rundir import RunConfig

    out = {}
    solo, rate, solo_c, compile_s, _, _ = sweep_rates(RunConfig(), list(range(16)), inputs.names_path(), 100, 11)
    out |= {"sweep16_vs_solo_time_ratio": solo / rate, "sweep16_compile_s": compile_s, "sweep16_solo_compile_s": solo_c}
    configs = recipe_configs()
    dtype = configs.train.dtype
    solo, rate, solo_c, compile_s, tokens_per_s, cfg = sweep_rates(configs, list(range(8)), inputs.text_path(), 10, 5)
    peak = matmul_peak(dtype)
    out |= {
        "sweep8_nanogpt_vs_solo_time_ratio": solo / rate,
        "sweep8_nanogpt_mfu": tokens_per_s * flops_per_token(cfg) / peak,
        "sweep8_nanogpt_tokens_per_s": tokens_per_s,
        "sweep8_nanogpt_compile_s": compile_s,
        "sweep8_matmul_peak_gflops": peak / 1e9,
        "sweep_device": jax.devices()[0].device_kind,
    }
    return out


@case
def gpu(inputs):
    """GPT-2 small shape (n_layer 12, n_embd 768, block 1024), bfloat16, stream mode: only on a GPU."""
    import jax

    if jax.default_backend() != "gpu":
        return {"gpu": "skipped: no GPU"}
    return mfu_case(inputs.text_path(), "gpu", dict(n_layer=12, n_embd=768, n_head=12, block_size=1024), 16, "bfloat16", 10, 4)


@case
def scaling(inputs):
    """Steps/s of the large case (float32, stream mode) data-parallel on 1, 2 and 4 virtual CPU devices.

    Each device count in its own process (XLA fixes the count at start-up):
    XLA_FLAGS=--xla_force_host_platform_device_count=N, the global batch 64
    split over the N devices. On a CPU the virtual devices share the same
    cores, so this shows the cost of the sharded step, not a speed-up.
    """
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    out = {}
    for n in (1, 2, 4):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        command = [
            sys.executable,
            "-c",
            "import sys; from microgpt_jax.bench import scaling_worker; scaling_worker(sys.argv[1])",
            str(inputs.text_path()),
        ]
        result = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        out |= {f"scaling_{n}dev_steps_per_s": result["steps_per_s"], f"scaling_{n}dev_compile_s": result["compile_s"]}
    for n in (2, 4):
        out[f"scaling_{n}dev_vs_1dev_ratio"] = out[f"scaling_{n}dev_steps_per_s"] / out["scaling_1dev_steps_per_s"]
    return out


def scaling_worker(text):
    """One device count of `scaling`: prints {steps_per_s, compile_s} as JSON."""
    import jax

    from microgpt_jax import parallel
    from microgpt_jax.data import DataConfig, load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    jax.config.update("jax_enable_compilation_cache", False)
    mesh = parallel.make_mesh()
    chunk, chunks = 2, 4
    tcfg = TrainConfig(steps=chunk * chunks, batch_size=64)
    parallel.check_batch(tcfg.batch_size, mesh)
    dcfg = DataConfig(mode="stream")
    tokenizer, data = load_train_data(text, dcfg, tcfg.batch_size, 128, tcfg.seed, row_multiple=mesh.devices.size)
    cfg = GPTConfig(vocab_size=tokenizer.size, n_layer=4, n_embd=128, n_head=4, block_size=128)
    trainer = Trainer(cfg, tcfg, mesh, packed=dcfg.packed)
    params = trainer.replicate(init_params(cfg, jax.random.key(0), tcfg.param_dtype))
    steps_per_s, _, compile_s, _ = steady_rate(trainer, params, data, chunk, chunks)
    print(json.dumps({"steps_per_s": steps_per_s, "compile_s": compile_s}))


# --- prepared datasets: a corpus larger than memory, read a step at a time ---

WORDS = 2000  # distinct words of the generated text


def generate_text(path, size_mb, seed=0) -> int:
    """A text of size_mb MiB or a little more: lines of 1 to 12 lowercase words (40 bytes on average, like
    tinyshakespeare's), an 8 MiB block written again and again, each time with its letters shifted (all
    different, the same statistics). Returns its bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(WORDS)]
    lines, size = [], 0
    while size < min(size_mb, 8) << 20:
        line = " ".join(words[i] for i in rng.integers(0, WORDS, rng.integers(1, 13)))
        lines.append(line)
        size += len(line) + 1
    block = ("\n".join(lines) + "\n").encode()
    alphabet = bytes(range(ord("a"), ord("z") + 1))
    written = 0
    with open(path, "wb") as f:
        for shift in range(-(-size_mb // min(size_mb, 8))):
            f.write(block.translate(bytes.maketrans(alphabet, alphabet[shift % 26 :] + alphabet[: shift % 26])))
            written += len(block)
    return written


def in_process(worker, *args) -> dict:
    """worker(*args) (a function of this module printing a JSON object last) in a fresh process: its result, with
    the process's own peak RSS (peak_rss_mb), so that no case's memory shows in another's. The compilation cache
    is off there: every process compiles what it runs."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), JAX_ENABLE_COMPILATION_CACHE="false")
    code = f"import sys; from microgpt_jax.bench import {worker}; {worker}(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, its own address space's. (ru_maxrss is no good in a child:
    Linux carries the parent's peak over into it, through fork and exec.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _report(result: dict):
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def prepare_worker(text, out, mode):
    """`microgpt-jax prepare TEXT --mode MODE`: prints {seconds, peak_rss_mb}."""
    from microgpt_jax.data import DataConfig
    from microgpt_jax.prepare import prepare

    start = time.perf_counter()
    prepare(text, out, DataConfig(mode=mode))
    _report({"seconds": time.perf_counter() - start})


STARTUP = {"batch_size": 128, "block_size": 64}


def startup_worker(path, mode):
    """What `train` does with its data before the first step: load it, lay out the first chunk of batches
    (10 steps) and the validation set. Prints {seconds, peak_rss_mb}."""
    from microgpt_jax.data import DataConfig, load_train_data

    start = time.perf_counter()
    _, data = load_train_data(path, DataConfig(mode=mode), STARTUP["batch_size"], STARTUP["block_size"], 42)
    data.batches(0, 10, 10), data.eval_set(), data.describe(), data.notes()
    _report({"seconds": time.perf_counter() - start})


def train_worker(data):
    """What `microgpt-jax train --data DATA --steps 1 --eval-size 64` runs (microgpt's model), through the library:
    prints {seconds, peak_rss_mb}."""
    from microgpt_jax.rundir import open_for_training
    from microgpt_jax.session import Session

    start = time.perf_counter()
    with open_for_training({"train": {"steps": 1}, "data": {"eval_size": 64}}, data) as begin:  # a prepared dataset adopted
        session = Session(begin.configs, begin.data_path, vocab_size=begin.vocab_size, tokenizer=begin.tokenizer)
        print(session.describe())
        session.train()
    _report({"seconds": time.perf_counter() - start})


def head(path, out, size_mb) -> Path:
    """The first size_mb MiB of the text at path (whole lines), written to out."""
    with open(path, "rb") as f:
        data = f.read(size_mb << 20)
    Path(out).write_bytes(data[: data.rfind(b"\n") + 1])
    return Path(out)


@case
def prepared(inputs):
    """A generated text of 1 GiB (bench --corpus-mb): prepare's MB/s and memory, train's start-up on it
    prepared against the same text plain (its first 256 MiB) and names, steady tokens/s read from the dataset against in memory."""
    return prepared_case(inputs.names_path(), inputs.corpus_mb, PLAIN_MB)


def prepared_case(names, mb=CORPUS_MB, plain_mb=PLAIN_MB):
    """The `prepared` case on a text of mb MiB, the plain text measured on its first plain_mb MiB, beside the names file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="microgpt-jax-bench-") as tmp:
        tmp = Path(tmp)
        size = generate_text(tmp / "corpus.txt", mb)
        plain = head(tmp / "corpus.txt", tmp / "plain.txt", min(mb, plain_mb))
        out = {"corpus_mb": size / 2**20, "plain_mb": plain.stat().st_size / 2**20}
        for mode in ("docs", "stream"):
            done = in_process("prepare_worker", tmp / "corpus.txt", tmp / mode, mode)
            out |= {f"prepare_{mode}_mb_per_s": size / 2**20 / done["seconds"], f"prepare_{mode}_peak_rss_mb": done["peak_rss_mb"]}
        for mode in ("docs", "stream"):
            for name, path in (("prepared", tmp / mode), ("plain", plain), ("names", names)):
                if name == "names" and mode == "stream":
                    continue
                done = in_process("startup_worker", path, mode)
                out |= {f"startup_{mode}_{name}_s": done["seconds"], f"startup_{mode}_{name}_peak_rss_mb": done["peak_rss_mb"]}
        out["startup_docs_prepared_vs_names_rss_mb"] = out["startup_docs_prepared_peak_rss_mb"] - out["startup_docs_names_peak_rss_mb"]
        for name, path in (("names", names), ("prepared", tmp / "docs")):
            done = in_process("train_worker", path)
            out |= {f"train_cmd_{name}_s": done["seconds"], f"train_cmd_{name}_peak_rss_mb": done["peak_rss_mb"]}
        out["train_cmd_prepared_vs_names_rss_mb"] = out["train_cmd_prepared_peak_rss_mb"] - out["train_cmd_names_peak_rss_mb"]
        out |= steady_prepared(tmp / "docs", head(plain, tmp / "steady.txt", min(64, plain_mb)))
    return out


def steady_prepared(dataset, text):
    """Trained tokens/s of the same model on the dataset (read step by step) and on a text (in memory): docs, packed."""
    import jax

    from microgpt_jax.data import DataConfig, load_train_data
    from microgpt_jax.model import GPTConfig, init_params
    from microgpt_jax.train import TrainConfig, Trainer

    tcfg = TrainConfig(steps=100, batch_size=STARTUP["batch_size"])
    rates = {}
    for name, path in (("prepared", dataset), ("in_memory", text)) * 2:  # twice each, in turn: the best of two
        tokenizer, data = load_train_data(path, DataConfig(), tcfg.batch_size, STARTUP["block_size"], tcfg.seed)
        cfg = GPTConfig(vocab_size=tokenizer.size, n_layer=2, n_embd=32, n_head=4, block_size=STARTUP["block_size"])
        params = init_params(cfg, jax.random.key(0))
        rates[name] = max(rates.get(name, 0.0), steady_rate(Trainer(cfg, tcfg), params, data, 10, 6)[1])
    return {
        "steady_prepared_tokens_per_s": rates["prepared"],
        "steady_in_memory_tokens_per_s": rates["in_memory"],
        "steady_prepared_vs_in_memory_ratio": rates["prepared"] / rates["in_memory"],
    }


# --- sampling: the KV-cache generation loop against the scalar engine and against recomputing ---


def _draws(out_BW, bos):
    """Tokens drawn (= decode steps): each row's tokens up to and including its BOS, or the whole row."""
    import numpy as np

    out_BW = np.asarray(out_BW)
    ended_B = (out_BW == bos).any(axis=1)
    return int(np.where(ended_B, (out_BW == bos).argmax(axis=1) + 1, out_BW.shape[1]).sum())


def _best_rate(generate, bos, repeats=3):
    """Best tokens/s over a few runs of generate(i) (i = 1..repeats) after a compiling run generate(0)."""
    _, compile_s = timed(generate, 0)
    rates = []
    for i in range(1, repeats + 1):
        out_BW, seconds = timed(generate, i)
        rates.append(_draws(out_BW, bos) / seconds)
    return max(rates), compile_s


def _sampling_setup(cfg):
    """Random float32 weights and sample_rows's arguments for plain sampling at temperature 1 from BOS."""
    import jax
    import jax.numpy as jnp

    from microgpt_jax.model import init_params

    params = init_params(cfg, jax.random.key(0), jnp.float32)
    knobs = (jnp.float32(1.0), jnp.int32(cfg.vocab_size), jnp.float32(1.0))
    return params, jnp.asarray([cfg.bos], jnp.int32), jax.random.key(0), knobs


@case
def sampling(inputs):
    """Tokens/s of the compiled sampler at the default model, batch 1 and 1000, and of the scalar engine."""
    import random

    import jax.numpy as jnp

    import reference
    from microgpt_jax.check import to_reference_state
    from microgpt_jax.model import GPTConfig
    from microgpt_jax.sample import sample_rows

    cfg = GPTConfig(vocab_size=27)
    bos = cfg.bos
    params, prompt_P, key, knobs = _sampling_setup(cfg)

    def batch_of(size):
        # call i generates rows [i * size, (i + 1) * size): new draws, same shapes
        return lambda i: sample_rows(params, prompt_P, key, jnp.arange(i * size, (i + 1) * size), *knobs, cfg=cfg)[0]

    rate_1, _ = _best_rate(lambda i: [batch_of(1)(20 * i + j) for j in range(20)], bos)  # 20 samples, one at a time
    rate_1000, compile_s = _best_rate(batch_of(1000), bos)

    # microgpt's inference on the scalar engine, same weights, a few samples
    state, rng, drawn = to_reference_state(params), random.Random(0), 0
    start = time.perf_counter()
    for _ in range(3):
        drawn += min(len(reference.sample(state, cfg, rng, bos, temperature=1.0)) + 1, cfg.block_size)
    rate_scalar = drawn / (time.perf_counter() - start)
    return {
        "sample_tokens_per_s_batch1": rate_1,
        "sample_tokens_per_s_batch1000": rate_1000,
        "sample_compile_s_batch1000": compile_s,
        "scalar_sample_tokens_per_s": rate_scalar,
        "sample_vs_scalar_ratio": rate_1000 / rate_scalar,
    }


@case
def sampling_cache(inputs):
    """The KV-cache loop against recomputing the whole block per token (n_embd 128, n_layer 4, block 256, batch 1).

    Recomputing is the sampler's own loop past block_size: each token
    predicted by a forward over the last block_size tokens. A prompt that
    fills the block (all BOS) puts every draw but the first there.
    """
    import jax.numpy as jnp

    from microgpt_jax.model import GPTConfig
    from microgpt_jax.sample import sample_rows

    cfg = GPTConfig(vocab_size=27, n_embd=128, n_head=4, n_layer=4, block_size=256)
    params, prompt_P, key, knobs = _sampling_setup(cfg)
    full_P = jnp.full(cfg.block_size, cfg.bos, jnp.int32)

    def rate(prompt, new_tokens):
        def generate(i):  # rows 2i and 2i + 1, one at a time
            rows = [jnp.arange(r, r + 1) for r in (2 * i, 2 * i + 1)]
            return jnp.concatenate([sample_rows(params, prompt, key, r, *knobs, cfg=cfg, new_tokens=new_tokens)[0] for r in rows])

        return _best_rate(generate, cfg.bos, repeats=2)[0]

    rate_cache, rate_recompute = rate(prompt_P, None), rate(full_P, cfg.block_size)
    return {
        "sample_tokens_per_s_cache": rate_cache,
        "sample_tokens_per_s_recompute": rate_recompute,
        "cache_vs_recompute_ratio": rate_cache / rate_recompute,
    }
