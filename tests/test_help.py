"""A command line that explains itself: every flag's help, choices and default; --version; bare and bad commands;
bench's cases; plot's legend and the path it prints."""

import argparse
import importlib.metadata
import json
from pathlib import Path

import pytest

from microgpt_jax.cli import build_parser
from tests.helpers import assert_one_line_error, cli, run_in_process

SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction)


def walk(parser):
    """(parser, its actions' subparsers action or None) for the parser and every subcommand under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def help_problems(parser):
    """What a reader of `PROG --help` would miss: flags and positionals without help, unlisted choices, unshown defaults."""
    problems = []
    for action in parser._actions:
        name = f"{parser.prog} {'/'.join(action.option_strings) or action.metavar or action.dest}"
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help")
            continue
        text = parser._get_formatter()._expand_help(action)  # %(default)s and %(choices)s filled in, as --help shows
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            problems += [f"{name}: command {c} has no help" for c in action.choices if c not in helped]
            continue
        if action.choices:
            problems += [f"{name}: help does not list the choice {c!r}" for c in action.choices if str(c) not in text]
        if isinstance(action, SWITCHES):
            continue
        takes_default = action.option_strings or action.nargs in ("?", "*")
        if action.default is not None and str(action.default) not in text:
            problems.append(f"{name}: help does not show the default {action.default!r}")
        elif action.default is None and takes_default and "default" not in text:
            problems.append(f"{name}: help does not say what happens without it")
    return problems


def test_every_flag_of_every_command_has_help_choices_and_default():
    parsers = list(walk(build_parser()))
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {p.prog for p in parsers} == {"microgpt-jax"} | {f"microgpt-jax {c}" for c in commands}
    problems = [problem for p in parsers for problem in help_problems(p)]
    assert problems == []


def test_the_help_check_catches_what_it_checks():
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--hidden-default", type=int, default=3, help="a number")
    parser.add_argument("--unlisted", choices=["a", "b"], default="a", help="a letter (default %(default)s)")
    parser.add_argument("--silent", default=None, help="a path")
    parser.add_argument("--good", choices=["x", "y"], default="x", help="one of %(choices)s (default %(default)s)")
    sub = parser.add_subparsers(dest="command", help="commands")
    sub.add_parser("undocumented")
    assert help_problems(parser) == [
        "demo --bare: no help",
        "demo --hidden-default: help does not show the default 3",
        "demo --unlisted: help does not list the choice 'b'",
        "demo --silent: help does not say what happens without it",
        "demo command: command undocumented has no help",
    ]


def test_version_is_the_package_metadata(capsys):
    code, out = run_in_process(capsys, "--version")
    assert code == 0
    assert out.out == f"microgpt-jax {importlib.metadata.version('microgpt-jax')}\n"


def test_no_command_prints_the_commands_and_succeeds():
    out = cli()  # a real process: argv from sys.argv
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.startswith("usage: microgpt-jax")
    for command in build_parser()._subparsers._group_actions[0].choices:
        assert f"    {command}" in out.stdout


@pytest.mark.parametrize(
    "args, start, end",
    [
        (["train", "--steps", "x"], "microgpt-jax train: argument --steps: invalid int value: 'x'", "(see microgpt-jax train --help)"),
        (["sample"], "microgpt-jax sample: the following arguments are required: run_dir", "(see microgpt-jax sample --help)"),
        (["bogus"], "microgpt-jax: argument COMMAND: invalid choice: 'bogus'", "(see microgpt-jax --help)"),
    ],
)
def test_an_error_names_its_command(capsys, args, start, end):
    code, out = run_in_process(capsys, *args)
    assert code == 2
    assert_one_line_error(code, out.err)
    line = out.err.strip()
    assert line.startswith(f"error: {start}") and line.endswith(end), line


def test_bench_help_lists_every_case_with_its_docstring(capsys):
    from microgpt_jax.bench import CASES

    code, out = run_in_process(capsys, "bench", "--help")
    assert code == 0
    lines = out.out.splitlines()
    for name, fn in CASES.items():
        first = fn.__doc__.strip().splitlines()[0]
        assert first, name
        assert any(line.split() and line.split()[0] == name and line.rstrip().endswith(first) for line in lines), (name, out.out)


# --- plot ---


@pytest.mark.parametrize(
    "run_dirs, labels",
    [
        (["runs/names"], ["names"]),
        (["runs/names", "runs/names-b256"], ["names", "names-b256"]),
        (["a/run", "b/run"], ["a/run", "b/run"]),
        (["x/a/run", "y/a/run", "z/run", "z/other"], ["x/a/run", "y/a/run", "z/run", "other"]),
        (["a/run/", "b/run"], ["a/run", "b/run"]),
    ],
)
def test_legend_labels_are_the_shortest_distinguishing_tails(run_dirs, labels):
    from microgpt_jax.plot import legend_labels

    assert legend_labels(run_dirs) == labels


def test_legend_labels_name_the_current_directory(tmp_path, monkeypatch):
    from microgpt_jax.plot import legend_labels

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert legend_labels(["."]) == ["here"]


def write_run(run_dir):
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 3.3 - s / 10, "val_loss": 3.4 - s / 10 if s % 2 == 0 else None} for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def saved(monkeypatch):
    """What each savefig got: {"path": the file name it was given, "legend": the legend's texts}."""
    from matplotlib.figure import Figure

    calls, original = [], Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        calls.append({"path": fname, "legend": [t.get_text() for t in self.axes[0].get_legend().get_texts()]})
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return calls


@pytest.mark.parametrize(
    "args, written",
    [
        (["a/run", "b/run", "--out", "both.png"], "both.png"),
        (["a/run", "b/run"], "loss.png"),
        (["a/run", "b/run", "--out", "./figs/../figs/both.svg"], "figs/both.svg"),
        (["a/run"], "a/run/loss.png"),
    ],
)
def test_plot_tells_same_named_runs_apart_and_prints_the_path_it_wrote(tmp_path, monkeypatch, capsys, saved, args, written):
    write_run(tmp_path / "a/run")
    write_run(tmp_path / "b/run")
    (tmp_path / "figs").mkdir()
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    code, out = run_in_process(capsys, "plot", *args)
    assert code == 0, out.err
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new == {(tmp_path / written).resolve()}
    printed = out.out.strip().removeprefix("loss curves: ")
    assert (tmp_path / printed).resolve() == (tmp_path / written).resolve()
    assert Path(saved[0]["path"]) == Path(printed)
    runs = [a for a in args if a.endswith("/run")]
    expected = [f"{r} {kind}" for r in runs for kind in ("train", "val")] if len(runs) > 1 else ["run train", "run val"]
    assert saved[0]["legend"] == expected
