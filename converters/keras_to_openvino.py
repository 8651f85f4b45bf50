"""Keras / TensorFlow -> OpenVINO IR with OpenVINO's own TensorFlow frontend, reading the SavedModel directly.

The second route to OpenVINO for Keras sources (``openvino-tf``, see converters/routes.py): the first goes
through tf2onnx, whose ONNX some real models do not survive (Keras 2 recurrent layers, for one). Saving, fp16 and
NNCF int8 are exactly :class:`OnnxToOpenVINO`'s; inputs keep the Keras layout (NHWC).
"""

from __future__ import annotations

from typing import Any

from edge_sdk.converters.base import ConversionContext
from edge_sdk.converters.onnx_to_openvino import OnnxToOpenVINO, ov_error_summary
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["KerasToOpenVINO"]


class KerasToOpenVINO(OnnxToOpenVINO):
    """Keras model / SavedModel -> OpenVINO IR, no ONNX step. Not registered: a route."""

    sources = (Framework.KERAS,)
    target = Format.OPENVINO
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)

    def read_model(self, ctx: ConversionContext, ov: Any) -> tuple[Any, str | None, list[str]]:
        """``openvino.convert_model`` on the source's SavedModel (its serving signature, fixed input shapes)."""
        src = ctx.source
        saved = src.saved_model_dir()
        try:
            model = ov.convert_model(str(saved), input=[tuple(s) for s in src.input_shapes])
        except Exception as exc:  # the frontend raises its own failure types
            raise ConversionError(f"OpenVINO's TensorFlow frontend could not convert the SavedModel "
                                  f"({ov_error_summary(exc)}): an op may be unsupported by OpenVINO") from None
        return model, None, ["converted from the SavedModel by OpenVINO's TensorFlow frontend (no ONNX step)"]
