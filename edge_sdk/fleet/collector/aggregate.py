"""Aggregates of telemetry windows: one device, one model version, one time bucket. Mergeable, so a cache can keep
the aggregate of every closed minute and a view merges a few of them instead of re-reading thousands of windows.

Latency sketches are merged as DDSketch merges them (bin counts add up per bin key; all sketches of one relative
accuracy share their mapping), but on compact numpy arrays; the merged bins become one real DDSketch through
``edge_sdk.sketch.merge_sketches`` only when percentiles are asked for.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from edge_sdk.sketch import merge_sketches, quantiles

__all__ = ["WindowAggregate"]


class _Bins:
    """The merged positive-store bins and summary numbers of the sketches of one relative accuracy: a dict while
    windows are added (the fastest way to sum a few dozen bins per window), sorted numpy arrays once compacted."""

    __slots__ = ("acc", "count", "keys", "max", "min", "sum", "values", "zero_count")

    def __init__(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.values = np.empty(0, np.float64)
        self.acc: dict[str, float] = {}
        self.zero_count = self.count = self.sum = 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, s: dict[str, Any]) -> None:
        acc = self.acc
        for key, c in s["bins"].items():
            acc[key] = acc.get(key, 0.0) + c
        self.zero_count += float(s.get("zero_count") or 0.0)
        self.sum += float(s.get("sum") or 0.0)
        if s["count"]:
            self.count += float(s["count"])
            if s.get("min") is not None:
                self.min = min(self.min, float(s["min"]))
            if s.get("max") is not None:
                self.max = max(self.max, float(s["max"]))

    def compact(self) -> None:
        """Fold the bin dict into the sorted (keys, values) arrays."""
        if not self.acc:
            return
        keys = np.fromiter((int(k) for k in self.acc), np.int64, len(self.acc))
        values = np.fromiter(self.acc.values(), np.float64, len(self.acc))
        self.acc = {}
        self._fold(np.concatenate([self.keys, keys]), np.concatenate([self.values, values]))

    def _fold(self, keys: np.ndarray, values: np.ndarray) -> None:
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.keys, self.values = uniq, np.bincount(inverse, weights=values, minlength=len(uniq))

    def merge(self, others: list[_Bins]) -> None:
        """Add several compacted bin sets at once (one sort for all of them)."""
        self.compact()
        for o in others:
            o.compact()
        self._fold(np.concatenate([self.keys, *(o.keys for o in others)]),
                   np.concatenate([self.values, *(o.values for o in others)]))
        for o in others:
            self.zero_count += o.zero_count
            self.count += o.count
            self.sum += o.sum
            self.min, self.max = min(self.min, o.min), max(self.max, o.max)

    def as_dict(self, relative_accuracy: float) -> dict[str, Any]:
        self.compact()
        return {"relative_accuracy": relative_accuracy, "zero_count": self.zero_count, "count": self.count,
                "sum": self.sum, "bins": {str(int(k)): float(v) for k, v in zip(self.keys, self.values, strict=True)},
                "min": self.min if self.count else None, "max": self.max if self.count else None}


class WindowAggregate:
    """Running aggregate of windows (rows of the ``windows`` table plus their sketch and confidence histogram)."""

    def __init__(self) -> None:
        self.windows = 0
        self.count = 0
        self.errors = 0
        self.client_errors = 0  # the part of errors that bad client input caused (HTTP 4xx)
        self.sketches: dict[float, _Bins] = {}  # relative accuracy -> merged bins
        self.conf_weight = 0.0
        self.conf_sum = 0.0
        self.conf_edges: list[float] | None = None
        self.conf_counts: list[int] | None = None
        self.psi_max: float | None = None
        self.psi_latest: float | None = None
        self.psi_latest_ts = -math.inf
        self.labelled = 0
        self.correct = 0
        self.dropped: dict[str, int] = {}  # stream -> cumulative drops (max seen)
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.devices: set[tuple[str, str]] = set()

    def add(self, row: dict[str, Any], sketch: dict[str, Any] | None, confidence: dict[str, Any] | None) -> None:
        """Add one window: its table row, its latency sketch dict and its confidence histogram (either may be None)."""
        self.windows += 1
        self.count += int(row["count"])
        self.errors += int(row["errors"])
        self.client_errors += int(row.get("client_errors") or 0)
        end = float(row["end_ts"])
        self.first_ts, self.last_ts = min(self.first_ts, end), max(self.last_ts, end)
        self.devices.add((row["fleet"], row["device"]))
        self.labelled += int(row["fb_labelled"] or 0)
        self.correct += int(row["fb_correct"] or 0)
        stream = row["stream"]
        self.dropped[stream] = max(self.dropped.get(stream, 0), int(row["dropped_windows"] or 0))
        self._add_psi(row["psi_max"], end)
        weight = float(row["count"])
        if sketch is not None:
            self.sketches.setdefault(float(sketch["relative_accuracy"]), _Bins()).add(sketch)
        if confidence:
            weight = float(sum(confidence["counts"]))
            self._add_histogram(confidence["bin_edges"], confidence["counts"])
        if row["conf_mean"] is not None and weight > 0:
            self.conf_sum += float(row["conf_mean"]) * weight
            self.conf_weight += weight

    def _add_psi(self, psi: float | None, ts: float) -> None:
        if psi is None:
            return
        self.psi_max = psi if self.psi_max is None else max(self.psi_max, psi)
        if ts >= self.psi_latest_ts:
            self.psi_latest, self.psi_latest_ts = psi, ts

    def _add_histogram(self, edges: list[float], counts: list[int]) -> None:
        if self.conf_counts is None:
            self.conf_edges, self.conf_counts = list(edges), list(counts)
        elif edges == self.conf_edges and len(counts) == len(self.conf_counts):
            self.conf_counts = [a + b for a, b in zip(self.conf_counts, counts, strict=True)]

    def compact(self) -> WindowAggregate:
        """Fold pending sketch bins into arrays (do it before keeping the aggregate in a cache); returns self."""
        for b in self.sketches.values():
            b.compact()
        return self

    def merge(self, others: list[WindowAggregate]) -> WindowAggregate:
        """Add ``others`` (left unchanged apart from compaction) into this aggregate; returns self."""
        by_accuracy: dict[float, list[_Bins]] = {}
        for other in others:
            self._merge_scalars(other)
            for acc, bins in other.sketches.items():
                by_accuracy.setdefault(acc, []).append(bins)
        for acc, parts in by_accuracy.items():
            self.sketches.setdefault(acc, _Bins()).merge(parts)
        return self

    def _merge_scalars(self, other: WindowAggregate) -> None:
        self.windows += other.windows
        self.count += other.count
        self.errors += other.errors
        self.client_errors += other.client_errors
        self.conf_weight += other.conf_weight
        self.conf_sum += other.conf_sum
        if other.conf_counts is not None and other.conf_edges is not None:
            self._add_histogram(other.conf_edges, other.conf_counts)
        if other.psi_max is not None:
            self.psi_max = other.psi_max if self.psi_max is None else max(self.psi_max, other.psi_max)
            self._add_psi(other.psi_latest, other.psi_latest_ts)
        self.labelled += other.labelled
        self.correct += other.correct
        for stream, n in other.dropped.items():
            self.dropped[stream] = max(self.dropped.get(stream, 0), n)
        self.first_ts, self.last_ts = min(self.first_ts, other.first_ts), max(self.last_ts, other.last_ts)
        self.devices |= other.devices

    def to_rollup(self) -> dict[str, Any]:
        """The columns of a ``window_rollups`` row (migrations 0003, 0004) holding this aggregate; the merged sketch (of
        the relative accuracy with the most values) is kept as JSON so later merges stay exact."""
        best = max(self.sketches.items(), key=lambda kv: kv[1].count, default=None)
        s = self.summary()
        return {"windows": self.windows, "count": self.count, "errors": self.errors,
                "client_errors": self.client_errors, "fb_labelled": self.labelled,
                "fb_correct": self.correct, "dropped_windows": s["dropped_windows"], "conf_sum": self.conf_sum,
                "conf_weight": self.conf_weight, "psi_max": self.psi_max, "first_end_ts": self.first_ts,
                "last_end_ts": self.last_ts, "p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"], "p99_ms": s["p99_ms"],
                "sketch": json.dumps(best[1].as_dict(best[0])) if best is not None else None}

    @classmethod
    def from_rollup(cls, row: dict[str, Any]) -> WindowAggregate:
        """An aggregate from a ``window_rollups`` row (see :meth:`to_rollup`), ready to merge late windows into."""
        agg = cls()
        agg.windows, agg.count, agg.errors = int(row["windows"]), int(row["count"]), int(row["errors"])
        agg.client_errors = int(row.get("client_errors") or 0)
        agg.labelled, agg.correct = int(row["fb_labelled"] or 0), int(row["fb_correct"] or 0)
        agg.dropped = {"": int(row["dropped_windows"] or 0)}
        agg.conf_sum, agg.conf_weight = float(row["conf_sum"] or 0.0), float(row["conf_weight"] or 0.0)
        agg._add_psi(row["psi_max"], float(row["last_end_ts"]))
        agg.first_ts, agg.last_ts = float(row["first_end_ts"]), float(row["last_end_ts"])
        agg.devices.add((row["fleet"], row["device"]))
        if row.get("sketch"):
            sketch = json.loads(row["sketch"])
            agg.sketches.setdefault(float(sketch["relative_accuracy"]), _Bins()).add(sketch)
        return agg

    def summary(self) -> dict[str, Any]:
        """The aggregate as a flat dict: windows, inferences, errors, error_rate (errors / attempts), client_errors
        (the part of errors bad client input caused), model_error_rate (the rest / its attempts), p50/p95/p99_ms
        (merged sketch), confidence_mean (count-weighted), confidence_hist, psi_latest, psi_max, labelled, correct,
        accuracy (correct / labelled), dropped_windows."""
        # sketches of different relative accuracy cannot merge: the group with the most values is reported
        best = max(self.sketches.items(), key=lambda kv: kv[1].count, default=None)
        q = (quantiles(merge_sketches([best[1].as_dict(best[0])])) if best is not None
             else {"p50": None, "p95": None, "p99": None})
        attempts = self.count + self.errors
        model_errors = self.errors - min(self.client_errors, self.errors)
        return {
            "windows": self.windows, "inferences": self.count, "errors": self.errors,
            "error_rate": self.errors / attempts if attempts else None, "client_errors": self.client_errors,
            "model_error_rate": model_errors / (self.count + model_errors) if self.count + model_errors else None,
            "p50_ms": q["p50"], "p95_ms": q["p95"], "p99_ms": q["p99"],
            "confidence_mean": self.conf_sum / self.conf_weight if self.conf_weight else None,
            "confidence_hist": ({"bin_edges": self.conf_edges, "counts": self.conf_counts}
                                if self.conf_counts is not None else None),
            "psi_latest": self.psi_latest, "psi_max": self.psi_max,
            "labelled": self.labelled, "correct": self.correct,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "dropped_windows": sum(self.dropped.values()),
        }
