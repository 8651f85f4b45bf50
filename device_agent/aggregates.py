"""In-memory aggregates of one telemetry window: what the agent keeps per inference, and what it sends.

Per inference the agent does as little as possible, because the first Python and numpy work right after a
model run is slow (the run has evicted the interpreter's and numpy's code and data from the caches):

* before the run, :meth:`WindowAggregator.observe_input` copies a strided subsample of the input tensor (about
  :data:`INPUT_VALUES` values, a moving offset so every pixel is covered over time) into a buffer while the input
  is still in cache;
* after it, :meth:`WindowAggregator.record` appends the latency and a reference to the classifier's score row to
  pending lists (under a lock, a few list operations).

Every :data:`PENDING` inferences, and at :meth:`WindowAggregator.take`, the pending items are folded in bulk:
latencies into the DDSketch, the top-1 softmax confidence and class of all score rows in a few vectorised numpy
calls, the input buffer into per-channel histograms (over the baseline's ``hist_edges``) and moments.

:meth:`WindowAggregator.take` swaps the window state under a lock (a few assignments) and builds the
``telemetry.schema.json`` measurement fields (``count``, ``errors``, ``client_errors``, ``latency_ms``,
``confidence``, ``classes``, ``input``, ``feedback``) outside it.

Errors are counted by kind in ``errors``; those the *client's input* caused (a malformed request, an undecodable
image, a tensor of the wrong shape: the InputError family, HTTP 4xx) are also listed in ``client_errors``. Anyone
who can reach the agent's HTTP port can produce them, so the canary judgement and the fleet's model error rate
leave them out: garbage requests must not roll back a healthy model.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections import Counter
from typing import Any

import numpy as np

from edge_sdk.baseline import CONFIDENCE_BINS, psi
from edge_sdk.sketch import new_sketch, quantiles, sketch_to_dict

__all__ = ["BUFFER_VALUES", "CLIENT_ERROR_KINDS", "ERROR_KINDS", "INPUT_VALUES", "PENDING", "WindowAggregator"]

log = logging.getLogger("edge_sdk.agent.telemetry")

#: roughly how many values of each sampled input enter the input statistics (all channels together)
INPUT_VALUES = 1024
#: values per channel buffered before the histograms are updated in bulk
BUFFER_VALUES = 32 * 1024
#: inferences whose latency and scores are kept before they are folded in bulk
PENDING = 64
#: error kinds the agent records (any ``[a-z0-9_]{1,40}`` is accepted)
ERROR_KINDS = ("input", "preprocess", "runtime", "output")
#: kinds that are the client's fault by default (the agent records them only for an InputError: a bad request body,
#: wrong shape or dtype, an undecodable image); ``record_error(kind, client=...)`` overrides
CLIENT_ERROR_KINDS = frozenset({"input", "preprocess"})
_KIND = re.compile(r"^[a-z0-9_]{1,40}$")


class _InputStats:
    """Per-channel histogram counts and moments of sampled inputs, against the baseline's bins."""

    def __init__(self, channels: list[dict[str, Any]]) -> None:
        self.expected = [np.asarray(c["hist_fractions"], np.float64) for c in channels]
        edges = [np.asarray(c["hist_edges"], np.float64) for c in channels]
        self.nbins = len(self.expected[0])
        if any(len(e) != self.nbins + 1 or len(f) != self.nbins for e, f in zip(edges, self.expected, strict=True)):
            raise ValueError("baseline input channels must share one bin count with len(hist_edges) == bins + 1")
        if self.nbins < 1 or any(not np.all(np.diff(e) > 0) or not np.isfinite(e).all() for e in edges):
            raise ValueError("baseline hist_edges must be finite and strictly increasing")
        c = len(channels)
        self.channels = c
        self.lo = np.array([[e[0]] for e in edges], np.float32)
        self.inv = np.array([[self.nbins / (e[-1] - e[0])] for e in edges], np.float32)
        self.uniform = all(np.allclose(np.diff(e), (e[-1] - e[0]) / self.nbins, rtol=1e-4, atol=0) for e in edges)
        self.inner = [e[1:-1].astype(np.float32) for e in edges]
        self.offsets = (np.arange(c, dtype=np.int32) * self.nbins)[:, None]

    def new_buffer(self) -> np.ndarray:
        return np.empty((self.channels, BUFFER_VALUES), np.float32)

    def fold(self, v: np.ndarray, acc: _InputAcc) -> None:
        """Add the (C, n) values ``v`` to ``acc``: bin counts, n, sum, sum of squares."""
        sums = v.sum(axis=1)
        if not np.isfinite(sums).all():  # NaN (or inf - inf): keep the positions where every channel is finite
            v = v[:, np.isfinite(v).all(axis=0)]
            sums = v.sum(axis=1)
        if v.shape[1] == 0:
            return
        if self.uniform:
            idx = (v - self.lo) * self.inv
            np.clip(idx, 0, self.nbins - 1, out=idx)
            ii = idx.astype(np.int32)
            ii += self.offsets
            acc.counts += np.bincount(ii.ravel(), minlength=self.channels * self.nbins).reshape(self.channels, -1)
        else:
            for ch in range(self.channels):
                acc.counts[ch] += np.bincount(np.searchsorted(self.inner[ch], v[ch], side="right"),
                                              minlength=self.nbins)
        acc.n += v.shape[1]
        acc.sum += sums.astype(np.float64)
        acc.sumsq += np.einsum("ij,ij->i", v, v).astype(np.float64)


class _InputAcc:
    """Accumulated input statistics of one window."""

    __slots__ = ("counts", "n", "sum", "sumsq")

    def __init__(self, channels: int, nbins: int) -> None:
        self.counts = np.zeros((channels, nbins), np.int64)
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)


class _Window:
    """Mutable state of the window being filled (swapped out whole by ``take``)."""

    __slots__ = ("buf", "buf_n", "classes", "client_errors", "conf_counts", "conf_n", "conf_sum", "count", "errors",
                 "fb_correct", "fb_labelled", "fb_rejected", "fb_unknown", "input_acc", "latencies", "sampled",
                 "scores", "sketch")

    def __init__(self, conf_bins: int, stats: _InputStats | None) -> None:
        self.count = 0
        self.errors: Counter[str] = Counter()
        self.client_errors: Counter[str] = Counter()
        self.sketch = new_sketch()
        self.latencies: list[float] = []
        self.scores: list[np.ndarray] = []
        self.conf_counts = np.zeros(conf_bins, np.int64)
        self.conf_n = 0
        self.conf_sum = 0.0
        self.classes: Counter[int] = Counter()
        self.fb_labelled = self.fb_correct = self.fb_unknown = self.fb_rejected = 0
        self.sampled = 0
        self.input_acc = _InputAcc(stats.channels, stats.nbins) if stats is not None else None
        self.buf = stats.new_buffer() if stats is not None else None
        self.buf_n = 0


class WindowAggregator:
    """Aggregates of one telemetry window, updated per inference and taken (and reset) once per window.

    ``baseline`` is the bundle manifest's ``baseline`` (``input_channels`` with ``hist_edges`` /
    ``hist_fractions``, ``layout``, optional ``confidence.bin_edges``); without input channels no input
    statistics are kept. ``classifier`` enables the confidence and predicted-class histograms.
    ``input_sample_every``: only every n-th input enters the input statistics; ``input_values``: about how many
    values of each sampled input are used. ``probabilities``: score rows given to :meth:`record` are already
    probabilities (else logits, which go through a softmax); None: decided from the first row (all in [0, 1] and
    summing to 1).
    Thread-safe: :meth:`record` may be called from several threads while another calls :meth:`take`.
    """

    def __init__(self, baseline: dict[str, Any] | None, *, classifier: bool, num_classes: int | None = None,
                 input_sample_every: int = 1, input_values: int = INPUT_VALUES,
                 probabilities: bool | None = None) -> None:
        if input_sample_every < 1:
            raise ValueError(f"input_sample_every must be >= 1, got {input_sample_every}")
        baseline = baseline or {}
        self.classifier = bool(classifier)
        self.num_classes = num_classes
        self.probabilities = probabilities
        self.input_sample_every = int(input_sample_every)
        self.input_values = max(1, int(input_values))
        conf = baseline.get("confidence") if isinstance(baseline.get("confidence"), dict) else {}
        self.conf_edges = [float(e) for e in (conf.get("bin_edges") or CONFIDENCE_BINS)]
        self._conf_inner = np.asarray(self.conf_edges[1:-1], np.float64)
        channels = baseline.get("input_channels") or []
        self._stats: _InputStats | None = None
        if channels:
            try:
                self._stats = _InputStats(channels)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("the bundle's baseline input statistics are unusable (%s): no drift statistics", exc)
        self.layout = baseline.get("layout") or None
        self._views: dict[tuple[tuple[int, ...], str | None], tuple[int, int] | None] = {}
        self._calls = 0
        self._lock = threading.Lock()
        self._w = _Window(len(self.conf_edges) - 1, self._stats)
        self.last_input: dict[str, Any] | None = None  # the last taken window's ``input`` (the agent's /metrics)

    # ---- per inference ------------------------------------------------------------------------------------

    def record(self, latency_ms: float, *, confidence: float | None = None, class_index: int | None = None,
               scores: np.ndarray | None = None, x: np.ndarray | None = None, layout: str | None = None) -> None:
        """One completed inference: its latency and, for classifiers, either its top-1 ``confidence`` and
        ``class_index`` or its score row ``scores`` (one sample's logits or probabilities: both are worked out in
        bulk later; the array must not be modified afterwards). ``x``: its input, when :meth:`observe_input` was
        not called for it."""
        if x is not None:
            self.observe_input(x, layout)
        conf_bin = -1
        if confidence is not None and self.classifier and math.isfinite(confidence):
            conf_bin = min(max(bisect.bisect_right(self.conf_edges, confidence) - 1, 0), len(self.conf_edges) - 2)
        with self._lock:
            w = self._w
            w.count += 1
            w.latencies.append(latency_ms)
            if conf_bin >= 0:
                w.conf_counts[conf_bin] += 1
                w.conf_n += 1
                w.conf_sum += confidence  # type: ignore[operator]
            if class_index is not None and self.classifier:
                w.classes[class_index] += 1
            if scores is not None and self.classifier:
                w.scores.append(scores)
            if len(w.latencies) >= PENDING:
                self._fold_pending(w)

    def observe_input(self, x: np.ndarray, layout: str | None = None) -> None:
        """Copy a strided subsample of the input ``x`` (layout default: the baseline's) into the window's buffer,
        if it is due for sampling (every ``input_sample_every``-th call) and fits the baseline's channels."""
        stats = self._stats
        if stats is None:
            return
        with self._lock:
            self._calls += 1
            if self._calls >= self.input_sample_every:
                self._calls = 0
                self._add_input(self._w, stats, x, layout or self.layout)

    def _add_input(self, w: _Window, stats: _InputStats, x: np.ndarray, layout: str | None) -> None:
        """Copy a strided subsample of ``x`` into the window's buffer (caller holds the lock)."""
        key = (x.shape, layout)
        if key not in self._views:
            if len(self._views) >= 64:  # dynamic shapes: keep the plan cache small
                self._views.clear()
            self._views[key] = self._plan(stats, x.shape, layout)
        plan = self._views[key]
        if plan is None or w.buf is None or w.input_acc is None:
            return
        step, phase_mod = plan
        o = (w.sampled % phase_mod) if phase_mod > 1 else 0  # a moving offset covers every pixel over time
        if x.ndim == 4 and layout == "NCHW" and x.shape[0] == 1:  # the common case: one copy, into the buffer
            sub = x[0, :, o::step, o::step]
            n = sub.shape[1] * sub.shape[2]
            if n <= BUFFER_VALUES:
                if w.buf_n + n > BUFFER_VALUES:
                    stats.fold(w.buf[:, : w.buf_n], w.input_acc)
                    w.buf_n = 0
                np.copyto(w.buf[:, w.buf_n : w.buf_n + n].reshape(sub.shape), sub)
                w.buf_n += n
                w.sampled += 1
                return
        if x.ndim == 4 and layout == "NCHW":
            sub = x[:, :, o::step, o::step]
            v = sub.transpose(1, 0, 2, 3).reshape(sub.shape[1], -1)
        elif x.ndim == 4 and layout == "NHWC":
            sub = x[:, o::step, o::step, :]
            v = sub.reshape(-1, sub.shape[-1]).T
        else:
            v = x.reshape(1, -1)[:, o::step]
        n = v.shape[1]
        if n > BUFFER_VALUES:
            v, n = v[:, :BUFFER_VALUES], BUFFER_VALUES
        if w.buf_n + n > BUFFER_VALUES:
            stats.fold(w.buf[:, : w.buf_n], w.input_acc)
            w.buf_n = 0
        w.buf[:, w.buf_n : w.buf_n + n] = v
        w.buf_n += n
        w.sampled += int(x.shape[0]) if x.ndim >= 2 else 1

    def _plan(self, stats: _InputStats, shape: tuple[int, ...], layout: str | None) -> tuple[int, int] | None:
        """(stride, offsets) for inputs of ``shape``; None when their channels do not match the baseline."""
        if len(shape) == 4 and layout in ("NCHW", "NHWC"):
            c = shape[1] if layout == "NCHW" else shape[3]
            if c != stats.channels:
                return None
            hw = shape[2] * shape[3] if layout == "NCHW" else shape[1] * shape[2]
            step = max(1, round(math.sqrt(shape[0] * c * hw / self.input_values)))
            return step, min(step, min(shape[2:4] if layout == "NCHW" else shape[1:3]))
        if stats.channels != 1:
            return None
        size = int(np.prod(shape))
        step = max(1, size // self.input_values)
        return step, min(step, size)

    def _fold_pending(self, w: _Window) -> None:
        """Fold pending latencies into the sketch and pending score rows into confidence / class counts."""
        add = w.sketch.add
        for v in w.latencies:
            add(v if v > 0.0 else 0.0)
        w.latencies = []
        if not w.scores:
            return
        rows, w.scores = w.scores, []
        try:
            s = np.stack(rows).reshape(len(rows), -1)
        except ValueError:  # rows of different sizes (dynamic output shape): one by one
            for r in rows:
                self._fold_scores(w, r.reshape(1, -1))
            return
        self._fold_scores(w, s)

    def _fold_scores(self, w: _Window, s: np.ndarray) -> None:
        if self.probabilities is None:
            first = s[0].astype(np.float64)
            self.probabilities = bool(first.min() >= 0.0 and first.max() <= 1.0 and abs(first.sum() - 1.0) < 1e-3)
        best = s.argmax(axis=1)
        top = s[np.arange(len(s)), best]
        if self.probabilities:
            conf = top.astype(np.float64)
        else:
            conf = 1.0 / np.exp(s - top[:, None]).sum(axis=1, dtype=np.float64)
        bad = ~np.isfinite(conf)
        if bad.any():  # NaN / Inf scores: an output error, not a completed inference
            w.count -= int(bad.sum())
            w.errors["output"] += int(bad.sum())
            conf, best = conf[~bad], best[~bad]
        w.conf_counts += np.bincount(np.searchsorted(self._conf_inner, conf, side="right"),
                                     minlength=len(w.conf_counts))
        w.conf_n += len(conf)
        w.conf_sum += float(conf.sum())
        w.classes.update(best.tolist())

    def record_error(self, kind: str, *, client: bool | None = None) -> None:
        """One failed inference of ``kind`` (``input``, ``preprocess``, ``runtime``, ``output`` ...).

        ``client``: the client's input caused it (HTTP 4xx; also listed in ``client_errors``, so it never counts
        against the model); None: decided by the kind (:data:`CLIENT_ERROR_KINDS`).
        """
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"error kind {kind!r} must be 1-40 characters of a-z 0-9 _")
        if client is None:
            client = kind in CLIENT_ERROR_KINDS
        with self._lock:
            self._w.errors[kind] += 1
            if client:
                self._w.client_errors[kind] += 1

    def record_feedback(self, correct: bool) -> None:
        """Ground truth arrived for a known prediction: was the prediction ``correct``."""
        with self._lock:
            self._w.fb_labelled += 1
            self._w.fb_correct += bool(correct)

    def record_unknown_feedback(self) -> None:
        """Ground truth arrived for a prediction id the agent does not remember."""
        with self._lock:
            self._w.fb_unknown += 1

    def record_rejected_feedback(self) -> None:
        """Feedback the agent refused (no or a wrong token): counted so forging attempts show, never in accuracy."""
        with self._lock:
            self._w.fb_rejected += 1

    # ---- per window ---------------------------------------------------------------------------------------

    def take(self) -> dict[str, Any]:
        """The window's measurement fields (``count``, ``errors``, ``client_errors``, ``latency_ms``,
        ``confidence``, ``classes``, ``input``, ``feedback``); the aggregator starts a new, empty window."""
        fresh = _Window(len(self.conf_edges) - 1, self._stats)
        with self._lock:
            w, self._w = self._w, fresh
        summary = self._summarise(w)
        self.last_input = summary["input"]
        return summary

    def _summarise(self, w: _Window) -> dict[str, Any]:
        self._fold_pending(w)
        sk = w.sketch
        n = int(sk.count)
        lat: dict[str, Any] = dict(quantiles(sk))
        lat["max"] = float(sk._max) if n else None
        lat["mean"] = float(sk._sum / n) if n else None
        lat["sketch"] = sketch_to_dict(sk)
        out: dict[str, Any] = {"count": w.count, "errors": dict(w.errors), "client_errors": dict(w.client_errors),
                               "latency_ms": lat,
                               "confidence": None, "classes": None, "input": None, "feedback": None}
        if self.classifier:
            out["confidence"] = {"bin_edges": list(self.conf_edges), "counts": w.conf_counts.tolist(),
                                 "mean": min(max(w.conf_sum / w.conf_n, 0.0), 1.0) if w.conf_n else None}
            out["classes"] = {str(k): v for k, v in sorted(w.classes.items()) if v > 0}
        if self._stats is not None and w.sampled and w.input_acc is not None and w.buf is not None:
            if w.buf_n:
                self._stats.fold(w.buf[:, : w.buf_n], w.input_acc)
            out["input"] = self._input_summary(self._stats, w.sampled, w.input_acc)
        if w.fb_labelled or w.fb_unknown or w.fb_rejected:
            out["feedback"] = {"labelled": w.fb_labelled, "correct": w.fb_correct, "unknown_id": w.fb_unknown}
            if w.fb_rejected:
                out["feedback"]["rejected"] = w.fb_rejected
        return out

    @staticmethod
    def _input_summary(stats: _InputStats, sampled: int, acc: _InputAcc) -> dict[str, Any]:
        channels = []
        for ch in range(stats.channels):
            counts = acc.counts[ch]
            if acc.n:
                mean = acc.sum[ch] / acc.n
                std = math.sqrt(max(acc.sumsq[ch] / acc.n - mean * mean, 0.0))
                value = psi(stats.expected[ch], counts / counts.sum())
                channels.append({"mean": float(mean), "std": std, "counts": counts.tolist(), "psi": value})
            else:
                channels.append({"mean": None, "std": None, "counts": counts.tolist(), "psi": None})
        psis = [c["psi"] for c in channels if c["psi"] is not None]
        return {"sampled": sampled, "channels": channels, "psi_max": max(psis) if psis else None}
