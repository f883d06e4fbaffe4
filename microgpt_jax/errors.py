"""User-facing errors: one line naming the problem and the fix, no traceback."""

import argparse
import os
import sys


class UserError(Exception):
    """Bad input from the user. The message names the problem and says how to fix it."""

    exit_code = 2


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main, argv=None):
    """Run a command-line entry point: a UserError becomes one line on stderr and exit 2."""
    try:
        code = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except UserError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except BrokenPipeError:
        # the reader went away (`| head`): quiet the rest of the output, say so once
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        fail("the output was closed early (a pipe into head?); stopped writing", code=141)
    raise SystemExit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit 2."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see {self.prog} --help)")  # a subcommand's prog is "microgpt-jax train"


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
