"""Open Inference Protocol v2, REST (KServe v2 / Triton / OpenVINO Model Server / MLServer) on the agent.

Enough of the protocol that ``tritonclient.http.InferenceServerClient`` works unchanged:

    GET  /v2                                        server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready          200 / 503 (no token needed, like /ping)
    GET  /v2/models/{name}[/versions/{v}]           model metadata: name, versions, platform, inputs, outputs
    GET  /v2/models/{name}[/versions/{v}]/ready     200 when that model is the one served and the worker runs
    POST /v2/models/{name}[/versions/{v}]/infer     inference

An infer body is a JSON header ``{"id", "inputs": [{"name", "datatype", "shape", "data" | "parameters":
{"binary_data_size": n}}], "outputs": [{"name", "parameters": {"binary_data": bool}}], "parameters":
{"binary_data_output": bool}}``, followed, with the binary tensor extension, by the raw tensors in input order
(the header's length in the ``Inference-Header-Content-Length`` request header). ``data`` is the flattened (or
nested) row-major list. Datatypes: BOOL, UINT8/16/32/64, INT8/16/32/64, FP16, FP32, FP64 — each must be the
model input's own (a client's cast is its choice, not the server's) — and BYTES holding ONE encoded image
(JPEG/PNG...; base64 text in JSON, ``<uint32 LE length><bytes>`` in binary) for a one-input model whose bundle
records its image preprocessing: it runs through that preprocessing like ``POST /predict``'s image path. Outputs
come back as JSON ``data`` or, when asked, as binary after a JSON header (``Inference-Header-Content-Length`` in
the response). The response's ``parameters.prediction_id`` is the id ``POST /feedback`` takes. A request body
compressed with ``Content-Encoding: gzip`` or ``deflate`` is inflated within the body limit.

Every error is the v2 error body ``{"error": "<one line>"}``: 400 for a bad request (datatype, shape, binary size,
input or output name), 404 for an unknown model or version. Nothing is allocated from a shape: a tensor's
element count is compared with the bytes or values actually sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk import __version__
from edge_sdk.device_agent.protocols.base import (
    Outcome,
    Reply,
    ServedModel,
    element_count,
    json_reply,
    load_json,
)
from edge_sdk.errors import HTTPError

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["DATATYPES", "HEADER_LENGTH", "MAX_TENSORS", "PLATFORMS", "PUBLIC_ROUTES", "ROUTES", "datatype_of",
           "infer", "inflate", "model_metadata", "server_metadata"]

#: The request and response header giving the JSON header's length when binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: v2 datatype -> numpy dtype (little-endian, as the binary tensor extension sends them); BYTES is handled apart.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_NAME = {dt.name: name for name, dt in DATATYPES.items()}
#: runtime -> the ``platform`` string Triton uses for it (others: the runtime's own name)
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "litert": "tensorflow_lite",
             "coreml": "coreml"}
#: Most input or output tensors one request may name (models take a handful).
MAX_TENSORS = 64

_V = "/versions/{version}"
ROUTES: dict[str, tuple[str, ...]] = {
    "/v2": ("GET", "HEAD"), "/v2/health/live": ("GET", "HEAD"), "/v2/health/ready": ("GET", "HEAD"),
    "/v2/models/{name}": ("GET", "HEAD"), f"/v2/models/{{name}}{_V}": ("GET", "HEAD"),
    "/v2/models/{name}/ready": ("GET", "HEAD"), f"/v2/models/{{name}}{_V}/ready": ("GET", "HEAD"),
    "/v2/models/{name}/infer": ("POST",), f"/v2/models/{{name}}{_V}/infer": ("POST",),
}
#: Probes answered without the API token (Kubernetes / KServe liveness and readiness checks send none).
PUBLIC_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready"})
_USAGE = ('send {"inputs": [{"name": ..., "datatype": "FP32", "shape": [...], "data": [...]}]} (see the Open '
          "Inference Protocol v2)")


def datatype_of(dtype: str | np.dtype | None) -> str | None:
    """The v2 datatype of a numpy dtype (name), or None when v2 has none (bfloat16, strings...)."""
    try:
        return _BY_NAME.get(np.dtype(dtype or "float32").name)
    except TypeError:
        return None


def _shape(spec_shape: list[int | None]) -> list[int]:
    return [-1 if d is None or d < 0 else int(d) for d in spec_shape]


# -- metadata --------------------------------------------------------------------------------------------------
def server_metadata() -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": "edge-sdk-agent", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(model: ServedModel) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]`` of the model served (the caller checked the name and version)."""
    return {"name": model.name, "versions": [model.version],
            "platform": PLATFORMS.get(model.runtime, model.runtime),
            "inputs": [{"name": s.name, "datatype": datatype_of(s.dtype) or str(s.dtype), "shape": _shape(s.shape)}
                       for s in model.inputs],
            "outputs": [{"name": s.name, "datatype": datatype_of(s.dtype) or str(s.dtype), "shape": _shape(s.shape)}
                        for s in model.outputs]}


# -- infer -----------------------------------------------------------------------------------------------------
@dataclass
class _Request:
    inputs: dict[str, np.ndarray]
    image: bytes | None
    outputs: list[tuple[str, bool]]  # (name, binary)
    request_id: str | None


def _bad(message: str, kind: str = "bad_input") -> HTTPError:
    return HTTPError(400, kind, message)


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` decoded from its ``Content-Encoding`` (gzip / deflate), never more than ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise HTTPError(415, "unsupported_encoding", f"Content-Encoding {enc[:40]!r} is not supported: send the "
                        "body uncompressed, gzip or deflate")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad(f"the {enc} body does not decompress ({exc}): send a valid {enc} stream", "bad_encoding") from None
    if len(out) > limit or d.unconsumed_tail:
        raise HTTPError(413, "payload_too_large", f"the {enc} body inflates to more than {limit} bytes: send a "
                        "smaller request")
    if not d.eof:
        raise _bad(f"the {enc} body is truncated: send the whole stream", "bad_encoding")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(JSON header, binary tensors) of a request body."""
    view = memoryview(body)
    if header_length is None:
        return view, view[:0]
    try:
        n = int(header_length.strip())
    except ValueError:
        raise _bad(f"{HEADER_LENGTH} {header_length[:40]!r} is not an integer: send the JSON header's length in "
                   "bytes", "bad_header") from None
    if not 0 < n <= len(body):
        raise _bad(f"{HEADER_LENGTH} {n} is outside the {len(body)}-byte body: send the JSON header's length in "
                   "bytes", "bad_header")
    return view[:n], view[n:]


def _check_shape(name: str, shape: list[int], want: list[int | None]) -> None:
    expected = _shape(want)
    if len(shape) != len(expected) or any(w != -1 and w != g for w, g in zip(expected, shape, strict=True)):
        raise _bad(f"input {name!r} has shape {shape}, the model expects {expected} (-1: any size)", "bad_shape")


def _from_json(name: str, data: Any, dtype: np.dtype, count: int, shape: list[int]) -> np.ndarray:
    """A tensor from JSON ``data`` (flat or nested), checked value by value against ``dtype``."""
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: \"data\" must be a list of values")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise _bad(f"input {name!r}: \"data\" is not a rectangular list of values: flatten it") from None
    if arr.size != count:
        raise _bad(f"input {name!r} has {arr.size} values, its shape {shape} needs {count}", "bad_shape")
    kind = arr.dtype.kind
    if count and not (kind == "b" if dtype.kind == "b" else kind in "iu" if dtype.kind in "iu" else kind in "iuf"):
        what = {"b": "true/false", "i": "integers", "u": "integers"}.get(dtype.kind, "numbers")
        raise _bad(f"input {name!r} ({_BY_NAME[dtype.name]}) must hold {what}, got {arr.dtype.kind!r} values")
    if count and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise _bad(f"input {name!r}: values outside the {_BY_NAME[dtype.name]} range [{info.min}, {info.max}]")
    return np.ascontiguousarray(arr, dtype=dtype).reshape(shape)


def _from_binary(name: str, chunk: memoryview, dtype: np.dtype, count: int, shape: list[int]) -> np.ndarray:
    if len(chunk) != count * dtype.itemsize:
        raise _bad(f"input {name!r}: binary_data_size is {len(chunk)} bytes, shape {shape} of "
                   f"{_BY_NAME[dtype.name]} needs {count * dtype.itemsize}", "bad_binary_size")
    arr = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise _bad(f"input {name!r} (BOOL): binary bytes must be 0 or 1")
    return arr if arr.flags.aligned else arr.copy()  # the JSON header leaves the tensor at any offset


def _image(name: str, chunk: memoryview | None, data: Any, count: int) -> bytes:
    """The one encoded image of a BYTES input (binary: ``<uint32 LE length><bytes>``; JSON: base64 text)."""
    if count != 1:
        raise _bad(f"input {name!r} (BYTES) holds {count} elements: send exactly one encoded image (shape [1])",
                   "bad_shape")
    if chunk is not None:
        size = int.from_bytes(chunk[:4], "little") if len(chunk) >= 4 else -1
        if size < 0 or 4 + size != len(chunk):
            raise _bad(f"input {name!r} (BYTES): binary_data_size {len(chunk)} does not hold one "
                       "<4-byte length><bytes> element", "bad_binary_size")
        return bytes(chunk[4:])
    while isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, str):
        raise _bad(f"input {name!r} (BYTES): \"data\" must be [\"<base64 of a JPEG or PNG file>\"]")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"input {name!r} (BYTES): \"data\" is not base64: encode the image file with standard base64") \
            from None


def _parse_inputs(doc: dict[str, Any], binary: memoryview, model: ServedModel, agent: Agent
                  ) -> tuple[dict[str, np.ndarray], bytes | None]:
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise _bad(f"\"inputs\" must be a non-empty list: {_USAGE}", "missing_field")
    if len(items) > MAX_TENSORS:
        raise _bad(f"{len(items)} inputs: the model takes {len(model.inputs)}")
    specs = {s.name: s for s in model.inputs}
    tensors: dict[str, np.ndarray] = {}
    image: bytes | None = None
    offset = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(f"every input must be an object with a \"name\": {_USAGE}", "missing_field")
        name: str = item["name"]
        if name not in specs:
            raise _bad(f"unknown input {name[:100]!r}: the model takes {', '.join(map(repr, specs))}")
        if name in tensors or (image is not None):
            raise _bad(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype != "BYTES" and datatype not in DATATYPES:
            raise _bad(f"input {name!r}: unsupported datatype {json.dumps(datatype)[:40]}: use one of "
                       f"{', '.join(DATATYPES)} or BYTES (an encoded image)", "bad_datatype")
        want = datatype_of(specs[name].dtype)
        if datatype != "BYTES" and datatype != want:
            raise _bad(f"input {name!r} has datatype {datatype}, the model expects {want}", "bad_datatype")
        shape, count = element_count(item.get("shape"), f"input {name!r}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"input {name!r}: \"parameters\" must be an object")
        size = params.get("binary_data_size")
        chunk: memoryview | None = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _bad(f"input {name!r}: binary_data_size must be an integer >= 0, got {json.dumps(size)[:40]}",
                           "bad_binary_size")
            if size > len(binary) - offset:
                raise _bad(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                           f"({len(binary) - offset} binary bytes left)", "bad_binary_size")
            if "data" in item:
                raise _bad(f"input {name!r} has both \"data\" and binary_data_size: send one")
            chunk, offset = binary[offset:offset + size], offset + size
        elif "data" not in item:
            raise _bad(f"input {name!r} has neither \"data\" nor parameters.binary_data_size", "missing_field")
        if datatype == "BYTES":
            if agent.preprocessing is None or len(model.inputs) != 1:
                raise _bad(f"input {name!r}: BYTES carries an encoded image, but this model takes {want} tensors"
                           + (" and its bundle records no image preprocessing" if agent.preprocessing is None
                              else f" ({len(model.inputs)} inputs)"), "bad_datatype")
            image = _image(name, chunk, item.get("data"), count)
            continue
        _check_shape(name, shape, specs[name].shape)
        dtype = DATATYPES[datatype]
        tensors[name] = _from_binary(name, chunk, dtype, count, shape) if chunk is not None else \
            _from_json(name, item["data"], dtype, count, shape)
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes after the JSON header are claimed by no input's binary_data_size: "
                   f"check {HEADER_LENGTH} and the sizes", "bad_binary_size")
    missing = [n for n in specs if n not in tensors] if image is None else []
    if missing:
        raise _bad(f"missing input(s) {', '.join(map(repr, missing))}: the model takes "
                   f"{', '.join(map(repr, specs))}", "missing_field")
    return tensors, image


def _parse_outputs(doc: dict[str, Any], model: ServedModel) -> list[tuple[str, bool]]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("\"parameters\" must be an object")
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _bad("parameters.binary_data_output must be true or false")
    names = [s.name for s in model.outputs]
    items = doc.get("outputs")
    if items is None:
        return [(n, default) for n in names]
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise _bad("\"outputs\" must be a list of {\"name\": ...} objects")
    wanted: list[tuple[str, bool]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("every requested output must be an object with a \"name\"", "missing_field")
        name = item["name"]
        if name not in names:
            raise _bad(f"unknown output {name[:100]!r}: the model gives {', '.join(map(repr, names))}")
        if any(name == n for n, _ in wanted):
            raise _bad(f"output {name!r} is requested twice")
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise _bad(f"output {name!r}: \"parameters\" must be an object")
        if "classification" in p:
            raise _bad(f"output {name!r}: the classification extension is not supported: read the top classes "
                       "from the scores, or use POST /predict")
        binary = p.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: parameters.binary_data must be true or false")
        wanted.append((name, binary))
    return wanted


def _parse(body: bytes, header_length: str | None, model: ServedModel, agent: Agent) -> _Request:
    header, binary = _split(body, header_length)
    doc = load_json(header, _USAGE)
    if not isinstance(doc, dict):
        raise _bad(f"the request must be a JSON object: {_USAGE}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("\"id\" must be a string")
    outputs = _parse_outputs(doc, model)
    tensors, image = _parse_inputs(doc, binary, model, agent)
    return _Request(tensors, image, outputs, request_id[:256] if request_id else None)


def _render(req: _Request, model: ServedModel, pred: Prediction) -> Reply:
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in req.outputs:
        arr = pred.outputs[name]
        datatype = datatype_of(arr.dtype)
        if datatype is None:
            raise HTTPError(500, "inference", f"output {name!r} has dtype {arr.dtype}, which v2 cannot carry: use "
                            "POST /predict")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    payload: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if req.request_id is not None:
        payload["id"] = req.request_id
    payload["parameters"] = {"prediction_id": pred.id}
    payload["outputs"] = entries
    if not chunks:
        return json_reply(payload)
    header = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    return Reply(200, b"".join([header, *chunks]), "application/octet-stream", {HEADER_LENGTH: str(len(header))})


def infer(agent: Agent, model: ServedModel, body: bytes, *, name: str, version: str | None,
          header_length: str | None = None, content_encoding: str | None = None, max_bytes: int) -> Outcome:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` on ``agent`` (``model``: its :class:`ServedModel`), run on
    the inference worker: check the name, parse, check the tensors, predict."""
    model.check(name, version)
    req = _parse(inflate(body, content_encoding, max_bytes), header_length, model, agent)
    pred = agent.predict_image(req.image) if req.image is not None else agent.predict(req.inputs)
    return Outcome([pred], lambda: _render(req, model, pred))
