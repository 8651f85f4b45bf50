"""The Core ML convert steps every frontend shares (PyTorch, Keras / TensorFlow), in one base class.

A Core ML conversion is the same sequence whatever the framework: check the precision (and palette size), import
coremltools with its shims, resolve the deployment target, record the source's output shapes, capture the model
(the one step that differs), ``ct.convert`` it with float32 inputs and outputs, compress the weights, save the
``.mlpackage`` and check its spec. :class:`CoreMLConverter` runs that sequence; a frontend supplies
:meth:`CoreMLConverter.capture` (and, if it must, :meth:`CoreMLConverter.after_convert` and
:meth:`CoreMLConverter.failure_hint`), so a fix to one step reaches every frontend.

When the pipeline attached a model card (converters/model_card.py), the package is made for Vision too: an image
input described by the manifest's preprocessing becomes an ``ImageType`` (coreml_spec.image_input_for; other
inputs stay ``TensorType``), a classifier with labels gets a ``ClassifierConfig`` and author / licence / version /
description / preprocessing metadata are written. The classifier is added on the MIL program: a ``softmax`` of
the output (unless the model already outputs probabilities) feeds the ``classify`` op that gives Vision its
``VNClassificationObservation`` s, and the source's tensor output stays an output for the agent and validation.
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
    compress_program,
    compute_precision,
    deployment_target,
    describe_model,
    finish_draft,
    image_input_for,
    image_type,
    import_coremltools,
    shim_notes,
)
from edge_sdk.converters.model_card import CARD_OPTIONS, ModelCard, card_of
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
    extra_options = CARD_OPTIONS

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
        ref = src.predict([np.zeros(s, np.float32) for s in src.input_shapes])
        out_shapes = [list(o.shape) for o in ref]
        cap = self.capture(ctx, ct)
        card = card_of(ctx.options)
        pre = card.preprocessing if card is not None else None
        floats = list(getattr(src, "input_dtypes", None) or ["float32"]) == ["float32"]
        image = (image_input_for(pre, cap.input_names[0], src.input_shapes[0], src.layout)
                 if len(cap.input_names) == 1 and floats else None)
        inputs = [image_type(ct, image) if image is not None else
                  ct.TensorType(name=n, shape=tuple(s), dtype=np.float32)
                  for n, s in zip(cap.input_names, src.input_shapes, strict=True)]
        outputs = [ct.TensorType(name=n, dtype=np.float32) for n in cap.output_names]
        labels = _classifier_labels(card, out_shapes)
        kwargs = {"source": self.frontend, "inputs": inputs, "outputs": outputs,
                  "compute_precision": compute_precision(precision), "minimum_deployment_target": target}
        log = io.StringIO()
        compressed: list[str] = []
        try:
            with redirect_stdout(log), redirect_stderr(log):
                if labels is None and precision in (Precision.FP32, Precision.FP16):
                    mlmodel = ct.convert(cap.model, convert_to="mlprogram", **kwargs)
                else:  # the weights are compressed on the MIL program (before a classifier is added)
                    mlmodel, compressed = _convert_on_mil(ct, cap.model, kwargs, labels, _is_probabilities(ref[0]),
                                                          precision, ctx.options.coreml_palette_bits)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError) as exc:
            tail = " | ".join(str(exc).strip().splitlines()[-2:])[:300]
            raise ConversionError(f"coremltools could not convert {self.source_label} ({type(exc).__name__}: "
                                  f"{tail}): {self.failure_hint(exc)}") from exc
        mlmodel = self.after_convert(ct, mlmodel, ctx)
        out = ctx.path_for(Format.COREML, precision, ".mlpackage")
        notes = [f"{cap.note}; minimum deployment target {target.name}"]
        if card is not None:
            describe_model(mlmodel, card, image, self.frontend)
            notes += _card_notes(card, image, labels, _is_probabilities(ref[0]))
        notes += shim_notes(self.frontend)
        notes += compressed
        notes += compress_and_save(mlmodel, precision, out, palette_bits=ctx.options.coreml_palette_bits,
                                   compressed=True)
        checks = check_package(out, precision, input_names=cap.input_names, input_shapes=src.input_shapes,
                               output_shapes=out_shapes, output_names=src.output_names, target=target_name,
                               image=image, labels=labels)
        draft = ArtifactDraft(
            format=Format.COREML, precision=precision, path=out,
            tool_versions={"coremltools": ct.__version__, **cap.tool_versions},
            runtime={"compute_units": "ALL", "minimum_deployment_target": target.name},
            notes=notes)
        return [finish_draft(draft, checks)]


def _classifier_labels(card: ModelCard | None, out_shapes: list[list[int]]) -> list[str] | None:
    """The labels when the package should be a Core ML classifier: a classification card whose labels match the
    last dimension of the model's single (1, N) output; else None (the output stays a plain tensor)."""
    if card is None or not card.is_classifier or len(out_shapes) != 1:
        return None
    shape = out_shapes[0]
    labels = list(card.labels or ())
    return labels if len(shape) == 2 and shape[0] == 1 and shape[1] == len(labels) else None


def _is_probabilities(out: np.ndarray) -> bool:
    """Does the model already end in a softmax (scores in [0, 1] summing to 1)? As the agent decides it."""
    a = np.asarray(out, np.float64).reshape(-1)
    return bool(a.size) and bool(a.min() >= 0.0 and a.max() <= 1.0 and abs(a.sum() - 1.0) < 1e-3)


def _convert_on_mil(ct: Any, model: Any, kwargs: dict[str, Any], labels: list[str] | None, probabilities: bool,
                    precision: Precision, palette_bits: int) -> tuple[Any, list[str]]:
    """Convert to MIL, compress the weights there, and (with labels) add ``<output>_probabilities`` =
    softmax(output) (or the output itself) as an extra output, then finish the ML program, with ``ClassifierConfig``
    on it: ``classify`` replaces that extra output, so the source's tensor output survives next to ``classLabel``
    and ``classLabel_probs``. Returns the model and the compression notes.

    Why on MIL, with or without labels: coremltools 9 cannot re-export a classifier it re-loaded, and compressing a
    saved model (``coremltools.optimize.coreml``) re-loads it and re-runs the default passes, whose
    ``fuse_elementwise_to_batchnorm`` turns the ``ImageType``'s scale ``mul`` / bias ``add`` into a ``batch_norm``
    with epsilon 1e-5: Core ML's image math would drift from the manifest's and the spec check finds no scale."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    prog = ct.convert(model, convert_to="milinternal", **kwargs)
    main = prog.functions["main"]
    # ops added outside the frontend carry no frontend scope: drop the check, as coremltools' own compression does
    # when it re-loads a saved model (the scopes are debugging information only)
    main._essential_scope_sources = []
    notes = compress_program(prog, precision, palette_bits=palette_bits)
    finish = {"compute_precision": kwargs["compute_precision"],
              "minimum_deployment_target": kwargs["minimum_deployment_target"]}
    if labels is None:
        return ct.convert(prog, convert_to="mlprogram", **finish), notes
    logits = main.outputs[0]
    name = f"{logits.name}_probabilities"
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["edge_sdk_classifier"])), main:
        probs = (mb.identity(x=logits, name=name) if probabilities else mb.softmax(x=logits, axis=-1, name=name))
    main.set_outputs([logits, probs])
    main.output_types = None  # the classifier's outputs are typed by the exporter
    config = ct.ClassifierConfig(labels, predicted_probabilities_output=name)
    return ct.convert(prog, convert_to="mlprogram", classifier_config=config, **finish), notes


def _card_notes(card: ModelCard, image: Any, labels: list[str] | None, probabilities: bool) -> list[str]:
    """What the package carries for Vision, in the artifact's notes."""
    notes = []
    if image is not None:
        notes.append(f"ImageType input {image.name!r} ({image.color} {image.width}x{image.height}): Core ML computes "
                     f"pixel*{[round(s, 6) for s in image.scale]}+{[round(b, 6) for b in image.bias]} per channel, "
                     "the manifest's (pixel*scale-mean)/std exactly; the agent's tensor is fed back as that image")
    elif card.preprocessing is not None:
        notes.append("inputs kept as TensorType: the manifest's preprocessing does not describe a single image input")
    if labels is not None:
        notes.append(f"ClassifierConfig with {len(labels)} labels (classLabel, classLabel_probs = "
                     f"{'the output' if probabilities else 'softmax of the output'}) for Vision; the tensor output "
                     "is kept")
    return notes
