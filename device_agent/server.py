"""The agent's local HTTP API (standard library only): predict in the agent's own format and in the standard
serving protocols, feedback, health, Prometheus metrics.

Routes (the standard ones let other people's clients work unchanged; the protocol logic lives in
:mod:`edge_sdk.device_agent.protocols`, one module per protocol):

    POST /predict, /invocations,  JSON {"image": "<base64>"} | {"inputs": {name: nested list}} | {"inputs": [...]}
         /score                   (-> the prediction: id, outputs, class, label, confidence, top_k) or TF Serving /
                                  Vertex {"instances": [...]} (-> {"predictions": [...]}); multipart/form-data with
                                  one image file; a raw image/*, application/x-image or octet-stream body; or an
                                  application/x-npy array. /invocations (SageMaker) also honours Accept:
                                  application/json (default) or application/x-npy (the one output as .npy);
                                  /score is Azure ML's scoring route
    POST /feedback                JSON {"prediction_id": "<id of a prediction>", "label": 3 | "tabby"}: ground truth
                                  -> 200 {"prediction_id", "correct"} | 404 unknown (or already labelled) id
    GET  /ping                    200 once the model is loaded (SageMaker / Vertex / Azure health probe)
    GET  /healthz                 status, model version, runtime, artifact, uptime, queue depth
    GET  /metrics                 Prometheus text format 0.0.4
    Open Inference Protocol v2 (KServe / Triton / OpenVINO Model Server clients; protocols/oip_v2.py):
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}][/ready]
    POST /v2/models/{name}[/versions/{v}]/infer      JSON or binary tensors (Inference-Header-Content-Length)
    TF Serving (protocols/tf_serving.py):
    POST /v1/models/{name}[/versions/{v}]:predict    {"instances"} -> {"predictions"} | {"inputs"} -> {"outputs"}
    GET  /v1/models/{name}[/versions/{v}]            model version status
    Vertex AI: $AIP_PREDICT_ROUTE answers like :predict, $AIP_HEALTH_ROUTE like /ping (when set)

HTTP threads (a fixed pool, :mod:`edge_sdk.http_pool`: idle and slow sockets hold no thread and are closed at
their deadline) only read bodies: parsing any predict or infer body (JSON, multipart, image, .npy, v2 binary) and
inference both run on ONE worker thread fed by a bounded queue, so a body costs CPU and memory only once admitted;
a request that finds the queue full is answered 429 (with ``Retry-After``) at once, unparsed. Every route shares
the body limit, the token and the one-line error body ``{"error": "..."}`` (also the v2 and TF Serving error body).

With a token (:class:`~edge_sdk.httpbase.HTTPSecurity`) every route but the health probes (``/ping``,
``/healthz``, ``/v2/health/live|ready``, ``$AIP_HEALTH_ROUTE``) needs it; without one, ``POST /feedback`` is
accepted from loopback clients only (ground truth steers canary judgement).
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
from typing import TYPE_CHECKING, Any, TypeVar

from edge_sdk.device_agent.http_io import Metrics, parse_feedback_body, parse_multipart, parse_predict_body
from edge_sdk.device_agent.protocols import oip_v2, sagemaker, tf_serving
from edge_sdk.device_agent.protocols.base import (
    Outcome,
    Reply,
    RouteTable,
    ServedModel,
    finite,
    json_reply,
    served_model,
)
from edge_sdk.errors import ConfigError, EdgeSDKError, HTTPError, InputError, first_line
from edge_sdk.httpbase import HTTPLimits, HTTPSecurity, HTTPServer, RequestHandler, base_url, bind, is_loopback

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent

__all__ = ["DEFAULT_MAX_BODY_BYTES", "FEEDBACK_MAX_BODY_BYTES", "PREDICT_ROUTES", "ROUTES", "AgentServer",
           "parse_multipart"]

log = logging.getLogger("edge_sdk.agent.http")
_T = TypeVar("_T")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
FEEDBACK_MAX_BODY_BYTES = 16 * 1024
PREDICT_ROUTES = ("/predict", "/invocations", "/score")
#: Route (a path, or a template of :mod:`~edge_sdk.device_agent.protocols`) -> allowed methods; the route is also
#: the ``route`` label of the request metrics.
ROUTES: dict[str, tuple[str, ...]] = {
    "/predict": ("POST",), "/invocations": ("POST",), "/score": ("POST",), "/feedback": ("POST",),
    "/ping": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"), "/metrics": ("GET", "HEAD"),
    **oip_v2.ROUTES, **tf_serving.ROUTES,
}
_TABLE = RouteTable(ROUTES)
_PUBLIC = frozenset({"/ping", "/healthz", *oip_v2.PUBLIC_ROUTES})


class _Handler(RequestHandler):
    server_version = "edge-sdk-agent"
    logger = log
    server: HTTPServer

    @property
    def max_body_bytes(self) -> int:  # type: ignore[override]  # the owner's limit, for Expect: 100-continue
        return int(self.server.owner.max_body_bytes)

    @property
    def public_routes(self) -> frozenset[str]:  # type: ignore[override]  # the owner's (Vertex adds one)
        return self.server.owner.public_routes  # type: ignore[no-any-return]

    def on_response(self, status: int) -> None:
        found = self.server.owner.resolve(self.route())
        self.server.owner.metrics.request(found[0] if found else self.route(), self.command, status)

    def on_error(self, exc: HTTPError) -> None:
        owner = self.server.owner
        owner.metrics.error(exc.kind)
        if exc.status in (401, 403) and self.route() == "/feedback":
            owner.rejected_feedback()  # counted, so forging attempts show; never in accuracy

    def send_reply(self, reply: Reply) -> None:
        """Send a protocol module's answer."""
        self.send_body(reply.status, reply.body, reply.content_type, reply.headers)

    def handle_request(self) -> None:
        owner, route, method = self.server.owner, self.route(), self.command
        found = owner.resolve(route)
        if found is None:
            raise HTTPError(404, "not_found", f"no route {route}: use POST /predict, /invocations, /score, "
                            "/v2/models/{name}/infer or /v1/models/{name}:predict, POST /feedback, GET /ping, "
                            "/healthz, /metrics or /v2/...")
        label, params = found
        allowed = ROUTES[label]
        if method not in allowed:
            raise HTTPError(405, "method_not_allowed", f"{method} is not allowed on {route}: use "
                            f"{' or '.join(allowed)}", {"Allow": ", ".join(allowed)})
        if label in PREDICT_ROUTES:
            self.send_reply(owner.handle_predict(self, label))
        elif label.startswith(("/v2", "/v1/")):
            self.send_reply(owner.handle_protocol(self, label, params))
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
    ``vertex``: Vertex AI's predict and health routes (default: ``AIP_PREDICT_ROUTE`` / ``AIP_HEALTH_ROUTE`` from
    the environment, when set).
    """

    def __init__(self, agent: Agent | Callable[[], Agent], host: str = "127.0.0.1", port: int = 8080, *,
                 queue_size: int = 8, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_timeout_s: float = 30.0,
                 security: HTTPSecurity | None = None, workers: int | None = None,
                 limits: HTTPLimits | None = None, lock: contextlib.AbstractContextManager[Any] | None = None,
                 vertex: tf_serving.VertexRoutes | None = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._custom, self.public_routes = self._vertex_routes(vertex or tf_serving.VertexRoutes.from_env())
        receive_s = max(float(request_timeout_s), 2.0)
        limits = limits or HTTPLimits(workers=workers or queue_size + 4, backlog=max(16, 2 * queue_size),
                                      header_timeout_s=min(10.0, receive_s), request_timeout_s=receive_s,
                                      max_body_bytes=int(max_body_bytes),
                                      buffer_budget_bytes=max(4 * int(max_body_bytes), 16 << 20))
        self.security = security or HTTPSecurity()
        self._current: Callable[[], Agent] = _follow(agent)
        self._lock: contextlib.AbstractContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
        self._dtypes: tuple[Agent, dict[str, str | None]] | None = None
        self._served: tuple[Agent, ServedModel] | None = None
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.metrics = Metrics(tuple(ROUTES))
        self.before_inference: Callable[[], None] | None = None
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(
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

    @staticmethod
    def _vertex_routes(vertex: tf_serving.VertexRoutes) -> tuple[dict[str, str], frozenset[str]]:
        """(custom path -> route it is answered as, public paths) for Vertex AI's routes; ConfigError on a clash."""
        custom: dict[str, str] = {}
        public = set(_PUBLIC)
        if vertex.predict is not None:
            found = _TABLE.match(vertex.predict)
            if found is None:
                custom[vertex.predict] = "/v1/models/{name}:predict"
            elif found[0] not in PREDICT_ROUTES and not found[0].endswith(":predict"):
                raise ConfigError(f"AIP_PREDICT_ROUTE={vertex.predict} is the agent's {found[0]} route: choose "
                                  "another path, or /predict")
        if vertex.health is not None:
            found = _TABLE.match(vertex.health)
            if found is None:
                custom[vertex.health] = "/ping"
            elif found[0] not in ("/ping", "/healthz", *oip_v2.PUBLIC_ROUTES):
                raise ConfigError(f"AIP_HEALTH_ROUTE={vertex.health} is the agent's {found[0]} route: choose "
                                  "another path, or /ping")
            public.add(vertex.health)
        return custom, frozenset(public)

    def resolve(self, path: str) -> tuple[str, dict[str, str]] | None:
        """``(route, parameters)`` of a request path (a Vertex route resolves to the route it is answered as)."""
        if path in self._custom:
            return self._custom[path], {}
        return _TABLE.match(path)

    def served(self, agent: Agent) -> ServedModel:
        """The name, version and tensors of ``agent`` as the protocols give them (cached per agent)."""
        cached = self._served
        if cached is None or cached[0] is not agent:
            cached = (agent, served_model(agent))
            self._served = cached
        return cached[1]

    def _served_now(self) -> tuple[Agent, ServedModel]:
        """The agent serving now and its :meth:`served` model; HTTPError 503 when none is loaded."""
        try:
            agent = self.agent
        except EdgeSDKError as exc:  # starting or stopping
            raise HTTPError(503, "unavailable", f"no model is loaded ({first_line(exc, 200)}): retry later") from None
        return agent, self.served(agent)

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

    def submit(self, job: Callable[[], _T]) -> _T:
        """Queue ``job`` for the worker and wait for it; HTTPError 429 at once when the queue is full."""
        if self._stopping.is_set():
            raise HTTPError(503, "shutting_down", "the agent is shutting down: retry on another instance")
        future: Future[_T] = Future()
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
    def run(self, job: Callable[[Agent], Outcome]) -> Reply:
        """Run ``job`` (parse a body and predict) on the worker with the agent serving now, under the lock; record
        the latencies; refuse NaN / Inf outputs; render the answer (on the calling HTTP thread)."""
        def locked() -> Outcome:
            with self._lock:
                return job(self.agent)
        try:
            outcome = self.submit(locked)
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
        for pred in outcome.predictions:
            self.metrics.observe(pred.latency_ms / 1000.0)
        if not all(finite(pred.outputs.values()) for pred in outcome.predictions):
            raise HTTPError(500, "non_finite_output", "the model produced NaN or Inf outputs: check the input "
                            "range and the artifact's validation")
        return outcome.render()

    def handle_predict(self, req: _Handler, route: str = "/predict") -> Reply:
        """``POST /predict``, ``/invocations``, ``/score``: read the body; parse it and run it on the worker (after
        admission). ``/invocations`` answers in the type its ``Accept`` header asks for (SageMaker)."""
        body = req.read_body(self.max_body_bytes)
        content_type = req.headers.get("Content-Type", "")
        answer = sagemaker.JSON
        if route == "/invocations":
            answer = sagemaker.response_type(req.headers.get("Accept"), len(self._served_now()[1].outputs))
        return self.run(self._job_for(body, content_type, answer))

    def handle_protocol(self, req: _Handler, route: str, params: dict[str, str]) -> Reply:
        """A route of the Open Inference Protocol v2 (``/v2...``) or of TF Serving (``/v1/models...``)."""
        name, version = params.get("name"), params.get("version")
        if route == "/v2":
            return json_reply(oip_v2.server_metadata())
        if route == "/v2/health/live":
            return json_reply({"live": True})
        if route == "/v2/health/ready":
            return json_reply({"ready": self.ready}, 200 if self.ready else 503)
        if route.endswith(("/infer", ":predict")):
            body = req.read_body(self.max_body_bytes)
            if route.endswith(":predict"):
                return self.run(lambda agent: tf_serving.predict(agent, self.served(agent), body, name=name,
                                                                 version=version))
            length, encoding = req.headers.get(oip_v2.HEADER_LENGTH), req.headers.get("Content-Encoding")
            return self.run(lambda agent: oip_v2.infer(agent, self.served(agent), body, name=str(name),
                                                       version=version, header_length=length,
                                                       content_encoding=encoding, max_bytes=self.max_body_bytes))
        model = self._served_now()[1]
        model.check(str(name), version)
        if route.startswith("/v1/"):
            return json_reply(tf_serving.model_status(model, self.ready))
        if route.endswith("/ready"):
            return json_reply({"name": model.name, "ready": self.ready}, 200 if self.ready else 503)
        return json_reply(oip_v2.model_metadata(model))

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

    def _job_for(self, body: bytes, content_type: str, answer: str = sagemaker.JSON) -> Callable[[Agent], Outcome]:
        """The worker's job for a predict route: parse the body (HTTPError 400) and run the model on it."""
        def job(agent: Agent) -> Outcome:
            kind, value = parse_predict_body(body, content_type, self._input_dtypes(agent))
            if kind == "instances":
                return tf_serving.predict_document(agent, value)
            pred = agent.predict_image(value) if kind == "image" else agent.predict(value)
            if answer == sagemaker.NPY:
                return Outcome([pred], lambda: sagemaker.npy_reply(pred))
            return Outcome([pred], lambda: json_reply(pred.to_json()))
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
        """The /metrics document (edge_sdk/device_agent/metrics.py: the serving agent's counts, any source)."""
        try:
            agent: Agent | None = self.agent
        except EdgeSDKError:  # between stop and exit: no model loaded
            agent = None
        return self.metrics.render(queue_depth=self.queue_depth, info=self._info(),
                                   uptime_s=time.monotonic() - self._started, agent=agent)
