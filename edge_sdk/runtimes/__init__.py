"""Inference runtimes, one module each, behind the :class:`Runtime` protocol, listed in one registry.

Importing this package fills the registry (:mod:`edge_sdk.runtimes.registry`): the four built-in runtimes, then
third-party ones from the entry-point group ``edge_sdk.runtimes``. Runtime modules import nothing heavy at
module level, so registering them is cheap; the runtime itself is imported by ``Runtime.load``.
"""

from __future__ import annotations

from edge_sdk.formats import Format
from edge_sdk.runtimes import coreml, litert, litertjs, onnxruntime, onnxruntime_web, openvino
from edge_sdk.runtimes.base import Runtime, Session, check_inputs, dequantize, quantize
from edge_sdk.runtimes.registry import (
    RUNTIMES,
    bench_modules,
    default_order,
    get_runtime,
    load_entry_points,
    plot_markers,
    register_runtime,
    unregister_runtime,
)

__all__ = [
    "RUNTIMES",
    "Runtime",
    "Session",
    "all_runtimes",
    "bench_modules",
    "check_inputs",
    "default_order",
    "dequantize",
    "get_runtime",
    "plot_markers",
    "quantize",
    "register_runtime",
    "runtime_for",
    "unregister_runtime",
]

# built-ins first; their `rank` sets the default order
for _module in (onnxruntime, openvino, litert, coreml, onnxruntime_web, litertjs):
    register_runtime(_module.RUNTIME)
load_entry_points()


def all_runtimes() -> list[Runtime]:
    """Every registered runtime, installed or not, in default preference order."""
    return list(RUNTIMES.values())


def runtime_for(fmt: Format | str, *, available_only: bool = True) -> Runtime | None:
    """The first runtime (in preference order) that runs ``fmt`` and is installed here."""
    fmt = Format(str(fmt))
    for rt in all_runtimes():
        if fmt in rt.formats and (rt.is_available() or not available_only):
            return rt
    return None
