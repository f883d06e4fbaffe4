"""Data parallelism: N devices give the single device's numbers (float64, CPU virtual devices)."""

import json
import os
import subprocess
import sys

import pytest

from microgpt_jax.errors import UserError
from tests.helpers import ROOT

ATOL = 1e-12  # |many - one| <= ATOL + 1e-10 * |one|, the tolerance


def run_worker(num_devices):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    out = subprocess.run(
        [sys.executable, "tests/dp_worker.py", str(num_devices)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_four_devices_equal_one_device():
    """A run's batch split over 4 devices; a sweep's 4 members spread over them, and 3 members' rows split over them."""
    result = run_worker(4)
    assert result["devices_used"] == [4]  # the batch really was split over 4 devices
    assert result["loss_excess"] <= ATOL, result
    assert result["param_excess"] <= ATOL, result
    spread, split = result["sweep_4"], result["sweep_3"]
    assert spread["by_member"] and spread["devices_used"] == [4] and spread["excess"] <= ATOL, spread
    assert not split["by_member"] and split["excess"] <= ATOL, split


def test_batch_must_divide_over_devices():
    from types import SimpleNamespace

    import numpy as np

    from microgpt_jax import parallel

    four = SimpleNamespace(devices=np.empty(4))
    parallel.check_batch(8, four)
    with pytest.raises(UserError, match="global batch size 6 is not divisible by the 4 devices; use a multiple of 4"):
        parallel.check_batch(6, four)


def test_more_devices_than_there_are():
    import jax

    from microgpt_jax import parallel

    with pytest.raises(UserError, match=f"this run has {jax.device_count()} device"):
        parallel.make_mesh(jax.device_count() + 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_processes=2, process_id=2), "process_id 2 is out of range: it must be in 0..1"),
        (dict(num_processes=2, process_id=-1), "process_id -1 is out of range"),
        (dict(num_processes=0, process_id=0), "num_processes must be at least 1"),
        (dict(num_processes=None, process_id=0), "needs the number of processes"),
    ],
)
def test_bad_process_settings(kwargs, message, monkeypatch):
    from microgpt_jax import parallel

    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(UserError, match=message):
        parallel.initialize("127.0.0.1:1", **kwargs)


def test_unreachable_coordinator_times_out_with_a_message():
    import time

    from microgpt_jax import parallel

    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not reach the coordinator at 127.0.0.1:1 within 1s"):
        parallel.initialize("127.0.0.1:1", num_processes=2, process_id=1, timeout=1)
    assert time.monotonic() - start < 10  # it gives up: it never hangs


def test_coordinator_address_must_be_host_and_port():
    from microgpt_jax import parallel

    with pytest.raises(UserError, match="is not HOST:PORT"):
        parallel.initialize("localhost", num_processes=2, process_id=1, timeout=1)
