"""JSON files that describe a directory (run.json, a dataset's meta.json): read and checked in one line each."""

import json

from microgpt_jax.errors import UserError


def read_json(path, fix: str):
    """The JSON in the file at path; unreadable or damaged is a one-line error ending with fix."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); {fix}") from None


def check_format(meta, name: str, version: int, what: str, bad):
    """meta is a dict of this format and version; else bad(key, problem) is raised. what: 'run directories', ..."""
    if not isinstance(meta, dict) or meta.get("format") != name:
        raise bad("format", f"is not {name!r}")
    if meta.get("version") != version:
        raise bad("version", f"is {meta.get('version')!r}; this microgpt-jax reads {what} of version {version}")
