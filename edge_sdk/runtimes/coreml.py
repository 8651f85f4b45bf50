"""Core ML (``.mlpackage``) through coremltools' ``MLModel.predict`` — macOS only.

Core ML itself ships with macOS / iOS; coremltools can read a package's spec anywhere but can only
run it on macOS. On other hosts :meth:`CoreMLRuntime.is_available` is False and :meth:`load` raises
an InferenceError that points at the bundle's portable artifacts. Core ML picks its own threads and
compute units (CPU / GPU / Neural Engine), so ``threads`` is accepted and ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, installed_version, require
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import check_inputs, run_failed

__all__ = ["RUNTIME", "CoreMLRuntime", "CoreMLSession", "package_io"]

# FeatureTypes.proto ArrayFeatureType.ArrayDataType
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}


def _specs(features: Any) -> list[TensorSpec]:
    out = []
    for f in features:
        if f.type.WhichOneof("Type") != "multiArrayType":
            raise InferenceError(f"Core ML feature {f.name!r} is a {f.type.WhichOneof('Type')}, not a tensor: "
                                 "only multi-array inputs/outputs are supported; re-convert with TensorType")
        arr = f.type.multiArrayType
        out.append(TensorSpec(name=f.name, shape=[int(s) for s in arr.shape],
                              dtype=_ARRAY_DTYPES.get(arr.dataType, str(arr.dataType))))
    return out


def _load_errors() -> tuple[type[BaseException], ...]:
    from google.protobuf.message import DecodeError  # protobuf is a coremltools dependency

    return (RuntimeError, OSError, ValueError, DecodeError)


def package_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a ``.mlpackage`` read from its spec (works on any OS with coremltools)."""
    ct = require("coremltools", "coreml", "reading Core ML packages")
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise InferenceError(f"{path} is not a Core ML package (no Manifest.json): re-copy the bundle")
    try:
        spec = ct.utils.load_spec(str(path))
    except _load_errors() as exc:
        raise InferenceError(f"cannot read Core ML package {path.name} ({first_line(exc)}): the package may be "
                             "truncated or corrupt; re-copy the bundle") from None
    return _specs(spec.description.input), _specs(spec.description.output)


class CoreMLSession:
    """A compiled Core ML model (macOS), run with ``MLModel.predict``."""

    def __init__(self, model: Any, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self._model = model
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self._in_names = [s.name for s in inputs]
        self._out_names = [s.name for s in outputs]
        self._in_dtypes = [np.dtype(s.dtype) for s in inputs]

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch; returns outputs in spec order (float32 unless ``raw``)."""
        if self._model is None:
            raise InferenceError(f"session for {self.path.name} is closed: load the model again")
        check_inputs(inputs, self.inputs)
        feed = {}
        for name, want, x in zip(self._in_names, self._in_dtypes, inputs, strict=True):
            if x.dtype != want:
                if x.dtype.kind not in "fiu":
                    raise InputError(f"input {name!r} has dtype {x.dtype}, the model expects {want}: "
                                     "pass a numeric array")
                x = x.astype(want)
            feed[name] = np.ascontiguousarray(x)
        try:
            result = self._model.predict(feed)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise run_failed("Core ML", self.path, exc) from None
        outs = [np.asarray(result[n]) for n in self._out_names]
        return outs if raw else [o.astype(np.float32, copy=False) for o in outs]

    def close(self) -> None:
        """Release the model."""
        self._model = None


class CoreMLRuntime:
    """Core ML through coremltools (macOS only; compute units ALL: CPU, GPU and Neural Engine)."""

    name = "coreml"
    formats = (Format.COREML,)
    extra = "coreml"
    rank = 40
    bench_modules = ("coremltools",)
    plot_markers = (("coreml", "P"),)  # (format, matplotlib marker)

    def is_available(self) -> bool:
        """True on macOS when coremltools can be imported (checked without importing it)."""
        return sys.platform == "darwin" and has_module("coremltools")

    def version(self) -> str | None:
        """The installed coremltools version, or None."""
        return installed_version("coremltools")

    def load(self, path: Path, *, threads: int | None = None) -> CoreMLSession:
        """Compile and load a ``.mlpackage``; off macOS raise an InferenceError naming the alternatives."""
        path = Path(path)
        if sys.platform != "darwin":
            raise InferenceError(f"Core ML runs only on macOS/iOS: cannot run {path.name} on {sys.platform}; "
                                 "use the tflite/onnx/openvino artifact on this host")
        ct = require("coremltools", self.extra, "running Core ML models")
        if not path.exists():
            raise InferenceError(f"model package {path} does not exist: check the bundle path")
        inputs, outputs = package_io(path)
        try:
            model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
        except _load_errors() as exc:
            raise InferenceError(f"Core ML cannot load {path.name} ({first_line(exc)}): the package may be "
                                 "truncated or corrupt, or need a newer macOS") from None
        return CoreMLSession(model, path, inputs, outputs)


RUNTIME = CoreMLRuntime()
