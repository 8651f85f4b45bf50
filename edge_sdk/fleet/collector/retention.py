"""Retention and downsampling of the collector database, so it stops growing without bound.

At 1,000 devices x one window per 10 s the ``windows`` table gains ~8.6 M rows a day, and any device can fill
``events`` and ``dead_letters``. :func:`apply_retention` (run by the storing process every ``interval_s``):

* windows received more than ``raw_days`` ago are merged into ``window_rollups`` (one row per device, model
  version and hour of ``end_ts``: counts add up, the latency sketches merge, so percentiles stay within the
  sketch's accuracy) and deleted; a late window of an already rolled-up hour merges into its row. The streams'
  gap state moves past the deleted seqs (seqs never received are counted ``lost``), so gap repair does not ask
  devices for windows that were deleted on purpose;
* rollups older than ``rollup_days`` are deleted; the fleet views read them for ranges older than the raw
  windows (``dashboard.range_cache.rollups_since``);
* events and dead letters older than their age limit, or beyond their row cap (oldest first), are deleted and
  counted in ``retention_drops`` per device and event kind / dead-letter reason.

Each step works in bounded pages, each page its own transaction, so a first run over a large backlog neither
holds the write lock for long nor loads the backlog into memory. Policy from the environment:
``EDGE_SDK_RETENTION_RAW_DAYS`` (7), ``..._ROLLUP_DAYS`` (400), ``..._EVENTS_DAYS`` (90), ``..._EVENTS_MAX``
(1,000,000), ``..._DEAD_LETTERS_DAYS`` (14), ``..._DEAD_LETTERS_MAX`` (10,000), ``..._SAMPLES_DAYS`` (180),
``..._SAMPLES_MAX`` (1,000,000; captured samples, their files deleted with their last row), ``..._INTERVAL_S`` (600);
``EDGE_SDK_RETENTION=off`` turns it off.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from edge_sdk.fleet.collector.aggregate import WindowAggregate
from edge_sdk.topics import parse_topic

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["RetentionPolicy", "apply_retention"]

DAY = 86400.0
HOUR = 3600.0
_PAGE = 2000  # rows per transaction
_ROLLUP_COLUMNS = ("windows", "count", "errors", "client_errors", "fb_labelled", "fb_correct", "dropped_windows",
                   "conf_sum", "conf_weight", "psi_max", "first_end_ts", "last_end_ts", "p50_ms", "p95_ms", "p99_ms",
                   "sketch")
_KEY = ("fleet", "device", "model_name", "model_version", "hour_ts")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long / how many rows the collector keeps (days are measured on the collector's ``received_at``)."""

    raw_days: float = 7.0
    rollup_days: float = 400.0
    events_days: float = 90.0
    events_max: int = 1_000_000
    dead_letters_days: float = 14.0
    dead_letters_max: int = 10_000
    samples_days: float = 180.0
    samples_max: int = 1_000_000
    interval_s: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or math.isnan(v):
                raise ValueError(f"retention {f.name} must be a positive number, not {v!r}")
        if self.rollup_days < self.raw_days:
            raise ValueError(f"retention rollup_days ({self.rollup_days:g}) must be >= raw_days ({self.raw_days:g})")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RetentionPolicy | None:
        """The policy from ``EDGE_SDK_RETENTION_*`` variables (defaults otherwise); None when
        ``EDGE_SDK_RETENTION=off``. A malformed value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        if env.get("EDGE_SDK_RETENTION", "").strip().lower() in ("off", "0", "false", "no"):
            return None
        kw: dict[str, Any] = {}
        for f in fields(cls):
            name = f"EDGE_SDK_RETENTION_{f.name.upper()}"
            if env.get(name):
                try:
                    kw[f.name] = int(env[name]) if f.name.endswith("_max") else float(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r} is not a number: set it like {name}=7") from None
        return cls(**kw)


def apply_retention(db: Database, policy: RetentionPolicy, *, now: float | None = None,
                    max_pages: int = 50) -> dict[str, int]:
    """Apply ``policy`` once; returns counts: windows_rolled_up, rollups_deleted, events_dropped,
    dead_letters_dropped, samples_dropped, streams_moved. At most ``max_pages`` pages per step (the next run
    continues)."""
    t = time.time() if now is None else float(now)
    out = {"windows_rolled_up": 0, "rollups_deleted": 0, "events_dropped": 0, "dead_letters_dropped": 0,
           "streams_moved": 0}
    for _ in range(max_pages):
        n, moved = _roll_up_page(db, t - policy.raw_days * DAY, t)
        out["windows_rolled_up"] += n
        out["streams_moved"] += moved
        if n < _PAGE:
            break
    out["rollups_deleted"] = db.execute("DELETE FROM window_rollups WHERE last_end_ts < ?",
                                        (t - policy.rollup_days * DAY,))
    out["events_dropped"] = _cap(db, "events", "event", t - policy.events_days * DAY, policy.events_max, max_pages)
    out["dead_letters_dropped"] = _cap(db, "dead_letters", "dead_letter", t - policy.dead_letters_days * DAY,
                                       policy.dead_letters_max, max_pages)
    from edge_sdk.fleet.samples.store import apply_sample_retention  # rows and their content-addressed files

    out["samples_dropped"] = apply_sample_retention(db, t - policy.samples_days * DAY, policy.samples_max,
                                                    max_pages=max_pages)
    return out


# -- windows -> hourly rollups ---------------------------------------------------------------------------------
def _roll_up_page(db: Database, cutoff: float, now: float) -> tuple[int, int]:
    """Roll up and delete one page of windows received before ``cutoff``; (windows, streams moved)."""
    from edge_sdk.fleet.dashboard.range_cache import WINDOW_COLUMNS, window_parts, window_parts_sql

    with db.transaction():
        rows = db.query(f"SELECT window_id, seq, {WINDOW_COLUMNS}, {window_parts_sql(db)} FROM windows "
                        "WHERE received_at < ? ORDER BY received_at LIMIT ?", (cutoff, _PAGE))
        if not rows:
            return 0, 0
        groups: dict[tuple, WindowAggregate] = {}
        seqs: dict[str, list[int]] = {}
        for r in rows:
            key = (r["fleet"], r["device"], r["model_name"], r["model_version"],
                   math.floor(float(r["end_ts"]) / HOUR) * HOUR)
            groups.setdefault(key, WindowAggregate()).add(r, *window_parts(r))
            seqs.setdefault(r["stream"], []).append(int(r["seq"]))
        for key, agg in sorted(groups.items()):
            existing = db.query(f"SELECT * FROM window_rollups WHERE {' AND '.join(f'{k} = ?' for k in _KEY)}", key)
            if existing:
                agg = WindowAggregate.from_rollup(existing[0]).merge([agg.compact()])
            cols = agg.to_rollup()
            values = tuple(cols[c] for c in _ROLLUP_COLUMNS)
            if existing:
                db.execute(f"UPDATE window_rollups SET {', '.join(f'{c} = ?' for c in _ROLLUP_COLUMNS)}, "
                           f"updated_at = ? WHERE {' AND '.join(f'{k} = ?' for k in _KEY)}", (*values, now, *key))
            else:
                db.execute(f"INSERT INTO window_rollups ({', '.join(_KEY + _ROLLUP_COLUMNS)}, updated_at) "
                           f"VALUES ({', '.join('?' * (len(_KEY) + len(_ROLLUP_COLUMNS) + 1))})",
                           (*key, *values, now))
        ids = [r["window_id"] for r in rows]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            db.execute(f"DELETE FROM windows WHERE window_id IN ({', '.join('?' * len(chunk))})", chunk)
        return len(rows), _move_streams(db, seqs, now)


def _move_streams(db: Database, seqs: dict[str, list[int]], now: float) -> int:
    """Move ``contiguous_seq`` of each stream past the seqs just deleted; the seqs in between that were never
    stored count as lost (nothing can resend a gap older than the raw retention into the raw table anyway)."""
    moved = 0
    for stream, deleted in sorted(seqs.items()):
        rows = db.query("SELECT contiguous_seq FROM streams WHERE stream = ?", (stream,))
        top = max(deleted)
        if not rows or int(rows[0]["contiguous_seq"]) >= top:
            continue
        c = int(rows[0]["contiguous_seq"])
        stored_between = {s for s in deleted if c < s <= top}
        remaining = {int(r["seq"]) for r in db.query(
            "SELECT seq FROM windows WHERE stream = ? AND seq > ? AND seq <= ?", (stream, c, top))}
        lost = (top - c) - len(stored_between | remaining)
        db.execute("UPDATE streams SET contiguous_seq = ?, lost = lost + ?, updated_at = ? WHERE stream = ? "
                   "AND contiguous_seq = ?", (top, max(lost, 0), now, stream, c))
        moved += 1
    return moved


# -- events and dead letters: age and row caps, summarised --------------------------------------------------------
def _cap(db: Database, table: str, kind: str, cutoff: float, max_rows: int, max_pages: int) -> int:
    """Delete rows of ``table`` received before ``cutoff`` or beyond the newest ``max_rows``; count them."""
    n = int(db.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
    if n > max_rows:  # the received_at of the newest row that must go
        edge = db.query(f"SELECT received_at FROM {table} ORDER BY received_at DESC LIMIT 1 OFFSET ?",
                        (int(max_rows),))
        if edge:
            cutoff = max(cutoff, math.nextafter(float(edge[0]["received_at"]), math.inf))
    dropped = 0
    for _ in range(max_pages):
        with db.transaction():
            if table == "events":
                rows = db.query("SELECT event_id AS id, fleet, device, kind AS reason, received_at FROM events "
                                "WHERE received_at < ? ORDER BY received_at LIMIT ?", (cutoff, _PAGE))
            else:
                rows = db.query("SELECT id, topic, reason, received_at FROM dead_letters WHERE received_at < ? "
                                "ORDER BY received_at LIMIT ?", (cutoff, _PAGE))
            if not rows:
                break
            _summarise(db, kind, rows)
            ids = [r["id"] for r in rows]
            id_col = "event_id" if table == "events" else "id"
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                db.execute(f"DELETE FROM {table} WHERE {id_col} IN ({', '.join('?' * len(chunk))})", chunk)
            dropped += len(rows)
            if len(rows) < _PAGE:
                break
    return dropped


def _summarise(db: Database, kind: str, rows: list[dict[str, Any]]) -> None:
    counts: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if kind == "event":
            fleet, device = r["fleet"], r["device"]
        else:
            parsed = parse_topic(r["topic"]) if isinstance(r["topic"], str) else None
            fleet, device = (parsed[0], parsed[1]) if parsed else ("", "")
        key = (str(fleet)[:200], str(device)[:200], str(r["reason"])[:200])
        ts = float(r["received_at"])
        c = counts.get(key)
        if c is None:
            counts[key] = [1, ts, ts]
        else:
            c[0] += 1
            c[1], c[2] = min(c[1], ts), max(c[2], ts)
    db.executemany(
        "INSERT INTO retention_drops (kind, fleet, device, reason, dropped, first_ts, last_ts) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, fleet, device, reason) DO UPDATE SET "
        "dropped = retention_drops.dropped + excluded.dropped, "
        "first_ts = CASE WHEN excluded.first_ts < retention_drops.first_ts THEN excluded.first_ts "
        "ELSE retention_drops.first_ts END, "
        "last_ts = CASE WHEN excluded.last_ts > retention_drops.last_ts THEN excluded.last_ts "
        "ELSE retention_drops.last_ts END",
        [(kind, *key, int(v[0]), v[1], v[2]) for key, v in sorted(counts.items())])
