"""PyTorch -> OpenVINO IR with OpenVINO's own PyTorch frontend (``openvino.convert_model(module, example_input)``).

The second route to OpenVINO for PyTorch sources (``openvino-pytorch``, see converters/routes.py): the first goes
through the ONNX export, which fails on some real models (scripted TorchScript the ONNX exporter cannot inline,
ops without an ONNX symbolic). OpenVINO's frontend traces the module itself (TorchScript modules are read as they
are). Saving, fp16 and NNCF int8 are exactly :class:`OnnxToOpenVINO`'s; inputs keep the PyTorch layout.
"""

from __future__ import annotations

from typing import Any

from edge_sdk.converters.base import ConversionContext
from edge_sdk.converters.onnx_to_openvino import OnnxToOpenVINO, ov_error_summary
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["TorchToOpenVINO"]


class TorchToOpenVINO(OnnxToOpenVINO):
    """PyTorch module (eager, ``.pt2`` or TorchScript) -> OpenVINO IR, no ONNX step. Not registered: a route."""

    sources = (Framework.PYTORCH,)
    target = Format.OPENVINO
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)

    def read_model(self, ctx: ConversionContext, ov: Any) -> tuple[Any, str | None, list[str]]:
        """``openvino.convert_model`` on the module with the source's example inputs and their shapes."""
        src = ctx.source
        example = tuple(src.example_inputs())
        try:
            model = ov.convert_model(src.model, example_input=example if len(example) > 1 else example[0],
                                     input=[tuple(s) for s in src.input_shapes])
        except Exception as exc:  # the frontend raises its own failure types and torch errors alike
            raise ConversionError(f"OpenVINO's PyTorch frontend could not convert the model ({ov_error_summary(exc)})"
                                  ": an op may be unsupported by OpenVINO") from None
        for port, name in zip(model.inputs, src.input_names, strict=False):
            port.get_tensor().set_names({name})
        return model, None, ["converted by OpenVINO's PyTorch frontend (no ONNX step)"]
