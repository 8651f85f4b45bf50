"""Deliver the on-disk outbox to an MQTT broker: QoS 1, in order, nothing lost, duplicates allowed.

paho's own queue lives in memory and its message ids restart per connection, so it is not trusted with anything:

* a sender thread reads :meth:`Outbox.pending` in row-id order and publishes at most ``max_inflight`` rows (and no
  more than the broker's v5 *Receive Maximum*) without a PUBACK; it maps paho's message id to the outbox row id;
* a PUBACK with a reason code below 0x80 acks the row in the outbox (acks are written in batches);
* on every (re)connection paho's copies of unacknowledged messages are dropped and the sender publishes the pending
  rows again from the oldest: a window may arrive twice (the collector stores by ``window_id``), never zero times;
* a refused PUBACK (reason code >= 0x80): *packet too large*, *topic name invalid* and *payload format invalid* can
  never succeed, so the row is moved aside (``Outbox.reject``, counted as ``rejected``); any other refusal (e.g.
  *not authorized*, *quota exceeded*) leaves the row pending and pauses sending (1 s doubling to 60 s), because it
  may be a broker or ACL problem that an operator fixes;
* a row larger than the broker's *Maximum Packet Size* is moved aside before sending (the broker would disconnect).

Status: a retained birth ``online`` (``status.schema.json``) on every connect, a retained last will ``offline``
(published by the broker when the device vanishes) and a clean retained ``offline`` on :meth:`Publisher.stop`.
Commands: the device subscribes to its own ``edge/<fleet>/<device>/cmd/#`` (QoS 1). ``cmd/resend`` is answered
here (:meth:`Outbox.resend`, plus a ``resend.unavailable`` event for the ranges the outbox no longer has); every other
command goes to ``on_command(name, payload)`` on a separate thread (``cmd/update`` is retained: it arrives on every
connect, so the handler compares it with what runs). MQTT v5 with a persistent session (clean start off, session
expiry); when the broker refuses v5 (e.g. the embedded amqtt broker) the publisher falls back to MQTT 3.1.1.

Hostile commands (issue 13): a command payload is parsed only up to ``MAX_COMMAND_BYTES`` and
``MAX_COMMAND_DEPTH`` levels of nesting (checked without recursion before ``json.loads``); what is refused is
counted (``commands_rejected``) and logged once a minute at most per kind; at most ``COMMAND_QUEUE`` commands wait
for the handler (more are dropped and counted as ``commands_dropped``); a failing handler is logged the same way.
Nothing a command carries can end a thread: the network thread is watched (:mod:`.mqtt_session`).
The password may come from ``$EDGE_SDK_MQTT_PASSWORD_FILE`` or ``$EDGE_SDK_MQTT_PASSWORD`` when a user name is
set and no password is given; ``repr()`` of the settings shows neither the password nor the one in the URL.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_sdk import __version__
from edge_sdk._deps import require
from edge_sdk.device_agent.mqtt_session import MqttSession
from edge_sdk.device_agent.outbox import Outbox, OutboxError
from edge_sdk.errors import TelemetryError
from edge_sdk.mqtt import (
    MAX_COMMAND_BYTES,
    MAX_COMMAND_DEPTH,
    PROTOCOLS,
    MqttURL,
    PayloadRejected,
    RateLimitedLog,
    loads_command,
    parse_mqtt_url,
    redact_url,
    resolve_password,
    tls_context,
)
from edge_sdk.topics import device_topic, validate_id

__all__ = ["MqttSettings", "Publisher"]

log = logging.getLogger("edge_sdk.device_agent.mqtt")

# reason codes after which the same message can never be accepted: move it aside instead of retrying forever
PERMANENT_REFUSALS = {0x90: "topic name invalid", 0x95: "packet too large", 0x99: "payload format invalid"}
MAX_PAUSE_S = 60.0
COMMAND_QUEUE = 256  # commands waiting for the handler; a flood beyond this is dropped, not held in memory


@dataclass(frozen=True)
class MqttSettings:
    """Where and how a device connects: ``url`` is ``mqtt://host:1883`` or ``mqtts://host:8883`` (TLS).

    TLS is also used when ``ca_file`` is set; ``cert_file``/``key_file`` add a client certificate;
    ``tls_insecure=True`` skips the server *hostname* check (the certificate chain is still verified).
    ``protocol``: ``"auto"`` (MQTT v5, falling back to 3.1.1 for a broker without v5), ``"5"`` or ``"3.1.1"``.
    """

    url: str
    fleet: str
    device: str
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 100
    protocol: str = "auto"
    _parsed: MqttURL = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = parse_mqtt_url(self.url, where="MQTT settings", error=TelemetryError)
        object.__setattr__(self, "_parsed", parsed)
        if self.username is None and parsed.username is not None:  # mqtt://user:password@host
            object.__setattr__(self, "username", parsed.username)
            object.__setattr__(self, "password", self.password if self.password is not None else parsed.password)
        if self.username is not None and self.password is None:  # from $EDGE_SDK_MQTT_PASSWORD(_FILE), if set
            object.__setattr__(self, "password", resolve_password(error=TelemetryError))
        try:
            validate_id(self.fleet, "fleet")
            validate_id(self.device, "device")
        except ValueError as exc:
            raise TelemetryError(f"MQTT settings: {exc}") from None
        for name, low in (("keepalive", 5), ("session_expiry_s", 0), ("max_inflight", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TelemetryError(f"MQTT setting {name}={value!r} is not valid: use an integer >= {low}")
        if self.protocol not in PROTOCOLS:
            raise TelemetryError(f"MQTT protocol {self.protocol!r} is not valid: use {', '.join(PROTOCOLS)}")
        if self.key_file and not self.cert_file:
            raise TelemetryError("MQTT key_file is set without cert_file: give the client certificate too")

    def __repr__(self) -> str:
        """The settings without secrets (they end up in logs and tracebacks)."""
        return (f"MqttSettings(url={redact_url(self.url)!r}, fleet={self.fleet!r}, device={self.device!r}, "
                f"client_id={self.effective_client_id!r}, username={self.username!r}, "
                f"password={'***' if self.password else None!r}, tls={self.tls}, protocol={self.protocol!r})")

    @property
    def host(self) -> str:
        """Broker host name or address."""
        return self._parsed.host

    @property
    def tls(self) -> bool:
        """True for ``mqtts://`` / ``ssl://`` or when a CA file is given."""
        return self._parsed.tls or bool(self.ca_file)

    @property
    def port(self) -> int:
        """Broker port (default 8883 with TLS, 1883 without)."""
        return self._parsed.given_port or (8883 if self.tls else 1883)

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context when :attr:`tls` (files checked now: a missing one raises TelemetryError)."""
        if not self.tls:
            return None
        return tls_context(self.ca_file, self.cert_file, self.key_file, insecure=self.tls_insecure,
                           error=TelemetryError)

    @property
    def effective_client_id(self) -> str:
        """``client_id`` or ``edge-<fleet>-<device>``: one stable id per device (its persistent session)."""
        return self.client_id or f"edge-{self.fleet}-{self.device}"


class Publisher:
    """Publishes an :class:`Outbox` to the broker and receives the device's commands (see the module docstring)."""

    def __init__(self, settings: MqttSettings, outbox: Outbox, *, model: dict[str, Any] | None = None,
                 window_s: float | None = None,
                 on_command: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.model = {k: model[k] for k in ("name", "version", "artifact", "runtime") if k in model} if model else None
        self.window_s = window_s
        self.on_command = on_command
        self.status_topic = device_topic(settings.fleet, settings.device, "status")
        self.events_topic = device_topic(settings.fleet, settings.device, "events")
        self.cmd_prefix = f"edge/{settings.fleet}/{settings.device}/cmd/"
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._commands: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(COMMAND_QUEUE)
        self._limited = RateLimitedLog(log)
        self._session: MqttSession | None = None
        self._sender: threading.Thread | None = None
        self._commander: threading.Thread | None = None
        self._idle = threading.Condition()
        self._counts = {"published": 0, "acked": 0, "refused": 0, "rejected": 0, "resend_requests": 0,
                        "requeued": 0, "commands": 0, "commands_rejected": 0, "commands_dropped": 0}
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id (sender thread only)

    # ---------------------------------------------------------------------------------------------- lifecycle
    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._session is not None and self._session.connected

    def start(self) -> None:
        """Connect in the background (retrying forever with backoff) and start sending; returns immediately."""
        if self._sender is not None:
            return
        require("paho.mqtt.client", "agent", "publishing telemetry over MQTT")
        self._session = MqttSession(self.settings, self._events, will=self._status("offline", "last will"),
                                    birth=lambda: self._status("online", "connected"), on_message=self._on_message)
        self._session.start()
        self._sender = threading.Thread(target=self._send_loop, name="edge-mqtt-sender", daemon=True)
        self._commander = threading.Thread(target=self._command_loop, name="edge-mqtt-commands", daemon=True)
        self._sender.start()
        self._commander.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wait briefly for in-flight PUBACKs, publish a retained clean ``offline`` status and disconnect."""
        if self._sender is None or self._session is None:
            return
        deadline = time.monotonic() + timeout
        self._events.put(("stop",))
        self._sender.join(max(0.1, (deadline - time.monotonic()) / 2))
        try:
            self._commands.put(None, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._session.stop(self._status("offline", "shutdown"), max(0.1, deadline - time.monotonic()))
        if self._commander is not None:
            self._commander.join(max(0.1, deadline - time.monotonic()))
        self._sender = None

    def wakeup(self) -> None:
        """Tell the sender that new rows are in the outbox (otherwise it looks every 0.5 s)."""
        self._events.put(("wake",))

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox has no pending rows; True if it emptied within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self.wakeup()
        with self._idle:
            while self.outbox.pending_count() > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
        return True

    def stats(self) -> dict[str, Any]:
        """State and counters: connected, subscribed (to cmd/#), protocol, connects, published, acked, refused,
        rejected, resend_requests, requeued, commands (handled), commands_rejected (payload refused unparsed),
        commands_dropped (queue full), watchdog_restarts, status_refused, inflight, outbox_pending."""
        session = self._session
        return {"connected": self.connected, "subscribed": bool(session and session.subscribed and self.connected),
                "watchdog_restarts": session.watchdog_restarts if session else 0,
                "protocol": session.protocol if session else None,
                "connects": session.connects if session else 0, **self._counts,
                "status_refused": session.status_refused if session else 0, "inflight": len(self._inflight),
                "outbox_pending": self.outbox.pending_count()}

    # ---------------------------------------------------------------------------------------------- payloads
    def _status(self, state: str, reason: str) -> bytes:
        body = {"schema": "edge-sdk/status", "schema_version": "1.0", "fleet": self.settings.fleet,
                "device": self.settings.device, "state": state, "reason": reason, "ts": round(time.time(), 3),
                # the will is composed at connect time: its model may be stale by the time the broker sends it
                "model": None if reason == "last will" else self.model, "agent_version": __version__,
                "window_s": self.window_s}
        return json.dumps(body, separators=(",", ":")).encode()

    def _event(self, kind: str, data: dict[str, Any], level: str = "info") -> dict[str, Any]:
        return {"schema": "edge-sdk/event", "schema_version": "1.0", "event_id": uuid.uuid4().hex,
                "fleet": self.settings.fleet, "device": self.settings.device, "ts": round(time.time(), 3),
                "kind": kind, "level": level, "data": data}

    # ---------------------------------------------------------------------------------------------- sending
    def _send_loop(self) -> None:
        online = False
        window = 1
        max_packet = 0
        cursor = 0  # every pending row with id <= cursor is in flight on this connection (or was acked)
        pause_until = 0.0
        pause = 1.0
        stop_at: float | None = None
        busy = False  # the last round published something: look for more without waiting
        while True:
            try:
                can_send = busy and online and stop_at is None and len(self._inflight) < window \
                    and time.monotonic() >= pause_until
                events = self._drain(0.0 if can_send else 0.5)  # a wakeup, a PUBACK or a connection event ends the wait
                busy = False
                acks: list[int] = []
                for event in events:
                    kind = event[0]
                    if kind == "ack":
                        rowid = self._inflight.pop(event[1], None)
                        if rowid is None:
                            continue
                        code, name = event[2], event[3]
                        if code < 0x80:
                            acks.append(rowid)
                            pause = 1.0
                        elif code in PERMANENT_REFUSALS:
                            self._reject(rowid, f"the broker refused it for good ({name})")
                        else:
                            self._counts["refused"] += 1
                            cursor = 0
                            if time.monotonic() >= pause_until:
                                log.warning("broker refused outbox row %d (%s): kept pending, sending paused for "
                                            "%.0f s (check the broker ACL for this device)", rowid, name, pause)
                                pause_until, pause = time.monotonic() + pause, min(pause * 2, MAX_PAUSE_S)
                    elif kind == "up":
                        online, self._inflight, cursor = True, {}, 0
                        window = max(1, min(self.settings.max_inflight, event[1] - 1))
                        max_packet = event[2]
                    elif kind == "down":
                        online, self._inflight = False, {}
                    elif kind == "rewind":
                        cursor = 0
                    elif kind == "stop":
                        stop_at = time.monotonic() + 2.0
                if acks:
                    self._counts["acked"] += len(acks)
                    try:
                        self.outbox.ack_many(acks)
                    except OutboxError as exc:
                        log.error("%s (the rows are sent again)", exc)
                        cursor = 0
                    with self._idle:
                        self._idle.notify_all()
                if stop_at is not None:
                    if not self._inflight or not online or time.monotonic() > stop_at:
                        return
                    continue
                if online and len(self._inflight) < window and time.monotonic() >= pause_until:
                    before = self._counts["published"]
                    cursor = self._publish_some(window, max_packet, cursor)
                    busy = self._counts["published"] > before
            except OutboxError as exc:  # e.g. disk full or the file closed under us: rows stay where they are
                log.error("MQTT sender: %s; retrying in 1 s", exc)
                cursor = 0
                time.sleep(1.0)
            except Exception:  # the sender must outlive any bug or broker surprise; log it and keep going
                log.exception("MQTT sender error; retrying in 1 s")
                time.sleep(1.0)

    def _reject(self, rowid: int, why: str) -> None:
        """Move a row that can never be delivered aside (kept in the outbox as ``rejected``, never resent)."""
        self._counts["rejected"] += 1
        log.error("outbox row %d is kept aside and not sent: %s", rowid, why)
        try:
            self.outbox.reject(rowid)
        except OutboxError as exc:
            log.error("%s", exc)

    def _drain(self, wait: float) -> list[tuple[Any, ...]]:
        events: list[tuple[Any, ...]] = []
        try:
            events.append(self._events.get(timeout=wait) if wait > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return events

    def _publish_some(self, window: int, max_packet: int, cursor: int) -> int:
        session = self._session
        if session is None:
            return cursor
        in_flight_rows = set(self._inflight.values())
        # rows in flight have ids <= cursor, except right after a rewind (cursor 0): then skip over them
        limit = window - len(self._inflight) + (len(in_flight_rows) if cursor == 0 else 0)
        for message in self.outbox.pending(max(1, limit), after=cursor):
            if message.rowid in in_flight_rows:
                cursor = message.rowid
                continue
            if len(self._inflight) >= window:
                break
            size = len(message.payload) + len(message.topic.encode()) + 16
            if max_packet and size > max_packet:
                self._reject(message.rowid, f"{size} bytes exceed the broker's maximum packet size {max_packet}")
                cursor = message.rowid
                continue
            try:
                mid = session.publish(message.topic, message.payload)
            except ValueError as exc:
                self._reject(message.rowid, f"MQTT cannot carry it ({exc})")
                cursor = message.rowid
                continue
            if mid is None:  # not connected any more: the "down" event follows
                break
            self._inflight[mid] = message.rowid
            self._counts["published"] += 1
            cursor = message.rowid
        return cursor

    # ---------------------------------------------------------------------------------------------- commands
    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's network thread: parse a command (bounded, see the module docstring) and queue it; never raises."""
        if not topic.startswith(self.cmd_prefix):
            return
        name = topic[len(self.cmd_prefix):]
        if not payload:
            return  # an empty retained message only clears a command
        try:
            body = loads_command(payload, max_bytes=MAX_COMMAND_BYTES, max_depth=MAX_COMMAND_DEPTH)
        except PayloadRejected as exc:
            self._counts["commands_rejected"] += 1
            self._limited(logging.WARNING, f"reject:{exc.kind}", "ignored command on %s: %s", topic[:200], exc.reason)
            return
        if not isinstance(body, dict):
            self._counts["commands_rejected"] += 1
            self._limited(logging.WARNING, "reject:not_object", "ignored command on %s: payload is not a JSON object",
                          topic[:200])
            return
        try:
            self._commands.put_nowait((name, body))
        except queue.Full:
            self._counts["commands_dropped"] += 1
            self._limited(logging.WARNING, "dropped", "dropped command on %s: %d commands are already waiting",
                          topic[:200], COMMAND_QUEUE)

    def _command_loop(self) -> None:
        while True:
            item = self._commands.get()
            if item is None:
                return
            name, body = item
            self._counts["commands"] += 1
            try:
                if name == "resend":
                    self._resend(body)
                elif self.on_command is not None:
                    self.on_command(name, body)
                else:
                    self._limited(logging.INFO, "no_handler", "command %s received; no handler is installed",
                                  name[:64])
            except Exception as exc:  # a bad command or handler must not stop command processing
                self._limited(logging.ERROR, f"failed:{name[:32]}:{type(exc).__name__}", "command %s failed: %s: %s",
                              name[:64], type(exc).__name__, str(exc)[:200], exc_info=True)

    def _resend(self, body: dict[str, Any]) -> None:
        stream, ranges = body.get("stream"), body.get("ranges")
        if not isinstance(stream, str) or not isinstance(ranges, list) or len(ranges) > 100 or not all(
                isinstance(r, list | tuple) and len(r) == 2 for r in ranges):
            self._limited(logging.WARNING, "resend:shape", "ignored cmd/resend: it needs 'stream' and up to 100 "
                          "'ranges' [first, last]")
            return
        self._counts["resend_requests"] += 1
        try:
            requeued, unavailable = self.outbox.resend(stream, [(r[0], r[1]) for r in ranges])
        except OutboxError as exc:
            self._limited(logging.WARNING, "resend:ranges", "ignored cmd/resend: %s", str(exc)[:200])
            return
        self._counts["requeued"] += requeued
        self._limited(logging.INFO, "resend:done", "cmd/resend: %d window(s) queued again, %d range(s) unavailable",
                      requeued, len(unavailable))
        if unavailable:
            cid = body.get("command_id")
            data = {"stream": stream[:200], "ranges": [list(r) for r in unavailable],
                    "command_id": cid if isinstance(cid, str) and len(cid) <= 64 else None}
            self.outbox.put(self.events_topic, self._event("resend.unavailable", data, "warning"))
        self._events.put(("rewind",))
