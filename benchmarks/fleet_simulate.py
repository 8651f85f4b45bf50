"""`edge-sdk fleet simulate` transports side by side (issue 5): what N simulated devices at one window per second
cost on this host, with the pooled loop (one epoll thread per process, ``edge_sdk.testing.mqtt_pool``) and with one
real ``Publisher`` per device (3 threads each).

A raw paho subscriber on the same broker measures the delivery lag (arrival - window end) and counts what arrives.
Reported per transport: windows sent / acked / received, CPU seconds of the simulator processes per window, how
late the window scheduler ran (the simulator falling behind its own clock) and the lag p50 / p99.

    python benchmarks/fleet_simulate.py [--devices 1000] [--duration 60] [--mqtt mqtt://127.0.0.1:1883]
        [--transports pooled,publisher]
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
import uuid
from typing import Any

import numpy as np

from edge_sdk.testing.simulate import SimulationSettings, run_simulation


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(transport: str, devices: int, duration: float, mqtt_url: str) -> dict[str, Any]:
    """One run: returns the figures of the table."""
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    fleet = f"bench{uuid.uuid4().hex[:6]}"
    host, port = mqtt_url.split("://", 1)[1].rsplit(":", 1)
    lags: list[float] = []
    ids: set[str] = set()
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        body = json.loads(msg.payload)
        with lock:
            lags.append(now - body["end"])
            ids.add(body["window_id"])

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect(host, int(port))
    sub.subscribe(f"edge/{fleet}/+/telemetry", qos=1)
    sub.loop_start()
    time.sleep(0.5)
    cpu0 = _children_cpu()
    t0 = time.time()
    result = run_simulation(SimulationSettings(devices=devices, mqtt_url=mqtt_url, fleet=fleet, window_s=1.0,
                                               duration_s=duration, transport=transport))
    elapsed = time.time() - t0
    time.sleep(2)
    sub.loop_stop()
    sub.disconnect()
    lag = np.array(lags) if lags else np.array([float("nan")])
    return {"transport": transport, "processes": result.processes, "sent": result.sent, "acked": result.acked,
            "received": len(ids), "cpu_ms_per_window": (_children_cpu() - cpu0) / max(result.sent, 1) * 1000,
            "late_s": result.max_late_s, "lag_p50_s": float(np.quantile(lag, 0.5)),
            "lag_p99_s": float(np.quantile(lag, 0.99)), "elapsed_s": elapsed}


def main() -> None:
    """Run each transport and print the table (ratios against the pooled transport)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--transports", default="pooled,publisher")
    args = ap.parse_args()
    rows = [measure(t, args.devices, args.duration, args.mqtt) for t in args.transports.split(",")]
    base = rows[0]["cpu_ms_per_window"]
    print(f"\n{args.devices} devices, 1 window/s each, {args.duration:g} s\n")
    head = f"{'transport':<10} {'procs':>5} {'sent':>7} {'acked':>7} {'received':>8} {'CPU ms/window':>13} " \
           f"{'ratio':>6} {'late s':>7} {'lag p50':>8} {'lag p99':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['transport']:<10} {r['processes']:>5} {r['sent']:>7} {r['acked']:>7} {r['received']:>8} "
              f"{r['cpu_ms_per_window']:>13.2f} {r['cpu_ms_per_window'] / base:>6.2f} {r['late_s']:>7.2f} "
              f"{r['lag_p50_s']:>8.3f} {r['lag_p99_s']:>8.3f}")


if __name__ == "__main__":
    main()
