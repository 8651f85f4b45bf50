"""The background uploader of captured samples: sends what the on-device store holds to the collector
(``POST {upload_url}/api/samples``) and deletes a sample only once the collector answered with its sha256; while the
collector is down it backs off (doubling up to 5 minutes) and the store keeps the samples under its cap."""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_sdk import safe_json
from edge_sdk.device_agent.capture_settings import SAMPLE_HEADER, CaptureSettings
from edge_sdk.device_agent.capture_store import LocalSampleStore
from edge_sdk.errors import ConfigError, first_line

__all__ = ["SampleUploader", "read_token"]

log = logging.getLogger("edge_sdk.agent.capture")

_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "npy": "application/x-npy"}
_MAX_BACKOFF_S = 300.0


def read_token(path: str | None) -> str | None:
    """The collector's HTTP token from ``token_file`` (None: no token); a one-line :class:`ConfigError` if unusable."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the capture token file {path}: {first_line(exc)}") from None
    if len(token) < 16 or not token.isascii() or " " in token:
        raise ConfigError(f"the capture token in {path} must be at least 16 printable ASCII characters")
    return token


class SampleUploader:
    """Uploads the samples and label updates of ``store`` for one device (``fleet`` / ``device``): :meth:`run` is the
    thread's body, ``stop`` ends it and ``wake`` starts a round early. Counters go to ``counts`` (under ``lock``),
    shared with :class:`~edge_sdk.device_agent.capture.Capture`; :attr:`last_upload_error` says why the last round
    failed and :attr:`failures` counts the failed rounds in a row. Reads the token and the CA file at construction
    (a bad one is a :class:`ConfigError` when the agent starts, not in the thread)."""

    def __init__(self, settings: CaptureSettings, store: LocalSampleStore, *, fleet: str, device: str,
                 counts: dict[str, int], lock: threading.Lock, stop: threading.Event, wake: threading.Event,
                 rng: random.Random) -> None:
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.device = device
        self._counts = counts
        self._lock = lock
        self._stop = stop
        self._wake = wake
        self._rng = rng
        self._token = read_token(settings.token_file)
        self._ssl = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None
        self.failures = 0
        self.last_upload_error: str | None = None

    def run(self) -> None:
        """The uploader thread: a round every ``upload_interval_s``, backing off while the collector is down."""
        interval = self.settings.upload_interval_s
        while not self._stop.is_set():
            delay = interval
            try:
                ok = self._upload_round()
            except Exception as exc:  # never let the uploader die: log, back off, retry
                log.exception("capture upload failed")
                ok, self.last_upload_error = False, first_line(exc)
            if ok:
                self.failures = 0
            else:
                self.failures += 1
                delay = min(max(interval, 0.1) * 2 ** min(self.failures, 16), max(interval, _MAX_BACKOFF_S))
                delay *= 0.8 + 0.4 * self._rng.random()
            self._wake.wait(delay)
            self._wake.clear()

    def _upload_round(self) -> bool:
        """Send every stored sample and label update; False when the collector could not be reached (back off)."""
        while not self._stop.is_set():
            rows = self.store.pending(32)
            for row in rows:
                if self._stop.is_set():
                    return True
                if not self._upload_one(row):
                    return False
            if len(rows) < 32:
                break
        updates = self.store.label_updates()
        if updates:
            status, doc = self._request("/api/samples/labels", json.dumps(
                {"fleet": self.fleet, "device": self.device,
                 "labels": [{"sha256": s, "label": v} for s, v in updates]}).encode(), "application/json", {})
            if status != 200:
                return self._failed(status, doc, "label update")
            self.store.labels_sent(updates)
            with self._lock:
                self._counts["labels_sent"] += len(updates)
        return True

    def _upload_one(self, row: dict[str, Any]) -> bool:
        sha, ext = row["sha256"], row["ext"]
        data = self.store.read(sha, ext)
        if data is None:  # dropped by the cap meanwhile
            return True
        meta = {**row["meta"], "label": row["label"]}
        status, doc = self._request("/api/samples", data, _CONTENT_TYPES[ext],
                                    {SAMPLE_HEADER: json.dumps(meta, separators=(",", ":"))})
        if status in (200, 201) and doc.get("sha256") == sha:
            self.store.remove(sha, row["label"])
            with self._lock:
                self._counts["uploaded" if status == 201 else "upload_duplicates"] += 1
            return True
        if status in (400, 413, 415, 422):  # refused for good: resending would be refused again
            log.warning("the collector refused sample %s (HTTP %s: %s): dropped", sha[:12], status, doc.get("error"))
            self.store.remove(sha, row["label"])
            with self._lock:
                self._counts["rejected"] += 1
            return True
        return self._failed(status, doc, "upload")

    def _failed(self, status: int, doc: dict[str, Any], what: str) -> bool:
        msg = f"capture {what} to {self.settings.upload_url} failed: " + (
            f"HTTP {status}: {doc.get('error', '')}" if status else str(doc.get("error")))
        if status == 404:
            msg += " (start the collector with --samples-dir DIR)"
        if msg != self.last_upload_error:
            log.warning("%s; retrying with backoff", msg)
        self.last_upload_error = msg
        with self._lock:
            self._counts["upload_failures"] += 1
        return False

    def _request(self, path: str, body: bytes, ctype: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """POST ``body``; (status, JSON answer) — status 0 when the collector cannot be reached."""
        url = self.settings.upload_url.rstrip("/") + path  # type: ignore[union-attr]
        hdrs = {"Content-Type": ctype, **headers}
        if self._token:
            hdrs["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(url, data=body, headers=hdrs, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl) as resp:
                status, raw = resp.status, resp.read(65536)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(65536)
        except (OSError, ValueError) as exc:  # refused, reset, timeout, DNS, TLS
            return 0, {"error": first_line(exc)}
        try:
            doc = safe_json.loads(raw) if raw else {}
        except ValueError:
            doc = {"error": raw[:200].decode("utf-8", "replace")}
        return status, doc if isinstance(doc, dict) else {}
