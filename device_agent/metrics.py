"""The device agent's Prometheus metrics: what every inference adds (:class:`InferenceStats`, fed by the Agent itself,
so camera, folder and HTTP inferences are all counted) and the ``GET /metrics`` document of the HTTP server
(:class:`Metrics`, rendered by ``prometheus_client`` from a registry of its own per server, never the global one).

Families (base units, counters ending in ``_total``, real histograms)::

    edge_agent_inferences_total{source}          completed runtime calls; source = api (HTTP or a Python caller),
                                                 camera, folder, file, stream (``run_source``)
    edge_agent_inference_errors_total{kind}      failed inferences: input, preprocess, runtime, output (NaN scores)
    edge_agent_inference_seconds                 histogram of the runtime call, every source
    edge_agent_prediction_confidence             histogram of the top-1 confidence (classifiers)
    edge_agent_feedback_total{result}            ground truth received: correct, wrong, unknown_id, rejected
    edge_agent_input_psi_max                     input drift (PSI of the worst channel) of the last telemetry window
                                                 (only with telemetry on and a bundle baseline)
    edge_agent_requests_total{route,method,code} HTTP requests answered
    edge_agent_errors_total{kind}                HTTP errors answered, by kind (bad_json, queue_full, inference, ...)
    edge_agent_queue_depth, edge_agent_model_info{model_version,runtime,artifact}, edge_agent_uptime_seconds

Counters survive an over-the-air model swap: the swapped-out agent's totals are carried into the next scrapes.
Per inference the cost is a few additions under a lock; confidences are worked out in bulk (every
:data:`PENDING` classifier results, and at each scrape), as the telemetry aggregator does.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.baseline import CONFIDENCE_BINS

__all__ = ["CONFIDENCE_BUCKETS", "LATENCY_BUCKETS_S", "PENDING", "InferenceStats", "Metrics", "StatsSnapshot",
           "TelemetryTee", "current_source", "inference_source"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = tuple(float(e) for e in CONFIDENCE_BINS[1:])  # 0.1 .. 1.0, the telemetry window's bins
PENDING = 64  # classifier score rows kept before their confidences are worked out in bulk
_FEEDBACK = ("correct", "wrong", "unknown_id", "rejected")
_local = threading.local()


@contextlib.contextmanager
def inference_source(kind: str) -> Iterator[None]:
    """Count the inferences this thread runs inside the block under ``source=kind`` (default ``api``)."""
    previous = getattr(_local, "source", "api")
    _local.source = kind
    try:
        yield
    finally:
        _local.source = previous


def current_source() -> str:
    """The source label of inferences run on this thread now (``api`` unless :func:`inference_source` says else)."""
    return getattr(_local, "source", "api")


@dataclass
class StatsSnapshot:
    """Cumulative totals of one or more agents (plain numbers, safe to read without a lock)."""

    inferences: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    feedback: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_FEEDBACK, 0))
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum: float = 0.0
    conf_buckets: list[int] = field(default_factory=lambda: [0] * len(CONFIDENCE_BUCKETS))
    conf_sum: float = 0.0
    classifier: bool = False

    def add(self, other: StatsSnapshot) -> None:
        """Add ``other``'s totals to these (an agent swapped out: its counts live on)."""
        for mine, theirs in ((self.inferences, other.inferences), (self.errors, other.errors),
                             (self.feedback, other.feedback)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.latency_buckets = [a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)]
        self.latency_sum += other.latency_sum
        self.conf_buckets = [a + b for a, b in zip(self.conf_buckets, other.conf_buckets, strict=True)]
        self.conf_sum += other.conf_sum
        self.classifier = self.classifier or other.classifier


class InferenceStats:
    """Cumulative counts of one Agent: it calls the same methods as on its telemetry aggregator
    (``observe_input``, ``record``, ``record_error``, ``record_feedback`` ...), on every inference of any source."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()
        self._scores: list[np.ndarray] = []
        self.probabilities: bool | None = None  # do score rows hold probabilities (else logits)? decided once

    def observe_input(self, x: np.ndarray, layout: str | None = None) -> None:
        """Inputs are not kept here (drift comes from the telemetry window, see :class:`Metrics`)."""

    def record(self, latency_ms: float, *, scores: np.ndarray | None = None, **_: Any) -> None:
        """One completed inference of the current thread's source; ``scores``: a classifier's score row."""
        seconds = latency_ms / 1000.0
        i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        source = current_source()
        with self._lock:
            s = self._s
            s.inferences[source] = s.inferences.get(source, 0) + 1
            s.latency_buckets[i] += 1
            s.latency_sum += seconds
            if scores is not None:
                self._scores.append(scores)
                if len(self._scores) >= PENDING:
                    self._fold()

    def record_error(self, kind: str, *, client: bool | None = None) -> None:
        """One failed inference of ``kind``."""
        with self._lock:
            self._s.errors[kind] = self._s.errors.get(kind, 0) + 1

    def _feedback(self, result: str) -> None:
        with self._lock:
            self._s.feedback[result] += 1

    def record_feedback(self, correct: bool) -> None:
        """Ground truth for a known prediction."""
        self._feedback("correct" if correct else "wrong")

    def record_unknown_feedback(self) -> None:
        """Ground truth for a prediction id the agent does not remember."""
        self._feedback("unknown_id")

    def record_rejected_feedback(self) -> None:
        """Feedback refused for a missing or wrong token."""
        self._feedback("rejected")

    def _fold(self) -> None:
        """Work out the pending rows' top-1 confidences in bulk (caller holds the lock)."""
        rows, self._scores = self._scores, []
        try:
            s = np.stack(rows).reshape(len(rows), -1).astype(np.float64)
        except ValueError:  # rows of different sizes (dynamic output shape)
            for r in rows:
                self._scores = [r]
                self._fold()
            return
        if self.probabilities is None:
            first = s[0]
            self.probabilities = bool(first.min() >= 0.0 and first.max() <= 1.0 and abs(first.sum() - 1.0) < 1e-3)
        top = s.max(axis=1)
        conf = top if self.probabilities else 1.0 / np.exp(s - top[:, None]).sum(axis=1)
        bad = ~np.isfinite(conf)
        st = self._s
        st.classifier = True
        if bad.any():  # NaN / Inf scores: an output error
            st.errors["output"] = st.errors.get("output", 0) + int(bad.sum())
            conf = conf[~bad]
        idx = np.searchsorted(np.asarray(CONFIDENCE_BUCKETS), np.clip(conf, 0.0, 1.0), side="left")
        for i, n in enumerate(np.bincount(idx, minlength=len(CONFIDENCE_BUCKETS)).tolist()):
            st.conf_buckets[i] += n
        st.conf_sum += float(conf.sum())

    def snapshot(self) -> StatsSnapshot:
        """A copy of the totals (pending confidences worked out first)."""
        with self._lock:
            if self._scores:
                self._fold()
            s = self._s
            return StatsSnapshot(dict(s.inferences), dict(s.errors), dict(s.feedback), list(s.latency_buckets),
                                 s.latency_sum, list(s.conf_buckets), s.conf_sum, s.classifier)


class TelemetryTee:
    """Feeds one agent's calls to its :class:`InferenceStats` and to its telemetry window aggregator."""

    __slots__ = ("aggregator", "stats")

    def __init__(self, stats: InferenceStats, aggregator: Any) -> None:
        self.stats, self.aggregator = stats, aggregator

    def observe_input(self, x: np.ndarray, layout: str | None = None) -> None:
        """Only the aggregator keeps inputs."""
        self.aggregator.observe_input(x, layout)

    def record(self, latency_ms: float, **kw: Any) -> None:
        """One completed inference."""
        self.stats.record(latency_ms, scores=kw.get("scores"))
        self.aggregator.record(latency_ms, **kw)

    def record_error(self, kind: str, *, client: bool | None = None) -> None:
        """One failed inference."""
        self.stats.record_error(kind, client=client)
        self.aggregator.record_error(kind, client=client)

    def record_feedback(self, correct: bool) -> None:
        """Ground truth for a known prediction."""
        self.stats.record_feedback(correct)
        self.aggregator.record_feedback(correct)

    def record_unknown_feedback(self) -> None:
        """Ground truth for an unknown prediction id."""
        self.stats.record_unknown_feedback()
        self.aggregator.record_unknown_feedback()

    def record_rejected_feedback(self) -> None:
        """Feedback refused for its token."""
        self.stats.record_rejected_feedback()
        self.aggregator.record_rejected_feedback()


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


class Metrics:
    """The HTTP server's counters (requests, errors answered) plus, at each scrape, the serving agent's
    :class:`InferenceStats`, rendered by ``prometheus_client`` (a :class:`CollectorRegistry` per instance)."""

    def __init__(self, routes: tuple[str, ...] | list[str] = ()) -> None:
        self.routes = frozenset(routes)
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[str, int] = {}
        self._registry: Any = None
        self._retired = StatsSnapshot()  # totals of the agents swapped out
        self._stats: InferenceStats | None = None  # the agent seen at the last scrape
        self._scrape: dict[str, Any] = {}

    def request(self, route: str, method: str, status: int) -> None:
        """Count one answered request (unknown paths are folded into route="other")."""
        key = (route if route in self.routes else "other", method, status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def error(self, kind: str) -> None:
        """Count one error of ``kind`` (bad_json, bad_input, queue_full, inference, ...)."""
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, seconds: float) -> None:
        """Kept for callers of the former API: latency is now counted by the Agent (every source), not here."""

    def _totals(self, agent: Any) -> StatsSnapshot:
        stats = getattr(agent, "stats", None) if agent is not None else None
        if self._stats is not None and stats is not self._stats:  # the model was swapped: keep its counts
            self._retired.add(self._stats.snapshot())
        self._stats = stats if isinstance(stats, InferenceStats) else None
        total = StatsSnapshot()
        total.add(self._retired)
        if self._stats is not None:
            total.add(self._stats.snapshot())
        return total

    def render(self, *, queue_depth: int, info: dict[str, str], uptime_s: float, agent: Any = None) -> str:
        """The Prometheus text exposition (format 0.0.4) for the serving ``agent``."""
        prom = require("prometheus_client", "agent", "the agent's /metrics")
        with self._render_lock:
            if self._registry is None:
                self._registry = prom.CollectorRegistry(auto_describe=False)
                self._registry.register(_AgentCollector(self))
            tel = getattr(agent, "telemetry", None) if agent is not None else None
            last = getattr(tel, "last_input", None)
            self._scrape = {"totals": self._totals(agent), "queue_depth": queue_depth, "info": dict(info),
                            "uptime_s": uptime_s, "psi_max": (last or {}).get("psi_max")}
            return prom.generate_latest(self._registry).decode()

    def families(self) -> Iterator[Any]:
        """The metric families of the current scrape (called by the registry's collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        sc = self._scrape
        t: StatsSnapshot = sc["totals"]
        with self._lock:
            requests, errors = dict(self.requests), dict(self.errors)
        fam = CounterMetricFamily("edge_agent_inferences", "Completed inferences (runtime calls), by source: api "
                                  "(HTTP or a Python caller), camera, folder, file, stream.", labels=["source"])
        for source, n in sorted(t.inferences.items()):
            fam.add_metric([source], n)
        yield fam
        fam = CounterMetricFamily("edge_agent_inference_errors", "Failed inferences, by kind (input, preprocess, "
                                  "runtime, output).", labels=["kind"])
        for kind, n in sorted(t.errors.items()):
            fam.add_metric([kind], n)
        yield fam
        cum = _cumulative(t.latency_buckets)
        yield HistogramMetricFamily(
            "edge_agent_inference_seconds", "Inference latency (runtime call only), every source.",
            buckets=[*((repr(le), n) for le, n in zip(LATENCY_BUCKETS_S, cum, strict=False)), ("+Inf", cum[-1])],
            sum_value=t.latency_sum)
        if t.classifier:
            cum = _cumulative(t.conf_buckets)
            yield HistogramMetricFamily(
                "edge_agent_prediction_confidence", "Top-1 confidence of classifier predictions.",
                buckets=[*((repr(le), n) for le, n in zip(CONFIDENCE_BUCKETS[:-1], cum, strict=False)),
                         ("+Inf", cum[-1])], sum_value=t.conf_sum)
        fam = CounterMetricFamily("edge_agent_feedback", "Ground-truth labels received, by result (correct, wrong, "
                                  "unknown_id, rejected).", labels=["result"])
        for result in _FEEDBACK:
            fam.add_metric([result], t.feedback.get(result, 0))
        yield fam
        if sc["psi_max"] is not None:
            yield GaugeMetricFamily("edge_agent_input_psi_max", "Input drift: population stability index of the "
                                    "worst input channel in the last telemetry window.", value=sc["psi_max"])
        fam = CounterMetricFamily("edge_agent_requests", "HTTP requests answered, by route, method and status code.",
                                  labels=["route", "method", "code"])
        for (r, m, c), n in sorted(requests.items()):
            fam.add_metric([r, m, str(c)], n)
        yield fam
        fam = CounterMetricFamily("edge_agent_errors", "HTTP errors answered, by kind.", labels=["kind"])
        for kind, n in sorted(errors.items()):
            fam.add_metric([kind], n)
        yield fam
        yield GaugeMetricFamily("edge_agent_queue_depth", "Requests waiting for the inference worker.",
                                value=sc["queue_depth"])
        info = sc["info"]
        fam = GaugeMetricFamily("edge_agent_model_info", "The model being served (always 1).", labels=list(info))
        fam.add_metric(list(info.values()), 1)
        yield fam
        yield GaugeMetricFamily("edge_agent_uptime_seconds", "Seconds since the server started.",
                                value=sc["uptime_s"])


class _AgentCollector:
    """The registry's view of one :class:`Metrics` (prometheus_client custom collector protocol)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        return self.metrics.families()
