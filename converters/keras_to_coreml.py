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

from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ConversionContext, register
from edge_sdk.converters.coreml_common import CoreMLCapture, CoreMLConverter
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Framework

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
    # tensors only: a classifier's classLabel / classLabel_probs keep their names
    current = [o.name for o in spec.description.output if o.type.WhichOneof("Type") == "multiArrayType"]
    if len(current) != len(names) or current == names:
        return mlmodel
    for i, old in enumerate(current):  # through temporary names, so swapped names cannot clash
        ct.utils.rename_feature(spec, old, f"__edge_sdk_output_{i}", rename_inputs=False)
    for i, new in enumerate(names):
        ct.utils.rename_feature(spec, f"__edge_sdk_output_{i}", new, rename_inputs=False)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


@register
class KerasToCoreML(CoreMLConverter):
    """Keras model / TF SavedModel -> Core ML ML program (fp32, fp16, int8 weights, palettized weights)."""

    sources = (Framework.KERAS,)
    frontend = "tensorflow"
    source_label = "the TensorFlow graph"

    def capture(self, ctx: ConversionContext, ct: Any) -> CoreMLCapture:
        """The SavedModel's serving signature, its inputs named as the source's where the signature allows."""
        tf = require("tensorflow", "keras", "Keras to Core ML conversion")
        src = ctx.source
        loaded, signature = _serving_signature(src.saved_model_dir())  # loaded must outlive the conversion
        sig_inputs = sorted(signature.structured_input_signature[1])
        names = [n if n in sig_inputs else sig_inputs[i] for i, n in enumerate(src.input_names)]
        return CoreMLCapture(
            model=[signature], input_names=names, output_names=[t.name.split(":")[0] for t in signature.outputs],
            note="converted from the SavedModel serving_default signature; float32 NHWC inputs/outputs",
            tool_versions={"tensorflow": tf.__version__}, keep_alive=loaded)

    def after_convert(self, ct: Any, mlmodel: Any, ctx: ConversionContext) -> Any:
        """TF names the outputs Identity, Identity_1, ...: give them the source's names."""
        return _rename_outputs(ct, mlmodel, list(ctx.source.output_names))

    def failure_hint(self, exc: Exception) -> str:
        """Core ML lacks an op TensorFlow used: the PyTorch frontend covers more."""
        return "an op may be unsupported by Core ML; simplify the model or convert through PyTorch"
