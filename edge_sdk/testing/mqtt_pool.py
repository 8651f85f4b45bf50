"""Many device MQTT clients in one thread: the simulator's transport for hundreds of devices per process.

Each device is still a device on the wire: its own paho client (client id ``edge-<fleet>-<device>``, MQTT v5,
persistent session, retained birth / last will, ``cmd/#`` subscription) and its own durable
:class:`~edge_sdk.device_agent.outbox.Outbox` (its own stream, so the collector's gap repair works per device).
What differs from :class:`~edge_sdk.device_agent.mqtt_publisher.Publisher` is the threading: paho's external-loop
API (``loop_read`` / ``loop_write`` / ``loop_misc``) is driven from ONE ``selectors`` (epoll) loop for all the
devices of a process, instead of three threads per device. Measured on a 2-core host, 1,000 Publishers (3,000
threads) at one window per second cost 3.1x the CPU per window and fell 21 s behind; this loop kept up
(figures in :mod:`edge_sdk.testing.simulate`). epoll also has no 1024-descriptor limit.

Delivery is the Publisher's contract: a window is committed to the outbox before it is published, acked in the
outbox only on a PUBACK with a reason code below 0x80, published again from the outbox after every reconnect
(and after a crash: the outbox is on disk), and ``cmd/resend`` re-queues acked windows. Callbacks are guarded like
the device's (:func:`edge_sdk.mqtt.guard`): a hostile ``cmd/resend`` is logged (once a minute per kind), never
raised out of :meth:`DevicePool.poll`; the broker URL is shown without its password.
"""

from __future__ import annotations

import json
import logging
import selectors
import time
import uuid
from typing import TYPE_CHECKING, Any

from edge_sdk import __version__
from edge_sdk.errors import TelemetryError
from edge_sdk.mqtt import (
    MAX_COMMAND_BYTES,
    PayloadRejected,
    RateLimitedLog,
    connect_properties,
    guard,
    loads_command,
    make_client,
    redact_url,
)
from edge_sdk.topics import device_topic

if TYPE_CHECKING:
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings
    from edge_sdk.device_agent.outbox import Outbox

__all__ = ["DevicePool", "PooledDevice"]

log = logging.getLogger("edge_sdk.testing.mqtt_pool")
_limited = RateLimitedLog(log)
_MAX_BACKOFF_S = 30.0


class PooledDevice:
    """One device of a :class:`DevicePool`: its paho client, outbox and delivery state."""

    def __init__(self, settings: MqttSettings, outbox: Outbox, *, model: dict[str, Any] | None,
                 window_s: float | None) -> None:
        self.settings, self.outbox, self.model, self.window_s = settings, outbox, model, window_s
        self.status_topic = device_topic(settings.fleet, settings.device, "status")
        self.events_topic = device_topic(settings.fleet, settings.device, "events")
        self.cmd_prefix = f"edge/{settings.fleet}/{settings.device}/cmd/"
        self.client: Any = None
        self.sock: Any = None
        self.connected = False
        self.inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self.cursor = 0  # every pending row id <= cursor has been handed to paho
        self.acks: list[int] = []
        self.reconnect_at = 0.0
        self.backoff = 1.0
        self.counts = {"published": 0, "acked": 0, "refused": 0, "connects": 0, "resend_requests": 0, "requeued": 0}

    def status(self, state: str, reason: str) -> bytes:
        """A ``status.schema.json`` payload."""
        body = {"schema": "edge-sdk/status", "schema_version": "1.0", "fleet": self.settings.fleet,
                "device": self.settings.device, "state": state, "reason": reason, "ts": round(time.time(), 3),
                "model": self.model, "agent_version": __version__, "window_s": self.window_s}
        return json.dumps(body, separators=(",", ":")).encode()


class DevicePool:
    """Drive the MQTT clients of many devices from the calling thread (not thread-safe: use one thread).

    ``add`` devices, ``connect(timeout)``, then call :meth:`poll` often (it waits at most its timeout);
    :meth:`put` stores a message in a device's outbox and publishes it; :meth:`flush` waits for the PUBACKs;
    :meth:`stop` publishes a clean retained ``offline`` for every device and disconnects.
    """

    def __init__(self) -> None:
        self.devices: list[PooledDevice] = []
        self._sel = selectors.DefaultSelector()
        self._dirty: set[PooledDevice] = set()
        self._next_misc = 0.0

    # ---------------------------------------------------------------------------------------------- setup
    def add(self, settings: MqttSettings, outbox: Outbox, *, model: dict[str, Any] | None = None,
            window_s: float | None = None) -> PooledDevice:
        """Create a device's client (not connected yet)."""
        dev = PooledDevice(settings, outbox, model=model, window_s=window_s)
        client = make_client(settings.effective_client_id, username=settings.username, password=settings.password,
                             tls=settings.tls_context(), userdata=dev, purpose="simulating MQTT devices")
        client.will_set(dev.status_topic, dev.status("offline", "last will"), qos=1, retain=True)
        client.max_inflight_messages_set(settings.max_inflight + 4)
        client.on_socket_open = guard(self._on_socket_open, _limited, "socket_open")
        client.on_socket_close = guard(self._on_socket_close, _limited, "socket_close")
        client.on_connect = guard(self._on_connect, _limited, "connect")
        client.on_disconnect = guard(self._on_disconnect, _limited, "disconnect")
        client.on_publish = guard(self._on_publish, _limited, "publish")
        client.on_message = guard(self._on_message, _limited, "message")
        dev.client = client
        self.devices.append(dev)
        return dev

    def connect(self, timeout: float, batch: int = 25) -> None:
        """Connect every device, ``batch`` at a time; raises TelemetryError when some did not within ``timeout``."""
        deadline = time.monotonic() + timeout
        for k in range(0, len(self.devices), batch):
            group = self.devices[k:k + batch]
            for dev in group:
                self._try_connect(dev)
            while not all(d.connected for d in group) and time.monotonic() < deadline:
                self.poll(0.02)
        missing = [d.settings.device for d in self.devices if not d.connected]
        if missing:
            url = redact_url(self.devices[0].settings.url)
            raise TelemetryError(f"{len(missing)} of {len(self.devices)} devices (e.g. {missing[0]}) did not connect "
                                 f"to {url} within {timeout:g} s: check the broker")

    def _try_connect(self, dev: PooledDevice) -> None:
        s = dev.settings
        props = connect_properties(s.session_expiry_s)
        try:
            if dev.counts["connects"] == 0 and dev.sock is None:
                dev.client.connect(s.host, s.port, s.keepalive, clean_start=False, properties=props)
            else:
                dev.client.reconnect()
        except OSError as exc:
            dev.reconnect_at = time.monotonic() + dev.backoff
            log.debug("%s: connect failed (%s); retry in %.0f s", s.device, exc, dev.backoff)
            dev.backoff = min(dev.backoff * 2, _MAX_BACKOFF_S)

    # ---------------------------------------------------------------------------------------------- paho callbacks
    def _on_socket_open(self, client: Any, dev: PooledDevice, sock: Any) -> None:
        dev.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: Any, dev: PooledDevice, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        dev.sock = None

    def _on_connect(self, client: Any, dev: PooledDevice, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused the connection: %s", dev.settings.device, reason)
            return
        dev.connected, dev.backoff = True, 1.0
        dev.counts["connects"] += 1
        # send every pending row again from the oldest (paho may resend its own copies too: a duplicate, never a
        # loss; PUBACKs of the old message ids are ignored)
        dev.inflight, dev.cursor = {}, 0
        client.publish(dev.status_topic, dev.status("online", "connected"), qos=1, retain=True)
        client.subscribe(f"{dev.cmd_prefix}#", qos=1)
        self._dirty.add(dev)

    def _on_disconnect(self, client: Any, dev: PooledDevice, flags: Any, reason: Any, properties: Any) -> None:
        if dev.connected:
            log.debug("%s: disconnected (%s)", dev.settings.device, reason)
        dev.connected = False
        dev.reconnect_at = time.monotonic() + dev.backoff
        dev.backoff = min(dev.backoff * 2, _MAX_BACKOFF_S)

    def _on_publish(self, client: Any, dev: PooledDevice, mid: int, reason: Any, properties: Any) -> None:
        rowid = dev.inflight.pop(mid, None)
        if rowid is None:
            return  # a status message
        if reason.value < 0x80:
            dev.acks.append(rowid)
        else:
            dev.counts["refused"] += 1
            log.warning("%s: broker refused outbox row %d (%s): kept pending", dev.settings.device, rowid, reason)
        self._dirty.add(dev)

    def _on_message(self, client: Any, dev: PooledDevice, msg: Any) -> None:
        if msg.topic != f"{dev.cmd_prefix}resend" or not msg.payload:
            return  # the simulator answers resend only; update / rollback are for real agents
        try:
            body = loads_command(msg.payload, max_bytes=MAX_COMMAND_BYTES)
            stream, ranges = body["stream"], [(int(a), int(b)) for a, b in body["ranges"]][:100]
            requeued, unavailable = dev.outbox.resend(stream, ranges)
        except (PayloadRejected, ValueError, KeyError, TypeError, TelemetryError) as exc:
            _limited(logging.WARNING, f"resend:{type(exc).__name__}", "%s: ignored cmd/resend: %s", dev.settings.device,
                     str(exc)[:200])
            return
        dev.counts["resend_requests"] += 1
        dev.counts["requeued"] += requeued
        if unavailable:
            event = {"schema": "edge-sdk/event", "schema_version": "1.0", "event_id": uuid.uuid4().hex,
                     "fleet": dev.settings.fleet, "device": dev.settings.device, "ts": round(time.time(), 3),
                     "kind": "resend.unavailable", "level": "warning",
                     "data": {"stream": stream, "ranges": [list(r) for r in unavailable],
                              "command_id": body.get("command_id") if isinstance(body.get("command_id"), str)
                              and len(body["command_id"]) <= 64 else None}}
            dev.outbox.put(dev.events_topic, event)
        dev.cursor = 0
        self._dirty.add(dev)

    # ---------------------------------------------------------------------------------------------- the loop
    def put(self, dev: PooledDevice, topic: str, payload: dict[str, Any], *, sequenced: bool = False) -> int:
        """Store ``payload`` durably in the device's outbox, then publish what is pending."""
        rowid = dev.outbox.put(topic, payload, sequenced=sequenced)
        self._pump(dev)
        return rowid

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for network events and handle them: reads, writes, PUBACKs (outbox acks),
        reconnects and keep-alives."""
        for key, mask in self._sel.select(max(timeout, 0.0)):
            dev = key.data
            if mask & selectors.EVENT_READ:
                dev.client.loop_read(100)
            if mask & selectors.EVENT_WRITE:
                dev.client.loop_write()
                self._want_write(dev)
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + 0.5
            for dev in self.devices:
                dev.client.loop_misc()
                if not dev.connected and dev.sock is None and now >= dev.reconnect_at:
                    self._try_connect(dev)
        dirty, self._dirty = self._dirty, set()
        for dev in dirty:
            if dev.acks:
                acks, dev.acks = dev.acks, []
                dev.outbox.ack_many(acks)
                dev.counts["acked"] += len(acks)
            self._pump(dev)
            self._want_write(dev)

    def _want_write(self, dev: PooledDevice) -> None:
        if dev.sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if dev.client.want_write() else 0)
        try:
            if self._sel.get_key(dev.sock).events != events:
                self._sel.modify(dev.sock, events, dev)
        except (KeyError, ValueError):
            pass

    def _pump(self, dev: PooledDevice) -> None:
        """Hand pending outbox rows to paho, oldest first, keeping at most max_inflight unacknowledged."""
        if not dev.connected:
            return
        room = dev.settings.max_inflight - len(dev.inflight)
        if room <= 0:
            return
        in_flight = set(dev.inflight.values())
        for msg in dev.outbox.pending(room + len(in_flight), after=dev.cursor):
            if msg.rowid in in_flight:
                dev.cursor = msg.rowid
                continue
            if len(dev.inflight) >= dev.settings.max_inflight:
                break
            info = dev.client.publish(msg.topic, msg.payload, qos=1)
            if info.rc != 0:  # lost the connection meanwhile: paho keeps nothing we rely on; resent from the outbox
                dev.cursor = 0
                break
            dev.inflight[info.mid] = msg.rowid
            dev.counts["published"] += 1
            dev.cursor = msg.rowid
        self._want_write(dev)

    def flush(self, timeout: float) -> bool:
        """Poll until no outbox has pending rows; True if that happened within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while any(d.outbox.pending_count() for d in self.devices):
            if time.monotonic() > deadline:
                return False
            self._dirty.update(d for d in self.devices if d.outbox.pending_count() and not d.inflight)
            self.poll(0.05)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained clean ``offline`` for each device, disconnect and close the sockets."""
        for dev in self.devices:
            if dev.connected:
                dev.client.publish(dev.status_topic, dev.status("offline", "shutdown"), qos=1, retain=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(d.connected and d.client.want_write() for d in self.devices):
            self.poll(0.02)
        for dev in self.devices:
            dev.connected = False
            dev.reconnect_at = float("inf")
            if dev.sock is not None:
                dev.client.disconnect()
                dev.client.loop_write()
        self.poll(0.05)
        for dev in self.devices:
            if dev.sock is not None:
                self._on_socket_close(dev.client, dev, dev.sock)
        self._sel.close()

    def stats(self) -> dict[str, int]:
        """Summed counters: published, acked, refused, connects, resend_requests, requeued, connected, pending."""
        out: dict[str, int] = {}
        for dev in self.devices:
            for k, v in dev.counts.items():
                out[k] = out.get(k, 0) + v
        out["connected"] = sum(1 for d in self.devices if d.connected)
        out["pending"] = sum(d.outbox.pending_count() for d in self.devices)
        return out
