"""TOML config files for commands: every flag can come from a file, flags on the command line win.

Keys are the long flag names without dashes (`sample-steps` or `sample_steps`); an unknown key
is an error, not silently ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from erase.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path, flag: str) -> dict:
    """The parsed file; a missing or malformed file is a usage error naming `flag`."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{flag} {path}: not valid TOML ({e})") from None


def load_toml(path: Path, allowed: set[str]) -> dict:
    """Read `path`; return {parameter_name: value}. `allowed` holds the command's parameter names."""
    data = read_toml(path, "--config")
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise UsageError(f"--config {path}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
        if name == "concepts" and isinstance(value, list):
            value = ", ".join(value)
        out[name] = value
    return out
