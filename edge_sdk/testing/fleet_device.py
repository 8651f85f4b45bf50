"""One simulated device of an agent fleet (:class:`FleetDevice`: the shipped device wiring plus an inference loop and
a report) and the child-process entry point that runs a share of the fleet's devices
(see :mod:`edge_sdk.testing.agent_fleet`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.device_agent.runner import DeviceRunner
from edge_sdk.errors import EdgeSDKError
from edge_sdk.testing.fleet_spec import REPORT_NAME, FleetSpec, capture_settings

__all__ = ["FleetDevice"]

log = logging.getLogger("edge_sdk.testing.agent_fleet")

_EVENT_FIELDS = ("version", "from", "to", "step", "reason", "deployment_id", "source", "passed", "cached")


class FleetDevice(DeviceRunner):
    """One simulated device: a :class:`~edge_sdk.device_agent.runner.DeviceRunner` (the shipped device wiring:
    store, updater, agent, outbox, publisher, telemetry, hot-swap) plus an inference loop and a report.

    ``images`` / ``labels`` are shared, read-only arrays; each device sees them in its own random order.
    Use :meth:`start` (installs the initial bundle unless the store already has a verified current version,
    connects, starts inferring) and :meth:`stop`; :meth:`report` says what the device did.
    """

    def __init__(self, device: str, spec: FleetSpec, images: np.ndarray, labels: np.ndarray | None) -> None:
        from edge_sdk.device_agent.config import AgentConfig
        from edge_sdk.device_agent.runner import RunnerConfig
        from edge_sdk.device_agent.telemetry import TelemetrySettings

        self.device, self.spec = device, spec
        self.images, self.labels = images, labels
        self.root = Path(spec.store_root) / device
        self.root.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng([spec.seed, zlib.crc32(device.encode())])
        telemetry = TelemetrySettings(enabled=True, window_s=float(spec.window_s), fleet=spec.fleet, device=device,
                                      outbox_path=str(self.root / "outbox.db"))
        capture = capture_settings(spec.capture, self.root / "capture")
        agent = AgentConfig(bundle=spec.initial_bundle, runtime_order=tuple(spec.runtime_order), threads=1,
                            telemetry=telemetry,
                            mqtt={"url": spec.mqtt_url, "session_expiry_s": int(spec.session_expiry_s)},
                            **({"capture": capture} if capture is not None else {}))
        super().__init__(RunnerConfig(agent=agent, store=str(self.root / "models"),
                                      trusted_keys=tuple(spec.trusted_keys), on_switch="swap",
                                      outbox_synchronous="NORMAL"), say=lambda line: log.debug("%s %s", device, line))
        self._thread: threading.Thread | None = None
        self._loop_stop = threading.Event()
        self.versions_run: list[str] = []
        self.switches: list[dict[str, Any]] = []
        self.update_events: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.inferences: dict[str, int] = {}
        self.confidence_sum: dict[str, float] = {}
        self.errors = 0
        self.started_at: float | None = None

    # ---- what the runner reports -------------------------------------------------------------------------------

    def on_model_loaded(self, agent: Any, previous: Any) -> None:
        version = str(agent.bundle.manifest.version)
        self.switches.append({"ts": time.time(), "from": self.versions_run[-1] if self.versions_run else None,
                              "to": version})
        self.versions_run.append(version)

    def on_update_event(self, kind: str, data: dict[str, Any], level: str) -> None:
        self.update_events.append({"ts": time.time(), "kind": kind, "level": level,
                                   **{k: data[k] for k in _EVENT_FIELDS if k in data}})

    def on_command_received(self, name: str, payload: dict[str, Any]) -> None:
        model = payload.get("model") if isinstance(payload.get("model"), dict) else {}
        self.commands.append({"ts": time.time(), "command": name, "version": model.get("version"),
                              "deployment_id": payload.get("deployment_id")})

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> FleetDevice:
        """Start the runner (install, connect; see DeviceRunner.start) and the inference loop."""
        super().start()
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._loop, name=f"agent-{self.device}", daemon=True)
        self._thread.start()
        return self

    @property
    def subscribed(self) -> bool:
        """True once the broker acknowledged the device's ``cmd/#`` subscription."""
        return self.publisher is not None and bool(self.publisher.stats()["subscribed"])

    def _loop(self) -> None:
        period = 1.0 / float(self.spec.rate_hz)
        order = self.rng.permutation(len(self.images))
        k = 0
        due = time.monotonic() + float(self.rng.uniform(0, period))
        fb = int(self.spec.feedback_every)
        while not self._loop_stop.wait(max(0.0, due - time.monotonic())):
            i = int(order[k % len(order)])
            k += 1
            try:
                with self.lock:
                    agent = self.agent
                    pred = agent.predict_image(self.images[i])  # type: ignore[union-attr]
                    conf = pred.confidence
                    if fb and self.labels is not None and k % fb == 0:
                        agent.feedback(pred.id, int(self.labels[i]))  # type: ignore[union-attr]
                v = str(agent.bundle.manifest.version)  # type: ignore[union-attr]
                self.inferences[v] = self.inferences.get(v, 0) + 1
                if conf is not None:
                    self.confidence_sum[v] = self.confidence_sum.get(v, 0.0) + conf
            except EdgeSDKError as exc:  # counted by the agent's telemetry too
                self.errors += 1
                log.debug("%s: inference failed: %s", self.device, exc)
            except Exception:  # outermost loop of a long-running device: log it, keep inferring
                self.errors += 1
                log.exception("%s: inference failed unexpectedly", self.device)
            due += period
            now = time.monotonic()
            if due < now - period:  # fell behind: skip ahead instead of bursting
                due = now + period

    def stop(self, flush_s: float | None = None) -> None:
        """Stop inferring, then the runner: last window, outbox delivered (up to ``flush_s``), disconnect."""
        self._loop_stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        super().stop(flush_s)

    def report(self) -> dict[str, Any]:
        """What the device ran and did (JSON-ready)."""
        agent = self.agent
        status = self.updater.status() if self.updater is not None else {"current": None, "previous": None}
        inferences, confidence = dict(self.inferences), dict(self.confidence_sum)  # snapshots: the loop adds keys
        return {"device": self.device, "fleet": self.spec.fleet, "pid": os.getpid(), "runner": type(self).__name__,
                "current_version": str(agent.bundle.manifest.version) if agent is not None else None,
                "model": agent.model_version if agent is not None else None,
                "store": {"current": status["current"], "previous": status["previous"]},
                "versions_run": list(self.versions_run), "switches": list(self.switches),
                "update_events": list(self.update_events), "commands": list(self.commands),
                "inferences": inferences,
                "confidence_mean": {v: confidence.get(v, 0.0) / n for v, n in inferences.items() if n},
                "errors": self.errors, "publisher": self.publisher.stats() if self.publisher is not None else None,
                "capture": self._capture_stats(),
                "started_at": self.started_at, "ts": time.time()}

    def _capture_stats(self) -> dict[str, Any] | None:
        """The capture counters (None when capture is off); the last ones seen once the store is closed."""
        cap = self.capture
        if cap is None:
            return None
        if not self._stopped:
            try:
                return cap.stats()
            except Exception:  # stopping meanwhile: read the counters as below
                pass
        from edge_sdk.device_agent.capture import LocalSampleStore

        with cap._lock:  # the device stopped: its store is closed; the counters stay, the store is read again
            out: dict[str, Any] = {**cap._counts, "captured": dict(cap._captured)}
        store = LocalSampleStore(cap.settings.dir, max_bytes=cap.settings.max_bytes)
        try:
            out.update(stored=store.count(), stored_bytes=store.total_bytes, dropped=store.dropped,
                       max_bytes=cap.settings.max_bytes)
        finally:
            store.close()
        return out

    def write_report(self) -> None:
        """Write :meth:`report` to ``<store_root>/<device>/report.json`` atomically."""
        path = self.root / REPORT_NAME
        tmp = path.with_name(f".{REPORT_NAME}.tmp")
        tmp.write_text(json.dumps(self.report(), separators=(",", ":")))
        os.replace(tmp, path)


# ---- child process -------------------------------------------------------------------------------------------------

def _say(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _child_main(spec_path: str, devices_csv: str) -> None:
    """Run the devices ``devices_csv`` of the fleet in ``spec_path`` until stdin says ``stop`` or closes."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s agent-fleet[%(process)d] %(name)s %(levelname)s %(message)s")
    spec = FleetSpec(**json.loads(Path(spec_path).read_text()))
    with np.load(spec.inputs_path, allow_pickle=False) as data:
        images = np.ascontiguousarray(data["images"])
        labels = np.ascontiguousarray(data["labels"]) if "labels" in data.files else None
    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    devices: list[FleetDevice] = []
    for name in devices_csv.split(","):
        if stop.is_set():
            break
        dev = None
        try:
            dev = FleetDevice(name, spec, images, labels)
            dev.start()
        except EdgeSDKError as exc:
            _say(event="failed", device=name, reason=str(exc))
            if dev is not None:
                dev.stop(flush_s=0)
            continue
        devices.append(dev)
    deadline = time.monotonic() + 30.0
    waiting = list(devices)
    while waiting and not stop.is_set() and time.monotonic() < deadline:
        for dev in [d for d in waiting if d.subscribed]:
            waiting.remove(dev)
            _say(event="ready", device=dev.device)
        time.sleep(0.05)
    for dev in waiting:
        _say(event="failed", device=dev.device, reason="not subscribed to its cmd/# within 30 s")
    while not stop.wait(spec.report_every_s):
        for dev in devices:
            try:
                dev.write_report()
            except OSError as exc:  # e.g. disk full: the next round tries again
                log.warning("%s: report not written: %s", dev.device, exc)
    stoppers = [threading.Thread(target=d.stop, daemon=True) for d in devices]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30.0)
    for dev in devices:
        dev.write_report()
    _say(event="stopped")
