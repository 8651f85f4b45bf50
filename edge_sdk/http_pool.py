"""A bounded HTTP server for :class:`edge_sdk.httpbase.RequestHandler`: one thread waits, a fixed pool answers.

Why not ``ThreadingHTTPServer``: it gives each connection a thread that blocks in ``recv()`` with no deadline for
the whole request, so 300 sockets trickling headers meant 300 threads, and a request was parsed wherever it
landed (issue 13). Here:

* one selector thread accepts connections, completes their TLS handshake and reads each request's headers (and its
  body when it fits the buffer budget) without blocking; a connection that has not sent its headers within
  ``header_timeout_s``, or its whole request within ``request_timeout_s``, is closed (slowloris), as is a
  keep-alive connection idle for ``idle_timeout_s``; beyond ``max_connections`` the oldest waiting one is closed;
* only complete requests reach a bounded queue (``backlog``) served by ``workers`` fixed threads; a full queue is
  answered 503 at once by the selector thread;
* a worker answers one request and hands a keep-alive connection back to the selector: an idle client holds no
  thread. A body not buffered (over the budget, ``Expect: 100-continue``, chunked) is read by the worker under the
  same total deadline.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import HTTPServer as _StdHTTPServer
from typing import Any, TypeVar

__all__ = ["HTTPLimits", "HTTPServer", "Request"]

log = logging.getLogger("edge_sdk.http")
_WAKE = object()


@dataclass(frozen=True)
class HTTPLimits:
    """Bounds of one server: threads, queued requests, open connections, deadlines and buffered bytes."""

    workers: int = 8                       # threads answering requests
    backlog: int = 64                      # complete requests waiting for a worker; beyond it 503
    max_connections: int = 1024            # open connections (capped by the process's file-descriptor limit)
    header_timeout_s: float = 10.0         # request line and headers must arrive within this after the first byte
    request_timeout_s: float = 30.0        # the whole request (headers and body) within this
    idle_timeout_s: float = 60.0           # a keep-alive connection without a new request is closed after this
    write_timeout_s: float = 30.0          # one send to a client that does not read
    max_header_bytes: int = 64 * 1024      # beyond it: 431
    max_body_bytes: int = 1024 * 1024      # bodies up to this are buffered before a worker sees the request
    buffer_budget_bytes: int = 64 << 20    # bodies buffered at once across connections

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"HTTPLimits.{name} must be positive, got {value!r}")


class _Conn:
    """A connection waiting in the selector: its buffer, deadlines and reserved body bytes."""

    __slots__ = ("addr", "buf", "deadline", "expires", "handshaking", "idle", "need", "reserved", "sock")

    def __init__(self, sock: socket.socket, addr: Any, buf: bytes, now: float, limits: HTTPLimits,
                 *, idle: bool = False, handshaking: bool = False) -> None:
        self.sock, self.addr, self.buf = sock, addr, bytearray(buf)
        self.need: int | None = None
        self.reserved = 0
        self.handshaking = handshaking
        self.idle = idle and not buf
        self.deadline = now + limits.request_timeout_s
        self.expires = now + (limits.idle_timeout_s if self.idle
                              else min(limits.header_timeout_s, limits.request_timeout_s))


class _Reader:
    """The handler's ``rfile``: buffered bytes first, then the socket, never past the request's deadline."""

    def __init__(self, buf: bytes | bytearray, sock: socket.socket, deadline: float) -> None:
        self._buf, self._pos, self._sock, self._deadline = bytes(buf), 0, sock, deadline
        self.touched = False  # the socket was read: what the client sent after this request is unknown

    def _recv(self, size: int) -> bytes:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline")
        self.touched = True
        previous = self._sock.gettimeout()
        self._sock.settimeout(left)
        try:
            return self._sock.recv(size)
        finally:
            self._sock.settimeout(previous)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            nl = self._buf.find(b"\n", self._pos)
            avail = len(self._buf) - self._pos
            if nl >= 0:
                n = nl + 1 - self._pos
                n = n if limit < 0 else min(n, limit)
                break
            if 0 <= limit <= avail:
                n = limit
                break
            chunk = self._recv(65536)
            if not chunk:
                n = avail
                break
            self._buf, self._pos = self._buf[self._pos:] + chunk, 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._buf) - self._pos
        out = bytearray(self._buf[self._pos:self._pos + n])
        self._pos += len(out)
        while len(out) < n:  # no read-ahead: the next request stays in the socket
            chunk = self._recv(min(65536, n - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def rest(self) -> bytes:
        """Buffered bytes not consumed (a pipelined next request)."""
        return self._buf[self._pos:]

    def close(self) -> None:
        """Nothing to release (the server owns the socket)."""


class _Writer:
    """The handler's ``wfile``: every write is a ``sendall`` under the socket's write timeout."""

    closed = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        """Writes are not buffered."""

    def close(self) -> None:
        """The server owns the socket."""


@dataclass
class Request:
    """What a worker hands the handler as ``request``: the socket and its reader/writer."""

    sock: socket.socket
    reader: _Reader
    writer: _Writer


def _body_plan(head: bytes) -> int | None:
    """The body length to buffer after these headers; None when the worker must handle the body itself."""
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower().decode("latin-1"), value.strip().decode("latin-1"))
    if "transfer-encoding" in fields or fields.get("expect", "").lower() == "100-continue":
        return None
    length = fields.get("content-length")
    if length is None:
        return 0
    return int(length) if length.isdigit() else None


def _fd_budget(wanted: int) -> int:
    """``wanted`` connections, fewer when the process's descriptor limit is lower (64 kept for files)."""
    try:
        import resource
    except ImportError:  # not on POSIX: no limit to read
        return wanted
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return wanted if soft == resource.RLIM_INFINITY else max(8, min(wanted, soft - 64))


_S = TypeVar("_S", bound="HTTPServer")


class HTTPServer(_StdHTTPServer):
    """Bounded server (module doc). ``owner`` is the app object; ``token``/``ssl_context`` are set by ``bind``."""

    request_queue_size = 128
    thread_name = "edge-http"
    owner: Any = None
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, server_address: tuple[str, int], handler: Callable[..., Any],
                 limits: HTTPLimits | None = None) -> None:
        super().__init__(server_address, handler)
        self.socket.setblocking(False)
        self.limits = limits or HTTPLimits()
        self.max_connections = _fd_budget(self.limits.max_connections)
        self.stats = {"closed_slow": 0, "closed_idle": 0, "evicted": 0, "busy": 0, "too_large_headers": 0}
        self._queue: queue.Queue[_Conn | None] = queue.Queue(maxsize=self.limits.backlog)
        self._conns: dict[int, _Conn] = {}
        self._parked: list[_Conn] = []
        self._lock = threading.Lock()
        self._reserved = 0
        self._workers: list[threading.Thread] = []
        self._stop, self._running, self._stopped = threading.Event(), threading.Event(), threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel: selectors.BaseSelector | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read requests on this thread until :meth:`shutdown`; workers answer them."""
        self._stop.clear()
        self._stopped.clear()
        self._running.set()
        with self._lock:
            while len(self._workers) < self.limits.workers:
                t = threading.Thread(target=self._work, name=f"edge-sdk-http-{len(self._workers)}", daemon=True)
                t.start()
                self._workers.append(t)
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1 if self._conns else poll_interval):
                    if key.data is None:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_parked()
                    elif key.data.sock.fileno() in self._conns:
                        self._on_ready(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.1
        finally:
            for c in list(self._conns.values()):
                self._close(c)
            sel.close()
            self._sel = None
            self._running.clear()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (returns at once when it is not running)."""
        self._stop.set()
        self._wake()
        if self._running.is_set():
            self._stopped.wait(10)

    def server_close(self) -> None:
        """Close the listening socket and stop the workers."""
        self.shutdown()
        super().server_close()
        with self._lock:
            workers, self._workers = self._workers, []
        for _ in workers:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                break
        for t in workers:
            t.join(timeout=1)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def start(self: _S) -> _S:
        """Serve in a background thread (named :attr:`thread_name`); :meth:`stop` ends it."""
        self._serving = threading.Thread(target=self.serve_forever, name=self.thread_name, daemon=True)
        self._serving.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (after :meth:`start`, or when never started)."""
        serving = getattr(self, "_serving", None)
        if serving is not None:
            self.shutdown()
            serving.join(timeout=5)
            self._serving = None
        self.server_close()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- selector thread ------------------------------------------------------------------------------------
    def _register(self, c: _Conn) -> None:
        assert self._sel is not None
        self._conns[c.sock.fileno()] = c
        self._sel.register(c.sock, selectors.EVENT_READ, c)

    def _forget(self, c: _Conn) -> None:
        if self._conns.pop(c.sock.fileno(), None) is not None and self._sel is not None:
            self._sel.unregister(c.sock)

    def _close(self, c: _Conn, reply: tuple[int, str] | None = None) -> None:
        self._forget(c)
        self._release(c)
        if reply is not None and not c.handshaking:
            status, message = reply
            body = json.dumps({"error": message}).encode()
            head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    + ("Retry-After: 1\r\n" if status == 503 else "") + "\r\n")
            try:
                c.sock.send(head.encode() + body)
            except (OSError, ssl.SSLError):
                pass
        _hard_close(c.sock)

    def _release(self, c: _Conn) -> None:
        if c.reserved:
            with self._lock:
                self._reserved -= c.reserved
            c.reserved = 0

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._conns:
                    self._evict_oldest()  # out of descriptors: the longest-waiting connection makes room
                    continue
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._conns) >= self.max_connections:
                self._evict_oldest()
            tls = self.ssl_context is not None
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._register(_Conn(sock, addr, b"", time.monotonic(), self.limits, handshaking=tls))

    def _evict_oldest(self) -> None:
        self.stats["evicted"] += 1
        self._close(next(iter(self._conns.values())))

    def _take_parked(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            parked, self._parked = self._parked, []
        for c in parked:
            if self._stop.is_set():
                _hard_close(c.sock)
                continue
            self._register(c)
            if c.buf or (isinstance(c.sock, ssl.SSLSocket) and c.sock.pending()):
                self._on_ready(c)

    def _on_ready(self, c: _Conn) -> None:
        if c.handshaking:
            try:
                c.sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # the send buffer is full mid-handshake: wait until it drains
                assert self._sel is not None
                self._sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                return
            except (ssl.SSLError, OSError):
                self._close(c)
                return
            c.handshaking = False
            assert self._sel is not None
            self._sel.modify(c.sock, selectors.EVENT_READ, c)
        now = time.monotonic()
        while len(c.buf) < (c.need if c.need is not None else self.limits.max_header_bytes + 1):
            try:
                chunk = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (OSError, ssl.SSLError):
                self._close(c)
                return
            if not chunk:
                self._close(c)
                return
            if c.idle:  # a keep-alive connection starts its next request: its deadlines start now
                c.idle = False
                c.deadline = now + self.limits.request_timeout_s
                c.expires = now + min(self.limits.header_timeout_s, self.limits.request_timeout_s)
            c.buf += chunk
        self._advance(c)

    def _advance(self, c: _Conn) -> None:
        if c.need is None:
            end = c.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(c.buf) > self.limits.max_header_bytes:
                    self.stats["too_large_headers"] += 1
                    self._close(c, (431, f"request headers over {self.limits.max_header_bytes} bytes"))
                return
            length = _body_plan(bytes(c.buf[:end]))
            c.need = end + 4
            if length:
                with self._lock:
                    fits = (length <= self.limits.max_body_bytes
                            and self._reserved + length <= self.limits.buffer_budget_bytes)
                    if fits:
                        self._reserved += length
                if fits:  # else a worker reads it (or refuses it) under the same deadline
                    c.reserved = length
                    c.need += length
                    c.expires = c.deadline
        if len(c.buf) >= c.need:
            self._forget(c)
            try:
                self._queue.put_nowait(c)
            except queue.Full:
                self.stats["busy"] += 1
                self._close(c, (503, "the server is busy: retry in a second"))

    def _sweep(self, now: float) -> None:
        for c in list(self._conns.values()):
            if now >= c.expires:
                self.stats["closed_idle" if c.idle else "closed_slow"] += 1
                self._close(c, None if c.idle or not c.buf else (408, "the request did not arrive in time: "
                                                                 "send it at once"))

    # -- workers --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            c = self._queue.get()
            if c is None:
                return
            keep, rest = False, b""
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(self.limits.write_timeout_s)
                reader = _Reader(c.buf, c.sock, c.deadline)
                c.buf = bytearray()
                handler = self.RequestHandlerClass(Request(c.sock, reader, _Writer(c.sock)), c.addr, self)
                keep = not handler.close_connection and not reader.touched
                rest = reader.rest()
            except Exception:  # the handler's own boundary answers errors; this is a client gone mid-answer
                log.debug("connection from %s ended", c.addr, exc_info=True)
            finally:
                self._release(c)
            if keep and not self._stop.is_set():
                c.sock.setblocking(False)
                with self._lock:
                    self._parked.append(_Conn(c.sock, c.addr, rest, time.monotonic(), self.limits, idle=True))
                self._wake()
            else:
                _hard_close(c.sock)


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
