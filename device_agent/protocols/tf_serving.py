"""TensorFlow Serving REST predict (also Vertex AI's custom-container contract) on the agent.

    POST /v1/models/{name}[/versions/{v}]:predict   {"instances": [...]} -> {"predictions": [...]}   (row format)
                                                    {"inputs": ...}      -> {"outputs": ...}         (columnar)
    GET  /v1/models/{name}[/versions/{v}]           {"model_version_status": [{"version", "state", "status"}]}

Row format: each instance is one example without the batch dimension (a nested list for a one-input model, or
``{"<input>": value, ...}``; one that already has the model's full rank is run as given), or an encoded image as
``{"b64": "<base64>"}`` (also under the input's name) for a one-input model whose bundle records its preprocessing.
Instances run one by one on the inference worker (at most :data:`MAX_INSTANCES` per request); each prediction is
the output row (one output) or ``{"<output>": row}``. Columnar: ``inputs`` is the full tensor (or
``{"<input>": tensor}``) and is run once. ``signature_name`` and Vertex's ``parameters`` are accepted and ignored
(a bundle has one signature). Errors are TF Serving's ``{"error": "<one line>"}``.

Vertex AI sets ``AIP_HTTP_PORT`` (the port to listen on: :func:`vertex_port`, read by ``edge-sdk agent run``),
``AIP_PREDICT_ROUTE`` (answered like ``:predict`` for the model served) and ``AIP_HEALTH_ROUTE`` (like ``/ping``,
no token): :class:`VertexRoutes`. ``POST /predict``, ``/invocations`` and ``/score`` also take an ``instances``
body, so a Vertex route that is one of them keeps working.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.device_agent.http_io import to_array
from edge_sdk.device_agent.protocols.base import Outcome, Reply, ServedModel, json_reply, load_json
from edge_sdk.errors import ConfigError, HTTPError, InputError, first_line

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["MAX_INSTANCES", "ROUTES", "VertexRoutes", "model_status", "predict", "predict_document", "vertex_port"]

#: Most instances one request may carry: each is one inference on the device's single worker.
MAX_INSTANCES = 64
_V = "/versions/{version}"
ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/models/{name}": ("GET", "HEAD"), f"/v1/models/{{name}}{_V}": ("GET", "HEAD"),
    "/v1/models/{name}:predict": ("POST",), f"/v1/models/{{name}}{_V}:predict": ("POST",),
}
_USAGE = 'send {"instances": [<example>, ...]} or {"inputs": <tensor> | {"<input>": <tensor>}}'


def _bad(message: str, kind: str = "bad_input") -> HTTPError:
    return HTTPError(400, kind, message)


# -- Vertex AI -------------------------------------------------------------------------------------------------
def _route(environ: Mapping[str, str], key: str) -> str | None:
    value = environ.get(key, "").strip()
    if not value:
        return None
    if not value.startswith("/") or len(value) > 1024 or not value.isprintable() or "?" in value:
        raise ConfigError(f"{key}={value[:80]!r} is not a URL path: set it to a path such as /predict")
    return value.rstrip("/") or "/"


@dataclass(frozen=True)
class VertexRoutes:
    """The predict and health routes Vertex AI asks a custom container to serve (None: not set)."""

    predict: str | None = None
    health: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> VertexRoutes:
        """``AIP_PREDICT_ROUTE`` and ``AIP_HEALTH_ROUTE`` (ConfigError when one is not a URL path)."""
        env = os.environ if environ is None else environ
        return cls(_route(env, "AIP_PREDICT_ROUTE"), _route(env, "AIP_HEALTH_ROUTE"))


def vertex_port(environ: Mapping[str, str] | None = None) -> int | None:
    """``AIP_HTTP_PORT`` (the port Vertex AI sends requests to), or None when it is not set; ConfigError."""
    value = (os.environ if environ is None else environ).get("AIP_HTTP_PORT", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"AIP_HTTP_PORT={value[:20]!r} is not a TCP port: set it to a number 1-65535")
    return int(value)


# -- status ----------------------------------------------------------------------------------------------------
def model_status(model: ServedModel, serving: bool) -> dict[str, Any]:
    """``GET /v1/models/{name}[/versions/{v}]`` of the model served (the caller checked the name and version)."""
    return {"model_version_status": [{"version": model.version, "state": "AVAILABLE" if serving else "UNAVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


# -- predict ---------------------------------------------------------------------------------------------------
def _b64(where: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise _bad(f'{where}: "b64" must be a base64 string of a JPEG or PNG file')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f'{where}: "b64" is not valid base64: encode the file bytes with standard base64') from None


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _image(agent: Agent, where: str, value: dict[str, Any]) -> bytes:
    if agent.preprocessing is None or len(agent.input_names) != 1:
        raise _bad(f"{where}: an encoded image needs a one-input model whose bundle records its preprocessing: send "
                   "tensors instead")
    return _b64(where, value["b64"])


def _tensors(agent: Agent, where: str, value: Any, *, row: bool) -> dict[str, np.ndarray]:
    """Input name -> array of one instance (``row``: the batch dimension added when it is missing) or of the
    columnar ``inputs``."""
    names = list(agent.input_names)
    if isinstance(value, dict):
        given = {str(k): v for k, v in value.items()}
        if sorted(given) != sorted(names):
            raise _bad(f"{where} names inputs {', '.join(map(repr, list(given)[:8]))}: the model takes "
                       f"{', '.join(map(repr, names))}")
    elif len(names) == 1:
        given = {names[0]: value}
    else:
        raise _bad(f"{where}: the model takes {len(names)} inputs: send {{\"<input>\": value, ...}} for "
                   f"{', '.join(map(repr, names))}")
    out: dict[str, np.ndarray] = {}
    for spec in agent.input_specs:
        try:
            arr = to_array(spec.name, given[spec.name], spec.dtype)
        except InputError as exc:
            raise _bad(f"{where}: {first_line(exc, 500)}") from None
        out[spec.name] = arr[None] if row and arr.ndim == len(spec.shape) - 1 else arr
    return out


def _rows(pred: Prediction) -> list[Any]:
    outs = pred.outputs
    n = min((v.shape[0] for v in outs.values() if v.ndim), default=1)
    if len(outs) == 1:
        (v,) = outs.values()
        return [v[i].tolist() for i in range(n)] if v.ndim else [v.tolist()]
    return [{k: (v[i].tolist() if v.ndim else v.tolist()) for k, v in outs.items()} for i in range(n)]


def _run_rows(agent: Agent, instances: Any) -> Outcome:
    if not isinstance(instances, list) or not instances:
        raise _bad(f'"instances" must be a non-empty list: {_USAGE}')
    if len(instances) > MAX_INSTANCES:
        raise _bad(f"{len(instances)} instances: send at most {MAX_INSTANCES} per request")
    jobs: list[bytes | dict[str, np.ndarray]] = []
    single = agent.input_names[0] if len(agent.input_names) == 1 else None
    for i, inst in enumerate(instances):  # every instance checked before the first inference
        where = f"instance {i}"
        if _is_b64(inst):
            jobs.append(_image(agent, where, inst))
        elif single is not None and isinstance(inst, dict) and list(inst) == [single] and _is_b64(inst[single]):
            jobs.append(_image(agent, where, inst[single]))
        else:
            jobs.append(_tensors(agent, where, inst, row=True))
    preds = [agent.predict_image(j) if isinstance(j, bytes) else agent.predict(j) for j in jobs]

    def render() -> Reply:
        return json_reply({"predictions": [row for p in preds for row in _rows(p)]})
    return Outcome(preds, render)


def _run_columns(agent: Agent, inputs: Any) -> Outcome:
    single = agent.input_names[0] if len(agent.input_names) == 1 else None
    if _is_b64(inputs) or (single is not None and isinstance(inputs, dict) and list(inputs) == [single]
                           and _is_b64(inputs[single])):
        pred = agent.predict_image(_image(agent, "inputs", inputs if _is_b64(inputs) else inputs[single]))
    else:
        pred = agent.predict(_tensors(agent, "inputs", inputs, row=False))

    def render() -> Reply:
        outs = {k: v.tolist() for k, v in pred.outputs.items()}
        return json_reply({"outputs": next(iter(outs.values())) if len(outs) == 1 else outs})
    return Outcome([pred], render)


def predict_document(agent: Agent, doc: Any) -> Outcome:
    """Run a parsed TF Serving / Vertex predict document (``instances`` or ``inputs``) on ``agent``."""
    if not isinstance(doc, dict):
        raise _bad(f"the body must be a JSON object: {_USAGE}")
    if "instances" in doc and "inputs" in doc:
        raise _bad('send either "instances" or "inputs", not both')
    if "instances" in doc:
        return _run_rows(agent, doc["instances"])
    if "inputs" in doc:
        return _run_columns(agent, doc["inputs"])
    raise _bad(f'the body has neither "instances" nor "inputs": {_USAGE}', "missing_field")


def predict(agent: Agent, model: ServedModel, body: bytes, *, name: str | None, version: str | None) -> Outcome:
    """``POST /v1/models/{name}[/versions/{v}]:predict`` or the Vertex predict route (``name`` None: the model
    served) on ``agent`` (``model``: its :class:`ServedModel`), run on the inference worker."""
    if name is not None:
        model.check(name, version)
    return predict_document(agent, load_json(body, _USAGE))
