"""Issue 13, HTTP authentication wired into the commands: ``edge-sdk agent run`` and ``edge-sdk collector run`` take
the same token/TLS flags (one shared parent parser), the agent's ``/feedback`` refused for want of a token is counted
in telemetry (never in accuracy), and the shipped Dockerfile's command serves only with its token.

Real processes on loopback, real HTTP; the collector runs against the machine's Mosquitto and a SQLite file.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_helpers import SYSTEM_BROKER, free_port, require_system_broker, unique_fleet

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    out = tmp_path_factory.mktemp("httpsec") / "bundle"
    edge_sdk.convert(make_tiny(), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", ort=False,
                     preprocessing=Preprocessing(size=(32, 32)), labels=[f"c{i}" for i in range(10)], out=out,
                     name="tiny", version="1", quiet=True)
    return out


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _request(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None,
             ctype: str = "image/png", host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": ctype} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})


def _wait_up(proc: subprocess.Popen[str], port: int, path: str = "/ping", timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _request(port, "GET", path)[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read() if proc.stderr else ""


def _refused_in_one_line(proc: subprocess.Popen[str], *words: str) -> str:
    try:
        out = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the command served instead of refusing")
    lines = out.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), out
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- agent run ------------------------------------------------------------------------------------------------

def test_agent_run_with_a_token_file_answers_only_requests_that_carry_it(bundle: Path, token_file: Path) -> None:
    port = free_port()
    proc = _cli("agent", "run", "--bundle", str(bundle), "--http", f"127.0.0.1:{port}",
                "--http-token-file", str(token_file), "--http-workers", "3")
    try:
        _wait_up(proc, port)
        assert _request(port, "GET", "/healthz")[0] == 200  # the health checks stay public
        status, headers, body = _request(port, "POST", "/predict", _png())
        assert status == 401 and "Bearer" in headers.get("WWW-Authenticate", ""), body
        assert "token" in json.loads(body)["error"]
        assert _request(port, "POST", "/predict", _png(), token="wrong-token-0123456789")[0] == 401
        assert _request(port, "GET", "/metrics")[0] == 401
        status, _, body = _request(port, "POST", "/predict", _png(), token=TOKEN)
        assert status == 200 and json.loads(body)["model_version"] == "tiny:1", body
        assert _request(port, "GET", "/metrics", token=TOKEN)[0] == 200
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert TOKEN not in err  # never logged


def test_agent_run_on_all_interfaces_without_a_token_exits_with_one_line(bundle: Path) -> None:
    port = free_port()
    line = _refused_in_one_line(_cli("agent", "run", "--bundle", str(bundle), "--http", f"0.0.0.0:{port}"),
                                "0.0.0.0", "--http-token-file", "--http-insecure")
    assert "refusing to serve" in line
    with socket.socket() as s:  # nothing was left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_agent_run_token_env_unset_exits_with_one_line_naming_it(bundle: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle), "--http",
                             f"0.0.0.0:{free_port()}", "--http-token-env", "EDGE_AGENT_TOKEN"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _refused_in_one_line(proc, "EDGE_AGENT_TOKEN")


def _dockerfile_cmd() -> list[str]:
    """The shipped Dockerfile's CMD (exec form)."""
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^CMD (\[.*\])\s*$", text, re.M)
    assert match, "the Dockerfile has no exec-form CMD"
    return json.loads(match.group(1))


def test_the_dockerfile_command_serves_all_interfaces_with_the_token_from_its_environment(bundle: Path) -> None:
    cmd = _dockerfile_cmd()
    assert cmd[:3] == ["edge-sdk", "agent", "run"] and "--http-token-env" in cmd
    port = free_port()
    args = [str(bundle) if a == "/bundle" else f"0.0.0.0:{port}" if a == "0.0.0.0:8080" else a for a in cmd[3:]]
    proc = _cli("agent", "run", *args, env={"EDGE_AGENT_TOKEN": TOKEN})
    try:
        _wait_up(proc, port)  # the HEALTHCHECK's /ping needs no token
        assert _request(port, "POST", "/predict", _png())[0] == 401
        assert _request(port, "POST", "/predict", _png(), token=TOKEN)[0] == 200
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err


# ---- /feedback refused for want of a token is counted, not in accuracy ------------------------------------------

@pytest.fixture()
def agent_with_telemetry(bundle: Path, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings

    agent = Agent(bundle, remember=10)
    settings = TelemetrySettings(fleet="f1", device="cam", outbox_path=str(tmp_path / "outbox.db"))
    with Outbox(settings.outbox_path) as outbox:
        tel = Telemetry.for_agent(agent, settings, outbox=outbox)
        try:
            yield agent, tel
        finally:
            agent.close()


def test_feedback_refused_for_a_missing_or_wrong_token_is_counted_not_in_accuracy(
        agent_with_telemetry: tuple[Any, Any]) -> None:
    from edge_sdk.device_agent.server import AgentServer
    from edge_sdk.httpbase import HTTPSecurity

    agent, tel = agent_with_telemetry
    server = AgentServer(agent, "127.0.0.1", 0, security=HTTPSecurity(token=TOKEN))
    port = server.start()
    try:
        status, _, body = _request(port, "POST", "/predict", _png(), token=TOKEN)
        pred = json.loads(body)
        fb = json.dumps({"prediction_id": pred["id"], "label": pred["class"]}).encode()
        assert _request(port, "POST", "/feedback", fb, ctype="application/json")[0] == 401
        assert _request(port, "POST", "/feedback", fb, token="wrong-token-0123456789",
                        ctype="application/json")[0] == 401
        assert _request(port, "POST", "/predict", _png())[0] == 401  # a refused predict is not feedback
        status, _, body = _request(port, "POST", "/feedback", fb, token=TOKEN, ctype="application/json")
        assert status == 200 and json.loads(body)["correct"] is True, body
        window = tel.emit_window()
    finally:
        server.shutdown()
    assert window["feedback"] == {"labelled": 1, "correct": 1, "unknown_id": 0, "rejected": 2}, window["feedback"]


def _non_loopback_ipv4() -> str | None:
    """This machine's address on its outgoing interface (a UDP connect sends no packet, it only picks a route)."""
    for probe in ("203.0.113.1", "10.255.255.254"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((probe, 9))
            except OSError:
                continue
            addr = s.getsockname()[0]
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    return None


def test_feedback_refused_from_another_host_without_a_token_is_counted(
        agent_with_telemetry: tuple[Any, Any]) -> None:
    """No token configured (served open with allow_insecure): /feedback from a non-loopback client is a 403."""
    from edge_sdk.device_agent.server import AgentServer
    from edge_sdk.httpbase import HTTPSecurity

    addr = _non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    agent, tel = agent_with_telemetry
    server = AgentServer(agent, "0.0.0.0", 0, security=HTTPSecurity(allow_insecure=True))
    port = server.start()
    try:
        pred = json.loads(_request(port, "POST", "/predict", _png(), host=addr)[2])
        fb = json.dumps({"prediction_id": pred["id"], "label": pred["class"]}).encode()
        assert _request(port, "POST", "/feedback", fb, ctype="application/json", host=addr)[0] == 403
        assert _request(port, "POST", "/feedback", fb, ctype="application/json")[0] == 200  # loopback: accepted
        window = tel.emit_window()
    finally:
        server.shutdown()
    assert window["feedback"] == {"labelled": 1, "correct": 1, "unknown_id": 0, "rejected": 1}, window["feedback"]


# ---- collector run ----------------------------------------------------------------------------------------------

def _collector(tmp_path: Path, listen: str, *extra: str) -> subprocess.Popen[str]:
    fleet = unique_fleet("httpsec")
    return _cli("collector", "run", "--db", f"sqlite:///{tmp_path / 'fleet.db'}", "--mqtt", SYSTEM_BROKER,
                "--fleet", fleet, "--client-id", f"col-{fleet}", "--no-shared", "--session-expiry", "0",
                "--http", listen, *extra)


def test_collector_run_with_a_token_file_answers_only_requests_that_carry_it(tmp_path: Path,
                                                                             token_file: Path) -> None:
    require_system_broker()
    port = free_port()
    proc = _collector(tmp_path, f"127.0.0.1:{port}", "--http-token-file", str(token_file), "--http-workers", "2")
    try:
        _wait_up(proc, port, "/healthz")
        status, headers, _ = _request(port, "GET", "/metrics")
        assert status == 401 and "Bearer" in headers.get("WWW-Authenticate", "")
        assert _request(port, "GET", "/api/dead_letters")[0] == 401
        assert _request(port, "GET", "/metrics", token=TOKEN)[0] == 200
    finally:
        err = _stop(proc)
    assert TOKEN not in err


def test_collector_run_on_all_interfaces_without_a_token_exits_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    _refused_in_one_line(_collector(tmp_path, f"0.0.0.0:{port}"), "0.0.0.0", "--http-token-file")
    assert not (tmp_path / "fleet.db").exists()  # refused before the database was opened
