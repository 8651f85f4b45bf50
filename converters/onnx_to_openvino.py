"""ONNX -> OpenVINO IR (``.xml`` + ``.bin``) in fp32, fp16 or NNCF int8, for every source framework.

The source is first exported to fp32 ONNX (``ctx.onnx``), then ``openvino.convert_model`` reads it.

* fp32: ``save_model(..., compress_to_fp16=False)`` (save_model compresses to fp16 by default).
* fp16: weights stored as fp16 (decompressed to f32 or run in bf16/f16 at load, per the device).
* int8: ``nncf.quantize`` post-training quantization on the calibration samples, every sample used
  (``subset_size`` = sample count). Defaults measured on a small CNN trained on digits
  (see tests/test_openvino.py): preset MIXED (symmetric weights, asymmetric activations) and full
  bias correction (``fast_bias_correction=False``) -- fast bias correction gave cosine 0.989 / top-1
  agreement 0.92, full bias correction 0.9999 / 0.99, for ~1 s more. Override with
  ``ConvertOptions.extra``: ``openvino_preset`` ("mixed" | "performance") and
  ``openvino_fast_bias_correction`` (bool); the accuracy-budget fallback also sets ``openvino_ignored_names``
(node names kept in float, NNCF ``IgnoredScope``) and ``openvino_range_estimator``
("minmax" | "mean_minmax" | "mean_quantile": how activation ranges are estimated).

The artifact ``path`` is the ``.xml``; the ``.bin`` beside it is listed in ``ArtifactDraft.files``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from functools import partial
from typing import Any

import numpy as np

from edge_sdk._deps import installed_version, require
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    LadderStep,
    OptionSpec,
    check_precision,
    register,
)
from edge_sdk.converters.onnx_ml_lowering import check_lowered
from edge_sdk.converters.weight_rounding import symmetric_int8
from edge_sdk.errors import ConversionError, first_line
from edge_sdk.formats import Format, Framework, Precision
from edge_sdk.runtimes.openvino import OV_TRACE_LINES

__all__ = ["RUNTIME_HINTS", "OnnxToOpenVINO", "ov_error_summary"]

#: Runtime hints written into every OpenVINO artifact; the keys are keyword arguments of
#: ``OpenVINORuntime.load``. "f32" keeps results faithful to the source (validation needs it: AMX /
#: AVX512-BF16 CPUs otherwise run float models in bf16).
RUNTIME_HINTS: dict[str, Any] = {"device": "CPU", "precision_hint": "f32", "performance_hint": "LATENCY"}

_PRESETS = ("mixed", "performance")
_WEIGHT_CONSUMERS = ("Convolution", "GroupConvolution", "MatMul")
_RANGES = {"minmax": "MINMAX", "mean_minmax": "MEAN_MINMAX", "mean_quantile": "MEAN_QUANTILE"}


def _tool_version(dist: str) -> str:
    return installed_version(dist) or "unknown"


_one_line = partial(first_line, limit=400, skip=OV_TRACE_LINES)


def ov_error_summary(exc: BaseException) -> str:
    """An OpenVINO frontend error in one line: its own summary ("No conversion rule found for operations: ...")
    when it gives one — the full message is a trace of every op it visited — else its useful lines."""
    text = str(exc)
    for marker in ("Summary:", "No conversion rule found for operations:"):
        if marker in text:
            return _one_line(Exception(marker + text.split(marker, 1)[1]))[:300]
    return _one_line(exc).split("; ")[0][:300]


def float_weights_as_fp16(model: Any, min_elements: int = 1024) -> int:
    """Store the float weights of an int8 model (layers NNCF left unquantized: the ``mixed:kN`` rungs' layers) as
    fp16 with a decompression Convert, as OpenVINO's own fp16 IR does; the CPU still computes them in f32. Returns
    how many weights were converted. MobileNetV2 ``mixed:k2``: 307,200 weights, the IR 0.35x -> 0.31x of fp32,
    top-1 agreement 95.8% -> 95.4% (240 crops)."""
    ov = require("openvino", "openvino-convert", "OpenVINO int8 weight storage")
    ops = require("openvino.opset13", "openvino-convert", "OpenVINO int8 weight storage")
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32:
            continue
        size = int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
        targets = list(op.output(0).get_target_inputs())
        if size < min_elements or not targets or not all(_is_weight_input(t.get_node()) for t in targets):
            continue
        data = op.get_data()
        if not np.isfinite(data).all() or np.abs(data).max(initial=0.0) > 65504:  # beyond fp16: keep f32
            continue
        decompress = ops.convert(ops.constant(data.astype(np.float16)), "f32")
        decompress.get_rt_info()["decompression"] = ""
        for t in targets:
            t.replace_source_output(decompress.output(0))
        done += size
    return done


#: weight inputs (W, R) of OpenVINO's recurrent sequence ops, by op type
_RECURRENT_WEIGHTS = {"LSTMSequence": (4, 5), "GRUSequence": (3, 4), "RNNSequence": (3, 4)}


def recurrent_weights_int8(model: Any) -> int:
    """Store the f32 W and R of every LSTM / GRU / RNN sequence op as int8 with one scale per gate row, behind a
    decompression Convert + Multiply (what NNCF's weight compression writes for MatMuls). NNCF's int8 leaves these
    ops alone, so their weights were the bulk of a recurrent net's "int8" IR (ddddocr's BiLSTM: 31 % of its
    parameters). The CPU computes the sequence op in f32 as before; only the stored bytes change. Returns how many
    weights were converted."""
    ov = require("openvino", "openvino-convert", "OpenVINO int8 weight storage")
    ops = require("openvino.opset13", "openvino-convert", "OpenVINO int8 weight storage")
    done = 0
    for op in model.get_ordered_ops():
        for k in _RECURRENT_WEIGHTS.get(op.get_type_name(), ()):
            src = op.input(k).get_source_output().get_node()
            if src.get_type_name() != "Constant" or src.get_element_type() != ov.Type.f32:
                continue
            w = src.get_data().astype(np.float32)
            if w.ndim != 3 or not np.isfinite(w).all():
                continue
            q, scale = symmetric_int8(w, 2)
            convert = ops.convert(ops.constant(q), "f32")
            decompress = ops.multiply(convert, ops.constant(scale))
            for node in (convert, decompress):
                node.get_rt_info()["decompression"] = ""
            op.input(k).replace_source_output(decompress.output(0))
            done += int(w.size)
    return done


def _is_weight_input(node: Any) -> bool:
    """Whether a constant feeding ``node`` is a layer's weights (directly, or through the Reshape of a grouped
    convolution's weights)."""
    if node.get_type_name() in _WEIGHT_CONSUMERS:
        return True
    return node.get_type_name() == "Reshape" and all(
        t.get_node().get_type_name() == "GroupConvolution" for t in node.output(0).get_target_inputs())


def _to_layout(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Transpose a 4-D NCHW/NHWC batch between layouts (other ranks are returned unchanged)."""
    if arr.ndim != 4 or not src or not dst or src == dst:
        return arr
    if (src, dst) == ("NHWC", "NCHW"):
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    if (src, dst) == ("NCHW", "NHWC"):
        return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
    raise ConversionError(f"cannot move calibration samples from layout {src} to {dst}: give samples in {dst}")


def _ov_names(model: Any, wanted: list[str]) -> list[str]:
    """OpenVINO op names for ONNX node (or output tensor) names: the ONNX frontend names an op after its node,
    splits Conv/Gemm into ``<node>/WithoutBiases`` + ``<node>`` (Add), and names graph-output ops after the tensor."""
    want = set(wanted)
    found = []
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if (name in want or (name.endswith("/WithoutBiases") and name[: -len("/WithoutBiases")] in want)
                or any(t in want for out in op.outputs() for t in out.get_names())):
            found.append(name)
    return found


@register
class OnnxToOpenVINO:
    """Converts any source (through its fp32 ONNX export) to OpenVINO IR."""

    sources = (Framework.PYTORCH, Framework.KERAS, Framework.ONNX)
    target = Format.OPENVINO
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    #: accuracy-budget rungs for NNCF int8 (converters/accuracy_budget.py)
    budget_ladder = (
        LadderStep("calibration:mean-quantile", (("openvino_range_estimator", "mean_quantile"),)),
        LadderStep("mixed", mixed="openvino"),
        LadderStep("int16-activations", not_offered="NNCF/OpenVINO CPU quantize activations to 8 bits only"),
        LadderStep("qat", qat=True),
        LadderStep("fp16", precision=Precision.FP16),
    )
    extra_options = (
        OptionSpec("openvino_preset", str, "mixed", _PRESETS, "NNCF quantization preset"),
        OptionSpec("openvino_fast_bias_correction", bool, False, (), "faster, less exact bias correction"),
        OptionSpec("openvino_ignored_names", (list, tuple), (), (), "node names kept in float (NNCF IgnoredScope)"),
        OptionSpec("openvino_range_estimator", str, None, tuple(_RANGES), "activation-range estimator"),
        OptionSpec("openvino_float_weights", str, "fp16", ("fp16", "fp32"),
                   "int8 models: how the weights of layers kept in float are stored (computed in f32 either way)"),
        OptionSpec("openvino_recurrent_int8", bool, True, (),
                   "int8 models: store LSTM / GRU / RNN weights as int8 (NNCF leaves them f32; computed in f32)"),
    )

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Write ``<workdir>/openvino/<precision>.xml`` (+ ``.bin``) and describe it."""
        check_precision(self, precision)
        ov = require("openvino", "openvino-convert", "OpenVINO conversion")
        if precision is Precision.INT8:  # fail before the (slow) ONNX export when data is missing
            ctx.require_calibration("OpenVINO int8 (NNCF) quantization")
        model, input_layout, notes = self.read_model(ctx, ov)
        tool_versions = {"openvino": _tool_version("openvino")}
        if precision is Precision.INT8:
            model, quant_notes = self._quantize(ctx, model, input_layout)
            tool_versions["nncf"] = _tool_version("nncf")
            notes += quant_notes
        elif precision is Precision.FP16:
            notes.append("weights stored as fp16 (compress_to_fp16=True); computed in f32 under the f32 hint")
        xml = ctx.path_for(Format.OPENVINO, precision, ".xml")
        try:
            ov.save_model(model, str(xml), compress_to_fp16=precision is Precision.FP16)
        except RuntimeError as exc:
            raise ConversionError(f"OpenVINO could not save {xml} ({_one_line(exc)}): check free disk space "
                                  "and write permission on the work directory") from exc
        bin_path = xml.with_suffix(".bin")
        if not bin_path.is_file():
            raise ConversionError(f"OpenVINO wrote {xml} without its weights file {bin_path.name}: "
                                  "re-run the conversion; the work directory may be full")
        notes.append("runs bf16 by default on AMX/AVX512-BF16 CPUs; the f32 hint keeps results faithful, "
                     "drop it (precision_hint=None) for speed once validated that way")
        return [ArtifactDraft(format=Format.OPENVINO, precision=precision, path=xml,
                              tool_versions=tool_versions, runtime=dict(RUNTIME_HINTS), notes=notes,
                              input_layout=input_layout, files=[bin_path])]

    def read_model(self, ctx: ConversionContext, ov: Any) -> tuple[Any, str | None, list[str]]:
        """The source as an ``openvino.Model`` (here: from its fp32 ONNX export), its input layout, and notes."""
        check_lowered(ctx.source)  # an ai.onnx.ml op that could not be lowered: its reason, not OpenVINO's
        onnx_draft = ctx.onnx(Precision.FP32)
        try:
            model = ov.convert_model(str(onnx_draft.path))
        except Exception as exc:  # the frontends raise OpConversionFailure etc., not RuntimeError subclasses
            raise ConversionError(f"OpenVINO could not read the ONNX export {onnx_draft.path.name} "
                                  f"({ov_error_summary(exc)}): check that the model's operators are supported by "
                                  "OpenVINO's ONNX frontend") from None
        return model, onnx_draft.input_layout, []

    def _quantize(self, ctx: ConversionContext, model: Any, onnx_layout: str | None) -> tuple[Any, list[str]]:
        """NNCF post-training quantization of an OpenVINO model on the calibration samples."""
        samples: SampleSet = ctx.require_calibration("OpenVINO int8 (NNCF) quantization")
        samples.check(ctx.source.input_shapes, "calibration")
        nncf = require("nncf", "openvino-convert", "OpenVINO int8 quantization")
        extra = ctx.options.extra
        preset_name = str(extra.get("openvino_preset", "mixed")).lower()
        if preset_name not in _PRESETS:
            raise ConversionError(f"unknown openvino_preset {preset_name!r}: choose from {', '.join(_PRESETS)}")
        fast_bc = bool(extra.get("openvino_fast_bias_correction", False))
        ignored = [str(n) for n in extra.get("openvino_ignored_names", ())]
        kwargs: dict[str, Any] = {}
        if ignored:
            ignored = _ov_names(model, ignored)
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
        range_name = extra.get("openvino_range_estimator")
        if range_name is not None:
            if range_name not in _RANGES:
                raise ConversionError(f"unknown openvino_range_estimator {range_name!r}: choose from "
                                      f"{', '.join(_RANGES)}")
            adv = require("nncf.quantization.advanced_parameters", "openvino-convert", "OpenVINO int8 quantization")
            est = require("nncf.quantization.range_estimator", "openvino-convert", "OpenVINO int8 quantization")
            kwargs["advanced_parameters"] = adv.AdvancedQuantizationParameters(
                activations_range_estimator_params=getattr(est.RangeEstimatorParametersSet, _RANGES[range_name]))
        arrays = [_to_layout(a, ctx.source.layout, onnx_layout or ctx.source.layout) for a in samples.arrays]
        b = samples.batch  # > 1 only for fixed-batch models (logreg_iris takes [3, 2])
        items = [[a[i * b:(i + 1) * b] for a in arrays] for i in range(len(samples))]
        nncf.set_log_level(logging.ERROR)
        failures = (RuntimeError, ValueError, nncf.ValidationError, nncf.InternalError, nncf.UnsupportedModelError)

        def run(fast: bool = fast_bc, **extra: Any) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars; the pipeline reports itself
                return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=fast,
                                     preset=getattr(nncf.QuantizationPreset, preset_name.upper()), **kwargs, **extra)

        bc = "fast bias correction" if fast_bc else "full bias correction"
        try:
            quantized = run()
        except failures as exc:
            if "BiasCorrection" not in str(exc) or "advanced_parameters" in kwargs:
                raise ConversionError(f"NNCF int8 quantization failed ({_one_line(exc)}): check the calibration "
                                      "samples fit the model, or use fp16") from exc
            # bias correction cannot run through If/Loop operations (recurrent models): quantize without it
            adv = require("nncf.quantization.advanced_parameters", "openvino-convert", "OpenVINO int8 quantization")
            try:
                quantized = run(True, advanced_parameters=adv.AdvancedQuantizationParameters(
                    disable_bias_correction=True))
            except failures as exc2:
                raise ConversionError(f"NNCF int8 quantization failed ({_one_line(exc2)}): use fp16") from exc2
            bc = f"no bias correction ({first_line(exc, 120)})"
        notes = [f"NNCF post-training int8, preset {preset_name}, {bc}, {len(items)} calibration samples"
                 + (f", {range_name} activation ranges" if range_name else "")]
        if ignored:
            notes.append(f"kept in float (NNCF ignored scope): {', '.join(ignored)}")
        if extra.get("openvino_float_weights", "fp16") == "fp16":
            stored = float_weights_as_fp16(quantized)
            if stored:
                notes.append(f"{stored} weights of layers kept in float stored as fp16 (computed in f32)")
        if extra.get("openvino_recurrent_int8", True):
            stored = recurrent_weights_int8(quantized)
            if stored:
                notes.append(f"{stored} LSTM / GRU / RNN weights stored as int8 with per-row scales (computed in f32)")
        return quantized, notes
