"""Reading a TOML settings file (agent config, alert rules, target profiles) with one-line errors.

Every reader used to catch the same four failures in its own words. :func:`read_toml` says them once, naming the
file and, for a syntax error, the line and the key (or text) written there::

    /etc/edge-sdk/agent.toml: config file not found: check the --config path
    /etc/edge-sdk/agent.toml: line 3 (threads =): not valid TOML (invalid value): fix the syntax

The value checks stay with each reader (they know the keys); their messages name the file and the key too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError, EdgeSDKError

try:
    import tomllib  # novermin: 3.10 takes the fallback below
except ModuleNotFoundError:  # Python 3.10 (Jetson JetPack 6, Ubuntu 22.04): the same parser, pyproject's `tomli`
    import tomli as tomllib

__all__ = ["read_toml"]

_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)$|\s*\(at end of document\)$")


def read_toml(path: str | os.PathLike, *, kind: str = "settings file", missing_hint: str = "check the path",
              error: type[EdgeSDKError] = ConfigError) -> dict[str, Any]:
    """The table in the TOML file ``path``; ``error`` with one line (file, line, key) when it cannot be used.

    ``kind`` names the file in messages ("config file", "rules file"); ``missing_hint`` is how to fix a path that
    does not exist; ``error`` is the reader's exception class (a :class:`~edge_sdk.errors.ConfigError` by default).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {kind} not found: {missing_hint}") from None
    except IsADirectoryError:
        raise error(f"{path}: {kind} is a directory: give the path of a .toml file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {kind} ({exc.strerror}): check its permissions") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {kind} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: {_where(str(exc), text)}not valid TOML ({_POSITION.sub('', str(exc))}): "
                    "fix the syntax") from None


def _where(message: str, text: str) -> str:
    """``line N (its text): `` for a tomllib message that ends with its position, else ``""``."""
    m = _POSITION.search(message)
    if m is None or m.group(1) is None:
        return ""
    lineno = int(m.group(1))
    lines = text.splitlines()
    shown = " ".join(lines[lineno - 1].split())[:80] if 0 < lineno <= len(lines) else ""
    return f"line {lineno} ({shown}): " if shown else f"line {lineno}: "
