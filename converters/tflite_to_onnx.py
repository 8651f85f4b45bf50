"""An existing ``.tflite`` -> ONNX with tf2onnx (``python -m tf2onnx.convert --tflite``), in its own process.

tf2onnx folds the float16 weights + DEQUANTIZE of an fp16 ``.tflite`` into float32 constants, so the fp32 ONNX
file computes what the LiteRT CPU kernels compute. fp16 / dynamic / int8 ONNX are derived from that fp32 file
(:class:`OnnxExporter`). The input layout stays the TFLite one (NHWC): tf2onnx is not asked to transpose.

Refused up front, with the reason: files with custom ops (tf2onnx writes them as unknown ``TFL_*`` nodes that
no ONNX runtime can run) and full-integer files with int8 inputs/outputs (the ONNX graph would take raw int8).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_sdk._deps import has_module, installed_version
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, SourceModel, register
from edge_sdk.converters.onnx_common import fp32_onnx_draft, onnx_versions, output_tail, run_tool
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.errors import ConversionError, MissingDependencyError, UnsupportedConversionError
from edge_sdk.formats import Framework, Precision

__all__ = ["TFLiteToOnnx", "check_convertible", "tflite_to_onnx"]

_TIMEOUT_S = 900


def tflite_to_onnx(tflite: Path, out: Path, opset: int) -> str:
    """Run tf2onnx on ``tflite`` writing ``out``; return the tf2onnx version. Raises ConversionError on failure."""
    if not has_module("tf2onnx"):  # importing it loads TensorFlow: only look for it
        raise MissingDependencyError("tf2onnx", "keras", "converting .tflite files to ONNX")
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(out),
           "--opset", str(opset)]

    def failed(exc: subprocess.CalledProcessError) -> str:
        tail = output_tail(exc.stderr, 3, 500, skip=" - INFO - ", empty="no error output")  # not tf2onnx's INFO
        return (f"tf2onnx could not convert {tflite.name} (exit {exc.returncode}): {tail}: choose another target "
                "(tflite, openvino)")

    run_tool(cmd, timeout_s=_TIMEOUT_S, failed=failed,
             timed_out=f"tf2onnx took over {_TIMEOUT_S} s on {tflite.name}: check the model size")
    if not out.is_file():
        raise ConversionError(f"tf2onnx wrote no ONNX file for {tflite.name}: check the tf2onnx installation")
    return installed_version("tf2onnx") or "unknown"


def check_convertible(src: SourceModel, summary: dict[str, Any], tool: str) -> None:
    """Refuse, with the reason, a .tflite that ``tool`` cannot turn into a float model: custom ops, int8 I/O."""
    custom = [o for o in summary["ops"] if not o.isupper()]
    if custom:
        raise UnsupportedConversionError(
            f"{src.path.name} needs custom ops {', '.join(custom)} that {tool} cannot convert: bundle it as "
            "tflite, or convert from the training framework")
    if any(t["dtype"] in ("int8", "uint8") for t in summary["inputs"] + summary["outputs"]):
        raise UnsupportedConversionError(
            f"{src.path.name} is a full-integer model with int8 inputs/outputs, which {tool} keeps as raw integer "
            "tensors: bundle it as tflite, or convert from the training framework")


@register
class TFLiteToOnnx(OnnxExporter):
    """An existing ``.tflite`` -> fp32 ONNX (tf2onnx); other ONNX precisions derived from it."""

    sources = (Framework.TFLITE,)

    def export_fp32(self, ctx: ConversionContext, out: Path) -> ArtifactDraft:
        """Convert the source file with tf2onnx and check the result."""
        from edge_sdk.converters.keras_to_tflite import tflite_summary

        src = ctx.source
        check_convertible(src, tflite_summary(src.path), "tf2onnx")
        tool = tflite_to_onnx(Path(src.path), out, ctx.options.onnx_opset)
        notes = [f"converted from {src.path.name} ({getattr(src, 'precision', Precision.FP32).value}) by tf2onnx "
                 f"{tool}, opset {ctx.options.onnx_opset}; input layout kept as in the .tflite"]
        return fp32_onnx_draft(out, {**onnx_versions(), "tf2onnx": tool}, notes, extra="onnx")
