"""The drift baseline stored in the manifest: input statistics per channel and output histograms,
measured on the calibration / validation data. Devices compare live windows against it (PSI).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CONFIDENCE_BINS", "compute_baseline", "psi"]

CONFIDENCE_BINS = [i / 10 for i in range(11)]
_INPUT_BINS = 20


def _channels(x: np.ndarray, layout: str) -> np.ndarray:
    """(N, ...) -> (C, values) using the layout's channel axis; one channel when not an image."""
    if x.ndim == 4 and layout == "NCHW":
        return x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    if x.ndim == 4 and layout == "NHWC":
        return x.reshape(-1, x.shape[-1]).T
    return x.reshape(1, -1)


def compute_baseline(inputs: np.ndarray, layout: str, outputs: np.ndarray | None, *,
                     classifier: bool) -> dict[str, Any]:
    """Per-channel mean/std/min/max and histograms of the inputs, plus confidence and class histograms."""
    chans = _channels(np.asarray(inputs, np.float64), layout)
    stats = []
    for c in chans:
        lo, hi = np.quantile(c, [0.001, 0.999])
        if hi <= lo:
            lo, hi = float(c.min()) - 0.5, float(c.max()) + 0.5
        edges = np.linspace(lo, hi, _INPUT_BINS + 1)
        counts, _ = np.histogram(np.clip(c, lo, hi), bins=edges)
        stats.append({"mean": float(c.mean()), "std": float(c.std()), "min": float(c.min()), "max": float(c.max()),
                      "hist_edges": [float(e) for e in edges], "hist_fractions": (counts / counts.sum()).tolist()})
    base: dict[str, Any] = {"samples": int(inputs.shape[0]), "layout": layout or None, "input_channels": stats}
    if outputs is not None and classifier:
        logits = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
        if logits.min() >= 0 and np.allclose(logits.sum(1), 1, atol=1e-3):
            probs = logits
        else:
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = e / e.sum(1, keepdims=True)
        conf = probs.max(1)
        counts, _ = np.histogram(conf, bins=CONFIDENCE_BINS)
        classes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
        base["confidence"] = {"bin_edges": CONFIDENCE_BINS, "fractions": (counts / counts.sum()).tolist(),
                              "mean": float(conf.mean())}
        base["predicted_class_fractions"] = (classes / classes.sum()).tolist()
    return base


def psi(expected: list[float] | np.ndarray, actual: list[float] | np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two histograms given as fractions (same bins)."""
    e = np.clip(np.asarray(expected, np.float64), eps, None)
    a = np.clip(np.asarray(actual, np.float64), eps, None)
    e, a = e / e.sum(), a / a.sum()
    return float(((a - e) * np.log(a / e)).sum())
