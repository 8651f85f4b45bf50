"""Data capture on the device: keep some inputs (with what the model said about them) and upload them.

Off by default; ``[capture]`` in ``agent.toml`` turns it on (see :class:`CaptureSettings`). Four policies choose
what is kept, each sample recording which one chose it:

* ``random``: every prediction with probability ``sample_rate``;
* ``low_confidence``: every prediction whose top-1 confidence is below ``low_confidence``;
* ``drift``: up to ``drift_per_window`` inputs of each telemetry window (a uniform reservoir sample) whose input
  PSI (``input.psi_max`` of the window) is over ``drift_psi``: the inputs that made the window drift;
* ``feedback_disagree``: every ``/feedback`` whose label disagrees with the prediction (the recent inputs are kept
  in a memory ring of ``feedback_buffer_bytes`` for this; the sample carries the label).

A label that arrives through ``/feedback`` for a captured prediction travels with the sample (or as a later label
update once the sample is uploaded).

::

    Agent.predict ──offer()──> policy check (a random draw / the confidence) ──put_nowait──> bounded queue
         (a full queue drops the sample and counts it: inference never waits for the disk)
    writer thread ──> encode (PNG/JPEG bytes as sent, arrays as .npy) ──> sha256 ──> LocalSampleStore
         (content-addressed files + SQLite index, at most max_bytes: the oldest samples are dropped and counted)
    uploader thread (every upload_interval_s) ──POST {upload_url}/api/samples──> collector
         a sample is deleted only once the collector answered with its sha256 (stored or already there); the
         collector deduplicates by sha256, so a retry after a crash or an outage is harmless; while the collector
         is down the uploader backs off (doubling up to 5 minutes) and the store holds the samples under its cap.

What is captured: the encoded image bytes as the client sent them (PNG or JPEG); a decoded image array or a tensor
as ``.npy`` (the first input of a multi-input model). Inputs given to :meth:`Agent.predict` as arrays are copied
when a policy takes them (the caller may reuse its buffer).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue
import random
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk import safe_json
from edge_sdk.errors import ConfigError, TelemetryError, first_line

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["CAPTURE_KEYS", "POLICIES", "SAMPLE_HEADER", "Capture", "CaptureError", "CaptureSettings",
           "LocalSampleStore", "sample_ext"]

log = logging.getLogger("edge_sdk.agent.capture")

#: the capture policies, in the order a prediction is checked against them
POLICIES = ("random", "low_confidence", "drift", "feedback_disagree")
#: keys of the ``[capture]`` table
CAPTURE_KEYS = ("enabled", "dir", "sample_rate", "low_confidence", "drift", "drift_psi", "drift_per_window",
                "feedback_disagree", "feedback_buffer_bytes", "max_bytes", "max_sample_bytes", "queue_size",
                "upload_url", "token_file", "ca_file", "upload_interval_s")
#: request header carrying a sample's metadata (compact JSON) on ``POST /api/samples``
SAMPLE_HEADER = "X-Edge-Sample"
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "npy": "application/x-npy"}
_MAX_BACKOFF_S = 300.0


class CaptureError(TelemetryError):
    """The capture store cannot be opened or written (damaged, read-only, disk full)."""


def sample_ext(data: bytes | bytearray | memoryview) -> str | None:
    """The file extension of a sample from its first bytes: ``png``, ``jpg``, ``npy``, or None for anything else."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return None


@dataclass(frozen=True)
class CaptureSettings:
    """``[capture]`` of ``agent.toml`` (every key optional; a present table turns capture on unless
    ``enabled = false``)::

        [capture]
        sample_rate = 0.01            # random: this fraction of all predictions
        low_confidence = 0.5          # predictions whose top-1 confidence is below this
        drift = true                  # inputs of telemetry windows whose input PSI is over drift_psi
        drift_psi = 0.2               #   (the collector's drift threshold; needs [telemetry])
        drift_per_window = 4          #   at most this many per drifting window (a uniform sample of the window)
        feedback_disagree = true      # every /feedback whose label disagrees with the prediction
        feedback_buffer_bytes = 33554432  # memory for recent inputs awaiting feedback (oldest forgotten first)
        dir = "/var/lib/edge-sdk/capture"  # on-device store (relative to the config file)
        max_bytes = 268435456         # the store's cap: the oldest samples are dropped (and counted) beyond it
        max_sample_bytes = 4194304    # a larger sample is not kept (counted); default min(4 MiB, max_bytes)
        queue_size = 64               # samples waiting for the disk; beyond it they are dropped (and counted)
        upload_url = "https://collector.example:8000"   # the collector's HTTP base URL (none: keep on the device)
        token_file = "/etc/edge-sdk/collector.token"    # the collector's HTTP token (Authorization: Bearer)
        ca_file = "/etc/edge-sdk/ca.crt"               # CA bundle for an https upload_url
        upload_interval_s = 10        # how often the uploader sends what is stored

    At least one policy must be on.
    """

    enabled: bool = False
    dir: str = "edge-sdk-capture"
    sample_rate: float = 0.0
    low_confidence: float | None = None
    drift: bool = False
    drift_psi: float = 0.2
    drift_per_window: int = 4
    feedback_disagree: bool = False
    feedback_buffer_bytes: int = 32 * 1024 * 1024
    max_bytes: int = 256 * 1024 * 1024
    max_sample_bytes: int = None  # type: ignore[assignment]  # default: min(4 MiB, max_bytes)
    queue_size: int = 64
    upload_url: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    upload_interval_s: float = 10.0

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"capture {name} must be a number between {lo:g} and {hi:g}, got {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"capture {name} must be an integer >= {lo}, got {v!r}")

        if self.max_sample_bytes is None and isinstance(self.max_bytes, int):
            object.__setattr__(self, "max_sample_bytes", min(4 * 1024 * 1024, self.max_bytes))
        num("sample_rate", 0.0, 1.0)
        if self.low_confidence is not None:
            num("low_confidence", 0.0, 1.0)
        num("drift_psi", 0.0, 100.0)
        num("upload_interval_s", 0.01, 86400.0)
        for name in ("drift_per_window", "feedback_buffer_bytes", "max_bytes", "max_sample_bytes", "queue_size"):
            integer(name, 1)
        if self.max_sample_bytes > self.max_bytes:
            raise ConfigError(f"capture max_sample_bytes ({self.max_sample_bytes}) must not exceed max_bytes "
                              f"({self.max_bytes})")
        if self.upload_url is not None and not self.upload_url.startswith(("http://", "https://")):
            raise ConfigError(f"capture upload_url {self.upload_url!r} must be the collector's http(s):// base URL")
        if self.enabled and not self.policies():
            raise ConfigError("capture is enabled but no policy is on: set sample_rate, low_confidence, drift = true "
                              "or feedback_disagree = true in [capture]")

    def policies(self) -> list[str]:
        """The policies these settings turn on."""
        on = {"random": self.sample_rate > 0, "low_confidence": self.low_confidence is not None,
              "drift": self.drift, "feedback_disagree": self.feedback_disagree}
        return [p for p in POLICIES if on[p]]


# ---- the on-device store ---------------------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE, "
    "ext TEXT NOT NULL, size INTEGER NOT NULL, meta TEXT NOT NULL, label INTEGER, created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS labels (sha256 TEXT PRIMARY KEY, label INTEGER NOT NULL, ts REAL NOT NULL)",
)


class LocalSampleStore:
    """Content-addressed sample files (``<dir>/blobs/<sha256>.<ext>``) with an SQLite index (``<dir>/index.db``),
    holding at most ``max_bytes`` of samples: adding beyond it drops the oldest, counted in :attr:`dropped`
    (persisted). A crash between a file write and its index row leaves an orphan file, removed at the next open.
    Thread-safe (one connection, one lock)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, synchronous: str = "NORMAL") -> None:
        self.dir = Path(directory).expanduser()
        self.blobs = self.dir / "blobs"
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # captured inputs are private data
            self.blobs.mkdir(mode=0o700, exist_ok=True)
            self._conn = sqlite3.connect(self.dir / "index.db", timeout=5.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
            for stmt in _SCHEMA:
                self._conn.execute(stmt)
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            self.dropped = int(meta.get("dropped", "0"))
            self.total_bytes = int(self._conn.execute("SELECT COALESCE(SUM(size), 0) FROM samples").fetchone()[0])
            known = {f"{s}.{e}" for s, e in self._conn.execute("SELECT sha256, ext FROM samples")}
        except (OSError, sqlite3.Error) as exc:
            raise CaptureError(f"capture store {self.dir} cannot be opened ({first_line(exc)}): check the folder is "
                               "writable, or move a damaged index.db aside") from None
        for f in self.blobs.iterdir():  # orphans of a crash (and temporary files)
            if f.name not in known:
                f.unlink(missing_ok=True)

    def _path(self, sha: str, ext: str) -> Path:
        return self.blobs / f"{sha}.{ext}"

    def add(self, sha: str, ext: str, data: bytes, meta: dict[str, Any], label: int | None = None) -> bool:
        """Store one sample (file first, then its row); False when this sha256 is stored already. Drops the oldest
        samples when the cap would be exceeded."""
        with self._lock:
            if self._conn.execute("SELECT 1 FROM samples WHERE sha256=?", (sha,)).fetchone():
                return False
            path = self._path(sha, ext)
            tmp = self.blobs / f".tmp-{sha}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
                victims: list[tuple[str, str]] = []
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute("INSERT INTO samples (sha256, ext, size, meta, label, created_at) VALUES "
                                       "(?, ?, ?, ?, ?, ?)", (sha, ext, len(data), json.dumps(meta), label,
                                                              time.time()))
                    total = self.total_bytes + len(data)
                    if total > self.max_bytes:
                        for s, e, size in self._conn.execute("SELECT sha256, ext, size FROM samples ORDER BY id"):
                            if total <= self.max_bytes:
                                break
                            victims.append((s, e))
                            total -= size
                        self._conn.executemany("DELETE FROM samples WHERE sha256=?", [(s,) for s, _ in victims])
                        self._conn.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT (key) "
                                           "DO UPDATE SET value=excluded.value", (str(self.dropped + len(victims)),))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except (OSError, sqlite3.Error) as exc:
                tmp.unlink(missing_ok=True)
                raise CaptureError(f"capture store {self.dir}: storing a sample failed ({first_line(exc)}): free "
                                   "disk space or check the folder") from None
            self.total_bytes = total
            self.dropped += len(victims)
            for s, e in victims:
                self._path(s, e).unlink(missing_ok=True)
            return True

    def pending(self, limit: int = 32) -> list[dict[str, Any]]:
        """The oldest ``limit`` samples: ``{"sha256", "ext", "meta", "label"}`` (the file is read on upload)."""
        with self._lock:
            rows = self._conn.execute("SELECT sha256, ext, meta, label FROM samples ORDER BY id LIMIT ?",
                                      (limit,)).fetchall()
        return [{"sha256": s, "ext": e, "meta": json.loads(m), "label": lab} for s, e, m, lab in rows]

    def read(self, sha: str, ext: str) -> bytes | None:
        """A sample's bytes (None when it was dropped meanwhile)."""
        try:
            return self._path(sha, ext).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, sha: str, sent_label: int | None) -> None:
        """The collector has ``sha``: delete it. A label set since it was read (``sent_label`` differs) becomes a
        label update, in the same transaction."""
        with self._lock:
            row = self._conn.execute("SELECT ext, size, label FROM samples WHERE sha256=?", (sha,)).fetchone()
            if row is None:
                return
            ext, size, label = row
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM samples WHERE sha256=?", (sha,))
                if label is not None and label != sent_label:
                    self._conn.execute("INSERT OR REPLACE INTO labels (sha256, label, ts) VALUES (?, ?, ?)",
                                       (sha, label, time.time()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.total_bytes -= int(size)
            self._path(sha, ext).unlink(missing_ok=True)

    def set_label(self, sha: str, label: int) -> None:
        """Label a sample: on its row while it waits for upload, else as a label update for the collector."""
        with self._lock:
            cur = self._conn.execute("UPDATE samples SET label=? WHERE sha256=?", (label, sha))
            if cur.rowcount == 0:
                self._conn.execute("INSERT OR REPLACE INTO labels (sha256, label, ts) VALUES (?, ?, ?)",
                                   (sha, label, time.time()))

    def label_updates(self, limit: int = 200) -> list[tuple[str, int]]:
        """Label updates waiting for the collector, oldest first."""
        with self._lock:
            return [(s, int(v)) for s, v in self._conn.execute("SELECT sha256, label FROM labels ORDER BY ts LIMIT ?",
                                                               (limit,))]

    def labels_sent(self, items: list[tuple[str, int]]) -> None:
        """The collector took these label updates (a newer label for the same sample stays)."""
        with self._lock:
            self._conn.executemany("DELETE FROM labels WHERE sha256=? AND label=?", items)

    def count(self) -> int:
        """Samples stored."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def close(self) -> None:
        """Close the index (idempotent)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass


# ---- capture: policies, writer, uploader -----------------------------------------------------------------------

class _Snapshot:
    """An input kept for capture: encoded image bytes, or an array (copied: the caller may reuse its buffer)."""

    __slots__ = ("data", "nbytes")

    def __init__(self, raw: Any, x: np.ndarray | None) -> None:
        if isinstance(raw, (bytes, bytearray, memoryview)) and sample_ext(raw) in ("png", "jpg"):
            self.data: bytes | np.ndarray = bytes(raw)
        elif isinstance(raw, np.ndarray):
            self.data = np.array(raw, copy=True)
        elif x is not None:
            self.data = np.array(x, copy=True)
        else:
            self.data = b""
        self.nbytes = len(self.data) if isinstance(self.data, bytes) else int(self.data.nbytes)


def _model_of(agent: Any) -> tuple[str, str]:
    m = agent.bundle.manifest
    return str(m.name)[:200], str(m.version)[:100]


class Capture:
    """Capture for one device (module docstring): :meth:`offer` per prediction, :meth:`on_feedback` per feedback,
    :meth:`on_window` per telemetry window; :meth:`start` / :meth:`stop` the writer and uploader threads.

    ``fleet`` / ``device``: the ids every sample carries. Counters: :meth:`stats`.
    """

    def __init__(self, settings: CaptureSettings, *, fleet: str, device: str, synchronous: str = "NORMAL") -> None:
        self.settings = settings
        self.fleet = fleet
        self.device = device
        self.store = LocalSampleStore(settings.dir, max_bytes=settings.max_bytes, synchronous=synchronous)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=settings.queue_size)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._counts = {"queued": 0, "queue_dropped": 0, "too_large": 0, "duplicates": 0, "uploaded": 0,
                        "upload_duplicates": 0, "upload_failures": 0, "rejected": 0, "labels_sent": 0,
                        "write_errors": 0}
        self._captured = dict.fromkeys(POLICIES, 0)
        # (input, agent, prediction, time) kept until a window's PSI or a feedback decides; metadata built then
        self._reservoir: list[tuple[_Snapshot, Any, Any, float]] = []
        self._seen_in_window = 0
        self._ring: OrderedDict[str, tuple[_Snapshot, Any, Any, float]] = OrderedDict()
        self._ring_bytes = 0
        self._pred_sha: OrderedDict[str, str] = OrderedDict()  # prediction id -> sha256 (writer thread only)
        self._token = self._read_token(settings.token_file)
        self._ssl = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failures = 0
        self.last_upload_error: str | None = None

    @staticmethod
    def _read_token(path: str | None) -> str | None:
        if path is None:
            return None
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the capture token file {path}: {first_line(exc)}") from None
        if len(token) < 16 or not token.isascii() or " " in token:
            raise ConfigError(f"the capture token in {path} must be at least 16 printable ASCII characters")
        return token

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Capture:
        """Start the writer thread, and the uploader when ``upload_url`` is set."""
        if not self._threads:
            targets = [("edge-sdk-capture-writer", self._write_loop)]
            if self.settings.upload_url:
                targets.append(("edge-sdk-capture-upload", self._upload_loop))
            for name, fn in targets:
                t = threading.Thread(target=fn, name=name, daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def stop(self, flush_s: float = 0.0) -> None:
        """Write what is queued, try uploading for up to ``flush_s`` seconds, stop the threads, close the store."""
        if self._stop.is_set():
            return
        self.flush(timeout=5.0)
        if flush_s > 0 and self.settings.upload_url and self._failures == 0:  # not while the collector is down
            deadline = time.monotonic() + flush_s
            while time.monotonic() < deadline and (self.store.count() or self.store.label_updates(1)):
                self._wake.set()
                time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._queue.put((None,))  # wakes the writer (it may block a moment if the queue is full)
        for t in self._threads:
            t.join(timeout=10)
        self.store.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued sample is written to the store; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline or not self._threads:
                return False
            time.sleep(0.005)
        return True

    def upload_now(self) -> None:
        """Wake the uploader (it also runs every ``upload_interval_s``)."""
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Counters: ``captured`` per policy (new samples stored), ``stored`` / ``stored_bytes`` / ``dropped`` (by
        the cap, persisted) on the device, ``queued`` / ``queue_dropped`` (samples and labels for the writer; a full
        queue drops), ``too_large``, ``duplicates``, ``uploaded``, ``upload_duplicates`` (the collector had them),
        ``upload_failures``, ``rejected`` (refused for good by the collector), ``labels_sent``, ``write_errors``."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["captured"] = dict(self._captured)
        out.update({"stored": self.store.count(), "stored_bytes": self.store.total_bytes,
                    "dropped": self.store.dropped, "max_bytes": self.settings.max_bytes})
        return out

    # ---- hot path: called by the agent -------------------------------------------------------------------------
    def offer(self, agent: Agent, pred: Prediction, raw: Any, x: np.ndarray | None) -> None:
        """One prediction (``raw``: the input as the caller gave it, ``x``: the model's first input tensor).
        Cheap unless a policy takes it: a random draw and, for ``low_confidence``, the prediction's confidence."""
        s = self.settings
        policy = None
        if s.low_confidence is not None:
            conf = pred.confidence
            if conf is not None and conf < s.low_confidence:
                policy = "low_confidence"
        if policy is None and s.sample_rate > 0 and self._rng.random() < s.sample_rate:
            policy = "random"
        now = time.time()
        if policy is not None:
            self._enqueue(("sample", policy, _Snapshot(raw, x), self._meta(agent, pred, now), None))
        if s.drift:
            with self._lock:
                self._seen_in_window += 1
                n = self._seen_in_window
                slot = n - 1 if n <= s.drift_per_window else self._rng.randrange(n)
                if slot < s.drift_per_window:
                    item = (_Snapshot(raw, x), agent, pred, now)
                    if slot < len(self._reservoir):
                        self._reservoir[slot] = item
                    else:
                        self._reservoir.append(item)
        if s.feedback_disagree and self._classifier(agent):
            snap = _Snapshot(raw, x)
            with self._lock:
                self._ring[pred.id] = (snap, agent, pred, now)
                self._ring_bytes += snap.nbytes
                while self._ring_bytes > s.feedback_buffer_bytes and self._ring:
                    old = self._ring.popitem(last=False)[1][0]
                    self._ring_bytes -= old.nbytes

    @staticmethod
    def _classifier(agent: Agent) -> bool:
        return agent.task == "classification"

    @staticmethod
    def _meta(agent: Agent, pred: Prediction, ts: float) -> dict[str, Any]:
        name, version = _model_of(agent)
        conf = pred.confidence
        return {"prediction_id": pred.id, "prediction": pred.class_index,
                "confidence": float(conf) if conf is not None and math.isfinite(conf) else None,
                "model_name": name, "model_version": version, "captured_at": ts}

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait(item)
            with self._lock:
                self._counts["queued"] += 1
        except queue.Full:
            with self._lock:
                self._counts["queue_dropped"] += 1

    def on_feedback(self, prediction_id: str, label: int, predicted: int) -> None:
        """Ground truth for a prediction: label its sample if one was captured; capture it when the label disagrees
        (``feedback_disagree``)."""
        snap = None
        if self.settings.feedback_disagree:
            with self._lock:
                entry = self._ring.pop(prediction_id, None)
                if entry is not None:
                    self._ring_bytes -= entry[0].nbytes
            if entry is not None and label != predicted:
                snap = entry
        if snap is not None:
            data, agent, pred, ts = snap
            self._enqueue(("sample", "feedback_disagree", data, self._meta(agent, pred, ts), int(label)))
        else:
            self._enqueue(("label", prediction_id, int(label)))

    def on_window(self, payload: dict[str, Any]) -> None:
        """A telemetry window was emitted: its reservoir of inputs is captured when its input PSI is over
        ``drift_psi``, else forgotten."""
        if not self.settings.drift:
            return
        with self._lock:
            items, self._reservoir, self._seen_in_window = self._reservoir, [], 0
        psi = (payload.get("input") or {}).get("psi_max")
        if isinstance(psi, (int, float)) and psi > self.settings.drift_psi:
            for snap, agent, pred, ts in items:
                self._enqueue(("sample", "drift", snap, self._meta(agent, pred, ts), None))

    # ---- writer thread -----------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item[0] is None:
                    return
                if item[0] == "sample":
                    self._write(*item[1:])
                else:
                    sha = self._pred_sha.get(item[1])
                    if sha is not None:
                        self.store.set_label(sha, item[2])
            except Exception:  # the writer must survive anything (disk full, a bad array): counted and logged
                with self._lock:
                    self._counts["write_errors"] += 1
                log.exception("a captured sample could not be stored")
            finally:
                self._queue.task_done()

    def _write(self, policy: str, snap: _Snapshot, meta: dict[str, Any], label: int | None) -> None:
        if isinstance(snap.data, bytes):
            data = snap.data
        else:
            buf = io.BytesIO()
            np.save(buf, snap.data, allow_pickle=False)
            data = buf.getvalue()
        if not data:
            return
        if len(data) > self.settings.max_sample_bytes:
            with self._lock:
                self._counts["too_large"] += 1
            return
        ext = sample_ext(data) or "npy"
        sha = hashlib.sha256(data).hexdigest()
        meta = {**meta, "policy": policy, "fleet": self.fleet, "device": self.device, "sha256": sha}
        pid = meta.pop("prediction_id", None)
        stored = self.store.add(sha, ext, data, meta, label)
        with self._lock:
            if stored:
                self._captured[policy] += 1
            else:
                self._counts["duplicates"] += 1
        if not stored and label is not None:
            self.store.set_label(sha, label)
        if pid:
            self._pred_sha[pid] = sha
            while len(self._pred_sha) > 10_000:
                self._pred_sha.popitem(last=False)

    # ---- uploader thread ---------------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        interval = self.settings.upload_interval_s
        while not self._stop.is_set():
            delay = interval
            try:
                ok = self._upload_round()
            except Exception as exc:  # never let the uploader die: log, back off, retry
                log.exception("capture upload failed")
                ok, self.last_upload_error = False, first_line(exc)
            if ok:
                self._failures = 0
            else:
                self._failures += 1
                delay = min(max(interval, 0.1) * 2 ** min(self._failures, 16), max(interval, _MAX_BACKOFF_S))
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
