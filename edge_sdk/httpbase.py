"""The one HTTP handler base of the SDK's servers (standard library ``http.server`` only).

The agent's API (:mod:`edge_sdk.device_agent.server`), the collector's dashboard
(:mod:`edge_sdk.fleet.dashboard.server`) and the bundle server (:mod:`edge_sdk.fleet.lifecycle.bundle_server`)
each had their own copy of the same plumbing; :class:`RequestHandler` holds it once:

* every method goes to :meth:`RequestHandler.handle_request` (the subclass routes on ``self.command`` and
  :meth:`~RequestHandler.route`); a raised :class:`~edge_sdk.errors.HTTPError` is answered as JSON
  ``{"error": "<one line>"}`` with its status and headers;
* the catch-all at the boundary: any other exception is offered to :meth:`~RequestHandler.map_exception`, else
  logged with its traceback and answered ``500`` in one line: a bug in one route never kills the server thread
  silently or leaves the client without an answer;
* the body is read only within a limit and only with a ``Content-Length`` (413 / 411 before reading; an
  ``Expect: 100-continue`` client is refused before it sends); a response to a request whose body was not read
  closes the connection (the unread body would be parsed as the next request);
* ``HEAD`` gets the headers of ``GET`` without the body; access logs go to ``logging`` at DEBUG (not stderr);
* an optional bearer token (:class:`HTTPSecurity`): every route but :attr:`RequestHandler.public_routes` needs
  ``Authorization: Bearer <token>`` (or HTTP Basic with the token as password, so a browser can open the
  dashboard), compared in constant time; TLS from the standard library :mod:`ssl`. :func:`bind` refuses a
  non-loopback address without a token unless ``allow_insecure`` says so: an open API on the network is a choice,
  never a default.

Requests are served by the bounded :class:`~edge_sdk.http_pool.HTTPServer` (fixed workers, header and request
deadlines, buffered bodies: see :mod:`edge_sdk.http_pool`).
:func:`prometheus_escape` is the label-value escaper of the ``/metrics`` documents both servers render.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import ssl
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from edge_sdk.errors import ConfigError, EdgeSDKError, HTTPError, first_line
from edge_sdk.http_pool import HTTPLimits, HTTPServer, Request

__all__ = ["MIN_TOKEN_CHARS", "HTTPError", "HTTPLimits", "HTTPSecurity", "HTTPServer", "RequestHandler", "base_url",
           "bind", "is_loopback", "prometheus_escape"]

log = logging.getLogger("edge_sdk.http")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


MIN_TOKEN_CHARS = 16
_CHALLENGE = 'Bearer realm="edge-sdk", Basic realm="edge-sdk", charset="UTF-8"'
_TOKEN_HOWTO = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``0.0.0.0``, ``::`` and names are not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_token(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"the HTTP token from {source} must be at least {MIN_TOKEN_CHARS} printable ASCII "
                          f"characters without spaces: {_TOKEN_HOWTO}")
    return token


@dataclass(frozen=True)
class HTTPSecurity:
    """Bearer token and TLS of one server; :meth:`load` reads the token from a file or an environment variable
    (never from a command-line value, which ``ps`` shows to every user)."""

    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_insecure: bool = False  # serve a non-loopback address without a token

    def __post_init__(self) -> None:
        if self.token is not None:
            _check_token(self.token, "the settings")

    @classmethod
    def load(cls, *, token_file: str | os.PathLike | None = None, token_env: str | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, allow_insecure: bool = False) -> HTTPSecurity:
        """Read the token from ``token_file`` (one line) or the environment variable ``token_env``."""
        if token_file is not None and token_env is not None:
            raise ConfigError("both a token file and a token environment variable are given: keep one")
        token = None
        if token_file is not None:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the HTTP token file {token_file}: {first_line(exc)}: check the "
                                  "path and its permissions") from None
            _check_token(token, str(token_file))
        elif token_env is not None:
            token = os.environ.get(token_env, "").strip()
            if not token:
                raise ConfigError(f"the environment variable {token_env} holding the HTTP token is not set: "
                                  f"export it ({_TOKEN_HOWTO})")
            _check_token(token, f"${token_env}")
        return cls(token, tls_cert, tls_key, allow_insecure)

    @property
    def tls(self) -> bool:
        """True when the server speaks HTTPS."""
        return bool(self.tls_cert or self.tls_key)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (TLS 1.2 or later), or None without TLS; ConfigError in one line."""
        if not self.tls:
            return None
        if not (self.tls_cert and self.tls_key):
            raise ConfigError("TLS needs both a certificate and its private key: give --tls-cert and --tls-key "
                              "([http] tls_cert and tls_key)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {self.tls_cert} with key {self.tls_key}: "
                              f"{first_line(exc)}: check both are PEM files that belong together") from None
        return ctx

    def check_bind(self, host: str, port: int, what: str) -> None:
        """Refuse a non-loopback address without a token unless ``allow_insecure``."""
        if self.token is None and not self.allow_insecure and not is_loopback(host):
            raise ConfigError(f"refusing to serve {what} on {host}:{port} without authentication: put a token in a "
                              "file and pass --http-token-file FILE (or --http-token-env NAME), bind 127.0.0.1, "
                              "or pass --http-insecure to serve it open")


def _token_matches(header: str, token: str) -> bool:
    scheme, _, cred = header.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            cred = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(cred.strip().encode("utf-8", "replace"), token.encode())


def prometheus_escape(value: object) -> str:
    """A Prometheus text-format label value: backslash, newline and double quote escaped."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class RequestHandler(BaseHTTPRequestHandler):
    """Base handler: routing hook, bounded body, JSON/text answers, one-line JSON errors, catch-all (module doc)."""

    protocol_version = "HTTP/1.1"
    server_version = "edge-sdk"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    #: Logger for access lines (DEBUG) and unexpected errors.
    logger = log
    #: Largest body accepted when the subclass does not say otherwise (``read_body(limit)``, ``Expect``).
    max_body_bytes = 1024 * 1024
    #: Headers sent with every answer.
    extra_headers: ClassVar[dict[str, str]] = {}
    #: Routes answered without the token (liveness probes); :attr:`public_prefixes` for whole subtrees.
    public_routes: ClassVar[frozenset[str]] = frozenset()
    public_prefixes: ClassVar[tuple[str, ...]] = ()
    server: HTTPServer
    _body_consumed = False

    def setup(self) -> None:
        """Use the pool's reader and writer (deadline-bound, buffered request) instead of socket files."""
        req: Request = self.request
        self.connection = req.sock
        self.rfile, self.wfile = req.reader, req.writer  # type: ignore[assignment]

    def finish(self) -> None:
        """The server owns the socket (kept alive or closed by it)."""

    def handle(self) -> None:
        """Answer ONE request; the pool parks a keep-alive connection until its next request arrives.

        (``BaseHTTPRequestHandler.handle`` loops over the connection's requests on this thread: the next one was
        then read straight from the socket under the first request's deadline, and a connection still in use when
        that deadline passed was closed without a ``Connection: close``, so the client's next request failed.)
        """
        self.close_connection = True
        self.handle_one_request()

    def check_access(self) -> None:
        """HTTPError 401 unless the route is public, no token is configured, or the request carries it."""
        token = getattr(self.server, "token", None)
        route = self.route()
        if token is None or route in self.public_routes or route.startswith(self.public_prefixes):
            return
        if not _token_matches(self.headers.get("Authorization", ""), token):
            raise HTTPError(401, "unauthorized", f"{route} needs the API token: send 'Authorization: Bearer "
                            "<token>'", {"WWW-Authenticate": _CHALLENGE})

    def log_message(self, format: str, *args: Any) -> None:
        self.logger.debug("%s %s", self.address_string(), format % args)

    # -- dispatch ----------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._body_consumed = False
        try:
            self.check_access()
            self.handle_request()
        except HTTPError as exc:
            self.send_error_json(exc)
        except Exception as exc:  # the boundary: answer in one line, keep the server thread alive
            mapped = self.map_exception(exc)
            if mapped is None:
                self.logger.exception("%s %s failed", self.command, self.route())
                mapped = HTTPError(500, "internal", f"internal error ({type(exc).__name__}: {first_line(exc)}): "
                                   "see the server log")
            self.send_error_json(mapped)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def handle_request(self) -> None:
        """Answer the request (``self.command``, :meth:`route`); raise HTTPError for an error answer."""
        raise HTTPError(404, "not_found", f"no route {self.route()}")

    def map_exception(self, exc: Exception) -> HTTPError | None:
        """The answer for an exception that is not an HTTPError (None: a 500 and a logged traceback)."""
        return None

    def on_response(self, status: int) -> None:
        """Called once per answer, before it is sent (metrics)."""

    def on_error(self, exc: HTTPError) -> None:
        """Called for every error answer (metrics by ``exc.kind``)."""

    def route(self) -> str:
        """The request path without query, and without a trailing slash (``/`` stays ``/``)."""
        return urlsplit(self.path).path.rstrip("/") or "/"

    # -- request body ------------------------------------------------------------------------------------
    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (curl sends ``Expect: 100-continue``)."""
        self._body_consumed = False
        try:
            self.check_length(self.max_body_bytes)
        except HTTPError as exc:
            self.send_error_json(exc)
            return False
        return super().handle_expect_100()

    def check_length(self, limit: int) -> int:
        """The announced body length; HTTPError 411 without a usable Content-Length, 413 over ``limit``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "length_required", "chunked bodies are not supported: send a Content-Length")
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            raise HTTPError(411, "length_required", "the request has no valid Content-Length: send one")
        if length > limit:
            raise HTTPError(413, "payload_too_large", f"request body of {length} bytes is over the {limit}-byte "
                            f"limit: send a smaller body or raise max_body_bytes")
        return length

    def read_body(self, limit: int | None = None) -> bytes:
        """The request body, refused before reading when Content-Length is missing or over ``limit``."""
        length = self.check_length(self.max_body_bytes if limit is None else limit)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise HTTPError(408, "timeout", "the request body did not arrive within the request deadline: "
                            "send it at once") from None
        if len(body) != length:
            raise HTTPError(400, "bad_request", f"request body ended after {len(body)} of {length} bytes")
        self._body_consumed = True
        return body

    def _has_body(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return length not in ("", "0") or "Transfer-Encoding" in self.headers

    # -- answers -----------------------------------------------------------------------------------------
    def send_body(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        """Send a complete answer (no body for HEAD); close the connection when the request body was not read."""
        self.on_response(status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.extra_headers, **(headers or {})}.items():
            self.send_header(k, v)
        if not self._body_consumed and self._has_body():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        """Send ``payload`` as compact JSON (NaN and Infinity refused: they are not JSON)."""
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        self.send_body(status, body, "application/json", headers)

    def send_text(self, status: int, text: str, ctype: str = "text/plain; charset=utf-8",
                  headers: dict[str, str] | None = None) -> None:
        """Send ``text`` (UTF-8)."""
        self.send_body(status, text.encode(), ctype, headers)

    def send_error_json(self, exc: HTTPError) -> None:
        """Answer ``{"error": "<one line>"}`` with the error's status and headers."""
        self.on_error(exc)
        self.send_json(exc.status, {"error": first_line(exc, 1000)}, exc.headers)


def bind(host: str, port: int, handler: type[RequestHandler], owner: Any, *, limits: HTTPLimits | None = None,
         security: HTTPSecurity | None = None, what: str = "the HTTP API") -> HTTPServer:
    """A bound :class:`HTTPServer` (``port=0``: a free port); EdgeSDKError in one line when it cannot listen.

    With ``security`` (the agent's and the collector's APIs): its token and TLS are applied, and a non-loopback
    ``host`` without a token is refused unless ``security.allow_insecure``.
    """
    ctx = None
    if security is not None:
        security.check_bind(host, port, what)
        ctx = security.ssl_context()
    try:
        httpd = HTTPServer((host, port), handler, limits)
    except OSError as exc:
        raise EdgeSDKError(f"cannot listen on {host}:{port}: {exc.strerror}: choose another host:port") from None
    httpd.owner = owner
    httpd.token = security.token if security is not None else None
    httpd.ssl_context = ctx
    return httpd


def base_url(host: str, port: int, tls: bool = False) -> str:
    """``http(s)://host:port`` for clients (``0.0.0.0`` / ``::`` shown as the loopback address)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
