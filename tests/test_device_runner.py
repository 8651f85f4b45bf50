"""Issue 12, item 1: one device runner. `edge-sdk agent run` and the simulated test fleet both drive
:class:`edge_sdk.device_agent.runner.DeviceRunner` with the same switch policy (``swap``); proved by behaviour (real
processes, real broker, real signed bundles served over HTTP), not by reading the source:

- the CLI process builds a DeviceRunner and serves HTTP from the runner's server; an over-the-air update sent to
  it over MQTT is swapped in place: the same process (no re-execution: its HTTP uptime keeps counting) answers
  ``/predict`` with the new version, and requests sent all through the switch are answered by v1 then v2, never
  refused or dropped;
- ``--on-switch restart`` still re-executes the process on the new model (same pid, new start-up);
- a test-fleet device is a DeviceRunner: an update hot-swaps the model in place and the runner's
  ``model.loaded`` event reaches the broker for both versions.

Updates from MQTT are accepted only as http(s) URLs with ``size_bytes`` (issue 13), so the archives are served by a
local HTTP file server here.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_helpers import SYSTEM_BROKER, Subscriber, free_port, require_system_broker, unique_fleet, wait_until
from ota_helpers import LoopbackServer, serving

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.device_agent.config import AgentConfig, ConfigError
from edge_sdk.device_agent.runner import DeviceRunner, RunnerConfig

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")


class Material:
    """A key pair and two signed tiny bundles (tiny:1, tiny:2) as archives."""

    def __init__(self, root: Path) -> None:
        from tiny_models import make_tiny

        import edge_sdk
        from edge_sdk.preprocessing import Preprocessing
        from edge_sdk.signing import generate_keypair, sign_bundle

        key, self.pub = generate_keypair(root / "keys", "release")
        self.archives: dict[str, Path] = {}
        for seed, version in ((0, "1"), (1, "2")):
            val = np.random.default_rng(100 + seed).random((8, 3, 32, 32), dtype=np.float32)
            d = root / f"v{version}"
            edge_sdk.convert(make_tiny(seed), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", ort=False,
                             val=val, preprocessing=Preprocessing(size=(32, 32)), out=d, name="tiny", version=version,
                             quiet=True)
            sign_bundle(d, key)
            self.archives[version] = Bundle.load(d).archive(root / f"tiny-{version}.tar.gz")

        self.www = root

    def update_command(self, version: str, server: FileServer) -> bytes:
        """A ``cmd/update`` as the rollout sends it: an http URL with the archive's sha256 and size."""
        path = self.archives[version]
        return json.dumps({"schema": "edge-sdk/command", "schema_version": "1.0", "command": "update",
                           "command_id": uuid.uuid4().hex, "ts": time.time(), "expires_at": time.time() + 3600,
                           "deployment_id": f"dep-{version}", "model": {
                               "url": server.url(path.name), "sha256": sha256_file(path),
                               "size_bytes": path.stat().st_size, "name": "tiny", "version": version}}).encode()


class FileServer(LoopbackServer):
    """The archives over plain HTTP on loopback (SimpleHTTPRequestHandler sends Content-Length)."""

    def __init__(self, root: Path) -> None:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(functools.partial(Quiet, directory=str(root)))


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("runner_material"))


@pytest.fixture()
def files(material: Material) -> Iterator[FileServer]:
    with serving(FileServer(material.www)) as srv:
        yield srv


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def test_swap_is_the_default_and_follows_http_and_sources() -> None:
    """The HTTP server and the input source follow the runner's current agent: swap is accepted with both."""
    cfg = RunnerConfig(agent=AgentConfig(bundle="b", source="folder:/tmp"), serve_http=True, store="s")
    assert cfg.on_switch == "swap"
    assert cfg.replace(on_switch="restart").on_switch == "restart"
    with pytest.raises(ConfigError, match="choose from swap, restart") as exc:
        RunnerConfig(on_switch="reload")
    assert "\n" not in str(exc.value)


# the CLI, run as a real process, with DeviceRunner.start wrapped to say which object serves which port
_CLI = """
import sys
from edge_sdk.device_agent.runner import DeviceRunner
start = DeviceRunner.start
def traced(self):
    out = start(self)
    print("RUNNER", type(self).__name__, self.config.on_switch, self.server.port, file=sys.stderr, flush=True)
    return out
DeviceRunner.start = traced
from edge_sdk.cli import main
sys.argv = ["edge-sdk", *sys.argv[1:]]
sys.exit(main(sys.argv[1:]))
"""


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Hammer:
    """POST /predict back to back from one thread; records (time, model_version or the error) of every request."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/predict"
        self.results: list[tuple[float, str | None, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body, k = _png(0), 0
        while not self.stop.is_set():
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "image/png"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    self.results.append((time.monotonic(), json.load(r)["model_version"], None))
            except urllib.error.HTTPError as exc:
                self.results.append((time.monotonic(), None, f"HTTP {exc.code}: {exc.read()[:200]!r}"))
            except OSError as exc:
                self.results.append((time.monotonic(), None, f"{type(exc).__name__}: {exc}"))
            k += 1

    def versions(self) -> list[str | None]:
        return [v for _, v, _ in self.results]

    def errors(self) -> list[str]:
        return [e for _, _, e in self.results if e is not None]


class AgentCli:
    """``edge-sdk agent run`` as a real process on bundle v1 (HTTP + MQTT), its log, and a subscriber to its
    topics; started by :func:`agent_cli`."""

    def __init__(self, fleet: str, port: int, log: Path, sub: Subscriber, publish: Any,
                 proc: subprocess.Popen) -> None:
        self.fleet, self.port, self.log, self.sub, self.publish, self.proc = fleet, port, log, sub, publish, proc
        self.health = f"http://127.0.0.1:{port}/healthz"

    def update_to(self, version: str, material: Material, files: FileServer) -> None:
        self.publish(f"edge/{self.fleet}/cam1/cmd/update", material.update_command(version, files), True)

    def assert_switched_once_to_v2(self) -> None:
        assert wait_until(lambda: [e["data"]["version"] for e in _events(self.sub, "model.loaded")] == ["1", "2"],
                          20), _events(self.sub, "model.loaded")
        assert [e["data"]["to"] for e in _events(self.sub, "update.switched")] == ["tiny:2"]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0, self.log.read_text()


@contextlib.contextmanager
def agent_cli(material: Material, tmp_path: Path, name: str, *extra: str) -> Iterator[AgentCli]:
    """Start the agent on v1, wait until it serves and reports status; kill it and clear retained topics after."""
    require_system_broker()
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher

    fleet, port = unique_fleet(name), free_port()
    log = tmp_path / "agent.log"
    args = ["agent", "run", "--model-store", str(tmp_path / "store"), "--bundle", str(material.archives["1"]),
            "--trusted-keys", str(material.pub), "--http", f"127.0.0.1:{port}", "--mqtt", SYSTEM_BROKER,
            "--fleet", fleet, "--device", "cam1", "--window", "0.5", "--outbox", str(tmp_path / "outbox.db"), *extra]
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/cam1/#") as sub, \
            MqttCommandPublisher(SYSTEM_BROKER, timeout=5.0) as publish, open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CLI, *args], stderr=err, stdout=subprocess.DEVNULL,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        agent = AgentCli(fleet, port, log, sub, publish, proc)
        try:
            assert wait_until(lambda: (_get(agent.health) or {}).get("model_version") == "tiny:1", 90, 0.2), \
                log.read_text()
            policy = extra[extra.index("--on-switch") + 1] if "--on-switch" in extra else "swap"
            assert f"RUNNER DeviceRunner {policy} {port}" in log.read_text()  # the CLI's server is the runner's
            assert wait_until(lambda: any(m.topic.endswith("/status") and m.payload for m in sub.received()), 20)
            yield agent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for topic in (f"edge/{fleet}/cam1/cmd/update", f"edge/{fleet}/cam1/status"):
                publish(topic, b"", True)


def test_agent_run_swaps_an_ota_update_in_place_without_an_http_outage(material: Material, files: FileServer,
                                                                        tmp_path: Path) -> None:
    with agent_cli(material, tmp_path, "runnerswap") as agent:
        hammer = Hammer(agent.port)
        try:
            hammer.thread.start()
            assert wait_until(lambda: len(hammer.results) >= 5, 30), hammer.results
            up_before, t_before = _get(agent.health)["uptime_s"], time.monotonic()  # type: ignore[index]
            agent.update_to("2", material, files)
            assert wait_until(lambda: "tiny:2" in hammer.versions(), 90, 0.2), \
                (hammer.errors(), agent.log.read_text())
            n = len(hammer.results)
            assert wait_until(lambda: len(hammer.results) >= n + 5, 30)  # and it keeps answering on v2
            hammer.stop.set()
            hammer.thread.join(35)
            after = _get(agent.health)
            assert after is not None and after["model_version"] == "tiny:2"
            # the same process and the same server: a re-executed process would have restarted its uptime
            assert agent.proc.poll() is None
            assert after["uptime_s"] >= up_before + (time.monotonic() - t_before) - 1.0, (up_before, after)
            agent.assert_switched_once_to_v2()
            agent.terminate()
        finally:
            hammer.stop.set()
    # every request through the switch was answered, by v1 then by v2 (never refused, dropped or reset)
    versions = hammer.versions()
    assert hammer.errors() == [], hammer.errors()[:5]
    first_v2 = versions.index("tiny:2")
    assert set(versions[:first_v2]) == {"tiny:1"} and set(versions[first_v2:]) == {"tiny:2"}, versions
    times = [t for t, _, _ in hammer.results]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 10.0, max(gaps)  # no outage: at worst one request waits for the agent assignment
    text = agent.log.read_text()
    assert "agent: switched to tiny:2" in text and "restarting" not in text, text
    assert text.count("RUNNER DeviceRunner") == 1, text


def test_agent_run_on_switch_restart_re_executes_on_an_ota_update(material: Material, files: FileServer,
                                                                  tmp_path: Path) -> None:
    with agent_cli(material, tmp_path, "runner", "--on-switch", "restart") as agent:
        agent.update_to("2", material, files)
        # the runner stops, re-executes the same process (same pid) and serves the new model on the same port
        assert wait_until(lambda: (_get(agent.health) or {}).get("model_version") == "tiny:2", 90, 0.2), \
            agent.log.read_text()
        assert agent.proc.poll() is None
        agent.assert_switched_once_to_v2()
        agent.terminate()
    text = agent.log.read_text()
    assert "agent: model switched; restarting on it" in text and text.count("RUNNER DeviceRunner") == 1, text


def _events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [p for p in (m.json() for m in sub.received() if m.topic.endswith("/events")) if p["kind"] == kind]


def test_a_test_fleet_device_is_a_device_runner_that_hot_swaps(material: Material, files: FileServer,
                                                              tmp_path: Path) -> None:
    require_system_broker()
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher
    from edge_sdk.testing.agent_fleet import FleetDevice, FleetSpec

    fleet = unique_fleet("runnerfleet")
    spec = FleetSpec(fleet=fleet, mqtt_url=SYSTEM_BROKER, store_root=str(tmp_path), trusted_keys=[str(material.pub)],
                     initial_bundle=str(material.archives["1"]), inputs_path="", window_s=0.5, rate_hz=20.0,
                     session_expiry_s=0)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/dev000/#") as sub:
        dev = FleetDevice("dev000", spec, images, None)
        assert isinstance(dev, DeviceRunner) and dev.config.on_switch == "swap"
        try:
            dev.start()
            assert wait_until(lambda: dev.subscribed, 20)
            assert wait_until(lambda: dev.inferences.get("1", 0) >= 5, 20)
            first = dev.agent
            with MqttCommandPublisher(SYSTEM_BROKER, timeout=5.0) as publish:
                publish(f"edge/{fleet}/dev000/cmd/update", material.update_command("2", files), True)
                assert wait_until(lambda: dev.versions_run == ["1", "2"], 60), dev.report()
                publish(f"edge/{fleet}/dev000/cmd/update", b"", True)
            assert dev.agent is not first and dev.agent.model_version == "tiny:2"  # swapped in place, same process
            assert wait_until(lambda: dev.inferences.get("2", 0) >= 5, 20)
            assert wait_until(lambda: {m.json()["model"]["version"] for m in sub.received()
                                       if m.topic.endswith("/telemetry")} == {"1", "2"}, 20)
        finally:
            dev.stop()
            with MqttCommandPublisher(SYSTEM_BROKER, timeout=5.0) as publish:
                publish(f"edge/{fleet}/dev000/status", b"", True)
        loaded = [e["data"]["version"] for e in _events(sub, "model.loaded")]
    report = dev.report()
    assert loaded == ["1", "2"], loaded  # sent by the runner for each model it loaded
    assert report["runner"] == "FleetDevice" and report["errors"] == 0
    assert [(s["from"], s["to"]) for s in report["switches"]] == [(None, "1"), ("1", "2")]
    assert [c["command"] for c in report["commands"]] == ["update"]
    assert "update.switched" in [e["kind"] for e in report["update_events"] if e.get("deployment_id") == "dep-2"]
