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

The shared spec is in :mod:`~edge_sdk.testing.fleet_spec`, the simulated device and the child process in
:mod:`~edge_sdk.testing.fleet_device`; their public names are importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import AgentFleetError
from edge_sdk.testing.fleet_device import FleetDevice, _child_main  # noqa: F401  (the child runs it from here)
from edge_sdk.testing.fleet_spec import REPORT_NAME, FleetSpec, capture_settings, device_ids

__all__ = ["AgentFleet", "AgentFleetError", "FleetDevice", "FleetSpec", "capture_settings", "device_ids",
           "run_agent_fleet"]

log = logging.getLogger("edge_sdk.testing.agent_fleet")

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
