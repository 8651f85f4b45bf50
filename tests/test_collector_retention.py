"""Collector retention, dead letters and in-memory state (issue 13), on SQLite and PostgreSQL.

* raw windows older than the policy are rolled up into hourly rows (counts add up, percentiles from the merged
  sketches) and deleted; rollups expire later; the streams' gap state moves past what was deleted;
* events and dead letters are capped by age and count, and what was dropped is counted per device and reason;
* ``/api/dead_letters`` reads a bounded preview and the size from the database, never whole payloads; one payload
  is fetched by id, capped;
* ``(stream, seq)`` is unique: a second window with the same stream and seq is a duplicate, not a second row;
* ``Ingestor._streams`` is an LRU bounded in size.
"""

from __future__ import annotations

import json
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import postgres_db, sqlite_db

from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.collector.retention import RetentionPolicy, apply_retention
from edge_sdk.fleet.dashboard import views
from edge_sdk.testing.synthetic import make_window

DAY = 86400.0
NOW = time.time()
MODEL = {"name": "tiny", "version": "1", "artifact": "onnx/fp32", "runtime": "onnxruntime"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    ctx = sqlite_db(tmp_path) if request.param == "sqlite" else postgres_db("edge_retention")
    with ctx as database:
        yield database


def _stream(device: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_DNS, device).hex


def _window(device: str, seq: int, end: float, rng: np.random.Generator, stream: str | None = None) -> Message:
    w = make_window(fleet="f1", device=device, model=MODEL, start=end - 10, end=end,
                    latencies_ms=rng.lognormal(2.5, 0.3, 50), errors={"input": 1}, stream=stream or _stream(device),
                    seq=seq)
    return Message(f"edge/f1/{device}/telemetry", json.dumps(w).encode(), received_at=end + 1)


def _dead(db: Any, n: int, *, received_at: float, size: int = 100, device: str = "cam-1",
          reason: str = "not JSON") -> None:
    db.executemany("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
                   [(received_at + i * 1e-3, f"edge/f1/{device}/telemetry", reason, b"x" * size) for i in range(n)])


def test_old_windows_become_hourly_rollups_and_are_deleted(db: Any) -> None:
    rng = np.random.default_rng(0)
    ing = Ingestor(db)
    old_hour = (NOW - 10 * DAY) // 3600 * 3600
    old = [_window("cam-1", i + 1, old_hour + 10 * (i + 1), rng) for i in range(30)]  # 30 windows in one hour
    new = [_window("cam-1", 31 + i, NOW - 100 + i, rng) for i in range(5)]
    assert ing.store_batch(old + new).stored == 35
    counts = db.query("SELECT SUM(count) AS n, SUM(errors) AS e FROM windows WHERE end_ts < ?", (NOW - DAY,))[0]
    p95_before = views.model_versions(db, since_s=11 * DAY, now=NOW)[0]["p95_ms"]
    result = apply_retention(db, RetentionPolicy(raw_days=7), now=NOW)
    assert result["windows_rolled_up"] == 30
    assert db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"] == 5
    rollups = db.query("SELECT * FROM window_rollups")
    assert len(rollups) == 1
    r = rollups[0]
    assert (r["fleet"], r["device"], r["model_version"], r["hour_ts"]) == ("f1", "cam-1", "1", old_hour)
    assert r["windows"] == 30 and r["count"] == counts["n"] and r["errors"] == counts["e"]
    assert r["p95_ms"] is not None and abs(r["p95_ms"] - p95_before) / p95_before < 0.2
    # a late window of that hour merges into the same rollup
    assert ing.store_batch([_window("cam-1", 40, old_hour + 3000, rng)]).stored == 1
    apply_retention(db, RetentionPolicy(raw_days=7), now=NOW)
    assert db.query("SELECT windows FROM window_rollups")[0]["windows"] == 31
    # the stream's gap state moved past the deleted seqs: no resend is asked for windows that are gone
    assert all(g.stream != _stream("cam-1") or g.contiguous_seq >= 30 for g in ing.gaps())
    # rollups expire after their own, longer, retention
    apply_retention(db, RetentionPolicy(raw_days=1, rollup_days=5), now=NOW)
    assert db.query("SELECT COUNT(*) AS n FROM window_rollups")[0]["n"] == 0


def test_events_and_dead_letters_are_capped_and_summarised(db: Any) -> None:
    _dead(db, 30, received_at=NOW - 30 * DAY, device="cam-1", reason="not JSON")
    _dead(db, 20, received_at=NOW - 100, device="cam-2", reason="schema: count")
    db.executemany("INSERT INTO events (event_id, fleet, device, ts, received_at, kind, level, data) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [(uuid.uuid4().hex, "f1", "cam-3", NOW - 200 + i, NOW - 200 + i, "update.failed", "error", "{}")
                    for i in range(40)])
    result = apply_retention(db, RetentionPolicy(dead_letters_days=14, dead_letters_max=15, events_max=25), now=NOW)
    assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 15
    assert db.query("SELECT COUNT(*) AS n FROM events")[0]["n"] == 25
    assert result["dead_letters_dropped"] == 35 and result["events_dropped"] == 15
    drops = {(d["kind"], d["device"], d["reason"]): d["dropped"] for d in views.retention_drops(db)}
    assert drops == {("dead_letter", "cam-1", "not JSON"): 30, ("dead_letter", "cam-2", "schema: count"): 5,
                     ("event", "cam-3", "update.failed"): 15}


def test_dead_letters_list_reads_previews_not_payloads(db: Any) -> None:
    _dead(db, 40, received_at=NOW, size=1_000_000)
    tracemalloc.start()
    try:
        rows = views.dead_letters(db, 10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == views.DEAD_LETTERS_MAX_LIMIT if views.DEAD_LETTERS_MAX_LIMIT < 40 else len(rows) == 40
    assert all(r["size"] == 1_000_000 and r["preview"] == "x" * views.PREVIEW_BYTES for r in rows)
    assert peak < 4_000_000, f"{peak / 1e6:.1f} MB traced while listing 40 x 1 MB dead letters"
    one = views.dead_letter(db, rows[0]["id"], max_bytes=1000)
    assert one["size"] == 1_000_000 and one["truncated"] and one["payload"] == "x" * 1000
    assert views.dead_letter(db, 10**9) is None


def test_stream_seq_is_unique_and_the_stream_cache_is_bounded(db: Any) -> None:
    rng = np.random.default_rng(1)
    ing = Ingestor(db, max_cached_streams=10)
    first = _window("cam-1", 1, NOW - 50, rng)
    again = _window("cam-1", 1, NOW - 40, rng)  # another window_id, same stream and seq
    r = ing.store_batch([first, again])
    assert r.stored == 1 and r.duplicates == 1 and r.dead_letters == 0
    msgs = [_window(f"cam-{k}", s, NOW - 30 + s, rng) for k in range(40) for s in (1, 2, 3)]
    ing.store_batch(msgs)
    assert len(ing._streams) <= 10
    rows = db.query("SELECT stream, contiguous_seq FROM streams ORDER BY stream")
    assert len(rows) == 40 and all(r["contiguous_seq"] == 3 for r in rows)


def test_retention_policy_from_the_environment() -> None:
    assert RetentionPolicy.from_env({}) == RetentionPolicy()
    assert RetentionPolicy.from_env({"EDGE_SDK_RETENTION": "off"}) is None
    p = RetentionPolicy.from_env({"EDGE_SDK_RETENTION_RAW_DAYS": "3", "EDGE_SDK_RETENTION_DEAD_LETTERS_MAX": "50"})
    assert p is not None and p.raw_days == 3 and p.dead_letters_max == 50
    with pytest.raises(ValueError, match="EDGE_SDK_RETENTION_RAW_DAYS"):
        RetentionPolicy.from_env({"EDGE_SDK_RETENTION_RAW_DAYS": "a week"})
    with pytest.raises(ValueError, match="rollup_days"):
        RetentionPolicy(raw_days=30, rollup_days=7)


def test_the_ingestor_applies_retention_after_a_batch_once_per_interval(db: Any) -> None:
    rng = np.random.default_rng(2)
    ing = Ingestor(db, retention=RetentionPolicy(raw_days=7, interval_s=0.2))
    old = [_window("cam-9", i + 1, NOW - 9 * DAY + 10 * i, rng) for i in range(5)]
    assert ing.store_batch(old).stored == 5  # not due yet: the first run is one interval after start
    assert db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"] == 5
    time.sleep(0.25)
    ing.store_batch([_window("cam-9", 6, NOW - 5, rng)])
    assert db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"] == 1
    assert db.query("SELECT SUM(windows) AS n FROM window_rollups")[0]["n"] == 5
