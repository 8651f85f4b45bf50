"""Read-only fleet views over the collector database (tables of ``migrations/0001_telemetry.sql``).

Everything here goes through ``Database.query`` and returns plain JSON-able dicts, so the same rows feed
``edge-sdk fleet status``, the dashboard's ``/api/*`` routes and ``/metrics``.

Latency percentiles over a time range come from the **merged** DDSketches of the windows in the range
(``edge_sdk.sketch.merge_sketches``): averaging per-window percentiles would be wrong, merging sketches is
exact within the sketch's relative accuracy (1 %).

Device state: ``offline`` when the device said so (last will or clean shutdown); ``online`` when a window
arrived within 3 × its window length (or it announced itself online that recently); ``stale`` otherwise —
connected as far as the broker knows, but silent.

Ranges are windows with ``end_ts >= now - since_s`` (the device's end time), plus, for the part of a range older
than the collector's raw-window retention, the hourly rollups retention left in their place (each rollup whose
last window ended in the range: the figures of such a range are hourly). ``fleet_status`` and
``model_versions`` take an optional :class:`~.range_cache.RangeCache` (the HTTP server keeps one):
same answers, the range then starting on a bucket boundary, and only changed minutes read again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_sdk.fleet.collector.aggregate import WindowAggregate
from edge_sdk.fleet.dashboard.range_cache import (
    WINDOW_COLUMNS,
    FineKey,
    RangeCache,
    fleet_clause,
    rollups_since,
    window_parts,
    window_parts_sql,
    windows_since,
)

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["DEAD_LETTERS_MAX_LIMIT", "DEFAULT_WINDOW_S", "PAYLOAD_MAX_BYTES", "PREVIEW_BYTES", "STALE_WINDOWS",
           "alerts", "dead_letter", "dead_letters", "device_series", "fleet_status", "model_versions",
           "retention_drops"]

DEFAULT_WINDOW_S = 10.0  # assumed when neither the device's status nor its windows tell its window length
STALE_WINDOWS = 3  # a device with no window for this many window lengths is "stale"


def _now(now: float | None) -> float:
    return time.time() if now is None else float(now)


def _aggregates(db: Database, fleet: str | None, since: float, now: float, cache: RangeCache | None,
                group: Callable[[FineKey], tuple[Any, ...]]) -> dict[tuple[Any, ...], WindowAggregate]:
    if cache is not None:
        return cache.aggregate(db, fleet, since, now, group)
    aggs: dict[tuple[Any, ...], WindowAggregate] = {}
    for row, sketch, conf in windows_since(db, fleet, since):
        key = group((row["fleet"], row["device"], row["model_name"], row["model_version"]))
        aggs.setdefault(key, WindowAggregate()).add(row, sketch, conf)
    for row in rollups_since(db, fleet, since):  # windows older than the raw retention: their hourly rollups
        key = group((row["fleet"], row["device"], row["model_name"], row["model_version"]))
        aggs.setdefault(key, WindowAggregate()).merge([WindowAggregate.from_rollup(row).compact()])
    return aggs


def _count_by(rows: list[dict[str, Any]], *key: str) -> dict[tuple, int]:
    return {tuple(r[k] for k in key): int(r["n"] or 0) for r in rows}


def fleet_status(db: Database, fleet: str | None = None, *, since_s: float = 900, now: float | None = None,
                 cache: RangeCache | None = None) -> list[dict[str, Any]]:
    """One row per known device with its state and the aggregates of its windows of the last ``since_s`` s.

    Row keys: fleet, device, state (online/offline/stale), state_reason, last_seen, last_window_at, window_s,
    model_name, model_version, artifact, runtime, windows, inferences, errors, error_rate (errors / attempts),
    client_errors (the part of errors bad client input caused), model_error_rate (the rest / its attempts), p50_ms,
    p95_ms, p99_ms (merged sketches), confidence_mean (count-weighted), confidence_hist, psi_latest, psi_max,
    labelled, correct, accuracy (correct / labelled, None without feedback), alerts_open,
    dropped_windows (outbox drops reported by the device), lost_windows (seqs the collector could not recover).
    """
    t = _now(now)
    clause, params = fleet_clause(fleet, "d.fleet", first=True)
    devices = db.query(
        "SELECT d.fleet, d.device, d.state, d.state_ts, d.state_reason, d.last_seen, d.model_name, d.model_version, "
        "d.artifact, d.runtime, d.agent_version, d.window_s, "
        "(SELECT w.received_at FROM windows w WHERE w.fleet = d.fleet AND w.device = d.device "
        " ORDER BY w.end_ts DESC LIMIT 1) AS last_window_at, "
        "(SELECT w.end_ts - w.start_ts FROM windows w WHERE w.fleet = d.fleet AND w.device = d.device "
        " ORDER BY w.end_ts DESC LIMIT 1) AS last_window_len "
        f"FROM devices d{clause} ORDER BY d.fleet, d.device", params)
    aggs = _aggregates(db, fleet, t - since_s, t, cache, lambda k: (k[0], k[1]))
    clause, params = fleet_clause(fleet, first=True)
    lost = _count_by(db.query(f"SELECT fleet, device, SUM(lost) AS n FROM streams{clause} GROUP BY fleet, device",
                              params), "fleet", "device")
    clause, params = fleet_clause(fleet)
    open_alerts = _count_by(db.query("SELECT fleet, device, COUNT(*) AS n FROM alerts WHERE state = 'open'"
                                     f"{clause} GROUP BY fleet, device", params), "fleet", "device")
    out = []
    for d in devices:
        key = (d["fleet"], d["device"])
        window_s = float(d["window_s"] or d["last_window_len"] or DEFAULT_WINDOW_S)
        out.append({
            "fleet": d["fleet"], "device": d["device"],
            "state": _state(d, window_s, t), "state_reason": d["state_reason"],
            "last_seen": d["last_seen"], "last_window_at": d["last_window_at"], "window_s": window_s,
            "model_name": d["model_name"], "model_version": d["model_version"],
            "artifact": d["artifact"], "runtime": d["runtime"],
            **aggs.get(key, WindowAggregate()).summary(),
            "alerts_open": open_alerts.get(key, 0), "lost_windows": lost.get(key, 0),
        })
    return out


def _state(device: dict[str, Any], window_s: float, now: float) -> str:
    if device["state"] == "offline":
        return "offline"
    seen = [device["last_window_at"]]
    if device["state"] == "online":
        seen.append(device["state_ts"])
    recent = max((float(s) for s in seen if s is not None), default=None)
    return "online" if recent is not None and now - recent <= STALE_WINDOWS * window_s else "stale"


def model_versions(db: Database, fleet: str | None = None, *, since_s: float = 900, now: float | None = None,
                   cache: RangeCache | None = None) -> list[dict[str, Any]]:
    """The :func:`fleet_status` aggregates grouped by model name + version over the last ``since_s`` seconds.

    Row keys: model_name, model_version, devices (distinct devices that sent windows), the aggregate keys of
    :func:`fleet_status` (windows ... dropped_windows) and alerts_open (open alerts naming this version).
    """
    t = _now(now)
    aggs = _aggregates(db, fleet, t - since_s, t, cache, lambda k: (k[2], k[3]))
    clause, params = fleet_clause(fleet)
    open_rows = db.query("SELECT fleet, device, model_version FROM alerts WHERE state = 'open'"
                         f" AND model_version IS NOT NULL{clause}", params)
    out = []
    for (name, version), agg in sorted(aggs.items()):
        n_alerts = sum(1 for a in open_rows
                       if a["model_version"] == version and (a["fleet"], a["device"]) in agg.devices)
        out.append({"model_name": name, "model_version": version, "devices": len(agg.devices), **agg.summary(),
                    "alerts_open": n_alerts})
    return out


def device_series(db: Database, fleet: str, device: str, *, since_s: float = 3600, max_points: int = 300,
                  now: float | None = None) -> list[dict[str, Any]]:
    """One point per window of one device over the last ``since_s`` s, oldest first; for the part of the range
    older than the raw retention, one point per hourly rollup (``windows`` > 1 there).

    Point keys: end_ts, windows, count, errors, client_errors, error_rate, p50_ms, p95_ms, p99_ms, conf_mean,
    psi_max, accuracy. With more than ``max_points`` points the range is cut into ``max_points`` equal time
    buckets: counts add up, percentiles come from the bucket's merged sketches, confidence is count-weighted, PSI
    is the bucket's max.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    t = _now(now)
    since = t - since_s
    rollups = rollups_since(db, fleet, since, device=device)
    where = "FROM windows WHERE fleet = ? AND device = ? AND end_ts >= ?"
    n = int(db.query(f"SELECT COUNT(*) AS n {where}", (fleet, device, since))[0]["n"])
    if n + len(rollups) <= max_points:
        rows = db.query(f"SELECT {WINDOW_COLUMNS} {where} ORDER BY end_ts", (fleet, device, since))
        points = [_agg_point(WindowAggregate.from_rollup(r)) for r in rollups] + [_point(r) for r in rows]
        return sorted(points, key=lambda p: p["end_ts"])
    rows = db.query(f"SELECT {WINDOW_COLUMNS}, {window_parts_sql(db)} {where} ORDER BY end_ts", (fleet, device, since))
    items = [(float(r["last_end_ts"]), WindowAggregate.from_rollup(r).compact()) for r in rollups]
    ends = [e for e, _ in items] + [float(r["end_ts"]) for r in rows]
    lo, hi = min(ends), max(ends)
    width = (hi - lo) / max_points or 1.0
    buckets: dict[int, WindowAggregate] = {}
    for end, agg in items:
        buckets.setdefault(min(int((end - lo) / width), max_points - 1), WindowAggregate()).merge([agg])
    for r in rows:
        i = min(int((float(r["end_ts"]) - lo) / width), max_points - 1)
        buckets.setdefault(i, WindowAggregate()).add(r, *window_parts(r))
    return [_agg_point(agg) for _, agg in sorted(buckets.items())]


def _agg_point(agg: WindowAggregate) -> dict[str, Any]:
    s = agg.summary()
    return {"end_ts": agg.last_ts, "windows": agg.windows, "count": s["inferences"], "errors": s["errors"],
            "client_errors": s["client_errors"], "error_rate": s["error_rate"], "p50_ms": s["p50_ms"],
            "p95_ms": s["p95_ms"], "p99_ms": s["p99_ms"], "conf_mean": s["confidence_mean"], "psi_max": s["psi_max"],
            "accuracy": s["accuracy"]}


def _point(r: dict[str, Any]) -> dict[str, Any]:
    count, errors, labelled = int(r["count"]), int(r["errors"]), int(r["fb_labelled"] or 0)
    return {"end_ts": r["end_ts"], "windows": 1, "count": count, "errors": errors,
            "client_errors": int(r["client_errors"] or 0),
            "error_rate": errors / (count + errors) if count + errors else None,
            "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"], "conf_mean": r["conf_mean"],
            "psi_max": r["psi_max"], "accuracy": int(r["fb_correct"] or 0) / labelled if labelled else None}


def alerts(db: Database, state: str | None = None, limit: int = 200, *, fleet: str | None = None
           ) -> list[dict[str, Any]]:
    """Alerts, newest first; ``state`` "open" / "resolved" filters (None = all)."""
    conds, params = [], []
    if state is not None:
        conds.append("state = ?")
        params.append(state)
    if fleet is not None:
        conds.append("fleet = ?")
        params.append(fleet)
    where = f" WHERE {' AND '.join(conds)}" if conds else ""
    return db.query("SELECT id, fleet, device, rule, severity, state, opened_at, resolved_at, model_version, value, "
                    f"threshold, message, webhook_status FROM alerts{where} ORDER BY opened_at DESC, id DESC LIMIT ?",
                    (*params, int(limit)))


DEAD_LETTERS_MAX_LIMIT = 500  # rows per dead-letter listing: previews only, so a page is at most ~200 kB
PREVIEW_BYTES = 256
PAYLOAD_MAX_BYTES = 64 * 1024  # one payload by id: at most this much is read from the database


def _text(raw: Any) -> str:
    data = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
    return data.decode("utf-8", errors="replace")


def dead_letters(db: Database, limit: int = 100, *, preview_bytes: int = PREVIEW_BYTES) -> list[dict[str, Any]]:
    """Rejected messages, newest first: id, received_at, topic, reason, size and a text preview of the payload.

    Size and preview come from the database (``length`` / ``substr``), so listing never reads whole payloads;
    ``limit`` is capped at :data:`DEAD_LETTERS_MAX_LIMIT` and the preview at :data:`PREVIEW_BYTES`. The whole
    payload of one message: :func:`dead_letter`.
    """
    limit = max(1, min(int(limit), DEAD_LETTERS_MAX_LIMIT))
    n = max(0, min(int(preview_bytes), PREVIEW_BYTES))
    rows = db.query("SELECT id, received_at, topic, reason, length(payload) AS size, substr(payload, 1, ?) AS head "
                    "FROM dead_letters ORDER BY id DESC LIMIT ?", (n, limit))
    return [{"id": r["id"], "received_at": r["received_at"], "topic": r["topic"], "reason": r["reason"],
             "size": int(r["size"] or 0), "preview": _text(r["head"])} for r in rows]


def dead_letter(db: Database, dead_letter_id: int, *, max_bytes: int = PAYLOAD_MAX_BYTES) -> dict[str, Any] | None:
    """One dead letter with its payload as text, at most ``max_bytes`` (``truncated`` says when it was cut);
    None when there is no such id."""
    n = max(0, min(int(max_bytes), PAYLOAD_MAX_BYTES))
    rows = db.query("SELECT id, received_at, topic, reason, length(payload) AS size, substr(payload, 1, ?) AS head "
                    "FROM dead_letters WHERE id = ?", (n, int(dead_letter_id)))
    if not rows:
        return None
    r = rows[0]
    size = int(r["size"] or 0)
    return {"id": r["id"], "received_at": r["received_at"], "topic": r["topic"], "reason": r["reason"],
            "size": size, "truncated": size > n, "payload": _text(r["head"])}


def retention_drops(db: Database, fleet: str | None = None) -> list[dict[str, Any]]:
    """What retention deleted without a rollup (events, dead letters), counted per kind, device and reason."""
    clause, params = fleet_clause(fleet, first=True)
    return db.query("SELECT kind, fleet, device, reason, dropped, first_ts, last_ts FROM retention_drops"
                    f"{clause} ORDER BY kind, fleet, device, reason", params)
