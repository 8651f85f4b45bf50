"""Request parsing and Prometheus metrics for the agent's HTTP API (standard library + numpy only).

:func:`parse_predict_body` turns a ``POST /predict`` body (JSON with base64 ``image``, ``inputs`` or TF Serving
``instances``, multipart/form-data, a raw image or a ``.npy`` array) into image bytes, input arrays or the
``instances`` document. :class:`Metrics` (the ``/metrics``
document) lives in :mod:`edge_sdk.device_agent.metrics` and is re-exported here.
"""

from __future__ import annotations

import base64
import binascii
import json
from email.message import Message
from typing import Any

import numpy as np

from edge_sdk import safe_json
from edge_sdk.device_agent.metrics import LATENCY_BUCKETS_S, Metrics  # moved; re-exported for old imports
from edge_sdk.device_agent.protocols.sagemaker import NPY, X_IMAGE, load_npy
from edge_sdk.errors import HTTPError, InputError, first_line

__all__ = ["LATENCY_BUCKETS_S", "MAX_MULTIPART_PARTS", "HTTPError", "Metrics", "parse_feedback_body", "parse_multipart",
           "parse_predict_body", "to_array"]

MAX_MULTIPART_PARTS = 32  # a form upload has a handful; thousands of tiny parts only cost parsing time
_NUMERIC_KINDS = "iuf"


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Parse a multipart/form-data body into {field name: (filename or None, content bytes)}."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise HTTPError(400, "bad_multipart", "multipart body without a boundary: send a standard form upload")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise HTTPError(400, "bad_multipart", "malformed multipart body: the closing boundary is missing")
    if len(chunks) - 2 > MAX_MULTIPART_PARTS:
        raise HTTPError(400, "bad_multipart", f"multipart body with {len(chunks) - 2} parts: send at most "
                        f"{MAX_MULTIPART_PARTS} parts (one image file)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or b"\r\n\r\n" not in chunk:
            raise HTTPError(400, "bad_multipart", "malformed multipart part: headers must end with a blank line")
        raw_headers, _, content = chunk[2:].partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        part = Message()
        for line in raw_headers.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                part[name.strip()] = value.strip()
        if part.get("Content-Disposition") is None:
            continue
        name = part.get_param("name", header="content-disposition")
        filename = part.get_param("filename", header="content-disposition")
        if isinstance(name, str):
            fields.setdefault(name, (filename if isinstance(filename, str) else None, content))
    return fields


def to_array(name: str, value: Any, dtype: str | None) -> np.ndarray:
    """A JSON nested list -> numpy array of the model's dtype; InputError for non-numeric or ragged data."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InputError(f"input {name!r} is not a rectangular nested list of numbers: fix its shape") from None
    if arr.dtype.kind not in _NUMERIC_KINDS or arr.dtype == np.bool_:
        raise InputError(f"input {name!r} must hold numbers, got {arr.dtype.kind!r} values: send a nested list "
                         f"of numbers")
    try:
        return np.ascontiguousarray(arr, dtype=np.dtype(dtype or "float32"))
    except (TypeError, OverflowError) as exc:
        raise InputError(f"input {name!r} does not fit dtype {dtype}: {first_line(exc, 1000)}") from None


def parse_predict_body(body: bytes, content_type: str,
                       input_dtypes: dict[str, str | None]) -> tuple[str, Any]:
    """("image", encoded image bytes), ("inputs", array | {name: array}) or ("instances", the TF Serving / Vertex
    JSON document); HTTPError 400 for a bad body.

    Images come as JSON ``{"image": "<base64>"}``, multipart/form-data, or a raw ``image/*``,
    ``application/x-image`` or ``application/octet-stream`` body; tensors as JSON ``{"inputs": ...}`` or an
    ``application/x-npy`` body (SageMaker; read safely, see :func:`~edge_sdk.device_agent.protocols.sagemaker.
    load_npy`). ``input_dtypes`` maps the model's input names to their dtypes (JSON numbers are converted to them).
    """
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        fields = parse_multipart(body, content_type)
        files = [v for v in fields.values() if v[0] is not None]
        picked = fields.get("image") or fields.get("file") or (files[0] if files else None)
        if picked is None:
            raise HTTPError(400, "missing_field", "multipart upload without a file: send the image in a field "
                            "named 'image'")
        return "image", picked[1]
    if ctype.startswith("image/") or ctype in ("application/octet-stream", X_IMAGE):
        return "image", body
    if ctype == NPY:
        return "inputs", load_npy(body)
    try:
        doc = safe_json.loads(body)
    except RecursionError:  # safe_json.JSONTooDeep included (it is also a JSONDecodeError)
        raise HTTPError(400, "bad_json", "body is nested too deeply: send a JSON object with \"image\" or "
                        "\"inputs\" (a nested list no deeper than the model's input)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, "bad_json", f"body is not valid JSON ({first_line(exc, 1000)}): send "
                        f'{{"image": "<base64>"}} or {{"inputs": ...}}') from None
    if isinstance(doc, dict) and "image" in doc:
        return "image", _b64(doc["image"])
    if isinstance(doc, dict) and "inputs" in doc:
        return "inputs", _arrays(doc["inputs"], input_dtypes)
    if isinstance(doc, dict) and "instances" in doc:
        return "instances", doc
    raise HTTPError(400, "missing_field", 'JSON body needs an "image" (base64 JPEG/PNG) or an "inputs" field (or '
                    'TF Serving / Vertex "instances")')


def parse_feedback_body(body: bytes) -> tuple[str, int | str]:
    """``(prediction_id, label)`` of a ``POST /feedback`` body ``{"prediction_id": "...", "label": 3 | "tabby"}``;
    HTTPError 400 with a one-line reason otherwise."""
    usage = 'send {"prediction_id": "<id from /predict>", "label": <class index> or "<label name>"}'
    try:
        doc = safe_json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HTTPError(400, "bad_json", f"body is not valid JSON ({first_line(exc, 1000)}): {usage}") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, "bad_feedback", f"body must be a JSON object: {usage}")
    pid, label = doc.get("prediction_id"), doc.get("label")
    if not isinstance(pid, str) or not 1 <= len(pid) <= 100:
        raise HTTPError(400, "bad_feedback", f'"prediction_id" must be the "id" string of a prediction: {usage}')
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise HTTPError(400, "bad_feedback", f'"label" must be a class index or a label name: {usage}')
    return pid, label


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise HTTPError(400, "bad_input", '"image" must be a base64 string of a JPEG or PNG file')
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "bad_input", '"image" is not valid base64: encode the file bytes with '
                        "standard base64") from None


def _arrays(value: Any, dtypes: dict[str, str | None]) -> np.ndarray | dict[str, np.ndarray]:
    try:
        if isinstance(value, dict):
            return {str(k): to_array(str(k), v, dtypes.get(str(k))) for k, v in value.items()}
        if isinstance(value, list):
            names = list(dtypes)
            name = names[0] if len(names) == 1 else "inputs"
            return to_array(name, value, dtypes.get(name))
    except InputError as exc:
        raise HTTPError(400, "bad_input", first_line(exc, 1000)) from None
    raise HTTPError(400, "bad_input", '"inputs" must be {"<name>": nested list} or a nested list')
