"""The collector's ``/metrics``: the fleet in Prometheus' conventions, written by ``prometheus_client``.

Counters and histograms are cumulative since this server started (the usual counter semantics, so ``rate()`` and
``increase()`` work; a restart is a counter reset Prometheus handles): :class:`FleetCounters` adds every window the
database received after that moment, once, from its stored DDSketch (latency) and confidence histogram. The
latency sketch's bins (1 % wide) are poured into fixed ``le`` buckets: per fleet and model version 10 per decade
from 0.5 ms to 30 s (:data:`FLEET_LATENCY_BUCKETS_S`), so
``histogram_quantile(0.95, sum by (le) (rate(edge_fleet_inference_seconds_bucket[5m])))`` is a fleet-wide p95
within a few percent of the merged sketches' own figure (``edge-sdk fleet status``); per device the agent's
standard buckets (:data:`LATENCY_BUCKETS_S`, 250 ms among them: the SLA rule is exact). Every known device is
exported with zero counts before its first window, so the first increase is not lost to ``rate()``.

Exposition cost: about 38 samples per device, written by prometheus_client at 15-25 µs each (label validation
and escaping); measured on a busy 2-core host, a 1,000-device fleet's /metrics took 2.7-3.2 s (3 MB): under
Prometheus' 10 s default scrape timeout, but scrape a larger fleet every 30-60 s.

Families::

    edge_fleet_devices{state}                                   devices by state (online, offline, stale)
    edge_device_up{fleet,device}                                1 online, 0 offline or stale
    edge_device_info{fleet,device,model_name,model_version,runtime}   always 1 (join on it for model labels)
    edge_device_last_seen_timestamp_seconds{fleet,device}       last message of any kind (unix seconds)
    edge_device_window_seconds{fleet,device}                    the device's telemetry window length
    edge_device_psi_max{fleet,device}                           input drift (worst channel) of its latest window
    edge_device_inferences_total{fleet,device}                  completed inferences
    edge_device_errors_total{fleet,device,cause}                failed inferences; cause = model | client
    edge_device_inference_seconds{fleet,device}                 latency histogram (from the sketches)
    edge_fleet_inference_seconds{fleet,model_name,model_version} the same, fine buckets, per model version
    edge_device_prediction_confidence{fleet,device}             top-1 confidence histogram (classifiers)
    edge_device_feedback_total{fleet,device,result}             ground truth received: correct | wrong
    edge_alerts_open{rule,fleet,device,severity}                1 per open alert (sum by (rule) for counts)
    edge_collector_*                                            the collector's own counters and levels

A window received more than ``lookback_s`` after it ended (an outbox flushed after a long outage) is in the
views but not in these counters: the counters read new windows through the ``end_ts`` index.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk._deps import require
from edge_sdk.baseline import CONFIDENCE_BINS
from edge_sdk.fleet.dashboard.range_cache import window_parts, window_parts_sql

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["FLEET_LATENCY_BUCKETS_S", "LATENCY_BUCKETS_S", "PROMETHEUS_DIR", "FleetCounters", "render"]

_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
#: ``le`` bounds of the per-model-version fleet latency histograms: 10 per decade (1.26x apart), 0.5 ms .. 30 s
FLEET_LATENCY_BUCKETS_S: tuple[float, ...] = tuple(
    v for e in range(-4, 2) for m in _R10 if 0.0005 <= (v := round(m * 10.0 ** e, 10)) <= 30.0)
#: ``le`` bounds of the per-device latency histograms (the agent's own buckets)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONF_EDGES = [float(e) for e in CONFIDENCE_BINS]
#: the shipped Prometheus scrape config (prometheus.yml) and alert rules (rules.yml)
PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "prometheus"
_GAUGE_STATS = {"queue", "inflight", "pending", "connected_devices"}


class _Device:
    """Cumulative counts of one device."""

    __slots__ = ("client_errors", "conf", "conf_sum", "correct", "inferences", "labelled", "lat", "lat_sum",
                 "model_errors")

    def __init__(self, nbuckets: int) -> None:
        self.lat = [0.0] * (nbuckets + 1)  # per bucket (not cumulative); the last one is +Inf
        self.lat_sum = 0.0
        self.conf = [0.0] * (len(_CONF_EDGES) - 1)
        self.conf_sum = 0.0
        self.inferences = self.model_errors = self.client_errors = self.labelled = self.correct = 0


class FleetCounters:
    """Cumulative per-device counts of the windows received after ``start`` (default: now).

    :meth:`update` reads the windows received since the last call (once each: a window is remembered for
    ``margin_s`` after its receipt, so a transaction that commits late is neither missed nor counted twice).
    """

    def __init__(self, db: Database, *, start: float | None = None, lookback_s: float = 900.0,
                 margin_s: float = 60.0) -> None:
        self.db = db
        self.start = time.time() if start is None else float(start)
        self.lookback_s = float(lookback_s)
        self.margin_s = float(margin_s)
        self.buckets = LATENCY_BUCKETS_S
        self.fleet_buckets = FLEET_LATENCY_BUCKETS_S
        self.devices: dict[tuple[str, str], _Device] = {}
        #: (fleet, model name, model version) -> [per-bucket counts (last: +Inf), sum in seconds]
        self.versions: dict[tuple[str, str, str], list[Any]] = {}
        self._cursor = self.start
        self._recent: dict[str, float] = {}  # window_id -> received_at, within margin_s of the cursor
        self._bucket_of: dict[tuple[float, int], tuple[int, int]] = {}
        self._mappings: dict[float, Any] = {}
        self._lock = threading.Lock()

    def device(self, fleet: str, device: str) -> _Device:
        """The counts of one device (created at zero)."""
        dev = self.devices.get((fleet, device))
        if dev is None:
            dev = self.devices[(fleet, device)] = _Device(len(self.buckets))
        return dev

    def version(self, fleet: str, model_name: str, model_version: str) -> list[Any]:
        """The fleet latency histogram of one model version (created at zero): [per-bucket counts, sum]."""
        key = (fleet, model_name, model_version)
        hist = self.versions.get(key)
        if hist is None:
            hist = self.versions[key] = [[0.0] * (len(self.fleet_buckets) + 1), 0.0]
        return hist

    def update(self, now: float | None = None) -> int:
        """Add the windows received since the last call; returns how many."""
        now = time.time() if now is None else float(now)
        with self._lock:
            floor = max(self.start, self._cursor - self.margin_s)
            rows = self.db.query(
                "SELECT window_id, fleet, device, model_name, model_version, count, errors, client_errors, conf_mean, "
                "fb_labelled, fb_correct, "
                f"received_at, {window_parts_sql(self.db)} FROM windows WHERE end_ts >= ? AND received_at > ?",
                (now - self.lookback_s, floor))
            added = 0
            for r in rows:
                wid, received = r["window_id"], float(r["received_at"])
                if wid in self._recent:
                    continue
                self._recent[wid] = received
                self._cursor = max(self._cursor, received)
                self._add(r)
                added += 1
            cut = self._cursor - self.margin_s
            self._recent = {k: v for k, v in self._recent.items() if v > cut}
            return added

    def _add(self, r: dict[str, Any]) -> None:
        dev = self.device(r["fleet"], r["device"])
        errors, client = int(r["errors"] or 0), int(r["client_errors"] or 0)
        dev.inferences += int(r["count"] or 0)
        dev.client_errors += min(client, errors)
        dev.model_errors += errors - min(client, errors)
        dev.labelled += int(r["fb_labelled"] or 0)
        dev.correct += int(r["fb_correct"] or 0)
        sketch, conf = window_parts(r)
        if sketch is not None:
            self._add_sketch(dev, self.version(r["fleet"], r["model_name"], r["model_version"]), sketch)
        if conf and [float(e) for e in conf.get("bin_edges") or []] == _CONF_EDGES:
            counts = conf.get("counts") or []
            if len(counts) == len(dev.conf):
                n = 0.0
                for i, c in enumerate(counts):
                    dev.conf[i] += c
                    n += c
                if r["conf_mean"] is not None:
                    dev.conf_sum += float(r["conf_mean"]) * n

    def _add_sketch(self, dev: _Device, version: list[Any], s: dict[str, Any]) -> None:
        acc = float(s["relative_accuracy"])
        mapping = self._mappings.get(acc)
        if mapping is None:
            from edge_sdk.sketch import new_sketch

            mapping = self._mappings[acc] = new_sketch(acc)._mapping
        cache, fine = self._bucket_of, version[0]
        for key, c in s["bins"].items():
            k = (acc, int(key))
            ij = cache.get(k)
            if ij is None:  # the bin's representative value (within 1 %), in seconds, into the first le >= it
                v = mapping.value(k[1]) / 1000.0
                ij = cache[k] = (bisect.bisect_left(self.buckets, v), bisect.bisect_left(self.fleet_buckets, v))
            dev.lat[ij[0]] += c
            fine[ij[1]] += c
        zero, total = float(s.get("zero_count") or 0.0), float(s.get("sum") or 0.0) / 1000.0
        dev.lat[0] += zero
        fine[0] += zero
        dev.lat_sum += total
        version[1] += total


def _cumulative(counts: list[float]) -> list[float]:
    out, total = [], 0.0
    for n in counts:
        total += n
        out.append(total)
    return out


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{name}_"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = v
    return out


def _families(rows: list[dict[str, Any]], counters: FleetCounters, open_alerts: list[dict[str, Any]],
              stats: dict[str, Any] | None) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    states = {"online": 0, "offline": 0, "stale": 0}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    fam = GaugeMetricFamily("edge_fleet_devices", "Known devices by state.", labels=["state"])
    for s, n in sorted(states.items()):
        fam.add_metric([s], n)
    yield fam
    ids = ["fleet", "device"]
    up = GaugeMetricFamily("edge_device_up", "1 when the device is online, 0 when offline or stale.", labels=ids)
    info = GaugeMetricFamily("edge_device_info", "The model a device runs (always 1).",
                             labels=[*ids, "model_name", "model_version", "runtime"])
    seen = GaugeMetricFamily("edge_device_last_seen_timestamp_seconds", "Last message of any kind from the device "
                             "(unix time).", labels=ids)
    window = GaugeMetricFamily("edge_device_window_seconds", "Telemetry window length of the device.", labels=ids)
    psi = GaugeMetricFamily("edge_device_psi_max", "Input drift: PSI of the worst channel in the device's latest "
                            "window.", labels=ids)
    for r in rows:
        key = [r["fleet"], r["device"]]
        up.add_metric(key, 1 if r["state"] == "online" else 0)
        if r["model_version"] is not None:
            info.add_metric([*key, r["model_name"] or "", r["model_version"], r["runtime"] or ""], 1)
        if r["last_seen"] is not None:
            seen.add_metric(key, float(r["last_seen"]))
        window.add_metric(key, float(r["window_s"]))
        if r["psi_latest"] is not None and math.isfinite(r["psi_latest"]):
            psi.add_metric(key, float(r["psi_latest"]))
    yield from (up, info, seen, window, psi)

    inf = CounterMetricFamily("edge_device_inferences", "Completed inferences.", labels=ids)
    err = CounterMetricFamily("edge_device_errors", "Failed inferences; cause: model (runtime, output) or client "
                              "(bad input).", labels=[*ids, "cause"])
    fb = CounterMetricFamily("edge_device_feedback", "Ground-truth labels received, by result.",
                             labels=[*ids, "result"])
    lat = HistogramMetricFamily("edge_device_inference_seconds", "Inference latency (merged from the devices' "
                                "latency sketches).", labels=ids)
    conf = HistogramMetricFamily("edge_device_prediction_confidence", "Top-1 confidence of classifier "
                                 "predictions.", labels=ids)
    les = [repr(b) for b in counters.buckets]
    conf_les = [repr(e) for e in _CONF_EDGES[1:-1]]
    for (fleet, device), d in sorted(counters.devices.items()):
        key = [fleet, device]
        inf.add_metric(key, d.inferences)
        err.add_metric([*key, "model"], d.model_errors)
        err.add_metric([*key, "client"], d.client_errors)
        fb.add_metric([*key, "correct"], d.correct)
        fb.add_metric([*key, "wrong"], d.labelled - d.correct)
        cum = _cumulative(d.lat)
        lat.add_metric(key, [*zip(les, cum, strict=False), ("+Inf", cum[-1])], d.lat_sum)
        if any(d.conf):
            cum = _cumulative(d.conf)
            conf.add_metric(key, [*zip(conf_les, cum, strict=False), ("+Inf", cum[-1])], d.conf_sum)
    yield from (inf, err, fb, lat, conf)
    fam = HistogramMetricFamily("edge_fleet_inference_seconds", "Inference latency of a fleet's devices per model "
                                "version (merged sketches; fine buckets for fleet-wide quantiles).",
                                labels=["fleet", "model_name", "model_version"])
    fine_les = [repr(b) for b in counters.fleet_buckets]
    for key, (counts, total) in sorted(counters.versions.items()):
        cum = _cumulative(counts)
        fam.add_metric(list(key), [*zip(fine_les, cum, strict=False), ("+Inf", cum[-1])], total)
    yield fam

    fam = GaugeMetricFamily("edge_alerts_open", "Open alerts (1 each), by rule, fleet, device and severity.",
                            labels=["rule", "fleet", "device", "severity"])
    for a in open_alerts:
        fam.add_metric([a["rule"], a["fleet"], a["device"] or "", a["severity"]], 1)
    yield fam
    if stats is not None:
        for key, value in sorted(_flat_numbers(stats).items()):
            if key.endswith("_s"):  # base units: lag_p50_s -> edge_collector_lag_p50_seconds
                key = key[:-2] + "_seconds"
            if isinstance(value, float) or key in _GAUGE_STATS:  # lag seconds, queue depth: a level, not a count
                yield GaugeMetricFamily(f"edge_collector_{key}", f"Collector {key}.", value=value)
            else:
                yield CounterMetricFamily(f"edge_collector_{key.removesuffix('_total')}", f"Collector counter {key}.",
                                          value=value)


class _Families:
    """A prometheus_client custom collector yielding prepared families."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self.make = make

    def collect(self) -> Iterator[Any]:
        return self.make()


def render(db: Database, rows: list[dict[str, Any]], counters: FleetCounters,
           stats: Callable[[], dict[str, Any]] | None = None) -> str:
    """The Prometheus text exposition of ``rows`` (``views.fleet_status``), ``counters`` (brought up to date here),
    the open alerts and the collector's ``stats``, from a registry of this call's own."""
    prom = require("prometheus_client", "fleet", "the collector's /metrics")
    counters.update()
    for r in rows:  # known devices (and their model versions) are exported at zero before their first window
        counters.device(r["fleet"], r["device"])
        if r["model_version"] is not None:
            counters.version(r["fleet"], r["model_name"] or "", r["model_version"])
    open_alerts = db.query("SELECT rule, fleet, device, severity FROM alerts WHERE state = 'open' "
                           "ORDER BY rule, fleet, device")
    numbers = stats() if stats is not None else None
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(_Families(lambda: _families(rows, counters, open_alerts, numbers)))
    return prom.generate_latest(registry).decode()
