"""MQTT basics shared by every component that talks to the broker: one URL parser, one TLS context, one paho client.

The device (:mod:`edge_sdk.device_agent.mqtt_session`), the collector, the deploy tools and the simulated fleet
used to parse broker URLs in four places that accepted different schemes (``edge-sdk deploy`` refused ``ssl://``
that the agent took). Here is the one accepted set, the same everywhere::

    mqtt://[USER[:PASSWORD]@]HOST[:PORT]     plain TCP, port 1883 by default
    mqtts://[USER[:PASSWORD]@]HOST[:PORT]    TLS, port 8883 by default
    tcp://... and ssl://...                  aliases of mqtt:// and mqtts:// (the spelling paho and Mosquitto use)

User and password are percent-decoded. WebSocket URLs (``ws://``, ``wss://``) are refused with a one-line error:
no component opens a WebSocket transport, and the shipped Mosquitto configuration has no such listener. A path
other than ``/``, a query or a fragment are refused too (they would be silently ignored).

This module is core: it imports only the standard library at import time. paho-mqtt (2.x, callback API
version 2) is imported by :func:`make_client` when a client is built.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from edge_sdk._deps import require
from edge_sdk.errors import ConfigError, EdgeSDKError

__all__ = ["PROTOCOLS", "SCHEMES", "URL_FORMS", "MqttURL", "connect_properties", "make_client", "parse_mqtt_url",
           "tls_context"]

#: Accepted schemes and whether they mean TLS.
SCHEMES: dict[str, bool] = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
#: What a user is told to write.
URL_FORMS = "mqtt://host:1883 or mqtts://host:8883 (user:password@ optional; tcp:// and ssl:// are aliases)"
#: Protocol choices of every component: ``auto`` = MQTT v5, falling back to 3.1.1 for a broker without v5.
PROTOCOLS = ("auto", "5", "3.1.1")


@dataclass(frozen=True)
class MqttURL:
    """A parsed broker URL."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    given_port: int | None = None  # the port written in the URL (None: the scheme's default was used)

    @property
    def address(self) -> str:
        """``host:port`` for messages (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_mqtt_url(url: object, *, where: str = "MQTT URL", error: type[EdgeSDKError] = ConfigError) -> MqttURL:
    """Parse ``url`` (see the module docstring) or raise ``error`` with one line naming ``where`` it came from.

    ``error`` lets each component keep its own exception (``TelemetryError`` on the device, ``CollectorError``
    in the collector, ``ConfigError`` for a configuration file).
    """
    def bad(reason: str) -> EdgeSDKError:
        return error(f"{where}: unsupported MQTT URL {url!r} ({reason}): it must look like {URL_FORMS}")

    if not isinstance(url, str) or not url.strip():
        raise bad("not a URL")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("ws", "wss"):
        raise bad("MQTT over WebSockets is not supported")
    if scheme not in SCHEMES:
        raise bad(f"scheme {scheme + '://' if scheme else 'missing'}")
    if not parts.hostname:
        raise bad("no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("a path, query or fragment has no meaning for MQTT")
    tls = SCHEMES[scheme]
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise bad("bad port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return MqttURL(parts.hostname, port, tls, user, password, parts.port)


def tls_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None, *,
                insecure: bool = False, error: type[EdgeSDKError] = ConfigError) -> ssl.SSLContext:
    """A client TLS context: the system CAs or ``ca_file``, an optional client certificate, and the broker's
    certificate chain always verified (``insecure=True`` skips only the host name check).

    A missing or unusable file raises ``error`` with one line naming it.
    """
    for name, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path and not os.path.isfile(path):
            raise error(f"MQTT {name} {path!r} does not exist: fix the path in the MQTT settings")
    if key_file and not cert_file:
        raise error("MQTT key_file is set without cert_file: give the client certificate too")
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise error(f"MQTT TLS files cannot be used ({exc}): check ca_file, cert_file and key_file") from None
    if insecure:
        context.check_hostname = False
    return context


def make_client(client_id: str, *, protocol: str = "5", username: str | None = None, password: str | None = None,
                tls: ssl.SSLContext | None = None, manual_ack: bool = False, userdata: Any = None,
                extra: str = "agent", purpose: str = "MQTT") -> Any:
    """A paho-mqtt 2.x client (callback API version 2) for ``protocol`` ``"5"`` or ``"3.1.1"``, not connected.

    MQTT 3.1.1 clients get a persistent session (``clean_session=False``), as v5 ones do through
    ``clean_start=False`` at connect. ``tls`` is a context from :func:`tls_context`. A missing paho-mqtt raises
    :class:`~edge_sdk.errors.MissingDependencyError` naming ``extra``.
    """
    mqtt = require("paho.mqtt.client", extra, purpose)
    from paho.mqtt.enums import CallbackAPIVersion

    if protocol == "5":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=manual_ack, userdata=userdata)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=False, manual_ack=manual_ack, userdata=userdata)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Any:
    """MQTT v5 CONNECT properties: the session expiry and, optionally, *Receive Maximum* (clamped to 1..65535)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(session_expiry_s)
    if receive_maximum is not None:
        props.ReceiveMaximum = max(1, min(int(receive_maximum), 65535))
    return props
