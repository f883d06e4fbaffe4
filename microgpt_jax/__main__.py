"""`python -m microgpt_jax` and the `microgpt-jax` script: a ctrl-C while the modules load is one line too."""

import contextlib
import os
import signal
import sys


def entry():
    from microgpt_jax.errors import exit_at_once

    signal.signal(signal.SIGINT, exit_at_once)  # until the command starts (cli.main): nothing is open before
    from microgpt_jax.cli import entry as run

    try:
        run()
    except SystemExit as e:
        if isinstance(e.code, int) and e.code >= 128:  # stopped by a signal, its line said: a compiled call may
            for stream in (sys.stdout, sys.stderr):  # still run, and Python's teardown would crash under it
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(e.code)
        raise


if __name__ == "__main__":
    entry()
