"""The collector's HTTP side (standard library only): the fleet dashboard, a JSON API and Prometheus metrics.

Routes (GET / HEAD)::

    /                                          the dashboard (edge_sdk/fleet/static/index.html; no CDN, works offline)
    /static/<file>                             dashboard assets from edge_sdk/fleet/static/
    /api/devices?fleet=F&since=900             fleet_status rows            {"now", "since_s", "devices": [...]}
    /api/models?fleet=F&since=900              model_versions rows          {"now", "since_s", "models": [...]}
    /api/devices/<fleet>/<device>/series?since=3600&max_points=300
                                               device_series points         {"fleet", "device", "points": [...]}
    /api/alerts?state=open&limit=200           alerts, newest first         {"alerts": [...]}
    /api/dead_letters?limit=100                rejected messages (previews) {"dead_letters": [...]}  (limit <= 500)
    /api/dead_letters/<id>                     one rejected payload, capped {"id", "payload", "truncated", ...}
    /healthz                                   {"status": "ok", "db": dialect} (503 when the database fails)
    /api/samples (POST, GET), /api/samples/labels (POST)
                                               device data samples: edge_sdk/fleet/samples/http.py
    /metrics                                   Prometheus text format 0.0.4 (see :func:`metrics_text`)

Errors are JSON ``{"error": "<one line>"}``: 400 bad parameter, 401 without the token, 404 unknown route or
file, 405 other methods, 500 when the database fails (the reason in one line, the traceback in the log).

With a token (:class:`~edge_sdk.httpbase.HTTPSecurity`) everything but ``/healthz`` and the bundle downloads
(``/bundles/``, which devices fetch and which serve only versions being deployed) needs it: ``Authorization:
Bearer <token>``, or HTTP Basic with the token as password (a browser prompts for it). A non-loopback address
without a token refuses to start unless ``allow_insecure``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from edge_sdk.errors import EdgeSDKError, HTTPError, first_line
from edge_sdk.fleet.dashboard import fleet_metrics, views
from edge_sdk.fleet.dashboard.fleet_metrics import FleetCounters
from edge_sdk.fleet.dashboard.range_cache import RangeCache
from edge_sdk.httpbase import HTTPLimits, HTTPSecurity, HTTPServer, RequestHandler, base_url, bind
from edge_sdk.topics import validate_id

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.samples.store import SampleStore

__all__ = ["STATIC_DIR", "CollectorHTTP", "metrics_text"]

log = logging.getLogger("edge_sdk.fleet.dashboard.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".ico": "image/x-icon", ".json": "application/json"}
# the dashboard loads nothing from elsewhere: a browser refuses any external fetch it might try
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _db_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the database failed" (psycopg only when it is loaded)."""
    errs: list[type[BaseException]] = [EdgeSDKError, sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errs.append(psycopg.Error)
    return tuple(errs)


def metrics_text(db: Database, stats: Callable[[], dict[str, Any]] | None = None, *, since_s: float = 900,
                 cache: RangeCache | None = None, counters: FleetCounters | None = None) -> str:
    """The fleet in Prometheus text format (families: :mod:`~edge_sdk.fleet.dashboard.fleet_metrics`): device
    states and gauges over the last ``since_s`` s, per-device counters and latency / confidence histograms
    cumulative in ``counters`` (a server keeps one; None: the windows received in the last ``since_s`` s), open
    alerts with their device, and, when ``stats`` is given, its numbers: integers as ``edge_collector_<key>_total``
    counters, floats and queue/inflight/pending levels as ``edge_collector_<key>`` gauges (nested dicts flattened
    with ``_``, ``_s`` suffixes written ``_seconds``; strings and booleans left out)."""
    rows = views.fleet_status(db, since_s=since_s, cache=cache)
    if counters is None:
        counters = FleetCounters(db, start=time.time() - since_s, lookback_s=since_s)
    return fleet_metrics.render(db, rows, counters, stats)


class _Handler(RequestHandler):
    server_version = "edge-sdk-collector"
    logger = log
    public_routes = frozenset({"/healthz"})
    public_prefixes = ("/bundles/",)
    extra_headers: ClassVar[dict[str, str]] = {"X-Content-Type-Options": "nosniff"}
    server: HTTPServer

    @property
    def max_body_bytes(self) -> int:  # type: ignore[override]  # per route, for Expect: 100-continue
        """A sample upload may be as large as the sample store allows (curl asks first with Expect: 100-continue);
        every other route keeps the 1 MiB default."""
        samples = getattr(self.server.owner, "samples", None)
        if samples is not None and self.route() == "/api/samples":
            return max(int(samples.max_sample_bytes), RequestHandler.max_body_bytes)
        return RequestHandler.max_body_bytes

    def handle_request(self) -> None:
        if self.route().startswith("/api/samples"):  # device data samples (POST): edge_sdk/fleet/samples/http.py
            from edge_sdk.fleet.samples.http import handle_samples_request

            handle_samples_request(self, self.server.owner.samples)
            return
        if self.command not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", f"{self.command} is not allowed: this API is read-only, "
                            "use GET", {"Allow": "GET, HEAD"})
        parts = urlsplit(self.path)
        if parts.path.startswith("/bundles/"):  # registry archives with HTTP ranges, for device updates (issue 6)
            from edge_sdk.fleet.lifecycle.bundle_server import handle_bundle_request
            from edge_sdk.fleet.lifecycle.registry import Registry

            handle_bundle_request(self, Registry(self.server.owner.db), head=self.command == "HEAD")
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        status, ctype, body, headers = self.server.owner.route(parts.path, query)
        self.send_body(status, body, ctype, headers)

    def map_exception(self, exc: Exception) -> HTTPError | None:
        if isinstance(exc, _db_errors()):
            log.error("database query for %s failed: %s", self.route(), exc, exc_info=True)
            return HTTPError(500, "database", f"database error: {type(exc).__name__}: {first_line(exc, 1000)}")
        if isinstance(exc, ValueError):  # a non-finite number or an undecodable row from the database
            log.error("cannot answer %s: %s", self.route(), exc, exc_info=True)
            return HTTPError(500, "encoding", f"cannot encode the answer: {first_line(exc, 1000)}")
        return None


def _float(query: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise HTTPError(400, "bad_request", f"{name}={text!r} is not a number: use e.g. {name}={default:g}") from None
    if not lo <= value <= hi:
        raise HTTPError(400, "bad_request", f"{name}={text} is out of range: use {lo:g}..{hi:g}")
    return value


class CollectorHTTP:
    """Serve the dashboard, the JSON API and ``/metrics`` for one fleet :class:`~edge_sdk.fleet.db.Database`.

    ``port=0`` picks a free port (bound at construction; see :attr:`port` / :attr:`url`). ``stats`` is an
    optional callable returning the collector's counters for ``/metrics``; ``since_s`` is the default range of
    the device and model aggregates. ``security``: token and TLS (default none: loopback ``host`` only);
    ``limits``: worker threads, deadlines (default :class:`~edge_sdk.httpbase.HTTPLimits`); ``samples``: the
    :class:`~edge_sdk.fleet.samples.store.SampleStore` behind ``/api/samples`` (device uploads; see its module).
    """

    def __init__(self, db: Database, host: str = "127.0.0.1", port: int = 8000, *,
                 stats: Callable[[], dict[str, Any]] | None = None, since_s: float = 900,
                 static_dir: Path | str = STATIC_DIR, security: HTTPSecurity | None = None,
                 limits: HTTPLimits | None = None, samples: SampleStore | None = None) -> None:
        self.db = db
        self.samples = samples  # POST /api/samples stores here (None: the route answers 404)
        self.stats = stats
        self.cache = RangeCache()  # per-minute aggregates: a refreshing dashboard re-reads only the newest minute
        self.since_s = float(since_s)
        # /metrics counters: every window received from now on, added once (Prometheus counter semantics)
        self.counters = FleetCounters(db, lookback_s=self.since_s)
        self.static_dir = Path(static_dir).resolve()
        self.host = host
        self.security = security or HTTPSecurity()
        self._httpd = bind(host, port, _Handler, self, limits=limits, security=self.security,
                           what="the collector's dashboard and API")
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL (``0.0.0.0`` / ``::`` shown as the loopback address)."""
        return base_url(self.host, self.port, self.security.tls)

    def start(self) -> int:
        """Serve from a background thread; returns the bound port."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="edge-sdk-collector-http",
                                            daemon=True)
            self._thread.start()
            log.info("dashboard on %s", self.url)
        return self.port

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> CollectorHTTP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- routing (HTTP threads) ---------------------------------------------------------------------------
    def route(self, path: str, query: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
        """Answer one GET: (status, content type, body, extra headers); raises HTTPError or a DB error."""
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/healthz":
            try:
                self.db.query("SELECT 1 AS ok")
            except _db_errors() as exc:
                return _json(503, {"status": "unavailable", "error": first_line(exc, 1000)})
            return _json(200, {"status": "ok", "db": getattr(self.db, "dialect", None)})
        if path == "/metrics":
            since = _float(query, "since", self.since_s, 1, 365 * 86400)
            text = metrics_text(self.db, self.stats, since_s=since, cache=self.cache, counters=self.counters)
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode(), {"Cache-Control": "no-store"}
        if path.startswith("/api/"):
            return _json(200, self._api(path[len("/api/"):].rstrip("/"), query))
        raise HTTPError(404, "not_found", f"no route {path}: use /, /api/devices, /api/models, /api/alerts, "
                        "/api/dead_letters, /healthz or /metrics")

    def _api(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        fleet = query.get("fleet") or None
        if fleet is not None:
            _check_id(fleet, "fleet")
        now = time.time()
        if path in ("devices", "models"):
            since = _float(query, "since", self.since_s, 1, 365 * 86400)
            if path == "devices":
                return {"now": now, "since_s": since, "devices": views.fleet_status(
                self.db, fleet, since_s=since, now=now, cache=self.cache)}
            return {"now": now, "since_s": since, "models": views.model_versions(
                self.db, fleet, since_s=since, now=now, cache=self.cache)}
        segs = path.split("/")
        if len(segs) == 4 and segs[0] == "devices" and segs[3] == "series":
            f, d = _check_id(unquote(segs[1]), "fleet"), _check_id(unquote(segs[2]), "device")
            since = _float(query, "since", 3600, 1, 365 * 86400)
            points = int(_float(query, "max_points", 300, 1, 5000))
            return {"fleet": f, "device": d, "now": now, "since_s": since,
                    "points": views.device_series(self.db, f, d, since_s=since, max_points=points, now=now)}
        if path == "alerts":
            state = query.get("state") or None
            if state not in (None, "open", "resolved"):
                raise HTTPError(400, "bad_request",
                                f"state={state!r} is not valid: use open or resolved (or leave it out)")
            limit = int(_float(query, "limit", 200, 1, 10_000))
            return {"alerts": views.alerts(self.db, state, limit, fleet=fleet)}
        if path == "dead_letters":
            limit = int(_float(query, "limit", 100, 1, views.DEAD_LETTERS_MAX_LIMIT))
            return {"dead_letters": views.dead_letters(self.db, limit)}
        if len(segs) == 2 and segs[0] == "dead_letters":
            text = unquote(segs[1])
            if not (text.isascii() and text.isdigit() and len(text) <= 18):
                raise HTTPError(400, "bad_request", f"dead letter id {text[:40]!r} is not an integer: use the id "
                                "from /api/dead_letters")
            row = views.dead_letter(self.db, int(text))
            if row is None:
                raise HTTPError(404, "not_found", f"no dead letter {text}: it was never stored or retention "
                                "removed it")
            return row
        raise HTTPError(404, "not_found", f"no API route /api/{path}: use devices, models, "
                        "devices/<fleet>/<device>/series, alerts, dead_letters or dead_letters/<id>")

    def _static(self, name: str) -> tuple[int, str, bytes, dict[str, str]]:
        name = unquote(name)
        target = (self.static_dir / name).resolve()
        if ("\x00" in name or "\\" in name or not target.is_relative_to(self.static_dir) or not target.is_file()
                or target.suffix not in _CONTENT_TYPES):
            raise HTTPError(404, "not_found", f"no static file {name!r}")
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": _CSP}
        return 200, _CONTENT_TYPES[target.suffix], target.read_bytes(), headers


def _check_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except ValueError as exc:
        raise HTTPError(400, "bad_request", str(exc)) from None


def _json(status: int, payload: dict[str, Any]) -> tuple[int, str, bytes, dict[str, str]]:
    body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    return status, "application/json", body, {"Cache-Control": "no-store"}
