"""10,000 fuzzed command payloads against a real device on a real broker (issue 13, acceptance 2).

The device is a real Publisher + Outbox + Updater (``tests/command_fuzz.py``: the same harness as
``tests/test_mqtt_hardening.py``). The payloads come from hypothesis (deep nesting up to 120,000 levels, huge
strings, wrong types, binary, mutated valid commands, random command names) plus every nasty class of the issue,
two of them retained; they are published QoS 1 on ``edge/<fleet>/<device>/cmd/*``. Then a valid ``cmd/resend``
and ``cmd/update`` must be answered (events) and 20 new windows must drain from the outbox; the device is restarted
with the retained nested commands waiting and checked again. Printed: payloads sent, device still connected,
later valid command answered, outbox drained, crashes (uncaught thread exceptions + tracebacks logged), the
device's own counters, and how many log lines each logger wrote (INFO and up; the MQTT layer's are rate-limited).

    python benchmarks/fuzz_commands.py [--n 10000] [--mqtt mqtt://127.0.0.1:1883]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from command_fuzz import NASTY, CrashCounter, FuzzDevice, clear_retained, commands, send_all
from hypothesis import HealthCheck, given, settings
from mqtt_helpers import Subscriber


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="fuzzed payloads (the nasty classes come on top)")
    ap.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="broker URL")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lines: dict[str, int] = {}

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines[record.name] = lines.get(record.name, 0) + 1

    logging.getLogger("edge_sdk").addHandler(Count(logging.INFO))
    logging.getLogger("edge_sdk").setLevel(logging.INFO)
    logging.getLogger("edge_sdk.updater").propagate = False  # counted, not printed: one line per refused command

    items: list[tuple[str, bytes, bool]] = list(NASTY)

    @settings(max_examples=args.n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(commands)
    def collect(item: tuple[str, bytes]) -> None:
        items.append((item[0], item[1], False))

    t0 = time.monotonic()
    collect()
    generated = time.monotonic() - t0
    sizes = sorted(len(p) for _, p, _ in items)
    with tempfile.TemporaryDirectory() as tmp:
        dev = FuzzDevice(Path(tmp), args.mqtt, f"fz{uuid.uuid4().hex[:8]}")
        with Subscriber(args.mqtt, f"{dev.prefix}#") as sub, CrashCounter() as crashes:
            dev.start()
            if not dev.wait_ready():
                print("the device did not connect", file=sys.stderr)
                return 2
            t1 = time.monotonic()
            sent = send_all(dev, items)
            send_s = time.monotonic() - t1
            first = dev.probe(sub, timeout=60)
            assert dev.publisher is not None
            counters = {k: v for k, v in dev.publisher.stats().items()
                        if k in ("commands", "commands_rejected", "commands_dropped", "watchdog_restarts", "connects",
                                 "published", "acked", "outbox_pending")}
            dev.stop()
            dev.start()
            restarted = dev.wait_ready()
            second = dev.probe(sub, timeout=60)
            dev.stop()
        clear_retained(args.mqtt, [f"{dev.prefix}cmd/{n}" for n in ("update", "rollback", "resend")]
                       + [f"{dev.prefix}status"])
    summary = {
        "payloads_sent": sent, "of_which_nasty": len(NASTY), "retained": sum(r for _, _, r in NASTY),
        "payload_bytes_median": sizes[len(sizes) // 2], "payload_bytes_max": sizes[-1],
        "generate_s": round(generated, 1), "send_s": round(send_s, 1),
        "device_still_connected": first["connected"], "later_valid_commands_answered": first["answered"],
        "outbox_drained": first["drained"],
        "after_restart_with_retained_nested": {"connected": restarted and second["connected"],
                                               "answered": second["answered"], "drained": second["drained"]},
        "crashes": crashes.crashes, "uncaught": crashes.uncaught[:5], "tracebacks": crashes.tracebacks[:5],
        "device_counters": counters, "log_lines_by_logger": lines,
    }
    print(json.dumps(summary, indent=2))
    ok = first == second == {"connected": True, "answered": True, "drained": True} and restarted \
        and crashes.crashes == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
