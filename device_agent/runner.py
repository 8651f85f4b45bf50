"""One device, start to stop: the class that `edge-sdk agent run` and the simulated test fleet both drive.

:class:`DeviceRunner` owns the whole device lifecycle so that there is one wiring of it, not one per caller::

    start():  ModelStore + Updater (recover after a crash; install the first bundle when the store is empty)
              -> Agent (the store's current version; one that does not start is rolled back to the previous)
              -> Capture ([capture]: data capture and upload, capture.py; offered every prediction and feedback)
              -> Outbox -> Publisher (MQTT; cmd/# -> Updater.on_command) -> Telemetry (model.loaded, windows)
              -> HTTP server (AgentServer, token and TLS from the config)
    run():    the input source (results as JSON lines) or wait for stop_event; then stop()
    switch:   an update or rollback switched the store -> ``on_switch`` policy:
              "swap"    (default) load the new Agent in this process, swap it in under the lock, restart
                        telemetry on it (the old window is closed with the old version), tell the publisher the new
                        model; an Agent that does not load raises, so the Updater rolls the switch back
              "restart" stop cleanly and let the caller start the process again (:func:`exec_restart`): the
                        new process starts on the store's current version through the same start()
    stop():   updater worker, HTTP server, last telemetry window, outbox delivered (up to flush_s), offline
              status, outbox and agent closed. Idempotent; SIGTERM / SIGINT call it (install_signal_handlers).

The HTTP server and the input source do not hold an agent: they ask :meth:`DeviceRunner.current_agent` for it and
run each inference under :attr:`DeviceRunner.lock`, the lock the swap assigns the new agent under. So requests
during a switch are answered by the old model until the new one (already loaded, outside the lock) is assigned,
then by the new one; the old one is closed only once no inference uses it. ``edge-sdk agent run`` and the
simulated fleet therefore run the same switch path. "restart" stays as an option: a new process returns all of
the old runtime's memory (allocator fragmentation on small devices), at the cost of an HTTP outage while it loads.

Subclasses (the test fleet) hook in with :meth:`on_update_event`, :meth:`on_command_received`,
:meth:`on_model_loaded` and :meth:`on_result`; they read :attr:`agent` under :attr:`lock`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.device_agent.config import AgentConfig, ConfigError
from edge_sdk.errors import EdgeSDKError
from edge_sdk.mqtt import redact_url

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction
    from edge_sdk.device_agent.telemetry import Telemetry

__all__ = ["SWITCH_POLICIES", "DeviceRunner", "RunnerConfig", "exec_restart"]

SWITCH_POLICIES = ("swap", "restart")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunnerConfig:
    """Everything a :class:`DeviceRunner` needs: the agent's settings plus how the device is run.

    ``agent``: the :class:`~edge_sdk.device_agent.config.AgentConfig` (bundle, runtimes, HTTP, source, telemetry,
    MQTT). ``serve_http``: start the HTTP API. ``store``: model store directory for signed over-the-air updates
    (``agent.bundle`` then installs the first model into it); ``trusted_keys`` / ``allow_unsigned``: who may sign
    them. ``on_switch``: "swap" or "restart" (module docstring). ``outbox_synchronous``: SQLite synchronous mode of
    the outbox (FULL survives power loss; NORMAL a killed process). ``flush_s``: how long stop() waits for the
    broker to acknowledge what the outbox holds.
    """

    agent: AgentConfig = field(default_factory=AgentConfig)
    serve_http: bool = False
    store: str | None = None
    trusted_keys: str | tuple[str, ...] | None = None
    allow_unsigned: bool = False
    on_switch: str = "swap"
    outbox_synchronous: str = "FULL"
    flush_s: float = 3.0

    def __post_init__(self) -> None:
        if self.on_switch not in SWITCH_POLICIES:
            raise ConfigError(f"on_switch {self.on_switch!r} is unknown: choose from {', '.join(SWITCH_POLICIES)}")

    def replace(self, **changes: Any) -> RunnerConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


class DeviceRunner:
    """Runs one device (see the module docstring): :meth:`start`, :meth:`run` or your own loop, :meth:`stop`.

    ``say`` receives the one-line progress messages meant for the operator (default: stderr).
    Attributes once started: ``agent``, ``updater`` (None without a store), ``outbox`` / ``publisher`` /
    ``telemetry`` (None without telemetry / a broker), ``server`` (None without HTTP), ``settings``.
    """

    def __init__(self, config: RunnerConfig, *, say: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self.settings = config.agent.telemetry_settings()
        self.say = say or _stderr
        self.agent: Agent | None = None
        self.updater: Any = None
        self.outbox: Any = None
        self.publisher: Any = None
        self.telemetry: Telemetry | None = None
        self.capture: Any = None  # edge_sdk.device_agent.capture.Capture when [capture] is enabled
        self.server: Any = None
        self.lock = threading.RLock()  # guards agent / telemetry swaps against inference on the agent
        self.stop_event = threading.Event()
        self.restart_requested = False
        self.started = False
        self._stopped = False
        self._stop_lock = threading.Lock()

    # ---- hooks (no-ops here; the test fleet records them) ------------------------------------------------------

    def on_update_event(self, kind: str, data: dict[str, Any], level: str) -> None:
        """Called with every Updater event (before it is sent as telemetry, if telemetry runs)."""

    def on_command_received(self, name: str, payload: dict[str, Any]) -> None:
        """Called with every MQTT command for the Updater (before it is queued)."""

    def on_model_loaded(self, agent: Agent, previous: Agent | None) -> None:
        """Called after a model was loaded and swapped in (also the first one; ``previous`` is then None)."""

    def on_result(self, name: str, prediction: Prediction) -> None:
        """One result of the input source: a JSON line on stdout."""
        print(json.dumps({"source": name, **prediction.to_json()}), flush=True)

    # ---- start -------------------------------------------------------------------------------------------------

    def start(self) -> DeviceRunner:
        """Open the store, load the agent, start telemetry and the HTTP server. Cleans up and raises on failure."""
        try:
            self._start()
        except BaseException:
            self.stop(flush_s=0)
            raise
        self.started = True
        return self

    def current_agent(self) -> Agent:
        """The agent serving now (the HTTP server and the input source call this for every inference, under
        :attr:`lock`, so a swap takes effect at once)."""
        agent = self.agent
        if agent is None:
            raise EdgeSDKError("the device has no model loaded (it is starting or stopping): retry")
        return agent

    def _start(self) -> None:
        cfg = self.config.agent
        security = None
        if self.config.serve_http:  # a missing token or a bad certificate fails before the model store and the broker
            security = cfg.http_security()
            security.check_bind(cfg.host, cfg.port, "the agent API")
            security.ssl_context()
        if self.config.store:
            self.updater = self._open_store()
        bundle = str(self.updater.current_bundle()) if self.updater is not None else cfg.bundle
        if not bundle:
            raise EdgeSDKError("no bundle: pass --bundle DIR or set `bundle` in the config file")
        agent = self._load_first(bundle)
        with self.lock:
            self.agent = agent
        self.say(f"agent: {agent.model_version} on {agent.artifact.key} with {agent.runtime_name} "
                 f"({agent.selection_reason})")
        if cfg.capture.enabled:
            self._start_capture(agent)
        if self.settings.enabled:
            self._start_reporting(agent)
        self.on_model_loaded(agent, None)
        if self.updater is not None:
            self.updater.on_switch = self._on_switch
        if self.config.serve_http:
            from edge_sdk.device_agent.server import AgentServer

            self.server = AgentServer(self.current_agent, cfg.host, cfg.port, queue_size=cfg.queue_size,
                                      max_body_bytes=cfg.max_body_bytes, security=security,
                                      workers=cfg.http_workers, lock=self.lock)
            self.server.start()
            self.say(f"agent: serving {self.server.url} (POST /predict /v2/models/NAME/infer "
                     "/v1/models/NAME:predict /score /invocations, GET /healthz /metrics /ping)")

    def _open_store(self) -> Any:
        """Recover the model store (crash-safe) and install the configured bundle into it when it is empty."""
        from edge_sdk.device_agent.updater import Updater

        cfg, store = self.config.agent, self.config.store
        keys = self.config.trusted_keys
        # the device's fleet is the one it reports in (its MQTT topics): a bundle whose signed manifest lists other
        # fleets is refused here, so a bundle released for one fleet cannot be pushed to another
        updater = Updater(store, trusted_keys=list(keys) if isinstance(keys, tuple) else keys,  # type: ignore[arg-type]
                          allow_unsigned=self.config.allow_unsigned, emit_event=self._emit_update_event,
                          runtime_order=cfg.runtime_order, artifact=cfg.artifact, threads=cfg.threads,
                          fleet=self.settings.fleet)
        self.updater = updater  # stop() closes it if what follows fails
        res = updater.recover()
        self.say(f"agent: model store {store}: {res.reason}")
        if res.version is None:
            if not cfg.bundle:
                raise EdgeSDKError(f"the model store {store} holds no verified model: pass --bundle ARCHIVE once "
                                   "to install the first one")
            updater.update(cfg.bundle)  # the first install passes the same signature and smoke checks as an update
        return updater

    def _new_agent(self, bundle: str | os.PathLike) -> Agent:
        from edge_sdk.device_agent.agent import Agent

        cfg = self.config.agent
        return Agent(bundle, runtime_order=cfg.runtime_order, artifact=cfg.artifact, threads=cfg.threads,
                     verify=cfg.verify, top_k=cfg.top_k)

    def _load_first(self, bundle: str) -> Agent:
        """The start-up model; with a store, one that does not start is rolled back to the previous version."""
        try:
            return self._new_agent(bundle)
        except EdgeSDKError as exc:
            if self.updater is None or self.updater.store.link("previous") is None:
                raise
            self.say(f"agent: the current model does not start ({exc}); rolling back")
            return self._new_agent(self.updater.rollback(reason=str(exc)))

    def _start_capture(self, agent: Agent) -> None:
        """Open the capture store, start its writer and uploader, and offer ``agent``'s predictions to it."""
        from edge_sdk.device_agent.capture import Capture

        cs = self.config.agent.capture
        if cs.drift and not self.settings.enabled:
            raise ConfigError("[capture] drift = true needs telemetry (the windows' input PSI): add a [telemetry] "
                              "table or turn drift off")
        self.capture = Capture(cs, fleet=self.settings.fleet, device=self.settings.device).start()
        agent.set_capture(self.capture)
        where = cs.upload_url or "nowhere (no upload_url: kept on the device)"
        self.say(f"agent: capturing {', '.join(cs.policies())} into {cs.dir} (cap {cs.max_bytes} bytes); "
                 f"uploading to {where}")

    def _start_reporting(self, agent: Agent) -> None:
        """Open the outbox, start the publisher (when a broker is configured) and the telemetry of ``agent``."""
        from edge_sdk.device_agent.outbox import Outbox
        from edge_sdk.device_agent.telemetry import model_info

        s = self.settings
        self.outbox = Outbox(s.outbox_path, synchronous=self.config.outbox_synchronous)
        if s.mqtt is not None:
            from edge_sdk.device_agent.mqtt_publisher import Publisher

            on_command = self._on_command if self.updater is not None else None
            self.publisher = Publisher(s.mqtt, self.outbox, model=model_info(agent), window_s=s.window_s,
                                       on_command=on_command)
            self.publisher.start()
        self.telemetry = self._new_telemetry(agent)
        self.telemetry.start()
        where = (f"MQTT {redact_url(s.mqtt.url)} as {s.fleet}/{s.device}" if self.publisher is not None
                 else "the outbox only (no broker configured: pass --mqtt or set [mqtt] url)")
        self.say(f"agent: telemetry every {s.window_s:g} s to {where}; outbox {s.outbox_path}")

    def _new_telemetry(self, agent: Agent) -> Telemetry:
        """Telemetry attached to ``agent`` (not started) with its ``model.loaded`` event stored."""
        from edge_sdk.device_agent.telemetry import Telemetry, model_info

        telemetry = Telemetry.for_agent(agent, self.settings, outbox=self.outbox, publisher=self.publisher)
        if self.capture is not None:
            telemetry.on_window = self.capture.on_window
        telemetry.emit_event("model.loaded", {**model_info(agent), "runtime_version": agent.runtime_version,
                                              "reason": agent.selection_reason[:500]})
        return telemetry

    # ---- updates and commands ----------------------------------------------------------------------------------

    def _emit_update_event(self, kind: str, data: dict[str, Any], level: str) -> None:
        self.on_update_event(kind, data, level)
        telemetry = self.telemetry
        if telemetry is not None:
            telemetry.emit_event(kind, data, level)

    def _on_command(self, name: str, payload: dict[str, Any]) -> None:
        self.on_command_received(name, payload)
        self.updater.on_command(name, payload)

    def _on_switch(self, bundle_path: Path) -> None:
        """The Updater switched the store (update or rollback): apply the ``on_switch`` policy."""
        if self.config.on_switch == "restart":
            self.restart_requested = True
            self.stop_event.set()
            return
        self._swap(bundle_path)

    def _swap(self, bundle_path: Path) -> None:
        """Load the new model, swap it in, and restart telemetry so windows carry its version.

        An EdgeSDKError (the model does not load, the outbox fails) propagates: the Updater then rolls back.
        """
        from edge_sdk.device_agent.telemetry import model_info

        agent = self._new_agent(bundle_path)
        agent.set_capture(self.capture)
        telemetry = None
        if self.outbox is not None:
            try:
                telemetry = self._new_telemetry(agent)
            except EdgeSDKError:
                agent.close()
                raise
        with self.lock:
            old_agent, old_telemetry = self.agent, self.telemetry
            self.agent, self.telemetry = agent, telemetry
        if old_telemetry is not None:
            old_telemetry.stop()  # the last, partial window of the old model
        if telemetry is not None:
            telemetry.start()
        if self.publisher is not None:
            self.publisher.model = model_info(agent)  # the birth status on the next (re)connect
        self.say(f"agent: switched to {agent.model_version} on {agent.artifact.key} with {agent.runtime_name}")
        self.on_model_loaded(agent, old_agent)
        if old_agent is not None:
            old_agent.close()

    # ---- run and stop ------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set :attr:`stop_event` (call from the main thread)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def run(self) -> bool:
        """Start (unless started), run the input source or wait for :attr:`stop_event`, then stop.

        Returns True when a model switch asks for the process to be started again (``on_switch="restart"``).
        """
        if not self.started:
            self.start()
        try:
            source = self.config.agent.source
            if source:
                from edge_sdk.device_agent.inputs import run_source

                run_source(self.current_agent, source, self.on_result, stop_event=self.stop_event, lock=self.lock)
            if not source or self.server is not None:
                self.stop_event.wait()
        finally:
            self.stop()
        return self.restart_requested

    def stop(self, flush_s: float | None = None) -> None:
        """Stop everything (see the module docstring); the last window is delivered for up to ``flush_s``."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.stop_event.set()
        flush = self.config.flush_s if flush_s is None else flush_s
        failed = None
        if self.updater is not None:
            self.updater.close()
        if self.server is not None:
            self.server.shutdown()
        if self.telemetry is not None:
            try:
                self.telemetry.stop()
            except EdgeSDKError as exc:  # the outbox could not store the last window: say so, still shut down
                failed = exc
        if self.capture is not None:
            self.capture.stop(flush_s=flush)
        if self.publisher is not None:
            if self.publisher.connected and flush > 0:
                self.publisher.flush(flush)
            self.publisher.stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.agent is not None:
            self.agent.close()
        if failed is not None:
            self.say(f"error: the last telemetry window was not stored: {failed}")

    def __enter__(self) -> DeviceRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exec_restart(argv: list[str], say: Callable[[str], Any] = _stderr) -> None:
    """Replace this process by ``python -m edge_sdk.cli *argv`` (same pid): the ``restart`` switch policy."""
    say("agent: model switched; restarting on it")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edge_sdk.cli", *argv])
