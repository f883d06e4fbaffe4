"""Config classes: frozen dataclasses whose fields say their own help, choices and checks.

Each field is written once, with `field(default, help, ...)`. From that one
place come the command-line flag (cli.py), the run.json entry and its
validation on open (rundir.py), and the error a bad value gets: a
`ConfigError` naming the field, which the CLI words as a flag and run.json
as a key.
"""

import dataclasses
import json
import math

from microgpt_jax.errors import UserError


class ConfigError(UserError):
    """A config value is wrong: `field` names it, `problem` says what is wrong ("must be positive, got 0")."""

    def __init__(self, field, problem):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def with_flags(self, flag) -> str:
        """The message with the field worded as the command line's flag (flag("n_embd") -> "--n-embd")."""
        return f"{flag(self.field)} {self.problem}"


def field(default, help, *, check=None, choices=None, resumable=False, since=None):
    """A config field. check(value) returns None or what is wrong; resumable: may differ on a resumed run.

    since: the version that added the field; a run.json written before it has
    no such key and reads as the default, which is what those runs did.
    """
    metadata = {"help": help, "check": check, "choices": choices, "resumable": resumable, "since": since}
    return dataclasses.field(default=default, metadata=metadata)


def positive(value):
    return None if value > 0 else "must be positive"


def non_negative(value):
    return None if value >= 0 else "must be at least 0"


def fits_64_bits(value):
    return None if -(2**63) <= value < 2**63 else "must fit in 64 bits (-2**63 to 2**63 - 1)"


def fraction(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _type_problem(kind, value):
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    return None if isinstance(value, kind) else f"must be a {kind.__name__}"


def validate(cfg):
    """Every field's type, choices and check; the first problem raises ConfigError naming the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        problem = _type_problem(type(f.default), value)
        if problem is None and f.metadata.get("choices") and value not in f.metadata["choices"]:
            problem = f"must be one of {', '.join(f.metadata['choices'])}"
        if problem is None and f.metadata.get("check"):
            problem = f.metadata["check"](value)
        if problem:
            raise ConfigError(f.name, f"{problem}, got {value!r}")


def from_dict(cls, values: dict):
    """cls from a dict (a run.json table): unknown and missing keys are ConfigErrors too (but fields added `since`)."""
    if not isinstance(values, dict):
        raise ConfigError("", f"must be a table of {cls.__name__} fields, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(key, f"is not a {cls.__name__} field (fields: {', '.join(sorted(names))})")
    for f in dataclasses.fields(cls):
        if f.name not in values and not f.metadata.get("since"):
            raise ConfigError(f.name, "is missing")
    return cls(**values)


def with_added_defaults(cls, values: dict) -> dict:
    """values with the default of every field added `since` that they lack (what an older run used)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("since")} | values


def resumable_fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def read_toml(path, classes: dict, not_in_files=(), extra=None) -> dict:
    """A config file: {table: {field: value}}, one table per config class, each table checked by its class.

    extra: {table: {key: type}}, keys a file may hold beyond the fields (they stay in the tables, checked by type only)."""
    extra = extra or {}
    import tomllib

    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f)
    except OSError as e:
        raise UserError(f"could not read the config file {path} ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    for table, values in tables.items():
        if not isinstance(values, dict):
            owner = next((t for t, cls in classes.items() if table in {f.name for f in dataclasses.fields(cls)}), "its table")
            raise UserError(f"{path}: {table} is outside any table; put it below [{owner}]")
        if table not in classes:
            raise UserError(f"{path}: unknown table [{table}]; the tables are {', '.join(f'[{t}]' for t in classes)}")
        names = [f.name for f in dataclasses.fields(classes[table]) if f.name not in not_in_files] + list(extra.get(table, {}))
        for key in values:
            if key not in names:
                raise UserError(f"{path}: [{table}] has no key {key!r} (its keys: {', '.join(names)})")
        for key, kind in extra.get(table, {}).items():
            if key in values and not isinstance(values[key], kind):
                raise UserError(f"{path}: [{table}] {key} must be a {kind.__name__}, got {values[key]!r}")
        try:  # each table's values checked by its class, the rest at their defaults
            classes[table](**{k: v for k, v in values.items() if k not in extra.get(table, {})})
        except ConfigError as e:
            raise UserError(f"{path}: [{table}] {e}") from None
    return tables


def to_toml(configs: dict, not_in_files=(), extra=None) -> str:
    """The configs as a config file that read_toml reads back; extra: {table: {key: (value, help)}} written first."""
    lines = []
    for table, cfg in configs.items():
        lines.append(f"[{table}]")
        for key, (value, help) in (extra or {}).get(table, {}).items():
            lines.append(f"{key} = {json.dumps(value)}  # {help}")
        for f in dataclasses.fields(cfg):
            if f.name not in not_in_files:
                lines.append(f"{f.name} = {json.dumps(getattr(cfg, f.name))}  # {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)
