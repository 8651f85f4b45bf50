"""Acceptance 2 at the transport level: a device process (Outbox + Publisher) emitting windows fast is killed with
SIGKILL mid-stream, restarted on the same outbox file, killed again...; the collector side sees every seq 1..N
(duplicates allowed, none missing) and the seq numbering continues without a gap across the restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from mqtt_helpers import (
    Subscriber,
    mosquitto,  # noqa: F401  (fixture)
    seqs,
    unique_fleet,
    wait_until,
)

from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.testing.broker import MosquittoProcess

DEVICE = r"""
import sys, time, uuid
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
path, url, fleet, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ob = Outbox(path)
pub = Publisher(MqttSettings(url, fleet, "dev1"), ob, model={"name": "m", "version": "1"}, window_s=0.001)
pub.start()
topic = f"edge/{fleet}/dev1/telemetry"
for i in range(count):
    w = {"window_id": uuid.uuid4().hex, "i": i}
    ob.put(topic, w, sequenced=True)     # committed before it is reported
    pub.wakeup()
    print(w["seq"], flush=True)
    time.sleep(0.0005)
ok = pub.flush(60)
pub.stop()
ob.close()
print("done" if ok else "not flushed", flush=True)
"""


def _run_and_kill(path: Path, url: str, fleet: str, kill_after: int) -> list[int]:
    """Start the device process; SIGKILL it once it reported ``kill_after`` committed windows. Returns their seqs."""
    proc = subprocess.Popen([sys.executable, "-c", DEVICE, str(path), url, fleet, "100000"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    committed = []
    for line in proc.stdout:
        committed.append(int(line))
        if len(committed) >= kill_after:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed += [int(x) for x in proc.stdout.read().split()]
    return committed


def test_device_kill_9_mid_stream_loses_no_window(mosquitto: MosquittoProcess, tmp_path: Path) -> None:  # noqa: F811
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    path = tmp_path / "device-outbox.db"
    with Subscriber(mosquitto.url, topic, client_id=f"col-{fleet}", clean_start=False, session_expiry_s=600) as col:
        reported: list[int] = []
        for kill_after in (700, 400, 900):
            reported += _run_and_kill(path, mosquitto.url, fleet, kill_after)
        # the last run ends normally and flushes everything, including what the killed runs left pending
        final = subprocess.run([sys.executable, "-c", DEVICE, str(path), mosquitto.url, fleet, "300"],
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0 and final.stdout.split()[-1] == "done", final.stderr[-2000:]
        reported += [int(x) for x in final.stdout.split()[:-1]]

        with Outbox(path) as ob:
            last_seq = ob.stats()["next_seq"] - 1
            assert ob.stats()["pending"] == 0 and ob.stats()["dropped"] == 0
        # every run continued the numbering where the previous one stopped: one gap-free stream
        assert reported == list(range(1, len(reported) + 1))
        assert last_seq >= reported[-1]
        assert wait_until(lambda: set(seqs(col.payloads())) >= set(range(1, last_seq + 1)), 30)
        received = seqs(col.payloads())
        assert set(range(1, last_seq + 1)) - set(received) == set()
        assert max(received) == last_seq
        print(f"\ndevice kill -9 x3: {last_seq} windows, all received; {len(received) - len(set(received))} "
              f"duplicate deliveries")
