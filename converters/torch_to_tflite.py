"""PyTorch -> TFLite (LiteRT) with ``litert-torch`` (formerly ai-edge-torch).

Precisions: ``fp32``; ``fp16`` and ``dynamic`` through litert-torch's ai-edge-quantizer recipes (float16
weights / int8 weights with run-time activation quantization, float32 I/O); ``int8`` by default as LiteRT's
two-step path: the fp32 ``.tflite``, then the AI Edge Quantizer's static int8 recipe (converters/tflite_quantize.py),
which gives a **fully integer** graph (real MobileNetV2: all 70 ops map to the Edge TPU; PT2E left the residual
ADDs in float, 75 of 92 ops on the CPU), int8 or float I/O per ``ConvertOptions.tflite_int8_io``.

When the quantizer fails or would leave ops in float, the older PT2E static quantization runs instead (its reason
is the artifact's first note); ``--option tflite_quantizer=native`` asks for PT2E directly: symmetric per-channel
weights, histogram-calibrated activations, BatchNorm folded into the convs, conv + ReLU6 fused, MinMax-calibrated
outputs so the top scores never saturate; **int8 inputs and outputs** whatever ``tflite_int8_io`` says (noted).

Inputs stay in the PyTorch layout (NCHW for images); LiteRT runs them through transposes internally.
TorchScript modules cannot be converted (litert-torch needs ``torch.export``): pass the eager ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.keras_to_tflite import (
    TFLiteConverter,
    check_builtin_ops,
    tflite_draft,
    tflite_summary,
    version_of,
)
from edge_sdk.errors import ConversionError, UnsupportedConversionError, first_line
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["TorchToTFLite"]


def _annotate_conv_clamp(torch: Any, utils: Any, gm: Any, config: Any) -> None:
    """Annotate conv -> ReLU6/ReLU_N1_TO_1 (hardtanh/clamp) as one fused partition.

    litert-torch only fuses conv + relu; a ReLU6 otherwise shares the conv's output observer, so the clamped
    [0, 6] activation is quantized with the range of the *unclamped* conv output (often 5-10x wider), which
    costs most of MobileNet's int8 accuracy and leaves the clamp as a separate op. Observing the clamp output
    instead gives the range TFLite uses when it fuses the activation into the conv.
    """
    convs = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
    clamps = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default, torch.ops.aten.clamp.default,
              torch.ops.aten.clamp_.default}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in clamps:
            continue
        default = (-1.0, 1.0) if "hardtanh" in str(node.target) else (None, None)
        bounds = (*node.args[1:3], *default[len(node.args) - 1:])
        if any(not isinstance(b, (int, float)) for b in bounds) or tuple(map(float, bounds)) not in _FUSABLE:
            continue  # TFLite fuses only RELU6 / RELU_N1_TO_1 into a conv
        conv = node.args[0]
        if not isinstance(conv, torch.fx.Node) or conv.target not in convs or len(conv.users) != 1:
            continue
        qmap = {conv.args[0]: utils.get_input_act_qspec(config), conv.args[1]: utils.get_weight_qspec(config)}
        partition = [node, conv, conv.args[1]]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            qmap[bias] = utils.get_bias_qspec(config)
            partition.append(bias)
        if utils._is_annotated(partition):
            continue
        conv.meta["quantization_annotation"] = utils.QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
        node.meta["quantization_annotation"] = utils.QuantizationAnnotation(
            output_qspec=utils.get_output_act_qspec(config), _annotated=True)
        utils._mark_nodes_as_annotated(partition)


_FUSABLE = {(0.0, 6.0), (-1.0, 1.0)}


def _minmax_model_outputs(gm: Any, config: Any, observers: Any) -> None:
    """Observe the model's outputs with MinMax: a clipping observer saturates the top scores into ties."""
    spec = dataclasses.replace(config.output_activation,
                               observer_or_fake_quant_ctr=observers.MinMaxObserver.with_args(eps=2**-12))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        ann = node.meta.get("quantization_annotation")
        if ann is not None and isinstance(ann.output_qspec, type(spec)):
            ann.output_qspec = spec


def _int8_quantizer(torch: Any) -> Any:
    """litert-torch's PT2EQuantizer (symmetric per-channel weights, histogram-observed activations) with
    conv + ReLU6 fusion and MinMax-observed outputs."""
    pt2e = require("litert_torch.quantize.pt2e_quantizer", "tflite", "int8 quantization of PyTorch models")
    utils = require("litert_torch.quantize.pt2e_quantizer_utils", "tflite", "int8 quantization")
    observers = require("torchao.quantization.pt2e.observer", "tflite", "int8 quantization of PyTorch models")

    class _Quantizer(pt2e.PT2EQuantizer):
        def annotate(self, model: Any) -> Any:
            _annotate_conv_clamp(torch, utils, model, self.global_config)
            model = super().annotate(model)
            _minmax_model_outputs(model, self.global_config, observers)
            return model

    return _Quantizer().set_global(pt2e.get_symmetric_quantization_config(is_per_channel=True))


def _pt2e_int8(torch: Any, model: Any, example: tuple[Any, ...], samples: Any) -> tuple[Any, Any]:
    """PT2E static int8: export, insert observers (BatchNorm is folded into the convs by prepare_pt2e),
    calibrate, convert. Returns (module, QuantConfig)."""
    qcfg = require("litert_torch.quantize.quant_config", "tflite", "int8 quantization of PyTorch models")
    quantize_pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "tflite", "PT2E quantization")
    quantizer = _int8_quantizer(torch)
    exported = torch.export.export(model, example).module()
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 calibration: 1 thread is faster on a busy CPU and reproducible
    try:
        with torch.no_grad():
            for sample in samples:
                prepared(*[torch.from_numpy(x) for x in sample])
    finally:
        torch.set_num_threads(threads)
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    # the graph was captured in eval mode; exported modules refuse .eval(), so clear the flag litert-torch
    # checks (it would otherwise warn that the model "is converted in training mode")
    for module in converted.modules():
        module.training = False
    return converted, qcfg.QuantConfig(pt2e_quantizer=quantizer)


@register
class TorchToTFLite(TFLiteConverter):
    """PyTorch nn.Module -> .tflite through litert-torch."""

    sources = (Framework.PYTORCH,)
    default_quantizer = "aeq"  # PT2E leaves residual ADDs in float (75 of 92 MobileNetV2 ops off the Edge TPU)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Convert the eager PyTorch model to one .tflite file of ``precision``."""
        check_precision(self, precision)
        src = ctx.source
        samples = None
        fallback = ""
        if precision is Precision.INT8:
            draft, fallback = self.int8_with_aeq(ctx)
            if draft is not None:
                return [draft]
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
        notes: list[str] = [f"{fallback}: used PT2E int8 instead"] if fallback else []
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
                                  f"({type(exc).__name__}: {first_line(exc)}): check the model passes "
                                  "torch.export.export(model, example_inputs), or use --format onnx") from None
        out = ctx.path_for(Format.TFLITE, precision, ".tflite")
        edge_model.export(str(out))
        if precision is Precision.INT8 and ctx.options.extra.get("tflite_hybrid_fc", True):
            from edge_sdk.converters.tflite_weight_only import hybrid_fully_connected

            data, n = hybrid_fully_connected(out.read_bytes())
            if n:
                out.write_bytes(data)
                notes.append(f"{n} weights of fully connected ops PT2E left float (an LSTM's gates) stored int8: "
                             "LiteRT runs them as hybrid ops (input quantized per call)")
        versions = {"torch": torch.__version__, "litert-torch": version_of("litert-torch"),
                    "ai-edge-litert": version_of("ai-edge-litert")}
        if precision is Precision.INT8:
            self.delegable_int8(ctx, out, notes, versions)
        summary = tflite_summary(out)
        check_builtin_ops(summary, "litert-torch")
        if precision is Precision.INT8 and "DEQUANTIZE" in summary["ops"]:
            notes.append("not integer-only: some ops (litert-torch leaves chained residual ADDs unannotated) run "
                         "in float between DEQUANTIZE/QUANTIZE; int8 I/O and weights are unaffected")
        notes.append(f"inputs stay {src.layout or 'in the PyTorch layout'} as in the PyTorch model")
        extra = {"input_layout": src.layout} if src.layout else {}
        return [tflite_draft(out, precision, summary, src.input_names, notes, versions, extra_runtime=extra)]
