"""Issue 5, acceptance 2: the real device agent (`edge-sdk agent run` with telemetry) is killed with SIGKILL while
windows stream to the broker, then restarted on the same outbox: every window it ever stored reaches the
collector — sequence numbers 1..N of its stream, none missing, none stored twice.

What a kill -9 can lose is only the window being aggregated in memory at that instant (at most ``--window``
seconds of aggregates); every window already written to the outbox survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from collector_helpers import wait_until
from mqtt_helpers import require_system_broker, unique_fleet

from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.fleet.collector.service import Collector


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("crash")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, out=d / "bundle", name="tiny", version="1", quiet=True)
    return d / "bundle"


def _agent(bundle: Path, fleet: str, outbox: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle), "--http", "127.0.0.1:0",
         "--mqtt", "mqtt://127.0.0.1:1883", "--fleet", fleet, "--device", "cam1", "--window", "0.1",
         "--outbox", str(outbox)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CI": "true"})


def test_agent_kill_9_mid_stream_then_restart_loses_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet("crash")
    col = Collector(f"sqlite:///{tmp_path / 'fleet.db'}", "mqtt://127.0.0.1:1883", fleet=fleet,
                    client_id=f"col-{fleet}", gap_grace_s=1.0)
    col.start(wait_s=10)
    outbox = tmp_path / "outbox.db"
    stored = lambda: col.db.query("SELECT COUNT(*) AS n FROM windows")[0]["n"]  # noqa: E731
    try:
        for run in range(3):  # two kills mid-stream, then a clean stop
            proc = _agent(tiny_bundle, fleet, outbox)
            before = stored()
            assert wait_until(lambda b=before: stored() >= b + 20, timeout=60), f"run {run}: windows do not flow"
            if run < 2:
                proc.send_signal(signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        with Outbox(outbox) as box:
            st = box.stats()
        written = st["next_seq"] - 1
        assert st["pending"] == 0
        assert wait_until(lambda: stored() >= written, timeout=30), (stored(), written)
        time.sleep(0.5)
        rows = col.db.query("SELECT seq, stream FROM windows ORDER BY seq")
        assert len({r["stream"] for r in rows}) == 1
        assert [r["seq"] for r in rows] == list(range(1, written + 1))
        print(f"\n3 agent runs (2 x kill -9): {written} windows written to the outbox, {len(rows)} stored, "
              f"collector duplicates {col.stats()['duplicates']}")
    finally:
        col.stop()
