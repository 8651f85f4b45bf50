"""The fleet collector against the real Mosquitto at 127.0.0.1:1883 (a unique fleet per test), storing into real
SQLite and PostgreSQL databases: idempotent storing, dead letters, device status, gap repair, restarts, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector_helpers import (
    MQTT_URL,
    MqttPeer,
    event,
    payload_bytes,
    status,
    wait_until,
    window,
)

from edge_sdk.fleet.collector.service import Collector, CollectorError
from edge_sdk.fleet.collector.validate import SCHEMA_DIR
from edge_sdk.fleet.db import Database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fleet() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _collector(db_url: str, fleet: str, **kw) -> Collector:
    kw = {"client_id": f"col-{fleet}", "session_expiry_s": 60, "gap_grace_s": 0.5, "resend_interval_s": 1.0,
          "alert_interval_s": 3600, **kw}
    col = Collector(db_url, MQTT_URL, fleet=fleet, **kw)
    col.start(wait_s=10)
    time.sleep(0.3)  # SUBACK
    return col


@pytest.fixture
def peer() -> Iterator[MqttPeer]:
    p = MqttPeer()
    yield p
    p.close()


def _count(db: Database, table: str, where: str = "", params: tuple = ()) -> int:
    return db.query(f"SELECT COUNT(*) AS n FROM {table} {where}", params)[0]["n"]


def test_windows_are_stored_once_even_when_published_twice(db_url: str, fleet: str, peer: MqttPeer) -> None:
    col = _collector(db_url, fleet)
    try:
        stream = uuid.uuid4().hex
        windows = [window(fleet, "cam1", seq=i, stream=stream, count=40 + i) for i in range(1, 21)]
        for _ in range(2):
            for w in windows:
                peer.publish(f"edge/{fleet}/cam1/telemetry", w)
        assert wait_until(lambda: col.stats()["stored"] + col.stats()["duplicates"] >= 40)
        assert _count(col.db, "windows", "WHERE fleet = ?", (fleet,)) == 20
        stats = col.stats()
        assert stats["stored"] == 20 and stats["duplicates"] == 20 and stats["dead_letters"] == 0
        assert stats["acked"] == 40 and stats["lag_max_s"] >= 0
        rows = col.db.query("SELECT seq, count, payload FROM windows WHERE fleet = ? ORDER BY seq", (fleet,))
        assert [r["seq"] for r in rows] == list(range(1, 21))
        assert [r["count"] for r in rows] == [40 + i for i in range(1, 21)]
        assert json.loads(rows[0]["payload"])["window_id"] == windows[0]["window_id"]
        s = col.db.query("SELECT contiguous_seq, max_seq, lost FROM streams WHERE stream = ?", (stream,))[0]
        assert (s["contiguous_seq"], s["max_seq"], s["lost"]) == (20, 20, 0)
        dev = col.db.query("SELECT model_name, model_version, last_seen FROM devices WHERE fleet = ?", (fleet,))
        assert dev[0]["model_name"] == "net" and dev[0]["last_seen"] > time.time() - 60
    finally:
        col.stop()


@pytest.mark.parametrize("store_process", [True, False], ids=["store-process", "store-thread"])
def test_malformed_payloads_go_to_dead_letters_with_their_reason(sqlite_url: str, fleet: str, peer: MqttPeer,
                                                                 store_process: bool) -> None:
    col = _collector(sqlite_url, fleet, store_process=store_process)
    try:
        good = window(fleet, "cam1")
        bad = {
            b"\xff\xfe not utf-8": "not UTF-8",
            b'{"truncated": ': "not valid JSON",
            payload_bytes({**good, "count": "many"}): "field count",
            payload_bytes({**window(fleet, "cam2"), "device": "cam2"}): "differs from the topic's device",
            payload_bytes(good).replace(b'"dropped_windows":0', b'"dropped_windows":NaN'): "NaN",
            payload_bytes({k: v for k, v in good.items() if k != "model"}): "model",
        }
        for payload in bad:
            peer.publish(f"edge/{fleet}/cam1/telemetry", payload)
        peer.publish(f"edge/{fleet}/cam1/telemetry", good)  # the collector is still alive and storing
        assert wait_until(lambda: col.stats()["dead_letters"] == len(bad) and col.stats()["stored"] == 1)
        rows = col.db.query("SELECT topic, reason, payload FROM dead_letters ORDER BY id")
        assert len(rows) == len(bad)
        for row, (payload, expected) in zip(rows, bad.items(), strict=True):
            assert expected in row["reason"], (row["reason"], expected)
            assert bytes(row["payload"]) == payload and row["topic"] == f"edge/{fleet}/cam1/telemetry"
            assert "\n" not in row["reason"]
    finally:
        col.stop()


def test_status_messages_set_devices_online_and_offline(sqlite_url: str, fleet: str, peer: MqttPeer) -> None:
    col = _collector(sqlite_url, fleet)
    try:
        t0 = time.time()
        peer.publish(f"edge/{fleet}/cam1/status", status(fleet, "cam1", "online", ts=t0, model=("det", "2.1")))
        peer.publish(f"edge/{fleet}/cam2/status", status(fleet, "cam2", "online", ts=t0))
        peer.publish(f"edge/{fleet}/cam2/status", status(fleet, "cam2", "offline", ts=t0 + 5))
        peer.publish(f"edge/{fleet}/cam2/status", status(fleet, "cam2", "online", ts=t0 + 1))  # late, older: ignored
        assert wait_until(lambda: col.stats()["statuses"] == 4)
        devs = {r["device"]: r for r in col.db.query(
            "SELECT device, state, state_ts, state_reason, model_name, model_version, window_s FROM devices "
            "WHERE fleet = ?", (fleet,))}
        assert devs["cam1"]["state"] == "online" and devs["cam1"]["model_version"] == "2.1"
        assert devs["cam1"]["window_s"] == 10.0
        assert devs["cam2"]["state"] == "offline" and devs["cam2"]["state_ts"] == pytest.approx(t0 + 5)
        assert devs["cam2"]["state_reason"] == "last will"
    finally:
        col.stop()


def _command_validator():
    import fastjsonschema

    return fastjsonschema.compile(json.loads((SCHEMA_DIR / "command.schema.json").read_text()))


def test_a_gap_is_repaired_by_cmd_resend_and_unavailable_seqs_count_as_lost(db_url: str, fleet: str) -> None:
    device_side = MqttPeer(subscribe=[f"edge/{fleet}/cam1/cmd/#"])
    col = _collector(db_url, fleet)
    try:
        stream = uuid.uuid4().hex
        windows = {i: window(fleet, "cam1", seq=i, stream=stream) for i in range(1, 13)}
        for i in (1, 2, 3, 6, 7, 10, 11, 12):
            device_side.publish(f"edge/{fleet}/cam1/telemetry", windows[i])
        topic = f"edge/{fleet}/cam1/cmd/resend"
        assert wait_until(lambda: device_side.received(topic), timeout=20)
        cmd = device_side.received(topic)[0]
        _command_validator()(cmd)
        assert cmd["command"] == "resend" and cmd["stream"] == stream
        assert cmd["ranges"] == [[4, 5], [8, 9]]
        # the device resends what it still has, and says 8-9 are gone
        device_side.publish(f"edge/{fleet}/cam1/telemetry", windows[4])
        device_side.publish(f"edge/{fleet}/cam1/telemetry", windows[5])
        device_side.publish(f"edge/{fleet}/cam1/events",
                            event(fleet, "cam1", "resend.unavailable", {"stream": stream, "ranges": [[8, 9]]}))

        def state() -> tuple:
            r = col.db.query("SELECT contiguous_seq, max_seq, lost FROM streams WHERE stream = ?", (stream,))[0]
            return r["contiguous_seq"], r["max_seq"], r["lost"]

        assert wait_until(lambda: state() == (12, 12, 2)), state()
        assert _count(col.db, "windows", "WHERE stream = ?", (stream,)) == 10
        requests = col.db.query("SELECT resend_requests FROM streams WHERE stream = ?", (stream,))[0]
        assert requests["resend_requests"] == len(device_side.received(topic)) == col.stats()["resend_requests"]
    finally:
        col.stop()
        device_side.close()


def test_a_restarted_collector_gets_what_it_missed(sqlite_url: str, fleet: str, peer: MqttPeer) -> None:
    col = _collector(sqlite_url, fleet)
    stream = uuid.uuid4().hex
    peer.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=1, stream=stream))
    assert wait_until(lambda: col.stats()["stored"] == 1)
    col.stop()
    for i in range(2, 12):  # the collector is down: its persistent session on the broker queues these
        peer.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream))
    col2 = _collector(sqlite_url, fleet)
    try:
        assert wait_until(lambda: col2.stats()["stored"] == 10)
        assert _count(col2.db, "windows", "WHERE stream = ?", (stream,)) == 11
    finally:
        col2.stop()


def test_kill_9_mid_stream_loses_nothing(tmp_path: Path, fleet: str, peer: MqttPeer) -> None:
    db_path = tmp_path / "fleet.db"
    cmd = [sys.executable, "-m", "edge_sdk.cli", "collector", "run", "--db", f"sqlite:///{db_path}",
           "--mqtt", MQTT_URL, "--fleet", fleet, "--client-id", f"col-{fleet}", "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()  # "collector ...": subscribed shortly after
        assert line.startswith("collector"), line
        time.sleep(1.0)
        return proc

    proc = start()
    stream = uuid.uuid4().hex
    n = 600
    payloads = [payload_bytes(window(fleet, f"cam{i % 3}", seq=i // 3 + 1, stream=f"{stream[:-1]}{i % 3}"))
                for i in range(n)]
    db = Database.connect(f"sqlite:///{db_path}")
    for i, p in enumerate(payloads):
        peer.client.publish(f"edge/{fleet}/cam{i % 3}/telemetry", p, qos=1)
    assert wait_until(lambda: _count(db, "windows") >= 50, timeout=30, interval=0.005)
    proc.send_signal(signal.SIGKILL)  # mid-stream: some stored, the rest queued, in flight or not yet sent
    proc.wait()
    stored_before = _count(db, "windows")
    peer.client.publish(f"edge/{fleet}/cam0/telemetry", payloads[0], qos=1).wait_for_publish(10)
    proc = start()
    try:
        assert wait_until(lambda: _count(db, "windows") == n, timeout=30), (stored_before, _count(db, "windows"))
        assert _count(db, "dead_letters") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        db.close()


def test_bad_options_fail_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    for kwargs, expected in ((dict(mqtt_url="http://x"), "unsupported MQTT URL"),
                             (dict(mqtt_url=MQTT_URL, fleet="a/b"), "fleet"),
                             (dict(mqtt_url=MQTT_URL, webhook="ftp://x"), "webhook"),
                             (dict(mqtt_url=MQTT_URL, ca_file=str(tmp_path / "none.pem")), "--ca-file")):
        with pytest.raises(CollectorError) as info:
            Collector(url, **kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CollectorError, match="no connection"):
        Collector(url, "mqtt://127.0.0.1:1", client_id=f"x{uuid.uuid4().hex[:6]}").start(wait_s=1.5)


def test_alerts_are_evaluated_by_the_running_collector(sqlite_url: str, fleet: str, peer: MqttPeer,
                                                       tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("interval_s = 0.3\n" + "".join(f"[{r}]\nenabled = false\n" for r in (
        "latency_sla", "error_rate", "confidence_drop", "offline")))
    col = _collector(sqlite_url, fleet, rules=str(rules), alert_interval_s=None)
    try:
        stream = uuid.uuid4().hex
        for i in range(1, 4):
            peer.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream, psi=0.8))
        assert wait_until(lambda: _count(col.db, "alerts", "WHERE fleet = ? AND state = 'open'", (fleet,)) == 1)
        assert col.db.query("SELECT rule FROM alerts WHERE fleet = ?", (fleet,))[0]["rule"] == "drift"
        assert wait_until(lambda: col.stats()["alerts_opened"] == 1)
    finally:
        col.stop()


def test_embedded_broker_without_v5_gets_mqtt_311(sqlite_url: str, fleet: str) -> None:
    from edge_sdk.testing.broker import start_embedded_broker

    broker = start_embedded_broker()
    try:
        col = Collector(sqlite_url, broker.url, fleet=fleet, client_id=f"col-{fleet}", gap_grace_s=0.5,
                        alert_interval_s=3600)
        col.start(wait_s=20)  # the v5 CONNECT goes unanswered for 5 s, then 3.1.1
        device = MqttPeer(broker.url, subscribe=[f"edge/{fleet}/cam1/cmd/#"], v5=False)
        try:
            stream = uuid.uuid4().hex
            for i in (1, 2, 4):
                device.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream))
            assert wait_until(lambda: col.stats()["stored"] == 3)
            assert col.stats()["protocol"] == "3.1.1"
            assert wait_until(lambda: device.received(f"edge/{fleet}/cam1/cmd/resend"))
            assert device.received(f"edge/{fleet}/cam1/cmd/resend")[0]["ranges"] == [[3, 3]]
        finally:
            device.close()
            col.stop()
    finally:
        broker.stop()


def test_no_resend_while_the_device_is_offline(sqlite_url: str, fleet: str) -> None:
    device_side = MqttPeer(subscribe=[f"edge/{fleet}/cam1/cmd/#"])
    col = _collector(sqlite_url, fleet)
    try:
        stream = uuid.uuid4().hex
        for i in (1, 3):
            device_side.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream))
        device_side.publish(f"edge/{fleet}/cam1/status", status(fleet, "cam1", "offline"))
        assert wait_until(lambda: col.stats()["stored"] == 2 and col.stats()["statuses"] == 1)
        time.sleep(2.5)  # grace 0.5 s + resend interval 1 s: a request would have gone out by now
        assert device_side.received(f"edge/{fleet}/cam1/cmd/resend") == []
        device_side.publish(f"edge/{fleet}/cam1/status", status(fleet, "cam1", "online"))
        assert wait_until(lambda: device_side.received(f"edge/{fleet}/cam1/cmd/resend"))
        assert device_side.received(f"edge/{fleet}/cam1/cmd/resend")[0]["ranges"] == [[2, 2]]
    finally:
        col.stop()
        device_side.close()


def test_two_collectors_share_the_load_and_agree_on_streams(db_url: str, fleet: str, peer: MqttPeer) -> None:
    cols = [_collector(db_url, fleet, client_id=f"col{i}-{fleet}") for i in range(2)]
    try:
        streams = [uuid.uuid4().hex for _ in range(2)]
        for seq in range(1, 101):
            for k, stream in enumerate(streams):
                peer.client.publish(f"edge/{fleet}/cam{k}/telemetry",
                                    payload_bytes(window(fleet, f"cam{k}", seq=seq, stream=stream)), qos=1)
        peer.publish(f"edge/{fleet}/cam0/status", status(fleet, "cam0"))
        assert wait_until(lambda: sum(c.stats()["stored"] for c in cols) == 200, timeout=30)
        assert all(c.stats()["stored"] > 0 for c in cols)  # the shared subscription split the windows
        db = cols[0].db
        assert _count(db, "windows", "WHERE fleet = ?", (fleet,)) == 200

        def settled() -> bool:
            rows = db.query("SELECT contiguous_seq, max_seq FROM streams WHERE fleet = ?", (fleet,))
            return len(rows) == 2 and all((r["contiguous_seq"], r["max_seq"]) == (100, 100) for r in rows)

        # each collector saw part of every stream; the table still ends up gap-free
        assert wait_until(settled), db.query("SELECT * FROM streams WHERE fleet = ?", (fleet,))
        # status is not shared: every collector gets it (waited for: on a loaded machine it may trail the windows)
        assert wait_until(lambda: sum(c.stats()["statuses"] for c in cols) == 2, timeout=30)
    finally:
        for c in cols:
            c.stop()


def test_a_collector_started_before_its_broker_connects_with_v5_and_survives_a_broker_restart(
        sqlite_url: str, fleet: str, tmp_path: Path) -> None:
    from edge_sdk.testing.broker import free_port, start_mosquitto

    port = free_port()
    col = Collector(sqlite_url, f"mqtt://127.0.0.1:{port}", fleet=fleet, client_id=f"col-{fleet}",
                    alert_interval_s=3600)
    col.start()
    try:
        time.sleep(6.5)  # longer than the v5 CONNACK timeout: a broker that is down must not cause a 3.1.1 fallback
        with start_mosquitto(tmp_path / "broker", port=port) as broker:
            assert col.wait_connected(15)
            assert col.stats()["protocol"] == "5"
            time.sleep(0.3)
            device = MqttPeer(broker.url)
            try:
                stream = uuid.uuid4().hex
                device.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=1, stream=stream))
                assert wait_until(lambda: col.stats()["stored"] == 1)
                broker.restart()
                assert wait_until(lambda: col.connected, timeout=40)
                assert wait_until(device.client.is_connected, timeout=40)  # paho reconnects by itself
                device.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=2, stream=stream))
                assert wait_until(lambda: col.stats()["stored"] == 2)
            finally:
                device.close()
    finally:
        col.stop()


def test_a_killed_storing_process_is_started_again_and_nothing_is_lost(sqlite_url: str, fleet: str,
                                                                        peer: MqttPeer) -> None:
    col = _collector(sqlite_url, fleet)
    try:
        stream = uuid.uuid4().hex
        for i in range(1, 6):
            peer.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream))
        assert wait_until(lambda: col.stats()["stored"] == 5)
        first = col._store_process._proc.pid
        os.kill(first, signal.SIGKILL)
        for i in range(6, 11):
            peer.publish(f"edge/{fleet}/cam1/telemetry", window(fleet, "cam1", seq=i, stream=stream))
        assert wait_until(lambda: col.stats()["stored"] == 10)
        assert col._store_process._proc.pid != first  # a new storing process took over
        assert _count(col.db, "windows", "WHERE stream = ?", (stream,)) == 10
    finally:
        col.stop()
