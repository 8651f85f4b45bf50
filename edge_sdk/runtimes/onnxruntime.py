"""ONNX Runtime (CPU execution provider) for ``.onnx`` and ``.ort`` artifacts.

QDQ-quantized ONNX models keep float32 inputs and outputs, so sessions usually pass arrays straight
through. Models whose graph inputs/outputs are themselves int8/uint8 get scale / zero-point from the
adjacent (De)QuantizeLinear node when the ``onnx`` package is present, and are then (de)quantized here.

int8 on x86 CPUs without VNNI (AVX2 only): ONNX Runtime's fast U8S8 kernels add pairs of uint8 x int8 products in
saturating 16-bit arithmetic (``vpmaddubsw``), which costs about 3 pp of top-1 agreement on MobileNetV2 (88.3 % vs
91.25 %) and makes the result differ from the same file in the browser or on a VNNI / ARM CPU.
``EDGE_SDK_ORT_EXACT_INT8=1`` sets ORT's ``session.x64quantprecision=1`` (exact U8U8 kernels): identical to the
browser's logits, but on such CPUs int8 is then no faster than fp32 (benchmarks/ort_int8_recipes.py).
:func:`u8s8_saturates` tells whether this CPU is one of them.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, installed_version, require
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import (
    cast_integers,
    check_inputs,
    check_model_file,
    check_threads,
    cpuinfo,
    dequantize,
    quantize,
    run_failed,
)

__all__ = ["EXACT_INT8_ENV", "RUNTIME", "OnnxRuntime", "OnnxRuntimeSession", "exact_int8", "u8s8_saturates"]

EXACT_INT8_ENV = "EDGE_SDK_ORT_EXACT_INT8"
"""``1``: exact int8 kernels on x86 (``session.x64quantprecision``); unset / ``0``: ORT's fast default."""


@cache
def u8s8_saturates() -> bool:
    """True on an x86-64 CPU with AVX2 but no VNNI / AMX int8 (Linux ``/proc/cpuinfo``; False where unknown)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = set(cpuinfo("flags").get("flags", "").split())
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def exact_int8() -> bool:
    """Whether ``EDGE_SDK_ORT_EXACT_INT8=1`` asks for ORT's exact int8 kernels (read at each session load)."""
    return os.environ.get(EXACT_INT8_ENV, "0").strip() == "1"

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}
_QUANT_DTYPES = ("int8", "uint8")


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """The exception classes ONNX Runtime's C++ layer raises (they derive from Exception directly)."""
    state = ort.capi.onnxruntime_pybind11_state
    found = tuple(o for o in vars(state).values() if isinstance(o, type) and issubclass(o, Exception))
    return (*found, RuntimeError)


def _spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else None for d in arg.shape]
    return TensorSpec(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))


def _quant_params(path: Path, specs: list[TensorSpec], outputs: bool) -> None:
    """Fill scale/zero_point of int8/uint8 graph I/O from the (De)QuantizeLinear next to them (needs onnx)."""
    wanted = {s.name: s for s in specs if s.dtype in _QUANT_DTYPES}
    if not wanted or path.suffix.lower() != ".onnx" or not has_module("onnx"):
        return
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    for node in graph.node:
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear") or len(node.input) < 2:
            continue
        name = node.output[0] if outputs else node.input[0]
        if name not in wanted or (node.op_type == "QuantizeLinear") != outputs:
            continue
        tensors = [inits.get(t) or consts.get(t) for t in node.input[1:3]]
        if tensors[0] is None:
            continue
        scale = numpy_helper.to_array(tensors[0]).reshape(-1)
        if scale.size != 1:
            continue
        zp = numpy_helper.to_array(tensors[1]).reshape(-1) if len(tensors) > 1 and tensors[1] is not None else [0]
        wanted[name].scale = float(scale[0])
        wanted[name].zero_point = int(zp[0])


class OnnxRuntimeSession:
    """A loaded ONNX / ORT model on the CPU execution provider."""

    def __init__(self, session: Any, path: Path, errors: tuple[type[BaseException], ...]) -> None:
        self._session = session
        self._errors = errors
        self.path = path
        self.inputs: list[TensorSpec] = [_spec(a) for a in session.get_inputs()]
        self.outputs: list[TensorSpec] = [_spec(a) for a in session.get_outputs()]
        _quant_params(path, self.inputs, outputs=False)
        _quant_params(path, self.outputs, outputs=True)
        self._in_names = [s.name for s in self.inputs]
        self._out_names = [s.name for s in self.outputs]
        self._in_dtypes = [np.dtype(s.dtype) if s.dtype in _ORT_TYPES.values() else None for s in self.inputs]
        self._in_quant = [s.dtype in _QUANT_DTYPES and s.scale is not None for s in self.inputs]
        self._out_quant = [s.dtype in _QUANT_DTYPES and s.scale is not None for s in self.outputs]
        self._any_out_quant = any(self._out_quant)

    def _feed(self, inputs: list[np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for k, x in enumerate(inputs):
            want = self._in_dtypes[k]
            if want is not None and x.dtype != want:
                if not raw and self._in_quant[k] and x.dtype.kind == "f":
                    x = quantize(x, self.inputs[k])
                elif x.dtype.kind in "fiu" and want.kind == "f":
                    x = x.astype(want)
                elif x.dtype.kind in "iu" and want.kind in "iu" and not self._in_quant[k]:
                    x = cast_integers(x, want, self._in_names[k])
                else:
                    raise InputError(f"input {self._in_names[k]!r} has dtype {x.dtype}, the model expects "
                                     f"{want}: convert the array (or pass float32 to let the runtime quantize)")
            feed[self._in_names[k]] = x
        return feed

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch; float32 in and out unless ``raw`` (then the model's own dtypes)."""
        if self._session is None:
            raise InferenceError(f"session for {self.path.name} is closed: load the model again")
        check_inputs(inputs, self.inputs)
        feed = self._feed(inputs, raw)
        try:
            outs = self._session.run(self._out_names, feed)
        except self._errors as exc:
            raise run_failed("ONNX Runtime", self.path, exc) from None
        if raw or not self._any_out_quant:
            return outs
        return [dequantize(o, s) if q else o for o, s, q in zip(outs, self.outputs, self._out_quant, strict=True)]

    def close(self) -> None:
        """Release the session."""
        self._session = None


class OnnxRuntime:
    """ONNX Runtime with the CPU execution provider (``.onnx`` and ``.ort`` files)."""

    name = "onnxruntime"
    formats = (Format.ONNX, Format.ORT)
    extra = "onnxruntime"
    rank = 10  # place in the default runtime order (lower first)
    bench_modules = ("onnxruntime",)
    plot_markers = (("onnx", "o"), ("ort", "s"))  # (format, matplotlib marker)

    def is_available(self) -> bool:
        """True when onnxruntime can be imported (checked without importing it)."""
        return has_module("onnxruntime")

    def version(self) -> str | None:
        """The installed onnxruntime version, or None."""
        return installed_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")

    def load(self, path: Path, *, threads: int | None = None) -> OnnxRuntimeSession:
        """Create an InferenceSession; raise InferenceError for a missing, corrupt or unsupported file."""
        ort = require("onnxruntime", self.extra, "running ONNX / ORT models")
        path = Path(path)
        check_model_file(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        check_threads(threads)
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if path.suffix.lower() == ".ort":
            so.add_session_config_entry("session.load_model_format", "ORT")
        if exact_int8():  # exact int8 where the fast kernels saturate
            so.add_session_config_entry("session.x64quantprecision", "1")
        errors = _ort_errors(ort)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except errors as exc:
            raise InferenceError(f"ONNX Runtime {ort.__version__} cannot load {path.name} ({first_line(exc)}): "
                                 "the file may be truncated or corrupt, or need a newer onnxruntime") from None
        return OnnxRuntimeSession(session, path, errors)


RUNTIME = OnnxRuntime()
