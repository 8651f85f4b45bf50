"""An existing ``.tflite`` -> OpenVINO IR with OpenVINO's own TensorFlow Lite frontend (``openvino.convert_model``).

No ONNX step: ``convert_model("x.tflite")`` reads the flatbuffer directly (float16 weights + DEQUANTIZE become
f16 constants + Convert). Only reading the model differs from :class:`OnnxToOpenVINO` (``read_model``): saving,
fp16 and NNCF int8 are its own; the input layout stays the TFLite one (NHWC).
"""

from __future__ import annotations

from typing import Any

from edge_sdk.converters.base import ConversionContext, register
from edge_sdk.converters.onnx_to_openvino import OnnxToOpenVINO, ov_error_summary
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

    def read_model(self, ctx: ConversionContext, ov: Any) -> tuple[Any, str | None, list[str]]:
        """``openvino.convert_model`` on the source ``.tflite`` (no ONNX step); its NHWC layout is kept."""
        from edge_sdk.converters.keras_to_tflite import tflite_summary

        src = ctx.source
        check_convertible(src, tflite_summary(src.path), "OpenVINO's TFLite frontend")
        try:
            model = ov.convert_model(str(src.path))
        except Exception as exc:  # the frontend raises its own failure types
            raise ConversionError(f"OpenVINO could not read {src.path.name} ({ov_error_summary(exc)}): bundle it as "
                                  "tflite, or convert from the training framework") from None
        notes = [f"converted from {src.path.name} by OpenVINO's TensorFlow Lite frontend; input layout kept"]
        if getattr(src, "precision", None) is Precision.FP16:
            notes.append("the .tflite's float16 weights stay float16 in the IR and are widened to f32 at load: "
                         "computed in f32, with exactly the source's weight values")
        return model, None, notes
