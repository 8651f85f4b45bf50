"""Alert rules on a real SQLite fleet database filled through the collector's storing path: each rule fires once
and resolves, notifications are grouped per rule and fleet (1,000 devices offline at once = one notification) and
POSTed to a real local HTTP server in Alertmanager's webhook format (v4), and the rules file is checked key by key."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from collector_helpers import payload_bytes, pg_url, status, wait_until, window

from edge_sdk.fleet.collector.alerts import AlertEngine, ConfigError, load_rules
from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.db import Database

FLEET, DEV = "fa", "cam1"
STREAM = "ab" * 16


class Fleet:
    """A migrated database plus a device that emits one window every 10 s of fake time."""

    def __init__(self, path: Path | str) -> None:
        self.db = Database.connect(path if isinstance(path, str) else f"sqlite:///{path}")
        self.db.migrate()
        self.ingestor = Ingestor(self.db)
        self.now = time.time() - 3600
        self.seq = 0

    def windows(self, n: int, **kw: Any) -> None:
        batch = []
        for _ in range(n):
            self.seq += 1
            self.now += 10
            batch.append(Message(f"edge/{FLEET}/{DEV}/telemetry",
                                 payload_bytes(window(FLEET, DEV, seq=self.seq, stream=STREAM, end=self.now, **kw)),
                                 self.now + 0.5))
        self.ingestor.store_batch(batch)

    def status(self, state: str) -> None:
        self.now += 1
        self.ingestor.store_batch([Message(f"edge/{FLEET}/{DEV}/status",
                                           payload_bytes(status(FLEET, DEV, state, ts=self.now)), self.now)])

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE state = ?", (state,)) if state else ("", ())
        return self.db.query(f"SELECT * FROM alerts {where} ORDER BY id", params)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet.db")
    yield f
    f.db.close()


def _rules(tmp_path: Path, text: str):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return load_rules(path)


def _only(tmp_path: Path, rule: str, extra: str = "", notify: str = "") -> Any:
    """Rules with every rule but ``rule`` disabled; ``extra`` lines go into the section of ``rule``, ``notify`` lines
    into [notify]."""
    names = ("drift", "latency_sla", "error_rate", "confidence_drop", "offline")
    return _rules(tmp_path, "\n".join(f"[{n}]\nenabled = {'true' if n == rule else 'false'}\n"
                                      + (extra if n == rule else "") for n in names) + f"\n[notify]\n{notify}")


def _cycle(fleet: Fleet, engine: AlertEngine, rule: str, normal: dict, bad: dict, *, before: int = 10) -> None:
    """normal windows: no alert; bad windows: one open alert (not duplicated); normal again: resolved."""
    fleet.windows(before, **normal)
    assert engine.evaluate(now=fleet.now) == []
    fleet.windows(3, **bad)
    opened = engine.evaluate(now=fleet.now)
    assert [(c.action, c.rule, c.device) for c in opened] == [("opened", rule, DEV)]
    fleet.windows(1, **bad)
    assert engine.evaluate(now=fleet.now) == []  # still firing: no second alert
    assert len(fleet.alerts("open")) == 1
    fleet.windows(3, **normal)
    resolved = engine.evaluate(now=fleet.now)
    assert [(c.action, c.rule, c.id) for c in resolved] == [("resolved", rule, opened[0].id)]
    rows = fleet.alerts()
    assert len(rows) == 1 and rows[0]["state"] == "resolved" and rows[0]["resolved_at"] == pytest.approx(fleet.now)
    assert rows[0]["rule"] == rule and rows[0]["model_version"] == "1.0" and rows[0]["message"]


def test_drift_by_votes_without_a_baseline(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "drift"))
    _cycle(fleet, engine, "drift", dict(psi=0.03), dict(psi=0.9))
    assert "votes" in fleet.alerts()[0]["message"]


def test_drift_pooled_against_the_bundle_baseline(fleet: Fleet, tmp_path: Path) -> None:
    fractions = [0.05] * 20
    baseline = {"input_channels": [{"hist_edges": list(range(21)), "hist_fractions": fractions}] * 3}
    engine = AlertEngine(fleet.db, _only(tmp_path, "drift"), baselines={("net", "1.0"): baseline})
    even = [5] * 20          # matches the baseline: PSI 0
    dark = [60] + [2] * 19   # mass in the lowest bin: PSI > 1
    # psi=0.9 on every window: pooled mode ignores the device's per-window figure and uses the counts
    _cycle(fleet, engine, "drift", dict(psi=0.9, channel_counts=even, count=100),
           dict(psi=0.0, channel_counts=dark, count=100))
    row = fleet.alerts()[0]
    assert "pooled" in row["message"] and row["value"] > 1.0 and row["threshold"] == 0.2


def test_p95_latency_over_the_sla(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "latency_sla", "p95_ms = 100.0"))
    slow = [20.0] * 40 + [400.0] * 10   # p95 of each window ~400 ms
    _cycle(fleet, engine, "latency_sla", dict(latency_ms=20.0), dict(latency_ms=slow))
    assert fleet.alerts()[0]["value"] == pytest.approx(400.0, rel=0.02)


def test_error_rate_spike_against_the_devices_own_rate(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "error_rate"))
    _cycle(fleet, engine, "error_rate", dict(count=100, errors={"runtime": 1}), dict(count=80, errors={"runtime": 20}))
    assert fleet.alerts()[0]["value"] == pytest.approx(0.2)
    # a device that always runs at 8% errors (over the absolute 5%) does not "spike"
    quiet = AlertEngine(fleet.db, _only(tmp_path, "error_rate"))
    fleet.windows(20, count=92, errors={"input": 8})
    assert [c for c in quiet.evaluate(now=fleet.now) if c.action == "opened"] == []


def test_a_burst_of_client_errors_opens_no_error_rate_alert(fleet: Fleet, tmp_path: Path) -> None:
    """Garbage requests (HTTP 4xx: bad body, undecodable image) are the client's errors, not the model's."""
    engine = AlertEngine(fleet.db, _only(tmp_path, "error_rate"))
    fleet.windows(10, count=100, errors={"runtime": 1})
    assert engine.evaluate(now=fleet.now) == []
    fleet.windows(4, count=50, errors={"input": 40, "preprocess": 10})  # 50% of requests refused as bad input
    assert [c for c in engine.evaluate(now=fleet.now) if c.action == "opened"] == []
    fleet.windows(4, count=50, errors={"runtime": 50})  # the same burst from the runtime does open one
    assert [(c.action, c.rule) for c in engine.evaluate(now=fleet.now)] == [("opened", "error_rate")]


def test_confidence_drop_below_the_trailing_mean(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "confidence_drop"))
    _cycle(fleet, engine, "confidence_drop", dict(conf_mean=0.9), dict(conf_mean=0.55))
    row = fleet.alerts()[0]
    assert row["value"] == pytest.approx(0.55) and row["threshold"] == pytest.approx(0.75)


def test_device_offline_by_status_and_by_silence(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "offline"))
    fleet.status("online")
    fleet.windows(2)
    assert engine.evaluate(now=fleet.now) == []
    fleet.status("offline")
    assert [c.action for c in engine.evaluate(now=fleet.now)] == ["opened"]
    assert engine.evaluate(now=fleet.now + 1) == []
    fleet.status("online")
    fleet.windows(1)
    assert [c.action for c in engine.evaluate(now=fleet.now)] == ["resolved"]
    # silence: 3 windows of 10 s (the status' window_s) without a message
    assert engine.evaluate(now=fleet.now + 25) == []
    assert [c.action for c in engine.evaluate(now=fleet.now + 40)] == ["opened"]
    assert "no message" in fleet.alerts("open")[0]["message"]
    # a collector that just started does not judge silence before it could receive the backlog
    assert AlertEngine(fleet.db, _only(tmp_path, "offline")).evaluate(
        now=fleet.now + 40, collector_started=fleet.now + 35) == []


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_two_engines_on_one_database_open_one_alert(dialect: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_url()) if dialect == "postgresql" else f"sqlite:///{tmp_path / 'f.db'}"
        fleet = Fleet(url)
        stack.callback(fleet.db.close)
        rules = _only(tmp_path, "drift")
        fleet.windows(3, psi=0.9)
        # separate Database objects, as separate collector processes would have (PostgreSQL: advisory lock)
        dbs = [Database.connect(url) for _ in range(4)]
        for db in dbs:
            stack.callback(db.close)
        engines = [AlertEngine(db, rules) for db in dbs]
        threads = [threading.Thread(target=e.evaluate, kwargs={"now": fleet.now}) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(fleet.alerts("open")) == 1


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append(body)
        self.server.release.wait(10)
        self.send_response(self.server.code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received, server.release, server.code = [], threading.Event(), 200
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()


def test_webhook_gets_opened_and_resolved_alerts_without_blocking(fleet: Fleet, tmp_path: Path,
                                                                  hook: ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
    rules = _only(tmp_path, "drift", notify="group_wait_s = 0\ngroup_interval_s = 1\n")
    engine = AlertEngine(fleet.db, rules, webhook=url, external_url="http://collector:8000")
    try:
        fleet.windows(3, psi=0.9)
        opened = engine.evaluate(now=fleet.now)  # returns while the webhook still holds the request
        assert len(opened) == 1
        assert wait_until(lambda: len(hook.received) == 1)
        assert fleet.alerts()[0]["webhook_status"] is None  # the POST has not finished yet
        hook.release.set()
        assert wait_until(lambda: fleet.alerts()[0]["webhook_status"] == "sent 200")
        body = hook.received[0]
        check_alertmanager_v4(body)
        assert body["status"] == "firing" and body["groupLabels"] == {"alertname": "drift", "fleet": FLEET}
        assert body["externalURL"] == "http://collector:8000"
        [alert] = body["alerts"]
        assert alert["labels"] == {"alertname": "drift", "fleet": FLEET, "device": DEV, "severity": "warning",
                                   "model": "net", "model_version": "1.0"}
        assert alert["endsAt"] == "0001-01-01T00:00:00Z" and "votes" in alert["annotations"]["description"]
        hook.code = 500
        fleet.windows(3, psi=0.01)
        engine.evaluate(now=fleet.now)
        assert wait_until(lambda: fleet.alerts()[0]["webhook_status"] == "failed: HTTP 500")
        resolved = hook.received[1]
        check_alertmanager_v4(resolved)
        assert resolved["status"] == "resolved" and resolved["alerts"][0]["status"] == "resolved"
        assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
        assert resolved["alerts"][0]["endsAt"] > resolved["alerts"][0]["startsAt"]
    finally:
        engine.close()


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def check_alertmanager_v4(body: dict[str, Any]) -> None:
    """Keys and types of Alertmanager's webhook payload, version 4 (and nothing else at the top level)."""
    assert set(body) == {"version", "status", "receiver", "groupKey", "groupLabels", "commonLabels",
                         "commonAnnotations", "externalURL", "truncatedAlerts", "alerts"}, sorted(body)
    assert body["version"] == "4" and body["status"] in ("firing", "resolved") and body["receiver"] == "edge-sdk"
    assert isinstance(body["groupKey"], str) and isinstance(body["externalURL"], str)
    assert isinstance(body["truncatedAlerts"], int) and body["truncatedAlerts"] >= 0
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        assert isinstance(body[key], dict) and all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in body[key].items()), key
    assert body["commonLabels"].items() >= body["groupLabels"].items()
    assert isinstance(body["alerts"], list) and body["alerts"]
    for a in body["alerts"]:
        assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
        assert a["status"] in ("firing", "resolved")
        assert all(isinstance(v, str) for v in (*a["labels"].values(), *a["annotations"].values()))
        assert a["labels"].items() >= body["commonLabels"].items()
        assert {"alertname", "fleet", "device", "severity"} <= set(a["labels"])
        assert _RFC3339.match(a["startsAt"]) and _RFC3339.match(a["endsAt"])
        assert (a["endsAt"] == "0001-01-01T00:00:00Z") == (a["status"] == "firing")
        assert re.fullmatch(r"[0-9a-f]{16}", a["fingerprint"]) and isinstance(a["generatorURL"], str)


def test_a_thousand_devices_offline_at_once_are_one_grouped_notification(
        tmp_path: Path, hook: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: 1,000 devices stop together -> ONE grouped firing notification (one log line, one webhook in
    Alertmanager's format) and, when they are back, ONE resolved notification; the per-device rows stay."""
    n, fleet_name = 1000, "outage"
    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate()
    ingestor = Ingestor(db)
    names = [f"cam-{i:04d}" for i in range(n)]
    t = time.time() - 3600

    def statuses(state: str, at: float) -> None:
        ingestor.store_batch([Message(f"edge/{fleet_name}/{d}/status",
                                      payload_bytes(status(fleet_name, d, state, ts=at)), at) for d in names])

    hook.release.set()
    url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    rules = _only(tmp_path, "offline", notify="group_wait_s = 30\ngroup_interval_s = 120\nmax_alerts = 50\n")
    engine = AlertEngine(db, rules, webhook=url)
    caplog.set_level(logging.DEBUG, logger="edge_sdk.fleet.collector.alerts")
    try:
        statuses("online", t)
        ingestor.store_batch([Message(f"edge/{fleet_name}/{d}/telemetry", payload_bytes(window(
            fleet_name, d, seq=1, end=t + 5)), t + 5) for d in names])
        assert engine.evaluate(now=t + 6) == []
        statuses("offline", t + 60)  # every device's last will, within one batch: a fleet-wide outage
        t0 = time.perf_counter()
        opened = engine.evaluate(now=t + 61)
        evaluate_s = time.perf_counter() - t0
        assert len(opened) == n and len(db.query("SELECT id FROM alerts WHERE state = 'open'")) == n
        assert engine.evaluate(now=t + 80) == [] and hook.received == []  # group_wait: nothing sent yet
        engine.evaluate(now=t + 92)  # 31 s after the group began
        assert wait_until(lambda: len(hook.received) == 1)
        firing = hook.received[0]
        check_alertmanager_v4(firing)
        assert firing["status"] == "firing" and firing["groupLabels"] == {"alertname": "offline", "fleet": fleet_name}
        assert len(firing["alerts"]) == 50 and firing["truncatedAlerts"] == n - 50
        assert firing["commonLabels"] == {"alertname": "offline", "fleet": fleet_name, "severity": "critical",
                                          "model": "net", "model_version": "1.0"}
        assert firing["commonAnnotations"]["summary"] == f"devices offline in fleet {fleet_name}"
        assert {a["labels"]["device"] for a in firing["alerts"]} == set(names[:50])
        assert len({a["fingerprint"] for a in firing["alerts"]}) == 50
        for later in (t + 120, t + 200, t + 230):  # still offline: nothing new to say
            assert engine.evaluate(now=later) == []
        statuses("online", t + 250)  # all back, more than group_interval after the firing notification
        assert len([c for c in engine.evaluate(now=t + 251) if c.action == "resolved"]) == n
        assert wait_until(lambda: len(hook.received) == 2)
        resolved = hook.received[1]
        check_alertmanager_v4(resolved)
        assert resolved["status"] == "resolved" and resolved["groupKey"] == firing["groupKey"]
        assert len(resolved["alerts"]) + resolved["truncatedAlerts"] == n
        assert all(a["status"] == "resolved" for a in resolved["alerts"])
        for later in (t + 255, t + 265):  # the group is closed: no more notifications
            assert engine.evaluate(now=later) == []
        time.sleep(0.2)
        assert len(hook.received) == 2
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert len(lines) == 2, lines[:5]
        assert lines[0].startswith(f"alerts firing: offline in fleet {fleet_name}: 1000 firing: cam-0000, ")
        assert lines[0].endswith("and 995 more") and lines[1].startswith("alerts resolved: offline")
        assert wait_until(lambda: db.query("SELECT COUNT(*) AS n FROM alerts WHERE webhook_status = 'sent 200'")[0]
                          ["n"] == n)
        print(f"\n{n} devices offline: {len(opened)} alert rows, evaluation {evaluate_s:.2f} s, 1 firing + 1 resolved "
              f"webhook ({len(json.dumps(firing))} bytes), {len(lines)} log lines")
    finally:
        engine.close()
        db.close()


def test_unreachable_webhook_is_recorded_as_failed(fleet: Fleet, tmp_path: Path) -> None:
    engine = AlertEngine(fleet.db, _only(tmp_path, "drift", notify="group_wait_s = 0\n"),
                         webhook="http://127.0.0.1:1/hook")
    try:
        fleet.windows(3, psi=0.9)
        assert len(engine.evaluate(now=fleet.now)) == 1
        assert wait_until(lambda: (fleet.alerts()[0]["webhook_status"] or "").startswith("failed:"))
    finally:
        engine.close()


def test_rules_file_overrides_and_bad_keys(tmp_path: Path) -> None:
    rules = _rules(tmp_path, "interval_s = 2\n[latency_sla]\np95_ms = 80\n[drift]\nmethod = 'votes'\n"
                   "[notify]\ngroup_wait_s = 0\n")
    assert rules.interval_s == 2.0 and rules.latency_sla.p95_ms == 80.0 and rules.drift.method == "votes"
    assert rules.notify.group_wait_s == 0 and rules.notify.group_interval_s == 300.0 and rules.notify.max_alerts == 100
    assert rules.drift.threshold == 0.2 and rules.error_rate.threshold == 0.05  # the shipped defaults
    for text, key in (("[drift]\nthreshhold = 0.3\n", "drift.threshhold"),
                      ("[drift]\nthreshold = 'high'\n", "drift.threshold"),
                      ("[latency_sla]\nwindows = 2.5\n", "latency_sla.windows"),
                      ("[offline]\nenabled = 1\n", "offline.enabled"),
                      ("[nosuch]\nx = 1\n", "nosuch"),
                      ("[drift]\nseverity = 'loud'\n", "drift.severity"),
                      ("[drift]\nwindows = 2\nmin_windows = 3\n", "drift.min_windows"),
                      ("[notify]\ngroup_interval_s = 0\n", "notify.group_interval_s"),
                      ("[notify]\nmax_alerts = 1.5\n", "notify.max_alerts"),
                      ("interval_s = -1\n", "interval_s")):
        with pytest.raises(ConfigError) as info:
            _rules(tmp_path, text)
        assert key in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match="not valid TOML"):
        _rules(tmp_path, "[drift\n")
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "missing.toml")
