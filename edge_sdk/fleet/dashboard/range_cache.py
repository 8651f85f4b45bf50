"""Reading windows for the fleet views, and a cache of per-minute aggregates so a refreshing dashboard does not
re-read every window of the range every few seconds.

A window's latency sketch and confidence histogram live in its JSON payload; :func:`window_parts_sql` extracts just
those parts inside the database (SQLite ``json_extract``, PostgreSQL ``->``), which is cheaper than shipping and
parsing whole payloads, yet still the cost of every fleet-wide view: about 30 µs per window here.

:class:`RangeCache` keeps one ``collector.aggregate.WindowAggregate`` per (fleet, device, model name,
model version, time bucket). Each call asks the database, in one GROUP BY without touching payloads, how many
windows every bucket holds and when the last one arrived; only buckets whose signature changed (the current one,
or an old one that got a re-sent window) are read again. With a cache, a range starts at a bucket boundary (up to
one bucket earlier than asked). Buckets are 60 s for ranges up to an hour, 5 min up to 6 h, 30 min beyond.

Windows older than the raw retention live on only as hourly ``window_rollups`` rows (``collector.retention``): a
range also takes every rollup whose last window ended in it (:func:`rollups_since`; so the range's start is
rounded down to the hour for that part). A window is in exactly one of the two tables, so nothing is counted
twice. The cache keeps one aggregate per rollup row too, read again only when its ``windows`` / ``updated_at``
change (a late window merged into it).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from edge_sdk.fleet.collector.aggregate import WindowAggregate

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["WINDOW_COLUMNS", "RangeCache", "fleet_clause", "rollups_since", "window_parts", "window_parts_sql",
           "windows_since"]

WINDOW_COLUMNS = ("fleet, device, stream, model_name, model_version, start_ts, end_ts, received_at, count, errors, "
                  "client_errors, p50_ms, p95_ms, p99_ms, conf_mean, psi_max, fb_labelled, fb_correct, dropped_windows")
FineKey = tuple[str, str, str, str]  # fleet, device, model name, model version
_BUCKETS = ((3600.0, 60.0), (6 * 3600.0, 300.0), (math.inf, 1800.0))  # ranges up to .. use buckets of ..


def fleet_clause(fleet: str | None, column: str = "fleet", *, first: bool = False) -> tuple[str, tuple]:
    """`` AND fleet = ?`` (or ``WHERE``) and its parameter, or nothing for every fleet."""
    if fleet is None:
        return "", ()
    return f" {'WHERE' if first else 'AND'} {column} = ?", (fleet,)


def window_parts_sql(db: Database) -> str:
    """SQL selecting the window's sketch and confidence histogram as JSON text (``sketch_json``, ``conf_json``)."""
    if getattr(db, "dialect", "sqlite") == "postgresql":
        return ("(payload::json -> 'latency_ms' -> 'sketch')::text AS sketch_json, "
                "(payload::json -> 'confidence')::text AS conf_json")
    return ("json_extract(payload, '$.latency_ms.sketch') AS sketch_json, "
            "json_extract(payload, '$.confidence') AS conf_json")


def window_parts(row: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(sketch dict, confidence histogram dict) of a row selected with :func:`window_parts_sql`."""
    sk, conf = row["sketch_json"], row["conf_json"]
    sketch, confidence = (json.loads(sk) if sk else None), (json.loads(conf) if conf else None)
    return sketch, (confidence if isinstance(confidence, dict) else None)


def windows_since(db: Database, fleet: str | None, since: float, until: float | None = None, *,
                  bucket_s: float | None = None) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(row, sketch, confidence) of the windows with ``since <= end_ts`` (``< until``), oldest first; with
    ``bucket_s`` each row also carries its bucket number ``b`` as the database computes it."""
    clause, params = fleet_clause(fleet)
    extra, bparams = ("", ()) if bucket_s is None else (f", {_bucket_sql(db)} AS b", (bucket_s,))
    upper, uparams = ("", ()) if until is None else (" AND end_ts < ?", (until,))
    rows = db.query(f"SELECT {WINDOW_COLUMNS}, {window_parts_sql(db)}{extra} FROM windows WHERE end_ts >= ?"
                    f"{upper}{clause} ORDER BY end_ts", (*bparams, since, *uparams, *params))
    for row in rows:
        yield row, *window_parts(row)


def rollups_since(db: Database, fleet: str | None, since: float, *, device: str | None = None,
                  columns: str = "*", extra: str = "", params: tuple = ()) -> list[dict[str, Any]]:
    """``window_rollups`` rows (``columns``) whose last window ended at or after ``since``, oldest hour first;
    ``device`` narrows to one device of ``fleet``; ``extra`` (SQL) and ``params`` add conditions."""
    clause, fparams = fleet_clause(fleet)
    dclause, dparams = ("", ()) if device is None else (" AND device = ?", (device,))
    return db.query(f"SELECT {columns} FROM window_rollups WHERE last_end_ts >= ?{clause}{dclause}{extra} "
                    "ORDER BY hour_ts", (since, *fparams, *dparams, *params))


def _bucket_sql(db: Database) -> str:
    if getattr(db, "dialect", "sqlite") == "postgresql":
        return "CAST(FLOOR(end_ts / ?) AS BIGINT)"
    return "CAST(end_ts / ? AS INTEGER)"  # truncation = floor for the positive unix times


class RangeCache:
    """Per-bucket window aggregates shared by the views of one database (thread-safe; see the module docstring).

    ``max_entries`` bounds memory (an entry is about 2 KB): past it, the buckets outside the range just asked for
    are dropped.
    """

    def __init__(self, *, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[Any, ...], tuple[tuple[int, float], WindowAggregate]] = {}
        self._rollups: dict[tuple[Any, ...], tuple[tuple[int, float], WindowAggregate]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # windows read from the database (to see the cache work)

    @staticmethod
    def bucket_s(range_s: float) -> float:
        """Bucket length for a range of ``range_s`` seconds."""
        return next(b for limit, b in _BUCKETS if range_s <= limit)

    def aggregate(self, db: Database, fleet: str | None, since: float, now: float,
                  group: Callable[[FineKey], tuple[Any, ...]]) -> dict[tuple[Any, ...], WindowAggregate]:
        """The aggregates of the windows with end_ts from ``since`` (rounded down to a bucket boundary),
        grouped by ``group(fine key)``."""
        size = self.bucket_s(max(now - since, 1.0))
        first = math.floor(since / size)
        clause, params = fleet_clause(fleet)
        sigs = db.query(f"SELECT fleet, device, model_name, model_version, {_bucket_sql(db)} AS b, COUNT(*) AS n, "
                        f"MAX(received_at) AS r FROM windows WHERE end_ts >= ?{clause} GROUP BY 1, 2, 3, 4, 5",
                        (size, first * size, *params))
        with self._lock:
            stale = sorted({int(s["b"]) for s in sigs if self._signature(size, s) != (int(s["n"]), float(s["r"]))})
            for lo, hi in _runs(stale):
                self._refresh(db, fleet, size, lo, hi, set(stale))
            parts: dict[tuple[Any, ...], list[WindowAggregate]] = {}
            for s in sigs:
                fine = (s["fleet"], s["device"], s["model_name"], s["model_version"])
                entry = self._entries.get((size, *fine, int(s["b"])))
                if entry is not None:
                    parts.setdefault(group(fine), []).append(entry[1])
            for fine, agg in self._rollup_aggregates(db, fleet, since):
                parts.setdefault(group(fine), []).append(agg)
            out = {key: WindowAggregate().merge(aggs) for key, aggs in parts.items()}
            if len(self._entries) > self.max_entries:
                self._entries = {k: v for k, v in self._entries.items() if k[0] == size and k[-1] >= first}
        return out

    def _rollup_aggregates(self, db: Database, fleet: str | None, since: float
                           ) -> list[tuple[FineKey, WindowAggregate]]:
        """(fine key, aggregate) of every rollup in the range; rows whose signature changed are read again."""
        sigs = rollups_since(db, fleet, since, columns="fleet, device, model_name, model_version, hour_ts, windows, "
                             "updated_at")
        keys = [(s["fleet"], s["device"], s["model_name"], s["model_version"], float(s["hour_ts"])) for s in sigs]
        stale = {k for k, s in zip(keys, sigs, strict=True)
                 if self._rollups.get(k, (None,))[0] != (int(s["windows"]), float(s["updated_at"]))}
        if stale:
            lo, hi = min(k[-1] for k in stale), max(k[-1] for k in stale)
            for row in rollups_since(db, fleet, since, extra=" AND hour_ts >= ? AND hour_ts <= ?", params=(lo, hi)):
                key = (row["fleet"], row["device"], row["model_name"], row["model_version"], float(row["hour_ts"]))
                if key in stale:
                    sig = (int(row["windows"]), float(row["updated_at"]))
                    self._rollups[key] = (sig, WindowAggregate.from_rollup(row).compact())
                    self.reads += 1
        if len(self._rollups) > self.max_entries:
            wanted = set(keys)
            self._rollups = {k: v for k, v in self._rollups.items() if k in wanted}
        out = []
        for k in keys:
            entry = self._rollups.get(k)
            if entry is not None:
                out.append((k[:4], entry[1]))
        return out

    def _signature(self, size: float, s: dict[str, Any]) -> tuple[int, float] | None:
        entry = self._entries.get((size, s["fleet"], s["device"], s["model_name"], s["model_version"], int(s["b"])))
        return None if entry is None else entry[0]

    def _refresh(self, db: Database, fleet: str | None, size: float, lo: int, hi: int, stale: set[int]) -> None:
        """Read buckets lo..hi again and replace their entries (for ``fleet``, or all fleets)."""
        fresh: dict[tuple[Any, ...], WindowAggregate] = {}
        last: dict[tuple[Any, ...], float] = {}
        for row, sketch, conf in windows_since(db, fleet, lo * size - 1.0, (hi + 1) * size + 1.0, bucket_s=size):
            b = int(row["b"])
            if b not in stale:
                continue
            key = (size, row["fleet"], row["device"], row["model_name"], row["model_version"], b)
            fresh.setdefault(key, WindowAggregate()).add(row, sketch, conf)
            last[key] = max(last.get(key, -math.inf), float(row["received_at"]))
            self.reads += 1
        for key in [k for k in self._entries if k[0] == size and lo <= k[-1] <= hi and k[-1] in stale
                    and (fleet is None or k[1] == fleet)]:
            del self._entries[key]
        for key, agg in fresh.items():
            self._entries[key] = ((agg.windows, last[key]), agg.compact())


def _runs(values: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs (lo, hi) of sorted integers."""
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            yield start, prev  # type: ignore[misc]
            start = prev = v
    if start is not None:
        yield start, prev  # type: ignore[misc]
