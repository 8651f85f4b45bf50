"""MQTT test helpers shared by every test that talks to a broker (real brokers, no mocks).

* ``SYSTEM_BROKER`` — the machine's Mosquitto on 127.0.0.1:1883 (isolate tests with :func:`unique_fleet`).
* :func:`own_mosquitto` / the ``mosquitto`` fixture — a private ``mosquitto`` on a free port, rendered from the
  shipped ``edge_sdk/fleet/broker/mosquitto.conf`` (for tests that stop, kill or restart the broker).
* :class:`Subscriber` — a paho v5 client that records every message it receives.
* :func:`wait_until` — poll a condition with a deadline.

Import what you need: ``from mqtt_helpers import Subscriber, unique_fleet, wait_until``; to use the fixture in a
test module, import it too (``from mqtt_helpers import mosquitto  # noqa: F401``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.testing.broker import MosquittoProcess, free_port, start_mosquitto

__all__ = [
    "SYSTEM_BROKER", "Received", "Subscriber", "free_port", "mosquitto", "own_mosquitto", "require_system_broker",
    "unique_fleet", "wait_until",
]

SYSTEM_BROKER = "mqtt://127.0.0.1:1883"


def unique_fleet(prefix: str = "t") -> str:
    """A fleet id no other test uses, e.g. ``t1a2b3c4d``."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval)


def require_system_broker(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Fail (not skip) with a clear message when the machine's Mosquitto is not running."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        pytest.fail(f"no MQTT broker on {host}:{port}: start it with `mosquitto -d -c /etc/mosquitto/mosquitto.conf`")


def own_mosquitto(tmpdir: Path, **kwargs: Any) -> MosquittoProcess:
    """Start a private Mosquitto (see :func:`edge_sdk.testing.broker.start_mosquitto` for the keyword arguments)."""
    return start_mosquitto(tmpdir, **kwargs)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto on a free port (shipped config, anonymous, persistence on), stopped after the test."""
    broker = own_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class Received:
    """One received message."""

    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload)


class Subscriber:
    """A paho MQTT v5 (or ``protocol="3.1.1"``) client that subscribes to ``topics`` and keeps every message.

    ``clean_start=False`` with a fixed ``client_id`` makes it a persistent session (the broker queues for it while
    it is away). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, url: str, topics: list[str] | str, *, client_id: str | None = None, username: str | None = None,
                 password: str | None = None, clean_start: bool = True, session_expiry_s: int = 0,
                 protocol: str = "5", timeout: float = 10.0) -> None:
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.messages: list[Received] = []
        self.granted: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._pending_subs = len(self.topics)
        cid = client_id or f"sub-{uuid.uuid4().hex[:10]}"
        if protocol == "5":
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                                      clean_session=clean_start)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
            self.client.connect_async(host, int(port), 30, clean_start=clean_start, properties=props)
        else:
            self.client.connect_async(host, int(port), 30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"subscriber could not connect/subscribe to {url} within {timeout} s")

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            for topic in self.topics:
                client.subscribe(topic, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        with self._lock:
            self.granted.extend(r.value for r in reasons)
            self._pending_subs -= len(reasons)
            if self._pending_subs <= 0:
                self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos)))

    def received(self, topic: str | None = None) -> list[Received]:
        """A copy of the messages so far (only those on ``topic`` when given)."""
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def payloads(self, topic: str | None = None) -> list[Any]:
        """The JSON payloads received so far (on ``topic`` when given)."""
        return [m.json() for m in self.received(topic)]

    def wait_for(self, count: int, topic: str | None = None, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages (on ``topic``) arrived; returns them (maybe fewer on timeout)."""
        wait_until(lambda: len(self.received(topic)) >= count, timeout)
        return self.received(topic)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seqs(payloads: list[dict[str, Any]]) -> list[int]:
    """The ``seq`` of each telemetry payload, in arrival order."""
    return [p["seq"] for p in payloads if "seq" in p]


def window(i: int, fleet: str = "f", device: str = "d") -> dict[str, Any]:
    """A small stand-in telemetry window body (the outbox adds stream and seq)."""
    return {"window_id": uuid.uuid4().hex, "fleet": fleet, "device": device, "i": i, "ts": time.time()}


__all__ += ["seqs", "window"]
