"""The agent's local HTTP API (standard library only): predict, health, Prometheus metrics.

Routes (``POST /invocations`` and ``GET /ping`` follow the SageMaker / Vertex AI / Azure ML custom
container contract, so the same image serves there):

    POST /predict, /invocations   JSON {"image": "<base64>"} | {"inputs": {name: nested list}} | {"inputs": [...]},
                                  multipart/form-data with one image file, or a raw image/* body
    POST /feedback                JSON {"prediction_id": "<id of a prediction>", "label": 3 | "tabby"}: ground truth
                                  -> 200 {"prediction_id", "correct"} | 404 unknown (or already labelled) id
    GET  /ping                    200 once the model is loaded
    GET  /healthz                 status, model version, runtime, artifact, uptime, queue depth
    GET  /metrics                 Prometheus text format 0.0.4

HTTP threads (a fixed pool, :mod:`edge_sdk.http_pool`: idle and slow sockets hold no thread and are closed at
their deadline) only read bodies: parsing the JSON / multipart / image body and inference both run on ONE worker
thread fed by a bounded queue, so a body costs CPU and memory only once admitted; a request that finds the queue
full is answered 429 (with ``Retry-After``) at once, unparsed.

With a token (:class:`~edge_sdk.httpbase.HTTPSecurity`) every route but ``/ping`` and ``/healthz`` needs it;
without one, ``POST /feedback`` is accepted from loopback clients only (ground truth steers canary judgement).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.device_agent.http_io import Metrics, parse_feedback_body, parse_multipart, parse_predict_body
from edge_sdk.errors import EdgeSDKError, HTTPError, InputError, first_line
from edge_sdk.httpbase import HTTPLimits, HTTPSecurity, HTTPServer, RequestHandler, base_url, bind, is_loopback

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["DEFAULT_MAX_BODY_BYTES", "FEEDBACK_MAX_BODY_BYTES", "PREDICT_ROUTES", "ROUTES", "AgentServer",
           "parse_multipart"]

log = logging.getLogger("edge_sdk.agent.http")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
FEEDBACK_MAX_BODY_BYTES = 16 * 1024
PREDICT_ROUTES = ("/predict", "/invocations")
ROUTES: dict[str, tuple[str, ...]] = {
    "/predict": ("POST",), "/invocations": ("POST",), "/feedback": ("POST",), "/ping": ("GET", "HEAD"),
    "/healthz": ("GET", "HEAD"), "/metrics": ("GET", "HEAD"),
}


class _Handler(RequestHandler):
    server_version = "edge-sdk-agent"
    logger = log
    public_routes = frozenset({"/ping", "/healthz"})
    server: HTTPServer

    @property
    def max_body_bytes(self) -> int:  # type: ignore[override]  # the owner's limit, for Expect: 100-continue
        return int(self.server.owner.max_body_bytes)

    def on_response(self, status: int) -> None:
        self.server.owner.metrics.request(self.route(), self.command, status)

    def on_error(self, exc: HTTPError) -> None:
        owner = self.server.owner
        owner.metrics.error(exc.kind)
        if exc.status in (401, 403) and self.route() == "/feedback":
            owner.rejected_feedback()  # counted, so forging attempts show; never in accuracy

    def handle_request(self) -> None:
        owner, route, method = self.server.owner, self.route(), self.command
        allowed = ROUTES.get(route)
        if allowed is None:
            raise HTTPError(404, "not_found", f"no route {route}: use POST /predict, POST /invocations, "
                                              f"POST /feedback, GET /ping, /healthz or /metrics")
        if method not in allowed:
            raise HTTPError(405, "method_not_allowed", f"{method} is not allowed on {route}: use "
                            f"{' or '.join(allowed)}", {"Allow": ", ".join(allowed)})
        if route in PREDICT_ROUTES:
            self.send_json(*owner.handle_predict(self))
        elif route == "/feedback":
            if self.server.token is None and not is_loopback(self.client_address[0]):
                raise HTTPError(403, "forbidden", f"POST /feedback from {self.client_address[0]} needs an API token: "
                                "configure one on the agent (--http-token-file) or send feedback from this host")
            self.send_json(*owner.handle_feedback(self))
        elif route == "/metrics":
            self.send_text(200, owner.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        elif route == "/healthz":
            self.send_json(200, owner.health())
        else:
            status = 200 if owner.ready else 503
            self.send_json(status, {"status": "ok" if status == 200 else "unavailable"})


def _follow(agent: Agent | Callable[[], Agent]) -> Callable[[], Agent]:
    """A zero-argument callable returning the agent to use: ``agent`` itself when it is one (fixed)."""
    if hasattr(agent, "predict_image"):
        return lambda: agent  # type: ignore[return-value]
    return agent  # type: ignore[return-value]


class AgentServer:
    """Serve one :class:`~edge_sdk.device_agent.agent.Agent` over HTTP.

    ``agent`` is the Agent, or a zero-argument callable returning the agent serving now (the device runner's
    :meth:`~edge_sdk.device_agent.runner.DeviceRunner.current_agent`): each request asks for it again, so a model
    swapped in by an over-the-air update serves the next request with no restart. ``lock`` (the runner's) is held
    while a request uses the agent (parsing, inference, feedback): the owner assigns a new agent under the same
    lock, so it never closes an agent a request is still using.

    Bind happens at construction (``port=0`` picks a free port; see :attr:`port` / :attr:`url`).
    ``start()`` serves from a background thread, ``serve_forever()`` from the calling thread, ``shutdown()``
    stops both the HTTP server and the inference worker. ``before_inference`` is a test hook called on the
    worker thread before each job (e.g. to hold the worker while the queue fills).

    ``security``: token and TLS (default none: loopback ``host`` only). ``workers``: HTTP threads (default
    ``queue_size + 4``: every admitted request can wait for its result while health checks are still answered).
    ``request_timeout_s`` bounds both the wait for a result (504) and receiving a request (at least 2 s).
    """

    def __init__(self, agent: Agent | Callable[[], Agent], host: str = "127.0.0.1", port: int = 8080, *,
                 queue_size: int = 8, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_timeout_s: float = 30.0,
                 security: HTTPSecurity | None = None, workers: int | None = None,
                 limits: HTTPLimits | None = None, lock: contextlib.AbstractContextManager[Any] | None = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        receive_s = max(float(request_timeout_s), 2.0)
        limits = limits or HTTPLimits(workers=workers or queue_size + 4, backlog=max(16, 2 * queue_size),
                                      header_timeout_s=min(10.0, receive_s), request_timeout_s=receive_s,
                                      max_body_bytes=int(max_body_bytes),
                                      buffer_budget_bytes=max(4 * int(max_body_bytes), 16 << 20))
        self.security = security or HTTPSecurity()
        self._current: Callable[[], Agent] = _follow(agent)
        self._lock: contextlib.AbstractContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
        self._dtypes: tuple[Agent, dict[str, str | None]] | None = None
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.metrics = Metrics(tuple(ROUTES))
        self.before_inference: Callable[[], None] | None = None
        self._queue: queue.Queue[tuple[Callable[[], Prediction], Future[Prediction]] | None] = queue.Queue(
            maxsize=queue_size)
        self._started = time.monotonic()
        self._worker: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._httpd = bind(host, port, _Handler, self, limits=limits, security=self.security, what="the agent API")
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def agent(self) -> Agent:
        """The agent serving now (read it under the owner's lock to use it)."""
        return self._current()

    def _input_dtypes(self, agent: Agent) -> dict[str, str | None]:
        """Input name -> dtype of ``agent`` (cached per agent: a swap brings other inputs)."""
        cached = self._dtypes
        if cached is None or cached[0] is not agent:
            cached = (agent, {s.name: s.dtype for s in getattr(agent, "input_specs", None) or []})
            self._dtypes = cached
        return cached[1]

    def rejected_feedback(self) -> None:
        """A ``/feedback`` refused for a missing or wrong token (401/403): counted in the agent's telemetry."""
        try:
            tel = getattr(self.agent, "telemetry", None)
        except EdgeSDKError:  # no model loaded (starting or stopping): nothing to count it in
            return
        if tel is not None:
            tel.record_rejected_feedback()

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the server (``0.0.0.0`` / ``::`` shown as the loopback address)."""
        return base_url(self.host, self.port, self.security.tls)

    @property
    def ready(self) -> bool:
        """True while the model is loaded and the worker is running."""
        return self._worker is not None and self._worker.is_alive() and not self._stopping.is_set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the inference worker (the one being run is not counted)."""
        return self._queue.qsize()

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="edge-sdk-inference", daemon=True)
            self._worker.start()

    def start(self) -> int:
        """Serve from a background thread; returns the port actually bound."""
        self._start_worker()
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="edge-sdk-http", daemon=True)
            self._thread.start()
        log.info("serving %s on %s", self.agent.model_version, self.url)
        return self.port

    def serve_forever(self) -> None:
        """Serve from the calling thread until :meth:`shutdown` (or KeyboardInterrupt)."""
        self._start_worker()
        log.info("serving %s on %s", self.agent.model_version, self.url)
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            self._stop_worker()

    def shutdown(self) -> None:
        """Stop accepting requests, cancel queued ones and stop the worker."""
        if self._thread is not None or self._worker is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._stop_worker()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _stop_worker(self) -> None:
        self._stopping.set()
        worker = self._worker
        while worker is not None and worker.is_alive():
            while True:  # cancel what is still queued (their request threads answer 503)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].cancel()
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # a request slipped in meanwhile: drain again
                continue
            worker.join(timeout=self.request_timeout_s)
            break

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- inference worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if self.before_inference is not None:
                    self.before_inference()
                future.set_result(job())
            except BaseException as exc:  # handed to the waiting request thread, which answers for it
                future.set_exception(exc)

    def submit(self, job: Callable[[], Prediction]) -> Prediction:
        """Queue ``job`` for the worker and wait for it; HTTPError 429 at once when the queue is full."""
        if self._stopping.is_set():
            raise HTTPError(503, "shutting_down", "the agent is shutting down: retry on another instance")
        future: Future[Prediction] = Future()
        try:
            self._queue.put_nowait((job, future))
        except queue.Full:
            raise HTTPError(429, "queue_full", f"inference queue is full ({self._queue.maxsize} waiting): retry "
                            f"later", {"Retry-After": "1"}) from None
        try:
            return future.result(timeout=self.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise HTTPError(504, "timeout", f"no result within {self.request_timeout_s:g} s: the device is "
                            f"overloaded, retry later") from None
        except CancelledError:
            raise HTTPError(503, "shutting_down", "the agent is shutting down: retry on another instance") from None

    # -- request handling (HTTP threads) -----------------------------------------------------------------
    def handle_predict(self, req: _Handler) -> tuple[int, dict[str, Any]]:
        """Read a predict request; parse it and run it on the worker (after admission); return (status, JSON)."""
        body = req.read_body(self.max_body_bytes)
        content_type = req.headers.get("Content-Type", "")
        try:
            pred = self.submit(self._job_for(body, content_type))
        except HTTPError as exc:  # 429 / 503 / 504 from the queue, or a 400 from parsing on the worker
            tel = getattr(self.agent, "telemetry", None) if exc.status == 400 else None
            if tel is not None and exc.status == 400:  # the request never reached the model: a bad input
                tel.record_error("input")
            raise
        except InputError as exc:
            raise HTTPError(400, "bad_input", first_line(exc, 1000)) from None
        except EdgeSDKError as exc:
            log.error("inference failed: %s", exc)
            raise HTTPError(500, "inference", first_line(exc, 1000)) from None
        except Exception as exc:  # a runtime bug must not take the server down; logged with its traceback
            log.exception("inference failed")
            raise HTTPError(500, "inference",
                            f"inference failed: {type(exc).__name__}: {first_line(exc, 1000)}") from None
        self.metrics.observe(pred.latency_ms / 1000.0)
        if not all(np.isfinite(v).all() for v in pred.outputs.values() if v.dtype.kind == "f"):
            raise HTTPError(500, "non_finite_output", "the model produced NaN or Inf outputs: check the input "
                            "range and the artifact's validation")
        return 200, pred.to_json()

    def handle_feedback(self, req: _Handler) -> tuple[int, dict[str, Any]]:
        """``POST /feedback``: give the agent the true label of an earlier prediction (answered on the HTTP thread)."""
        prediction_id, label = parse_feedback_body(req.read_body(FEEDBACK_MAX_BODY_BYTES))
        try:
            with self._lock:
                agent = self.agent
                correct = agent.feedback(prediction_id, label)
        except InputError as exc:
            raise HTTPError(400, "bad_feedback", first_line(exc, 1000)) from None
        if correct is None:
            raise HTTPError(404, "unknown_prediction", f"prediction {prediction_id[:100]!r} is unknown: it is not one "
                            f"of the last {agent.remember} predictions, or it was labelled already")
        return 200, {"prediction_id": prediction_id, "correct": correct}

    def _job_for(self, body: bytes, content_type: str) -> Callable[[], Prediction]:
        """The worker's job: parse the body (HTTPError 400) and run the current model on it, under the lock."""
        def job() -> Prediction:
            with self._lock:
                agent = self.agent
                kind, value = parse_predict_body(body, content_type, self._input_dtypes(agent))
                if kind == "image":
                    return agent.predict_image(value)  # type: ignore[arg-type]
                return agent.predict(value)  # type: ignore[arg-type]
        return job

    # -- health and metrics ------------------------------------------------------------------------------
    def _info(self) -> dict[str, str]:
        try:
            a = self.agent
        except EdgeSDKError:  # between stop and exit: no model loaded
            return {"model_version": "", "runtime": "", "artifact": ""}
        return {"model_version": str(a.model_version), "runtime": str(a.runtime_name), "artifact": a.artifact.key}

    def health(self) -> dict[str, Any]:
        """The /healthz document."""
        return {"status": "ok" if self.ready else "unavailable", **self._info(),
                "uptime_s": round(time.monotonic() - self._started, 3), "queue_depth": self.queue_depth}

    def metrics_text(self) -> str:
        """The /metrics document."""
        return self.metrics.render(queue_depth=self.queue_depth, info=self._info(),
                                   uptime_s=time.monotonic() - self._started)
