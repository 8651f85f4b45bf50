"""Issue 5, acceptance 5: darkened inputs (night-time photos reaching a model that saw daytime ones) raise a drift
alert within 3 windows; undrifted photos raise none over 100 windows.

The whole chain is real: a bundle converted from a small CNN with real photo crops as calibration data (the
manifest's baseline is measured on them), the device Agent on ONNX Runtime with its Telemetry aggregating the live
inputs, the on-disk Outbox and MQTT Publisher, the machine's Mosquitto, and the Collector with its alert rules and
the bundle's baseline. Live photos are other crops of the same real photos (another seed); "night" is the same
crops at 45% brightness in pixel space.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collector_helpers import wait_until
from mqtt_helpers import require_system_broker, unique_fleet

PER_WINDOW = 20


@pytest.fixture(scope="module")
def photo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from data import photo_crops
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("drift")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", photo_crops(120, seed=0, size=32))
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, calib=d / "calib.npy", val=d / "calib.npy", out=d / "bundle",
                     name="daycam", version="1", quiet=True)
    return d / "bundle"


def _darken(x: np.ndarray, factor: float) -> np.ndarray:
    from data import IMAGENET_MEAN, IMAGENET_STD

    m, s = IMAGENET_MEAN[None, :, None, None], IMAGENET_STD[None, :, None, None]
    return ((x * s + m) * factor - m) / s


def test_darkened_inputs_alert_within_3_windows_and_daylight_never(photo_bundle: Path, tmp_path: Path) -> None:
    require_system_broker()
    from data import photo_crops

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings, model_info
    from edge_sdk.fleet.collector.service import Collector

    live = photo_crops(200, seed=1, size=32).astype(np.float32)
    fleet = unique_fleet("drift")
    agent = Agent(photo_bundle, runtime_order=["onnxruntime"], threads=1)
    baseline = agent.bundle.manifest.baseline
    assert baseline.get("input_channels"), "the bundle must carry the calibration photos' baseline"
    collector = Collector(f"sqlite:///{tmp_path / 'fleet.db'}", "mqtt://127.0.0.1:1883", fleet=fleet,
                          client_id=f"col-{fleet}", alert_interval_s=0.2,
                          baselines={("daycam", "1"): baseline})
    collector.start(wait_s=10)
    outbox = Outbox(tmp_path / "outbox.db", synchronous="NORMAL")
    settings = TelemetrySettings(enabled=True, window_s=3600, fleet=fleet, device="cam1",
                                 mqtt=MqttSettings(url="mqtt://127.0.0.1:1883", fleet=fleet, device="cam1"))
    publisher = Publisher(settings.mqtt, outbox, model=model_info(agent), window_s=1.0)
    publisher.start()
    telemetry = Telemetry.for_agent(agent, settings, outbox=outbox, publisher=publisher)
    rng = np.random.default_rng(3)
    stored = lambda: collector.db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"]  # noqa: E731
    drift_alerts = lambda: collector.db.query(  # noqa: E731
        "SELECT value, message FROM alerts WHERE rule = 'drift' AND device = 'cam1'")

    def window(images: np.ndarray) -> None:
        for x in images:
            agent.predict(x[None])
        n = stored()
        telemetry.emit_window()
        assert wait_until(lambda: stored() > n, timeout=20), "window not stored"
        time.sleep(0.45)  # >= 2 alert evaluations after the window was stored

    try:
        psis: list[Any] = []
        for _ in range(100):
            window(live[rng.choice(len(live), PER_WINDOW, replace=False)])
            psis.append(collector.db.query("SELECT psi_max FROM windows ORDER BY end_ts DESC LIMIT 1")[0]["psi_max"])
        assert drift_alerts() == [], f"false drift alarm on daylight photos: {drift_alerts()}"
        night = _darken(live, 0.45)
        needed = None
        for k in range(1, 4):
            window(night[rng.choice(len(night), PER_WINDOW, replace=False)])
            if drift_alerts():
                needed = k
                break
        print(f"\nundrifted: 100 windows of {PER_WINDOW} photos, per-window psi_max median "
              f"{np.median(psis):.3f}, max {max(psis):.3f}, no alert; darkened: alert after {needed} window(s): "
              f"{drift_alerts()}")
        assert needed is not None, "no drift alert after 3 darkened windows"
    finally:
        telemetry.stop(final_window=False)
        publisher.stop()
        outbox.close()
        collector.stop()
        agent.close()
