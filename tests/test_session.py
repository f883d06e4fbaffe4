"""Ready for a GPU, proven on the CPU: train --dry-run, the compiled step's memory check, the vendor peaks, --deterministic."""

import os
import subprocess
import sys

import jax
import pytest

from microgpt_jax import bench, flops, memory
from microgpt_jax.cli import build_parser, given_configs
from microgpt_jax.errors import UserError
from microgpt_jax.flops import flops_per_token
from microgpt_jax.model import GPTConfig
from microgpt_jax.rundir import RunConfig
from microgpt_jax.runtime import DETERMINISTIC_FLAG, set_deterministic
from microgpt_jax.train import Trainer
from tests.helpers import NAMES, ROOT, SHAKESPEARE, TINY, assert_one_line_error, run_in_process

SMALL_RUN = [*TINY, "--steps", "20"]


def session_of(*flags):
    from microgpt_jax.session import Session

    configs = RunConfig.of(given_configs(build_parser().parse_args(["train", *flags])))
    return Session(configs, NAMES)


def test_dry_run_prints_the_memory_and_writes_nothing(capsys, tmp_path, monkeypatch):
    import microgpt_jax.session

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run allocated the weights")

    monkeypatch.setattr(microgpt_jax.session, "init_state", no_weights)
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(capsys, "train", *SMALL_RUN, "--dry-run", "--out", tmp_path / "run")
    assert code == 0, out.err
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else either
    lines = out.out.splitlines()
    starts = ["num params: 1264", "parameters: 1,264 (5.06 KB in float32)", "optimizer state: ", "compiled step (10 steps per chunk): "]
    starts += ["device memory: ", "estimate: ", "dry run: compiled in "]
    for start in starts:
        assert any(line.startswith(start) for line in lines), (start, out.out)
    assert "arguments " in out.out and "temporaries " in out.out and "aliased (donated) " in out.out
    assert not any(line.startswith("step ") for line in lines) and "saved to" not in out.out  # nothing trained


def test_dry_run_figures_are_xla_s(capsys):
    session = session_of(*SMALL_RUN)
    text = session.dry_run()
    step = session.step_memory
    assert step.total > 0 and step.aliased > 0  # the state is donated
    assert f": {memory.format_bytes(step.total)} (arguments {memory.format_bytes(step.arguments)}," in text
    assert f"estimate: {memory.format_bytes(session.estimate().total)} (" in text
    assert step.total <= session.estimate().device  # the estimate bounds XLA's figure


def test_compiled_figure_refuses_a_step_that_cannot_fit():
    session = session_of(*SMALL_RUN)
    step = session.compile_step(available=10**12)
    est = session.estimate()
    need = step.total + memory.beyond_compiled(est, on_host=True)
    assert session.compile_step(available=need) == step  # exactly enough
    with pytest.raises(memory.TooBig) as info:
        session.compile_step(available=need - 1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the compiled training step needs {memory.format_bytes(step.total)} (XLA: arguments ")
    assert message.endswith("is available; lower n_embd, n_layer, block_size or batch_size")
    assert len(session.trainer._compiled) == 1  # compiled once, checked three times


def estimate_only(cfg, rows, chunk_steps, dtype, param_dtype, **kwargs):
    """check_fits as an estimate that lets the run pass: the compiled figure alone decides."""
    return memory.estimate(cfg, rows, chunk_steps, dtype, param_dtype)


def test_cli_refuses_with_the_compiled_figure_and_names_the_flags(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "check_fits", estimate_only)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 20_000)  # under XLA's ~40 KB, over the weights
    code, out = run_in_process(capsys, "train", *SMALL_RUN, "--out", tmp_path / "run")
    lower = "but 20 KB is available; lower --n-embd, --n-layer, --block-size or --batch-size"
    assert_one_line_error(code, out.err, "the compiled training step needs ", "(XLA: arguments ", lower)
    assert not (tmp_path / "run").exists()
    # the dry run says it too
    code, out = run_in_process(capsys, "train", *SMALL_RUN, "--dry-run")
    assert_one_line_error(code, out.err, "the compiled training step needs ")


def test_cli_rewords_the_estimate_as_flags(capsys):
    code, out = run_in_process(capsys, "train", "--n-embd", "100000")
    assert_one_line_error(code, out.err, "this run needs about ", "; lower --n-embd, --n-layer, --block-size or --batch-size")


@pytest.mark.parametrize("flags", [[], ["--save-every", "5", "--out"]])
def test_a_run_compiles_its_step_once(capsys, tmp_path, monkeypatch, flags):
    """The step compiled for the check (abstract arguments) is the one the loop runs (real ones)."""
    compiled = []
    original = Trainer.compiled_steps

    def counted(self, state, batches):
        out = original(self, state, batches)
        compiled.append(len(self._compiled))
        return out

    monkeypatch.setattr(Trainer, "compiled_steps", counted)
    code, out = run_in_process(capsys, "train", *SMALL_RUN, *flags, *([tmp_path / "run"] if flags else []))
    assert code == 0, out.err
    assert compiled and max(compiled) == 1, compiled
    assert out.out.count("compiled the training step in") <= 1


def test_a_resumed_and_an_extended_run_run_the_executable_of_the_new_run(capsys, tmp_path, monkeypatch):
    """One shape of the compiled loop for the run, its resume and its extension: the compilation cache serves them all."""
    import shutil

    shapes = []
    original = Trainer.compiled_steps

    def recorded(self, state, batches):
        shapes.append(batches.tokens.shape)
        return original(self, state, batches)

    monkeypatch.setattr(Trainer, "compiled_steps", recorded)
    run_dir = tmp_path / "run"
    code, out = run_in_process(capsys, "train", *SMALL_RUN, "--log-every", "10", "--save-every", "10", "--out", run_dir)
    assert code == 0, out.err
    shutil.rmtree(run_dir / "checkpoints" / "20")  # as if killed after step 10
    code, out = run_in_process(capsys, "train", "--resume", run_dir)
    assert code == 0 and "resuming" in out.out and "at step 10" in out.out, out
    code, out = run_in_process(capsys, "train", "--resume", run_dir, "--steps", "25")  # 5 more: a shorter last chunk
    assert code == 0 and "extending it from 20 to 25 steps" in out.out, out
    assert len(shapes) >= 3 and len(set(shapes)) == 1, shapes


VENDOR = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L4", 121e12),
]


@pytest.mark.parametrize("kind, peak", VENDOR)
def test_vendor_peaks_of_known_devices(kind, peak):
    assert flops.vendor_peak(kind, "bfloat16") == (peak, "bfloat16")
    assert flops.describe_peak(kind, "bfloat16") == f"vendor peak {peak / 1e12:g} TFLOP/s (bfloat16, dense)"
    peak32, kind32 = flops.vendor_peak(kind, "float32")  # JAX's default precision: tf32 tensor cores
    assert kind32 == "tf32" and peak32 < peak
    with jax.default_matmul_precision("highest"):
        assert flops.vendor_peak(kind, "float32")[1] == "float32"
    assert flops.vendor_peak(kind, "float64") is None


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "TPU v5 lite", ""])
def test_vendor_peak_of_unknown_devices(kind):
    assert flops.vendor_peak(kind, "bfloat16") is None
    assert flops.describe_peak(kind, "bfloat16") == f"vendor peak unknown for {kind} (bfloat16)"


def test_start_up_line_names_the_device_and_its_peak(capsys):
    code, out = run_in_process(capsys, "train", *SMALL_RUN, "--dry-run")
    assert code == 0, out.err
    per_token = flops_per_token(GPTConfig(vocab_size=27, n_embd=8, n_head=2, n_layer=1, block_size=8))
    kind = jax.devices()[0].device_kind
    assert f"device kind: {kind}, vendor peak unknown for {kind} (float32), {per_token:,.0f} FLOPs per token" in out.out.splitlines()


def test_bench_mfu_against_both_peaks(monkeypatch):
    tiny = dict(n_layer=1, n_embd=8, n_head=2, block_size=8)
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 2e9)  # the stable peak, measured once per process in a bench
    out = bench.mfu_case(SHAKESPEARE, "t", tiny, 2, "float32", 2, 3)
    per_token = flops_per_token(GPTConfig(vocab_size=66, **tiny))
    assert out["t_mfu"] == pytest.approx(out["t_tokens_per_s"] * per_token / 2e9) and out["t_matmul_peak_gflops"] == 2
    assert out["t_mfu_vendor"] == f"vendor peak unknown for {jax.devices()[0].device_kind} (float32)"
    assert "t_vendor_peak_gflops" not in out
    monkeypatch.setattr(bench, "vendor_peak", lambda kind, dtype: (1e12, "tf32"))
    out = bench.mfu_case(SHAKESPEARE, "t", tiny, 2, "float32", 2, 3)
    assert out["t_vendor_peak_gflops"] == 1000
    assert out["t_mfu_vendor"] == pytest.approx(out["t_mfu"] * 2e9 / 1e12)


def test_deterministic_needs_a_fresh_backend(monkeypatch):
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    with pytest.raises(UserError, match="before JAX starts its backend"):
        set_deterministic()
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {DETERMINISTIC_FLAG}")
    set_deterministic()  # already there: nothing to do


PASSED_THROUGH = """
import os, sys
from microgpt_jax.cli import main
assert main(sys.argv[1:]) is None
import jax
from jax._src import xla_bridge
assert xla_bridge.backends_are_initialized()
print("XLA_FLAGS=" + os.environ["XLA_FLAGS"])
"""


def test_deterministic_flag_reaches_xla_before_the_backend(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MICROGPT_JAX_DATA": str(NAMES), "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    env["MICROGPT_JAX_CACHE"] = str(tmp_path)
    args = ["train", *SMALL_RUN, "--steps", "2", "--deterministic"]
    done = subprocess.run([sys.executable, "-c", PASSED_THROUGH, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # XLA knows the flag (an unknown one aborts the process)
    assert f"XLA_FLAGS=--xla_cpu_enable_fast_math=false {DETERMINISTIC_FLAG}" in done.stdout.splitlines()
    assert "step 2 / 2" in done.stdout


def test_xla_parses_the_flags_the_train_command_sets(tmp_path):
    """Proof that --deterministic's XLA_FLAGS come before XLA reads them: a bogus flag in its place aborts the run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MICROGPT_JAX_DATA": str(NAMES), "MICROGPT_JAX_CACHE": str(tmp_path)}
    env.pop("XLA_FLAGS", None)
    script = "import microgpt_jax.runtime as t\nt.DETERMINISTIC_FLAG = '--xla_no_such_flag=true'\n" + PASSED_THROUGH
    args = ["train", *SMALL_RUN, "--dry-run", "--deterministic"]
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unknown flag in XLA_FLAGS: --xla_no_such_flag=true" in done.stderr, done.stderr
