"""Keras / TensorFlow -> ONNX with tf2onnx, from the source's SavedModel ``serving_default`` signature.

tf2onnx runs in a subprocess (``python -m tf2onnx.convert --saved-model``): it works with TF 2.21 and
Keras 3 exports, and keeps its global TensorFlow graph state out of the caller's process. The input
layout stays NHWC, as in the Keras model; the ONNX graph's input names are what tf2onnx gives them
(the signature's names). fp16 / dynamic / int8 are derived from the fp32 file by the shared quantizers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_sdk._deps import has_module, installed_version
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, register
from edge_sdk.converters.onnx_common import fp32_onnx_draft, onnx_input_names, onnx_versions, output_tail, run_tool
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.errors import ConversionError, MissingDependencyError
from edge_sdk.formats import Framework

__all__ = ["KerasToOnnx", "saved_model_to_onnx"]

_TIMEOUT_S = 900


def _tail(text: str | None) -> str:
    return output_tail(text, skip=r" - INFO - |^(I0000|W0000)")  # tf2onnx's and absl's INFO lines


def _dist_version(*dists: str) -> str:
    return installed_version(*dists) or "unknown"


def saved_model_to_onnx(saved_model: Path, out: Path, opset: int) -> dict[str, str]:
    """Convert a SavedModel's ``serving_default`` signature to a single ONNX file; return tool versions."""
    for mod in ("tf2onnx", "tensorflow"):
        if not has_module(mod):
            raise MissingDependencyError(mod, "keras", "converting Keras / TensorFlow models to ONNX")
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--tag", "serve",
           "--signature_def", "serving_default", "--output", str(out), "--opset", str(int(opset))]
    run_tool(cmd, timeout_s=_TIMEOUT_S,
             failed=lambda exc: f"tf2onnx failed on {saved_model.name} (exit {exc.returncode}): {_tail(exc.stderr)}: "
                                "check the model's ops are supported by tf2onnx, or try another --onnx-opset",
             timed_out=f"tf2onnx took over {_TIMEOUT_S} s on {saved_model.name}: check the model size")
    if not out.is_file():
        raise ConversionError(f"tf2onnx wrote no file at {out}: check the SavedModel signature")
    return {"tf2onnx": _dist_version("tf2onnx"), "tensorflow": _dist_version("tensorflow-cpu", "tensorflow"),
            **onnx_versions()}


@register
class KerasToOnnx(OnnxExporter):
    """Keras model or SavedModel -> ONNX (NHWC inputs kept)."""

    sources = (Framework.KERAS,)

    def export_fp32(self, ctx: ConversionContext, out: Path) -> ArtifactDraft:
        """Write the fp32 ONNX file."""
        src = ctx.source
        versions = saved_model_to_onnx(Path(src.saved_model_dir()), out, ctx.options.onnx_opset)
        draft = fp32_onnx_draft(out, versions, [], extra="keras")
        names = onnx_input_names(out)
        if len(names) != len(src.input_shapes):
            raise ConversionError(f"tf2onnx produced {len(names)} input(s) but the Keras model has "
                                  f"{len(src.input_shapes)}: export the model with one input per tensor")
        draft.notes.append(f"converted with tf2onnx from the SavedModel serving_default signature, opset "
                           f"{ctx.options.onnx_opset}; input layout kept as {src.layout or 'in the model'}; "
                           f"ONNX inputs {names}")
        return draft
