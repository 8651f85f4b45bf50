"""Shared by the OTA tests (test_updater, test_ota_security, test_device_runner): a loopback file server base,
running one for a test, and the updater's event recorder."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from edge_sdk.device_agent.updater import ModelStore, Updater

__all__ = ["Events", "LoopbackServer", "make_updater", "serving"]

S = TypeVar("S", bound=http.server.HTTPServer)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server on 127.0.0.1 (a free port) with ``url(name)``."""

    daemon_threads = True

    def __init__(self, handler: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@contextlib.contextmanager
def serving(srv: S) -> Iterator[S]:
    """Run ``srv`` on a daemon thread for the block, then shut it down and close it."""
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


class Events:
    """Records the updater's ``emit_event(kind, data, level)`` calls."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any], str]] = []

    def __call__(self, kind: str, data: dict[str, Any], level: str) -> None:
        self.items.append((kind, data, level))

    @property
    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.items]

    def last(self, kind: str) -> dict[str, Any]:
        return [d for k, d, _ in self.items if k == kind][-1]


def make_updater(trusted_keys: Any, root: Path, **kw: Any) -> tuple[Updater, Events]:
    """An :class:`Updater` on a model store at ``root`` trusting ``trusted_keys``, with its event recorder."""
    events = Events()
    kw.setdefault("trusted_keys", trusted_keys)
    return Updater(ModelStore(root), emit_event=events, **kw), events
