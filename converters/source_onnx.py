"""ONNX sources: a ``.onnx`` file, checked, its symbolic axes pinned, run with ONNX Runtime for the reference.

The converters need concrete shapes, so symbolic input axes are pinned from ``--input-shape`` (a symbolic batch
alone defaults to 1) in a temporary copy (converters/onnx_shapes.py does the graph surgery); the axes
``--dynamic`` names stay symbolic in a second copy that the ONNX and OpenVINO artifacts are built from.

ONNX-ML (scikit-learn / skl2onnx) operators are lowered to standard ONNX ops (converters/onnx_ml_lowering.py) in
both copies, so every target -- the ONNX artifact too -- reads the same graph with tensor outputs (a ZipMap
becomes a float ``[N, C]`` tensor). The reference stays ONNX Runtime on the original (pinned, not lowered) graph,
its ZipMap / string-label outputs converted the same way, so validation checks the lowering. When the lowering
is refused (an unsupported op), nothing changes and ``ml_refusal`` holds the one-line reason the non-ONNX targets
report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.bundle import sha256_path
from edge_sdk.converters.source_common import (
    InputDtypes,
    ShapeSpec,
    SourceBase,
    check_names,
    given_shape,
    guess_layout,
    resolve_dtypes,
)
from edge_sdk.errors import SourceModelError
from edge_sdk.formats import Framework

__all__ = ["OnnxSource"]


class OnnxSource(SourceBase):
    """An ONNX file, run with ONNX Runtime for reference outputs.

    Symbolic input axes are pinned to ``input_shape`` (batch alone defaults to 1) in a copy
    (``self.model``) that every converter reads; ``dynamic`` names axes the ONNX / OpenVINO artifacts keep
    symbolic (``self.dynamic_model``). ``self.path`` stays the user's file (its name and sha256 go in the
    manifest).
    """

    framework = Framework.ONNX

    def __init__(self, path: Path, input_shape: ShapeSpec | None = None, dynamic: Sequence[str] = (),
                 input_dtypes: InputDtypes | None = None) -> None:
        onnx = require("onnx", "onnx", "reading ONNX models")
        from google.protobuf.message import DecodeError

        from edge_sdk.converters.onnx_shapes import input_dims, pin_onnx, resolve_dynamic_axes

        self.path = self.model = self.dynamic_model = path
        self._tmp: Path | None = None
        try:
            proto = onnx.load(str(path), load_external_data=False)
            onnx.checker.check_model(str(path))  # by path: also checks external data files
        except (onnx.checker.ValidationError, ValueError, OSError) as exc:
            raise SourceModelError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0][:160]}): "
                                   "re-export it, the file may be truncated or corrupt") from None
        except DecodeError:
            raise SourceModelError(f"{path} is not a valid ONNX model (protobuf decode failed): "
                                   "re-export it, the file may be truncated or corrupt") from None
        self.sha256 = sha256_path(path)
        inputs = input_dims(proto)
        self.input_names = [n for n, _, _ in inputs]
        # sequence / map outputs (ONNX-ML ZipMap "probabilities") are not tensors: no target or check uses them
        self.output_names = [o.name for o in proto.graph.output if o.type.HasField("tensor_type")]
        self.dropped_outputs = [o.name for o in proto.graph.output if not o.type.HasField("tensor_type")]
        check_names(input_shape, self.input_names, "--input-shape")
        helper = onnx.helper
        self.input_dtypes = resolve_dtypes(input_dtypes, self.input_names,
                                    [np.dtype(helper.tensor_dtype_to_np_dtype(t)).name if t else "float32"
                                     for _, _, t in inputs])
        shapes, symbolic = [], False
        for k, (name, dims, _) in enumerate(inputs):
            given = given_shape(input_shape, k, name)
            if given is not None:
                if len(given) != len(dims) or any(isinstance(d, int) and d != g
                                                  for d, g in zip(dims, given, strict=True)):
                    raise SourceModelError(f"--input-shape {given} does not fit the ONNX input {name!r} "
                                           f"{[d if isinstance(d, int) else '?' for d in dims]}: pass a shape "
                                           "that matches the model")
                dims_out = given
            else:
                dims_out = [d if isinstance(d, int) else None for d in dims]
                if dims_out and dims_out[0] is None:
                    dims_out[0] = 1
                if any(d is None for d in dims_out):
                    shown = [d if isinstance(d, int) else (d or "?") for d in dims]
                    raise SourceModelError(f"ONNX input {name!r} has dynamic dimensions {shown}: pass --input-shape "
                                           f"{name}={','.join(str(d) if isinstance(d, int) else 'N' for d in dims)}"
                                           " with concrete sizes")
            symbolic = symbolic or any(not isinstance(d, int) for d in dims)
            shapes.append([int(d) for d in dims_out])
        self.input_shapes = shapes
        self.layout = guess_layout(shapes[0]) if shapes and self.input_dtypes[0].startswith("float") else ""
        self.pin_notes: list[str] = []
        if symbolic:
            self._tmp = Path(tempfile.mkdtemp(prefix="edge_sdk_onnx_"))
            pinned = self._tmp / path.name
            by_name = dict(zip(self.input_names, shapes, strict=True))
            try:
                self.pin_notes = pin_onnx(path, pinned, by_name)
                self.model = self.dynamic_model = pinned
                keep = {n: resolve_dynamic_axes(dynamic, s, self.layout) for n, s in by_name.items()} if dynamic else {}
                if any(keep.values()):
                    self.dynamic_model = self._tmp / f"dynamic_{path.name}"
                    pin_onnx(path, self.dynamic_model, by_name, keep)
            except (ValueError, OSError, DecodeError) as exc:
                raise SourceModelError(f"could not pin the input shapes of {path.name} "
                                       f"({str(exc).splitlines()[0][:160]}): re-export it with static shapes") from None
        self._reference = self.model  # ONNX Runtime runs this one: the original graph, ai.onnx.ml ops included
        self.ml_refusal: str | None = None
        self._zipmaps: dict[str, list[Any]] = {}
        self._label_maps: dict[str, list[str]] = {}
        self._lower_ml(onnx, proto)
        self._session: Any = None

    def _lower_ml(self, onnx: Any, proto: Any) -> None:
        """Lower ai.onnx.ml operators in the pinned and dynamic copies; on refusal record ``ml_refusal``."""
        from edge_sdk.converters.onnx_ml_lowering import OnnxMlError, lower_onnx_ml, ml_op_types

        if not ml_op_types(proto):
            return
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edge_sdk_onnx_"))
        try:
            lowered = {}
            for kind, p in (("model", Path(self.model)), ("dynamic_model", Path(self.dynamic_model))):
                if kind == "dynamic_model" and p == Path(self.model):
                    lowered[kind] = lowered["model"]
                    continue
                low = lower_onnx_ml(onnx.load(str(p)))
                if low is None:  # cannot happen: ml_op_types found ai.onnx.ml nodes in the same graph
                    return
                out = self._tmp / f"lowered_{kind}_{self.path.name}"
                onnx.save_model(low.model, str(out))
                lowered[kind] = (out, low)
        except OnnxMlError as exc:
            self.ml_refusal = str(exc)
            return
        (self.model, low), (self.dynamic_model, _) = lowered["model"], lowered["dynamic_model"]
        self._zipmaps, self._label_maps = low.zipmap_outputs, low.label_maps
        self.output_names = [o.name for o in low.model.graph.output]
        self.dropped_outputs = []
        self.pin_notes.append("ONNX-ML operators (" + ", ".join(sorted(set(low.replaced))) + ") lowered to standard "
                              "ONNX ops; ZipMap outputs are float [N, classes] tensors"
                              + (", string class labels are int64 indices into "
                                 + "; ".join(f"{k}: {v}" for k, v in low.label_maps.items()) if low.label_maps else ""))
        self.pin_notes.extend(low.notes)

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run with ONNX Runtime (CPU, fp32) on the pinned model."""
        if self._session is None:
            ort = require("onnxruntime", "onnx", "running the ONNX source")
            try:
                self._session = ort.InferenceSession(str(self._reference), providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own non-Python-standard types
                raise SourceModelError(f"ONNX Runtime cannot load {self.path.name} "
                                       f"({str(exc).strip().splitlines()[0][:200]}): the source must run in "
                                       "ONNX Runtime to be the reference") from None
        feeds = {n: np.ascontiguousarray(x, dt) for n, x, dt in zip(self.input_names, inputs, self.input_dtypes,
                                                                     strict=True)}
        try:
            outs = list(self._session.run(self.output_names, feeds))
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument derive from RuntimeError only
            shapes = [list(x.shape) for x in inputs]
            raise SourceModelError(f"the ONNX model rejects inputs of shape {shapes} "
                                   f"({str(exc).strip().splitlines()[0][:200]}): pass the --input-shape the "
                                   "model was built for") from None
        if self._zipmaps or self._label_maps:
            from edge_sdk.converters.onnx_ml_lowering import labels_to_index, zipmap_to_array

            for k, name in enumerate(self.output_names):
                if name in self._zipmaps:
                    outs[k] = zipmap_to_array(outs[k], self._zipmaps[name])
                elif name in self._label_maps:
                    outs[k] = labels_to_index(outs[k], self._label_maps[name])
        return outs

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
