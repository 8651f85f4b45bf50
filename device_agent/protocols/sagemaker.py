"""SageMaker's content types on ``POST /invocations``: ``application/x-npy`` bodies and answers, ``x-image`` bodies.

SageMaker's built-in containers take a NumPy ``.npy`` body (``Content-Type: application/x-npy``) and image bytes
(``application/x-image``), and answer in the type the ``Accept`` header names: JSON by default (the agent's own
prediction document, as ``POST /predict``), or ``application/x-npy`` (the model's one output tensor as a ``.npy``).

A ``.npy`` body is read without ``numpy.load``: its header is parsed with :mod:`numpy.lib.format` (at most
10,000 header bytes, literal values only, never a pickle), only numeric and boolean dtypes are taken, and the
shape's element count must match the bytes actually sent before the array is viewed in place — ``numpy.load`` on a
byte buffer would allocate whatever a hostile header's shape asks for. The model then checks the shape and dtype
(float64 is cast to a float32 input, as for JSON).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from edge_sdk.device_agent.protocols.base import MAX_RANK, Reply
from edge_sdk.errors import HTTPError, first_line

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Prediction

__all__ = ["JSON", "NPY", "NPY_MAX_HEADER", "X_IMAGE", "load_npy", "npy_reply", "response_type"]

NPY = "application/x-npy"
X_IMAGE = "application/x-image"
JSON = "application/json"
#: Largest ``.npy`` header read (numpy's own default limit).
NPY_MAX_HEADER = 10_000
_USAGE = "save the array with numpy.save(f, x, allow_pickle=False)"


def _bad(message: str) -> HTTPError:
    return HTTPError(400, "bad_npy", message)


def load_npy(body: bytes) -> np.ndarray:
    """The array of a ``.npy`` body, viewed in place; HTTPError 400 for anything but a well-formed numeric one."""
    f = io.BytesIO(body)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
        else:
            raise _bad(f".npy format version {version[0]}.{version[1]} is not supported: {_USAGE}")
    except HTTPError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError, OverflowError) as exc:
        raise _bad(f"body is not a .npy array ({first_line(exc, 200)}): {_USAGE}") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.subdtype is not None or dtype.fields is not None:
        raise _bad(f".npy dtype {dtype} is not numeric: send a numeric array, {_USAGE}")
    if len(shape) > MAX_RANK:
        raise _bad(f".npy array has {len(shape)} dimensions: send at most {MAX_RANK}")
    count = 1
    for d in shape:
        count *= d
    offset = f.tell()
    if count * dtype.itemsize != len(body) - offset:
        raise _bad(f".npy header announces shape {list(shape)} of {dtype} ({count * dtype.itemsize} bytes) but "
                   f"{len(body) - offset} data bytes follow: {_USAGE}")
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.aligned and arr.flags.c_contiguous else np.ascontiguousarray(arr)


def response_type(accept: str | None, outputs: int) -> str:
    """The answer's content type for an ``Accept`` header (:data:`JSON` or :data:`NPY`); HTTPError 406 otherwise.

    Media types are taken in the order listed (quality values are not ranked); a missing header means JSON.
    ``outputs`` is the model's output count: a ``.npy`` answer carries one tensor.
    """
    for part in (accept or JSON).split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in (JSON, "*/*", "application/*", ""):
            return JSON
        if media == NPY:
            if outputs != 1:
                raise HTTPError(406, "not_acceptable", f"the model has {outputs} outputs and an {NPY} answer "
                                "carries one: ask for application/json")
            return NPY
    raise HTTPError(406, "not_acceptable", f"Accept {str(accept)[:100]!r} names no type this endpoint answers: "
                    f"ask for {JSON} or {NPY}")


def npy_reply(pred: Prediction) -> Reply:
    """The prediction's one output tensor as a ``.npy`` body."""
    buf = io.BytesIO()
    (arr,) = pred.outputs.values()
    np.save(buf, arr, allow_pickle=False)
    return Reply(200, buf.getvalue(), NPY, {"X-Prediction-Id": pred.id})
