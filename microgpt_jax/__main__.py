"""`python -m microgpt_jax` and the `microgpt-jax` script: a ctrl-C while the modules load is one line too."""

import signal


def entry():
    from microgpt_jax.errors import exit_at_once

    signal.signal(signal.SIGINT, exit_at_once)  # until the command starts (cli.main): nothing is open before
    from microgpt_jax.cli import entry as run

    run()


if __name__ == "__main__":
    entry()
