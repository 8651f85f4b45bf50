"""Helpers the converters share: tool versions, graph inputs, the checked fp32 ONNX draft, and running a
conversion tool (tf2onnx, onnx2tf, ORT's converter, the TFLite converter) as a child process."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Precision

__all__ = ["fp32_onnx_draft", "onnx_input_names", "onnx_versions", "output_tail", "run_tool"]


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


def output_tail(text: str | bytes | None, lines: int = 4, limit: int = 600, *, skip: str = "",
                empty: str = "") -> str:
    """The end of a tool's output for a one-line error: its last ``lines`` non-blank lines joined with " | ", cut
    to the last ``limit`` characters; lines matching the regex ``skip`` (the tool's INFO logging) are left out."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    drop = re.compile(skip) if skip else None
    kept = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip() and not (drop and drop.search(ln))]
    return " | ".join(kept[-lines:])[-limit:] or empty


def run_tool(cmd: list[str], *, timeout_s: float, failed: Callable[[subprocess.CalledProcessError], str],
             timed_out: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a conversion tool as a child process with its output captured; a non-zero exit (or a crash) becomes
    ``ConversionError(failed(exc))`` and a run over ``timeout_s`` ``ConversionError(timed_out)``.

    Tools run in a child so their crashes (SIGSEGV in TensorFlow), their logging and their heavy imports stay out
    of this process; ``failed`` turns the captured output into the tool's own one-line reason and fix."""
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as exc:
        raise ConversionError(failed(exc)) from None
    except subprocess.TimeoutExpired:
        raise ConversionError(timed_out) from None
