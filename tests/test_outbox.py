"""The on-disk outbox: order, gap-free seq across reopen, bounds and drop counting, resend, errors, kill -9."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_sdk.device_agent.outbox import Outbox, OutboxError, OutboxMessage
from edge_sdk.errors import TelemetryError

TOPIC = "edge/f/d/telemetry"
EVENTS = "edge/f/d/events"


def test_put_pending_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        w = {"window_id": "a" * 32, "x": 1.5}
        first = ob.put(TOPIC, w, sequenced=True)
        second = ob.put(EVENTS, {"kind": "model.loaded"})
        third = ob.put(TOPIC, {"x": 2}, sequenced=True)
        assert first < second < third
        assert w["seq"] == 1 and w["stream"] == ob.stream and len(ob.stream) == 32

        rows = ob.pending()
        assert [r.rowid for r in rows] == [first, second, third]
        assert isinstance(rows[0], OutboxMessage) and rows[0].topic == TOPIC
        assert rows[0].payload == b'{"window_id":"' + b"a" * 32 + b'","x":1.5,"stream":"' + ob.stream.encode() \
            + b'","seq":1}'  # compact JSON
        assert json.loads(rows[2].payload)["seq"] == 2 and "seq" not in json.loads(rows[1].payload)
        assert [r.rowid for r in ob.pending(limit=2)] == [first, second]
        assert [r.rowid for r in ob.pending(after=first)] == [second, third]

        ob.ack(second)
        ob.ack_many([first, third, 999])  # unknown ids are ignored
        ob.ack(first)  # acking twice changes nothing
        assert ob.pending() == []
        stats = ob.stats()
        assert stats["pending"] == 0 and stats["acked_kept"] == 2 and stats["next_seq"] == 3  # event deleted


def test_seq_is_gap_free_and_ids_never_repeat_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        stream = ob.stream
        ids = ob.put_many([(TOPIC, {"i": i}, True) for i in range(5)] + [(EVENTS, {"e": 1}, False)])
        ob.ack(ids[-1])  # the newest row is deleted: its id must still never come back
    with Outbox(path) as ob:
        assert ob.stream == stream
        new_id = ob.put(TOPIC, {"i": 5}, sequenced=True)
        assert new_id > ids[-1]
        more = [ob.put(TOPIC, {"i": i}, sequenced=True) for i in range(6, 10)]
        seqs = [json.loads(r.payload)["seq"] for r in ob.pending(100)]
        assert seqs == list(range(1, 11))
        assert more == sorted(more)


def test_concurrent_writers_get_unique_gap_free_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", synchronous="NORMAL") as ob:
        def write() -> None:
            for i in range(100):
                ob.put(TOPIC, {"i": i}, sequenced=True)

        threads = [threading.Thread(target=write) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = ob.pending(1000)
        assert sorted(json.loads(r.payload)["seq"] for r in rows) == list(range(1, 401))
        assert [json.loads(r.payload)["seq"] for r in rows] == list(range(1, 401))  # row order == seq order


def test_bounded_drops_oldest_pending_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_pending=10) as ob:
        for i in range(25):
            ob.put(TOPIC, {"i": i}, sequenced=True)
        assert ob.dropped == 15
        assert [json.loads(r.payload)["i"] for r in ob.pending(100)] == list(range(15, 25))
        ob.put_many([(TOPIC, {"i": i}, True) for i in range(25, 40)])  # one batch larger than the free room
        assert ob.dropped == 30 and ob.stats()["pending"] == 10
        assert [json.loads(r.payload)["i"] for r in ob.pending(100)] == list(range(30, 40))
    with Outbox(path, max_pending=10) as ob:
        assert ob.dropped == 30 and ob.stats()["dropped"] == 30 and ob.stats()["next_seq"] == 41


def test_acked_rows_are_kept_up_to_keep_acked_for_resend(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", keep_acked=20) as ob:
        ids = ob.put_many([(TOPIC, {"i": i}, True) for i in range(100)])
        for rowid in ids:
            ob.ack(rowid)
        kept = ob.stats()["acked_kept"]
        assert 20 <= kept <= 22  # 10% slack before pruning
        requeued, unavailable = ob.resend(ob.stream, [(1, 10), (95, 100)])
        assert requeued == 6 and unavailable == [(1, 10)]
        assert [json.loads(r.payload)["seq"] for r in ob.pending()] == [95, 96, 97, 98, 99, 100]


def test_resend_requeues_acked_and_reports_what_is_missing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ids = ob.put_many([(TOPIC, {"i": i}, True) for i in range(10)])
        ob.ack_many(ids[:8])  # seq 9 and 10 are still pending
        requeued, unavailable = ob.resend(ob.stream, [(2, 3), (3, 4), (9, 12), (20, 20)])
        assert requeued == 3  # seq 2, 3, 4 (overlapping ranges merged); 9 and 10 are on their way already
        assert unavailable == [(11, 12), (20, 20)]
        assert [json.loads(r.payload)["seq"] for r in ob.pending()] == [2, 3, 4, 9, 10]
        assert ob.resend("0" * 32, [(1, 2)]) == (0, [(1, 2)])  # another stream: nothing of it is here
        for bad in ([(0, 3)], [(5, 2)], [("1", 2)]):
            with pytest.raises(OutboxError, match="resend range"):
                ob.resend(ob.stream, bad)  # type: ignore[arg-type]


def test_resend_never_exceeds_max_pending(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_pending=5) as ob:
        for i in range(5):
            ob.ack(ob.put(TOPIC, {"i": i}, sequenced=True))
        ob.put(TOPIC, {"i": 5}, sequenced=True)
        requeued, unavailable = ob.resend(ob.stream, [(1, 5)])
        assert requeued == 4 and unavailable == [(5, 5)] and ob.stats()["pending"] == 5


def test_settings_and_payloads_are_checked(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="synchronous"):
        Outbox(tmp_path / "a.db", synchronous="OFF")
    with pytest.raises(OutboxError, match="max_pending"):
        Outbox(tmp_path / "b.db", max_pending=0)
    with Outbox(tmp_path / "c.db", synchronous="normal") as ob:
        with pytest.raises(OutboxError, match="not plain JSON"):
            ob.put(TOPIC, {"x": float("nan")}, sequenced=True)
        with pytest.raises(OutboxError, match="not plain JSON"):
            ob.put(TOPIC, {"x": object()})
        assert ob.stats()["next_seq"] == 1 and ob.stats()["pending"] == 0  # a failed put consumes no seq


def test_damaged_foreign_or_unwritable_files_give_one_line_errors_and_stay_untouched(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all " * 200)
    with pytest.raises(OutboxError, match="damaged: move it aside") as info:
        Outbox(garbage)
    assert isinstance(info.value, TelemetryError) and "\n" not in str(info.value)
    assert garbage.read_bytes() == b"not sqlite at all " * 200

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
        conn.execute("INSERT INTO people VALUES ('ada')")
    conn.close()
    with pytest.raises(OutboxError, match="something else"):
        Outbox(foreign)
    with sqlite3.connect(foreign) as conn:
        assert conn.execute("SELECT name FROM people").fetchall() == [("ada",)]
    conn.close()

    with pytest.raises(OutboxError, match="directory exists"):
        Outbox(tmp_path / "missing-dir" / "o.db")
    with pytest.raises(OutboxError, match="opening failed"):
        Outbox(tmp_path)  # a directory


def test_one_outbox_object_per_file(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.put(TOPIC, {"i": 1}, sequenced=True)
        with pytest.raises(OutboxError, match="is using this file"):
            Outbox(tmp_path / "o.db")
    with Outbox(tmp_path / "o.db") as again:  # free again once closed
        assert again.stats()["pending"] == 1


WRITER = r"""
import sys, threading, time
from edge_sdk.device_agent.outbox import Outbox
ob = Outbox(sys.argv[1], synchronous=sys.argv[2])
stop = False
def acker():  # a second thread acks concurrently, like the publisher does
    while not stop:
        rows = ob.pending(20)
        ob.ack_many([r.rowid for r in rows[: len(rows) // 2]])
        time.sleep(0.001)
threading.Thread(target=acker, daemon=True).start()
i = 0
while True:
    p = {"i": i, "pad": "x" * 200}
    ob.put("edge/f/d/telemetry", p, sequenced=True)
    if i % 7 == 0:
        ob.put("edge/f/d/events", {"i": i})
    print(p["seq"], flush=True)  # printed only after the commit returned
    i += 1
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_kill_9_of_a_writer_loses_no_committed_row(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), synchronous], stdout=subprocess.PIPE,
                            text=True)
    committed: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        committed.append(int(line))
        if len(committed) >= 400:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed += [int(line) for line in proc.stdout.read().split()]

    with sqlite3.connect(path) as conn:  # the killed process's lock is gone
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = sorted(s for (s,) in conn.execute("SELECT seq FROM messages WHERE seq IS NOT NULL"))
        states = {s for (s,) in conn.execute("SELECT DISTINCT state FROM messages")}
        next_seq = int(conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
    conn.close()
    assert committed == list(range(1, len(committed) + 1))
    assert next_seq - 1 >= committed[-1]  # a row may commit just before its print is written: never the reverse
    assert stored == list(range(1, next_seq))  # every committed window is there, acked or pending, no gap
    assert states == {"pending", "acked"}
    with Outbox(path, synchronous=synchronous) as ob:
        assert ob.stats()["next_seq"] == next_seq
        w = {"after": "restart"}
        ob.put(TOPIC, w, sequenced=True)
        assert w["seq"] == next_seq
