"""The shared infrastructure of issue 12: one MQTT URL parser (same accepted set everywhere), one TOML reader,
one exception tree, one first_line."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from edge_sdk import errors
from edge_sdk.errors import CollectorError, CommandPublishError, ConfigError, EdgeSDKError, TelemetryError, first_line
from edge_sdk.mqtt import SCHEMES, parse_mqtt_url, tls_context
from edge_sdk.tomlfile import read_toml

GOOD = {
    "mqtt://h": ("h", 1883, False, None, None),
    "tcp://h:1999": ("h", 1999, False, None, None),
    "mqtts://broker.example": ("broker.example", 8883, True, None, None),
    "ssl://b:9000": ("b", 9000, True, None, None),
    "MQTT://u:p%40ss@H:1/": ("h", 1, False, "u", "p@ss"),
    "mqtt://[::1]:1883": ("::1", 1883, False, None, None),
}
BAD = {
    "http://x": "scheme http://",
    "ws://h:9001": "WebSockets",
    "wss://h": "WebSockets",
    "localhost:1883": "scheme",
    "mqtt://": "no host",
    "mqtt://h:70000": "bad port",
    "mqtt://h:x": "bad port",
    "mqtt://h/topic": "path",
    "mqtt://h?x=1": "path, query",
    "": "not a URL",
}


@pytest.mark.parametrize(("url", "expected"), GOOD.items())
def test_accepted_urls(url: str, expected: tuple) -> None:
    u = parse_mqtt_url(url)
    assert (u.host, u.port, u.tls, u.username, u.password) == expected


@pytest.mark.parametrize(("url", "reason"), BAD.items())
def test_bad_urls_give_one_line_errors(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mqtt_url(url, where="--mqtt")
    msg = str(info.value)
    assert reason in msg and msg.startswith("--mqtt: ") and "mqtt://host:1883" in msg and "\n" not in msg


def _accepts_everywhere(url: str) -> dict[str, bool]:
    """Whether each component takes ``url``: the agent config flag, the device settings, the collector and
    the deploy publisher (the last two stop right after parsing: no database, no broker reached)."""
    from edge_sdk.device_agent.config import AgentConfig
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings
    from edge_sdk.fleet.collector.service import Collector
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher

    out = {}
    try:
        AgentConfig().with_telemetry(mqtt_url=url)
        out["config"] = True
    except ConfigError:
        out["config"] = False
    try:
        MqttSettings(url, "f", "d")
        out["device"] = True
    except TelemetryError:
        out["device"] = False
    try:  # a good URL fails on the missing CA file checked right after it (no database opened, no broker)
        Collector("sqlite:///nowhere/x.db", url, ca_file="/nowhere/ca.pem")
    except CollectorError as exc:
        out["collector"] = "--ca-file" in str(exc)
    with socket.socket() as s:  # a closed port: a good URL fails to connect, a bad one fails to parse
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        MqttCommandPublisher(url.replace("h:1883", f"127.0.0.1:{port}"), timeout=0.5)
    except CommandPublishError as exc:
        out["deploy"] = "unsupported MQTT URL" not in str(exc)
    return out


@pytest.mark.parametrize("url", ["mqtt://h:1883", "tcp://h:1883", "mqtts://h:1883", "ssl://h:1883", "ws://h:1883",
                                 "http://h:1883", "mqtt://h:1883/x"])
def test_the_same_urls_are_accepted_everywhere(url: str) -> None:
    pytest.importorskip("paho.mqtt")
    seen = _accepts_everywhere(url)
    expected = url.split("://")[0] in SCHEMES and not url.endswith("/x")
    assert seen == dict.fromkeys(("config", "device", "collector", "deploy"), expected), seen


def test_tls_context_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match=r"ca_file .* does not exist"):
        tls_context(str(tmp_path / "nope.pem"), error=TelemetryError)
    assert tls_context(insecure=True).check_hostname is False


@pytest.mark.parametrize(("text", "needle"), [
    ("a = 1\nthreads = \n", "line 2 (threads =): not valid TOML"),
    ("[drift\n", "line 1 ([drift): not valid TOML"),
    ('a = "x\n', "line 1 (a = \"x): not valid TOML"),
    ("a = 1\na = 2\n", "line 2 (a = 2): not valid TOML"),
])
def test_toml_syntax_errors_name_file_line_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_toml(path, kind="rules file")
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg and "fix the syntax" in msg, msg


def test_toml_file_errors(tmp_path: Path) -> None:
    assert read_toml(_write(tmp_path / "ok.toml", b"[t]\nk = 1\n")) == {"t": {"k": 1}}
    with pytest.raises(ConfigError, match="rules file not found: check --rules"):
        read_toml(tmp_path / "none.toml", kind="rules file", missing_hint="check --rules")
    with pytest.raises(ConfigError, match="is a directory"):
        read_toml(tmp_path)
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_toml(_write(tmp_path / "latin.toml", b'a = "\xe9"\n'))
    with pytest.raises(errors.TargetProfileError, match="not found"):
        read_toml(tmp_path / "none.toml", error=errors.TargetProfileError)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_one_exception_tree() -> None:
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert len(classes) == len(errors.__all__) - 1 and all(issubclass(c, EdgeSDKError) for c in classes)
    # the modules that used to define them re-export the very same class
    from edge_sdk.device_agent.config import ConfigError as agent_config_error
    from edge_sdk.fleet.collector.alerts import ConfigError as rules_config_error
    from edge_sdk.fleet.lifecycle.bundle_server import RangeNotSatisfiable
    from edge_sdk.targets.profiles import TargetProfileError

    assert agent_config_error is rules_config_error is ConfigError and issubclass(TargetProfileError, ConfigError)
    assert issubclass(RangeNotSatisfiable, errors.HTTPError)
    for cls in classes:  # every class is drawn in the module docstring's tree
        assert f" {cls.__name__} " in errors.__doc__ or f" {cls.__name__}\n" in errors.__doc__, cls


def test_first_line() -> None:
    assert first_line(FileNotFoundError(2, "No such file or directory", "/x")) == "No such file or directory: /x"
    assert first_line(ValueError("a\n  b")) == "a" and first_line(ValueError()) == "ValueError"
    ov = RuntimeError("Exception from src/core.cpp:9:\nCheck 'x' failed at y:\nFrontEnd failed\nir: cannot open")
    assert first_line(ov, skip=("Exception from", "Check '")) == "FrontEnd failed; ir: cannot open"
    assert first_line("x" * 300) == "x" * 240


def test_http_base_answers_a_route_bug_with_one_line_500() -> None:
    from edge_sdk.httpbase import RequestHandler, base_url, bind

    class Handler(RequestHandler):
        def handle_request(self) -> None:
            if self.route() == "/boom":
                raise RuntimeError("deep\ninside")
            self.send_json(200, {"body": self.read_body(8).decode()})

    httpd = bind("127.0.0.1", 0, Handler, None)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = base_url("0.0.0.0", httpd.server_address[1])
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}/boom", timeout=5)
        body = info.value.read().decode()
        assert info.value.code == 500 and "RuntimeError: deep)" in body and "\\n" not in body
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(f"{url}/x", data=b"123456789"), timeout=5)
        assert info.value.code == 413
        ok = urllib.request.urlopen(urllib.request.Request(f"{url}/x", data=b"hi"), timeout=5)
        assert ok.read() == b'{"body":"hi"}'
    finally:
        httpd.shutdown()
        httpd.server_close()
