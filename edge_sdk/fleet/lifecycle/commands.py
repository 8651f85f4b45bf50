"""Operator -> device commands (``command.schema.json``) and a small MQTT publisher for them.

:func:`command_payload` builds the JSON bytes of one command. :class:`MqttCommandPublisher` is a
:data:`~.rollout.PublishFn` for tools that have no MQTT client of their own (``edge-sdk deploy``,
``edge-sdk rollback``): it connects once (MQTT v5), publishes with QoS 1 and returns only when the broker
acknowledged each message.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from edge_sdk.errors import CommandPublishError
from edge_sdk.mqtt import make_client, parse_mqtt_url, tls_context

__all__ = ["DEFAULT_TTL_S", "CommandPublishError", "MqttCommandPublisher", "command_payload"]

SCHEMA = "edge-sdk/command"
SCHEMA_VERSION = "1.0"


DEFAULT_TTL_S = {"update": 30 * 86400.0, "rollback": 3600.0, "resend": 600.0}
"""How long a command stays valid: a retained ``cmd/update`` must still apply when an offline device returns;
a ``cmd/rollback`` or ``cmd/resend`` queued by the broker for days must not."""


def command_payload(command: str, *, ttl_s: float | None = None, **fields: Any) -> bytes:
    """JSON bytes of one command: schema fields, a fresh ``command_id`` (devices carry out a ``cmd/rollback``
    once per id, across restarts), ``ts`` and ``expires_at`` (``ts`` + ``ttl_s``, default per command:
    :data:`DEFAULT_TTL_S`; devices refuse expired commands), plus ``fields``."""
    now = time.time()
    ttl = DEFAULT_TTL_S.get(command, 3600.0) if ttl_s is None else float(ttl_s)
    payload = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": command,
               "command_id": uuid.uuid4().hex, "ts": now, "expires_at": now + ttl, **fields}
    return json.dumps(payload, separators=(",", ":")).encode()


class MqttCommandPublisher:
    """Publish commands to ``url`` (``mqtt://[user:pass@]host:1883`` or ``mqtts://...:8883``); call it as
    ``publisher(topic, payload, retain)``. ``ca_file``: CA bundle for mqtts (default: the system's)."""

    def __init__(self, url: str, *, client_id: str | None = None, ca_file: str | None = None,
                 timeout: float = 10.0) -> None:
        u = parse_mqtt_url(url, where="--mqtt", error=CommandPublishError)
        self.timeout = timeout
        self._connected = threading.Event()
        self._reason: str | None = None
        tls = tls_context(ca_file, error=CommandPublishError) if u.tls else None
        self._client = make_client(client_id or f"edge-deploy-{uuid.uuid4().hex[:8]}", username=u.username,
                                   password=u.password, tls=tls, extra="fleet",
                                   purpose="publishing deploy commands over MQTT")
        self._client.on_connect = self._on_connect
        try:
            self._client.connect(u.host, u.port, keepalive=30)
        except OSError as exc:
            raise CommandPublishError(f"cannot reach the MQTT broker at {u.address} ({exc}): start it "
                                      "or pass --mqtt URL") from None
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._reason:
            self.close()
            raise CommandPublishError(f"MQTT broker {u.address} refused or did not answer the connection"
                                      f" ({self._reason or 'timeout'}): check --mqtt, user and password")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        if reason_code.is_failure:
            self._reason = str(reason_code)
        self._connected.set()

    @property
    def connected(self) -> bool:
        """True while connected to the broker (paho reconnects by itself after a drop)."""
        return bool(self._client.is_connected())

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        """Publish with QoS 1; raise CommandPublishError unless the broker acknowledged it in time."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise CommandPublishError(f"publishing to {topic} failed ({exc}): check the broker") from None
        if not info.is_published():
            raise CommandPublishError(f"the broker did not acknowledge {topic} within {self.timeout:g} s")

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttCommandPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
