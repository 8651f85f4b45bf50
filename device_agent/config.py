"""The device agent's configuration file (TOML), read by :func:`edge_sdk.tomlfile.read_toml` into AgentConfig.

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
    workers = 12                            # HTTP threads (default queue_size + 4); idle sockets hold none
    token_file = "/etc/edge-sdk/http.token" # bearer token guarding every route but /ping and /healthz
    # token_env = "EDGE_AGENT_TOKEN"        # ... or read from this environment variable (not both)
    tls_cert = "/etc/edge-sdk/agent.crt"    # HTTPS (both PEM files): stdlib ssl, TLS 1.2+
    tls_key = "/etc/edge-sdk/agent.key"
    insecure = false                        # true: serve a non-loopback host without a token (refused otherwise)

    [telemetry]                             # present (or [mqtt] present): telemetry is on unless enabled = false
    enabled = true
    window_s = 10                           # one window of aggregates every 10 s (emitted even when idle)
    fleet = "default"                       # ids: 1-64 characters of A-Z a-z 0-9 _ . -
    device = "cam-17"                       # default: this host's name
    outbox = "/var/lib/edge-sdk/outbox.db"  # SQLite file holding windows until the broker acknowledges them
    input_sample_every = 1                  # every n-th input enters the drift statistics

    [mqtt]
    url = "mqtts://broker.example:8883"     # mqtt://host[:1883] or mqtts://host[:8883] (TLS)
    client_id = "edge-default-cam-17"       # default edge-<fleet>-<device>
    username = "cam-17"
    password_file = "/etc/edge-sdk/mqtt.pw"  # or password = "..." (not both)
    ca_file = "/etc/edge-sdk/ca.crt"        # CA bundle to verify the broker; cert_file / key_file: client certificate
    tls_insecure = false                    # true skips the broker host name check (testing only)
    keepalive = 30
    session_expiry_s = 604800               # the broker keeps the session (and QoS 1 messages) this long
    max_inflight = 100                      # unacknowledged publishes at a time

    [capture]                               # data capture (off unless this table is present; see capture.py)
    sample_rate = 0.01                      # policies: random fraction, low_confidence = 0.5, drift = true,
    feedback_disagree = true                #   feedback_disagree = true (at least one)
    upload_url = "https://collector:8000"   # the collector's HTTP; token_file = "..." (its bearer token)
    max_bytes = 268435456                   # on-device cap (the oldest samples are dropped beyond it)

The same four HTTP keys are also accepted at top level (``host``, ``port``, ``queue_size``,
``max_body_bytes``); the token, TLS, ``workers`` and ``insecure`` keys only in ``[http]``. The token itself is
never a value in this file (nor a command-line flag): ``token_file`` or ``token_env``. Relative paths
(``outbox``, ``password_file``, ``ca_file``, ``cert_file``, ``key_file``, ``token_file``, ``tls_cert``,
``tls_key``) are resolved against the config file. An unknown key or a value of the wrong type raises
:class:`ConfigError` with one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.device_agent.agent import DEFAULT_RUNTIME_ORDER
from edge_sdk.device_agent.capture import CAPTURE_KEYS, CaptureSettings
from edge_sdk.device_agent.telemetry import TelemetrySettings
from edge_sdk.errors import ConfigError, TelemetryError
from edge_sdk.httpbase import HTTPSecurity
from edge_sdk.mqtt import parse_mqtt_url
from edge_sdk.runtimes import RUNTIMES
from edge_sdk.tomlfile import read_toml
from edge_sdk.topics import validate_id

__all__ = ["DEFAULT_RUNTIME_ORDER", "MQTT_KEYS", "TELEMETRY_KEYS", "AgentConfig", "ConfigError", "load_config"]

TELEMETRY_KEYS = ("enabled", "window_s", "fleet", "device", "outbox", "input_sample_every")
MQTT_KEYS = ("url", "client_id", "username", "password", "password_file", "ca_file", "cert_file", "key_file",
             "tls_insecure", "keepalive", "session_expiry_s", "max_inflight")


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
    http_workers: int | None = None
    http_token_file: str | None = None
    http_token_env: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    http_insecure: bool = False
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    mqtt: dict[str, Any] | None = field(default=None, repr=False)  # MqttSettings keywords but fleet and device
    capture: CaptureSettings = field(default_factory=CaptureSettings)

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

    def http_security(self) -> HTTPSecurity:
        """The HTTP token (read now from its file or environment variable) and TLS settings; ConfigError."""
        return HTTPSecurity.load(token_file=self.http_token_file, token_env=self.http_token_env,
                                 tls_cert=self.tls_cert, tls_key=self.tls_key, allow_insecure=self.http_insecure)

    def with_telemetry(self, *, fleet: str | None = None, device: str | None = None, mqtt_url: str | None = None,
                       window_s: float | None = None, outbox: str | None = None) -> AgentConfig:
        """A copy with these telemetry settings overridden (command-line flags); any one given enables telemetry.

        Raises :class:`ConfigError` for a bad id, URL or window length.
        """
        given = {"fleet": fleet, "device": device, "window_s": window_s, "outbox_path": outbox}
        values: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if not values and mqtt_url is None:
            return self
        mqtt = self.mqtt
        if mqtt_url is not None:
            _mqtt_url(mqtt_url, "--mqtt")
            mqtt = {**(mqtt or {}), "url": mqtt_url}
        try:
            tel = dataclasses.replace(self.telemetry, enabled=True, **values)
        except TelemetryError as exc:
            raise ConfigError(f"telemetry setting: {exc}") from None
        return dataclasses.replace(self, telemetry=tel, mqtt=mqtt)

    def telemetry_settings(self) -> TelemetrySettings:
        """The telemetry settings with ``mqtt`` built (an ``MqttSettings`` when a broker URL is configured).

        Building ``MqttSettings`` imports the MQTT publisher (paho-mqtt, extra ``agent``).
        """
        tel = self.telemetry
        if not tel.enabled or not self.mqtt or not self.mqtt.get("url"):
            return tel
        from edge_sdk.device_agent.mqtt_publisher import MqttSettings

        try:
            mqtt = MqttSettings(fleet=tel.fleet, device=tel.device, **self.mqtt)
        except (TypeError, ValueError, TelemetryError) as exc:
            raise ConfigError(f"[mqtt] settings are not valid ({exc}): fix the [mqtt] table or --mqtt") from None
        return dataclasses.replace(tel, mqtt=mqtt)


_HTTP_KEYS = ("host", "port", "queue_size", "max_body_bytes", "workers", "token_file", "token_env", "tls_cert",
              "tls_key", "insecure")
#: [http] keys stored under another AgentConfig field name
_HTTP_FIELDS = {"workers": "http_workers", "token_file": "http_token_file", "token_env": "http_token_env",
                "insecure": "http_insecure"}


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


def _mqtt_url(value: str, shown: str) -> str:
    parse_mqtt_url(value, where=shown)  # checked here, so a bad URL names the flag or the file and key
    return value


def _bool(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, key, f"must be true or false, got {value!r}")
    return value


def _path(path: Path, key: str, value: Any) -> Path:
    """A path value, ``~`` expanded, relative ones resolved against the config file's directory."""
    p = Path(_str(path, key, value)).expanduser()
    return p if p.is_absolute() else path.resolve().parent / p


def _file(path: Path, key: str, value: Any) -> str:
    p = _path(path, key, value)
    if not p.is_file():
        raise _bad(path, key, f"names {p}, which is not a readable file")
    return str(p)


def _table_items(path: Path, section: str, table: Any, keys: Sequence[str]) -> Iterator[tuple[str, str, Any]]:
    """(key, "section.key", value) of a validated ``[section]`` table: a table, every key one of ``keys``."""
    if not isinstance(table, dict):
        raise _bad(path, section, f"must be a table ([{section}]) with {', '.join(keys)}")
    for key, value in table.items():
        name = f"{section}.{key}"
        if key not in keys:
            raise _bad(path, name, f"is unknown: the [{section}] table takes {', '.join(keys)}")
        yield key, name, value


def _telemetry_table(path: Path, table: Any) -> dict[str, Any]:
    """Validated [telemetry] keys as TelemetrySettings keywords."""
    out: dict[str, Any] = {}
    for key, name, value in _table_items(path, "telemetry", table, TELEMETRY_KEYS):
        if key == "enabled":
            out["enabled"] = _bool(path, name, value)
        elif key == "window_s":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.05 <= value <= 86400:
                raise _bad(path, name, f"must be a number of seconds between 0.05 and 86400, got {value!r}")
            out["window_s"] = float(value)
        elif key in ("fleet", "device"):
            try:
                out[key] = validate_id(value, key)
            except ValueError as exc:
                raise _bad(path, name, str(exc).replace(f"{key} {value!r} ", "")) from None
        elif key == "outbox":
            out["outbox_path"] = str(_path(path, name, value))
        else:
            out["input_sample_every"] = _int(path, name, value, 1)
    return out


def _capture_table(path: Path, table: Any) -> CaptureSettings:
    """Validated [capture] keys (present: capture on unless ``enabled = false``)."""
    out: dict[str, Any] = {"enabled": True}
    for key, name, value in _table_items(path, "capture", table, CAPTURE_KEYS):
        if key in ("enabled", "drift", "feedback_disagree"):
            out[key] = _bool(path, name, value)
        elif key in ("sample_rate", "low_confidence", "drift_psi", "upload_interval_s"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _bad(path, name, f"must be a number, got {value!r}")
            out[key] = float(value)
        elif key == "dir":
            out[key] = str(_path(path, name, value))
        elif key in ("token_file", "ca_file"):
            out[key] = _file(path, name, value)
        elif key == "upload_url":
            out[key] = _str(path, name, value)
        else:
            out[key] = _int(path, name, value, 1)
    try:
        return CaptureSettings(**out)
    except ConfigError as exc:
        raise ConfigError(f"{path}: [capture] {exc}") from None


def _mqtt_table(path: Path, table: Any) -> dict[str, Any]:
    """Validated [mqtt] keys as MqttSettings keywords (password_file read into password)."""
    out: dict[str, Any] = {}
    for key, name, value in _table_items(path, "mqtt", table, MQTT_KEYS):
        if key == "url":
            out[key] = _mqtt_url(_str(path, name, value), f"{path}: key {name!r}")
        elif key in ("client_id", "username"):
            out[key] = _str(path, name, value)
        elif key == "password":
            if not isinstance(value, str):
                raise _bad(path, name, f"must be a string, got {type(value).__name__}")
            out[key] = value
        elif key == "password_file":
            if "password" in table:
                raise _bad(path, name, "and 'mqtt.password' are both set: keep one")
            file = _file(path, name, value)
            try:
                out["password"] = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise _bad(path, name, f"cannot be read ({exc})") from None
        elif key in ("ca_file", "cert_file", "key_file"):
            out[key] = _file(path, name, value)
        elif key == "tls_insecure":
            out[key] = _bool(path, name, value)
        elif key == "keepalive":
            out[key] = _int(path, name, value, 5, 65535)
        elif key == "session_expiry_s":
            out[key] = _int(path, name, value, 0, 2**32 - 1)
        else:
            out[key] = _int(path, name, value, 1, 65535)
    if "url" not in out:
        raise _bad(path, "mqtt.url", "is missing: the [mqtt] table needs url = \"mqtt://host:1883\"")
    return out


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
    data = read_toml(path, kind="config file", missing_hint="check the --config path")
    known = {f.name for f in dataclasses.fields(AgentConfig)} - {"telemetry", "mqtt", "capture",
                                                                *_HTTP_FIELDS.values(), "tls_cert", "tls_key"}
    flat: dict[str, Any] = {}
    tel_keys = _telemetry_table(path, data["telemetry"]) if "telemetry" in data else None
    mqtt = _mqtt_table(path, data["mqtt"]) if "mqtt" in data else None
    if tel_keys is not None or mqtt is not None:
        tel_keys = {"enabled": True, **(tel_keys or {})}
        flat["telemetry"] = TelemetrySettings(**tel_keys)
        flat["mqtt"] = mqtt
    if "capture" in data:
        flat["capture"] = _capture_table(path, data["capture"])
    for key, value in data.items():
        if key in ("telemetry", "mqtt", "capture"):
            continue
        if key == "http":
            if isinstance(value, dict) and ({"token", "password"} & value.keys()):
                sub = "token" if "token" in value else "password"
                raise _bad(path, f"http.{sub}", "is not accepted: keep the token out of the config file, in "
                           'token_file = "<file>" or token_env = "<VARIABLE>"')
            for sub, _name, subval in _table_items(path, "http", value, _HTTP_KEYS):
                flat[_HTTP_FIELDS.get(sub, sub)] = _http_key(path, sub, subval, value)
            continue
        if key not in known:
            valid = ", ".join(sorted(known | {"http", "telemetry", "mqtt", "capture"}))
            raise _bad(path, key, f"is unknown: valid keys are {valid}")
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


def _http_key(path: Path, key: str, value: Any, table: dict[str, Any]) -> Any:
    """One validated [http] value."""
    name = f"http.{key}"
    if key in ("token_file", "tls_cert", "tls_key"):
        if key == "token_file" and "token_env" in table:
            raise _bad(path, name, "and 'http.token_env' are both set: keep one")
        return _file(path, name, value)
    if key == "token_env":
        return _str(path, name, value)
    if key == "insecure":
        return _bool(path, name, value)
    if key == "workers":
        return _int(path, name, value, 1, 256)
    return _check_named(path, key, name, value)


def _check_named(path: Path, key: str, shown: str, value: Any) -> Any:
    """:func:`_check` for ``key`` but with errors naming ``shown`` (e.g. ``http.port``)."""
    try:
        return _check(path, key, value)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"key {key!r}", f"key {shown!r}", 1)) from None
