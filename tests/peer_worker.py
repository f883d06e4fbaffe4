"""One process of a 2-process run for tests/test_peers.py (2 virtual CPU devices each, gloo on loopback).

    python tests/peer_worker.py PORT PROCESS_ID TIMEOUT [--chunks N] [--barrier] [--sleep-before-chunk K:SECONDS]
        [--sleep-before-stop K:SECONDS] (before the barrier and agree_on_stop)

Loops over chunks of a jitted function whose result crosses processes (a mean
over a `data` mesh: an all-reduce per iteration), calls agree_on_stop after
each chunk (and `barrier` with --barrier), and exits 128 + signum when it
returns a signal. Prints `ready`, `chunk K` and `stopped at chunk K` lines.
"""

import argparse
import signal
import sys
import time

from microgpt_jax import parallel
from microgpt_jax.errors import run_cli


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("port")
    p.add_argument("process_id", type=int)
    p.add_argument("timeout", type=float)
    p.add_argument("--chunks", type=int, default=10_000)
    p.add_argument("--barrier", action="store_true")
    p.add_argument("--sleep-before-chunk", default="-1:0")
    p.add_argument("--sleep-before-stop", default="-1:0")
    args = p.parse_args(argv)
    sleep_chunk = [float(v) for v in args.sleep_before_chunk.split(":")]
    sleep_stop = [float(v) for v in args.sleep_before_stop.split(":")]

    pending = 0

    def on_signal(signum, frame):
        nonlocal pending
        pending = pending or signum

    signal.signal(signal.SIGTERM, on_signal)
    parallel.initialize(f"127.0.0.1:{args.port}", 2, args.process_id, timeout=30, peer_timeout=args.timeout)

    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh = parallel.make_mesh()
    x = parallel.put_batch(np.full(2, args.process_id + 1.0, np.float32), mesh, 4)

    @jax.jit
    def chunk(x, c):
        return jax.lax.fori_loop(0, 20, lambda i, c: c + jnp.mean(jnp.sin(x + c)), c)

    c = parallel.put_replicated(np.float32(0), mesh)
    print("ready", flush=True)
    for k in range(args.chunks):
        with parallel.watch_peers(args.timeout, lambda k=k: f"the last good chunk is {k - 1}; resume with: worker --resume"):
            if k == sleep_chunk[0]:
                time.sleep(sleep_chunk[1])
            c = chunk(x, c)
            float(c)
            print(f"chunk {k}", flush=True)
            if k == sleep_stop[0]:  # the other process waits in the barrier or in agree_on_stop
                time.sleep(sleep_stop[1])
            if args.barrier:
                parallel.barrier(f"chunk {k}")
            try:
                stop = parallel.agree_on_stop(pending, args.timeout)
            except parallel.PeerLost as e:
                raise parallel.PeerLost(f"{e}; the last good chunk is {k - 1}; resume with: worker --resume") from None
        if stop:
            print(f"stopped at chunk {k}", flush=True)
            return 128 + stop
        time.sleep(0.05)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
