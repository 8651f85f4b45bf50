"""Mergeable latency sketches (DDSketch, DataDog's ``ddsketch`` library) and their JSON form.

A device adds one value per inference (about 1 µs); a window carries the sketch as ``{"relative_accuracy",
"bins", "zero_count", "count", "sum", "min", "max"}`` (see ``telemetry.schema.json``); the collector
merges the sketches of many windows to get exact-within-1% percentiles per device or model version,
which averaging per-window percentiles cannot give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from edge_sdk._deps import require

__all__ = ["DEFAULT_RELATIVE_ACCURACY", "merge_sketches", "new_sketch", "quantiles", "sketch_from_dict",
           "sketch_to_dict"]

DEFAULT_RELATIVE_ACCURACY = 0.01


def new_sketch(relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> Any:
    """An empty ``ddsketch.DDSketch`` (values must be >= 0: latencies)."""
    require("ddsketch", extra="agent")
    from ddsketch import DDSketch

    return DDSketch(relative_accuracy)


def sketch_to_dict(sketch: Any) -> dict[str, Any]:
    """JSON-able form of a DDSketch: the non-empty bins of its positive store keyed by bin index."""
    store = sketch._store
    bins = {str(store.offset + i): c for i, c in enumerate(store.bins) if c}
    return {
        "relative_accuracy": sketch._relative_accuracy,
        "bins": bins,
        "zero_count": sketch._zero_count,
        "count": sketch._count,
        "sum": sketch._sum,
        "min": sketch._min if sketch._count else None,
        "max": sketch._max if sketch._count else None,
    }


def sketch_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a DDSketch from :func:`sketch_to_dict` output (raises ValueError on inconsistent data)."""
    sketch = new_sketch(float(data["relative_accuracy"]))
    for key, count in data["bins"].items():
        if count:
            sketch._store.add(int(key), float(count))
    sketch._zero_count = float(data.get("zero_count", 0))
    sketch._count = sketch._store.count + sketch._zero_count
    if not math.isclose(sketch._count, float(data["count"]), rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"sketch count {data['count']} does not match its bins ({sketch._count})")
    sketch._sum = float(data.get("sum", 0.0))
    if sketch._count:
        sketch._min = float(data["min"]) if data.get("min") is not None else 0.0
        sketch._max = float(data["max"]) if data.get("max") is not None else 0.0
    return sketch


def merge_sketches(dicts: Iterable[dict[str, Any]]) -> Any | None:
    """Merge sketch dicts (same relative accuracy) into one DDSketch; None when there is none."""
    merged = None
    for d in dicts:
        s = sketch_from_dict(d)
        if merged is None:
            merged = s
        elif s._count:
            merged.merge(s)
    return merged


def quantiles(sketch: Any | None, qs: Iterable[float] = (0.5, 0.95, 0.99)) -> dict[str, float | None]:
    """``{"p50": .., "p95": .., "p99": ..}`` of a sketch (None values when it is empty)."""
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{round(q * 100):d}" if round(q * 100, 6) == round(q * 100) else f"p{q * 100:g}"
        out[key] = (None if sketch is None or not sketch._count
                    else float(max(sketch.get_quantile_value(q), 0.0)))
    return out
