"""The device transport (on-disk outbox + MQTT publisher) against a private Mosquitto, figures printed as tables.

(a) Outbox ``put`` rate (one committed transaction per window) with ``synchronous`` FULL vs NORMAL.
(b) Publisher delivery rate (outbox backlog -> PUBACKs recorded in the outbox), FULL vs NORMAL, against raw paho
    QoS 1 publishing of the same payloads to the same broker (no outbox) measured in the same run.
(c) Live: a writer puts windows as fast as it can while the publisher sends them (put + publish + ack).
(d) Broker restarts while windows stream in: K graceful restarts (SIGTERM; the broker saves its queue) and K kill -9
    restarts (what the broker had acknowledged but not yet delivered is lost in the broker and repaired with
    ``cmd/resend``); windows sent, received, duplicates, lost-in-broker, time.

    python benchmarks/mqtt_transport.py [--windows 20000] [--restarts 5] [--payload 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mqtt_helpers import Subscriber, seqs, wait_until  # noqa: E402

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher  # noqa: E402
from edge_sdk.device_agent.outbox import Outbox  # noqa: E402
from edge_sdk.testing.broker import MosquittoProcess, start_mosquitto  # noqa: E402


def _window(i: int, pad: int) -> dict[str, Any]:
    return {"window_id": uuid.uuid4().hex, "i": i, "ts": time.time(), "pad": "x" * pad}


def bench_put(tmp: Path, n: int, pad: int) -> dict[str, float]:
    rates = {}
    for sync in ("FULL", "NORMAL"):
        with Outbox(tmp / f"put-{sync}.db", synchronous=sync) as ob:
            count = n if sync == "NORMAL" else max(200, n // 20)
            t = time.perf_counter()
            for i in range(count):
                ob.put("edge/f/d/telemetry", _window(i, pad), sequenced=True)
            rates[sync] = count / (time.perf_counter() - t)
    return rates


def bench_raw_paho(broker: MosquittoProcess, n: int, pad: int, inflight: int) -> float:
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    payloads = [json.dumps(_window(i, pad), separators=(",", ":")).encode() for i in range(n)]
    done = threading.Semaphore(0)
    slots = threading.Semaphore(inflight)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(inflight)
    c.on_publish = lambda *_a: (slots.release(), done.release())
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    wait_until(c.is_connected, 5)
    t = time.perf_counter()
    for p in payloads:
        slots.acquire()
        c.publish("edge/raw/d/telemetry", p, qos=1)
    for _ in range(n):
        done.acquire()
    rate = n / (time.perf_counter() - t)
    c.disconnect()
    c.loop_stop()
    return rate


def bench_publisher(broker: MosquittoProcess, tmp: Path, n: int, pad: int, sync: str, live: bool) -> float:
    fleet = f"b{uuid.uuid4().hex[:8]}"
    topic = f"edge/{fleet}/d/telemetry"
    with Outbox(tmp / f"pub-{sync}-{live}.db", synchronous=sync) as ob:
        pub = Publisher(MqttSettings(broker.url, fleet, "d", client_id=f"edge-{fleet}"), ob)
        if not live:
            ob.put_many([(topic, _window(i, pad), True) for i in range(n)])
        pub.start()
        wait_until(lambda: pub.connected, 10)
        t = time.perf_counter()
        if live:
            for i in range(n):
                ob.put(topic, _window(i, pad), sequenced=True)
                pub.wakeup()
        assert pub.flush(600), pub.stats()
        rate = n / (time.perf_counter() - t)
        pub.stop()
    return rate


def bench_restarts(broker: MosquittoProcess, tmp: Path, n: int, pad: int, restarts: int, kill: bool) -> dict[str, Any]:
    fleet = f"r{uuid.uuid4().hex[:8]}"
    topic = f"edge/{fleet}/d/telemetry"
    sub = Subscriber(broker.url, topic, client_id=f"col-{fleet}", clean_start=False, session_expiry_s=3600)
    with Outbox(tmp / f"restart-{kill}.db", synchronous="FULL", keep_acked=n) as ob:
        pub = Publisher(MqttSettings(broker.url, fleet, "d", client_id=f"edge-{fleet}"), ob)
        pub.start()
        t = time.perf_counter()

        def write() -> None:
            for i in range(n):
                ob.put(topic, _window(i, pad), sequenced=True)
                pub.wakeup()
                time.sleep(0.0002)

        writer = threading.Thread(target=write)
        writer.start()
        outage = 0.0
        for k in range(restarts):
            wait_until(lambda k=k: ob.stats()["next_seq"] > (k + 1) * n // (restarts + 1), 120)
            t0 = time.perf_counter()
            broker.restart(kill=kill)
            wait_until(lambda: pub.connected, 30)
            outage += time.perf_counter() - t0
        writer.join()
        assert pub.flush(600), pub.stats()
        wait_until(lambda: len(set(seqs(sub.payloads()))) >= n, 10)
        got = seqs(sub.payloads())
        lost = sorted(set(range(1, n + 1)) - set(got))
        elapsed = time.perf_counter() - t
        repaired = 0
        if lost:  # the collector's gap repair
            from paho.mqtt import client as mqtt
            from paho.mqtt import publish

            for i in range(0, len(lost), 100):
                ranges = [[s, s] for s in lost[i:i + 100]]
                body = {"schema": "edge-sdk/command", "schema_version": "1.0", "command": "resend",
                        "command_id": uuid.uuid4().hex, "ts": time.time(), "stream": ob.stream, "ranges": ranges}
                publish.single(f"edge/{fleet}/d/cmd/resend", json.dumps(body), qos=1, hostname="127.0.0.1",
                               port=broker.port, protocol=mqtt.MQTTv5, client_id=f"op-{uuid.uuid4().hex[:6]}")
            wait_until(lambda: set(seqs(sub.payloads())) >= set(lost), 60)
            repaired = len(set(lost) & set(seqs(sub.payloads())))
        got = seqs(sub.payloads())
        result = {"sent": n, "received_unique": len(set(got)), "duplicates": len(got) - len(set(got)),
                  "lost_in_broker": len(lost), "repaired_by_resend": repaired, "connects": pub.stats()["connects"],
                  "seconds": elapsed, "reconnect_s_avg": outage / max(1, restarts)}
        pub.stop()
    sub.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=20000)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--payload", type=int, default=1500, help="padding bytes per window (a real window is ~1-3 kB)")
    args = ap.parse_args()
    n, pad = args.windows, args.payload
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = start_mosquitto(tmp / "broker")
        try:
            put = bench_put(tmp, n, pad)
            print(f"\n(a) outbox put, one transaction per window ({pad} B padding)")
            print(f"    {'synchronous':12} {'windows/s':>10}")
            for k, v in put.items():
                print(f"    {k:12} {v:10.0f}")
            print(f"    NORMAL/FULL ratio: {put['NORMAL'] / put['FULL']:.1f}x")

            raw = bench_raw_paho(broker, n, pad, 100)
            rows = [(f"publisher backlog, {s}", bench_publisher(broker, tmp, n, pad, s, live=False))
                    for s in ("FULL", "NORMAL")]
            rows += [(f"publisher live put+send, {s}", bench_publisher(broker, tmp, n, pad, s, live=True))
                     for s in ("FULL", "NORMAL")]
            print(f"\n(b, c) delivery to Mosquitto, QoS 1, {n} windows; raw paho (no outbox) = {raw:.0f} msg/s")
            print(f"    {'path':36} {'windows/s':>10} {'vs raw paho':>12}")
            for name, rate in rows:
                print(f"    {name:36} {rate:10.0f} {rate / raw:11.2f}x")

            print(f"\n(d) broker restarted {args.restarts}x while {n} windows stream in (outbox FULL)")
            print(f"    {'restart':10} {'sent':>6} {'unique rx':>9} {'dups':>5} {'lost@broker':>11} "
                  f"{'repaired':>8} {'connects':>8} {'s':>6} {'reconnect s':>11}")
            for kill in (False, True):
                r = bench_restarts(broker, tmp, n, pad, args.restarts, kill)
                print(f"    {'kill -9' if kill else 'SIGTERM':10} {r['sent']:6d} {r['received_unique']:9d} "
                      f"{r['duplicates']:5d} {r['lost_in_broker']:11d} {r['repaired_by_resend']:8d} "
                      f"{r['connects']:8d} {r['seconds']:6.1f} {r['reconnect_s_avg']:11.2f}")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
