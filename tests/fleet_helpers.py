"""Test helpers for the fleet views and dashboard: real databases (SQLite file, a throwaway PostgreSQL database)
and storing schema-valid windows the way the collector stores them (same columns, same derived values)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PG_ADMIN_URL = "postgresql://root@127.0.0.1:5432/test"

_WINDOW_SQL = ("INSERT INTO windows (window_id, fleet, device, stream, seq, model_name, model_version, start_ts, "
               "end_ts, received_at, count, errors, p50_ms, p95_ms, p99_ms, conf_mean, psi_max, fb_labelled, "
               "fb_correct, dropped_windows, payload) VALUES (" + ", ".join("?" * 21) + ")")


@contextlib.contextmanager
def sqlite_db(directory: Path) -> Iterator[Any]:
    """A migrated SQLite fleet database in ``directory``."""
    from edge_sdk.fleet.db import Database

    db = Database.connect(f"sqlite:///{directory / 'fleet.db'}")
    db.migrate()
    try:
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def postgres_db(prefix: str = "edge_test") -> Iterator[Any]:
    """A migrated, uniquely named PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    import psycopg

    from edge_sdk.fleet.db import Database

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db = Database.connect(f"postgresql://root@127.0.0.1:5432/{name}")
    try:
        db.migrate()
        yield db
    finally:
        db.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def validate_window(window: dict[str, Any]) -> None:
    """Raise when ``window`` does not match telemetry.schema.json."""
    import fastjsonschema

    from edge_sdk.schema import load_schema

    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = fastjsonschema.compile(load_schema("telemetry"))
    _VALIDATOR(window)


_VALIDATOR: Any = None


def store_window(db: Any, w: dict[str, Any], received_at: float) -> None:
    """Validate and store one window with the derived columns the collector fills."""
    from edge_sdk.sketch import quantiles, sketch_from_dict

    validate_window(w)
    q = quantiles(sketch_from_dict(w["latency_ms"]["sketch"]))
    fb = w.get("feedback") or {}
    conf = w.get("confidence") or {}
    inp = w.get("input") or {}
    db.execute(_WINDOW_SQL, (
        w["window_id"], w["fleet"], w["device"], w["stream"], w["seq"], w["model"]["name"], w["model"]["version"],
        w["start"], w["end"], received_at, w["count"], sum(w["errors"].values()), q["p50"], q["p95"], q["p99"],
        conf.get("mean"), inp.get("psi_max"), fb.get("labelled", 0), fb.get("correct", 0), w["dropped_windows"],
        json.dumps(w)))


def upsert_device(db: Any, fleet: str, device: str, *, state: str, state_ts: float, last_seen: float,
                  model: dict[str, Any] | None = None, window_s: float | None = 10.0,
                  reason: str | None = None) -> None:
    """Insert or replace one devices row."""
    model = model or {}
    db.execute("DELETE FROM devices WHERE fleet = ? AND device = ?", (fleet, device))
    db.execute("INSERT INTO devices (fleet, device, state, state_ts, state_reason, first_seen, last_seen, "
               "model_name, model_version, artifact, runtime, agent_version, window_s) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (fleet, device, state, state_ts, reason, state_ts, last_seen, model.get("name"), model.get("version"),
                model.get("artifact"), model.get("runtime"), "0.1.0", window_s))


def add_alert(db: Any, fleet: str, device: str | None, rule: str, *, opened_at: float, state: str = "open",
              model_version: str | None = None, value: float | None = None, threshold: float | None = None,
              message: str = "", severity: str = "warning") -> None:
    """Insert one alert row."""
    db.execute("INSERT INTO alerts (fleet, device, rule, severity, state, opened_at, resolved_at, model_version, "
               "value, threshold, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (fleet, device, rule, severity, state, opened_at, None if state == "open" else opened_at + 1,
                model_version, value, threshold, message or f"{rule} on {device}"))


def fill_demo_fleet(db: Any, fleet: str, now: float, *, windows: int = 60, window_s: float = 10.0) -> dict[str, Any]:
    """Three devices with ``windows`` windows each ending at ``now``: cam-01 healthy, cam-02 drifting and
    slow (one open drift alert), cam-03 offline since half-way. Returns {"devices": [...], "windows": n}."""
    from edge_sdk.testing.synthetic import DeviceProfile, SimulatedDevice

    profiles = [DeviceProfile(fleet, "cam-01", latency_ms=11.0),
                DeviceProfile(fleet, "cam-02", latency_ms=14.0, slow_factor=1.6, error_rate=0.02),
                DeviceProfile(fleet, "cam-03", latency_ms=9.0, model_version="2")]
    stored = 0
    for i, p in enumerate(profiles):
        sim = SimulatedDevice(p, seed=100 + i)
        stream = uuid.uuid4().hex
        n = windows if i != 2 else windows // 2
        last = now
        for k in range(n):
            end = now - (windows - 1 - k) * window_s
            if i == 1 and k >= windows // 2:  # the camera darkens half-way through
                sim = SimulatedDevice(DeviceProfile(fleet, "cam-02", latency_ms=14.0, slow_factor=1.6,
                                                    error_rate=0.02, drift=min(1.0, 0.1 * (k - windows // 2 + 1))),
                                      seed=1000 + k)
            w = sim.window(end - window_s, end)
            w["stream"], w["seq"] = stream, k + 1
            store_window(db, w, received_at=end + 0.05)
            stored += 1
            last = end
        state = "offline" if i == 2 else "online"
        upsert_device(db, fleet, p.device, state=state, state_ts=last if i == 2 else now - windows * window_s,
                      last_seen=last, model=sim.model, window_s=window_s,
                      reason="last will" if i == 2 else None)
        db.execute("INSERT INTO streams (stream, fleet, device, contiguous_seq, max_seq, lost, updated_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (stream, fleet, p.device, n, n, 0, now))
    add_alert(db, fleet, "cam-02", "drift", opened_at=now - 60, model_version="1", value=0.41, threshold=0.2,
              message="input drift: PSI 0.41 > 0.2 on channel 0 for 3 windows")
    add_alert(db, fleet, "cam-03", "offline", opened_at=now - windows * window_s / 2 + 30, model_version="2",
              message="device offline for 30 s (last will)", severity="critical")
    return {"devices": [p.device for p in profiles], "windows": stored}
