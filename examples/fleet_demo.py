"""Fleet part of the end-to-end demo: sign the bundle, run a device agent with telemetry, collect, alert, show.

    python examples/fleet_demo.py BUNDLE [--out demo_out] [--windows 6]

1. A fresh ed25519 key signs the bundle; the signature is verified (what a device does before an update).
2. A broker: the machine's Mosquitto on 127.0.0.1:1883 when it answers, else an embedded amqtt broker bound to
   127.0.0.1 (MQTT 3.1.1) started in-process.
3. The collector (SQLite ``demo_out/fleet.db``, the bundle's baseline for drift) and its dashboard on a local port.
4. A device agent on the bundle's ONNX artifact with telemetry every second: real Fashion-MNIST test images, then
   the same images much darker (a camera at night) until the collector raises the drift alert.
5. ``edge-sdk fleet status`` as a table, the alerts, and where the dashboard was.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _broker() -> tuple[str, object | None]:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1.0).close()
        return "mqtt://127.0.0.1:1883", None
    except OSError:
        from edge_sdk.testing.broker import start_embedded_broker

        broker = start_embedded_broker("127.0.0.1", 0)
        print(f"no broker on 127.0.0.1:1883: started an embedded one at {broker.url}")
        return broker.url, broker


def run(bundle_dir: Path, out: Path, windows: int = 6) -> int:
    """Run the fleet demo on ``bundle_dir``; returns 0 when the drift alert was raised as expected."""
    import uuid

    from data import fashion_tensors

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings, model_info
    from edge_sdk.fleet.collector.service import Collector
    from edge_sdk.fleet.dashboard.server import CollectorHTTP
    from edge_sdk.fleet.dashboard.status_table import print_status
    from edge_sdk.fleet.dashboard.views import alerts, fleet_status
    from edge_sdk.signing import generate_keypair, sign_bundle, verify_bundle

    out.mkdir(parents=True, exist_ok=True)
    keys = Path(tempfile.mkdtemp(prefix="edge-demo-keys-"))
    private, public = generate_keypair(keys, "demo")
    key_id = sign_bundle(bundle_dir, private, version_code=1)  # devices refuse a downgrade below it
    print(f"\nsigned {bundle_dir} with key {key_id}; verified on the device side: "
          f"{verify_bundle(bundle_dir, public) == key_id}")

    url, broker = _broker()
    fleet = f"demo{uuid.uuid4().hex[:4]}"
    agent = Agent(bundle_dir, runtime_order=["onnxruntime", "openvino", "litert"], threads=1)
    db_url = f"sqlite:///{(out / 'fleet.db').resolve()}"
    m = agent.bundle.manifest
    collector = Collector(db_url, url, fleet=fleet, client_id=f"demo-collector-{fleet}", alert_interval_s=0.5,
                          baselines={(m.name, m.version): m.baseline})
    collector.start(wait_s=15)
    http = CollectorHTTP(collector.db, "127.0.0.1", 0, stats=collector.stats)
    http.start()
    outbox = Outbox(out / f"outbox-{fleet}.db", synchronous="NORMAL")
    mqtt = MqttSettings(url=url, fleet=fleet, device="camera-1")
    settings = TelemetrySettings(enabled=True, window_s=1.0, fleet=fleet, device="camera-1", mqtt=mqtt)
    publisher = Publisher(mqtt, outbox, model=model_info(agent), window_s=1.0)
    publisher.start()
    telemetry = Telemetry.for_agent(agent, settings, outbox=outbox, publisher=publisher)
    telemetry.start()
    images, _ = fashion_tensors("test", agent.bundle.manifest.inputs[0].layout or "NCHW", n=2000)
    print(f"device camera-1 of fleet {fleet}: {agent.model_version} on {agent.artifact.key} with "
          f"{agent.runtime_name}; telemetry every 1 s to {url}; dashboard {http.url}")
    raised = False
    try:
        rng = np.random.default_rng(0)
        for phase, factor, n_windows in (("daylight", 1.0, windows), ("night (25% brightness)", 0.25, windows)):
            t_end = time.monotonic() + n_windows
            while time.monotonic() < t_end:
                agent.predict(images[rng.integers(len(images))][None] * factor)
                time.sleep(0.02)
            time.sleep(1.5)
            open_drift = [a for a in alerts(collector.db, state="open", fleet=fleet) if a["rule"] == "drift"]
            print(f"after {n_windows} s of {phase} images: {len(open_drift)} drift alert(s) open")
            raised = bool(open_drift)
        print()
        print_status(fleet_status(collector.db, fleet=fleet))
        for a in alerts(collector.db, state="open", fleet=fleet):
            print(f"ALERT {a['rule']}: {a['message']}")
    finally:
        telemetry.stop()
        publisher.flush(3.0)
        publisher.stop()
        outbox.close()
        http.shutdown()
        collector.stop()
        agent.close()
        if broker is not None:
            broker.stop()  # type: ignore[attr-defined]
    print(f"\nthe fleet database is {out / 'fleet.db'}: `edge-sdk fleet status --db {db_url}`; "
          f"`edge-sdk collector run --db {db_url} --http 127.0.0.1:8000` serves the dashboard")
    return 0 if raised else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--windows", type=int, default=6)
    args = p.parse_args()
    return run(args.bundle, args.out, args.windows)


if __name__ == "__main__":
    sys.exit(main())
