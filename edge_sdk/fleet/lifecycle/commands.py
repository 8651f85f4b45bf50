"""Operator -> device commands (``command.schema.json``) and a small MQTT publisher for them.

:func:`command_payload` builds the JSON bytes of one command. :class:`MqttCommandPublisher` is a
:data:`~.rollout.PublishFn` for tools that have no MQTT client of their own (``edge-sdk deploy``,
``edge-sdk rollback``): it connects once (MQTT v5), publishes with QoS 1 and returns only when the broker
acknowledged each message.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from edge_sdk._deps import require
from edge_sdk.errors import EdgeSDKError

__all__ = ["CommandPublishError", "MqttCommandPublisher", "command_payload"]

SCHEMA = "edge-sdk/command"
SCHEMA_VERSION = "1.0"


class CommandPublishError(EdgeSDKError):
    """A command could not be delivered to the broker."""


def command_payload(command: str, **fields: Any) -> bytes:
    """JSON bytes of one command: schema fields, a fresh ``command_id`` and ``ts``, plus ``fields``."""
    payload = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": command,
               "command_id": uuid.uuid4().hex, "ts": time.time(), **fields}
    return json.dumps(payload, separators=(",", ":")).encode()


class MqttCommandPublisher:
    """Publish commands to ``url`` (``mqtt://[user:pass@]host:1883`` or ``mqtts://...:8883``); call it as
    ``publisher(topic, payload, retain)``. ``ca_file``: CA bundle for mqtts (default: the system's)."""

    def __init__(self, url: str, *, client_id: str | None = None, ca_file: str | None = None,
                 timeout: float = 10.0) -> None:
        mqtt = require("paho.mqtt.client", extra="fleet", purpose="publishing deploy commands over MQTT")
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise CommandPublishError(f"MQTT URL {url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        self.timeout = timeout
        self._connected = threading.Event()
        self._reason: str | None = None
        cid = client_id or f"edge-deploy-{uuid.uuid4().hex[:8]}"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        if parts.username:
            self._client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
        if parts.scheme == "mqtts":
            self._client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self._client.on_connect = self._on_connect
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        try:
            self._client.connect(parts.hostname, port, keepalive=30)
        except OSError as exc:
            raise CommandPublishError(f"cannot reach the MQTT broker at {parts.hostname}:{port} ({exc}): start it "
                                      "or pass --mqtt URL") from None
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._reason:
            self.close()
            raise CommandPublishError(f"MQTT broker {parts.hostname}:{port} refused or did not answer the connection"
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
