"""The plugin's converter (entry-point group ``edge_sdk.converters``): an OpenVINO IR source -> an echo model.

It fills a (source, target) pair no built-in converter takes (openvino -> onnx), so registering it clashes with
nothing; the echo model it writes (JSON, see the package docstring) copies the source's input/output specs.
"""

from __future__ import annotations

import json

from edge_sdk.converters.base import ArtifactDraft, ConversionContext, OptionSpec, check_precision
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["IrToEcho"]


class IrToEcho:
    """OpenVINO IR -> echo model (gain from ``ConvertOptions.extra['echo_gain']``)."""

    sources = (Framework.OPENVINO,)
    target = Format.ONNX
    precisions = (Precision.FP32,)
    calibrated_precisions = ()
    extra_options = (OptionSpec("echo_gain", float, 1.0, (), "the factor the echo model applies"),)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Write the echo model."""
        check_precision(self, precision)
        src = ctx.source
        out = ctx.path_for(Format.ONNX, precision, ".onnx")
        model = {"inputs": [{"name": n, "shape": s} for n, s in zip(src.input_names, src.input_shapes, strict=True)],
                 "outputs": [{"name": n, "shape": [1, 1]} for n in src.output_names],
                 "gain": float(ctx.options.extra.get("echo_gain", 1.0))}
        out.write_text(json.dumps(model))
        return [ArtifactDraft(Format.ONNX, precision, out, runtime={"runtime": "echo"})]
