"""LiteRT (TensorFlow Lite) interpreter for ``.tflite`` artifacts, optionally with the Edge TPU delegate.

Uses ``ai_edge_litert.interpreter`` and falls back to ``tflite_runtime.interpreter`` on devices that ship
only the older package. Inputs keep the order of ``get_input_details()`` (the flatbuffer's input order);
names are the tensor names. Full-integer models take and return int8/uint8 tensors: sessions quantize
float32 inputs and dequantize outputs with each tensor's scale / zero-point unless ``raw=True``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, installed_version, require
from edge_sdk._quiet import native_noise_filtered
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import cast_integers, check_inputs, check_model_file, check_threads, quantize, run_failed

__all__ = ["EDGETPU_LIBRARY", "RUNTIME", "LiteRTRuntime", "LiteRTSession", "edgetpu_library_present"]

EDGETPU_LIBRARY = "libedgetpu.so.1"
_QUANT_DTYPES = ("int8", "uint8", "int16")


def _interpreter_module() -> ModuleType:
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter``, else MissingDependencyError."""
    if has_module("ai_edge_litert"):
        return require("ai_edge_litert.interpreter", "litert", "running .tflite models")
    if has_module("tflite_runtime"):
        return require("tflite_runtime.interpreter", "litert", "running .tflite models")
    return require("ai_edge_litert.interpreter", "litert", "running .tflite models")


def _spec(detail: dict[str, Any]) -> TensorSpec:
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) == len(detail["shape"]) else detail["shape"]
    shape = [int(d) if d >= 0 else None for d in dims]
    dtype = np.dtype(detail["dtype"]).name
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype in _QUANT_DTYPES and scale:
        return TensorSpec(name=detail["name"], shape=shape, dtype=dtype, scale=float(scale),
                          zero_point=int(zero_point))
    return TensorSpec(name=detail["name"], shape=shape, dtype=dtype)


def edgetpu_library_present() -> bool:
    """True when the Edge TPU runtime library (``libedgetpu.so.1``, apt ``libedgetpu1-std``) can be loaded."""
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError:
        return False
    return True


def _edgetpu_delegate(mod: ModuleType) -> Any:
    """Load the Edge TPU delegate or raise InferenceError naming what is missing."""
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError:
        raise InferenceError(f"Edge TPU delegate requested but {EDGETPU_LIBRARY} is not installed: install "
                             "the Edge TPU runtime (apt package libedgetpu1-std) and plug in the accelerator, "
                             "or run without delegate='edgetpu'") from None
    try:
        return mod.load_delegate(EDGETPU_LIBRARY)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InferenceError(f"cannot load the Edge TPU delegate {EDGETPU_LIBRARY} ({first_line(exc)}): "
                             "check the accelerator is connected and the runtime version matches") from None


class LiteRTSession:
    """A loaded ``.tflite`` model; tensor indices and quantization parameters are resolved at load."""

    def __init__(self, interpreter: Any, path: Path, delegate: str | None = None) -> None:
        self._interp = interpreter
        self.path = path
        self.delegate = delegate
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        self.inputs: list[TensorSpec] = [_spec(d) for d in in_details]
        self.outputs: list[TensorSpec] = [_spec(d) for d in out_details]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self._in_idx = [int(d["index"]) for d in in_details]
        self._out_idx = [int(d["index"]) for d in out_details]
        self._in_dtype = [np.dtype(d["dtype"]) for d in in_details]
        self._in_quant = [s.scale is not None for s in self.inputs]
        self._out_quant = [s.scale is not None for s in self.outputs]
        self._any_out_quant = any(self._out_quant)
        self._shapes = [tuple(int(v) for v in d["shape"]) for d in in_details]
        self._dynamic = any(None in s.shape for s in self.inputs)
        # per quantized input: (scale, zero_point, lo, hi, float buffer, integer buffer) for a copy-free quantize
        self._qbuf: list[tuple[Any, ...] | None] = []
        for spec, shape, dt in zip(self.inputs, self._shapes, self._in_dtype, strict=True):
            if spec.scale is None:
                self._qbuf.append(None)
                continue
            info = np.iinfo(dt)
            self._qbuf.append((np.float32(spec.scale), np.float32(spec.zero_point or 0),
                               np.float32(info.min), np.float32(info.max),
                               np.empty(shape, np.float32), np.empty(shape, dt)))
        self._dq = [(np.float32(s.zero_point or 0), np.float32(s.scale)) if s.scale is not None else None
                    for s in self.outputs]

    def _prepare(self, k: int, x: np.ndarray, raw: bool) -> np.ndarray:
        want = self._in_dtype[k]
        if x.dtype == want:
            return x
        if self._in_quant[k] and not raw and x.dtype.kind == "f":
            q = self._qbuf[k]
            if q is None or x.shape != q[4].shape:
                return quantize(x, self.inputs[k])
            scale, zp, lo, hi, buf, out = q
            np.divide(x, scale, out=buf, casting="unsafe")
            np.rint(buf, out=buf)
            np.add(buf, zp, out=buf)
            np.maximum(buf, lo, out=buf)
            np.minimum(buf, hi, out=buf)
            out[...] = buf
            return out  # set_tensor copies it into the interpreter
        if want.kind == "f" and x.dtype.kind in "fiu":
            return x.astype(want)
        if want.kind in "iu" and x.dtype.kind in "iu" and not self._in_quant[k]:
            return cast_integers(x, want, self.input_names[k])
        raise InputError(f"input {self.input_names[k]!r} has dtype {x.dtype}, the model expects {want}: "
                         "convert the array (or pass float32 and let the session quantize it)")

    def _resize(self, inputs: list[np.ndarray]) -> None:
        changed = False
        for k, x in enumerate(inputs):
            if tuple(x.shape) != self._shapes[k]:
                self._interp.resize_tensor_input(self._in_idx[k], list(x.shape))
                self._shapes[k] = tuple(x.shape)
                changed = True
        if changed:
            self._interp.allocate_tensors()

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch: float32 in and out unless ``raw`` (then the model's own integer dtypes)."""
        interp = self._interp
        if interp is None:
            raise InferenceError(f"session for {self.path.name} is closed: load the model again")
        check_inputs(inputs, self.inputs)
        feed = [self._prepare(k, np.asarray(x), raw) for k, x in enumerate(inputs)]
        try:
            if self._dynamic:
                self._resize(feed)
            for idx, x in zip(self._in_idx, feed, strict=True):
                interp.set_tensor(idx, x)
            interp.invoke()
            outs = [interp.get_tensor(i) for i in self._out_idx]  # get_tensor returns a copy
        except (ValueError, RuntimeError) as exc:
            raise run_failed("LiteRT", self.path, exc) from None
        if raw or not self._any_out_quant:
            return outs
        return [o if dq is None else (o.astype(np.float32) - dq[0]) * dq[1]
                for o, dq in zip(outs, self._dq, strict=True)]

    def close(self) -> None:
        """Release the interpreter."""
        self._interp = None


class LiteRTRuntime:
    """The LiteRT interpreter (``ai-edge-litert``, or ``tflite-runtime`` as a fallback) for ``.tflite`` files."""

    name = "litert"
    formats = (Format.TFLITE,)
    extra = "litert"
    rank = 30
    bench_modules = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
    plot_markers = (("tflite", "D"),)  # (format, matplotlib marker)

    def is_available(self) -> bool:
        """True when ai_edge_litert or tflite_runtime can be imported (checked without importing)."""
        return has_module("ai_edge_litert") or has_module("tflite_runtime")

    def version(self) -> str | None:
        """The installed interpreter package version, or None."""
        return installed_version("ai-edge-litert", "ai-edge-litert-nightly", "tflite-runtime")

    def has_delegate(self, delegate: str) -> bool:
        """True when ``delegate`` (only ``"edgetpu"``) can be loaded on this device: ``libedgetpu`` is installed."""
        return delegate == "edgetpu" and edgetpu_library_present()

    def load(self, path: Path, *, threads: int | None = None, delegate: str | None = None) -> LiteRTSession:
        """Create and allocate an interpreter; ``delegate="edgetpu"`` adds the Edge TPU delegate.

        Raises InferenceError for a missing, corrupt or unsupported file (e.g. one needing Flex ops).
        """
        mod = _interpreter_module()
        path = Path(path)
        check_model_file(path)
        check_threads(threads)
        delegates = []
        if delegate is not None:
            if delegate != "edgetpu":
                raise InferenceError(f"unknown LiteRT delegate {delegate!r}: use delegate='edgetpu' or none")
            delegates.append(_edgetpu_delegate(mod))
        try:
            with native_noise_filtered():  # its "INFO: Created ... XNNPACK delegate" line (edge_sdk/_quiet.py)
                interp = mod.Interpreter(model_path=str(path), num_threads=threads,
                                         experimental_delegates=delegates or None)
                interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"LiteRT cannot load {path.name} ({first_line(exc)}): the file may be truncated "
                                 "or corrupt, need Flex (select TF) ops, or need a newer ai-edge-litert") from None
        return LiteRTSession(interp, path, delegate)


RUNTIME = LiteRTRuntime()
