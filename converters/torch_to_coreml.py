"""PyTorch -> Core ML ``.mlpackage`` (ML program) with coremltools.

The module is captured with ``torch.export.export(...).run_decompositions({})`` on the source's
example inputs (coremltools 9 takes ATEN-dialect programs; ``torch.jit.trace`` still works but is
deprecated in torch 2.13 and gave the same ML program op for op). A TorchScript ``ScriptModule``
source is passed to coremltools as is; the choice is made from the kind of source, not as a fallback.
Traced TorchScript that computes sizes (``x.view(x.size(0), -1)``) needs the ``coreml-torch-int-cast``
shim under NumPy >= 2.4 (see ``shims.py``; applied by ``import_coremltools``, named in the notes).
Inputs and outputs are kept float32 at the model boundary whatever the compute precision, so every
Core ML artifact takes the same tensors.

Precisions: fp32 (fp32 compute), fp16 (fp16 compute and weights), int8 (fp16 model with linear
symmetric per-channel int8 weights) and palettized (fp16 model with k-means palettized weights).
"""

from __future__ import annotations

import warnings
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ConversionContext, OptionSpec, register
from edge_sdk.converters.coreml_common import CoreMLCapture, CoreMLConverter
from edge_sdk.converters.model_card import CARD_OPTIONS
from edge_sdk.converters.shims import explain
from edge_sdk.errors import ConversionError, first_line
from edge_sdk.formats import Framework

__all__ = ["TorchToCoreML"]


def _capture(model: Any, example: tuple[Any, ...], how: str = "export") -> tuple[Any, str]:
    """The object handed to ``ct.convert``: a TorchScript module as given, else an ATEN-dialect export, or with
    ``how="trace"`` (the route ``coremltools-trace``) a ``torch.jit.trace``: coremltools' TorchScript frontend
    still covers ops its torch.export frontend does not (``lstm``: "Unsupported fx node lstm")."""
    torch = require("torch", "torch", "PyTorch to Core ML conversion")
    script = isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))
    if script and how != "trace":
        return model, "torchscript (given)"
    if how == "trace":
        try:
            if script:  # optional parameters and control flow coremltools cannot follow: trace the one call
                from edge_sdk.converters.torch_to_onnx import retraced

                return retraced(model, example), "torch.jit.trace of the TorchScript call"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch 2.13 but still works
                return torch.jit.trace(model, example, strict=False), "torch.jit.trace"
        except Exception as exc:  # tracing raises many types: this route's reason
            first = first_line(exc, 200)
            raise ConversionError(f"torch.jit.trace failed before Core ML conversion ({first})") from exc
    try:
        with torch.no_grad():
            program = torch.export.export(model, example, strict=False).run_decompositions({})
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:  # torch.export's Unsupported is a RuntimeError
        lines = str(exc).strip().splitlines()
        first = lines[0][:200] if lines else type(exc).__name__
        raise ConversionError(f"torch.export failed before Core ML conversion ({first}): make the model "
                              "exportable (no data-dependent control flow) or pass a TorchScript module") from exc
    return program, "torch.export (ATEN dialect)"


@register
class TorchToCoreML(CoreMLConverter):
    """PyTorch module -> Core ML ML program (fp32, fp16, int8 weights, palettized weights)."""

    sources = (Framework.PYTORCH,)
    frontend = "pytorch"
    source_label = "the PyTorch model"
    extra_options = (*CARD_OPTIONS, OptionSpec("coreml_capture", str, "export", ("export", "trace"),
                                "how the model is captured (route coremltools-trace sets trace)"),)

    def capture(self, ctx: ConversionContext, ct: Any) -> CoreMLCapture:
        """Export (or trace) the module on the source's example inputs; float32 I/O under the source's names."""
        torch = require("torch", "torch", "PyTorch to Core ML conversion")
        src = ctx.source
        traced, how = _capture(src.model, src.example_inputs(), str(ctx.options.extra.get("coreml_capture", "export")))
        return CoreMLCapture(model=traced, input_names=list(src.input_names), output_names=list(src.output_names),
                             note=f"captured with {how}; float32 inputs/outputs",
                             tool_versions={"torch": torch.__version__})

    def failure_hint(self, exc: Exception) -> str:
        """A known coremltools bug (shims.py) by name, else how to add the missing op."""
        known = explain("coremltools", str(exc))
        return (f"{known} (see converters/shims.py)" if known else
                "an op may be unsupported by Core ML; see coremltools' composite operators to register one")
