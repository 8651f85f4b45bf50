"""Staged rollout (issue 6): deterministic stages, and deployments judged from real telemetry windows.

Windows are schema-valid synthetic windows (``edge_sdk.testing.synthetic``) stored through the collector's own
ingest path (``Ingestor``) into a real SQLite (and PostgreSQL) database; commands go over the machine's real
Mosquitto, and a subscriber on the test's unique fleet checks who received what, retained or not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import postgres_db, sqlite_db
from mqtt_helpers import (
    SYSTEM_BROKER,
    Subscriber,
    mosquitto,  # noqa: F401 (a fixture)
    require_system_broker,
    unique_fleet,
    wait_until,
)

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main
from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer
from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher
from edge_sdk.fleet.lifecycle.registry import Registry
from edge_sdk.fleet.lifecycle.rollout import Rollout, RolloutError, Thresholds, parse_duration, parse_stages, stage_of
from edge_sdk.testing.synthetic import make_window, synthetic_baseline
from edge_sdk.topics import device_topic

T0 = 1_790_000_000.0  # windows and ticks use explicit times; the hold is 60 s
HOLD = 60.0
WINDOW_S = 10.0


# ---- stages ----------------------------------------------------------------------------------------------------

def test_stage_of_is_deterministic_and_proportional() -> None:
    ids = [f"device-{i:04d}" for i in range(1000)]
    stages = (5, 25, 100)
    first = [stage_of(d, stages) for d in ids]
    assert first == [stage_of(d, stages) for d in ids]  # same answer every time
    counts = Counter(first)
    assert 25 <= counts[0] <= 80, counts  # ~5 %
    assert 150 <= counts[0] + counts[1] <= 350, counts  # ~25 % cumulative
    assert sum(counts.values()) == 1000
    # the same devices go first whatever the later stages are: a device's bucket does not depend on them
    assert [stage_of(d, (5, 50, 100)) == 0 for d in ids] == [s == 0 for s in first]
    assert all(stage_of(d, (100,)) == 0 for d in ids)
    # and the 5 % are contained in the 25 % of another plan
    assert all(stage_of(d, (25, 100)) == 0 for d, s in zip(ids, first, strict=True) if s == 0)


def test_parse_stages_and_durations() -> None:
    assert parse_stages("5,25,100") == (5, 25, 100) and parse_stages([10, 100]) == (10, 100)
    for bad in ("5,25", "25,5,100", "0,100", "5,5,100", "a,100", "", "5,25,101"):
        with pytest.raises(RolloutError):
            parse_stages(bad)
    assert parse_duration("30s") == 30 and parse_duration("10m") == 600 and parse_duration("1h") == 3600
    assert parse_duration("90") == 90 and parse_duration(2.5) == 2.5 and parse_duration("1.5m") == 90
    for bad in ("10 minutes", "0s", "-5", "m"):
        with pytest.raises(RolloutError):
            parse_duration(bad)


# ---- a fleet of simulated devices writing windows into the database -----------------------------------------------

class FleetSim:
    """N devices of one fleet; each window goes through the collector's ingest path (validated, stored)."""

    def __init__(self, db: Any, fleet: str, n: int) -> None:
        self.db, self.fleet = db, fleet
        self.devices = [f"dev{i:03d}" for i in range(n)]
        self.ingestor = Ingestor(db)
        self.streams = {d: uuid.uuid4().hex for d in self.devices}
        self.seq = dict.fromkeys(self.devices, 0)
        self.rng = np.random.default_rng(7)
        self.baseline = synthetic_baseline()

    def version_of(self, deployment_id: str | None) -> Callable[[str], str]:
        """Devices run "2" once they were sent it by the deployment (and not rolled back), else "1"."""
        if deployment_id is None:
            return lambda d: "1"
        rows = self.db.query("SELECT device FROM deployment_devices WHERE deployment_id = ? AND rolled_back_at IS "
                             "NULL", (deployment_id,))
        updated = {r["device"] for r in rows}
        return lambda d: "2" if d in updated else "1"

    def emit(self, start: float, end: float, version_of: Callable[[str], str], bad: str | None = None) -> None:
        """Windows of WINDOW_S covering [start, end] for every device; ``bad`` spoils the version-2 windows."""
        msgs = []
        for d in self.devices:
            version = version_of(d)
            spoiled = bad if version == "2" else None
            t = start
            while t + WINDOW_S <= end + 1e-9:
                n = 50
                latency = self.rng.lognormal(np.log(12.0 * (3.0 if spoiled == "latency" else 1.0)), 0.2, n)
                conf = self.rng.beta(2, 5, n) if spoiled == "confidence" else self.rng.beta(8, 2, n)
                self.seq[d] += 1
                w = make_window(fleet=self.fleet, device=d, model={"name": "tiny", "version": version,
                                                                   "artifact": "onnx/fp32", "runtime": "onnxruntime"},
                                start=t, end=t + WINDOW_S, latencies_ms=latency, confidences=conf,
                                classes=self.rng.integers(0, 10, n),
                                inputs=[self.rng.normal(0, 1, 512) for _ in self.baseline], baseline=self.baseline,
                                stream=self.streams[d], seq=self.seq[d])
                msgs.append(Message(device_topic(self.fleet, d, "telemetry"), json.dumps(w).encode(), t + WINDOW_S))
                t += WINDOW_S
        result = self.ingestor.store_batch(msgs)
        assert result.stored == len(msgs) and result.dead_letters == 0, result


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny:1 and tiny:2, real ONNX bundles of the tiny CNN (two versions of one conversion)."""
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("rollout")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, out=d / "v1", name="tiny", version="1", quiet=True)
    v2 = Path(shutil.copytree(d / "v1", d / "v2"))
    b = Bundle.load(v2)
    b.manifest.version = "2"
    b.save()
    return d / "v1", v2


class Setup:
    """A database with tiny:1 active and tiny:2 promoted, a bundle server, a command publisher and a subscriber."""

    def __init__(self, db: Any, tmp: Path, bundles: tuple[Path, Path], n_devices: int, *,
                 broker: str = SYSTEM_BROKER) -> None:
        self.db, self.broker = db, broker
        self.fleet = unique_fleet("ro")
        self.registry = Registry(db, tmp / "store")
        self.v1 = self.registry.add(bundles[0])
        self.registry.activate("tiny", "1", "test fleet runs it")
        self.registry.add(bundles[1])
        # no holdout set registered: the gate cannot compare, so the promotion is forced (and recorded)
        promo = self.registry.promote("tiny", "2", force_reason="rollout test without a holdout set",
                                      allow_unsigned=True)  # unsigned bundles (issue 13: refused by default)
        assert promo.forced and promo.record.state == "canary"
        self.v2 = promo.record
        self.sim = FleetSim(db, self.fleet, n_devices)
        self.sim.emit(T0 - 2 * HOLD, T0, self.sim.version_of(None))  # history on version 1; registers the devices
        self.server = BundleHTTPServer(self.registry).start()
        self.publish = MqttCommandPublisher(broker, timeout=3.0)
        self.sub = Subscriber(broker, f"edge/{self.fleet}/+/cmd/#")
        self.rollout = Rollout(db, self.publish, self.server.url, allow_unsigned=True)

    def updates(self) -> dict[str, list[dict[str, Any]]]:
        """device -> the cmd/update payloads it received (empty payloads = cleared)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for m in self.sub.received():
            parts = m.topic.split("/")
            if parts[-1] == "update":
                out.setdefault(parts[2], []).append(json.loads(m.payload) if m.payload else {})
        return out

    def retained_updates(self) -> dict[str, dict[str, Any]]:
        """What a device connecting now would get: the retained cmd/update of each device of the fleet."""
        with Subscriber(self.broker, f"edge/{self.fleet}/+/cmd/update") as late:
            wait_until(lambda: False, 1.0)
            return {m.topic.split("/")[2]: json.loads(m.payload) for m in late.received() if m.retain}

    def sent(self, deployment_id: str) -> set[str]:
        return {r["device"] for r in self.db.query("SELECT device FROM deployment_devices WHERE deployment_id = ?",
                                                   (deployment_id,))}

    def close(self) -> None:
        for d in self.sim.devices:  # leave no retained commands behind on the shared broker
            self.publish(f"edge/{self.fleet}/{d}/cmd/update", b"", True)
        self.sub.close()
        self.publish.close()
        self.server.stop()


@pytest.fixture()
def setup(tmp_path: Path, bundles: tuple[Path, Path]) -> Iterator[Setup]:
    require_system_broker()
    with sqlite_db(tmp_path) as db:
        s = Setup(db, tmp_path, bundles, 40)
        try:
            yield s
        finally:
            s.close()


def command_validator() -> Callable[[dict[str, Any]], Any]:
    import fastjsonschema

    from edge_sdk.schema import load_schema

    return fastjsonschema.compile(load_schema("command"))


def run_healthy_rollout(s: Setup) -> str:
    dep_id = s.rollout.start("tiny", "2", s.fleet, stages=(5, 25, 100), hold_s=HOLD, now=T0)
    stage0 = s.sent(dep_id)
    expected0 = {d for d in s.sim.devices if stage_of(d, (5, 25, 100)) == 0}
    assert stage0 == expected0 or (not expected0 and len(stage0) == 1)
    assert s.rollout.tick(now=T0 + HOLD / 2) == []  # the stage is still held
    t = T0
    decisions = []
    for _ in range(3):
        s.sim.emit(t, t + HOLD, s.sim.version_of(dep_id))
        t += HOLD + 1.0
        decisions += s.rollout.tick(now=t)
    assert [d.decision for d in decisions] == ["advance", "advance", "complete"], [d.reason for d in decisions]
    return dep_id


def test_healthy_rollout_advances_5_25_100(setup: Setup) -> None:
    s = setup
    dep_id = run_healthy_rollout(s)
    dep = s.rollout.deployment(dep_id)
    assert dep["state"] == "completed" and dep["previous_version"] == "1"
    by_stage = Counter(r["stage_index"] for r in dep["devices_sent"])
    assert sum(by_stage.values()) == 40 and by_stage[0] >= 1 and by_stage[1] >= 1
    for r in dep["devices_sent"]:  # each device joined in its deterministic stage (or stage 0 on a tiny fleet)
        assert r["stage_index"] in (stage_of(r["device"], (5, 25, 100)), 0)
    kinds = [d["decision"] for d in dep["decisions"]]
    assert kinds == ["start", "advance", "advance", "complete"]
    for d in dep["decisions"][1:]:
        f = d["figures"]
        assert f["canary"]["windows"] >= 3 and f["reference"]["windows"] >= 3
        assert set(f["checks"]) == {"error_rate", "p95_ms", "confidence", "psi"}
        assert all(c["ok"] for c in f["checks"].values())
    # the last stage compares with version 1's windows from before the deployment (no one runs 1 any more)
    assert dep["decisions"][-1]["figures"]["reference"]["since"] == T0 - HOLD
    assert s.registry.show("tiny", "2").state == "active" and s.registry.show("tiny", "1").state == "retired"
    # every device got exactly one schema-valid cmd/update for version 2, pointing at a working download
    assert wait_until(lambda: sum(len(v) for v in s.updates().values()) == 40)
    updates = s.updates()
    validate = command_validator()
    assert set(updates) == set(s.sim.devices)
    for payloads in updates.values():
        [p] = payloads
        validate(p)
        assert p["command"] == "update" and p["deployment_id"] == dep_id
        assert p["model"] == {"name": "tiny", "version": "2", "url": f"{s.server.url}/bundles/tiny/2.tar.gz",
                              "sha256": s.v2.bundle_sha256, "size_bytes": s.v2.size_bytes}
    with urllib.request.urlopen(p["model"]["url"], timeout=10) as resp:
        assert hashlib.sha256(resp.read()).hexdigest() == s.v2.bundle_sha256
    assert s.rollout.tick(now=T0 + 10 * HOLD) == []  # nothing left to judge
    # a completed deployment can still be rolled back by hand: every device is sent version 1 again
    decision = s.rollout.rollback("tiny", s.fleet, reason="customer complaint", now=T0 + 11 * HOLD)
    assert decision.decision == "rollback" and len(decision.figures["rolled_back_devices"]) == 40
    retained = s.retained_updates()
    assert set(retained) == set(s.sim.devices) and {p["model"]["version"] for p in retained.values()} == {"1"}
    assert s.registry.active("tiny").version == "1" and s.registry.show("tiny", "2").state == "retired"


@pytest.mark.parametrize("bad", ["confidence", "latency"])
def test_bad_version_rolls_back_at_canary_stage(setup: Setup, bad: str) -> None:
    s = setup
    dep_id = s.rollout.start("tiny", "2", s.fleet, stages=(5, 25, 100), hold_s=HOLD, now=T0)
    canary = s.sent(dep_id)
    assert 1 <= len(canary) < 10
    s.sim.emit(T0, T0 + HOLD, s.sim.version_of(dep_id), bad=bad)
    [decision] = s.rollout.tick(now=T0 + HOLD + 1)
    assert decision.decision == "rollback" and decision.stage_index == 0
    check = {"confidence": "confidence", "latency": "p95_ms"}[bad]
    assert decision.figures["checks"][check]["ok"] is False, decision.figures["checks"]
    assert check in decision.reason and decision.figures["rolled_back_devices"] == sorted(canary)
    if bad == "latency":
        ratio = decision.figures["canary"]["p95_ms"] / decision.figures["reference"]["p95_ms"]
        assert 2.5 < ratio < 3.5
    dep = s.rollout.deployment(dep_id)
    assert dep["state"] == "rolled_back" and [d["decision"] for d in dep["decisions"]] == ["start", "rollback"]
    assert s.registry.show("tiny", "2").state == "retired" and s.registry.show("tiny", "1").state == "active"
    # only the canary devices ever got a cmd/update: version 2, then version 1 again
    assert wait_until(lambda: sum(len(v) for v in s.updates().values()) == 2 * len(canary))
    updates = s.updates()
    assert set(updates) == canary
    assert all([p["model"]["version"] for p in v] == ["2", "1"] for v in updates.values())
    validate = command_validator()
    for v in updates.values():
        for p in v:
            validate(p)
    # a device connecting now sees version 1 as its desired model; devices outside the canary see nothing
    retained = s.retained_updates()
    assert set(retained) == canary
    assert {p["model"]["version"] for p in retained.values()} == {"1"}
    assert {p["model"]["sha256"] for p in retained.values()} == {s.v1.bundle_sha256}
    assert s.rollout.tick(now=T0 + 5 * HOLD) == []


def test_no_canary_telemetry_holds_then_halts(setup: Setup) -> None:
    s = setup
    dep_id = s.rollout.start("tiny", "2", s.fleet, hold_s=HOLD, now=T0)
    s.sim.emit(T0, T0 + HOLD, lambda d: "1")  # the canary devices never switch
    [d1] = s.rollout.tick(now=T0 + HOLD + 1)
    assert d1.decision == "hold" and "0/3 windows" in d1.reason
    assert s.rollout.tick(now=T0 + HOLD + 30) == []  # next check one hold later
    [d2] = s.rollout.tick(now=T0 + 2 * HOLD + 2)
    assert d2.decision == "hold"
    [d3] = s.rollout.tick(now=T0 + 3 * HOLD + 3)
    assert d3.decision == "halt" and "not enough telemetry" in d3.reason
    dep = s.rollout.deployment(dep_id)
    assert dep["state"] == "halted" and len(dep["devices_sent"]) == len(s.sent(dep_id)) < 10
    assert s.registry.show("tiny", "2").state == "canary"  # a halt decides nothing about the version
    # a halted deployment is rolled back by hand
    decision = s.rollout.rollback("tiny", s.fleet, now=T0 + 4 * HOLD)
    assert decision.decision == "rollback" and "by hand" in decision.reason
    assert set(s.retained_updates()) == s.sent(dep_id)


def test_update_failures_halt(setup: Setup) -> None:
    s = setup
    dep_id = s.rollout.start("tiny", "2", s.fleet, hold_s=HOLD, now=T0)
    failed = sorted(s.sent(dep_id))[0]
    event = {"schema": "edge-sdk/event", "schema_version": "1.0", "event_id": uuid.uuid4().hex, "fleet": s.fleet,
             "device": failed, "ts": T0 + 5, "kind": "update.failed", "level": "error",
             "data": {"step": "verify", "reason": "bundle is unsigned", "deployment_id": dep_id}}
    r = s.sim.ingestor.store_batch([Message(device_topic(s.fleet, failed, "events"), json.dumps(event).encode(),
                                            T0 + 5)])
    assert r.events == 1
    s.sim.emit(T0, T0 + HOLD, s.sim.version_of(dep_id))
    [d] = s.rollout.tick(now=T0 + HOLD + 1)
    assert d.decision == "halt" and "update.failed" in d.reason and d.figures["update_failed_devices"] == [failed]


def test_start_refusals(setup: Setup) -> None:
    s = setup
    with pytest.raises(RolloutError) as exc:
        s.rollout.start("tiny", "2", "other-fleet", now=T0)
    assert "no device of fleet other-fleet runs tiny" in str(exc.value)
    s.registry.set_state("tiny", "2", "candidate", "test: not promoted")
    with pytest.raises(RolloutError) as exc:
        s.rollout.start("tiny", "2", s.fleet, now=T0)
    assert "registry promote tiny 2" in str(exc.value)
    s.registry.set_state("tiny", "2", "canary", "test: promoted again")
    dep_id = s.rollout.start("tiny", "2", s.fleet, now=T0)
    with pytest.raises(RolloutError) as exc:
        s.rollout.start("tiny", "2", s.fleet, now=T0 + 1)
    assert dep_id in str(exc.value) and "still running" in str(exc.value)
    with pytest.raises(RolloutError):
        Rollout(s.db, s.publish).start("tiny", "2", s.fleet)  # no base URL
    assert Rollout.model_url("https://cdn.example/m/{name}-{version}.tgz", "tiny", "2") == \
        "https://cdn.example/m/tiny-2.tgz"


def test_thresholds_are_stored_with_the_deployment(setup: Setup) -> None:
    s = setup
    strict = Rollout(s.db, s.publish, s.server.url, thresholds=Thresholds(min_windows=10_000), allow_unsigned=True)
    dep_id = strict.start("tiny", "2", s.fleet, hold_s=HOLD, now=T0)
    s.sim.emit(T0, T0 + HOLD, s.sim.version_of(dep_id))
    [d] = s.rollout.tick(now=T0 + HOLD + 1)  # another Rollout (the collector's) judges by the stored thresholds
    assert d.decision == "hold" and "/10000 windows" in d.reason


def test_cli_deploy_and_rollback(tmp_path: Path, bundles: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    require_system_broker()
    fleet = unique_fleet("cli")
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = str(tmp_path / "store")
    for b in bundles:
        assert main(["registry", "add", str(b), "--db", db_url, "--store", store]) == 0
    # unsigned test bundles: refused without --allow-unsigned (issue 13), promoted with it
    assert main(["registry", "promote", "tiny", "1", "--db", db_url]) == 2
    assert "unsigned" in capsys.readouterr().err
    assert main(["registry", "promote", "tiny", "1", "--db", db_url, "--allow-unsigned"]) == 0  # nothing to compare
    out = capsys.readouterr().out
    assert "tiny:1 promoted to canary" in out and "no active version" in out
    devices = ["cam-a", "cam-b", "cam-c"]
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/cmd/#") as sub:
        deploy = ["deploy", "tiny", "1", "--fleet", fleet, "--hold", "30s", "--devices", ",".join(devices),
                  "--db", db_url, "--base-url", "http://bundles.local:8081"]
        assert main(deploy) == 2 and "unsigned" in capsys.readouterr().err  # nothing sent
        code = main([*deploy, "--allow-unsigned"])
        out = capsys.readouterr().out
        assert code == 0 and "stage 1 sent to" in out
        dep_id = out.split()[1].rstrip(":")
        with sqlite_db(tmp_path) as db:
            sent = {r["device"] for r in db.query("SELECT device FROM deployment_devices WHERE deployment_id = ?",
                                                  (dep_id,))}
            assert sent and sent <= set(devices)
            assert db.query("SELECT hold_s, stages FROM deployments WHERE id = ?", (dep_id,)) == [
                {"hold_s": 30.0, "stages": "5,25,100"}]
        assert wait_until(lambda: len(sub.received()) == len(sent))
        assert {m.topic.split("/")[2] for m in sub.received()} == sent
        assert all(json.loads(m.payload)["model"]["url"] == "http://bundles.local:8081/bundles/tiny/1.tar.gz"
                   for m in sub.received())
        # no previous version in the registry: the rollback clears the desired model and sends cmd/rollback
        assert main(["rollback", "tiny", "--fleet", fleet, "--db", db_url, "--reason", "operator said so"]) == 0
        assert "rolled back: operator said so" in capsys.readouterr().out
        assert wait_until(lambda: len(sub.received()) == 3 * len(sent))
        rollbacks = [m for m in sub.received() if m.topic.endswith("/cmd/rollback")]
        assert {m.topic.split("/")[2] for m in rollbacks} == sent and not any(m.retain for m in rollbacks)
        assert all(json.loads(m.payload)["reason"] == "operator said so" for m in rollbacks)
        cleared = [m for m in sub.received() if m.topic.endswith("/cmd/update") and m.payload == b""]
        assert len(cleared) == len(sent)
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/cmd/update") as late:
        wait_until(lambda: False, 1.0)
        assert late.received() == []  # nothing retained any more
    assert main(["rollback", "tiny", "--fleet", fleet, "--db", db_url]) == 2
    assert "no deployment of tiny" in capsys.readouterr().err


def test_broker_outage_during_an_advance_is_retried(tmp_path: Path, bundles: tuple[Path, Path],
                                                    mosquitto: Any) -> None:  # noqa: F811
    with sqlite_db(tmp_path) as db:
        s = Setup(db, tmp_path, bundles, 40, broker=mosquitto.url)
        try:
            dep_id = s.rollout.start("tiny", "2", s.fleet, stages=(5, 25, 100), hold_s=HOLD, now=T0)
            stage0 = s.sent(dep_id)
            s.sim.emit(T0, T0 + HOLD, s.sim.version_of(dep_id))
            mosquitto.stop()
            assert s.rollout.tick(now=T0 + HOLD + 1) == []  # the advance could not be sent: retried later
            dep = s.rollout.deployment(dep_id)
            assert dep["stage_index"] == 1 and [d["decision"] for d in dep["decisions"]] == ["start", "advance"]
            assert s.sent(dep_id) == stage0  # nothing is recorded as sent that the broker did not acknowledge
            mosquitto.start()
            assert wait_until(lambda: s.publish.connected, 15)
            assert s.rollout.tick(now=T0 + HOLD + 10) == []  # not due yet
            assert s.rollout.tick(now=T0 + HOLD + 32) == []  # sends the rest of stage 1; its hold is not over
            expected = {d for d in s.sim.devices if stage_of(d, (5, 25, 100)) <= 1} | stage0
            assert s.sent(dep_id) == expected
            assert set(s.retained_updates()) == expected  # retained on the restarted broker
        finally:
            s.close()


def test_healthy_rollout_on_postgresql(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    pytest.importorskip("psycopg")
    require_system_broker()
    with postgres_db("edge_rollout") as db:
        s = Setup(db, tmp_path, bundles, 30)
        try:
            dep_id = run_healthy_rollout(s)
            assert s.rollout.deployment(dep_id)["state"] == "completed"
            assert s.registry.active("tiny").version == "2"
        finally:
            s.close()


def test_sub_millisecond_p95_jitter_is_not_a_latency_regression() -> None:
    """A healthy canary measured 0.81 ms p95 against 0.47 ms on a shared CPU (1.7x): within the 1 ms slack. A real
    regression is still caught, at sub-ms and at tens of ms."""
    from edge_sdk.fleet.lifecycle.canary import Thresholds, health_checks

    def p95(canary: float, ref: float) -> bool:
        figs = {"error_rate": None, "p95_ms": None, "conf_mean": None, "psi_mean": None}
        return health_checks({**figs, "p95_ms": canary}, {**figs, "p95_ms": ref}, Thresholds())["p95_ms"]["ok"]

    assert p95(0.81, 0.47)
    assert not p95(1.6, 0.47)
    assert p95(17.0, 12.0) and not p95(36.0, 12.0)
