"""Existing deployment files as sources: a ``.tflite`` or an OpenVINO IR (``.xml`` + ``.bin``) bundled as it is.

The source runs in the device runtimes of :mod:`edge_sdk.runtimes` (LiteRT, OpenVINO with the
faithful f32 hint), so the as-is artifact is validated against itself and the baseline is measured on the
very model that ships. A full-integer ``.tflite`` takes float32 inputs and returns float32 outputs here:
the LiteRT session quantizes and dequantizes with each tensor's scale / zero-point.

The file's own precision is detected (:func:`tflite_precision`, :func:`openvino_precision`) and is the only
precision the as-is converters produce; onward routes (tflite -> onnx / ort / openvino) live in
``tflite_to_onnx.py`` and ``tflite_to_openvino.py`` and are registered when this module is imported.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import sha256_path
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.source_common import pin_shapes
from edge_sdk.errors import InferenceError, SourceModelError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["OpenVINOSource", "OpenVINOToOpenVINO", "TFLiteSource", "TFLiteToTFLite", "load_prebuilt",
           "openvino_precision", "tflite_precision"]

_INT_ACTIVATIONS = ("int8", "uint8", "int16")
_OV_INT_WEIGHTS = ("i8", "u8", "i4", "u4")


def _layout(shape: list[int]) -> str:
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "NCHW"
    return ""


class _Prebuilt:
    """What both prebuilt sources share: a runtime session (:meth:`_open`), pinned shapes, the detected precision
    (:meth:`_detect_precision`)."""

    framework: Framework
    kind: str
    what: str

    def __init__(self, path: Path, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None) -> None:
        try:
            session = self._open(path)
        except InferenceError as exc:
            raise SourceModelError(str(exc)) from None  # names the file, the reason and the likely fixes
        precision = self._detect_precision(path)
        self.path = path
        self.model = path  # the file is the model; converters read it from disk
        self.sha256 = sha256_path(path)
        self.precision = precision
        self._session = session
        self.input_names = [s.name for s in session.inputs]
        self.output_names = [s.name for s in session.outputs]
        #: the dtypes ``predict`` takes: float32 for quantized (scale / zero-point) inputs, which the runtime
        #: session quantizes itself, else the file's own dtype (int64 token ids stay int64)
        self.input_dtypes: list[str] = ["float32" if getattr(s, "scale", None) is not None else s.dtype
                                        for s in session.inputs]
        self.raw_input_dtypes: list[str] = [s.dtype for s in session.inputs]  # as stored in the file
        self.input_shapes = pin_shapes([list(s.shape) for s in session.inputs], self.input_names, input_shape,
                                       self.what)
        self.layout = _layout(self.input_shapes[0]) if self.input_shapes else ""

    def _open(self, path: Path) -> Any:
        """A session of the file in its device runtime (raises InferenceError)."""
        raise NotImplementedError

    def _detect_precision(self, path: Path) -> Precision:
        """The precision the file is stored in."""
        raise NotImplementedError

    def predict(self, inputs: list[Any]) -> list[np.ndarray]:
        """Run the file in its device runtime; float32 in, float32 out (int8 I/O is (de)quantized)."""
        feed = []
        for x, dtype, name in zip(inputs, self.input_dtypes, self.input_names, strict=True):
            x = np.asarray(x)
            if np.dtype(dtype).kind in "iu" and x.dtype.kind == "f":
                if not np.array_equal(x, np.rint(x)):
                    raise SourceModelError(f"{self.path.name} input {name!r} takes {dtype} values, got non-integer "
                                           "floats: give integer validation data (--val FILE.npy)")
                x = x.astype(dtype)
            feed.append(x)
        try:
            return [np.asarray(o, np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o)
                    for o in self._session.run(feed)]
        except InferenceError as exc:
            raise SourceModelError(f"{self.path.name} cannot run on inputs of shape "
                                   f"{[list(np.shape(x)) for x in feed]} ({exc})") from None

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` entry."""
        return {"framework": self.framework.value, "file": self.path.name, "sha256": self.sha256,
                "kind": self.kind, "precision": self.precision.value}

    def close(self) -> None:
        """Release the runtime session."""
        if self._session is not None:
            self._session.close()
            self._session = None


class TFLiteSource(_Prebuilt):
    """An existing ``.tflite`` file, run with the LiteRT interpreter."""

    framework = Framework.TFLITE
    kind = "tflite"
    what = "TFLite"

    def _open(self, path: Path) -> Any:
        """A LiteRT interpreter session."""
        from edge_sdk.runtimes.litert import LiteRTRuntime

        return LiteRTRuntime().load(path)

    def _detect_precision(self, path: Path) -> Precision:
        """From the tensor types in the flatbuffer."""
        return tflite_precision(path)


class OpenVINOSource(_Prebuilt):
    """An existing OpenVINO IR (``.xml`` with its ``.bin`` beside it), run on the CPU with the f32 hint."""

    framework = Framework.OPENVINO
    kind = "openvino-ir"
    what = "OpenVINO"

    def __init__(self, path: Path, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None) -> None:
        self.weights = path.with_suffix(".bin")
        super().__init__(path, input_shape)

    def _open(self, path: Path) -> Any:
        """A CPU session with the f32 hint: the reference the converted artifacts are compared with."""
        from edge_sdk.runtimes.openvino import OpenVINORuntime

        return OpenVINORuntime().load(path, precision_hint="f32")

    def _detect_precision(self, path: Path) -> Precision:
        """From the element types of the IR's weights."""
        return openvino_precision(path)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` entry, with the weights file's hash."""
        return {**super().describe(), "weights_sha256": sha256_path(self.weights)}


def _interpreter(path: Path) -> Any:
    from edge_sdk.runtimes.litert import _interpreter_module

    try:
        return _interpreter_module().Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise SourceModelError(f"{path.name} is not a readable .tflite model ({str(exc).strip()[:160]})") from None


def tflite_precision(path: Path) -> Precision:
    """int8 (integer I/O or activations), dynamic (int8 weights, float activations), fp16 (float16 weights +
    DEQUANTIZE) or fp32, read from the flatbuffer's tensor types."""
    interp = _interpreter(path)
    ops = interp._get_ops_details()  # the public API has no op listing
    types = {d["index"]: np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    produced = {int(i) for o in ops for i in o["outputs"]}
    graph_in = {int(d["index"]) for d in interp.get_input_details()}
    consumed = {int(i) for o in ops for i in o["inputs"] if int(i) >= 0}
    weights = {types.get(i) for i in consumed - produced - graph_in}
    io = [np.dtype(d["dtype"]).name for d in interp.get_input_details() + interp.get_output_details()
          if d["quantization"][0]]
    if any(t in _INT_ACTIVATIONS for t in io) or any(types.get(i) in _INT_ACTIVATIONS for i in produced):
        return Precision.INT8
    if weights & {"int8", "uint8", "int4"}:
        return Precision.DYNAMIC
    if "float16" in weights:
        return Precision.FP16
    return Precision.FP32


def openvino_precision(xml: Path) -> Precision:
    """int8 when FakeQuantize or int8/int4 compressed weights are present, fp16 for f16 weights, else fp32."""
    from edge_sdk._deps import require

    ov = require("openvino", "openvino", "reading OpenVINO IR")
    model = ov.Core().read_model(str(xml))
    consts = set()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            return Precision.INT8
        if kind == "Constant":
            consts.add(op.get_output_element_type(0).get_type_name())
    if consts & set(_OV_INT_WEIGHTS):
        return Precision.INT8
    return Precision.FP16 if "f16" in consts else Precision.FP32


def load_prebuilt(path: Path, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None,
                  framework: str | None = None) -> TFLiteSource | OpenVINOSource | None:
    """A prebuilt source for a ``.tflite`` file or an OpenVINO ``.xml`` (or any file ``framework`` names as one
    of them); None for any other file. ``input_shape`` is one shape (the first input) or {input name: shape}."""
    path = Path(path)
    kind = framework or {".tflite": "tflite", ".xml": "openvino"}.get(path.suffix.lower())
    if kind == "tflite":
        return TFLiteSource(path, input_shape)
    if kind == "openvino":
        if not path.with_suffix(".bin").is_file():
            raise SourceModelError(f"OpenVINO weights {path.with_suffix('.bin').name} are missing: put the .bin "
                                   f"next to {path.name}")
        return OpenVINOSource(path, input_shape)
    return None


def _refuse_other_precision(ctx: ConversionContext, precision: Precision) -> Precision:
    own = getattr(ctx.source, "precision", None)
    if own is not precision:
        name = ctx.source.path.name if ctx.source.path else "the model"
        raise UnsupportedConversionError(
            f"{name} is {own.value if own else 'of unknown precision'} already: an existing model is bundled as it "
            f"is; pass --precision {own.value if own else precision.value}, or convert from the training framework "
            "for other precisions")
    return precision


class _AsIs:
    """Base of the converters that bundle an existing model unchanged, in its own precision only: they copy its
    file (and the ``side_files`` beside it, by suffix) and describe the copy (:meth:`draft`)."""

    precisions = tuple(Precision)
    calibrated_precisions = ()  # bundled as it is: nothing is quantized here
    target: Format
    suffix: str  # of the main file
    side_files: tuple[str, ...] = ()  # suffixes of the files that go with it (OpenVINO's .bin)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Copy the file(s) unchanged; refuse any precision other than the model's own."""
        check_precision(self, precision)
        _refuse_other_precision(ctx, precision)
        out = ctx.path_for(self.target, precision, self.suffix)
        shutil.copyfile(ctx.source.path, out)
        for side in self.side_files:
            shutil.copyfile(ctx.source.path.with_suffix(side), out.with_suffix(side))
        notes = [f"the existing {ctx.source.path.name}" + "".join(f" + {side}" for side in self.side_files)
                 + f", bundled unchanged (detected precision {precision.value})"]
        return [self.draft(ctx, precision, out, notes)]

    def draft(self, ctx: ConversionContext, precision: Precision, out: Path, notes: list[str]) -> ArtifactDraft:
        """The draft describing the copied model at ``out``."""
        raise NotImplementedError


@register
class TFLiteToTFLite(_AsIs):
    """An existing ``.tflite`` -> the same bytes, in its own precision only."""

    sources = (Framework.TFLITE,)
    target = Format.TFLITE
    suffix = ".tflite"

    def draft(self, ctx: ConversionContext, precision: Precision, out: Path, notes: list[str]) -> ArtifactDraft:
        """A TFLite draft; custom ops the device's LiteRT build must provide are named."""
        from edge_sdk.converters.keras_to_tflite import tflite_draft, tflite_summary, version_of

        summary = tflite_summary(out)
        custom = [o for o in summary["ops"] if not o.isupper()]
        if custom:
            notes.append(f"needs custom ops {', '.join(custom)}: they ran here in ai-edge-litert; check the "
                         "device's LiteRT build provides them")
        return tflite_draft(out, precision, summary, ctx.source.input_names, notes,
                            {"ai-edge-litert": version_of("ai-edge-litert", "tflite-runtime")})


@register
class OpenVINOToOpenVINO(_AsIs):
    """An existing OpenVINO IR -> the same ``.xml`` + ``.bin``, in its own precision only."""

    sources = (Framework.OPENVINO,)
    target = Format.OPENVINO
    suffix = ".xml"
    side_files = (".bin",)

    def draft(self, ctx: ConversionContext, precision: Precision, out: Path, notes: list[str]) -> ArtifactDraft:
        """An OpenVINO draft with the .bin as its side file."""
        from edge_sdk.converters.keras_to_tflite import version_of
        from edge_sdk.converters.onnx_to_openvino import RUNTIME_HINTS

        return ArtifactDraft(format=Format.OPENVINO, precision=precision, path=out,
                             tool_versions={"openvino": version_of("openvino")}, runtime=dict(RUNTIME_HINTS),
                             notes=notes, files=[out.with_suffix(".bin")])


# the onward routes from a .tflite source register themselves on import (no framework is imported)
from edge_sdk.converters import tflite_to_onnx, tflite_to_openvino  # noqa: E402, F401
