"""Acceptance 7: on a real Mosquitto with the shipped config and ACL, a device can write only its own topics and read
only its own commands; the collector user reads everything (also through the shared subscription) and sends
commands."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_helpers import Subscriber, seqs, unique_fleet, wait_until, window

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.testing.broker import MosquittoProcess, start_mosquitto

USERS = {"devA": "secret-a", "devB": "secret-b", "collector": "secret-c"}
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """Mosquitto with the shipped mosquitto.conf, the shipped acl and a password file for USERS."""
    proc = start_mosquitto(tmp_path_factory.mktemp("acl-broker"), acl=True, users=USERS)
    try:
        yield proc
    finally:
        proc.stop()


class Device:
    """A raw paho v5 client logged in as ``user`` that records PUBACK reason codes, messages and disconnects."""

    def __init__(self, port: int, user: str | None, password: str | None = None) -> None:
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.connack: int | None = None
        self.disconnects = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(5, 5)  # stay disconnected long enough for the test to see it
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: setattr(self, "connack", rc.value)
        self.client.on_disconnect = lambda *_a: setattr(self, "disconnects", self.disconnects + 1)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc.value)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, 5)

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> int | None:
        """Publish QoS 1 and return the PUBACK reason code (None if no PUBACK came)."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        wait_until(lambda: mid in self.acks, 5)
        return self.acks.get(mid)

    def subscribe(self, topic: str) -> None:
        """Subscribe QoS 1 and wait for the SUBACK."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(5)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def _collector(broker: MosquittoProcess, topics: list[str]) -> Subscriber:
    return Subscriber(broker.url, topics, username="collector", password=USERS["collector"])


def test_a_device_cannot_publish_to_another_devices_topics(broker: MosquittoProcess) -> None:
    fleet = unique_fleet()
    with _collector(broker, [f"edge/{fleet}/#"]) as col:
        for kind in ("telemetry", "events", "status", "cmd/update", "cmd/resend"):
            forger = Device(broker.port, "devA", USERS["devA"])
            try:
                assert forger.connack == 0
                code = forger.publish(f"edge/{fleet}/devB/{kind}", b'{"forged": true}', retain=kind == "status")
                assert code == NOT_AUTHORIZED, f"{kind}: PUBACK reason {code}"
                # Mosquitto 2.0 also drops the connection of a client whose publish it denied
                assert wait_until(lambda f=forger: f.disconnects >= 1, 5)
            finally:
                forger.close()
        own = Device(broker.port, "devA", USERS["devA"])
        try:
            assert own.publish(f"edge/{fleet}/devA/telemetry", b'{"own": true}') == 0
            assert own.publish(f"edge/{fleet}/devA/status", b'{"own": true}', retain=True) == 0
        finally:
            own.close()
        assert wait_until(lambda: len(col.received()) == 2, 5)
        time.sleep(0.3)
        assert [m.topic for m in col.received()] == [f"edge/{fleet}/devA/telemetry", f"edge/{fleet}/devA/status"]
    with _collector(broker, [f"edge/{fleet}/devB/status"]) as late:  # nothing forged was retained for devB
        time.sleep(0.5)
        assert late.received() == []


def test_a_device_reads_only_its_own_commands(broker: MosquittoProcess) -> None:
    fleet = unique_fleet()
    spy = Device(broker.port, "devA", USERS["devA"])
    victim = Device(broker.port, "devB", USERS["devB"])
    operator = Device(broker.port, "collector", USERS["collector"])
    try:
        for topic in (f"edge/{fleet}/devA/cmd/#", f"edge/{fleet}/devB/cmd/#", f"edge/{fleet}/#", "#"):
            spy.subscribe(topic)  # Mosquitto grants these; the ACL filters what is delivered
        victim.subscribe(f"edge/{fleet}/devB/cmd/#")
        assert operator.publish(f"edge/{fleet}/devB/cmd/update", b'{"for": "B"}') == 0
        assert operator.publish(f"edge/{fleet}/devA/cmd/update", b'{"for": "A"}') == 0
        assert wait_until(lambda: len(victim.messages) == 1 and len(spy.messages) >= 1, 5)
        victim_own = Device(broker.port, "devB", USERS["devB"])
        try:  # B's telemetry is not readable by A either
            assert victim_own.publish(f"edge/{fleet}/devB/telemetry", b"{}") == 0
        finally:
            victim_own.close()
        time.sleep(0.5)
        assert victim.messages == [(f"edge/{fleet}/devB/cmd/update", b'{"for": "B"}')]
        assert {t for t, _ in spy.messages} == {f"edge/{fleet}/devA/cmd/update"}
    finally:
        for c in (spy, victim, operator):
            c.close()


def test_unknown_or_anonymous_clients_are_refused(broker: MosquittoProcess) -> None:
    for user, password in ((None, None), ("devA", "wrong"), ("nobody", "x")):
        client = Device(broker.port, user, password)
        try:
            assert client.connack is not None and client.connack >= 0x80, (user, client.connack)
        finally:
            client.close()


def test_collector_shared_subscription_and_a_publisher_with_credentials(broker: MosquittoProcess,
                                                                          tmp_path: Path) -> None:
    fleet = unique_fleet()
    topics = [f"$share/edge-collectors/edge/{fleet}/+/telemetry", f"edge/{fleet}/+/status"]
    commands: list[tuple[str, dict[str, Any]]] = []
    with _collector(broker, topics) as col, Outbox(tmp_path / "o.db") as ob:
        assert col.granted == [1, 1]
        ob.put_many([(f"edge/{fleet}/devA/telemetry", window(i), True) for i in range(50)])
        settings = MqttSettings(broker.url, fleet, "devA", username="devA", password=USERS["devA"])
        pub = Publisher(settings, ob, model={"name": "m", "version": "1"},
                        on_command=lambda name, body: commands.append((name, body)))
        pub.start()
        try:
            assert pub.flush(15), pub.stats()
            assert wait_until(lambda: len(col.received(f"edge/{fleet}/devA/telemetry")) == 50, 5)
            assert seqs(col.payloads(f"edge/{fleet}/devA/telemetry")) == list(range(1, 51))
            assert col.payloads(f"edge/{fleet}/devA/status")[0]["state"] == "online"
            operator = Device(broker.port, "collector", USERS["collector"])
            try:
                body = {"schema": "edge-sdk/command", "schema_version": "1.0", "command": "rollback",
                        "command_id": uuid.uuid4().hex, "ts": time.time()}
                assert operator.publish(f"edge/{fleet}/devA/cmd/rollback", json.dumps(body).encode()) == 0
            finally:
                operator.close()
            assert wait_until(lambda: len(commands) == 1, 5) and commands[0][0] == "rollback"
            assert pub.stats()["refused"] == 0
        finally:
            pub.stop()
        assert wait_until(lambda: [p["state"] for p in col.payloads(f"edge/{fleet}/devA/status")]
                          == ["online", "offline"], 5)


def test_a_device_with_a_wrong_identity_gets_nothing_through(broker: MosquittoProcess, tmp_path: Path) -> None:
    """devB's credentials with devA's topics: the broker refuses every window; they stay pending, none is lost."""
    fleet = unique_fleet()
    with _collector(broker, [f"edge/{fleet}/#"]) as col, Outbox(tmp_path / "o.db") as ob:
        ob.put_many([(f"edge/{fleet}/devA/telemetry", window(i), True) for i in range(5)])
        settings = MqttSettings(broker.url, fleet, "devA", username="devB", password=USERS["devB"])
        pub = Publisher(settings, ob)
        pub.start()
        try:
            # the broker accepts the login, refuses the birth status (and drops the connection), again and again
            assert wait_until(lambda: pub.stats()["status_refused"] >= 2, 10)
            assert not pub.flush(1.0)
            assert ob.stats()["pending"] == 5 and ob.stats()["rejected"] == 0
            assert all("telemetry" not in m.topic for m in col.received())
        finally:
            pub.stop(timeout=2)
