"""The Core ML convert steps every frontend shares (PyTorch, Keras / TensorFlow), in one base class.

A Core ML conversion is the same sequence whatever the framework: check the precision (and palette size), import
coremltools with its shims, resolve the deployment target, record the source's output shapes, capture the model
(the one step that differs), ``ct.convert`` it with float32 inputs and outputs, compress the weights, save the
``.mlpackage`` and check its spec. :class:`CoreMLConverter` runs that sequence; a frontend supplies
:meth:`CoreMLConverter.capture` (and, if it must, :meth:`CoreMLConverter.after_convert` and
:meth:`CoreMLConverter.failure_hint`), so a fix to one step reaches every frontend.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision
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
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Precision

__all__ = ["CoreMLCapture", "CoreMLConverter"]


@dataclass
class CoreMLCapture:
    """What a frontend hands the shared steps: the object ``ct.convert`` takes and how to describe it."""

    model: Any  # a torch.export program / TorchScript module, or ``[signature]`` of a SavedModel
    input_names: list[str]  # the Core ML input names (checked in the saved package)
    output_names: list[str]  # names for the float32 ``ct.TensorType`` outputs
    note: str  # how it was captured, the start of the artifact's first note
    tool_versions: dict[str, str]  # the framework's version (coremltools' is added)
    keep_alive: Any = None  # objects ``model`` needs while converting (the loaded SavedModel)


class CoreMLConverter:
    """Base of the X -> Core ML ML program converters (fp32, fp16, int8 weights, palettized weights)."""

    target = Format.COREML
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.PALETTIZED)
    calibrated_precisions = ()  # int8 / palettized are weight-only: no calibration data
    #: the coremltools frontend (``ct.convert(source=...)`` and the shims of shims.py): "pytorch" | "tensorflow"
    frontend: ClassVar[str]
    #: what a conversion failure calls the input ("the PyTorch model", "the TensorFlow graph")
    source_label: ClassVar[str]

    def capture(self, ctx: ConversionContext, ct: Any) -> CoreMLCapture:
        """Capture ``ctx.source`` in the form coremltools' frontend takes."""
        raise NotImplementedError

    def after_convert(self, ct: Any, mlmodel: Any, ctx: ConversionContext) -> Any:
        """Adjust the converted model before compression (default: unchanged)."""
        return mlmodel

    def failure_hint(self, exc: Exception) -> str:
        """How to fix a model ``ct.convert`` refused."""
        return "an op may be unsupported by Core ML"

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Capture, convert with coremltools, compress the weights if asked, save and check the package."""
        check_precision(self, precision)
        if precision is Precision.PALETTIZED:
            check_palette_bits(ctx.options.coreml_palette_bits)
        ct = import_coremltools()
        src = ctx.source
        target_name = ctx.options.coreml_minimum_deployment_target
        target = deployment_target(target_name)
        out_shapes = [list(o.shape) for o in src.predict([np.zeros(s, np.float32) for s in src.input_shapes])]
        cap = self.capture(ctx, ct)
        inputs = [ct.TensorType(name=n, shape=tuple(s), dtype=np.float32)
                  for n, s in zip(cap.input_names, src.input_shapes, strict=True)]
        outputs = [ct.TensorType(name=n, dtype=np.float32) for n in cap.output_names]
        log = io.StringIO()
        try:
            with redirect_stdout(log), redirect_stderr(log):
                mlmodel = ct.convert(cap.model, source=self.frontend, convert_to="mlprogram", inputs=inputs,
                                     outputs=outputs, compute_precision=compute_precision(precision),
                                     minimum_deployment_target=target)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError) as exc:
            tail = " | ".join(str(exc).strip().splitlines()[-2:])[:300]
            raise ConversionError(f"coremltools could not convert {self.source_label} ({type(exc).__name__}: "
                                  f"{tail}): {self.failure_hint(exc)}") from exc
        mlmodel = self.after_convert(ct, mlmodel, ctx)
        out = ctx.path_for(Format.COREML, precision, ".mlpackage")
        notes = [f"{cap.note}; minimum deployment target {target.name}"]
        notes += shim_notes(self.frontend)
        notes += compress_and_save(mlmodel, precision, out, palette_bits=ctx.options.coreml_palette_bits)
        checks = check_package(out, precision, input_names=cap.input_names, input_shapes=src.input_shapes,
                               output_shapes=out_shapes, output_names=src.output_names, target=target_name)
        draft = ArtifactDraft(
            format=Format.COREML, precision=precision, path=out,
            tool_versions={"coremltools": ct.__version__, **cap.tool_versions},
            runtime={"compute_units": "ALL", "minimum_deployment_target": target.name},
            notes=notes)
        return [finish_draft(draft, checks)]
