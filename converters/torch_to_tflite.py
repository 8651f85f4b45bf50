"""PyTorch -> TFLite (LiteRT) with ``litert-torch`` (formerly ai-edge-torch).

Precisions: ``fp32``; ``fp16`` and ``dynamic`` through litert-torch's ai-edge-quantizer recipes (float16
weights / int8 weights with run-time activation quantization, float32 I/O); ``int8`` through PT2E static
quantization (symmetric per-channel weights, calibrated on the calibration samples). The PT2E int8 model has
**int8 inputs and outputs** (measured with litert-torch 0.10); ``ConvertOptions.tflite_int8_io=False`` cannot
change that here and is noted on the artifact.

Inputs stay in the PyTorch layout (NCHW for images); LiteRT runs them through transposes internally.
TorchScript modules cannot be converted (litert-torch needs ``torch.export``): pass the eager ``nn.Module``.
"""

from __future__ import annotations

import os
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.keras_to_tflite import check_builtin_ops, tflite_draft, tflite_summary, version_of
from edge_sdk.errors import ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["TorchToTFLite"]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _pt2e_int8(torch: Any, model: Any, example: tuple[Any, ...], samples: Any) -> tuple[Any, Any]:
    """PT2E static int8: export, insert observers, calibrate, convert. Returns (module, QuantConfig)."""
    pt2e = require("litert_torch.quantize.pt2e_quantizer", "tflite", "int8 quantization of PyTorch models")
    qcfg = require("litert_torch.quantize.quant_config", "tflite", "int8 quantization of PyTorch models")
    quantize_pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "tflite", "PT2E quantization")
    quantizer = pt2e.PT2EQuantizer().set_global(pt2e.get_symmetric_quantization_config(is_per_channel=True))
    exported = torch.export.export(model, example).module()
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for sample in samples:
            prepared(*[torch.from_numpy(x) for x in sample])
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    return converted, qcfg.QuantConfig(pt2e_quantizer=quantizer)


@register
class TorchToTFLite:
    """PyTorch nn.Module -> .tflite through litert-torch."""

    sources = (Framework.PYTORCH,)
    target = Format.TFLITE
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Convert the eager PyTorch model to one .tflite file of ``precision``."""
        check_precision(self, precision)
        src = ctx.source
        samples = None
        if precision is Precision.INT8:
            samples = ctx.require_calibration("TFLite int8 (PT2E) quantization of a PyTorch model")
            samples.check(src.input_shapes, "calibration")
        torch = require("torch", "torch", "converting PyTorch models")
        if isinstance(src.model, torch.jit.ScriptModule):
            raise UnsupportedConversionError(
                "litert-torch cannot convert a TorchScript module (it needs torch.export): pass the eager "
                "nn.Module (or a torch.export .pt2 file) for tflite, or convert through --format onnx")
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its rich progress bars flood the CLI output
        litert_torch = require("litert_torch", "tflite", "converting PyTorch models to TFLite")
        example = src.example_inputs()
        notes: list[str] = []
        model = src.model
        quant_config = None
        try:
            if precision is Precision.FP16:
                recipes = require("litert_torch.generative.quantize.quant_recipes", "tflite", "fp16 TFLite")
                quant_config = recipes.full_fp16_recipe()
                notes.append("float16 weights (ai-edge-quantizer recipe), float32 compute and I/O")
            elif precision is Precision.DYNAMIC:
                recipes = require("litert_torch.generative.quantize.quant_recipes", "tflite", "dynamic TFLite")
                quant_config = recipes.full_dynamic_recipe()
                notes.append("dynamic range: int8 per-channel weights, activations quantized at run time, "
                             "float32 I/O")
            elif precision is Precision.INT8:
                model, quant_config = _pt2e_int8(torch, model, example, samples)
                notes.append(f"PT2E static int8 (symmetric, per-channel weights), calibrated on {len(samples)} "
                             "samples; the model takes and returns int8 tensors")
                if not ctx.options.tflite_int8_io:
                    notes.append("tflite_int8_io=False is not available with litert-torch: I/O stays int8 "
                                 "(the LiteRT session quantizes float inputs for you)")
            edge_model = litert_torch.convert(model, example, quant_config=quant_config)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            raise ConversionError(f"litert-torch could not convert the model to {precision.value} tflite "
                                  f"({type(exc).__name__}: {_first_line(exc)}): check the model passes "
                                  "torch.export.export(model, example_inputs), or use --format onnx") from None
        out = ctx.path_for(Format.TFLITE, precision, ".tflite")
        edge_model.export(str(out))
        summary = tflite_summary(out)
        check_builtin_ops(summary, "litert-torch")
        notes.append(f"inputs stay {src.layout or 'in the PyTorch layout'} as in the PyTorch model")
        versions = {"torch": torch.__version__, "litert-torch": version_of("litert-torch"),
                    "ai-edge-litert": version_of("ai-edge-litert")}
        extra = {"input_layout": src.layout} if src.layout else {}
        return [tflite_draft(out, precision, summary, src.input_names, notes, versions, extra_runtime=extra)]
