"""Issue 13: the MQTT layer survives any payload, notices a dead or stalled network loop, and prints no passwords.

Real Mosquitto (127.0.0.1:1883, a unique fleet per test, or a private one with passwords), a real device
(Publisher + Outbox + Updater, ``tests/command_fuzz.py``), a real collector on SQLite; nothing mocked.
The full 10,000-payload run is ``benchmarks/fuzz_commands.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from collector_helpers import MqttPeer, window
from command_fuzz import NASTY, CrashCounter, FuzzDevice, clear_retained, commands, send_all
from hypothesis import HealthCheck, given, settings
from mqtt_helpers import SYSTEM_BROKER, Subscriber, own_mosquitto, require_system_broker, unique_fleet, wait_until

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.errors import ConfigError, TelemetryError
from edge_sdk.fleet.collector.service import Collector
from edge_sdk.mqtt import parse_mqtt_url
from edge_sdk.testing.broker import free_port
from edge_sdk.testing.mqtt_pool import DevicePool

pytest.importorskip("cryptography")

SECRET = "s3cret-Pa55"


def _ok(result: dict[str, bool]) -> bool:
    return result == {"connected": True, "answered": True, "drained": True}


@pytest.fixture()
def device(tmp_path: Path) -> Any:
    require_system_broker()
    dev = FuzzDevice(tmp_path / "device", SYSTEM_BROKER, unique_fleet("hz"))
    with Subscriber(SYSTEM_BROKER, f"{dev.prefix}#") as sub:
        dev.sub = sub
        yield dev
        dev.stop()
    clear_retained(SYSTEM_BROKER, [f"{dev.prefix}cmd/{n}" for n in ("update", "rollback", "resend")]
                   + [f"{dev.prefix}status"])


def test_a_deeply_nested_command_leaves_the_device_connected_and_answering(device: FuzzDevice) -> None:
    """The issue's 200 kB ``[[[...`` on cmd/update (and a 60 kB one under the size cap): before the fix paho's
    network thread died of RecursionError, ``connected`` stayed True and later commands were lost."""
    with CrashCounter() as crashes:
        device.start()
        assert device.wait_ready()
        send_all(device, [("update", b"[" * 200_000, False), ("update", b"[" * 60_000, False),
                          ("rollback", b'{"a":' * 20_000, False)])
        result = device.probe(device.sub)
    assert _ok(result), result
    assert crashes.crashes == 0, (crashes.uncaught, crashes.tracebacks)
    assert device.publisher is not None and device.publisher.stats()["commands_rejected"] >= 3


def test_fuzzed_commands_and_a_retained_nested_one_across_a_restart(device: FuzzDevice) -> None:
    """A few hundred hypothesis payloads (deep nesting, huge strings, wrong types, binary) plus every nasty class,
    two of them retained; then the device restarts with the retained ones waiting for it: 0 crashes, still
    connected, later valid commands answered, the outbox drained."""
    items: list[tuple[str, bytes, bool]] = list(NASTY)

    @settings(max_examples=300, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(commands)
    def collect(item: tuple[str, bytes]) -> None:
        items.append((item[0], item[1], False))

    collect()
    with CrashCounter() as crashes:
        device.start()
        assert device.wait_ready()
        assert send_all(device, items) == len(items)
        first = device.probe(device.sub)
        device.stop()
        device.start()  # the retained nested cmd/update and cmd/rollback arrive at once
        assert device.wait_ready(), "the device did not come back after a restart"
        second = device.probe(device.sub)
    assert _ok(first), first
    assert _ok(second), second
    assert crashes.crashes == 0, (crashes.uncaught[:5], crashes.tracebacks[:5])


def test_the_watchdog_restarts_a_dead_network_loop(device: FuzzDevice) -> None:
    """paho's network thread ends (here: stopped under the session's feet): ``connected`` must turn False at once
    and the watchdog must reconnect, after which commands are answered and the outbox drains again."""
    device.start()
    assert device.wait_ready()
    pub = device.publisher
    assert pub is not None and pub._session is not None
    pub._session._client.loop_stop()  # the thread is gone, the socket still open: what an escaped exception left
    assert wait_until(lambda: not pub.connected or pub.stats()["watchdog_restarts"] >= 1, 3.0)
    assert wait_until(lambda: pub.stats()["watchdog_restarts"] >= 1 and pub.stats()["subscribed"], 15.0)
    assert _ok(device.probe(device.sub))


class _StallingPublisher(Publisher):
    """A publisher whose network thread hangs on the first ``cmd/stall`` message (a callback that blocks; the
    broker's redelivery of that message to the new connection goes through)."""

    release = threading.Event()
    stalled = False

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/cmd/stall") and not self.stalled:
            self.stalled = True
            self.release.wait(60)
            return
        super()._on_message(topic, payload)


def test_the_watchdog_notices_a_stalled_network_loop(tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet("hs")
    prefix = f"edge/{fleet}/dev1/"
    with Outbox(tmp_path / "o.db") as ob, Subscriber(SYSTEM_BROKER, f"{prefix}#") as sub, \
            closing(MqttPeer(SYSTEM_BROKER)) as peer:
        pub = _StallingPublisher(MqttSettings(SYSTEM_BROKER, fleet, "dev1", keepalive=5), ob)
        pub.start()
        try:
            assert wait_until(lambda: pub.stats()["subscribed"], 10)
            peer.publish(prefix + "cmd/stall", {"x": 1})
            time.sleep(0.5)
            ob.put(prefix + "telemetry", {"window_id": "w1"})
            pub.wakeup()
            assert wait_until(lambda: pub.stats()["watchdog_restarts"] >= 1, 30), pub.stats()
            assert pub.flush(20)
            assert wait_until(lambda: any(m.json().get("window_id") == "w1"
                                          for m in sub.received(prefix + "telemetry")), 10)
            peer.publish(prefix + "cmd/resend", {"command_id": uuid.uuid4().hex, "stream": "x", "ranges": [[1, 1]]})
            assert wait_until(lambda: any(m.json().get("kind") == "resend.unavailable"
                                          for m in sub.received(prefix + "events")), 15)
        finally:
            _StallingPublisher.release.set()
            pub.stop(2.0)


def test_the_collector_survives_hostile_payloads_and_a_dead_network_loop(tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet("hc")
    col = Collector(f"sqlite:///{tmp_path / 'fleet.db'}", SYSTEM_BROKER, fleet=fleet, client_id=f"col-{fleet}",
                    session_expiry_s=60, alert_interval_s=3600, store_process=False)
    with CrashCounter() as crashes, closing(MqttPeer(SYSTEM_BROKER)) as peer:
        col.start(wait_s=10)
        try:
            time.sleep(0.3)
            topic = f"edge/{fleet}/cam1/telemetry"
            for payload in (b"[" * 200_000, b"[" * 60_000, b"\xff\xfe", b'{"a":' * 30_000, b"1" * 5000):
                peer.publish(topic, payload)
            stream = uuid.uuid4().hex
            peer.publish(topic, window(fleet, "cam1", seq=1, stream=stream))
            assert wait_until(lambda: col.stats()["stored"] == 1 and col.stats()["dead_letters"] == 5, 20), \
                col.stats()
            col._client.loop_stop()  # the network thread is gone
            assert wait_until(lambda: col.stats()["watchdog_restarts"] >= 1 and col.connected, 15), col.stats()
            time.sleep(0.3)
            peer.publish(topic, window(fleet, "cam1", seq=2, stream=stream))
            assert wait_until(lambda: col.stats()["stored"] == 2, 15), col.stats()
        finally:
            col.stop()
    assert crashes.crashes == 0, (crashes.uncaught, crashes.tracebacks)


# ---- secrets --------------------------------------------------------------------------------------------------------


def test_mqtt_urls_are_shown_without_passwords(tmp_path: Path) -> None:
    from edge_sdk.mqtt import redact_url

    url = f"mqtt://edge:{SECRET}@127.0.0.1:{free_port()}"
    assert redact_url(url) == f"mqtt://edge:***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    assert redact_url("mqtts://h:8883") == "mqtts://h:8883"
    assert SECRET not in redact_url(f"nonsense://a:{SECRET}@h/x?y")
    with pytest.raises(ConfigError) as err:
        parse_mqtt_url(f"mqtt://edge:{SECRET}@host/path")
    assert SECRET not in str(err.value) and "edge:***@host" in str(err.value)
    settings = MqttSettings(url, "f", "d")
    assert SECRET not in repr(settings) and SECRET not in repr(MqttSettings("mqtt://h", "f", "d", username="u",
                                                                          password=SECRET))
    with Outbox(tmp_path / "o.db") as ob:
        pool = DevicePool()
        pool.add(settings, ob)
        with pytest.raises(TelemetryError) as err2:
            pool.connect(1.0)
        pool.stop(0.1)
    assert SECRET not in str(err2.value)


def test_passwords_come_from_files_or_the_environment_and_never_reach_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    users = {"collector": SECRET, "devA": SECRET + "-d"}
    broker = own_mosquitto(tmp_path / "mosq", users=users, acl=True)
    caplog.set_level(logging.DEBUG)
    try:
        pw_file = tmp_path / "collector.pw"
        pw_file.write_text(SECRET + "\n")
        url = f"mqtt://collector@127.0.0.1:{broker.port}"
        col = Collector(f"sqlite:///{tmp_path / 'a.db'}", url, password_file=str(pw_file), client_id="c1",
                        session_expiry_s=0, alert_interval_s=3600, store_process=False)
        col.start(wait_s=10)
        assert SECRET not in col.mqtt_display and col.mqtt_display == url
        col.stop()
        monkeypatch.setenv("EDGE_SDK_MQTT_PASSWORD_FILE", str(pw_file))
        col = Collector(f"sqlite:///{tmp_path / 'b.db'}", url, client_id="c2", session_expiry_s=0,
                        alert_interval_s=3600, store_process=False)
        col.start(wait_s=10)
        col.stop()
        monkeypatch.delenv("EDGE_SDK_MQTT_PASSWORD_FILE")
        # the device: a password in the environment, the user in the URL
        monkeypatch.setenv("EDGE_SDK_MQTT_PASSWORD", users["devA"])
        settings = MqttSettings(f"mqtt://devA@127.0.0.1:{broker.port}", "fl", "devA")
        assert settings.password == users["devA"]
        with Outbox(tmp_path / "o.db") as ob:
            pub = Publisher(settings, ob)
            pub.start()
            try:
                assert wait_until(lambda: pub.stats()["subscribed"], 10)
            finally:
                pub.stop(1.0)
        # a URL with a password in it is logged without it
        col = Collector(f"sqlite:///{tmp_path / 'c.db'}", f"mqtt://collector:{SECRET}@127.0.0.1:{broker.port}",
                        client_id="c3", session_expiry_s=0, alert_interval_s=3600, store_process=False)
        col.start(wait_s=10)
        assert SECRET not in col.mqtt_display
        col.stop()
        assert json.dumps([r.getMessage() for r in caplog.records]).count(SECRET) == 0
    finally:
        broker.stop()
