"""``edge-sdk pipeline serve``: start a pipeline run when the collector's alert webhook says so.

Listens for alert POSTs (any path but ``/status`` and ``/healthz``; ``/alerts`` by convention) in Alertmanager's
webhook format version 4 (``{"version": "4", "status", "alerts": [{"status", "labels": {"alertname", "fleet",
...}}]}``) and in the collector's earlier body (``{"event": "alert.opened|alert.resolved", "alert": {"rule",
"fleet", "state", ...}}``). A *firing* alert whose ``alertname`` is in ``--on``, from one of the configured
fleets (``[triggers] fleets``, default ``[deploy] fleet``) and, when labelled, for this model, starts a run in a
background thread — unless one is running (the alert is recorded as ``coalesced``: never a second queued run), the
model's lock is held by another process (``busy``), or the last run ended less than ``[triggers] cooldown`` ago
(``cooldown``). Resolved alerts and other alert names are ``ignored``. Every decision is kept (last 1000, and
appended to ``<[pipeline] workdir>/<model>/serve.jsonl``).

Hostile input: bodies over 256 KiB (413), without Content-Length (411), not JSON or not an alert body (400, one
line), more than 1000 alerts (400); with a token (``--token-file``) every route but ``/healthz`` needs it (401).

Answers: ``202 {"action": "started", "run_id", "workdir"}``, ``200 {"action": "coalesced" | "busy" | "cooldown" |
"ignored", "reason"}``; ``GET /status`` the running run, the last runs and the counters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from edge_sdk import safe_json
from edge_sdk.errors import HTTPError, first_line
from edge_sdk.httpbase import HTTPLimits, HTTPSecurity, RequestHandler, base_url, bind
from edge_sdk.pipeline.config import PipelineConfig
from edge_sdk.pipeline.errors import PipelineBusy
from edge_sdk.pipeline.runner import lock_path, new_run_id, run_pipeline

__all__ = ["MAX_ALERTS", "MAX_BODY_BYTES", "Alert", "PipelineServer", "parse_alerts"]

log = logging.getLogger("edge_sdk.pipeline.serve")

MAX_BODY_BYTES = 256 * 1024
MAX_ALERTS = 1000
_MAX_LABEL = 512


@dataclass(frozen=True)
class Alert:
    """One alert of a webhook body, whatever its format."""

    alertname: str
    firing: bool
    fleet: str | None
    device: str | None
    model: str | None
    labels: dict[str, str]


def _label(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_LABEL:
        raise HTTPError(400, "bad_request", f"{what} must be a string of at most {_MAX_LABEL} characters")
    return value


def _labels(obj: Any, where: str) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or len(obj) > 100:
        raise HTTPError(400, "bad_request", f"{where} must be an object of at most 100 string labels")
    return {str(k)[:_MAX_LABEL]: _label(v, f"{where}.{k}") or "" for k, v in obj.items()}


def parse_alerts(body: bytes) -> tuple[str, list[Alert]]:
    """(format, alerts) of a webhook body: ``"alertmanager-v4"`` or ``"edge-sdk-v1"``; HTTPError 400 otherwise."""
    try:
        doc = safe_json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, "bad_request", f"the body is not JSON ({first_line(exc)}): send the alert webhook "
                        "body") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, "bad_request", "the body must be a JSON object (an Alertmanager v4 webhook body)")
    if "alerts" in doc:
        version = doc.get("version")
        if version is not None and str(version) != "4":
            raise HTTPError(400, "bad_request", f"webhook version {str(version)[:20]!r} is not supported: send "
                            "Alertmanager's version 4")
        alerts = doc["alerts"]
        if not isinstance(alerts, list) or len(alerts) > MAX_ALERTS:
            raise HTTPError(400, "bad_request", f"alerts must be a list of at most {MAX_ALERTS} objects")
        common = _labels(doc.get("commonLabels"), "commonLabels")
        group_status = doc.get("status")
        out = []
        for i, a in enumerate(alerts):
            if not isinstance(a, dict):
                raise HTTPError(400, "bad_request", f"alerts[{i}] must be an object")
            labels = {**common, **_labels(a.get("labels"), f"alerts[{i}].labels")}
            status = a.get("status", group_status)
            if status not in ("firing", "resolved"):
                raise HTTPError(400, "bad_request", f"alerts[{i}].status must be firing or resolved")
            name = labels.get("alertname")
            if not name:
                raise HTTPError(400, "bad_request", f"alerts[{i}] has no alertname label")
            out.append(Alert(name, status == "firing", labels.get("fleet"), labels.get("device"),
                             labels.get("model") or labels.get("model_name"), labels))
        return "alertmanager-v4", out
    if "event" in doc and isinstance(doc.get("alert"), dict):
        a = doc["alert"]
        event = _label(doc["event"], "event")
        rule = _label(a.get("rule"), "alert.rule")
        if event not in ("alert.opened", "alert.resolved") or not rule:
            raise HTTPError(400, "bad_request", "event must be alert.opened or alert.resolved, with alert.rule")
        firing = event == "alert.opened" and a.get("state", "open") == "open"
        labels = {"alertname": rule, **{k: v for k in ("fleet", "device", "severity", "model", "model_version")
                                        if (v := _label(a.get(k), f"alert.{k}")) is not None}}
        return "edge-sdk-v1", [Alert(rule, firing, labels.get("fleet"), labels.get("device"), labels.get("model"),
                                     labels)]
    raise HTTPError(400, "bad_request", "neither an Alertmanager webhook body (version 4, with alerts) nor an "
                    "edge-sdk collector alert (event, alert)")


class _Handler(RequestHandler):
    server: Any
    logger = log
    max_body_bytes = MAX_BODY_BYTES
    public_routes = frozenset({"/healthz"})

    def handle_request(self) -> None:
        app: PipelineServer = self.server.owner
        route = self.route()
        if route == "/healthz" and self.command in ("GET", "HEAD"):
            self.send_json(200, {"ok": True})
            return
        if route == "/status":
            if self.command not in ("GET", "HEAD"):
                raise HTTPError(405, "method_not_allowed", "use GET /status", {"Allow": "GET, HEAD"})
            self.send_json(200, app.status())
            return
        if self.command != "POST":
            raise HTTPError(405, "method_not_allowed", f"{self.command} is not allowed: POST the alert webhook body "
                            "to /alerts", {"Allow": "POST"})
        fmt, alerts = parse_alerts(self.read_body())
        status, answer = app.on_alerts(fmt, alerts)
        self.send_json(status, answer)


class PipelineServer:
    """The alert listener of one pipeline (module doc). ``with PipelineServer(cfg, port=0) as s: s.url``."""

    def __init__(self, config: PipelineConfig, host: str = "127.0.0.1", port: int = 9095, *,
                 on: tuple[str, ...] | None = None, security: HTTPSecurity | None = None,
                 limits: HTTPLimits | None = None) -> None:
        self.config = config
        self.on = tuple(on) if on else config.triggers.on
        self.fleets = config.trigger_fleets()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running: dict[str, Any] | None = None
        self._last_finished: float | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)
        self.runs: deque[dict[str, Any]] = deque(maxlen=100)
        self.counts: dict[str, int] = {}
        self._log_path = config.workdir / config.model.name / "serve.jsonl"
        self.httpd = bind(host, port, _Handler, self, security=security or HTTPSecurity(), what="the pipeline webhook",
                          limits=limits or HTTPLimits(workers=2, backlog=16, max_body_bytes=MAX_BODY_BYTES))
        self._serve_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the listener."""
        host, port = self.httpd.server_address[:2]
        return base_url(host, port, self.httpd.ssl_context is not None)

    # -- decisions -----------------------------------------------------------------------------------------------
    def _note(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"at": time.time(), **entry}
        self.history.append(entry)
        self.counts[entry["action"]] = self.counts.get(entry["action"], 0) + 1
        with contextlib.suppress(OSError):
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "a") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")
        return entry

    def _relevant(self, a: Alert) -> str | None:
        """None when ``a`` should start a run, else why not."""
        if not a.firing:
            return "resolved"
        if a.alertname not in self.on:
            return f"alertname {a.alertname} is not one of {','.join(self.on)}"
        if self.fleets and a.fleet not in self.fleets:
            return f"fleet {a.fleet} is not one of {','.join(self.fleets)}"
        if a.model is not None and a.model != self.config.model.name:
            return f"model {a.model} is not {self.config.model.name}"
        return None

    def _lock_held(self) -> bool:
        path = lock_path(self.config)
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def on_alerts(self, fmt: str, alerts: list[Alert]) -> tuple[int, dict[str, Any]]:
        """Decide what a webhook body does (module doc); returns (HTTP status, answer)."""
        why = [(a, self._relevant(a)) for a in alerts]
        firing = [a for a, w in why if w is None]
        base = {"format": fmt, "alerts": len(alerts), "matching": len(firing)}
        if not firing:
            reasons = sorted({w for _, w in why if w}) or ["no alerts"]
            entry = self._note({**base, "action": "ignored", "reason": "; ".join(reasons)[:300]})
            return 200, entry
        first = firing[0]
        trig = {"kind": "alert", "format": fmt, "alertname": first.alertname, "fleet": first.fleet,
                "device": first.device, "alerts": len(firing), "received_at": time.time()}
        with self._lock:
            if self._running is not None:
                entry = self._note({**base, "action": "coalesced", "run_id": self._running["run_id"],
                                    "reason": f"run {self._running['run_id']} is in progress", "trigger": trig})
                return 200, entry
            cooldown = self.config.triggers.cooldown_s
            if self._last_finished is not None and time.time() - self._last_finished < cooldown:
                entry = self._note({**base, "action": "cooldown", "reason": f"the last run ended "
                                    f"{time.time() - self._last_finished:.0f} s ago (cooldown {cooldown:g} s)"})
                return 200, entry
            if self._lock_held():
                entry = self._note({**base, "action": "busy", "reason": "another process holds the pipeline lock "
                                    f"of {self.config.model.name} (a manual or scheduled run)"})
                return 200, entry
            run_id = new_run_id()
            workdir = self.config.workdir / self.config.model.name / run_id
            self._running = {"run_id": run_id, "workdir": str(workdir), "started_at": time.time(), "trigger": trig}
            self._thread = threading.Thread(target=self._run, args=(run_id, workdir, trig), daemon=True,
                                            name=f"pipeline-{run_id}")
            self._thread.start()
            entry = self._note({**base, "action": "started", "run_id": run_id, "workdir": str(workdir),
                                "trigger": trig})
            return 202, entry

    def _run(self, run_id: str, workdir: Any, trigger: dict[str, Any]) -> None:
        outcome: dict[str, Any] = {"run_id": run_id, "workdir": str(workdir)}
        try:
            result = run_pipeline(self.config, workdir=workdir, trigger=trigger, run_id=run_id)
            outcome.update(status=result.status, error=result.error, version=result.record.get("version"))
        except PipelineBusy as exc:
            outcome.update(status="busy", error=str(exc))
        except Exception as exc:  # the boundary of the background run: record it, keep serving
            log.exception("pipeline run %s crashed", run_id)
            outcome.update(status="failed", error=f"{type(exc).__name__}: {first_line(exc)}")
        finally:
            with self._lock:
                self._running = None
                self._last_finished = time.time()
                outcome["finished_at"] = self._last_finished
                self.runs.append(outcome)
            log.info("pipeline run %s ended: %s", run_id, outcome.get("status"))

    def status(self) -> dict[str, Any]:
        """The listener's state: the run in progress, the last runs, counters and the last decisions."""
        with self._lock:
            return {"model": self.config.model.name, "on": list(self.on), "fleets": list(self.fleets),
                    "running": self._running, "runs": list(self.runs)[-20:], "counts": dict(self.counts),
                    "recent": list(self.history)[-20:]}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for the run in progress (if any) to end; True when idle."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self._running is None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> PipelineServer:
        """Serve in a background thread."""
        self._serve_thread = threading.Thread(target=self.httpd.serve_forever, name="pipeline-webhook", daemon=True)
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (a run in progress continues until it ends; :meth:`wait_idle` waits for it)."""
        if self._serve_thread is not None:
            self.httpd.shutdown()
            self._serve_thread.join(timeout=5)
            self._serve_thread = None
        self.httpd.server_close()

    def __enter__(self) -> PipelineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
