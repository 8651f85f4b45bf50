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
* ``HEAD`` gets the headers of ``GET`` without the body; access logs go to ``logging`` at DEBUG (not stderr).

It is a plain base to subclass; authentication, TLS and a bounded worker pool belong here when they come.
:func:`prometheus_escape` is the label-value escaper of the ``/metrics`` documents both servers render.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

from edge_sdk.errors import EdgeSDKError, HTTPError, first_line

__all__ = ["HTTPError", "HTTPServer", "RequestHandler", "base_url", "bind", "prometheus_escape"]

log = logging.getLogger("edge_sdk.http")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


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
    _body_consumed = False

    def log_message(self, format: str, *args: Any) -> None:
        self.logger.debug("%s %s", self.address_string(), format % args)

    # -- dispatch ----------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._body_consumed = False
        try:
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
            raise HTTPError(408, "timeout", f"the request body did not arrive within {self.timeout:g} s: "
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


class HTTPServer(ThreadingHTTPServer):
    """A threading server whose handler threads do not keep the process alive; ``owner`` is the app object."""

    daemon_threads = True
    owner: Any = None


def bind(host: str, port: int, handler: type[RequestHandler], owner: Any) -> HTTPServer:
    """A bound :class:`HTTPServer` (``port=0``: a free port); EdgeSDKError in one line when it cannot listen."""
    try:
        httpd = HTTPServer((host, port), handler)
    except OSError as exc:
        raise EdgeSDKError(f"cannot listen on {host}:{port}: {exc.strerror}: choose another host:port") from None
    httpd.owner = owner
    return httpd


def base_url(host: str, port: int) -> str:
    """``http://host:port`` for clients (``0.0.0.0`` / ``::`` shown as the loopback address)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
