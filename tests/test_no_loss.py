"""Issue 5, acceptance 1: the broker is killed (SIGKILL) and restarted 10 times while a device sends 50,000
windows; the collector stores every window exactly once.

Real parts only: the device is a separate process with the real on-disk ``Outbox`` and ``Publisher``
(tests/burst_device.py), the broker a private ``mosquitto`` on a free port (killed like a crash: whatever it held
in memory is gone), the collector the real ``Collector`` writing SQLite. Windows the broker acknowledged but lost
in a crash are found by the collector's gap repair (``cmd/resend``) and re-sent from the device's outbox.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from collector_helpers import wait_until
from mqtt_helpers import unique_fleet

from edge_sdk.fleet.collector.service import Collector
from edge_sdk.testing.broker import start_mosquitto

ROOT = Path(__file__).resolve().parent.parent


def _device(tmp_path: Path, url: str, fleet: str, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "burst_device.py"), str(tmp_path / "outbox.db"), url, fleet, "dev1",
         str(n), "--batch", "500", "--rate", "2500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_broker_killed_10_times_nothing_lost_no_duplicates(tmp_path: Path) -> None:
    n, kills = 50_000, 10
    broker = start_mosquitto(tmp_path / "broker")
    fleet = unique_fleet()
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = Collector(db_url, broker.url, fleet=fleet, client_id=f"col-{fleet}", gap_grace_s=1.0,
                          resend_interval_s=2.0)
    collector.start(wait_s=10)
    dev = _device(tmp_path, broker.url, fleet, n)
    rng = random.Random(5)
    try:
        stored = lambda: collector.db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"]  # noqa: E731
        t0 = time.monotonic()
        for _ in range(kills):  # kill while the burst is flowing (~20 s at 2,500 windows/s)
            time.sleep(rng.uniform(0.8, 2.0))
            broker.kill()
            time.sleep(rng.uniform(0.1, 0.5))
            broker.start()
        burst_s = time.monotonic() - t0
        assert stored() < n, "the kills must happen while the burst is still flowing"
        # stored >= n can hold with a gap still open (a window the broker acked and then lost, counted in place
        # of a later tail window): the device must live until the collector's resend request has filled it
        assert wait_until(lambda: stored() >= n and not collector.ingestor.gaps(), timeout=240, interval=0.5), \
            collector.stats()
        dev.send_signal(signal.SIGTERM)
        out, err = dev.communicate(timeout=60)
        assert dev.returncode == 0, err[-2000:]
        sent = int(out.split("sent ")[1].split()[0])
        assert "pending 0" in out, out
        assert wait_until(lambda: stored() >= sent, timeout=60, interval=0.5), (stored(), sent)
        time.sleep(1.0)
        row = collector.db.query("SELECT COUNT(*) AS n, COUNT(DISTINCT seq) AS seqs, MIN(seq) AS lo, MAX(seq) AS hi, "
                                 "COUNT(DISTINCT window_id) AS ids FROM windows")[0]
        stats = collector.stats()
        print(f"\nsent {sent}, stored {row['n']}, kills {kills} within {burst_s:.1f} s; collector: "
              f"duplicates {stats['duplicates']}, resend requests {stats['resend_requests']}")
        assert row == {"n": sent, "seqs": sent, "lo": 1, "hi": sent, "ids": sent}
        assert collector.db.query("SELECT lost FROM streams")[0]["lost"] == 0
    finally:
        if dev.poll() is None:
            dev.kill()
        collector.stop()
        broker.stop()
