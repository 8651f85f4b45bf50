"""A fleet of real device agents on this host, for end-to-end tests of telemetry, updates and staged rollouts.

Each simulated device is a :class:`~edge_sdk.device_agent.runner.DeviceRunner`, the class `edge-sdk agent run`
drives too, so these tests exercise the shipped device wiring, nothing stubbed::

    ModelStore dir ── Updater (signature, smoke test, atomic switch, rollback) ── on_switch ──> Agent (onnxruntime)
    Agent.predict_image (the bundle's own preprocessing) ── WindowAggregator ── Telemetry (window_s) ── Outbox file
    Outbox ── Publisher (MQTT v5, QoS 1, retained birth / last will, cmd/# -> Updater.on_command)

The initial bundle is installed through the Updater (so it is verified and smoke-tested like any update). A loop
feeds real raw images at ``rate_hz`` through :meth:`Agent.predict_image`, so a bundle whose manifest
preprocessing is wrong really produces wrong inputs. On every switch (update or rollback) the runner
(``on_switch="swap"``) loads the new Agent, swaps it in, closes the old telemetry (its last, partial window still
carries the old version), starts a new one for the new model (``model.loaded``) and gives the publisher the new
model for its birth status.

:class:`AgentFleet` splits ``n_devices`` over ``processes`` child processes (``python -c``, like the collector's
storing process: no re-import of the caller's main script, and a child whose parent dies sees its stdin close and
stops). Devices within a process are threads. Every child writes one JSON report per device
(``<store_root>/<device>/report.json``: current version, every version it ran, switches, update events, commands,
inference counts) every ``report_every_s`` seconds and once more when it stops; :meth:`AgentFleet.reports` reads
them at any time. :func:`run_agent_fleet` runs a fleet for a duration or until an event is set.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.device_agent.runner import DeviceRunner
from edge_sdk.errors import AgentFleetError, EdgeSDKError

__all__ = ["AgentFleet", "AgentFleetError", "FleetDevice", "FleetSpec", "capture_settings", "device_ids",
           "run_agent_fleet"]

log = logging.getLogger("edge_sdk.testing.agent_fleet")

REPORT_NAME = "report.json"
_EVENT_FIELDS = ("version", "from", "to", "step", "reason", "deployment_id", "source", "passed", "cached")


def device_ids(n: int, prefix: str = "dev") -> list[str]:
    """``n`` device ids ``<prefix>000``, ``<prefix>001`` ... (three digits at least)."""
    return [f"{prefix}{i:03d}" for i in range(n)]


@dataclass(frozen=True)
class FleetSpec:
    """What every device of a simulated fleet shares (JSON-ready: it is handed to the child processes).

    ``inputs_path``: an ``.npz`` with ``images`` (uint8, N x H x W or N x H x W x 3 BGR) and optionally ``labels``;
    ``feedback_every``: send the true label of every n-th prediction back (0: never; needs labels);
    ``capture``: the device's ``[capture]`` table (keys of
    :class:`~edge_sdk.device_agent.capture.CaptureSettings`; ``dir`` is ``<store_root>/<device>/capture``), None: off.
    """

    fleet: str
    mqtt_url: str
    store_root: str
    initial_bundle: str
    trusted_keys: list[str]
    inputs_path: str
    window_s: float = 1.0
    rate_hz: float = 5.0
    feedback_every: int = 0
    session_expiry_s: int = 600
    report_every_s: float = 1.0
    runtime_order: list[str] = field(default_factory=lambda: ["onnxruntime"])
    seed: int = 0
    capture: dict[str, Any] | None = None


def capture_settings(table: dict[str, Any] | None, directory: str | os.PathLike) -> Any:
    """The :class:`~edge_sdk.device_agent.capture.CaptureSettings` of a ``[capture]`` table for one device (None:
    capture off); ``dir`` is always ``directory`` (each device has its own store). ConfigError for a bad table."""
    from edge_sdk.device_agent.capture import CAPTURE_KEYS, CaptureSettings
    from edge_sdk.errors import ConfigError

    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"capture must be a [capture] table (a dict), got {type(table).__name__}")
    unknown = sorted(set(table) - set(CAPTURE_KEYS))
    if unknown:
        raise ConfigError(f"unknown [capture] key(s) {', '.join(unknown)}: valid keys are {', '.join(CAPTURE_KEYS)}")
    return CaptureSettings(**{"enabled": True, **table, "dir": str(directory)})


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


# ---- parent --------------------------------------------------------------------------------------------------------

class AgentFleet:
    """``n_devices`` real device agents in ``processes`` child processes (see the module docstring).

    ``initial_bundle``: a signed bundle archive (or directory) every device installs first; ``trusted_keys``:
    public key file(s) or directory; ``inputs``: raw uint8 images (N x H x W gray or N x H x W x 3 BGR) fed at
    ``rate_hz`` per device, ``labels`` their classes (used with ``feedback_every``); ``capture``: the devices'
    ``[capture]`` table (data capture, each device storing under ``<store_root>/<device>/capture``; a fleet started
    again on the same ``store_root`` finds what was not uploaded yet). Use as a context manager::

        with AgentFleet(50, fleet=f, mqtt_url=url, store_root=d, initial_bundle=a, trusted_keys=k,
                        inputs=x) as fleet:
            ...  # fleet.devices, fleet.reports()
        fleet.final_reports
    """

    def __init__(self, n_devices: int, *, processes: int = 2, fleet: str, mqtt_url: str,
                 store_root: str | os.PathLike, initial_bundle: str | os.PathLike,
                 trusted_keys: str | os.PathLike | Sequence[str | os.PathLike], inputs: np.ndarray,
                 labels: np.ndarray | None = None, window_s: float = 1.0, rate_hz: float = 5.0,
                 feedback_every: int = 0, device_prefix: str = "dev", session_expiry_s: int = 600,
                 start_timeout_s: float = 180.0, seed: int = 0, capture: dict[str, Any] | None = None) -> None:
        from edge_sdk.topics import validate_id

        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise AgentFleetError(f"n_devices must be a positive integer, got {n_devices!r}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise AgentFleetError(f"processes must be a positive integer, got {processes!r}")
        if not rate_hz > 0:
            raise AgentFleetError(f"rate_hz must be > 0, got {rate_hz!r}")
        images = np.asarray(inputs)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise AgentFleetError(f"inputs must be raw uint8 images N x H x W (x 3), got {images.dtype} "
                                  f"{list(images.shape)}: pass the images before preprocessing")
        if labels is not None and len(labels) != len(images):
            raise AgentFleetError(f"{len(labels)} labels for {len(images)} images: pass one label per image")
        try:
            validate_id(fleet, "fleet")
            self.devices = device_ids(n_devices, device_prefix)
            for d in self.devices:
                validate_id(d, "device")
        except ValueError as exc:
            raise AgentFleetError(str(exc)) from None
        from edge_sdk.errors import ConfigError

        try:
            capture_settings(capture, "capture")  # a bad [capture] table fails here, not in every child
        except (ConfigError, TypeError) as exc:
            raise AgentFleetError(f"capture: {exc}") from None
        if not Path(initial_bundle).exists():
            raise AgentFleetError(f"initial bundle {initial_bundle} not found: pass a signed bundle archive")
        keys = [trusted_keys] if isinstance(trusted_keys, (str, os.PathLike)) else list(trusted_keys)
        self.root = Path(store_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        inputs_path = self.root / "inputs.npz"
        arrays = {"images": images} if labels is None else {"images": images, "labels": np.asarray(labels)}
        np.savez(inputs_path, **arrays)
        self.spec = FleetSpec(fleet=fleet, mqtt_url=mqtt_url, store_root=str(self.root),
                              initial_bundle=str(Path(initial_bundle).resolve()),
                              trusted_keys=[str(Path(k).resolve()) for k in keys], inputs_path=str(inputs_path),
                              window_s=float(window_s), rate_hz=float(rate_hz), feedback_every=int(feedback_every),
                              session_expiry_s=int(session_expiry_s), seed=int(seed),
                              capture=dict(capture) if capture is not None else None)
        self.processes = min(processes, n_devices)
        self.start_timeout_s = float(start_timeout_s)
        self.ready: set[str] = set()
        self.failed: dict[str, str] = {}
        self.final_reports: dict[str, dict[str, Any]] | None = None
        self._procs: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        self._stopped: set[int] = set()
        self._cond = threading.Condition()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if msg.get("event") == "ready":
                    self.ready.add(msg["device"])
                elif msg.get("event") == "failed":
                    self.failed[msg["device"]] = msg.get("reason", "")
                elif msg.get("event") == "stopped":
                    self._stopped.add(proc.pid)
                self._cond.notify_all()

    def start(self) -> AgentFleet:
        """Start the child processes and wait until every device runs and is subscribed to its commands."""
        import edge_sdk

        spec_path = self.root / "fleet-spec.json"
        spec_path.write_text(json.dumps(asdict(self.spec), indent=1))
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        root = str(Path(edge_sdk.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        chunks = [self.devices[i::self.processes] for i in range(self.processes)]
        code = "import sys; from edge_sdk.testing.agent_fleet import _child_main; _child_main(sys.argv[1], sys.argv[2])"
        for chunk in chunks:
            proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path), ",".join(chunk)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
            self._procs.append(proc)
            reader = threading.Thread(target=self._read, args=(proc,), name=f"agent-fleet-{proc.pid}", daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + self.start_timeout_s
        with self._cond:
            while len(self.ready) + len(self.failed) < len(self.devices):
                left = deadline - time.monotonic()
                dead = [p.pid for p in self._procs if p.poll() is not None]
                if left <= 0 or dead:
                    break
                self._cond.wait(min(left, 0.5))
        if self.failed or len(self.ready) < len(self.devices):
            missing = sorted(set(self.devices) - self.ready - set(self.failed))
            self.stop()
            first = next(iter(self.failed.items()), None)
            raise AgentFleetError(f"{len(self.ready)} of {len(self.devices)} devices started"
                                  + (f"; {first[0]}: {first[1]}" if first else "")
                                  + (f"; no answer from {', '.join(missing[:5])}" if missing else "")
                                  + ": see the child processes' log above")
        return self

    def reports(self) -> dict[str, dict[str, Any]]:
        """The latest report of every device that wrote one (device -> report)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.devices:
            path = self.root / d / REPORT_NAME
            try:
                out[d] = json.loads(path.read_text())
            except (OSError, ValueError):  # not written yet
                continue
        return out

    def stop(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """Stop every device (last windows flushed) and return the final reports (also in ``final_reports``)."""
        if self.final_reports is not None:
            return self.final_reports
        for proc in self._procs:
            try:
                proc.stdin.write("stop\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (OSError, ValueError):  # the child is gone already
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("agent fleet process %d did not stop within %.0f s: killed", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join(5.0)
        self.final_reports = self.reports()
        return self.final_reports

    def __enter__(self) -> AgentFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_agent_fleet(n_devices: int, *, processes: int = 2, fleet: str, mqtt_url: str,
                    store_root: str | os.PathLike, initial_bundle: str | os.PathLike,
                    trusted_keys: str | os.PathLike | Sequence[str | os.PathLike], inputs: np.ndarray,
                    labels: np.ndarray | None = None, window_s: float = 1.0, rate_hz: float = 5.0,
                    duration_s: float | None = None, stop_event: threading.Event | None = None,
                    **options: Any) -> dict[str, dict[str, Any]]:
    """Run ``n_devices`` real device agents (see :class:`AgentFleet`) for ``duration_s`` seconds or until
    ``stop_event`` is set (whichever comes first; one of them is required); returns the final device reports."""
    if duration_s is None and stop_event is None:
        raise AgentFleetError("run_agent_fleet needs duration_s or stop_event: how long should the fleet run?")
    with AgentFleet(n_devices, processes=processes, fleet=fleet, mqtt_url=mqtt_url, store_root=store_root,
                    initial_bundle=initial_bundle, trusted_keys=trusted_keys, inputs=inputs, labels=labels,
                    window_s=window_s, rate_hz=rate_hz, **options) as agents:
        if stop_event is None:
            time.sleep(float(duration_s))  # type: ignore[arg-type]
        else:
            stop_event.wait(duration_s)  # None: until it is set
        return agents.stop()
