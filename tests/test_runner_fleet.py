"""The device's fleet reaches its Updater (issue 13 follow-up): ``DeviceRunner`` (the path of ``edge-sdk agent run``
and of the simulated fleet) passes the fleet it reports in, so a bundle whose signed manifest lists other fleets is
refused, with an ``update.failed`` event, and ``current`` stays on the model the device runs.

Real tiny bundles signed with a real ed25519 key (``sign_bundle(..., version_code=, fleets=)``), a real model store;
nothing mocked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.bundle import Bundle
from edge_sdk.device_agent.config import AgentConfig
from edge_sdk.device_agent.runner import DeviceRunner, RunnerConfig
from edge_sdk.errors import EdgeSDKError

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")


class Material:
    """tiny:1 signed for fleet-b (version_code 1); tiny:2 signed for fleet-a only, and for fleet-b (version_code 2);
    as archives."""

    def __init__(self, root: Path) -> None:
        from tiny_models import make_tiny

        import edge_sdk
        from edge_sdk.signing import generate_keypair, sign_bundle

        key, self.pub = generate_keypair(root / "keys", "release")
        base = root / "base"
        val = np.random.default_rng(3).random((8, 3, 32, 32), dtype=np.float32)
        edge_sdk.convert(make_tiny(0), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", ort=False, val=val,
                         out=base, name="tiny", version="1", quiet=True)
        self.archives: dict[str, Path] = {}
        for tag, version, code, fleets in (("1-b", "1", 1, ["fleet-b"]), ("2-a", "2", 2, ["fleet-a"]),
                                           ("2-b", "2", 2, ["fleet-b", "fleet-c"])):
            d = Path(shutil.copytree(base, root / tag))
            b = Bundle.load(d)
            b.manifest.version = version
            b.save()
            sign_bundle(d, key, version_code=code, fleets=fleets)
            assert Bundle.load(d).manifest.fleets == sorted(fleets)
            self.archives[tag] = Bundle.load(d).archive(root / f"{tag}.tar.gz")


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("runner_fleet"))


class RecordingRunner(DeviceRunner):
    """A DeviceRunner that keeps the Updater's events (the hook the test fleet uses too)."""

    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(config, say=lambda _line: None)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def on_update_event(self, kind: str, data: dict[str, Any], level: str) -> None:
        self.events.append((kind, data))


def _config(material: Material, tmp: Path, fleet: str, bundle: str) -> RunnerConfig:
    agent = AgentConfig(bundle=bundle).with_telemetry(fleet=fleet, device="cam-1", outbox=str(tmp / "outbox.db"))
    return RunnerConfig(agent=agent, store=str(tmp / "store"), trusted_keys=str(material.pub), on_switch="swap",
                        flush_s=0)


def _current(runner: DeviceRunner) -> str:
    m = Bundle.load(runner.updater.current_bundle()).manifest
    return f"{m.name}:{m.version}"


def test_bundle_signed_for_another_fleet_is_refused_by_the_runner_with_an_event(material: Material,
                                                                                 tmp_path: Path) -> None:
    runner = RecordingRunner(_config(material, tmp_path, "fleet-b", str(material.archives["1-b"])))
    with runner:
        assert runner.updater.fleet == "fleet-b"  # the fleet the device reports in
        assert _current(runner) == "tiny:1" and runner.agent.model_version == "tiny:1"
        before, n = os.readlink(tmp_path / "store" / "current"), len(runner.events)
        with pytest.raises(EdgeSDKError) as exc:
            runner.updater.update(material.archives["2-a"])
        msg = str(exc.value)
        assert "fleet-a" in msg and "fleet-b" in msg and "\n" not in msg, msg
        failed = [d for k, d in runner.events[n:] if k == "update.failed"]
        assert failed and failed[-1]["step"] == "policy" and "fleet-a" in failed[-1]["reason"], runner.events
        assert not any(k == "update.switched" for k, _ in runner.events[n:])
        assert os.readlink(tmp_path / "store" / "current") == before and runner.agent.model_version == "tiny:1"
        # the control: the same version signed for this device's fleet (among others) installs and is swapped in
        runner.updater.update(material.archives["2-b"])
        assert _current(runner) == "tiny:2" and runner.agent.model_version == "tiny:2"
        assert any(k == "update.switched" for k, _ in runner.events[n:])


def test_first_install_of_another_fleets_bundle_does_not_start(material: Material, tmp_path: Path) -> None:
    """The first bundle passes the same check: a device in fleet-b given fleet-a's bundle refuses to start on it."""
    runner = RecordingRunner(_config(material, tmp_path, "fleet-b", str(material.archives["2-a"])))
    with pytest.raises(EdgeSDKError) as exc:
        runner.start()
    assert "fleet-a" in str(exc.value) and "fleet-b" in str(exc.value)
    assert [d["step"] for k, d in runner.events if k == "update.failed"] == ["policy"]
    assert runner.agent is None
    # in its own fleet the same bundle starts
    ok = RecordingRunner(_config(material, tmp_path / "a", "fleet-a", str(material.archives["2-a"])))
    with ok:
        assert ok.updater.fleet == "fleet-a" and ok.agent.model_version == "tiny:2"
