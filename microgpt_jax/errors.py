"""User-facing errors: one line naming the problem and the fix, no traceback."""

import argparse
import difflib
import errno
import os
import signal
import sys
import threading


class UserError(Exception):
    """Bad input from the user. The message names the problem and says how to fix it."""

    exit_code = 2


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside a training loop: unwinds like ctrl-C (temporary files are removed), exit 128 + signal."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


def _stop(signum, frame):
    raise Stopped(signum)


def exit_at_once(signum, frame):
    """ctrl-C while the modules load (nothing is open yet): one line and exit 130, never a traceback."""
    os.write(2, b"\nerror: interrupted\n")
    os._exit(130)


def _quiet_stdout():
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_cli(main, argv=None):
    """Run a command-line entry point: a UserError becomes one line on stderr and exit 2."""
    if sys.stdout is None:  # `>&-`: fd 1 would go to the next file opened (a checkpoint's), so nothing starts
        fail("the standard output is closed (>&-); send it somewhere (> FILE, or > /dev/null)")
    signals = (signal.SIGTERM, signal.SIGHUP) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, _stop) for s in signals}  # the command unwinds: its temporary files go (train saves first)
    try:
        code = _run(main, argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    raise SystemExit(code or 0)


def _run(main, argv):
    try:
        code = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except UserError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt as e:
        fail("interrupted" + (f" ({e})" if isinstance(e, Stopped) else ""), code=getattr(e, "code", 130))
    except BrokenPipeError:
        # the reader went away (`| head`): quiet the rest of the output, say so once
        _quiet_stdout()
        fail("the output was closed early (a pipe into head?); stopped writing", code=141)
    except OSError as e:
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EBADF, errno.EFBIG):
            raise
        _quiet_stdout()  # a full disk under `> FILE` (or /dev/full): say so once, not again at exit
        fail(f"could not write the output ({e.strerror}); what was printed before is whole", code=1)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit 2."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # what error() looks at
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if message.endswith("expected one argument"):  # argparse takes a value that starts with '-' (-1:2) for a flag
            flag = message.removeprefix("argument ").split(":")[0].split("/")[-1]
            given = getattr(self, "_given", [])
            value = next((v for f, v in zip(given, given[1:]) if f == flag), "")
            if value.startswith("-"):
                message += f" (a value that starts with '-' goes as {flag}={value})"
        fail(f"{self.prog}: {message} (see {self.prog} --help)")  # a subcommand's prog is "microgpt-jax train"

    def unknown(self, extra: list):
        """Flags this (sub)command does not take: one line, with the flag meant where one is close (--n_layer: --n-layer)."""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        meant = {
            x: difflib.get_close_matches(x.split("=")[0].replace("_", "-"), flags, n=1, cutoff=0.75) for x in extra if x.startswith("-")
        }
        hints = [f"{x.split('=')[0]}: did you mean {m[0]}?" for x, m in meant.items() if m]
        self.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def int_or_error(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text):
    value = int_or_error(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


SEEDS = (-(2**63), 2**63 - 1)  # jax.random.key takes an int64


def seed_int(text):
    value = int_or_error(text)
    if not SEEDS[0] <= value <= SEEDS[1]:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits ({SEEDS[0]} to {SEEDS[1]}), got {value}")
    return value
