"""Data parallelism on JAX's own sharding: one device, all of a host's, or many hosts.

A 1-D mesh with a `data` axis: the global batch is split over its devices,
parameters and optimizer state are replicated, and XLA inserts the gradient
all-reduce. Several processes (hosts) join through `jax.distributed`; each
one builds only its own rows of the global batch.
"""

import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from microgpt_jax.errors import UserError

DATA = "data"


def initialize(coordinator=None, num_processes=None, process_id=None, timeout=60):
    """Join a multi-process run if one is described (flags first, then JAX_* variables).

    With no coordinator this is a single-process run and nothing happens.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is None or process_id is None:
        raise UserError(
            f"a coordinator ({coordinator}) needs the number of processes and this process's id: "
            "pass --num-processes N --process-id I (or set JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id} is out of range: it must be in 0..{num_processes - 1}")
    if process_id != 0:
        wait_for_coordinator(coordinator, timeout)
    # CPU processes exchange gradients through gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)


def wait_for_coordinator(address, timeout):
    """Wait until the coordinator's port accepts connections, or fail with one line.

    jax.distributed aborts the whole process (a C++ fatal error and a stack
    trace) when it cannot register in time; checking the port first turns
    the common case, a wrong address or a coordinator that is not running,
    into a clear message.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator {address!r} is not HOST:PORT (for example 10.0.0.1:1234)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"could not reach the coordinator at {address} within {timeout}s ({e.strerror or e}); "
                    "start process 0 there first, or fix --coordinator"
                ) from None
            time.sleep(0.2)


def _env_int(name):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def make_mesh(num_devices=None) -> Mesh:
    """A `data` mesh over the first num_devices devices (default: all of them)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise UserError(f"--devices {n} is not available: this run has {len(devices)} device(s)")
    if jax.process_count() > 1 and n != len(devices):
        raise UserError(f"a multi-process run uses every device: drop --devices (there are {len(devices)})")
    return Mesh(np.array(devices[:n]), (DATA,))


def check_batch(batch_size, mesh: Mesh):
    n = mesh.devices.size
    if batch_size % n:
        raise UserError(
            f"the global batch size {batch_size} is not divisible by the {n} devices; "
            f"use a multiple of {n} (or --devices to use fewer)"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis=0) -> NamedSharding:
    """Split the batch axis (after `batch_axis` leading axes, e.g. the step axis) over `data`."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def local_rows(batch_size):
    """The rows of the global batch this process builds: a contiguous block, as the mesh orders devices."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def put_replicated(tree, mesh: Mesh):
    """Host values -> global arrays with a full copy on every device of every process."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree
    )


def put_batch(local_tree, mesh: Mesh, batch_size, batch_axis=0):
    """This process's rows of a batch -> global arrays sharded over `data` along the batch axis."""
    sharding = batch_sharding(mesh, batch_axis)

    def put(x):
        x = np.asarray(x)
        shape = x.shape[:batch_axis] + (batch_size,) + x.shape[batch_axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, local_tree)


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics, plots and the run's own files."""
    return jax.process_index() == 0


def barrier(name):
    """Wait until every process gets here (nothing to wait for in a single-process run).

    Where one process writes a file the others read next, they all meet
    here in between.
    """
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices

        sync_global_devices(name)


def gather_int(value) -> list:
    """value of every process, in process order (one process: [value])."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental.multihost_utils import process_allgather

    return [int(v) for v in np.asarray(process_allgather(np.int64(value)))]
