"""The device agent's configuration file (TOML), read with :mod:`tomllib` into a frozen :class:`AgentConfig`.

Every key is optional; command-line flags override the file (see :meth:`AgentConfig.merged`)::

    bundle = "/opt/models/mobilenet-v2"     # bundle directory or .tar.gz (relative to this file)
    runtime_order = ["onnxruntime", "openvino", "litert", "coreml"]  # first installed runtime wins
    artifact = "onnx/int8"                  # force one artifact ("format/precision"); default: automatic
    threads = 2                             # inference threads (default: the runtime's own choice)
    verify = true                           # check the artifact's sha256 before loading it
    top_k = 5                               # classifier: how many classes to report
    source = "camera:0"                     # camera:N | folder:PATH | file:PATH | rtsp://... | http(s)://...

    [http]
    host = "127.0.0.1"                      # bind address (0.0.0.0 exposes the API to the network)
    port = 8080
    queue_size = 8                          # requests waiting for inference; beyond it the API answers 429
    max_body_bytes = 10485760               # larger request bodies are refused with 413

The same four HTTP keys are also accepted at top level (``host``, ``port``, ``queue_size``,
``max_body_bytes``). An unknown key or a value of the wrong type raises :class:`ConfigError` with one
line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.device_agent.agent import DEFAULT_RUNTIME_ORDER
from edge_sdk.device_agent.runtimes import RUNTIMES
from edge_sdk.errors import EdgeSDKError

__all__ = ["DEFAULT_RUNTIME_ORDER", "AgentConfig", "ConfigError", "load_config"]



class ConfigError(EdgeSDKError, ValueError):
    """The agent configuration file is unreadable or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one device agent (see the module docstring for the TOML keys)."""

    bundle: str | None = None
    runtime_order: tuple[str, ...] | None = None
    artifact: str | None = None
    threads: int | None = None
    verify: bool = True
    top_k: int = 5
    source: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    queue_size: int = 8
    max_body_bytes: int = 10 * 1024 * 1024

    def merged(self, **overrides: Any) -> AgentConfig:
        """A copy with every override that is not None applied (for command-line flags)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown agent setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "runtime_order" in values:
            values["runtime_order"] = tuple(values["runtime_order"])
        return dataclasses.replace(self, **values)


_HTTP_KEYS = ("host", "port", "queue_size", "max_body_bytes")


def _bad(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: key {key!r} {problem}")


def _int(path: Path, key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, key, f"must be an integer, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(path, key, f"must be {limit}, got {value}")
    return value


def _str(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, key, f"must be a non-empty string, got {type(value).__name__} {value!r}")
    return value.strip()


def _check(path: Path, key: str, value: Any) -> Any:
    """Validate one key's value; returns the value to store."""
    if key in ("bundle", "source", "host"):
        text = _str(path, key, value)
        if key == "source":
            from edge_sdk.device_agent.inputs import parse_source
            from edge_sdk.errors import InputError

            try:
                parse_source(text)
            except InputError as exc:
                raise _bad(path, key, f"is not a valid source ({exc})") from None
        return text
    if key == "artifact":
        text = _str(path, key, value)
        if text.count("/") != 1 or not all(text.split("/")):
            raise _bad(path, key, f"must be 'format/precision' such as 'onnx/int8', got {text!r}")
        return text
    if key == "runtime_order":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise _bad(path, key, f"must be a non-empty list of runtime names, got {value!r}")
        unknown = [v for v in value if v not in RUNTIMES]
        if unknown:
            raise _bad(path, key, f"names unknown runtime(s) {', '.join(unknown)}: choose from {', '.join(RUNTIMES)}")
        return tuple(dict.fromkeys(value))
    if key == "verify":
        if not isinstance(value, bool):
            raise _bad(path, key, f"must be true or false, got {value!r}")
        return value
    if key == "port":
        return _int(path, key, value, 0, 65535)
    if key in ("threads", "top_k", "queue_size", "max_body_bytes"):
        return _int(path, key, value, 1)
    raise AssertionError(key)  # pragma: no cover - callers pass known keys only


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read an agent TOML file; relative ``bundle`` and ``folder:``/``file:`` paths are resolved against it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found: check the --config path") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}): fix the syntax") from None
    known = {f.name for f in dataclasses.fields(AgentConfig)}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "http":
            if not isinstance(value, dict):
                raise _bad(path, "http", "must be a table ([http]) with host, port, queue_size, max_body_bytes")
            for sub, subval in value.items():
                if sub not in _HTTP_KEYS:
                    raise _bad(path, f"http.{sub}", f"is unknown: the [http] table takes {', '.join(_HTTP_KEYS)}")
                flat[sub] = _check_named(path, sub, f"http.{sub}", subval)
            continue
        if key not in known:
            raise _bad(path, key, f"is unknown: valid keys are {', '.join(sorted(known | {'http'}))}")
        flat[key] = _check(path, key, value)
    base = path.resolve().parent
    if flat.get("bundle") and not Path(flat["bundle"]).expanduser().is_absolute():
        flat["bundle"] = str(base / flat["bundle"])
    src = flat.get("source")
    if src and src.split(":", 1)[0] in ("folder", "file"):
        kind, _, rest = src.partition(":")
        if not Path(rest).expanduser().is_absolute():
            flat["source"] = f"{kind}:{base / rest}"
    return AgentConfig(**flat)


def _check_named(path: Path, key: str, shown: str, value: Any) -> Any:
    """:func:`_check` for ``key`` but with errors naming ``shown`` (e.g. ``http.port``)."""
    try:
        return _check(path, key, value)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"key {key!r}", f"key {shown!r}", 1)) from None
