"""Hostile MQTT commands against a real device (issue 13): the payload strategies and the device harness shared by
``tests/test_mqtt_hardening.py`` (a few hundred payloads) and ``benchmarks/fuzz_commands.py`` (10,000).

The device is wired as ``edge-sdk agent`` wires it (``device_agent/runner.py``): a real
:class:`~edge_sdk.device_agent.mqtt_publisher.Publisher` on a real on-disk Outbox, whose ``cmd/#`` go to a real
:class:`~edge_sdk.device_agent.updater.Updater` (trusted ed25519 key, empty model store) and whose events
(``update.refused``, ``resend.unavailable``) go back out through the outbox. Nothing is mocked; the broker is the
machine's Mosquitto (or any ``mqtt://`` URL), each run under its own fleet id.

A *crash* is an exception that escaped to a thread's top (``threading.excepthook``), or one a last-resort handler
caught and logged with a traceback (a record with ``exc_info`` from ``edge_sdk``), or a dead paho network thread.
"""

from __future__ import annotations

import json
import logging
import string
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.device_agent.updater import ModelStore, Updater

__all__ = ["NASTY", "CrashCounter", "FuzzDevice", "commands", "send_all"]

COMMAND_NAMES = ("update", "rollback", "resend")
#: payloads at least this large may be dropped by the broker (the device's MQTT v5 Maximum Packet Size)
BROKER_DROPS_ABOVE = 250_000


def _command(name: str, **fields: Any) -> dict[str, Any]:
    return {"schema": "edge-sdk/command", "schema_version": "1.0", "command": name, "command_id": uuid.uuid4().hex,
            "ts": time.time(), "expires_at": time.time() + 600, **fields}


def _templates() -> dict[str, dict[str, Any]]:
    return {"update": _command("update", deployment_id=uuid.uuid4().hex,
                               model={"name": "m", "version": "2", "url": "http://127.0.0.1:9/m.tar.gz",
                                      "sha256": "0" * 64, "size_bytes": 1000}),
            "rollback": _command("rollback", reason="x", target_version="1"),
            "resend": _command("resend", stream="nope", ranges=[[1, 3]])}


#: The classes the issue names, each sent at least once: (topic suffix, payload, retained).
NASTY: list[tuple[str, bytes, bool]] = [
    ("update", b"[" * 200_000, False),          # the payload: above the size cap
    ("update", b"[" * 60_000, False),           # below the size cap: the depth check
    ("rollback", b'{"a":' * 20_000, False),     # nested objects
    ("resend", b"[{" * 10_000 + b"}]" * 10_000, False),  # balanced, deep
    ("update", json.dumps({"command_id": "x" * 300_000}).encode(), False),  # a huge string
    ("update", b"1" * 5000, False),             # an integer past Python's 4300-digit limit
    ("update", b"\xff\xfe\x00[\x00", False),    # UTF-16 BOM + junk
    ("update", b"\x80\x81\x82", False),         # not UTF-8
    ("update", b'"just a string"', False),
    ("rollback", b"[1, 2, 3]", False),
    ("update", b"[" * 200_000, True),           # retained: delivered on every (re)connect
    ("rollback", b"[" * 60_000, True),
]

_json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c,
                                                                                      max_size=5), max_leaves=25)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid command with keys dropped, replaced by random JSON, or nested values blown up."""
    body = dict(_templates()[draw(st.sampled_from(COMMAND_NAMES))])
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=4, unique=True)):
        action = draw(st.sampled_from(("drop", "junk", "deep", "huge")))
        if action == "drop":
            body.pop(key)
        elif action == "junk":
            body[key] = draw(_json)
        elif action == "deep":
            depth = draw(st.integers(10, 3000))
            body[key] = json.loads("[" * min(depth, 900) + "]" * min(depth, 900))
        else:
            body[key] = "A" * draw(st.integers(1000, 120_000))
    return json.dumps(body, allow_nan=True).encode()


@st.composite
def _deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(50, 120_000))
    opener = draw(st.sampled_from((b"[", b'{"a":', b"[{", b'{"k":[')))
    closed = draw(st.booleans())
    body = opener * depth
    return body + (b"]" * depth if closed and opener == b"[" else b"")


_payloads = st.one_of(
    _mutated(),
    _json.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    _deep(),
    st.binary(max_size=2000),
    st.integers(1000, 300_000).map(lambda n: json.dumps({"command_id": uuid.uuid4().hex, "x": "B" * n}).encode()),
    st.sampled_from((b"", b"null", b"NaN", b"-Infinity", b"1e999999", b"{}", b"[]", b"{" * 3, b'{"a":1}' * 3)),
)
_names = st.one_of(st.sampled_from(COMMAND_NAMES),
                   st.text(string.ascii_letters + string.digits + "-_./", min_size=1, max_size=30)
                   .filter(lambda s: "//" not in s and not s.startswith("/")))

#: (topic suffix, payload) pairs
commands = st.tuples(_names, _payloads)


class CrashCounter(logging.Handler):
    """Counts uncaught thread exceptions and tracebacks logged by edge_sdk (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.uncaught: list[str] = []
        self.tracebacks: list[str] = []
        self._old_hook: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            self.tracebacks.append(f"{record.name}: {record.getMessage()[:200]} ({record.exc_info[0].__name__})")

    def __enter__(self) -> CrashCounter:
        self._old_hook = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            self.uncaught.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}")

        threading.excepthook = hook
        logging.getLogger("edge_sdk").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._old_hook
        logging.getLogger("edge_sdk").removeHandler(self)

    @property
    def crashes(self) -> int:
        return len(self.uncaught) + len(self.tracebacks)


class FuzzDevice:
    """A real device (Publisher + Outbox + Updater) under ``fleet``; :meth:`probe` checks it still works."""

    def __init__(self, root: Path, url: str, fleet: str, device: str = "dev1", *, keepalive: int = 30) -> None:
        from edge_sdk.signing import generate_keypair

        self.root, self.url, self.fleet, self.device, self.keepalive = root, url, fleet, device, keepalive
        root.mkdir(parents=True, exist_ok=True)
        keys = root / "keys"
        self.pub_key = next(keys.glob("*.pub.pem"), None) if keys.is_dir() else None
        if self.pub_key is None:
            self.pub_key = generate_keypair(keys, "release")[1]
        self.prefix = f"edge/{fleet}/{device}/"
        self.publisher: Publisher | None = None
        self.outbox: Outbox | None = None
        self.updater: Updater | None = None

    def start(self) -> None:
        self.outbox = Outbox(self.root / "outbox.db")
        events_topic = self.prefix + "events"

        def emit(kind: str, data: dict[str, Any], level: str = "info") -> None:
            assert self.outbox is not None
            self.outbox.put(events_topic, {"schema": "edge-sdk/event", "schema_version": "1.0",
                                           "event_id": uuid.uuid4().hex, "fleet": self.fleet, "device": self.device,
                                           "ts": round(time.time(), 3), "kind": kind, "level": level, "data": data})
            if self.publisher is not None:
                self.publisher.wakeup()

        self.updater = Updater(ModelStore(self.root / "store"), trusted_keys=self.pub_key, emit_event=emit,
                               retries=0, timeout_s=2.0)
        settings = MqttSettings(self.url, self.fleet, self.device, keepalive=self.keepalive,
                                client_id=f"edge-{self.fleet}-{self.device}")
        self.publisher = Publisher(settings, self.outbox, model={"name": "m", "version": "1"}, window_s=10.0,
                                   on_command=self.updater.on_command)
        self.publisher.start()

    def wait_ready(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.publisher is not None and self.publisher.stats()["subscribed"]:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.stop(2.0)
        if self.updater is not None:
            self.updater.close(10.0)
        if self.outbox is not None:
            self.outbox.close()
        self.publisher = self.updater = self.outbox = None

    def received(self) -> int:
        """Commands the device took in or turned away (0 when the publisher does not count them)."""
        s = self.publisher.stats() if self.publisher is not None else {}
        return int(s.get("commands", 0)) + int(s.get("commands_rejected", 0)) + int(s.get("commands_dropped", 0))

    def probe(self, sub: Any, timeout: float = 20.0) -> dict[str, bool]:
        """Send a valid cmd/resend and a valid (refused: not http) cmd/update and put 20 windows in the outbox:
        ``answered`` when both answers came back as events, ``drained`` when the outbox emptied and the windows
        arrived. ``connected`` is the publisher's own view."""
        from paho.mqtt import publish as single

        assert self.publisher is not None and self.outbox is not None
        resend = _command("resend", stream="nope", ranges=[[1, 2]])
        update = _command("update", deployment_id=uuid.uuid4().hex,
                          model={"url": "file:///etc/passwd", "size_bytes": 10})
        host, port = self.url.split("://", 1)[1].rsplit(":", 1)
        for name, body in (("resend", resend), ("update", update)):
            single.single(self.prefix + f"cmd/{name}", json.dumps(body), qos=1, hostname=host, port=int(port))
        marks = [uuid.uuid4().hex for _ in range(20)]
        for m in marks:
            self.outbox.put(self.prefix + "telemetry", {"window_id": m, "fleet": self.fleet, "device": self.device})
        self.publisher.wakeup()
        drained = self.publisher.flush(timeout)
        deadline = time.monotonic() + timeout

        def answers() -> tuple[bool, bool]:
            events = [m.json() for m in sub.received(self.prefix + "events")]
            ids = {(e.get("kind"), (e.get("data") or {}).get("command_id")) for e in events}
            got = {m.json().get("window_id") for m in sub.received(self.prefix + "telemetry")}
            return (("resend.unavailable", resend["command_id"]) in ids
                    and ("update.refused", update["command_id"]) in ids), set(marks) <= got

        answered, arrived = answers()
        while not (answered and arrived) and time.monotonic() < deadline:
            time.sleep(0.05)
            answered, arrived = answers()
        return {"connected": self.publisher.connected, "answered": answered, "drained": drained and arrived}


def send_all(device: FuzzDevice, items: list[tuple[str, bytes, bool]], *, lag: int = 200) -> int:
    """Publish ``(suffix, payload, retain)`` on the device's cmd/ topics (QoS 1), pacing so that the device is at
    most ``lag`` commands behind (when it counts them); returns how many were sent."""
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = device.url.split("://", 1)[1].rsplit(":", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect(host, int(port), 30)
    client.loop_start()
    sent = arriving = 0
    base = device.received()
    try:
        for suffix, payload, retain in items:
            info = client.publish(device.prefix + "cmd/" + suffix, payload, qos=1, retain=retain)
            info.wait_for_publish(10.0)
            sent += 1
            arriving += len(payload) < BROKER_DROPS_ABOVE
            if sent % 50 == 0 and device.received() > base:
                deadline = time.monotonic() + 10.0
                while device.received() - base < arriving - lag and time.monotonic() < deadline:
                    time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def clear_retained(url: str, topics: list[str]) -> None:
    """Remove retained messages (an empty retained payload)."""
    from paho.mqtt import publish as single

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    single.multiple([{"topic": t, "payload": b"", "qos": 1, "retain": True} for t in topics], hostname=host,
                    port=int(port))
