"""Data parallelism on JAX's own sharding: one device, all of a host's, or many hosts.

A 1-D mesh with a `data` axis: the global batch is split over its devices,
parameters and optimizer state are replicated, and XLA inserts the gradient
all-reduce. Several processes (hosts) join through `jax.distributed`; each
one builds only its own rows of the global batch.
"""

import atexit
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from microgpt_jax.config import ConfigError
from microgpt_jax.errors import UserError

DATA = "data"


PEER_TIMEOUT = 60  # seconds without a heartbeat before a peer counts as dead (initialize's default)


class PeerLost(UserError):
    """Another process of a multi-process run died or stopped answering.

    The message names the peer and the timeout; the caller may complete it
    with the last good checkpoint and the resume command.
    """

    exit_code = 1


def initialize(coordinator=None, num_processes=None, process_id=None, timeout=60, peer_timeout=PEER_TIMEOUT):
    """Join a multi-process run if one is described (flags first, then JAX_* variables).

    With no coordinator this is a single-process run and nothing happens.
    peer_timeout bounds how long a process waits for a peer that died (see
    watch_peers): JAX's own heartbeat is set well past it, so it never
    aborts the process first.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    host, port = parse_address(coordinator)
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is None or process_id is None:
        raise UserError(
            f"a coordinator ({coordinator}) needs the number of processes and this process's id: "
            "pass --num-processes N --process-id I (or set JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    if num_processes < 1:
        raise ConfigError("num_processes", f"must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError("process_id", f"{process_id} is out of range: it must be in 0..{num_processes - 1}")
    heartbeat = int(2 * peer_timeout + 10)  # JAX's heartbeat abort (a C++ fatal error) must never beat our watchdog
    if process_id == 0:
        service = _start_service(coordinator, port, num_processes, heartbeat, linger=heartbeat)
    else:
        wait_for_coordinator(coordinator, timeout)
    # CPU processes exchange gradients through gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption notifier catches SIGTERM itself; the training loop handles signals (agree_on_stop).
    jax.config.update("jax_enable_preemption_service", False)
    from jax._src import distributed

    real = distributed._jax
    if process_id == 0:  # the service runs in its own process (_start_service): JAX must not start another
        distributed._jax = _NoService(real)
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=heartbeat,
        )
    finally:
        distributed._jax = real
    global _watch
    _watch = _Watch(distributed.global_state.client, process_id, num_processes, peer_timeout)
    if process_id == 0:
        _watch.service = service
    atexit.register(_watch.at_exit)  # runs before JAX's own clean-up (atexit is last in, first out)


def parse_address(address):
    """HOST:PORT -> (host, port), or a one-line UserError."""
    host, _, port = address.rpartition(":")
    example = "it must be HOST:PORT (for example 10.0.0.1:1234 or localhost:1234)"
    if not host or not port.isdigit():
        raise ConfigError("coordinator", f"{address!r} is not HOST:PORT; {example}")
    if not 1 <= int(port) <= 65535:
        raise ConfigError("coordinator", f"{address!r} has port {port}, outside 1..65535; {example}")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address, timeout):
    """Wait until the coordinator's port accepts connections, or fail with one line.

    jax.distributed aborts the whole process (a C++ fatal error and a stack
    trace) when it cannot register in time; checking the port first turns
    the common case, a wrong address or a coordinator that is not running,
    into a clear message.
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
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
        raise ConfigError("devices", f"{n} is not available: this run has {len(devices)} device(s)")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError("devices", f"must be all of them in a multi-process run (there are {len(devices)}): leave it out")
    return Mesh(np.array(devices[:n]), (DATA,))


def check_batch(batch_size, mesh: Mesh):
    n = mesh.devices.size
    if batch_size % n:
        raise UserError(
            f"the global batch size {batch_size} is not divisible by the {n} devices; use a multiple of {n} (or --devices to use fewer)"
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
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree)


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


# -- a dead peer: one line and exit 1, never a hang or a C++ abort ------------------------
#
# What JAX 0.10.2 does on its own when a process of the run dies (SIGKILL):
# - gloo does not notice a closed connection: a survivor inside a cross-process
#   all-reduce (a jitted step, or `barrier`, which is an all-gather) waits there;
# - the coordination service notices the missed heartbeats after
#   heartbeat_timeout_seconds (default 100) and every survivor then dies in a
#   C++ LOG(FATAL) with a stack trace (exit 134);
# - when process 0 dies, the service it hosts dies with it, and the other
#   processes abort the same way within about a second (their error poll fails);
# - the client's missed_heartbeat_callback cannot be a Python function (the
#   absl::Status argument does not convert: std::bad_cast, then abort).
# So process 0 runs the coordination service in a helper process of its own
# (it outlives process 0 by peer_timeout), JAX's heartbeat is set far past
# peer_timeout, and a watchdog thread of ours (_Watch) exits first, cleanly.

_watch = None

_SERVICE = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only process 0 ends it (stdin), never a signal to the group
    signal.signal(s, signal.SIG_IGN)
from jax._src.lib import _jax
bind, n, heartbeat, linger = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    service = _jax.get_distributed_runtime_service(bind, n, heartbeat_timeout=heartbeat, shutdown_timeout=heartbeat)
except Exception as e:
    print("error", str(e).replace("\n", " "), flush=True)
    sys.exit(1)
print("ready", flush=True)
done = sys.stdin.readline().strip() == "done"
time.sleep(2 if done else linger)  # process 0 died: serve the others until their watchdogs end them
os._exit(0)
"""


def _start_service(coordinator, port, num_processes, heartbeat, linger):
    """The coordination service, in a helper process that outlives process 0 by `linger` seconds."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
    helper = subprocess.Popen(
        [sys.executable, "-c", _SERVICE, bind, str(num_processes), str(heartbeat), str(linger)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    ready, _, _ = select.select([helper.stdout], [], [], 60)
    line = helper.stdout.readline().strip() if ready else ""
    if line != "ready":
        helper.kill()
        raise UserError(
            f"could not start the coordinator on port {port} ({line.removeprefix('error ') or 'no answer'}); "
            f"the port may be in use (a run that just failed keeps it for {linger:g}s): wait, or pick another --coordinator port"
        )
    return helper


class _NoService:
    """JAX's own module, but get_distributed_runtime_service starts nothing (ours runs in a helper process)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def get_distributed_runtime_service(*args, **kwargs):
        return _NoServiceHandle()


class _NoServiceHandle:
    def shutdown(self):
        pass


def _default_message():
    return "stop the other processes of this run and start it again (--resume DIR continues from its last checkpoint)"


class _Watch:
    """Every process writes a heartbeat to the coordination service's key-value store twice a second
    and reads the others'; a peer whose heartbeat stops for the timeout is dead (a slow step is not:
    the heartbeat comes from this thread, not from the training loop)."""

    ALIVE = "microgpt_jax/alive/"
    INTERVAL = 0.5

    def __init__(self, client, process_id, num_processes, timeout):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.default = (timeout, _default_message)
        self.stack = []  # (timeout, message) of the open watch_peers blocks, innermost last
        self.service = None
        self.round = 0  # agree_on_stop calls so far
        self.ending = False  # set once this process is going down because of a peer
        self.exiting = False  # set at exit: the heartbeat says so, and a peer still at work may end
        self.end_lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="microgpt-jax-peers", daemon=True)
        self.thread.start()

    def run(self):
        beat, seen = 0, {}
        last_ok = time.monotonic()
        while not self.stop.wait(self.INTERVAL):
            timeout, message = self.stack[-1] if self.stack else self.default
            now = time.monotonic()
            try:
                beat += 1
                value = "exiting" if self.exiting else str(beat)
                self.client.key_value_set(f"{self.ALIVE}{self.process_id}", value, allow_overwrite=True)
                values = {k.rpartition("/")[2]: v for k, v in self.client.key_value_dir_get(self.ALIVE)}
                last_ok = now
            except Exception:  # the coordination service is gone or unreachable
                if now - last_ok > timeout:
                    self.die(f"the coordinator of this run did not answer for {timeout:g}s; {message_text(message)}")
                continue
            for peer in range(self.num_processes):
                value = values.get(str(peer))
                if peer == self.process_id:
                    continue
                if peer not in seen or seen[peer][0] != value:
                    seen[peer] = (value, now)
                elif value == "exiting":  # it quit; fatal only while this one still works with it
                    if self.stack and now - seen[peer][1] > timeout:
                        self.die(f"process {peer} of this run has quit (see its error); {message_text(message)}")
                elif now - seen[peer][1] > timeout:
                    self.die(f"process {peer} of this run is gone (no heartbeat for {timeout:g}s); {message_text(message)}")

    def die(self, text):
        """One line on stderr and exit 1, before anything else can hang or abort."""
        with self.end_lock:
            if self.ending or self.stop.is_set():
                return
            self.ending = True
        flusher = threading.Thread(target=_flush, daemon=True)  # the main thread may hold stdout's lock
        flusher.start()
        flusher.join(1)
        os.write(2, f"error: {text}\n".encode())
        os._exit(PeerLost.exit_code)

    def give_up(self):
        """This process is going down with a PeerLost: silence the watchdog, skip JAX's clean-up at exit."""
        with self.end_lock:
            self.ending = True
        self.stop.set()

    def at_exit(self):
        if self.ending:  # JAX's clean-up would wait for the dead peer at its shutdown barrier
            self.stop.set()
            _flush()
            os._exit(PeerLost.exit_code)
        # Stop the heartbeat thread before JAX's clean-up closes the client: a call into a closed
        # client from that thread aborts the process ("terminate called ..."), seen under load.
        self.exiting = True
        self.stop.set()
        self.thread.join(timeout=10)
        with contextlib.suppress(Exception):  # the peers read "exiting": this process quit, it did not die
            self.client.key_value_set(f"{self.ALIVE}{self.process_id}", "exiting", allow_overwrite=True)
        if self.service is not None:  # leave the service only once this client has left it
            jax.distributed.shutdown()
            with contextlib.suppress(Exception):
                self.service.stdin.write("done\n")
                self.service.stdin.close()


def _flush():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def message_text(message):
    try:
        return str(message())
    except Exception as e:  # the caller's message must not hide the failure itself
        return f"{_default_message()} (the resume hint failed: {e})"


@contextlib.contextmanager
def watch_peers(timeout_s=None, message=None):
    """While inside, a peer process that dies ends this one within timeout_s (default: initialize's
    peer_timeout) with one line on stderr, `error: <what happened>; <message()>`, and exit code 1,
    wherever this process waits (a jitted step's all-reduce, `barrier`, agree_on_stop, file I/O).

    message is a zero-argument callable, called at the failure, returning what to do next (the last
    good checkpoint and the resume command). Outside any watch_peers block the same holds with
    peer_timeout and a generic message. timeout_s must not exceed initialize's peer_timeout (JAX's
    own heartbeat and the coordinator's lifetime after process 0 dies are sized from it).
    A single-process run watches nothing.
    """
    if _watch is None:
        yield
        return
    entry = (timeout_s or _watch.default[0], message or _default_message)
    _watch.stack.append(entry)
    try:
        yield
    except UserError:
        raise
    except Exception:
        # gloo sometimes does notice a dead peer ("Connection closed by peer"): give the watchdog
        # the time to name it and end the process with one line; anything else is raised as it was
        _watch.stop.wait(entry[0] + 2 * _Watch.INTERVAL)
        raise
    finally:
        _watch.stack.remove(entry)


def agree_on_stop(signum: int, timeout_s: float) -> int:
    """Every process passes its pending signal (0: none); all get the same answer: the signal of the
    lowest-id process that has one, else 0. One exchange per call; every process calls it equally often.

    A peer that does not answer within timeout_s raises PeerLost (exit code 1); the caller may
    complete its message, e.g. `raise PeerLost(f"{e}; resume with ...") from None`.
    """
    if _watch is None:
        return int(signum)
    # The coordination service's key-value store, not a gloo all-gather: its blocking get has a
    # timeout and raises, while gloo waits forever on a dead peer.
    w = _watch
    w.round += 1
    prefix = f"microgpt_jax/stop/{w.round}/"
    deadline = time.monotonic() + timeout_s
    values = []
    try:
        w.client.key_value_set(f"{prefix}{w.process_id}", str(int(signum)))
        if w.round > 2:  # every peer has read round - 2: it has written round - 1
            w.client.key_value_delete(f"microgpt_jax/stop/{w.round - 2}/{w.process_id}")
        for peer in range(w.num_processes):
            if peer == w.process_id:
                values.append(int(signum))
                continue
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                values.append(int(w.client.blocking_key_value_get(f"{prefix}{peer}", left_ms)))
            except Exception:
                w.give_up()
                raise PeerLost(f"process {peer} of this run did not answer within {timeout_s:g}s (it died or hangs)") from None
    except PeerLost:
        raise
    except Exception:
        w.give_up()
        raise PeerLost(f"the coordinator of this run did not answer within {timeout_s:g}s (process 0 died or hangs)") from None
    return next((v for v in values if v), 0)
