"""Fleet views on real databases (a SQLite file and a throwaway PostgreSQL database): merged percentiles against
numpy on the raw values, error-rate / accuracy / confidence arithmetic, online / stale / offline, model versions,
downsampled series, alerts and dead letters."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import add_alert, fill_demo_fleet, postgres_db, sqlite_db, store_window, upsert_device

from edge_sdk.fleet.dashboard import views
from edge_sdk.fleet.dashboard.range_cache import RangeCache
from edge_sdk.testing.synthetic import make_window, synthetic_baseline

NOW = 1_760_000_000.0
WIN = 10.0
FLEET = "plant-7"
REL = 0.01 + 1e-9  # the sketch's relative accuracy


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    ctx = sqlite_db(tmp_path) if request.param == "sqlite" else postgres_db("edge_views")
    with ctx as database:
        yield database


def _raw_windows(rng: np.random.Generator, device: str, n: int, *, version: str = "1", median: float = 12.0,
                 error_every: int = 0, feedback: bool = True, psi_shift: float = 0.0, t_end: float = NOW,
                 dropped: int = 0) -> list[dict[str, Any]]:
    """n windows ending at t_end, each with its raw values kept under "_raw" (removed before storing)."""
    base = synthetic_baseline()
    stream = uuid.uuid4().hex
    out = []
    for k in range(n):
        end = t_end - (n - 1 - k) * WIN
        size = int(rng.integers(20, 60))
        lat = rng.lognormal(np.log(median), 0.4, size)
        conf = rng.beta(6, 2, size)
        errors = {"runtime": k % 3 + 1} if error_every and k % error_every == 0 else {}
        labelled = int(rng.integers(1, 10))
        fb = (labelled, int(rng.integers(0, labelled + 1))) if feedback else None
        inputs = [rng.normal(-psi_shift * k / max(n - 1, 1), 1.0, 2000) for _ in base]
        w = make_window(fleet=FLEET, device=device, model={"name": "resnet", "version": version}, start=end - WIN,
                        end=end, latencies_ms=lat, errors=errors, confidences=conf,
                        classes=rng.integers(0, 5, size), inputs=inputs, baseline=base, feedback=fb,
                        dropped_windows=dropped, stream=stream, seq=k + 1)
        out.append({"w": w, "lat": lat, "conf": conf, "errors": sum(errors.values()), "fb": fb or (0, 0)})
    return out


def _store(db: Any, raws: list[dict[str, Any]]) -> None:
    for r in raws:
        store_window(db, r["w"], received_at=r["w"]["end"] + 0.2)


def _q(values: np.ndarray, q: float) -> float:
    """The exact quantile as DDSketch defines it: the value of rank floor(q * (n - 1))."""
    return float(np.quantile(values, q, method="lower"))


def _close(actual: float | None, expected: float) -> bool:
    return actual is not None and abs(actual - expected) <= REL * expected


def test_fleet_status_merges_sketches_and_weights_correctly(db: Any) -> None:
    rng = np.random.default_rng(7)
    a_old = _raw_windows(rng, "cam-a", 20, t_end=NOW - 2000)  # outside the 900 s range
    a = _raw_windows(rng, "cam-a", 60, median=12.0, error_every=4, psi_shift=0.8, dropped=3)
    b = _raw_windows(rng, "cam-b", 30, median=30.0, feedback=False, t_end=NOW - 200)
    _store(db, a_old + a + b)
    upsert_device(db, FLEET, "cam-a", state="online", state_ts=NOW - 3000, last_seen=NOW,
                  model={"name": "resnet", "version": "1"})
    upsert_device(db, FLEET, "cam-b", state="online", state_ts=NOW - 3000, last_seen=NOW - 200,
                  model={"name": "resnet", "version": "1"})
    upsert_device(db, FLEET, "cam-c", state="offline", state_ts=NOW - 50, last_seen=NOW - 50, reason="last will")
    upsert_device(db, "other", "cam-z", state="online", state_ts=NOW - 5, last_seen=NOW - 5)
    db.execute("INSERT INTO streams (stream, fleet, device, contiguous_seq, max_seq, lost, updated_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", (a[0]["w"]["stream"], FLEET, "cam-a", 60, 60, 4, NOW))
    add_alert(db, FLEET, "cam-a", "drift", opened_at=NOW - 30, model_version="1")
    add_alert(db, FLEET, "cam-a", "latency_sla", opened_at=NOW - 20, model_version="1")
    add_alert(db, FLEET, "cam-a", "error_rate", opened_at=NOW - 900, state="resolved")

    rows = {r["device"]: r for r in views.fleet_status(db, FLEET, since_s=900, now=NOW)}
    assert set(rows) == {"cam-a", "cam-b", "cam-c"}
    ra, rb, rc = rows["cam-a"], rows["cam-b"], rows["cam-c"]
    assert (ra["state"], rb["state"], rc["state"]) == ("online", "stale", "offline")
    assert rc["state_reason"] == "last will" and rc["windows"] == 0 and rc["p95_ms"] is None

    lat = np.concatenate([r["lat"] for r in a])
    assert ra["windows"] == 60 and ra["inferences"] == lat.size
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        assert _close(ra[key], _q(lat, q)), (key, ra[key], _q(lat, q))
    errors = sum(r["errors"] for r in a)
    assert errors > 0 and ra["errors"] == errors
    assert ra["error_rate"] == pytest.approx(errors / (lat.size + errors))
    conf = np.concatenate([r["conf"] for r in a])
    assert ra["confidence_mean"] == pytest.approx(float(conf.mean()), rel=1e-9)
    assert sum(ra["confidence_hist"]["counts"]) == conf.size
    labelled, correct = sum(r["fb"][0] for r in a), sum(r["fb"][1] for r in a)
    assert (ra["labelled"], ra["correct"]) == (labelled, correct)
    assert ra["accuracy"] == pytest.approx(correct / labelled)
    psis = [r["w"]["input"]["psi_max"] for r in a]
    assert ra["psi_latest"] == pytest.approx(psis[-1]) and ra["psi_max"] == pytest.approx(max(psis))
    assert ra["psi_latest"] > 0.2 > psis[0]
    assert ra["alerts_open"] == 2 and ra["lost_windows"] == 4 and ra["dropped_windows"] == 3

    lat_b = np.concatenate([r["lat"] for r in b])
    assert rb["windows"] == 30 and _close(rb["p95_ms"], _q(lat_b, 0.95))
    assert rb["accuracy"] is None and rb["labelled"] == 0 and rb["error_rate"] == 0.0

    # a device is stale once no window came for 3 x window_s, online again when one arrives
    assert views.fleet_status(db, FLEET, since_s=900, now=NOW + 3 * WIN - 1)[0]["state"] == "online"
    assert views.fleet_status(db, FLEET, since_s=900, now=NOW + 3 * WIN + 1)[0]["state"] == "stale"
    # no fleet filter: every fleet
    assert {r["fleet"] for r in views.fleet_status(db, since_s=900, now=NOW)} == {FLEET, "other"}


def test_model_versions_group_by_name_and_version(db: Any) -> None:
    rng = np.random.default_rng(11)
    v1 = _raw_windows(rng, "cam-a", 40, version="1", median=20.0, t_end=NOW - 400)
    v2a = _raw_windows(rng, "cam-a", 40, version="2", median=8.0)
    v2b = _raw_windows(rng, "cam-b", 40, version="2", median=9.0, error_every=5)
    _store(db, v1 + v2a + v2b)
    add_alert(db, FLEET, "cam-b", "error_rate", opened_at=NOW - 10, model_version="2")
    add_alert(db, FLEET, "cam-a", "latency_sla", opened_at=NOW - 500, model_version="1", state="resolved")
    rows = {r["model_version"]: r for r in views.model_versions(db, FLEET, since_s=1200, now=NOW)}
    assert set(rows) == {"1", "2"}
    assert rows["1"]["devices"] == 1 and rows["2"]["devices"] == 2
    assert rows["1"]["windows"] == 40 and rows["2"]["windows"] == 80
    for version, raws in (("1", v1), ("2", v2a + v2b)):
        lat = np.concatenate([r["lat"] for r in raws])
        assert rows[version]["inferences"] == lat.size
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            assert _close(rows[version][key], _q(lat, q)), (version, key)
    errs = sum(r["errors"] for r in v2b)
    n2 = sum(r["lat"].size for r in v2a + v2b)
    assert rows["2"]["error_rate"] == pytest.approx(errs / (n2 + errs))
    assert rows["2"]["alerts_open"] == 1 and rows["1"]["alerts_open"] == 0


def test_device_series_points_and_buckets(db: Any) -> None:
    rng = np.random.default_rng(3)
    raws = _raw_windows(rng, "cam-a", 120, psi_shift=1.0, error_every=7)
    _store(db, raws)
    _store(db, _raw_windows(rng, "cam-b", 10))  # another device: never mixed in
    full = views.device_series(db, FLEET, "cam-a", since_s=3600, max_points=300, now=NOW)
    assert len(full) == 120
    assert [p["end_ts"] for p in full] == [r["w"]["end"] for r in raws]
    for p, r in zip(full, raws, strict=True):
        assert p["count"] == r["lat"].size and p["errors"] == r["errors"]
        assert _close(p["p95_ms"], _q(r["lat"], 0.95))
        assert p["conf_mean"] == pytest.approx(float(r["conf"].mean()))
        labelled, correct = r["fb"]
        assert p["accuracy"] == pytest.approx(correct / labelled)

    buckets = views.device_series(db, FLEET, "cam-a", since_s=3600, max_points=12, now=NOW)
    assert len(buckets) == 12
    assert sum(b["windows"] for b in buckets) == 120
    assert sum(b["count"] for b in buckets) == sum(r["lat"].size for r in raws)
    assert sum(b["errors"] for b in buckets) == sum(r["errors"] for r in raws)
    i = 0
    for b in buckets:  # each bucket holds consecutive windows: its p95 is that of their raw values together
        part = raws[i:i + b["windows"]]
        i += b["windows"]
        assert b["end_ts"] == part[-1]["w"]["end"]
        lat = np.concatenate([r["lat"] for r in part])
        assert _close(b["p95_ms"], _q(lat, 0.95))
        assert b["psi_max"] == pytest.approx(max(r["w"]["input"]["psi_max"] for r in part))
        conf = np.concatenate([r["conf"] for r in part])
        assert b["conf_mean"] == pytest.approx(float(conf.mean()))
    assert buckets[-1]["psi_max"] > buckets[0]["psi_max"]  # the drift shows in the series
    assert views.device_series(db, FLEET, "cam-a", since_s=95, now=NOW)[0]["end_ts"] == NOW - 9 * WIN
    assert views.device_series(db, FLEET, "nobody", now=NOW) == []
    with pytest.raises(ValueError, match="max_points"):
        views.device_series(db, FLEET, "cam-a", max_points=0, now=NOW)


def test_alerts_and_dead_letters(db: Any) -> None:
    for i in range(5):
        add_alert(db, FLEET, f"cam-{i}", "drift", opened_at=NOW - 100 + i, state="open" if i % 2 else "resolved")
    assert [a["device"] for a in views.alerts(db, "open", 10)] == ["cam-3", "cam-1"]
    assert len(views.alerts(db, None, 10)) == 5
    assert [a["device"] for a in views.alerts(db, limit=2)] == ["cam-4", "cam-3"]
    assert views.alerts(db, "resolved", fleet="elsewhere") == []
    payload = b'{"schema": "edge-sdk/telemetry-window", "count": -1' + b"\xff" * 400
    db.execute("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
               (NOW, f"edge/{FLEET}/cam-1/telemetry", "count: must be >= 0", payload))
    db.execute("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
               (NOW + 1, "edge/x/y/events", "not JSON", b"hello"))
    dl = views.dead_letters(db, 10)
    assert [d["reason"] for d in dl] == ["not JSON", "count: must be >= 0"]
    assert dl[1]["size"] == len(payload) and dl[1]["preview"].startswith('{"schema"')
    assert len(dl[1]["preview"]) <= 300 and dl[0]["preview"] == "hello"
    assert len(views.dead_letters(db, 1)) == 1


def test_fleet_status_cli_table_and_json(tmp_path: Path) -> None:
    with sqlite_db(tmp_path) as database:
        fill_demo_fleet(database, FLEET, time.time(), windows=20)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_sdk.cli", "fleet", "status", *args], capture_output=True,
                              text=True, timeout=60, check=False)

    out = cli("--db", url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["FLEET", "DEVICE", "STATE", "MODEL"] and len(lines) == 4
    assert [line.split()[1:3] for line in lines[1:]] == [["cam-01", "online"], ["cam-02", "online"],
                                                        ["cam-03", "offline"]]
    rows = json.loads(cli("--db", url, "--json", "--fleet", FLEET).stdout)
    assert [r["device"] for r in rows] == ["cam-01", "cam-02", "cam-03"] and rows[1]["psi_latest"] > 0.2
    assert json.loads(cli("--db", url, "--json", "--fleet", "elsewhere").stdout) == []
    missing = cli("--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.returncode == 2 and "no fleet database" in missing.stderr


def test_range_cache_gives_the_same_answers_and_rereads_only_changed_minutes(db: Any) -> None:
    rng = np.random.default_rng(5)
    raws = _raw_windows(rng, "cam-a", 80) + _raw_windows(rng, "cam-b", 80, version="2", median=25.0)
    _store(db, raws)
    upsert_device(db, FLEET, "cam-a", state="online", state_ts=NOW - 900, last_seen=NOW)
    upsert_device(db, FLEET, "cam-b", state="online", state_ts=NOW - 900, last_seen=NOW)
    since_s = NOW - math.floor((NOW - 700) / 60) * 60  # a range starting on a minute: the cache rounds down to it
    cache = RangeCache()

    def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            for k, v in x.items():
                assert y[k] == pytest.approx(v, rel=1e-12) if isinstance(v, float) else y[k] == v, k

    same(views.fleet_status(db, FLEET, since_s=since_s, now=NOW),
         views.fleet_status(db, FLEET, since_s=since_s, now=NOW, cache=cache))
    in_range = sum(1 for r in raws if r["w"]["end"] >= NOW - since_s)
    assert cache.reads == in_range
    same(views.model_versions(db, FLEET, since_s=since_s, now=NOW),
         views.model_versions(db, FLEET, since_s=since_s, now=NOW, cache=cache))
    assert cache.reads == in_range  # nothing changed: no window read again

    # a new window in the current minute and a re-sent one in an old minute: only those two minutes are read
    new = _raw_windows(rng, "cam-a", 1, t_end=NOW + 1)[0]
    late = _raw_windows(rng, "cam-b", 1, version="2", t_end=NOW - 300.5)[0]
    _store(db, [new, late])
    minutes = {math.floor(new["w"]["end"] / 60), math.floor(late["w"]["end"] / 60)}
    expected_reads = sum(1 for r in [*raws, new, late] if math.floor(r["w"]["end"] / 60) in minutes)
    fresh = views.fleet_status(db, FLEET, since_s=since_s + 1, now=NOW + 1, cache=cache)
    assert cache.reads == in_range + expected_reads
    same(views.fleet_status(db, FLEET, since_s=since_s + 1, now=NOW + 1), fresh)
    start = NOW - since_s
    expected = collections.Counter(r["w"]["device"] for r in [*raws, new, late] if r["w"]["end"] >= start)
    assert {r["device"]: r["windows"] for r in fresh} == dict(expected)
