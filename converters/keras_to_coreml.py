"""Keras / TensorFlow -> Core ML ``.mlpackage`` (ML program) with coremltools.

coremltools 9 cannot read Keras 3 models directly; it converts TensorFlow 2 concrete functions. The
source's SavedModel (``KerasSource.saved_model_dir()``, exported once with a fixed-shape
``serving_default`` signature) is loaded with ``tf.saved_model.load`` and its serving signature is
passed as ``[signature]`` with ``source="tensorflow"``. TF names the outputs ``Identity``,
``Identity_1``...; they are renamed to the source's output names. Inputs keep the source's NHWC
layout and float32 dtype at the model boundary.

Precisions: fp32, fp16, int8 (int8 weights on an fp16 model), palettized (k-means palettes).
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
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
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["KerasToCoreML"]


def _serving_signature(saved_model: Any) -> Any:
    tf = require("tensorflow", "keras", "Keras to Core ML conversion")
    try:
        loaded = tf.saved_model.load(str(saved_model))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ConversionError(f"cannot load the SavedModel {saved_model} ({str(exc).splitlines()[0][:160]}): "
                              "re-export the model with model.export(path)") from None
    if "serving_default" not in loaded.signatures:
        raise ConversionError(f"SavedModel {saved_model} has no serving_default signature: export it with "
                              "model.export(path)")
    return loaded, loaded.signatures["serving_default"]


def _rename_outputs(ct: Any, mlmodel: Any, names: list[str]) -> Any:
    """Give the Core ML outputs the source's output names (TF calls them Identity, Identity_1, ...)."""
    spec = mlmodel.get_spec()
    current = [o.name for o in spec.description.output]
    if len(current) != len(names) or current == names:
        return mlmodel
    for i, old in enumerate(current):  # through temporary names, so swapped names cannot clash
        ct.utils.rename_feature(spec, old, f"__edge_sdk_output_{i}", rename_inputs=False)
    for i, new in enumerate(names):
        ct.utils.rename_feature(spec, f"__edge_sdk_output_{i}", new, rename_inputs=False)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


@register
class KerasToCoreML:
    """Keras model / TF SavedModel -> Core ML ML program (fp32, fp16, int8 weights, palettized weights)."""

    sources = (Framework.KERAS,)
    target = Format.COREML
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.PALETTIZED)
    calibrated_precisions = ()  # int8 / palettized are weight-only: no calibration data

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Convert the serving signature with coremltools, compress the weights if asked, save and check."""
        check_precision(self, precision)
        if precision is Precision.PALETTIZED:
            check_palette_bits(ctx.options.coreml_palette_bits)
        ct = import_coremltools()
        tf = require("tensorflow", "keras", "Keras to Core ML conversion")
        src = ctx.source
        target_name = ctx.options.coreml_minimum_deployment_target
        target = deployment_target(target_name)
        out_shapes = [list(o.shape) for o in src.predict([np.zeros(s, np.float32) for s in src.input_shapes])]
        _loaded, signature = _serving_signature(src.saved_model_dir())  # keep _loaded alive during conversion
        sig_inputs = sorted(signature.structured_input_signature[1])
        names = [n if n in sig_inputs else sig_inputs[i] for i, n in enumerate(src.input_names)]
        inputs = [ct.TensorType(name=n, shape=tuple(s), dtype=np.float32)
                  for n, s in zip(names, src.input_shapes, strict=True)]
        outputs = [ct.TensorType(name=t.name.split(":")[0], dtype=np.float32) for t in signature.outputs]
        log = io.StringIO()
        try:
            with redirect_stdout(log), redirect_stderr(log):
                mlmodel = ct.convert([signature], source="tensorflow", convert_to="mlprogram", inputs=inputs,
                                     outputs=outputs, compute_precision=compute_precision(precision),
                                     minimum_deployment_target=target)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError) as exc:
            tail = " | ".join(str(exc).strip().splitlines()[-2:])[:300]
            raise ConversionError(f"coremltools could not convert the TensorFlow graph ({type(exc).__name__}: "
                                  f"{tail}): an op may be unsupported by Core ML; simplify the model or convert "
                                  "through PyTorch") from exc
        mlmodel = _rename_outputs(ct, mlmodel, list(src.output_names))
        out = ctx.path_for(Format.COREML, precision, ".mlpackage")
        notes = [f"converted from the SavedModel serving_default signature; float32 NHWC inputs/outputs; "
                 f"minimum deployment target {target.name}"]
        notes += shim_notes("tensorflow")
        notes += compress_and_save(mlmodel, precision, out, palette_bits=ctx.options.coreml_palette_bits)
        checks = check_package(out, precision, input_names=names, input_shapes=src.input_shapes,
                               output_shapes=out_shapes, output_names=src.output_names, target=target_name)
        draft = ArtifactDraft(
            format=Format.COREML, precision=precision, path=out,
            tool_versions={"coremltools": ct.__version__, "tensorflow": tf.__version__},
            runtime={"compute_units": "ALL", "minimum_deployment_target": target.name},
            notes=notes)
        return [finish_draft(draft, checks)]
