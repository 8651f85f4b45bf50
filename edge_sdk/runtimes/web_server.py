"""A small static file server for web artifacts, with the cross-origin isolation headers WASM threads need.

ONNX Runtime Web runs its WASM backend on several threads only when the page is *cross-origin isolated*
(``SharedArrayBuffer`` is otherwise unavailable, and the runtime silently falls back to one thread): every
response carries ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``
(plus ``Cross-Origin-Resource-Policy: same-origin`` so the page's own files pass the embedder policy). A static
host serving a web artifact must set the same two headers for multi-threaded inference.

Used by ``edge-sdk web serve BUNDLE`` and by the ``onnxruntime-web`` runtime (validation and benchmarks load the
artifact through it). GET and HEAD only; paths are resolved inside the served folder (no ``..``, no symlink out
of it); files over :data:`MAX_FILE_BYTES` are refused; the bounded pool of :mod:`edge_sdk.http_pool` serves.
Loopback by default: :func:`serve_site` refuses another address unless ``allow_remote``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from edge_sdk.errors import EdgeSDKError, HTTPError
from edge_sdk.http_pool import HTTPLimits, HTTPServer
from edge_sdk.httpbase import RequestHandler, is_loopback

__all__ = ["ISOLATION_HEADERS", "MAX_FILE_BYTES", "StaticSite", "serve_site"]

log = logging.getLogger("edge_sdk.web")

#: the headers that make a page cross-origin isolated (WASM threads need SharedArrayBuffer)
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MAX_FILE_BYTES = 512 * 1024 * 1024  # a web artifact is the runtime (~15 MB) plus one model
_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8", ".onnx": "application/octet-stream",
}


class _Handler(RequestHandler):
    server: StaticSite
    logger = log
    extra_headers: ClassVar[dict[str, str]] = {**ISOLATION_HEADERS, "Cache-Control": "no-store",
                                               "X-Content-Type-Options": "nosniff"}

    def handle_request(self) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", f"{self.command} is not allowed: use GET or HEAD",
                            {"Allow": "GET, HEAD"})
        raw = unquote(urlsplit(self.path).path)
        if raw == "/" and self.server.index:
            self.send_body(302, b"", "text/plain", {"Location": self.server.index})
            return
        target = self.server.resolve(raw)
        self.send_body(200, target.read_bytes(), _TYPES.get(target.suffix.lower(), "application/octet-stream"))


class StaticSite(HTTPServer):
    """Serves the files below ``root`` (``with StaticSite(root) as s: s.url``); ``/`` redirects to ``index``."""

    thread_name = "web-static"

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *, index: str = "",
                 limits: HTTPLimits | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise EdgeSDKError(f"{root} is not a folder: give a bundle or a web artifact folder")
        self.index = index
        try:
            super().__init__((host, port), _Handler, limits or HTTPLimits(workers=4, max_body_bytes=1024))
        except OSError as exc:
            raise EdgeSDKError(f"cannot listen on {host}:{port}: {exc.strerror}: choose another port") from None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def resolve(self, url_path: str) -> Path:
        """The file a URL path names inside the root; HTTPError 404 for anything else."""
        rel = url_path.lstrip("/")
        if "\0" in rel or any(part == ".." for part in rel.split("/")):
            raise HTTPError(404, "not_found", f"{url_path} is not a file of this site")
        target = (self.root / rel).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_relative_to(self.root) or not target.is_file():
            raise HTTPError(404, "not_found", f"{url_path} is not a file of this site")
        if target.stat().st_size > MAX_FILE_BYTES:
            raise HTTPError(413, "too_large", f"{url_path} is over {MAX_FILE_BYTES >> 20} MB: not served")
        return target


def serve_site(root: str | Path, host: str = "127.0.0.1", port: int = 0, *, index: str = "",
               allow_remote: bool = False) -> StaticSite:
    """A started :class:`StaticSite`; a non-loopback ``host`` is refused unless ``allow_remote``."""
    if not is_loopback(host) and not allow_remote:
        raise EdgeSDKError(f"--host {host} would publish the folder on the network: serve on 127.0.0.1, or pass "
                           "--allow-remote to mean it")
    return StaticSite(root, host, port, index=index).start()

