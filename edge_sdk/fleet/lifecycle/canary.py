"""Canary health: aggregate telemetry windows and compare a canary with a reference (the previous version).

:func:`window_figures` aggregates rows of the ``windows`` table (``device, count, errors, conf_mean, psi_max,
payload``): error rate = model errors / (inferences + model errors), where model errors leave out the errors the
client's input caused (``client_errors`` of the window payload: HTTP 4xx, which anyone reaching a device's port can
produce, so garbage requests cannot roll back a healthy version), p95 latency from the **merged** DDSketches of the
windows, mean confidence weighted by inference count, and the mean of the windows' ``psi_max`` (input drift
against the bundle baseline). :func:`health_checks` compares a canary with a reference under
:class:`Thresholds`; a check with no data on either side is left out rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edge_sdk.fleet.collector.validate import client_error_count
from edge_sdk.sketch import merge_sketches, quantiles

__all__ = ["Thresholds", "health_checks", "window_figures"]


@dataclass(frozen=True)
class Thresholds:
    """When a canary is judged unhealthy (compared with the previous version) or undecidable."""

    min_windows: int = 3                    # canary windows needed before judging
    min_count: int = 50                     # canary inferences needed before judging
    max_error_rate_increase_pp: float = 2.0  # error rate above the reference by more than this -> rollback
    max_p95_ratio: float = 1.5              # p95 latency above this multiple of the reference -> rollback
    min_p95_slack_ms: float = 1.0           # ... and above the reference by more than this: sub-ms p95s on shared
    #                                         CPUs jitter past 1.5x (0.47 -> 0.81 ms seen on a healthy canary)
    max_confidence_drop: float = 0.15       # mean confidence below the reference by more than this -> rollback
    max_psi_increase: float = 0.2           # mean window psi_max above the reference by more than this -> rollback
    max_hold_factor: float = 3.0            # halt when still undecidable after this many hold periods
    max_update_failure_frac: float = 0.2    # halt when more than this fraction of sent devices reported update.failed

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Thresholds:
        """Thresholds from a dict (unknown keys ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})




def window_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate telemetry windows: model error rate, merged p95, count-weighted confidence, mean psi_max.

    ``errors`` / ``error_rate`` count model and runtime errors only; ``client_errors`` (bad client input, from each
    window's payload) is reported beside them and judged by nothing.
    """
    count = sum(int(r["count"]) for r in rows)
    errors = client = 0
    conf = [(float(r["conf_mean"]), int(r["count"])) for r in rows if r["conf_mean"] is not None and r["count"]]
    psi = [float(r["psi_max"]) for r in rows if r["psi_max"] is not None]
    sketches = []
    for r in rows:
        try:
            window = json.loads(r["payload"])
        except (ValueError, TypeError):
            window = None
        # stored windows were schema-validated; a damaged row loses its latency and counts all errors as the model's
        n_client = min(client_error_count(window), int(r["errors"])) if isinstance(window, dict) else 0
        client += n_client
        errors += int(r["errors"]) - n_client
        try:
            sketches.append(window["latency_ms"]["sketch"])  # type: ignore[index]
        except (KeyError, TypeError):
            continue
    p95 = quantiles(merge_sketches(sketches), (0.95,))["p95"] if sketches else None
    weight = sum(n for _, n in conf)
    return {"windows": len(rows), "devices": len({r["device"] for r in rows}), "count": count, "errors": errors,
            "client_errors": client, "error_rate": errors / (count + errors) if count + errors else None, "p95_ms": p95,
            "conf_mean": sum(c * n for c, n in conf) / weight if weight else None,
            "psi_mean": sum(psi) / len(psi) if psi else None}


def health_checks(canary: dict[str, Any], ref: dict[str, Any], t: Thresholds) -> dict[str, dict[str, Any]]:
    """Each health check with its value, limit and verdict (checks without data on both sides are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if canary["error_rate"] is not None and ref["error_rate"] is not None:
        limit = ref["error_rate"] + t.max_error_rate_increase_pp / 100
        out["error_rate"] = {"value": canary["error_rate"], "limit": limit, "ok": canary["error_rate"] <= limit}
    if canary["p95_ms"] is not None and ref["p95_ms"]:
        limit = max(ref["p95_ms"] * t.max_p95_ratio, ref["p95_ms"] + t.min_p95_slack_ms)
        out["p95_ms"] = {"value": canary["p95_ms"], "limit": limit, "ok": canary["p95_ms"] <= limit}
    if canary["conf_mean"] is not None and ref["conf_mean"] is not None:
        limit = ref["conf_mean"] - t.max_confidence_drop
        out["confidence"] = {"value": canary["conf_mean"], "limit": limit, "ok": canary["conf_mean"] >= limit}
    if canary["psi_mean"] is not None:
        limit = (ref["psi_mean"] or 0.0) + t.max_psi_increase
        out["psi"] = {"value": canary["psi_mean"], "limit": limit, "ok": canary["psi_mean"] <= limit}
    return out
