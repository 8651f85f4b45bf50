"""Fleet views over ranges older than the raw-window retention (issue 13): once retention has rolled old windows
into hourly ``window_rollups`` rows and deleted them, ``fleet_status``, ``model_versions`` (with and without the
dashboard's RangeCache) and ``device_series`` still show latency, confidence and error figures for that range,
from the rollups. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
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
from edge_sdk.fleet.dashboard.range_cache import RangeCache
from edge_sdk.testing.synthetic import make_window

DAY = 86400.0
NOW = time.time()
MODEL = {"name": "tiny", "version": "1", "artifact": "onnx/fp32", "runtime": "onnxruntime"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    ctx = sqlite_db(tmp_path) if request.param == "sqlite" else postgres_db("edge_rollupview")
    with ctx as database:
        yield database


def _messages(rng: np.random.Generator) -> list[Message]:
    """Two devices, 40 windows each over two hours ten days ago, 5 recent windows each."""
    out = []
    old_start = (NOW - 10 * DAY) // 3600 * 3600
    for device in ("cam-1", "cam-2"):
        stream = uuid.uuid5(uuid.NAMESPACE_DNS, device).hex
        ends = [old_start + 170 * (i + 1) for i in range(40)] + [NOW - 100 + 10 * i for i in range(5)]
        for seq, end in enumerate(ends, 1):
            w = make_window(fleet="f1", device=device, model=MODEL, start=end - 10, end=end,
                            latencies_ms=rng.lognormal(2.5, 0.3, 50), confidences=rng.beta(6, 2, 50),
                            errors={"runtime": 1, "input": 2}, stream=stream, seq=seq)
            w["client_errors"] = {"input": 2}
            out.append(Message(f"edge/f1/{device}/telemetry", json.dumps(w).encode(), received_at=end + 1))
    return out


def _figures(row: dict[str, Any]) -> tuple:
    return (row["windows"], row["inferences"], row["errors"], round(row["p95_ms"], 6),
            round(row["confidence_mean"], 9))


def test_views_of_a_range_older_than_raw_retention_come_from_the_rollups(db: Any) -> None:
    rng = np.random.default_rng(3)
    assert Ingestor(db, retention=False).store_batch(_messages(rng)).stored == 90
    since = 11 * DAY
    before_versions = views.model_versions(db, since_s=since, now=NOW)
    before_status = {r["device"]: r for r in views.fleet_status(db, since_s=since, now=NOW)}
    assert apply_retention(db, RetentionPolicy(raw_days=7), now=NOW)["windows_rolled_up"] == 80
    assert db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"] == 10

    after_versions = views.model_versions(db, since_s=since, now=NOW)
    assert len(after_versions) == 1, after_versions
    a, b = after_versions[0], before_versions[0]
    assert (a["windows"], a["inferences"], a["errors"], a["devices"]) == (b["windows"], b["inferences"],
                                                                          b["errors"], 2)
    assert a["client_errors"] == b["client_errors"] == 180
    assert a["p95_ms"] == pytest.approx(b["p95_ms"], rel=0.03)  # merged sketches: within the sketch accuracy
    assert a["confidence_mean"] == pytest.approx(b["confidence_mean"], rel=1e-9)
    cached = views.model_versions(db, since_s=since, now=NOW, cache=RangeCache())[0]
    assert _figures(cached) == _figures(a)

    after_status = {r["device"]: r for r in views.fleet_status(db, since_s=since, now=NOW)}
    for dev in ("cam-1", "cam-2"):
        x, y = after_status[dev], before_status[dev]
        assert (x["windows"], x["inferences"], x["errors"]) == (y["windows"], y["inferences"], y["errors"])
        assert x["p95_ms"] == pytest.approx(y["p95_ms"], rel=0.03)
        assert x["confidence_mean"] == pytest.approx(y["confidence_mean"], rel=1e-9)
    cache = RangeCache()
    for _ in range(2):  # second call answered from the cache, same figures
        cached_status = {r["device"]: r for r in views.fleet_status(db, since_s=since, now=NOW, cache=cache)}
        assert all(_figures(cached_status[d]) == _figures(after_status[d]) for d in after_status)

    # a range that does not reach back to the rolled-up hours takes no rollup
    recent = views.model_versions(db, since_s=8 * DAY, now=NOW)[0]
    assert (recent["windows"], recent["inferences"], recent["errors"]) == (10, 500, 30)
    assert views.model_versions(db, since_s=8 * DAY, now=NOW, cache=RangeCache())[0]["windows"] == 10

    series = views.device_series(db, "f1", "cam-1", since_s=since, now=NOW)
    assert sum(p["windows"] for p in series) == 45 and sum(p["count"] for p in series) == 45 * 50
    hourly = [p for p in series if p["windows"] > 1]
    assert len(hourly) == 2 and all(p["p95_ms"] and p["conf_mean"] and p["errors"] for p in hourly)
    assert [p["end_ts"] for p in series] == sorted(p["end_ts"] for p in series)
    bucketed = views.device_series(db, "f1", "cam-1", since_s=since, now=NOW, max_points=3)
    assert sum(p["windows"] for p in bucketed) == 45 and len(bucketed) <= 3
