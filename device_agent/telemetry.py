"""The agent's telemetry: one window of aggregates every ``window_s`` seconds into the on-disk outbox.

::

    Agent.predict ──record()──> WindowAggregator ──take() every window_s──> Telemetry.emit_window()
        ──Outbox.put(edge/<fleet>/<device>/telemetry, window, sequenced=True)──> Publisher.wakeup() ──> MQTT

A window is emitted even when no inference ran (``count`` 0): it proves the device and its agent are alive.
Each window carries ``window_id`` (uuid4 hex, the collector's idempotency key); the outbox adds ``stream`` and a
gap-free ``seq`` in the same transaction that stores it, so nothing is published that was not stored first.
Events (``model.loaded`` ...) go through the same outbox on ``edge/<fleet>/<device>/events``.

Signals a client could forge are kept apart: errors the client's input caused (HTTP 4xx) are listed again in
``client_errors`` (the collector's canary judgement leaves them out), and ``/feedback`` refused for a missing or
wrong token is counted in ``feedback.rejected`` (``WindowAggregator.record_rejected_feedback``), never in accuracy.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.device_agent.aggregates import WindowAggregator
from edge_sdk.device_agent.health import read_health
from edge_sdk.errors import TelemetryError
from edge_sdk.topics import device_topic, validate_id

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
    from edge_sdk.device_agent.outbox import Outbox

__all__ = ["EVENT_SCHEMA", "SCHEMA_VERSION", "WINDOW_SCHEMA", "Telemetry", "TelemetrySettings", "default_device_id",
           "model_info"]

log = logging.getLogger("edge_sdk.agent.telemetry")

WINDOW_SCHEMA = "edge-sdk/telemetry-window"
EVENT_SCHEMA = "edge-sdk/event"
SCHEMA_VERSION = "1.0"
EVENT_LEVELS = ("info", "warning", "error")


def default_device_id() -> str:
    """This host's name made into a legal device id (``[A-Za-z0-9_.-]``, at most 64 characters)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "device"


@dataclass(frozen=True)
class TelemetrySettings:
    """How the agent reports: window length, fleet and device ids, outbox file, input sampling, and the broker.

    ``mqtt`` is a :class:`~edge_sdk.device_agent.mqtt_publisher.MqttSettings` or None (windows then stay in the
    outbox until an agent with a broker configured sends them). ``input_sample_every``: every n-th input enters
    the drift statistics.
    """

    enabled: bool = False
    window_s: float = 10.0
    fleet: str = "default"
    device: str = field(default_factory=default_device_id)
    outbox_path: str = "telemetry-outbox.db"
    input_sample_every: int = 1
    mqtt: MqttSettings | None = None

    def __post_init__(self) -> None:
        if isinstance(self.window_s, bool) or not isinstance(self.window_s, (int, float)) or not \
                0.05 <= self.window_s <= 86400:
            raise TelemetryError(f"window_s must be a number of seconds between 0.05 and 86400, got {self.window_s!r}")
        if isinstance(self.input_sample_every, bool) or not isinstance(self.input_sample_every, int) or \
                self.input_sample_every < 1:
            raise TelemetryError(f"input_sample_every must be an integer >= 1, got {self.input_sample_every!r}")
        for what in ("fleet", "device"):
            try:
                validate_id(getattr(self, what), what)
            except ValueError as exc:
                raise TelemetryError(str(exc)) from None


def model_info(agent: Agent) -> dict[str, Any]:
    """The ``model`` object of a window for a loaded agent: name, version, artifact key and runtime name."""
    m = agent.bundle.manifest
    return {"name": str(m.name)[:200], "version": str(m.version)[:100], "artifact": agent.artifact.key[:100],
            "runtime": str(agent.runtime_name)[:100]}


class Telemetry:
    """Emits one telemetry window every ``settings.window_s`` seconds from a background thread.

    ``model``: the window's ``model`` object (see :func:`model_info`); ``baseline``: the bundle manifest's
    baseline (drift statistics are kept only when it has input channels); ``outbox``: where windows and events
    are stored (an :class:`~edge_sdk.device_agent.outbox.Outbox`); ``publisher``: woken after each store (a
    :class:`~edge_sdk.device_agent.mqtt_publisher.Publisher`) or None. :attr:`aggregator` is what the agent
    feeds (:meth:`for_agent` wires both). :meth:`stop` emits the last, partial window.
    """

    def __init__(self, settings: TelemetrySettings, *, model: dict[str, Any], baseline: dict[str, Any] | None,
                 classifier: bool, num_classes: int | None = None, outbox: Outbox,
                 publisher: Publisher | None = None) -> None:
        self.settings = settings
        self.model = dict(model)
        self.outbox = outbox
        self.publisher = publisher
        self.aggregator = WindowAggregator(baseline, classifier=classifier, num_classes=num_classes,
                                           input_sample_every=settings.input_sample_every)
        self.topic = device_topic(settings.fleet, settings.device, "telemetry")
        self.events_topic = device_topic(settings.fleet, settings.device, "events")
        self.windows_emitted = 0
        self.windows_failed = 0
        #: called with every stored window's payload (data capture's drift policy reads its input PSI)
        self.on_window: Callable[[dict[str, Any]], None] | None = None
        self._disk_path = Path(settings.outbox_path).expanduser().resolve().parent
        self._window_start = time.time()
        self._emit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @classmethod
    def for_agent(cls, agent: Agent, settings: TelemetrySettings, *, outbox: Outbox,
                  publisher: Publisher | None = None) -> Telemetry:
        """Telemetry for ``agent`` (model, baseline, classifier taken from it), attached so every call is counted."""
        tel = cls(settings, model=model_info(agent), baseline=agent.bundle.manifest.baseline,
                  classifier=agent.task == "classification", num_classes=agent.num_classes, outbox=outbox,
                  publisher=publisher)
        agent.set_telemetry(tel.aggregator)
        return tel

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the window thread (the first window covers the time since construction)."""
        if self._thread is not None or self._stopped:
            return
        self._thread = threading.Thread(target=self._run, name="edge-sdk-telemetry", daemon=True)
        self._thread.start()

    def stop(self, *, final_window: bool = True) -> None:
        """Stop the window thread and emit the last, partial window (once; later calls do nothing)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if final_window:
            self.emit_window()

    def _run(self) -> None:
        period = float(self.settings.window_s)
        due = time.monotonic() + period
        while not self._stop.wait(max(due - time.monotonic(), 0.0)):
            try:
                self.emit_window()
            except Exception:  # the window loop must survive anything; logged with its traceback
                log.exception("telemetry window could not be emitted")
            due += period
            now = time.monotonic()
            if due <= now:  # fell behind (suspend, overload): skip to the next boundary instead of bursting
                log.warning("telemetry fell %.1f s behind its %.3g s window", now - due + period, period)
                due = now + period

    # ---- emitting ----------------------------------------------------------------------------------------

    def emit_window(self) -> dict[str, Any]:
        """Close the current window now: build its payload, store it (sequenced) and wake the publisher.

        Returns the payload as stored (with ``stream`` and ``seq``). Raises
        :class:`~edge_sdk.errors.TelemetryError` when the outbox cannot store it (the window's data are lost;
        ``windows_failed`` counts them).
        """
        with self._emit_lock:
            end = time.time()
            measured = self.aggregator.take()
            start, self._window_start = self._window_start, end
            s = self.settings
            payload: dict[str, Any] = {"schema": WINDOW_SCHEMA, "schema_version": SCHEMA_VERSION,
                                       "window_id": uuid.uuid4().hex, "fleet": s.fleet, "device": s.device,
                                       "model": self.model, "start": start, "end": max(end, start)}
            payload.update(measured)
            payload["health"] = read_health(self._disk_path)
            payload["dropped_windows"] = int(self.outbox.dropped)
            try:
                self.outbox.put(self.topic, payload, sequenced=True)
            except TelemetryError:
                self.windows_failed += 1
                raise
            self.windows_emitted += 1
        self._wake()
        if self.on_window is not None:
            try:
                self.on_window(payload)
            except Exception:  # a hook must not cost the window loop
                log.exception("the telemetry window hook failed")
        return payload

    def emit_event(self, kind: str, data: dict[str, Any] | None = None, level: str = "info") -> dict[str, Any]:
        """Store one event (``event.schema.json``; e.g. ``model.loaded``) and wake the publisher; returns it."""
        if not isinstance(kind, str) or not re.fullmatch(r"[a-z0-9_.]{1,60}", kind):
            raise TelemetryError(f"event kind {kind!r} must be 1-60 characters of a-z 0-9 _ .")
        if level not in EVENT_LEVELS:
            raise TelemetryError(f"event level {level!r} must be one of {', '.join(EVENT_LEVELS)}")
        payload = {"schema": EVENT_SCHEMA, "schema_version": SCHEMA_VERSION, "event_id": uuid.uuid4().hex,
                   "fleet": self.settings.fleet, "device": self.settings.device, "ts": time.time(), "kind": kind,
                   "level": level, "data": dict(data or {})}
        self.outbox.put(self.events_topic, payload)
        self._wake()
        return payload

    def _wake(self) -> None:
        if self.publisher is not None:
            self.publisher.wakeup()

    def __enter__(self) -> Telemetry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
