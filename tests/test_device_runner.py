"""Issue 12, item 1: one device runner. `edge-sdk agent run` and the simulated test fleet both drive
:class:`edge_sdk.device_agent.runner.DeviceRunner`; proved by behaviour (real processes, real broker, real signed
bundles), not by reading the source:

- the CLI process builds a DeviceRunner and serves HTTP from the runner's server; an over-the-air update sent to
  it over MQTT switches the model store and the runner's restart policy re-executes the process on the new model;
- a test-fleet device is a DeviceRunner: an update hot-swaps the model in place (runner policy ``swap``) and the
  runner's ``model.loaded`` event (which the old fleet wiring never sent) reaches the broker for both versions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_helpers import SYSTEM_BROKER, Subscriber, free_port, require_system_broker, unique_fleet, wait_until

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

    def update_command(self, version: str) -> bytes:
        path = self.archives[version]
        return json.dumps({"deployment_id": f"dep-{version}", "model": {
            "url": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size, "name": "tiny",
            "version": version}}).encode()


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("runner_material"))


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def test_swap_policy_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(ConfigError) as exc:
        RunnerConfig(agent=AgentConfig(bundle="b"), serve_http=True, store="s", on_switch="swap")
    assert "on_switch='restart'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="choose from swap, restart"):
        RunnerConfig(on_switch="reload")


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


def test_agent_run_is_a_device_runner_and_restarts_on_an_ota_update(material: Material, tmp_path: Path) -> None:
    require_system_broker()
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher

    fleet, port = unique_fleet("runner"), free_port()
    log = tmp_path / "agent.log"
    args = ["agent", "run", "--model-store", str(tmp_path / "store"), "--bundle", str(material.archives["1"]),
            "--trusted-keys", str(material.pub), "--http", f"127.0.0.1:{port}", "--mqtt", SYSTEM_BROKER,
            "--fleet", fleet, "--device", "cam1", "--window", "0.5", "--outbox", str(tmp_path / "outbox.db")]
    health = f"http://127.0.0.1:{port}/healthz"
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/cam1/#") as sub, \
            MqttCommandPublisher(SYSTEM_BROKER, timeout=5.0) as publish, open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CLI, *args], stderr=err, stdout=subprocess.DEVNULL,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        try:
            assert wait_until(lambda: (_get(health) or {}).get("model_version") == "tiny:1", 90, 0.2), \
                log.read_text()
            assert f"RUNNER DeviceRunner restart {port}" in log.read_text()  # the CLI's server is the runner's
            assert wait_until(lambda: any(m.topic.endswith("/status") and m.payload for m in sub.received()), 20)
            publish(f"edge/{fleet}/cam1/cmd/update", material.update_command("2"), True)
            # the runner stops, re-executes the same process (same pid) and serves the new model on the same port
            assert wait_until(lambda: (_get(health) or {}).get("model_version") == "tiny:2", 90, 0.2), \
                log.read_text()
            assert proc.poll() is None
            assert wait_until(lambda: [e["data"]["version"] for e in _events(sub, "model.loaded")] == ["1", "2"],
                              20), _events(sub, "model.loaded")
            assert [e["data"]["to"] for e in _events(sub, "update.switched")] == ["tiny:2"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for topic in (f"edge/{fleet}/cam1/cmd/update", f"edge/{fleet}/cam1/status"):
                publish(topic, b"", True)
    text = log.read_text()
    assert "agent: model switched; restarting on it" in text and text.count("RUNNER DeviceRunner") == 1, text


def _events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [p for p in (m.json() for m in sub.received() if m.topic.endswith("/events")) if p["kind"] == kind]


def test_a_test_fleet_device_is_a_device_runner_that_hot_swaps(material: Material, tmp_path: Path) -> None:
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
                publish(f"edge/{fleet}/dev000/cmd/update", material.update_command("2"), True)
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
