"""One device's paho-mqtt connection: settings → client (TLS, auth, will, v5 session), callbacks → an event queue.

Used by :class:`edge_sdk.device_agent.mqtt_publisher.Publisher`, which owns delivery. The session only reports what
happens on the wire, as tuples put on the publisher's queue (in the order they happen):

    ("up", receive_maximum, maximum_packet_size)   connected; paho's own copies of unacked messages were dropped
    ("down",)                                      connection lost (paho reconnects by itself, with backoff)
    ("ack", mid, reason_code_value, reason_name)   PUBACK for message id ``mid``

On connect it publishes the retained birth status and subscribes to the device's ``cmd/#``. With
``protocol="auto"`` (the default) a broker that refuses MQTT v5 (*unsupported protocol version*), or that never answers
a v5 CONNECT within ``CONNACK_TIMEOUT_S`` before the first successful connection (amqtt 0.12 silently chokes on a v5
will), makes the session rebuild itself as MQTT 3.1.1 once.

Hardening (issue 13): every paho callback is wrapped (:func:`edge_sdk.mqtt.guard`), so no exception ends paho's
network thread; the device asks the broker (MQTT v5 *Maximum Packet Size*) not to send it messages larger than
``MAX_PACKET_BYTES``. A watchdog thread checks every second that the network thread still runs and, while
connected and idle, sends a cheap round trip (an UNSUBSCRIBE of a filter the device never subscribed to, answered
by an UNSUBACK) at most every ``keepalive / 2`` s; a dead thread, or no callback within ``keepalive`` s of a probe,
makes it report ``("down",)``, build a fresh client and connect again (logged once a minute at most).
:attr:`MqttSession.connected` is true only while the broker accepted the connection *and* the network thread runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_sdk.mqtt import LoopWatch, RateLimitedLog, connect_properties, loop_alive, make_client, release_client

if TYPE_CHECKING:
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings

__all__ = ["MqttSession"]

log = logging.getLogger("edge_sdk.device_agent.mqtt")
UNSUPPORTED_PROTOCOL = 0x84
CONNACK_TIMEOUT_S = 5.0
MAX_PACKET_BYTES = 256 * 1024  # commands are parsed only up to edge_sdk.mqtt.MAX_COMMAND_BYTES; larger are dropped
WATCHDOG_PERIOD_S = 1.0
DISCONNECTED_STALL_S = 90.0  # no callback at all (not even a reconnect attempt) for this long: the loop is stuck


class MqttSession:
    """A paho client that reconnects forever and reports connection, PUBACK and message events (see module doc)."""

    def __init__(self, settings: MqttSettings, events: queue.Queue[tuple[Any, ...]], *, will: bytes,
                 birth: Callable[[], bytes], on_message: Callable[[str, bytes], None]) -> None:
        self.settings = settings
        self.events = events
        self.will = will
        self.birth = birth
        self.on_message = on_message
        self.status_topic = f"edge/{settings.fleet}/{settings.device}/status"
        self.cmd_filter = f"edge/{settings.fleet}/{settings.device}/cmd/#"
        self.protocol = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self._up = False  # CONNACK accepted on the current client (see the ``connected`` property)
        self.subscribed = False  # the broker acknowledged the cmd/# subscription on this connection
        self.connects = 0
        self.status_refused = 0
        self._failing = False
        self._attempt = 0
        self._connack = False
        self._connect_failed = False
        self._birth_mid = -1
        self._sub_mid = -1
        self._last_loss_log = -1e9
        self._losses_unlogged = 0
        self._lock = threading.Lock()
        self._client: Any = None
        self._limited = RateLimitedLog(log)
        self._watch = LoopWatch(self._limited, lambda: self._client)
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection and paho's network thread runs."""
        client = self._client
        return self._up and client is not None and loop_alive(client)

    @connected.setter
    def connected(self, value: bool) -> None:
        self._up = value

    @property
    def watchdog_restarts(self) -> int:
        """How often the watchdog replaced a dead or hung client."""
        return self._watch.restarts

    # ---------------------------------------------------------------------------------------------- building
    def _build(self) -> Any:
        s = self.settings
        v5 = self.protocol == "5"
        client = make_client(s.effective_client_id, protocol=self.protocol, username=s.username,
                             password=s.password, tls=s.tls_context(), purpose="publishing telemetry over MQTT")
        client.will_set(self.status_topic, self.will, qos=1, retain=True)
        client.max_inflight_messages_set(s.max_inflight + 4)  # + birth / offline status
        client.reconnect_delay_set(1, 30)
        client.on_pre_connect = self._watch.wrap(self._on_pre_connect, "connect")
        client.on_connect = self._watch.wrap(self._on_connect, "connect")
        client.on_connect_fail = self._watch.wrap(self._on_connect_fail, "connect")
        client.on_disconnect = self._watch.wrap(self._on_disconnect, "disconnect")
        client.on_publish = self._watch.wrap(self._on_publish, "publish")
        client.on_subscribe = self._watch.wrap(self._on_subscribe, "subscribe")
        client.on_unsubscribe = self._watch.wrap(lambda *_a: None, "unsubscribe")  # the watchdog's probe came back
        client.on_message = self._watch.wrap(lambda _c, _u, msg: self.on_message(msg.topic, msg.payload), "message")
        if v5:
            client.connect_async(s.host, s.port, s.keepalive, clean_start=False,
                                 properties=connect_properties(s.session_expiry_s,
                                                               maximum_packet_size=MAX_PACKET_BYTES))
        else:
            client.connect_async(s.host, s.port, s.keepalive)
        return client

    def start(self) -> None:
        """Build the client and start paho's network thread (it connects and reconnects in the background) and the
        watchdog."""
        with self._lock:
            self._stopping.clear()
            self._client = self._build()
            self._watch.reset()
            self._client.loop_start()
        self._watchdog = threading.Thread(target=self._watchdog_loop, name="edge-mqtt-watchdog", daemon=True)
        self._watchdog.start()

    # ---------------------------------------------------------------------------------------------- watchdog
    def _watchdog_loop(self) -> None:
        while not self._stopping.wait(WATCHDOG_PERIOD_S):
            try:
                self._check()
            except Exception as exc:  # the watchdog itself must not die
                self._limited(logging.ERROR, f"watchdog:{type(exc).__name__}", "MQTT watchdog error: %s", exc,
                              exc_info=True)

    def _check(self) -> None:
        client = self._client
        if client is None or self._stopping.is_set():
            return
        why = self._watch.verdict(client, self._up, float(self.settings.keepalive), self.cmd_filter[:-1] + "-watchdog",
                                  DISCONNECTED_STALL_S)
        if why is not None:
            self._restart(client, why)

    def _restart(self, old: Any, why: str) -> None:
        """Replace a client whose network loop died or hangs: report the loss, connect a fresh client."""
        self._limited(logging.ERROR, "watchdog", "MQTT %s for device %s; reconnecting with a new client", why,
                      self.settings.device)
        with self._lock:
            if self._client is not old or self._stopping.is_set():
                return
            self._watch.restarts += 1
            if self._up:
                self.events.put(("down",))  # before the new client's "up"
            self._up, self.subscribed = False, False
            self._client = self._build()
            self._watch.reset()
            self._client.loop_start()
        release_client(old)

    def _fall_back_to_v311(self, old: Any) -> None:
        if self.protocol != "5" or self.connects:
            return
        old.disconnect()
        old.loop_stop()
        with self._lock:
            if self._client is not old:
                return  # stopped meanwhile
            self.protocol = "3.1.1"
            self._client = self._build()
            self._watch.reset()
            self._client.loop_start()

    # ---------------------------------------------------------------------------------------------- callbacks
    def _on_pre_connect(self, client: Any, _userdata: Any) -> None:
        self._attempt += 1
        self._connack = False
        self._connect_failed = False
        if self.settings.protocol == "auto" and self.protocol == "5" and not self.connects:
            timer = threading.Timer(CONNACK_TIMEOUT_S, self._connack_timeout, args=(client, self._attempt))
            timer.daemon = True
            timer.start()

    def _connack_timeout(self, client: Any, attempt: int) -> None:
        if attempt == self._attempt and not self._connack and not self._connect_failed and self._client is client \
                and not self.connects:  # the socket (and TLS) connected, but no CONNACK came
            log.warning("MQTT broker %s:%d did not answer an MQTT v5 CONNECT within %.0f s; falling back to 3.1.1",
                        self.settings.host, self.settings.port, CONNACK_TIMEOUT_S)
            self._fall_back_to_v311(client)

    def _on_connect(self, client: Any, _userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        s = self.settings
        self._connack = True
        if reason.is_failure:
            if s.protocol == "auto" and self.protocol == "5" and reason.value == UNSUPPORTED_PROTOCOL:
                log.warning("MQTT broker %s:%d does not speak MQTT v5; falling back to 3.1.1", s.host, s.port)
                threading.Thread(target=self._fall_back_to_v311, args=(client,), daemon=True).start()
            elif not self._failing:
                self._failing = True
                log.error("MQTT broker %s:%d refused the connection (%s): check the username, password or "
                          "certificate of device %s; retrying", s.host, s.port, reason, s.device)
            return
        client.drop_out_messages()  # the sender republishes from the outbox; paho's memory copies must not race it
        self._failing = False
        self._up = True
        self.connects += 1
        receive_max = getattr(properties, "ReceiveMaximum", 65535) if properties is not None else 65535
        max_packet = getattr(properties, "MaximumPacketSize", 0) if properties is not None else 0
        self._birth_mid = client.publish(self.status_topic, self.birth(), qos=1, retain=True).mid
        self._sub_mid = client.subscribe(self.cmd_filter, qos=1)[1]
        self.events.put(("up", int(receive_max), int(max_packet)))
        log.info("MQTT connected to %s:%d as %s (MQTT %s, session present: %s)", s.host, s.port,
                 s.effective_client_id, self.protocol, bool(flags.session_present))

    def _on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        self._connect_failed = True
        if not self._failing:
            self._failing = True
            log.warning("MQTT broker %s:%d is unreachable; retrying in the background", self.settings.host,
                        self.settings.port)

    def _on_disconnect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        self.subscribed = False
        if self._up:
            self._up = False
            self.events.put(("down",))
            now = time.monotonic()
            if now - self._last_loss_log >= 60.0:  # a flapping connection logs once a minute, not every second
                more = f" ({self._losses_unlogged} more losses in the last minute)" if self._losses_unlogged else ""
                log.warning("MQTT connection to %s:%d lost (%s)%s; reconnecting", self.settings.host,
                            self.settings.port, reason, more)
                self._last_loss_log, self._losses_unlogged = now, 0
            else:
                self._losses_unlogged += 1
        client.will_set(self.status_topic, self.will, qos=1, retain=True)

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, reasons: list[Any], _properties: Any) -> None:
        if mid != self._sub_mid:
            return
        if reasons and not reasons[0].is_failure:
            self.subscribed = True
        else:
            log.error("MQTT broker refused the subscription to %s (%s): commands will not reach this device",
                      self.cmd_filter, reasons[0] if reasons else "no reason code")

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any, _properties: Any) -> None:
        if mid == self._birth_mid and reason.is_failure:
            self.status_refused += 1
            if self.status_refused == 1:
                log.error("MQTT broker refused the status of device %s (%s): its ACL must let user %r publish to %s "
                          "(the shipped ACL needs username == device id)", self.settings.device, reason,
                          self.settings.username, self.status_topic)
        self.events.put(("ack", mid, int(reason.value), str(reason)))

    # ---------------------------------------------------------------------------------------------- use
    def publish(self, topic: str, payload: bytes) -> int | None:
        """Publish QoS 1; the paho message id, or None when not connected (the message is then not tracked).

        Raises ValueError for a topic or payload MQTT cannot carry.
        """
        from paho.mqtt.client import MQTT_ERR_SUCCESS

        client = self._client
        if client is None or not self.connected:
            return None
        info = client.publish(topic, payload, qos=1)
        return int(info.mid) if info.rc == MQTT_ERR_SUCCESS else None

    def stop(self, offline: bytes | None, timeout: float) -> None:
        """Publish the retained clean ``offline`` status (if connected), disconnect and stop the network thread."""
        self._stopping.set()
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        if offline is not None and self._up and loop_alive(client):
            try:
                client.publish(self.status_topic, offline, qos=1, retain=True).wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline status: %s", exc)
        client.drop_out_messages()
        self._up = False
        client.disconnect()
        client.loop_stop()
        if self._watchdog is not None:
            self._watchdog.join(2 * WATCHDOG_PERIOD_S)
        log.info("MQTT disconnected from %s:%d", self.settings.host, self.settings.port)
