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

This module holds the :class:`Capture` facade (policies, writer thread); the settings are in
:mod:`~edge_sdk.device_agent.capture_settings`, the store in :mod:`~edge_sdk.device_agent.capture_store`, the
uploader in :mod:`~edge_sdk.device_agent.capture_upload`. Their public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import queue
import random
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.device_agent.capture_settings import (
    CAPTURE_KEYS,
    POLICIES,
    SAMPLE_HEADER,
    CaptureError,
    CaptureSettings,
    sample_ext,
)
from edge_sdk.device_agent.capture_store import LocalSampleStore
from edge_sdk.device_agent.capture_upload import SampleUploader

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["CAPTURE_KEYS", "POLICIES", "SAMPLE_HEADER", "Capture", "CaptureError", "CaptureSettings",
           "LocalSampleStore", "sample_ext"]

log = logging.getLogger("edge_sdk.agent.capture")

# ---- capture: policies, writer --------------------------------------------------------------------------------

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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._uploader = SampleUploader(settings, self.store, fleet=fleet, device=device, counts=self._counts,
                                        lock=self._lock, stop=self._stop, wake=self._wake, rng=self._rng)
        self._threads: list[threading.Thread] = []

    @property
    def last_upload_error(self) -> str | None:
        """Why the last upload round failed (None: none failed yet)."""
        return self._uploader.last_upload_error

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Capture:
        """Start the writer thread, and the uploader when ``upload_url`` is set."""
        if not self._threads:
            targets = [("edge-sdk-capture-writer", self._write_loop)]
            if self.settings.upload_url:
                targets.append(("edge-sdk-capture-upload", self._uploader.run))
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
        if flush_s > 0 and self.settings.upload_url and self._uploader.failures == 0:  # not while the collector is down
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
