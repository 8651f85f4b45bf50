"""Serving registry archives over HTTP with resumable range requests.

``GET /bundles/<name>/<version>.tar.gz`` (and ``HEAD``) answers with the archive, ``ETag: "<sha256>"`` and
``Accept-Ranges: bytes``. A single ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` gets ``206 Partial
Content`` with ``Content-Range``; a range starting beyond the end gets ``416`` with ``Content-Range: bytes
*/size``; a malformed or multi-part range is ignored (full ``200``, as RFC 9110 allows). ``If-Range`` with a
stale ETag gets the full archive, ``If-None-Match`` with the current one ``304``.

Only versions some fleet is meant to run are served (:func:`servable`): the active version, the version of each
fleet's latest deployment (unless it was rolled back) and that deployment's rollback target. A candidate, a
promoted version not yet deployed and a retired one are ``404``: the archive server is not a catalogue of every
model ever registered.

:func:`handle_bundle_request` plugs into any ``http.server`` handler (the collector's dashboard server mounts
it); :class:`BundleHTTPServer` is a small standalone server (``edge-sdk registry serve``, tests).
"""

from __future__ import annotations

import logging
import os
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from edge_sdk.errors import HTTPError, RangeNotSatisfiable
from edge_sdk.httpbase import HTTPLimits, HTTPServer, RequestHandler

if TYPE_CHECKING:
    from edge_sdk.fleet.lifecycle.registry import Registry

__all__ = ["BUNDLE_PREFIX", "BundleHTTPServer", "RangeNotSatisfiable", "bundle_path", "handle_bundle_request",
           "parse_range", "servable", "serve_file"]

log = logging.getLogger(__name__)

BUNDLE_PREFIX = "/bundles/"
_CHUNK = 1 << 16
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def bundle_path(name: str, version: str) -> str:
    """URL path of an archive: ``/bundles/<name>/<version>.tar.gz`` (quoted)."""
    return f"{BUNDLE_PREFIX}{quote(name, safe='')}/{quote(version, safe='')}.tar.gz"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` a ``Range`` header asks for, or None for the whole file.

    Raises :class:`RangeNotSatisfiable` when the (single, well-formed) range cannot be served.
    """
    if not header:
        return None
    m = _RANGE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # another unit, several ranges or garbage: ignored, the whole file is sent
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    a = int(first)
    if last and int(last) < a:
        return None  # syntactically invalid: ignored
    if a >= size:
        raise RangeNotSatisfiable(header)
    return a, min(int(last) if last else size - 1, size - 1)


def serve_file(handler: BaseHTTPRequestHandler, path: str | os.PathLike, etag: str, *,
               content_type: str = "application/gzip", head: bool = False) -> int:
    """Answer ``handler``'s request with the file at ``path`` (ranges, ETag); return the HTTP status sent."""
    path = Path(path)
    size = path.stat().st_size
    tag = f'"{etag}"'
    if handler.headers.get("If-None-Match", "").strip() in (tag, "*"):
        handler.send_response(304)
        handler.send_header("ETag", tag)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return 304
    range_header = handler.headers.get("Range")
    if_range = handler.headers.get("If-Range")
    if if_range is not None and if_range.strip() != tag:
        range_header = None  # the client's partial copy is of another version: send it all
    try:
        rng = parse_range(range_header, size)
    except RangeNotSatisfiable:
        handler.send_response(416)
        handler.send_header("Content-Range", f"bytes */{size}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", tag)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return 416
    first, last = rng if rng is not None else (0, size - 1)
    length = last - first + 1 if size else 0
    status = 206 if rng is not None else 200
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(length))
    handler.send_header("Accept-Ranges", "bytes")
    handler.send_header("ETag", tag)
    handler.send_header("Cache-Control", "no-cache")
    if status == 206:
        handler.send_header("Content-Range", f"bytes {first}-{last}/{size}")
    handler.end_headers()
    if head or not length:
        return status
    try:
        with open(path, "rb") as fh:
            fh.seek(first)
            left = length
            while left:
                block = fh.read(min(_CHUNK, left))
                if not block:
                    break  # the file shrank under us; the client sees a short body and resumes
                handler.wfile.write(block)
                left -= len(block)
    except (BrokenPipeError, ConnectionResetError):
        log.info("client went away during %s (it can resume with a Range request)", path.name)
    return status


def servable(registry: Registry, name: str, version: str) -> bool:
    """True when devices may download ``name:version`` (module doc): active, or named by a fleet's latest deployment."""
    rec = registry.get(name, version)
    if rec is None:
        return False
    if rec.state == "active":
        return True
    latest: dict[str, dict] = {}
    for d in registry.db.query("SELECT fleet, version, previous_version, state FROM deployments WHERE name = ? "
                               "ORDER BY created_at", (name,)):
        latest[d["fleet"]] = d
    for d in latest.values():
        if d["version"] == version and d["state"] != "rolled_back":
            return True
        if d["previous_version"] == version and d["state"] in ("running", "rolled_back"):
            return True  # the rollback target: sent again when the deployment is (or was) rolled back
    return False


def handle_bundle_request(handler: RequestHandler, registry: Registry, *, head: bool = False) -> bool:
    """Serve ``/bundles/<name>/<version>.tar.gz`` for ``handler`` (GET, or HEAD with ``head=True``).

    Returns False, sending nothing, when the request path is not below ``/bundles/`` (so the caller can route
    it elsewhere); True once a response (archive, 404 ...) was sent.
    """
    path = urlsplit(handler.path).path
    if not path.startswith(BUNDLE_PREFIX):
        return False
    parts = path[len(BUNDLE_PREFIX):].split("/")
    if len(parts) != 2 or not parts[1].endswith(".tar.gz"):
        handler.send_json(404, {"error": "use /bundles/<name>/<version>.tar.gz"})
        return True
    name, version = unquote(parts[0]), unquote(parts[1][: -len(".tar.gz")])
    rec = registry.get(name, version)
    if rec is None or not servable(registry, name, version):
        handler.send_json(404, {"error": f"{name}:{version} is not being deployed: only the active version and "
                                         "those of the fleets' latest deployments are served"})
        return True
    archive = Path(rec.archive_path)
    if not archive.is_file() or archive.stat().st_size != rec.size_bytes:
        log.error("archive of %s:%s is missing or changed on disk (%s)", name, version, archive)
        handler.send_json(500, {"error": f"the stored archive of {name}:{version} is missing or damaged: "
                                         "re-add the bundle"})
        return True
    serve_file(handler, archive, rec.bundle_sha256, head=head)
    return True


class _Handler(RequestHandler):
    server: BundleHTTPServer
    logger = log

    def handle_request(self) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", f"{self.command} is not allowed: use GET or HEAD",
                            {"Allow": "GET, HEAD"})
        if not handle_bundle_request(self, self.server.registry, head=self.command == "HEAD"):
            raise HTTPError(404, "not_found", "not found: use /bundles/<name>/<version>.tar.gz")


class BundleHTTPServer(HTTPServer):
    """A standalone HTTP server for registry archives (``with BundleHTTPServer(reg) as s: s.url``).

    The bounded pool of :mod:`edge_sdk.http_pool` (``limits``); no token: devices download by the URL in their
    signed-bundle update command, and only versions being deployed are served.
    """

    thread_name = "bundle-http"

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 0, *,
                 limits: HTTPLimits | None = None) -> None:
        self.registry = registry
        super().__init__((host, port), _Handler, limits)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121`` (archives are below ``/bundles/``)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
