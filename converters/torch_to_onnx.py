"""PyTorch -> ONNX: ``torch.onnx.export`` for fp32, the shared ONNX quantizers for other precisions.

``torch.nn.Module`` sources (including ``torch.export`` program modules) go through the dynamo exporter.
TorchScript ``ScriptModule`` sources cannot be traced by dynamo, so they use the TorchScript exporter.
When dynamo fails on an ``nn.Module`` (data-dependent control flow, in-place state as in recurrent models),
the TorchScript exporter is tried next, and the notes say so (the artifact is validated like any other).
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, register
from edge_sdk.converters.onnx_common import fp32_onnx_draft, onnx_versions
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Framework

__all__ = ["TorchToOnnx", "output_names_for", "retraced"]


def output_names_for(names: list[str] | None, count: int | None = None) -> list[str]:
    """The source's output names, or ``output`` / ``output_0``, ``output_1``, ... when it has none."""
    if names:
        return list(names)
    if count is None or count <= 1:
        return ["output"]
    return [f"output_{i}" for i in range(count)]


def _is_script_module(model: Any) -> bool:
    torch = require("torch", "torch", "PyTorch export")
    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def retraced(model: Any, args: tuple) -> Any:
    """A scripted module called with exactly ``args``, traced: ``torch.jit.trace`` of a wrapper records the one
    path these inputs take, dropping optional parameters (silero-vad's ``forward(x, state=None)``) and the control
    flow around them that the TorchScript exporter and coremltools cannot follow."""
    torch = require("torch", "torch", "PyTorch export")

    class _Call(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *xs: Any) -> Any:
            return self.inner(*xs)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(_Call(model).eval(), args, check_trace=False)


def _count_outputs(model: Any, args: tuple) -> int:
    torch = require("torch", "torch", "PyTorch export")
    with torch.no_grad():
        out = model(*args)
    if isinstance(out, (list, tuple)):
        return len(out)
    return 1


def export_torch(model: Any, args: tuple, out: Path, *, input_names: list[str], output_names: list[str] | None,
                 opset: int, dynamic_axes: dict[str, set[int]] | None = None) -> dict[str, str]:
    """Export ``model`` to a single-file ONNX at ``out``; return tool versions."""
    torch = require("torch", "torch", "PyTorch export")
    require("onnx", "torch", "PyTorch export to ONNX")
    script = _is_script_module(model)
    names = output_names_for(output_names, None if output_names else _count_outputs(model, args))
    versions = {"torch": torch.__version__, **onnx_versions()}
    if not script:
        onnxscript = require("onnxscript", "torch", "PyTorch dynamo export to ONNX")
        versions["onnxscript"] = getattr(onnxscript, "__version__", "unknown")
    axes = {n: {a: f"{n}_{a}" for a in sorted(ax)} for n, ax in (dynamic_axes or {}).items() if ax}
    strategies = ([("TorchScript exporter", "torchscript", False), ("TorchScript exporter on a traced call",
                                                                     "torchscript-retraced", False)] if script
                  else [("dynamo exporter", "dynamo", True), ("TorchScript exporter", "torchscript", False)])
    attempts: list[str] = []
    for how, tag, use_dynamo in strategies:
        log = io.StringIO()
        try:
            with torch.no_grad(), redirect_stdout(log), redirect_stderr(log), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                subject = retraced(model, args) if tag == "torchscript-retraced" else model
                torch.onnx.export(subject, args, str(out), input_names=list(input_names), output_names=names,
                                  opset_version=opset, dynamo=use_dynamo, external_data=False,
                                  dynamic_axes=axes or None)
            versions["exporter"] = tag
            break
        except Exception as exc:  # any failure of one exporter (dynamo raises many types): try the next one
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            tail = " | ".join(lines[-3:])[-400:] or type(exc).__name__
            attempts.append(f"{how} ({type(exc).__name__}: {tail})")
            out.unlink(missing_ok=True)
    else:
        raise ConversionError(f"torch.onnx.export (opset {opset}) failed with every exporter: "
                              + "; ".join(attempts) + ": check the model runs on the given input shape, or try "
                              "another --opset")
    if attempts:
        versions["exporter_fallback"] = attempts[0][:300]
    if not out.exists():
        raise ConversionError(f"torch.onnx.export wrote no file at {out}: check the model and the opset")
    return versions


@register
class TorchToOnnx(OnnxExporter):
    """PyTorch module -> ONNX (fp32 export; fp16 / dynamic / int8 derived from the fp32 file)."""

    sources = (Framework.PYTORCH,)

    def export_fp32(self, ctx: ConversionContext, out: Path) -> ArtifactDraft:
        """Write the fp32 ONNX file."""
        src = ctx.source
        args = tuple(src.example_inputs())
        dynamic = getattr(src, "dynamic_axes", None) or {}
        versions = export_torch(src.model, args, out, input_names=list(src.input_names),
                                output_names=list(src.output_names or []), opset=ctx.options.onnx_opset,
                                dynamic_axes=dynamic)
        notes = [f"exported with the {versions['exporter']} exporter, opset {ctx.options.onnx_opset}"]
        if any(dynamic.values()):
            notes.append("dynamic axes kept as asked (--dynamic): " + ", ".join(
                f"{n}{sorted(a)}" for n, a in dynamic.items() if a) + "; validated at the pinned shape")
        if "exporter_fallback" in versions:
            notes.append(f"{versions['exporter']} used after: " + versions.pop("exporter_fallback"))
        return fp32_onnx_draft(out, versions, notes, extra="torch")
