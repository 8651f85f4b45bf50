"""Collector ingest rate vs the raw broker -> subscriber rate, in one run (issue 5, acceptance 3).

For each round, N schema-valid telemetry windows are queued at a private Mosquitto (shipped config) for an
offline persistent MQTT v5 session, then the subscriber connects and drains them:

* raw: a bare paho subscriber that only counts messages (auto-ack);
* collector: the real ``Collector`` (validation with the JSON Schema, batching, SQLite insert + commit, manual
  ack after commit), timed until the last window is committed to SQLite (a second, PostgreSQL, column when
  ``--postgres`` is given: a database is created on 127.0.0.1:5432 and dropped after).

Rounds alternate raw / collector; medians are reported with the ratio.  goal: collector >= 0.8x raw (SQLite)

    python benchmarks/collector_ingest.py [--windows 20000] [--rounds 3] [--postgres]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from edge_sdk.fleet.collector.service import Collector
from edge_sdk.testing.broker import start_mosquitto
from edge_sdk.testing.synthetic import make_window


def _client(client_id: str, receive_maximum: int = 1000) -> tuple:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = receive_maximum
    return c, props


def _publish(url_port: int, fleet: str, n: int) -> None:
    """Queue n windows (QoS 1) from 4 devices; returns when the broker acknowledged all of them."""
    c, props = _client(f"pub-{uuid.uuid4().hex[:8]}")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", url_port, properties=props, clean_start=True)
    c.loop_start()
    now = time.time()
    base = {d: make_window(fleet=fleet, device=d, model={"name": "m", "version": "1"}, start=now - 10, end=now,
                           latencies_ms=[3.0, 4.0, 5.0, 9.0], confidences=[0.9, 0.7, 0.8, 0.95],
                           classes=[1, 2, 1, 3]) for d in ("d1", "d2", "d3", "d4")}
    stream = {d: uuid.uuid4().hex for d in base}
    infos = []
    for i in range(n):
        d = f"d{i % 4 + 1}"
        w = {**base[d], "window_id": uuid.uuid4().hex, "stream": stream[d], "seq": i // 4 + 1}
        infos.append(c.publish(f"edge/{fleet}/{d}/telemetry", json.dumps(w), qos=1))
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def _prime(port: int, client_id: str, topic: str) -> None:
    """Create the persistent session with its subscription, then go offline."""
    from paho.mqtt.subscribeoptions import SubscribeOptions

    c, props = _client(client_id)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port, properties=props, clean_start=True)
    c.loop_start()
    c.subscribe(topic, options=SubscribeOptions(qos=1))
    done.wait(10)
    c.disconnect()
    c.loop_stop()


def raw_round(port: int, n: int) -> float:
    """Windows per second drained by a bare counting subscriber."""
    fleet = f"r{uuid.uuid4().hex[:8]}"
    cid = f"raw-{fleet}"
    _prime(port, cid, f"$share/edge-collectors/edge/{fleet}/+/telemetry")
    _publish(port, fleet, n)
    c, props = _client(cid)
    got = [0]
    done = threading.Event()

    def on_message(*_: object) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port, properties=props, clean_start=False)
    c.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"raw subscriber got {got[0]} of {n}")
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / dt


def collector_round(port: int, n: int, db_url: str) -> float:
    """Windows per second stored (committed) by the real Collector."""
    fleet = f"c{uuid.uuid4().hex[:8]}"
    cid = f"col-{fleet}"
    col = Collector(db_url, f"mqtt://127.0.0.1:{port}", fleet=fleet, client_id=cid)
    col.start(wait_s=10)  # creates the session + shared subscription
    time.sleep(0.5)
    col.stop()
    _publish(port, fleet, n)
    col = Collector(db_url, f"mqtt://127.0.0.1:{port}", fleet=fleet, client_id=cid)
    t0 = time.perf_counter()
    col.start()
    while col.stats()["stored"] + col.stats()["duplicates"] < n:
        if time.perf_counter() - t0 > 300:
            raise RuntimeError(f"collector stored {col.stats()}")
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    stored = col.db.query("SELECT COUNT(*) AS n FROM windows WHERE fleet = ?", (fleet,))[0]["n"]
    col.stop()
    if stored != n:
        raise RuntimeError(f"collector stored {stored} of {n}")
    return n / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postgres", action="store_true", help="also measure the PostgreSQL store")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_mosquitto(Path(tmp) / "broker")
        pg_ctx = None
        columns = {"raw": [], "sqlite": []}
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from collector_helpers import pg_url

            pg_ctx = pg_url("edge_bench")
            pg = pg_ctx.__enter__()
            columns["postgres"] = []
        try:
            for r in range(args.rounds):
                columns["raw"].append(raw_round(broker.port, args.windows))
                columns["sqlite"].append(collector_round(broker.port, args.windows,
                                                         f"sqlite:///{Path(tmp) / f'fleet{r}.db'}"))
                if pg_ctx is not None:
                    columns["postgres"].append(collector_round(broker.port, args.windows, pg))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in columns.items()), flush=True)
        finally:
            broker.stop()
            if pg_ctx is not None:
                pg_ctx.__exit__(None, None, None)
    raw = statistics.median(columns["raw"])
    print(f"\n{args.windows:,} windows queued at the broker, drained; medians of {args.rounds} rounds")
    print(f"{'path':<28}{'windows/s':>12}{'vs raw':>9}")
    print(f"{'raw paho subscriber':<28}{raw:>12,.0f}{1.0:>8.2f}x")
    for k in [k for k in columns if k != "raw"]:
        v = statistics.median(columns[k])
        print(f"{'collector -> ' + k:<28}{v:>12,.0f}{v / raw:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
