"""A device process for the no-loss tests: queues N telemetry windows in its on-disk outbox and publishes them.

    python tests/burst_device.py OUTBOX MQTT_URL FLEET DEVICE N [--batch 1000] [--rate WINDOWS_PER_S]

Windows are schema-valid (``edge_sdk.testing.synthetic.make_window``) and go through the real ``Outbox`` and
``Publisher``. Already-queued windows are not queued again after a restart (the outbox's ``next_seq`` says how
many were), so a killed and restarted device continues where it stopped. Prints ``queued N`` when all windows
are in the outbox; then keeps running like an agent (one window every ``--tail-interval`` seconds, answering
resend commands) until SIGTERM, when it flushes and prints ``sent TOTAL`` (every window it ever queued).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import uuid

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.testing.synthetic import make_window
from edge_sdk.topics import device_topic


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("outbox")
    ap.add_argument("url")
    ap.add_argument("fleet")
    ap.add_argument("device")
    ap.add_argument("n", type=int)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.0, help="windows per second (0: as fast as possible)")
    ap.add_argument("--synchronous", default="NORMAL")
    ap.add_argument("--tail-interval", type=float, default=0.5)
    args = ap.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    outbox = Outbox(args.outbox, max_pending=10 * args.n, keep_acked=args.n, synchronous=args.synchronous)
    model = {"name": "burst", "version": "1"}
    publisher = Publisher(MqttSettings(url=args.url, fleet=args.fleet, device=args.device), outbox, model=model,
                          window_s=1.0)
    publisher.start()
    topic = device_topic(args.fleet, args.device, "telemetry")
    template = make_window(fleet=args.fleet, device=args.device, model=model, start=time.time() - 1,
                           end=time.time(), latencies_ms=[3.0, 3.5, 4.0], confidences=[0.9, 0.8, 0.95],
                           classes=[1, 2, 1])
    template.pop("stream", None)
    template.pop("seq", None)
    queued = outbox.stats()["next_seq"] - 1
    t0 = time.monotonic()
    while queued < args.n and not stop.is_set():
        k = min(args.batch, args.n - queued)
        now = time.time()
        items = [(topic, {**template, "window_id": uuid.uuid4().hex, "start": now - 1, "end": now}, True)
                 for _ in range(k)]
        outbox.put_many(items)
        queued += k
        publisher.wakeup()
        if args.rate > 0:
            ahead = queued / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    print(f"queued {queued}", flush=True)
    while not stop.wait(args.tail_interval):
        now = time.time()
        outbox.put(topic, {**template, "window_id": uuid.uuid4().hex, "start": now - 1, "end": now}, sequenced=True)
        publisher.wakeup()
    publisher.flush(30.0)
    print(f"sent {outbox.stats()['next_seq'] - 1} pending {outbox.stats()['pending']}", flush=True)
    publisher.stop()
    outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
