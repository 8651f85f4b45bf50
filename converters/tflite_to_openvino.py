"""An existing ``.tflite`` -> OpenVINO IR with OpenVINO's own TensorFlow Lite frontend (``openvino.convert_model``).

No ONNX step: ``convert_model("x.tflite")`` reads the flatbuffer directly (float16 weights + DEQUANTIZE become
f16 constants + Convert). fp32 / fp16 / NNCF int8 are saved exactly as :class:`OnnxToOpenVINO` saves them (its
quantization step is reused); the input layout stays the TFLite one (NHWC).
"""

from __future__ import annotations

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.onnx_to_openvino import RUNTIME_HINTS, OnnxToOpenVINO, _one_line, _tool_version
from edge_sdk.converters.tflite_to_onnx import check_convertible
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["TFLiteToOpenVINO"]


@register
class TFLiteToOpenVINO(OnnxToOpenVINO):
    """An existing ``.tflite`` -> OpenVINO IR (fp32, fp16, int8) through OpenVINO's TFLite frontend."""

    sources = (Framework.TFLITE,)
    target = Format.OPENVINO
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Write ``<workdir>/openvino/<precision>.xml`` (+ ``.bin``) from the source ``.tflite``."""
        from edge_sdk.converters.keras_to_tflite import tflite_summary

        check_precision(self, precision)
        ov = require("openvino", "openvino-convert", "OpenVINO conversion")
        src = ctx.source
        check_convertible(src, tflite_summary(src.path), "OpenVINO's TFLite frontend")
        if precision is Precision.INT8:
            ctx.require_calibration("OpenVINO int8 (NNCF) quantization")
        frontend = require("openvino.frontend", "openvino-convert", "OpenVINO conversion")
        ovc_error = require("openvino.tools.ovc.error", "openvino-convert", "OpenVINO conversion").Error
        failures = (RuntimeError, ovc_error, frontend.GeneralFailure, frontend.OpConversionFailure,
                    frontend.OpValidationFailure, frontend.NotImplementedFailure, frontend.InitializationFailure)
        try:
            model = ov.convert_model(str(src.path))
        except failures as exc:
            raise ConversionError(f"OpenVINO could not read {src.path.name} ({_one_line(exc)[:300]}): bundle it as "
                                  "tflite, or convert from the training framework") from None
        notes = [f"converted from {src.path.name} by OpenVINO's TensorFlow Lite frontend; input layout kept"]
        tool_versions = {"openvino": _tool_version("openvino")}
        if precision is Precision.INT8:
            model, quant_notes = self._quantize(ctx, model, None)
            tool_versions["nncf"] = _tool_version("nncf")
            notes += quant_notes
        elif precision is Precision.FP16:
            notes.append("weights stored as fp16 (compress_to_fp16=True); computed in f32 under the f32 hint")
        elif getattr(src, "precision", None) is Precision.FP16:
            notes.append("the .tflite's float16 weights stay float16 in the IR and are widened to f32 at load: "
                         "computed in f32, with exactly the source's weight values")
        xml = ctx.path_for(Format.OPENVINO, precision, ".xml")
        try:
            ov.save_model(model, str(xml), compress_to_fp16=precision is Precision.FP16)
        except RuntimeError as exc:
            raise ConversionError(f"OpenVINO could not save {xml} ({_one_line(exc)}): check free disk space") from None
        return [ArtifactDraft(format=Format.OPENVINO, precision=precision, path=xml, tool_versions=tool_versions,
                              runtime=dict(RUNTIME_HINTS), notes=notes, files=[xml.with_suffix(".bin")])]
