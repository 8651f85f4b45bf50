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

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, OptionSpec, check_precision, register
from edge_sdk.converters.coreml_spec import (
    check_package,
    check_palette_bits,
    compress_and_save,
    compute_precision,
    deployment_target,
    finish_draft,
    import_coremltools,
    shim_notes,
)
from edge_sdk.converters.shims import explain
from edge_sdk.errors import ConversionError, first_line
from edge_sdk.formats import Format, Framework, Precision

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
class TorchToCoreML:
    """PyTorch module -> Core ML ML program (fp32, fp16, int8 weights, palettized weights)."""

    sources = (Framework.PYTORCH,)
    target = Format.COREML
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.PALETTIZED)
    calibrated_precisions = ()  # int8 / palettized are weight-only: no calibration data
    extra_options = (OptionSpec("coreml_capture", str, "export", ("export", "trace"),
                                "how the model is captured (route coremltools-trace sets trace)"),)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Trace, convert with coremltools, compress the weights if asked, save and check the package."""
        check_precision(self, precision)
        if precision is Precision.PALETTIZED:
            check_palette_bits(ctx.options.coreml_palette_bits)
        ct = import_coremltools()
        torch = require("torch", "torch", "PyTorch to Core ML conversion")
        src = ctx.source
        example = src.example_inputs()
        target_name = ctx.options.coreml_minimum_deployment_target
        target = deployment_target(target_name)
        out_shapes = [list(o.shape) for o in src.predict([np.zeros(s, np.float32) for s in src.input_shapes])]
        traced, how = _capture(src.model, example, str(ctx.options.extra.get("coreml_capture", "export")))
        inputs = [ct.TensorType(name=n, shape=tuple(s), dtype=np.float32)
                  for n, s in zip(src.input_names, src.input_shapes, strict=True)]
        outputs = [ct.TensorType(name=n, dtype=np.float32) for n in src.output_names]
        log = io.StringIO()
        try:
            with redirect_stdout(log), redirect_stderr(log):
                mlmodel = ct.convert(traced, source="pytorch", convert_to="mlprogram", inputs=inputs,
                                     outputs=outputs, compute_precision=compute_precision(precision),
                                     minimum_deployment_target=target)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError) as exc:
            tail = " | ".join(str(exc).strip().splitlines()[-2:])[:300]
            known = explain("coremltools", str(exc))
            hint = (f"{known} (see converters/shims.py)" if known else
                    "an op may be unsupported by Core ML; see coremltools' composite operators to register one")
            raise ConversionError(f"coremltools could not convert the PyTorch model ({type(exc).__name__}: {tail}): "
                                  + hint) from exc
        out = ctx.path_for(Format.COREML, precision, ".mlpackage")
        notes = [f"captured with {how}; float32 inputs/outputs; minimum deployment target {target.name}"]
        notes += shim_notes("pytorch")
        notes += compress_and_save(mlmodel, precision, out, palette_bits=ctx.options.coreml_palette_bits)
        checks = check_package(out, precision, input_names=src.input_names, input_shapes=src.input_shapes,
                               output_shapes=out_shapes, output_names=src.output_names, target=target_name)
        draft = ArtifactDraft(
            format=Format.COREML, precision=precision, path=out,
            tool_versions={"coremltools": ct.__version__, "torch": torch.__version__},
            runtime={"compute_units": "ALL", "minimum_deployment_target": target.name},
            notes=notes)
        return [finish_draft(draft, checks)]
