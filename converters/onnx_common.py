"""Helpers every ONNX-producing converter shares: tool versions, graph inputs, the checked fp32 draft."""

from __future__ import annotations

from pathlib import Path

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Precision

__all__ = ["fp32_onnx_draft", "onnx_input_names", "onnx_versions"]


def onnx_versions() -> dict[str, str]:
    """Versions of onnx and onnxruntime (both are needed by every helper here)."""
    onnx = require("onnx", "onnx", "ONNX conversion")
    ort = require("onnxruntime", "onnx", "ONNX quantization")
    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__}


def onnx_input_names(path: Path) -> list[str]:
    """The graph inputs of an ONNX file that are not initializers, in order."""
    onnx = require("onnx", "onnx", "reading ONNX graphs")
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def fp32_onnx_draft(out: Path, versions: dict[str, str], notes: list[str], *, extra: str) -> ArtifactDraft:
    """Check an exported fp32 ONNX file with onnx.checker and describe it as the fp32 ONNX artifact."""
    onnx = require("onnx", extra, "checking the exported ONNX model")
    try:
        onnx.checker.check_model(str(out))
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the exported ONNX model is invalid ({str(exc).splitlines()[0][:200]}): try "
                              "another --opset") from exc
    return ArtifactDraft(format=Format.ONNX, precision=Precision.FP32, path=out, tool_versions=versions,
                         runtime={"runtime": "onnxruntime"}, notes=notes)
