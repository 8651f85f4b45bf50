"""The fleet collector: MQTT v5 in, validated rows in the fleet database, gap repair and alerts out.

Threads (and one child process)::

    paho network thread   on_message only parses the topic and enqueues (payload, topic, ack token)
    writer                takes up to ``batch_max`` messages (waits at most ``batch_ms``), has them stored in ONE
                          transaction (``collector.ingest.Ingestor``), then acknowledges them (PUBACK)
    storing process       (``store_process=True``, the default) validates and writes the batches the writer sends
                          it: JSON parsing, schema checks and SQL then do not hold this process's interpreter lock,
                          which the MQTT receive loop needs (measured: ~105 us of CPU per window in one process,
                          against ~55 us for a bare paho subscriber); with ``store_process=False`` the writer
                          thread stores the batches itself
    maintenance           every 0.5 s: gap repair (``cmd/resend``); every ``alert_interval_s``: alert rules

Acknowledgements are manual and sent only after the batch committed, and the session is persistent
(``clean_start=False``, a fixed client id, session expiry): a collector that crashes or restarts gets every
message it had not acknowledged again, and storing is idempotent, so nothing is lost or counted twice.
MQTT v5 *Receive Maximum* (``receive_maximum``) bounds how many unacknowledged messages the broker sends
(Mosquitto 2 applies it to v5 clients instead of its ``max_inflight_messages``). With ``protocol="auto"`` a broker
without MQTT v5 (the embedded amqtt one) gets MQTT 3.1.1 and plain subscriptions.
A message received on an earlier connection is never acknowledged on a later one (packet ids restart per
connection); the broker re-delivers it instead.

Several collectors (distinct client ids) share the load through the ``$share/edge-collectors/...``
subscription. Mosquitto 2.0 keeps dealing a stopped member's share to its persistent session (measured: with
one of two collectors stopped, the other received 50 of 100 windows, the stopped one the other 50 when it came
back). Restart a stopped collector with the same client id, or give group members a shorter
``session_expiry_s``; the gap repair meanwhile asks devices again for what the running collectors miss.

Gap repair: a stream (one device outbox) whose ``contiguous_seq`` stays below its ``max_seq`` for longer
than ``gap_grace_s`` gets a ``cmd/resend`` (command.schema.json, QoS 1) with the missing ranges (at most 100
ranges / 5000 seqs), at most once per ``resend_interval_s`` per stream across all collectors, doubling while the
stream makes no progress (at most every 10 min), and not while the device's status is ``offline``. The device
re-publishes what its outbox still holds and answers the rest with a ``resend.unavailable`` event
(``data = {"stream", "ranges"}``), after which those seqs count as lost and the stream moves on.

Hostile input (issue 13): paho callbacks are guarded (nothing ends the network thread; failures logged once a
minute per kind); a message that cannot be queued is acknowledged and counted (``dropped``); payloads are capped
and parsed without unbounded recursion in :mod:`.validate` (bad ones become dead letters). The maintenance thread
is the network loop's watchdog (:class:`edge_sdk.mqtt.LoopWatch`; ``watchdog_restarts``). The password may come
from ``password_file``, ``$EDGE_SDK_MQTT_PASSWORD_FILE`` or ``$EDGE_SDK_MQTT_PASSWORD``;
:attr:`Collector.mqtt_display` is the broker URL without its password, for printing.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_sdk import mqtt as mq
from edge_sdk.errors import CollectorError
from edge_sdk.fleet.collector.ingest import BatchResult, Ingestor, Message, StoreUnavailable
from edge_sdk.fleet.collector.store_process import StoreProcess
from edge_sdk.fleet.db import Database
from edge_sdk.mqtt import PROTOCOLS, connect_properties, make_client, parse_mqtt_url, tls_context
from edge_sdk.topics import cmd_topic, collector_subscriptions

__all__ = ["Collector", "CollectorError"]

log = logging.getLogger("edge_sdk.fleet.collector.service")
_CONNACK_TIMEOUT_S = 5.0
_UNSUPPORTED_PROTOCOL = 0x84


class Collector:
    """Subscribe to a fleet's telemetry, events and status and store them; see the module docstring.

    ``rules`` is an alert rules file (TOML), an :class:`~edge_sdk.fleet.collector.alerts.AlertRules`, or None for the
    shipped defaults (``edge_sdk/fleet/collector/alerts.toml``); ``webhook`` a URL that alerts are POSTed to;
    ``baselines`` maps ``(model name, version)`` to a bundle manifest's ``baseline`` for pooled drift checks;
    ``alert_interval_s`` defaults to the rules' ``interval_s``; every ``rollout_interval_s`` the staged
    deployments (``edge_sdk.fleet.lifecycle.rollout``) are judged and advanced, halted or rolled back.
    """

    def __init__(self, db_url: str, mqtt_url: str, *, fleet: str = "+", client_id: str | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, shared: bool = True,
                 batch_max: int = 500, batch_ms: float = 50, rules: Any = None, webhook: str | None = None,
                 gap_grace_s: float = 2.0, resend_interval_s: float = 5.0, alert_interval_s: float | None = None,
                 session_expiry_s: int = 7 * 24 * 3600, receive_maximum: int = 2000, keepalive: int = 30,
                 baselines: dict[tuple[str, str], dict] | None = None, rollout_interval_s: float = 5.0,
                 protocol: str = "auto", store_process: bool = True, password_file: str | None = None) -> None:
        if fleet != "+":
            from edge_sdk.topics import validate_id

            try:
                validate_id(fleet, "fleet")
            except ValueError as exc:
                raise CollectorError(f"{exc} (or '+' for every fleet)") from None
        if protocol not in PROTOCOLS:
            raise CollectorError(f"MQTT protocol {protocol!r} is not valid: use {', '.join(PROTOCOLS)}")
        if batch_max < 1 or batch_ms < 0:
            raise CollectorError("batch_max must be >= 1 and batch_ms >= 0")
        url = parse_mqtt_url(mqtt_url, where="--mqtt", error=CollectorError)
        self.host, self.port, self.tls = url.host, url.port, url.tls
        self.username = username if username is not None else url.username
        self.password = mq.resolve_password(password, password_file, url.password, error=CollectorError)
        self.mqtt_display = mq.redact_url(mqtt_url.strip())  # for messages: never the password
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        for label, path in (("--ca-file", ca_file), ("--cert-file", cert_file), ("--key-file", key_file)):
            if path is not None and not Path(path).is_file():
                raise CollectorError(f"{label} {path}: file not found")
        self.fleet = fleet
        self.client_id = client_id or f"edge-collector-{socket.gethostname()}"[:64]
        self.shared = shared
        self.protocol_choice = protocol
        self.protocol = "3.1.1" if protocol == "3.1.1" else "5"
        self.subscriptions = collector_subscriptions(fleet, shared=shared and self.protocol == "5")
        self.batch_max, self.batch_s = int(batch_max), batch_ms / 1000.0
        self.gap_grace_s, self.resend_interval_s = float(gap_grace_s), float(resend_interval_s)
        self.session_expiry_s, self.receive_maximum, self.keepalive = session_expiry_s, receive_maximum, keepalive
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            raise CollectorError(f"webhook {webhook!r} must be an http:// or https:// URL")
        from edge_sdk.fleet.collector.alerts import AlertEngine, load_rules

        rule_set = rules if rules is not None and not isinstance(rules, (str, Path)) else load_rules(rules)
        self.db = Database.connect(db_url)
        self.db.migrate()
        self.ingestor = Ingestor(self.db)  # gap repair here; batches go to the storing process (or this one)
        self._store_process = StoreProcess(db_url) if store_process else None
        if self._store_process is not None:
            try:
                self._store_process.ensure()  # started now: start() only has to connect
            except StoreUnavailable as exc:
                self.db.close()
                raise CollectorError(str(exc)) from None
        self.alerts = AlertEngine(self.db, rule_set, webhook=webhook, baselines=baselines, fleet=fleet)
        self.alert_interval_s = float(alert_interval_s if alert_interval_s is not None else rule_set.interval_s)
        from edge_sdk.fleet.lifecycle.rollout import Rollout

        self.rollout = Rollout(self.db, self._publish_command)  # staged deployments (issue 6), judged here
        self.rollout_interval_s = float(rollout_interval_s)
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._client: Any = None
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # set on the SUBACK of the subscriptions sent by the last connect
        self._sub_mid: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_lock = threading.Lock()
        self._gap_seen: dict[str, tuple[int, float]] = {}
        self._resend_attempts: dict[str, tuple[int, int]] = {}
        self._lags: deque[float] = deque(maxlen=10_000)
        self._counts = {k: 0 for k in ("received", "stored", "duplicates", "events", "statuses", "dead_letters",
                                       "resend_requests", "batches", "acked", "db_errors", "alerts_opened",
                                       "alerts_resolved", "foreign_streams")}
        self.started_at: float | None = None
        self._silent_since: float | None = None
        self._ever_connected = False
        self._v5_refused = False
        self._limited = mq.RateLimitedLog(log)
        self._watch = mq.LoopWatch(self._limited, lambda: self._client)
        self._counts["dropped"] = self._counts["watchdog_restarts"] = 0

    # -- MQTT -----------------------------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        tls = None
        if self.tls or self.ca_file or self.cert_file:
            tls = tls_context(self.ca_file, self.cert_file, self.key_file, error=CollectorError)
        client = make_client(self.client_id, protocol=self.protocol, username=self.username, password=self.password,
                             tls=tls, manual_ack=True, extra="fleet", purpose="the fleet collector")
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_pre_connect = self._watch.wrap(lambda *_a: None, "connect")
        client.on_connect = self._watch.wrap(self._on_connect, "connect")
        client.on_connect_fail = self._watch.wrap(lambda *_a: None, "connect")
        client.on_disconnect = self._watch.wrap(self._on_disconnect, "disconnect")
        client.on_message = self._watch.wrap(self._on_message, "message")
        client.on_subscribe = self._watch.wrap(self._on_subscribe, "subscribe")
        client.on_unsubscribe = self._watch.wrap(lambda *_a: None, "subscribe")
        props = connect_properties(self.session_expiry_s, self.receive_maximum) if self.protocol == "5" else None
        try:
            if props is not None:
                client.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=False,
                                     properties=props)
            else:
                client.connect_async(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            raise CollectorError(f"cannot connect to MQTT {self.host}:{self.port}: {exc}") from None
        self._watch.reset()
        return client  # the caller assigns self._client, then calls loop_start(): callbacks check the client

    def _watchdog(self) -> None:
        """Maintenance thread: replace a client whose network thread died or stopped answering (module doc)."""
        client = self._client
        if client is None or self._stop.is_set():
            return
        why = self._watch.verdict(client, self.connected, self.keepalive, "edge/-collector-watchdog")
        if why is None:
            return
        self._limited(logging.ERROR, "watchdog", "MQTT %s; reconnecting to %s with a new client", why,
                      self.mqtt_display)
        self._counts["watchdog_restarts"] += 1
        self._connected.clear()
        self._client = self._make_client()
        self._client.loop_start()
        mq.release_client(client)

    def _maybe_fall_back(self) -> None:
        """``protocol="auto"``: a broker that refuses MQTT v5 (reason 0x84) or never answers a v5 CONNECT within
        5 s before the first connection (the embedded amqtt broker) gets MQTT 3.1.1 and plain subscriptions."""
        if self.protocol_choice != "auto" or self.protocol != "5" or self._ever_connected:
            return
        if not self._v5_refused:
            # only a broker that took the TCP connection and stays silent counts; a broker that is down does not
            if self._client is None or self._client.socket() is None or self.connected:
                self._silent_since = None
                return
            now = time.monotonic()
            if self._silent_since is None:
                self._silent_since = now
            if now - self._silent_since < _CONNACK_TIMEOUT_S:
                return
        log.warning("MQTT broker %s:%d does not take MQTT v5; using 3.1.1 without shared subscriptions",
                    self.host, self.port)
        old = self._client
        old.on_connect = old.on_disconnect = old.on_message = None
        old.loop_stop()
        old.disconnect()
        self.protocol = "3.1.1"
        self.subscriptions = collector_subscriptions(self.fleet, shared=False)
        self._client = self._make_client()
        self._client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            if getattr(reason_code, "value", None) == _UNSUPPORTED_PROTOCOL and self.protocol == "5":
                self._v5_refused = True
                return
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        self._ever_connected = True
        self._generation += 1
        self._subscribed.clear()
        self._sub_mid = client.subscribe([(t, 1) for t in self.subscriptions])[1]
        self._connected.set()
        log.info("connected to %s:%d as %s (session present: %s)", self.host, self.port, self.client_id,
                 getattr(flags, "session_present", None))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        # a slow broker (the embedded amqtt) may still be processing SUBSCRIBE when a device publishes: until the
        # SUBACK, messages on a clean 3.1.1 session are not routed to us, so wait_connected() waits for it
        if mid == self._sub_mid:
            self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("disconnected from %s:%d (%s); reconnecting", self.host, self.port, reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            topic = msg._topic.decode("utf-8", "replace") if isinstance(msg._topic, bytes) else str(msg._topic)
            self._counts["received"] += 1
            self._queue.put(Message(topic, msg.payload, time.time(), (self._generation, msg.mid, msg.qos)))
        except Exception as exc:  # acknowledge what cannot even be queued: re-delivered, it would fail again
            self._counts["dropped"] += 1
            self._limited(logging.ERROR, f"message:{type(exc).__name__}", "dropped an MQTT message: %s: %s",
                          type(exc).__name__, str(exc)[:200], exc_info=True)
            if getattr(msg, "qos", 0) > 0:
                client.ack(msg.mid, msg.qos)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self, *, wait_s: float = 0.0) -> None:
        """Connect (in the background, retrying) and start the writer and maintenance threads.

        ``wait_s`` > 0 waits that long for the first connection and raises :class:`CollectorError` without it.
        """
        if self._client is not None:
            return
        self.started_at = time.time()
        self._client = self._make_client()
        self._client.loop_start()
        for name, target in (("writer", self._writer), ("maintenance", self._maintenance)):
            t = threading.Thread(target=target, name=f"edge-collector-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if wait_s > 0 and not self.wait_connected(wait_s):
            self.stop()
            raise CollectorError(f"no connection to MQTT {self.host}:{self.port} within {wait_s:g} s: "
                                 "check --mqtt, that the broker runs, and the credentials")

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and the broker has acknowledged the subscriptions (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        return self._connected.wait(timeout) and self._subscribed.wait(max(0.0, deadline - time.monotonic()))

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up."""
        return self._connected.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what was received, then disconnect (the session stays on the broker)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        if self._store_process is not None:
            self._store_process.close()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self.alerts.close()
        self.db.close()

    def run_forever(self, *, on_stop: Callable[[], None] | None = None) -> int:
        """Run until SIGTERM or SIGINT, then stop cleanly (``on_stop`` is called first); returns 0."""
        done = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: done.set())
        self.start()
        if not self.wait_connected(5.0):
            log.warning("no connection to MQTT %s:%d yet; still trying", self.host, self.port)
        try:
            while not done.wait(1.0):
                pass
        finally:
            if on_stop is not None:
                on_stop()
            self.stop()
        return 0

    # -- writer ---------------------------------------------------------------------------------------------------
    def _take(self) -> list[Message] | None:
        """Up to batch_max messages; waits up to batch_s for more, but commits as soon as the stream pauses
        (the broker sends at most Receive Maximum messages before it needs acknowledgements)."""
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return [] if not self._stop.is_set() else None
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=min(remaining, 0.002))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the loop see the stop marker after this batch
                break
            batch.append(item)
        return batch

    def _writer(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            result = self._store_with_retry(batch)
            if result is None:
                return  # stopping while the database is down: nothing acknowledged, the broker re-delivers
            self._ack(batch)
            self._account(result)

    def _store_with_retry(self, batch: list[Message]) -> BatchResult | None:
        delay = 0.5
        while True:
            try:
                if self._store_process is not None:
                    return self._store_process.store(batch)
                return self.ingestor.store_batch(batch)
            except StoreUnavailable as exc:
                self._counts["db_errors"] += 1
                log.error("%s; retrying in %.1f s (%d messages held, not acknowledged)", exc, delay, len(batch))
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, 10.0)

    def _ack(self, batch: list[Message]) -> None:
        client, gen = self._client, self._generation
        acked = 0
        for m in batch:
            g, mid, qos = m.token
            if qos > 0 and g == gen and client is not None:
                client.ack(mid, qos)
                acked += 1
        self._counts["acked"] += acked

    def _account(self, r: BatchResult) -> None:
        c = self._counts
        c["batches"] += 1
        c["stored"] += r.stored
        c["duplicates"] += r.duplicates
        c["events"] += r.events
        c["statuses"] += r.statuses
        c["dead_letters"] += r.dead_letters
        c["foreign_streams"] += r.foreign_streams
        self._lags.extend(r.lags)
        if r.window_devices:
            with self._dirty_lock:
                self._dirty |= r.window_devices

    # -- maintenance: gap repair and alerts ---------------------------------------------------------------------
    def _publish_command(self, topic: str, payload: bytes, retain: bool) -> None:
        """Rollout publish function: QoS 1, returns after the broker's PUBACK (maintenance thread only)."""
        client = self._client
        if client is None or not self._connected.is_set():
            raise CollectorError("not connected to the MQTT broker: the rollout step is retried")
        info = client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(10.0)
        except (RuntimeError, ValueError) as exc:
            raise CollectorError(f"publishing {topic} failed: {exc}") from None
        if not info.is_published():
            raise CollectorError(f"the broker did not acknowledge {topic} within 10 s")

    def _maintenance(self) -> None:
        next_alerts = time.monotonic() + min(self.alert_interval_s, 1.0)
        next_rollout = time.monotonic()
        first = True
        while not self._stop.wait(0.5):
            try:
                self._watchdog()
                self._maybe_fall_back()
                self.repair_gaps()
                if time.monotonic() >= next_rollout:
                    next_rollout = time.monotonic() + self.rollout_interval_s
                    for d in self.rollout.tick():
                        log.info("rollout %s: %s - %s", d.deployment_id, d.decision, d.reason)
                if time.monotonic() >= next_alerts:
                    next_alerts = time.monotonic() + self.alert_interval_s
                    with self._dirty_lock:
                        dirty, self._dirty = self._dirty, set()
                    changes = self.alerts.evaluate(None if first else dirty, collector_started=self.started_at)
                    first = False
                    self._counts["alerts_opened"] += sum(1 for ch in changes if ch.action == "opened")
                    self._counts["alerts_resolved"] += sum(1 for ch in changes if ch.action == "resolved")
            except Exception:  # outermost loop of a long-running service: log, keep going
                log.exception("maintenance pass failed; retrying in 0.5 s")

    def repair_gaps(self, now: float | None = None) -> int:
        """Ask devices for windows missing for longer than the grace period; returns the requests sent."""
        now = time.time() if now is None else now
        sent = 0
        gaps = self.ingestor.gaps()
        alive = {g.stream for g in gaps}
        for seen in (self._gap_seen, self._resend_attempts):
            for stream in [st for st in seen if st not in alive]:
                del seen[stream]
        for g in gaps:
            seen = self._gap_seen.get(g.stream)
            if seen is None or seen[0] != g.contiguous_seq:
                self._gap_seen[g.stream] = (g.contiguous_seq, now)
                continue
            if now - seen[1] < self.gap_grace_s:
                continue
            contiguous, max_seq = self.ingestor.advance(g.stream)  # another collector may have filled it
            if contiguous >= max_seq:
                self._gap_seen.pop(g.stream, None)
                continue
            if contiguous != g.contiguous_seq:
                self._gap_seen[g.stream] = (contiguous, now)
                continue
            if g.device_state == "offline":
                continue  # asked again once it is back and sends (its birth message comes first)
            ranges = self.ingestor.missing_ranges(g.stream, contiguous, max_seq)
            client = self._client
            if not ranges or client is None or not self.connected:
                continue
            # back off (x2 per unanswered request, at most 10 min) while the stream makes no progress
            at, attempts = self._resend_attempts.get(g.stream, (contiguous, 0))
            attempts = attempts if at == contiguous else 0
            interval = min(self.resend_interval_s * 2 ** min(attempts, 10), 600.0)
            if not self.ingestor.claim_resend(g.stream, now, interval):
                continue
            self._resend_attempts[g.stream] = (contiguous, attempts + 1)
            command = {"schema": "edge-sdk/command", "schema_version": "1.0", "command": "resend",
                       "command_id": uuid.uuid4().hex, "ts": now, "stream": g.stream,
                       "ranges": [[a, b] for a, b in ranges]}
            client.publish(cmd_topic(g.fleet, g.device, "resend"), json.dumps(command), qos=1)
            self._counts["resend_requests"] += 1
            sent += 1
            log.info("asked %s/%s to resend %s of stream %s", g.fleet, g.device, ranges[:5], g.stream)
        return sent

    # -- stats ----------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since start plus the ingest lag (received_at - window end) of recent windows, in seconds."""
        out: dict[str, Any] = dict(self._counts)
        out["queue"] = self._queue.qsize()
        out["connected"] = self.connected
        out["protocol"] = self.protocol
        lags = sorted(self._lags)
        if lags:
            out["lag_p50_s"] = lags[len(lags) // 2]
            out["lag_p99_s"] = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            out["lag_max_s"] = lags[-1]
        return out
