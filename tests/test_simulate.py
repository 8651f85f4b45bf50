"""`edge-sdk fleet simulate` against the real Mosquitto: 20 devices in 2 processes for 3 s. A raw paho subscriber
checks every window against the schema and the real Collector stores them; the fleet views then show the knobs
(drift, slow, errors). Both transports: the pooled loop (default) and one Publisher per device."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import validate_window
from mqtt_helpers import SYSTEM_BROKER, Subscriber, own_mosquitto, require_system_broker, unique_fleet, wait_until

from edge_sdk.fleet.dashboard import views
from edge_sdk.testing.simulate import SimulationSettings, run_simulation


def _simulate_and_collect(tmp_path: Path, transport: str) -> tuple[str, Any, list[dict[str, Any]], list[Any], Any]:
    from edge_sdk.fleet.collector.service import Collector

    require_system_broker()
    fleet = unique_fleet("sim")
    collector = Collector(f"sqlite:///{tmp_path / 'fleet.db'}", SYSTEM_BROKER, fleet=fleet,
                          client_id=f"col-{fleet}")
    collector.start(wait_s=10)
    settings = SimulationSettings(devices=20, processes=2, duration_s=3.0, window_s=1.0, fleet=fleet,
                                  transport=transport, drift_devices=3, slow_devices=3, slow_factor=4.0,
                                  error_devices=3, error_rate=0.5, rate_hz=40.0)
    try:
        with Subscriber(SYSTEM_BROKER, [f"edge/{fleet}/+/telemetry", f"edge/{fleet}/+/status"]) as sub:
            result = run_simulation(settings)
            wait_until(lambda: sum(m.topic.endswith("/telemetry") for m in sub.received()) >= result.sent, 20)
            windows = [m.json() for m in sub.received() if m.topic.endswith("/telemetry")]
            statuses = [m for m in sub.received() if m.topic.endswith("/status")]
        wait_until(lambda: _stored(collector) >= result.sent, timeout=20)
        return fleet, result, windows, statuses, collector
    except BaseException:
        collector.stop()
        raise


def _stored(collector: Any) -> int:
    return int(collector.db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"])


@pytest.mark.parametrize("transport", ["pooled", "publisher"])
def test_simulated_fleet_delivers_every_window(tmp_path: Path, transport: str) -> None:
    fleet, result, windows, statuses, collector = _simulate_and_collect(tmp_path, transport)
    try:
        assert result.devices == 20 and result.processes == 2 and result.connected == 20
        # every device sends two or three 1 s windows in 3 s (its phase shift decides)
        assert 40 <= result.sent <= 60
        assert result.acked == result.sent and result.pending == 0 and result.dropped == 0
        assert len(windows) == result.sent  # nothing lost between outbox and subscriber
        assert len({w["window_id"] for w in windows}) == len(windows)  # and nothing twice
        for w in windows:
            validate_window(w)
        by_device: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for w in windows:
            by_device[w["device"]].append(w)
        assert len(by_device) == 20
        for ws in by_device.values():
            assert sorted(w["seq"] for w in ws) == list(range(1, len(ws) + 1))  # gap-free per device stream
            assert len({w["stream"] for w in ws}) == 1
        assert len({ws[0]["stream"] for ws in by_device.values()}) == 20  # one outbox (stream) per device
        # birth 'online' then a clean 'offline' on stop, retained, for every device
        states = collections.defaultdict(list)
        for m in statuses:
            states[m.json()["device"]].append(m.json()["state"])
        assert all(s[0] == "online" and s[-1] == "offline" for s in states.values()) and len(states) == 20

        # the collector stored every window and nothing was dead-lettered; the views show the knobs
        assert _stored(collector) == result.sent
        assert collector.db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 0
        rows = {r["device"]: r for r in views.fleet_status(collector.db, fleet, since_s=600)}
        assert len(rows) == 20 and sum(r["windows"] for r in rows.values()) == result.sent
        names = sorted(rows)
        drift, slow, errs, normal = names[:3], names[3:6], names[6:9], names[9:]
        assert all(rows[d]["psi_max"] > 0.2 for d in drift)
        assert all(rows[d]["psi_max"] < 0.2 for d in slow + errs + normal)
        normal_p50 = max(rows[d]["p50_ms"] for d in normal)
        assert all(rows[d]["p50_ms"] > normal_p50 for d in slow)  # 4x slower than the slowest normal device
        assert all(rows[d]["error_rate"] > 0.2 for d in errs)
        assert all(rows[d]["error_rate"] < 0.1 for d in drift + slow + normal)
        assert all(rows[d]["state"] == "offline" and rows[d]["state_reason"] == "shutdown" for d in names)
    finally:
        collector.stop()


def test_simulate_cli_prints_the_summary(tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet("cli")
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/telemetry") as sub:
        proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "fleet", "simulate", "--devices", "5",
                               "--processes", "1", "--duration", "2", "--window", "0.5", "--fleet", fleet,
                               "--outbox-dir", str(tmp_path / "outboxes"), "--json"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["devices"] == 5 and summary["sent"] == summary["acked"] >= 15 and summary["pending"] == 0
        assert len(sub.wait_for(summary["sent"], timeout=10)) == summary["sent"]
    assert len(list((tmp_path / "outboxes").glob("*.db"))) == 5  # kept: a rerun continues the same streams
    bad = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "fleet", "simulate", "--devices", "400",
                          "--transport", "publisher", "--processes", "1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--processes 3" in bad.stderr and "\n" not in bad.stderr.strip()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A private Mosquitto on a free port (this test stops and restarts it)."""
    proc = own_mosquitto(tmp_path / "mosquitto")
    try:
        yield proc
    finally:
        proc.stop()


def test_device_pool_answers_resend_and_survives_a_broker_restart(tmp_path: Path, broker: Any) -> None:
    """The pooled transport on its own: durable outbox, resend of acked windows, unavailable ranges reported,
    and every window delivered across a broker restart (in order per device, maybe twice, never lost)."""
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.testing.mqtt_pool import DevicePool
    from edge_sdk.testing.synthetic import DeviceProfile, SimulatedDevice

    fleet = unique_fleet("pool")
    pool = DevicePool()
    devs = []
    for i in range(3):
        name = f"dev-{i}"
        box = Outbox(tmp_path / f"{name}.db", synchronous="NORMAL")
        devs.append((pool.add(MqttSettings(broker.url, fleet, name), box, window_s=1.0),
                     SimulatedDevice(DeviceProfile(fleet, name), seed=i), f"edge/{fleet}/{name}/telemetry"))
    pool.connect(10)
    with Subscriber(broker.url, [f"edge/{fleet}/+/telemetry", f"edge/{fleet}/+/events"], client_id=f"s-{fleet}",
                    clean_start=False, session_expiry_s=600) as sub:
        t = time.time()
        for k in range(5):
            for dev, sim, topic in devs:
                pool.put(dev, topic, sim.window(t + k, t + k + 1), sequenced=True)
            pool.poll(0.01)
        assert pool.flush(10)
        assert len(sub.wait_for(15, timeout=10)) == 15

        broker.stop()  # windows pile up in the outboxes while the broker is away
        for k in range(5, 8):
            for dev, sim, topic in devs:
                pool.put(dev, topic, sim.window(t + k, t + k + 1), sequenced=True)
            pool.poll(0.05)
        assert pool.stats()["pending"] == 9  # no PUBACK without a broker: all stay in the outboxes
        broker.start()
        assert wait_until(lambda: (pool.poll(0.05), pool.stats()["pending"] == 0)[1], timeout=60)
        windows = [m.json() for m in sub.wait_for(24, timeout=10) if m.topic.endswith("/telemetry")]
        for dev, _, _ in devs:
            seqs = {w["seq"] for w in windows if w["device"] == dev.settings.device}
            assert seqs == set(range(1, 9))

        # the collector asks dev-0 for seqs 2..3 again and for 50..51, which it never had
        before = len(sub.received())
        stream = devs[0][0].outbox.stream
        cmd = Subscriber(broker.url, "unused/topic")
        cmd.client.publish(f"edge/{fleet}/dev-0/cmd/resend",
                           json.dumps({"stream": stream, "ranges": [[2, 3], [50, 51]], "command_id": "c1"}),
                           qos=1).wait_for_publish(5)
        cmd.close()
        assert wait_until(lambda: (pool.poll(0.05), len(sub.received()) >= before + 3)[1], timeout=10)
        again = [m.json() for m in sub.received()[before:]]
        assert sorted(w["seq"] for w in again if "seq" in w) == [2, 3]
        assert all(w["stream"] == stream for w in again if "seq" in w)
        event = next(w for w in again if w.get("kind") == "resend.unavailable")
        assert event["data"]["ranges"] == [[50, 51]] and event["data"]["command_id"] == "c1"
    pool.stop()
    for dev, _, _ in devs:
        dev.outbox.close()
