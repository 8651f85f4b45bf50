"""Inference runtimes, one module each, behind the :class:`Runtime` protocol.

Runtime modules import nothing heavy at module level, so listing them is cheap; the runtime itself
is imported by ``Runtime.load``.
"""

from __future__ import annotations

import importlib

from edge_sdk.errors import InferenceError
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import Runtime, Session, check_inputs, dequantize, quantize

__all__ = [
    "RUNTIMES",
    "Runtime",
    "Session",
    "all_runtimes",
    "check_inputs",
    "dequantize",
    "get_runtime",
    "quantize",
    "runtime_for",
]

# name -> "module:Class", in default preference order
RUNTIMES: dict[str, str] = {
    "onnxruntime": "edge_sdk.runtimes.onnxruntime:OnnxRuntime",
    "openvino": "edge_sdk.runtimes.openvino:OpenVINORuntime",
    "litert": "edge_sdk.runtimes.litert:LiteRTRuntime",
    "coreml": "edge_sdk.runtimes.coreml:CoreMLRuntime",
}


def get_runtime(name: str) -> Runtime:
    """The runtime registered under ``name``."""
    try:
        mod_name, _, cls_name = RUNTIMES[name].partition(":")
    except KeyError:
        raise InferenceError(f"unknown runtime {name!r}: choose from {', '.join(RUNTIMES)}") from None
    return getattr(importlib.import_module(mod_name), cls_name)()


def all_runtimes() -> list[Runtime]:
    """Every registered runtime, installed or not."""
    return [get_runtime(n) for n in RUNTIMES]


def runtime_for(fmt: Format | str, *, available_only: bool = True) -> Runtime | None:
    """The first runtime (in preference order) that runs ``fmt`` and is installed here."""
    fmt = Format(str(fmt))
    for rt in all_runtimes():
        if fmt in rt.formats and (rt.is_available() or not available_only):
            return rt
    return None
