"""Stream ownership (issue 13): an outbox stream belongs to the device that first sent it. A window (or a
``resend.unavailable`` event) naming another device's stream is dead-lettered with a one-line reason and counted,
never stored: a device cannot fill, block (UNIQUE(stream, seq)) or declare lost another device's seqs.

Against the real Mosquitto at 127.0.0.1:1883 (a unique fleet, so a unique topic prefix, per test) and a real
collector storing into SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector_helpers import MQTT_URL, MqttPeer, event, pg_url, wait_until, window

from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.collector.service import Collector
from edge_sdk.fleet.db import Database


@pytest.fixture
def fleet() -> str:
    return f"own{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        with pg_url("edge_own") as url:
            yield url


@pytest.fixture
def peer() -> Iterator[MqttPeer]:
    p = MqttPeer()
    yield p
    p.close()


def _count(db: Database, where: str, params: tuple) -> int:
    return db.query(f"SELECT COUNT(*) AS n FROM windows WHERE {where}", params)[0]["n"]


def test_a_device_cannot_write_another_devices_stream(db_url: str, fleet: str, peer: MqttPeer) -> None:
    col = Collector(db_url, MQTT_URL, fleet=fleet, client_id=f"col-{fleet}", session_expiry_s=60,
                    gap_grace_s=3600, resend_interval_s=3600, alert_interval_s=3600)
    col.start(wait_s=10)
    time.sleep(0.3)  # SUBACK
    try:
        victim, own = uuid.uuid4().hex, uuid.uuid4().hex
        for seq in (1, 2, 3):
            peer.publish(f"edge/{fleet}/cam-a/telemetry", window(fleet, "cam-a", seq=seq, stream=victim))
        assert wait_until(lambda: col.stats()["stored"] == 3)
        # cam-b speaks for itself (topic and payload agree) but names cam-a's stream: a later seq, a seq cam-a
        # has not sent yet (would block it under UNIQUE(stream, seq)), and a resend.unavailable for cam-a's seqs
        hostile = [window(fleet, "cam-b", seq=4, stream=victim, count=999),
                   window(fleet, "cam-b", seq=5, stream=victim, count=999)]
        for w in hostile:
            peer.publish(f"edge/{fleet}/cam-b/telemetry", w)
        peer.publish(f"edge/{fleet}/cam-b/events",
                     event(fleet, "cam-b", "resend.unavailable", {"stream": victim, "ranges": [[6, 100]]}))
        peer.publish(f"edge/{fleet}/cam-b/telemetry", window(fleet, "cam-b", seq=1, stream=own))  # its own: fine
        assert wait_until(lambda: col.stats()["dead_letters"] == 3 and col.stats()["stored"] == 4)
        assert _count(col.db, "stream = ? AND device = ?", (victim, "cam-b")) == 0
        assert _count(col.db, "stream = ? AND device = ?", (own, "cam-b")) == 1
        assert col.db.query("SELECT COUNT(*) AS n FROM events WHERE device = ?", ("cam-b",))[0]["n"] == 0
        dead = col.db.query("SELECT topic, reason FROM dead_letters ORDER BY id")
        assert len(dead) == 3
        for d in dead:
            assert d["topic"].startswith(f"edge/{fleet}/cam-b/") and "\n" not in d["reason"]
            assert "stream" in d["reason"] and "cam-a" in d["reason"], d["reason"]
        # cam-a's stream is untouched: its seq 4 and 5 are still accepted, nothing was declared lost
        for seq in (4, 5):
            peer.publish(f"edge/{fleet}/cam-a/telemetry", window(fleet, "cam-a", seq=seq, stream=victim))
        assert wait_until(lambda: col.stats()["stored"] == 6)
        s = col.db.query("SELECT fleet, device, contiguous_seq, max_seq, lost FROM streams WHERE stream = ?",
                         (victim,))[0]
        assert (s["device"], s["contiguous_seq"], s["max_seq"], s["lost"]) == ("cam-a", 5, 5, 0)
        assert _count(col.db, "stream = ?", (victim,)) == 5
    finally:
        col.stop()


def test_first_claim_in_one_batch_owns_a_new_stream(tmp_path: Path) -> None:
    """Two devices naming one brand-new stream in the same batch: the first message's device owns it."""
    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate()
    try:
        ing = Ingestor(db, retention=False)
        stream = uuid.uuid4().hex
        now = time.time()
        msgs = [Message(f"edge/f1/{dev}/telemetry", _bytes(window("f1", dev, seq=seq, stream=stream)), now)
                for dev, seq in (("cam-a", 1), ("cam-b", 2), ("cam-a", 2))]
        r = ing.store_batch(msgs)
        assert (r.stored, r.dead_letters) == (2, 1)
        assert db.query("SELECT device FROM streams WHERE stream = ?", (stream,))[0]["device"] == "cam-a"
        assert {row["device"] for row in db.query("SELECT device FROM windows")} == {"cam-a"}
    finally:
        db.close()


def _bytes(obj: dict) -> bytes:
    from collector_helpers import payload_bytes

    return payload_bytes(obj)
