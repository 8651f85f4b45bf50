"""One inference result (:class:`Prediction`) and the classifier arithmetic behind its top-k: the best classes
in linear time with deterministic ties, and the softmax unless the model already outputs probabilities."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Prediction", "best_classes", "is_probabilities", "top_k_classes"]


def _new_id() -> str:
    return uuid.uuid4().hex


def best_classes(scores: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The ``k`` highest ``(score, class)`` pairs, best first; ties go to the lower class index (the order of
    ``np.argsort(-scores, kind="stable")``) so top-k is deterministic. Linear time: only the candidates at or above
    the k-th score (every tie at the boundary included) are sorted."""
    n = scores.size
    kth = scores[np.argpartition(scores, n - k)[n - k]]
    cand = np.flatnonzero(scores >= kth)  # ascending class index
    if cand.size < k:  # NaN scores compare false: rank them all (argsort puts NaN last)
        cand = np.arange(n)
    order = cand[np.argsort(-scores[cand], kind="stable")[:k]]
    return list(zip(scores[order].tolist(), order.tolist(), strict=True))


def is_probabilities(scores: np.ndarray) -> bool:
    """Does the model already end in a softmax (scores in [0, 1] summing to 1)?"""
    total = float(scores.sum(dtype=np.float64))
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and abs(total - 1.0) < 1e-3)


def top_k_classes(scores: np.ndarray, k: int, probabilities: bool,
                  labels: Sequence[str] | None) -> list[dict[str, Any]]:
    """The ``k`` best classes of one flat score row as ``[{"class", "label", "score"}]``, best first; ``score`` is
    the softmax of the logits unless ``probabilities`` (the model already ends in a softmax). Equal scores
    (frequent with int8 models' dequantized outputs) are ranked by class index, lowest first."""
    top = best_classes(scores, k)
    if probabilities:
        probs = [v for v, _ in top]
    else:  # softmax of the logits
        best = top[0][0]
        z = float(np.exp(scores - np.float32(best)).sum())
        probs = [math.exp(v - best) / z for v, _ in top]
    return [{"class": i, "label": labels[i] if labels else None, "score": p}
            for (_, i), p in zip(top, probs, strict=True)]


@dataclass(eq=False)
class Prediction:
    """One inference result: named ``outputs``, inference ``latency_ms``, the ``model_version`` and a unique
    ``id`` (uuid4 hex; send it with the true label to ``Agent.feedback`` / ``POST /feedback``).

    For classifiers, ``top_k`` (``[{"class", "label", "score"}]``, best first), ``class_index``, ``label`` and
    ``confidence`` are worked out on first access (so ``Agent.predict`` itself stays as fast as the runtime);
    for other tasks they are empty / None.
    """

    outputs: dict[str, np.ndarray]
    latency_ms: float
    model_version: str
    _top: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]] | None = field(default=None, repr=False)
    id: str = field(default_factory=_new_id)

    @property
    def top_k(self) -> list[dict[str, Any]]:
        """The best classes, best first (empty for non-classifiers)."""
        if callable(self._top):
            self._top = self._top()
        return self._top or []

    @property
    def class_index(self) -> int | None:
        """Index of the best class, or None."""
        top = self.top_k
        return top[0]["class"] if top else None

    @property
    def label(self) -> str | None:
        """Label of the best class (None without labels or for non-classifiers)."""
        top = self.top_k
        return top[0]["label"] if top else None

    @property
    def confidence(self) -> float | None:
        """Probability of the best class (softmax of logits unless the model outputs probabilities)."""
        top = self.top_k
        return top[0]["score"] if top else None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: ``id``, ``outputs`` as nested lists; for classifiers also class, label, confidence,
        top_k."""
        d: dict[str, Any] = {"id": self.id, "outputs": {k: v.tolist() for k, v in self.outputs.items()}}
        top = self.top_k
        if top:
            d.update({"class": top[0]["class"], "label": top[0]["label"], "confidence": top[0]["score"],
                      "top_k": top})
        d["latency_ms"] = self.latency_ms
        d["model_version"] = self.model_version
        return d

