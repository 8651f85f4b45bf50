"""Schema-valid synthetic telemetry windows: what ``edge-sdk fleet simulate`` sends and the fleet tests store.

:func:`make_window` turns raw per-inference values (latencies, confidences, predicted classes, input values)
into one ``telemetry.schema.json`` window exactly as a device agent aggregates them: a DDSketch of the
latencies (``edge_sdk.sketch``), a confidence histogram on the baseline's bins, a sparse class histogram and
per-channel input histograms over the baseline's ``hist_edges`` with their PSI (``edge_sdk.baseline.psi``).

:class:`SimulatedDevice` draws those raw values from a seeded profile with knobs for input drift (inputs
darkened: channel means shift down, PSI rises, confidence drops), latency regressions (``slow_factor``) and
errors (``error_rate``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.baseline import CONFIDENCE_BINS, psi
from edge_sdk.sketch import new_sketch, quantiles, sketch_to_dict

__all__ = ["SCHEMA_VERSION", "DeviceProfile", "SimulatedDevice", "make_window", "synthetic_baseline"]

SCHEMA_VERSION = "1.0"
_CHANNELS = 3
_INPUT_EDGES = np.linspace(-3.0, 3.0, 21)


def _normal_bin_fractions(edges: np.ndarray, mean: float = 0.0) -> np.ndarray:
    """P(bin) of N(mean, 1) over ``edges``, the end bins taking the tails."""
    cdf = np.array([0.5 * (1 + math.erf((e - mean) / math.sqrt(2))) for e in edges])
    cdf[0], cdf[-1] = 0.0, 1.0
    return np.diff(cdf)


def synthetic_baseline(channels: int = _CHANNELS) -> list[dict[str, Any]]:
    """Baseline ``input_channels`` for standard-normal inputs (20 bins on [-3, 3], the end bins take the tails)."""
    fractions = _normal_bin_fractions(_INPUT_EDGES)
    return [{"mean": 0.0, "std": 1.0, "hist_edges": _INPUT_EDGES.tolist(), "hist_fractions": fractions.tolist()}
            for _ in range(channels)]


def _channel(counts: np.ndarray, mean: float | None, std: float | None, base: dict[str, Any]) -> dict[str, Any]:
    total = counts.sum()
    return {"mean": mean, "std": std, "counts": counts.tolist(),
            "psi": psi(base["hist_fractions"], counts / total) if total else None}


def _input_block(channels: list[dict[str, Any]], sampled: int) -> dict[str, Any]:
    psis = [c["psi"] for c in channels if c["psi"] is not None]
    return {"sampled": int(sampled), "channels": channels, "psi_max": max(psis) if psis else None}


def _input_stats(channels: Sequence[np.ndarray], baseline: Sequence[dict[str, Any]], sampled: int) -> dict[str, Any]:
    out = []
    for values, base in zip(channels, baseline, strict=True):
        edges = np.asarray(base["hist_edges"], np.float64)
        # values outside the baseline's range go to the end bins (as np.histogram of the clipped values)
        idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        counts = np.bincount(idx, minlength=len(edges) - 1)
        out.append(_channel(counts, float(values.mean()) if values.size else None,
                            float(values.std()) if values.size else None, base))
    return _input_block(out, sampled)


def make_window(*, fleet: str, device: str, model: dict[str, Any], start: float, end: float,
                latencies_ms: Sequence[float] | np.ndarray, errors: dict[str, int] | None = None,
                confidences: Sequence[float] | np.ndarray | None = None,
                classes: Sequence[int] | np.ndarray | None = None,
                inputs: Sequence[np.ndarray] | None = None, baseline: Sequence[dict[str, Any]] | None = None,
                input_sampled: int | None = None, feedback: tuple[int, int] | None = None,
                health: dict[str, Any] | None = None, dropped_windows: int = 0,
                stream: str | None = None, seq: int | None = None, window_id: str | None = None) -> dict[str, Any]:
    """One telemetry window (``telemetry.schema.json``) aggregated from raw per-inference values.

    ``inputs`` holds one array of sampled values per channel, compared with ``baseline`` (``input_channels``
    entries with ``hist_edges`` / ``hist_fractions``). ``feedback`` is ``(labelled, correct)``. ``stream`` and
    ``seq`` may be left out when the window goes through an ``Outbox.put(..., sequenced=True)``, which sets them.
    """
    lat = np.asarray(latencies_ms, np.float64)
    sketch = new_sketch()
    for v in lat:
        sketch.add(float(v))
    window: dict[str, Any] = {
        "schema": "edge-sdk/telemetry-window", "schema_version": SCHEMA_VERSION,
        "window_id": window_id or uuid.uuid4().hex, "fleet": fleet, "device": device, "model": dict(model),
        "start": float(start), "end": float(end), "count": int(lat.size), "errors": dict(errors or {}),
        "latency_ms": {
            "p50": None, "p95": None, "p99": None, "max": float(lat.max()) if lat.size else None,
            "mean": float(lat.mean()) if lat.size else None, "sketch": sketch_to_dict(sketch)},
        "confidence": None, "classes": None, "input": None, "feedback": None,
        "dropped_windows": int(dropped_windows), "health": dict(health or {}),
    }
    if lat.size:
        window["latency_ms"].update(quantiles(sketch))
    if confidences is not None:
        conf = np.clip(np.asarray(confidences, np.float64), 0.0, 1.0)
        bins = len(CONFIDENCE_BINS) - 1  # equal-width bins on [0, 1]; 1.0 falls in the last one
        counts = np.bincount(np.minimum((conf * bins).astype(np.int64), bins - 1), minlength=bins)
        window["confidence"] = {"bin_edges": list(CONFIDENCE_BINS), "counts": counts.tolist(),
                                "mean": float(conf.mean()) if conf.size else None}
    if classes is not None:
        hist = np.bincount(np.asarray(classes, np.int64))
        window["classes"] = {str(i): int(c) for i, c in enumerate(hist.tolist()) if c}
    if inputs is not None and baseline is not None:
        sampled = input_sampled if input_sampled is not None else int(lat.size)
        window["input"] = _input_stats(inputs, baseline, sampled)
    if feedback is not None:
        window["feedback"] = {"labelled": int(feedback[0]), "correct": int(feedback[1])}
    if stream is not None:
        window["stream"] = stream
    if seq is not None:
        window["seq"] = int(seq)
    return window


@dataclass(frozen=True)
class DeviceProfile:
    """How one simulated device behaves.

    ``rate_hz`` inferences per second; latency is log-normal around ``latency_ms`` (times ``slow_factor``);
    ``error_rate`` is the fraction of attempts that fail; ``drift`` shifts every input channel's mean by
    ``-drift`` standard deviations (a darkened camera) and lowers confidence; ``feedback_frac`` of the
    predictions get a ground-truth label.
    """

    fleet: str
    device: str
    model_name: str = "mobilenet_v2"
    model_version: str = "1"
    rate_hz: float = 20.0
    latency_ms: float = 12.0
    latency_sigma: float = 0.25
    slow_factor: float = 1.0
    error_rate: float = 0.001
    drift: float = 0.0
    num_classes: int = 10
    feedback_frac: float = 0.1
    input_samples: int = 8  # inputs per window whose pixels enter the histograms
    values_per_input: int = 256


class SimulatedDevice:
    """Draws realistic windows for one :class:`DeviceProfile` (seeded, so runs are reproducible)."""

    def __init__(self, profile: DeviceProfile, *, seed: int | None = None) -> None:
        self.profile = profile
        self.rng = np.random.default_rng(seed)
        self.baseline = synthetic_baseline()
        self.model = {"name": profile.model_name, "version": profile.model_version,
                      "artifact": "onnx/int8", "runtime": "onnxruntime"}
        self._boot = float(self.rng.uniform(600, 86_400))
        # inputs are N(-drift, 1) per channel: their histogram over the baseline bins is multinomial with these odds
        self._input_odds = [_normal_bin_fractions(np.asarray(b["hist_edges"]), -profile.drift) for b in self.baseline]

    def window(self, start: float, end: float, *, dropped_windows: int = 0) -> dict[str, Any]:
        """A window covering ``[start, end]`` without stream/seq (the outbox sets them)."""
        p, rng = self.profile, self.rng
        attempts = int(rng.poisson(p.rate_hz * max(end - start, 0.0)))
        n_err = int(rng.binomial(attempts, min(max(p.error_rate, 0.0), 1.0))) if attempts else 0
        n = attempts - n_err
        lat = rng.lognormal(math.log(p.latency_ms * p.slow_factor), p.latency_sigma, n)
        a, b = (8.0, 2.0) if p.drift <= 0 else (max(8.0 - 4.0 * p.drift, 2.0), 2.0 + 1.5 * p.drift)
        conf = rng.beta(a, b, n)
        classes = rng.integers(0, p.num_classes, n)
        k = min(n, p.input_samples)
        m = k * p.values_per_input
        labelled = int(rng.binomial(n, p.feedback_frac)) if n else 0
        correct = int(rng.binomial(labelled, float(conf.mean()) if n else 0.0)) if labelled else 0
        kinds = {}
        if n_err:
            runtime = int(rng.binomial(n_err, 0.7))
            kinds = {k: v for k, v in (("runtime", runtime), ("input", n_err - runtime)) if v}
        health = {"cpu_temp_c": round(float(rng.normal(52, 3)), 1), "load1": round(float(rng.gamma(2, 0.3)), 2),
                  "cpu_count": 4, "mem_used_frac": round(float(rng.uniform(0.3, 0.6)), 3),
                  "rss_mb": round(float(rng.normal(180, 10)), 1), "disk_free_frac": 0.62,
                  "uptime_s": round(self._boot + end % 86_400, 1)}
        window = make_window(fleet=p.fleet, device=p.device, model=self.model, start=start, end=end,
                             latencies_ms=lat, errors=kinds, confidences=conf, classes=classes,
                             feedback=(labelled, correct) if labelled else None, health=health,
                             dropped_windows=dropped_windows)
        # the same statistics as histogramming m drawn values, drawn directly (a fraction of the cost)
        chans = [_channel(rng.multinomial(m, odds), float(rng.normal(-p.drift, 1 / math.sqrt(m))) if m else None,
                          float(rng.normal(1.0, 1 / math.sqrt(2 * m))) if m else None, base)
                 for odds, base in zip(self._input_odds, self.baseline, strict=True)]
        window["input"] = _input_block(chans, k)
        return window
