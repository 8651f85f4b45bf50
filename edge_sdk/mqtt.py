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

Hardening shared by every client (issue 13): :func:`loads_command` parses an untrusted payload with a size cap
and a nesting limit checked *before* the recursive JSON parser runs; :func:`guard` wraps a paho callback so that
no exception (``RecursionError`` included) reaches paho, which re-raises callback exceptions in its network
thread and so ends it; :class:`RateLimitedLog` logs each kind of problem once, then at most once a minute with a
count, so a flood of hostile messages cannot fill the disk; :func:`loop_alive` tells whether a client's network
thread still runs (the device session and the collector run a watchdog on it). :func:`redact_url` renders a URL
without its password for logs and events, and :func:`resolve_password` takes a password from a file or the
environment (``EDGE_SDK_MQTT_PASSWORD_FILE``, ``EDGE_SDK_MQTT_PASSWORD``) so it is never needed on a command line.

This module is core: it imports only the standard library at import time. paho-mqtt (2.x, callback API
version 2) is imported by :func:`make_client` when a client is built.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from edge_sdk._deps import require
from edge_sdk.errors import ConfigError, EdgeSDKError
from edge_sdk.safe_json import json_depth

__all__ = ["MAX_COMMAND_BYTES", "MAX_COMMAND_DEPTH", "PASSWORD_ENV", "PASSWORD_FILE_ENV", "PROTOCOLS", "SCHEMES",
           "URL_FORMS", "LoopWatch", "MqttURL", "PayloadRejected", "RateLimitedLog", "connect_properties", "guard",
           "json_depth", "loads_command", "loop_alive", "make_client", "parse_mqtt_url", "redact_text", "redact_url",
           "release_client", "resolve_password", "tls_context"]

#: Accepted schemes and whether they mean TLS.
SCHEMES: dict[str, bool] = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
#: What a user is told to write.
URL_FORMS = "mqtt://host:1883 or mqtts://host:8883 (user:password@ optional; tcp:// and ssl:// are aliases)"
#: Protocol choices of every component: ``auto`` = MQTT v5, falling back to 3.1.1 for a broker without v5.
PROTOCOLS = ("auto", "5", "3.1.1")
#: Largest command payload a device parses (a signed cmd/update with an authorisation is a few kB).
MAX_COMMAND_BYTES = 64 * 1024
#: Deepest JSON nesting a device parses (commands are 3 levels deep; Python's parser recurses per level).
MAX_COMMAND_DEPTH = 32
#: Environment variables a password is read from when none is given (the file one wins).
PASSWORD_FILE_ENV = "EDGE_SDK_MQTT_PASSWORD_FILE"
PASSWORD_ENV = "EDGE_SDK_MQTT_PASSWORD"


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
        shown = redact_url(url) if isinstance(url, str) else url
        return error(f"{where}: unsupported MQTT URL {shown!r} ({reason}): it must look like {URL_FORMS}")

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
    client.suppress_exceptions = True  # last resort: an exception in a callback must not end the network thread
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None,
                       maximum_packet_size: int | None = None) -> Any:
    """MQTT v5 CONNECT properties: the session expiry and, optionally, *Receive Maximum* (clamped to 1..65535) and
    *Maximum Packet Size* (the broker then drops larger messages for this client instead of sending them)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(session_expiry_s)
    if receive_maximum is not None:
        props.ReceiveMaximum = max(1, min(int(receive_maximum), 65535))
    if maximum_packet_size is not None:
        props.MaximumPacketSize = max(1024, int(maximum_packet_size))
    return props


# ---- secrets ----------------------------------------------------------------------------------------------------
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``mqtt://user:***@host:1883``); the user name, host and port
    stay, because they are what an operator needs to read a log. Works on strings that are not valid URLs too."""
    return _USERINFO.sub(r"\g<head>:***@", str(url))


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password replaced by ``***``."""
    return _USERINFO.sub(r"\g<head>:***@", str(text))


def resolve_password(password: str | None = None, password_file: str | os.PathLike[str] | None = None,
                     url_password: str | None = None, *, env: Mapping[str, str] | None = None,
                     error: type[EdgeSDKError] = ConfigError) -> str | None:
    """The password to use, first found of: ``password``, the file ``password_file``, the URL's password, the file
    named by ``$EDGE_SDK_MQTT_PASSWORD_FILE``, ``$EDGE_SDK_MQTT_PASSWORD``; None when there is none.

    A password file holds the password on its first line (a trailing newline is ignored). Files and the
    environment keep passwords off command lines, which every user of the machine can read in ``ps``.
    """
    env = os.environ if env is None else env

    def read(path: str | os.PathLike[str], origin: str) -> str:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise error(f"MQTT {origin} {os.fspath(path)!r} cannot be read ({exc.strerror}): fix the path or its "
                        "permissions") from None

    if password is not None:
        return password
    if password_file:
        return read(password_file, "password file")
    if url_password is not None:
        return url_password
    if env.get(PASSWORD_FILE_ENV):
        return read(env[PASSWORD_FILE_ENV], f"${PASSWORD_FILE_ENV}")
    return env.get(PASSWORD_ENV) or None


# ---- untrusted payloads -----------------------------------------------------------------------------------------
class PayloadRejected(ValueError):
    """An untrusted payload that is not parsed; ``kind`` is too_large, too_deep or not_json."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def loads_command(payload: bytes, *, max_bytes: int = MAX_COMMAND_BYTES, max_depth: int = MAX_COMMAND_DEPTH) -> Any:
    """Parse an untrusted JSON payload or raise :class:`PayloadRejected`: the size is checked first, then the
    nesting depth (an iterative scan), and only then is ``json.loads`` run (whose recursion a 200 kB ``[[[...``
    would otherwise exhaust); any parser error, ``RecursionError`` included, becomes ``not_json``."""
    if len(payload) > max_bytes:
        raise PayloadRejected("too_large", f"{len(payload)} bytes exceed the limit of {max_bytes}")
    depth = json_depth(payload, max_depth)
    if depth > max_depth:
        raise PayloadRejected("too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(payload)
    except RecursionError:
        raise PayloadRejected("too_deep", "JSON nested too deep to parse") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise PayloadRejected("not_json", f"not JSON ({str(exc)[:80]})") from None


class RateLimitedLog:
    """Log each *kind* of problem at once the first time, then at most once per ``interval_s`` with how many were
    not logged meanwhile: a device flooded with hostile messages writes a few lines a minute, not one per message.
    Thread-safe; the number of kinds remembered is bounded (``max_kinds``)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_kinds: int = 256) -> None:
        self.logger, self.interval_s, self.max_kinds = logger, interval_s, max_kinds
        self._kinds: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, level: int, kind: str, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log ``msg % args`` unless ``kind`` was logged less than ``interval_s`` ago; True when logged. A traceback
        (``exc_info``) is attached only the first time a kind is logged."""
        now = time.monotonic()
        with self._lock:
            last = self._kinds.get(kind)
            if last is not None and now - last[0] < self.interval_s:
                self._kinds[kind] = (last[0], last[1] + 1)
                return False
            if last is None and len(self._kinds) >= self.max_kinds:
                self._kinds.clear()
            self._kinds[kind] = (now, 0)
        more = f" ({last[1]} more like this in the last {self.interval_s:.0f} s)" if last and last[1] else ""
        self.logger.log(level, msg + more, *args, exc_info=exc_info if last is None else None)
        return True


def guard(callback: Callable[..., Any], limiter: RateLimitedLog, what: str) -> Callable[..., Any]:
    """``callback`` for paho: any exception it raises is logged (rate-limited, a traceback the first time) and
    swallowed, because paho re-raises callback exceptions in its network thread and so ends it."""
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except Exception as exc:  # the network thread must outlive any callback failure
            limiter(logging.ERROR, f"{what}:{type(exc).__name__}", "MQTT %s callback failed: %s: %s", what,
                    type(exc).__name__, str(exc)[:200], exc_info=True)
            return None

    return wrapper


def loop_alive(client: Any) -> bool:
    """Whether the network thread paho's ``loop_start`` started for ``client`` still runs (paho clears its
    ``_thread`` when the thread ends; the attribute exists in paho-mqtt 1.x and 2.x)."""
    thread = getattr(client, "_thread", None)
    return thread is not None and thread.is_alive()


class LoopWatch:
    """Whether a paho client's network loop still works, for a watchdog thread that checks it every second or so.

    Callbacks made with :meth:`wrap` note activity. :meth:`verdict` names why the client must be replaced: its
    network thread ended; it sent no callback within ``keepalive`` s of a probe (an UNSUBSCRIBE of a filter nobody
    subscribed to, answered by an UNSUBACK, sent when a connected client has been idle for ``keepalive / 2`` s);
    or, disconnected, it made no connection attempt for ``idle_limit_s`` + ``keepalive`` s (paho retries at least
    every 30 s). Used by the device session and the collector.
    """

    def __init__(self, limiter: RateLimitedLog, current: Callable[[], Any]) -> None:
        self.limiter, self.current = limiter, current
        self.activity = time.monotonic()
        self.probe_at: float | None = None
        self.restarts = 0

    def reset(self) -> None:
        """A new client: start timing afresh."""
        self.activity, self.probe_at = time.monotonic(), None

    def wrap(self, callback: Callable[..., Any], what: str) -> Callable[..., Any]:
        """``callback`` guarded (:func:`guard`), noting activity, and ignoring clients other than ``current()``
        (a replaced client talking after the fact)."""
        def call(client: Any, *args: Any) -> Any:
            now = self.current()
            if now is not None and client is not now:
                return None
            self.activity, self.probe_at = time.monotonic(), None
            return callback(client, *args)

        return guard(call, self.limiter, what)

    def verdict(self, client: Any, connected: bool, keepalive: float, probe_topic: str,
                idle_limit_s: float = 90.0) -> str | None:
        """Why ``client`` must be replaced now, or None (sending a probe when one is due)."""
        now = time.monotonic()
        if not loop_alive(client):
            return "network thread ended"
        if connected and self.probe_at is not None and now - self.probe_at > keepalive:
            return f"network loop answered nothing for {now - self.probe_at:.0f} s"
        if not connected and now - self.activity > idle_limit_s + keepalive:
            return f"network loop made no connection attempt for {now - self.activity:.0f} s"
        if connected and self.probe_at is None and now - self.activity > keepalive / 2:
            self.probe_at = now
            client.unsubscribe(probe_topic)
        return None


def release_client(old: Any) -> None:
    """Disconnect a replaced client and close its socket, on a thread of its own (a hung network loop may hold
    paho's locks, and the caller is a watchdog that must not hang with it)."""
    def run() -> None:
        try:
            old.disconnect()
        except Exception:  # best effort on a client that is being thrown away
            pass
        sock = old.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    threading.Thread(target=run, name="edge-mqtt-release", daemon=True).start()
