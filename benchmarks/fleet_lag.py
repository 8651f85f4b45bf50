"""1,000 simulated devices at one window per second through the real collector (issue 5, acceptance 4).

``edge-sdk fleet simulate``'s devices (real MQTT clients with on-disk outboxes, pooled per process) send to the
machine's Mosquitto; the real ``Collector`` stores into SQLite. Reported: windows sent / acknowledged / stored,
duplicates, and the ingest lag = collector ``received_at`` - window ``end`` (both on this host's clock), p50 / p99 /
max over every stored window.                                          goal: lag p99 < 2 s, stored == sent

    python benchmarks/fleet_lag.py [--devices 1000] [--duration 60] [--processes 2] [--db sqlite:///tmp/lag.db]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from edge_sdk.fleet.collector.service import Collector
from edge_sdk.testing.simulate import SimulationSettings, run_simulation


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--db", help="collector database (default: a temporary SQLite file)")
    args = ap.parse_args()
    fleet = f"lag{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        db_url = args.db or f"sqlite:///{Path(tmp) / 'fleet.db'}"
        col = Collector(db_url, args.mqtt, fleet=fleet, client_id=f"col-{fleet}")
        col.start(wait_s=10)
        try:
            res = run_simulation(SimulationSettings(devices=args.devices, mqtt_url=args.mqtt, fleet=fleet,
                                                    processes=args.processes, window_s=1.0,
                                                    duration_s=args.duration))
            sent = int(res.sent)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                n = col.db.query("SELECT COUNT(*) AS n FROM windows WHERE fleet = ?", (fleet,))[0]["n"]
                if n >= sent:
                    break
                time.sleep(0.5)
            rows = col.db.query("SELECT received_at - end_ts AS lag, end_ts FROM windows WHERE fleet = ?", (fleet,))
            lags = np.array([r["lag"] for r in rows])
            ends = np.array([r["end_ts"] for r in rows])
            stats = col.stats()
        finally:
            col.stop()
    p50, p99 = np.quantile(lags, [0.5, 0.99]) if lags.size else (float("nan"),) * 2
    print(f"{args.devices} devices x {args.duration:g} s at 1 window/s, {args.processes} simulator processes")
    print(f"sent {sent}  acked {res.acked}  stored {lags.size}  duplicates {stats['duplicates']}  "
          f"dead letters {stats['dead_letters']}")
    print(f"lag (received - window end): p50 {p50:.3f} s  p99 {p99:.3f} s  max {lags.max():.3f} s")
    t0 = ends.min()
    print("by 10 s of window end time:  " + "  ".join(
        f"{int(b)}-{int(b) + 10}s p99 {np.quantile(lags[(ends - t0 >= b) & (ends - t0 < b + 10)], 0.99):.2f}"
        for b in range(0, int(ends.max() - t0) + 1, 10) if ((ends - t0 >= b) & (ends - t0 < b + 10)).any()))
    return 0 if lags.size == sent and p99 < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
