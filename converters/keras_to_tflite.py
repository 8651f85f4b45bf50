"""Keras / TensorFlow SavedModel -> TFLite (LiteRT) with ``tf.lite.TFLiteConverter``.

Precisions: ``fp32``; ``fp16`` (float16 weights, float32 compute on CPU); ``dynamic`` (int8 weights,
activations quantized at run time); ``int8`` (full integer, calibrated on representative samples, int8
inputs/outputs unless ``ConvertOptions.tflite_int8_io`` is False).

``TFLiteConverter`` (the base of every X -> TFLite converter) also offers the AI Edge Quantizer path
(converters/tflite_quantize.py: fp32 ``.tflite`` -> full integer): ``extra["tflite_quantizer"] = "aeq"`` (the
PyTorch default; Keras and ONNX keep their own full-integer paths unless asked, measured equal on Fashion-MNIST),
``extra["tflite_activation_bits"] = 16`` for int16 activations / int8 weights (the accuracy budget's
``int16-activations`` rung), ``extra["tflite_ranges"] = "minmax-mean"`` with ``extra["tflite_bias_correction"]``
(the ``calibration:minmax-mean`` rung) and ``extra["tflite_float_layers"]`` (``["i/N", ...]``: weighted layers by
graph position, kept in float with the ops feeding them — the ``mixed:kN`` rungs). The ``mixed:stem`` rung sets
``tflite_float_stem`` (the stem in float, float inputs), ``tflite_float_head`` (the output layer computes in float
from int8 weights, float outputs), ``tflite_weight_rounding = "gptq"`` (GPTQ integers from the ONNX export,
converters/tflite_weight_rounding.py) and ``tflite_full_bias_correction`` (converters/tflite_bias_correction.py);
the ``mixed:kN`` rungs add ``tflite_float_layer_weights = "int8"`` on top of it.

Only LiteRT builtin ops are allowed: a model needing Flex (select TensorFlow) ops cannot run on the plain
LiteRT runtime, so it is rejected with the op names. The helpers :func:`tflite_summary` and
:func:`check_builtin_ops` are shared by the other ``*_to_tflite`` converters.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import installed_version, require
from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    LadderStep,
    OptionSpec,
    check_precision,
    register,
)
from edge_sdk.converters.onnx_common import run_tool
from edge_sdk.errors import ConversionError, MissingDependencyError, UnsupportedConversionError, first_line
from edge_sdk.formats import Format, Framework, Precision

__all__ = [
    "KerasToTFLite",
    "TFLiteConverter",
    "check_builtin_ops",
    "input_order",
    "tflite_draft",
    "tflite_summary",
    "version_of",
]

_BUILTIN_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_TF_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def version_of(*dists: str) -> str:
    """The installed version of the first distribution found among ``dists`` ("unknown" if none)."""
    return installed_version(*dists) or "unknown"


def tflite_summary(path: Path) -> dict[str, Any]:
    """Op names and I/O tensors (name, dtype, shape, scale, zero_point) of a .tflite file, without running it."""
    mod = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    try:
        interp = mod.Interpreter(model_path=str(path))
    except ValueError as exc:
        raise ConversionError(f"the converter wrote an unreadable .tflite file {path.name} ({exc}): "
                              "report this with the source model") from None

    def io(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for d in details:
            scale, zp = d["quantization"]
            out.append({"name": d["name"], "dtype": d["dtype"].__name__, "shape": [int(v) for v in d["shape"]],
                        "scale": float(scale) if scale else None, "zero_point": int(zp) if scale else None})
        return out

    ops = sorted({o["op_name"] for o in interp._get_ops_details()})  # public API has no op listing
    return {"ops": ops, "inputs": io(interp.get_input_details()), "outputs": io(interp.get_output_details())}


def check_builtin_ops(summary: dict[str, Any], tool: str) -> None:
    """Raise UnsupportedConversionError when the model needs Flex (select TF) or custom ops."""
    flex = [o for o in summary["ops"] if o.startswith("Flex")]
    custom = [o for o in summary["ops"] if not o.startswith("Flex") and not _BUILTIN_NAME.match(o)]
    if flex or custom:
        what = _describe_ops(flex, custom)
        raise UnsupportedConversionError(
            f"{tool} produced a TFLite model that needs {what}, which the plain LiteRT runtime cannot run: "
            "replace those operations in the model or choose another target (onnx, openvino)")


def input_order(tflite_names: list[str], source_names: list[str]) -> list[int] | None:
    """For each TFLite input, the index of the source input it corresponds to (None if unclear or identity)."""
    if len(tflite_names) < 2 or len(tflite_names) != len(source_names):
        return None
    order = []
    for tn in tflite_names:
        hits = [k for k, sn in enumerate(source_names) if re.search(rf"(^|_){re.escape(sn)}(:\d+)?$", tn)]
        if len(hits) != 1:
            return None
        order.append(hits[0])
    if sorted(order) != list(range(len(source_names))) or order == list(range(len(source_names))):
        return None
    return order


def _converter_errors() -> tuple[type[BaseException], ...]:
    try:
        from tensorflow.lite.python.convert_phase import ConverterError
    except ImportError:  # private module moved: fall back to what the converter raised in older releases
        return (RuntimeError,)
    return (ConverterError,)


def _unsupported_ops(exc: BaseException) -> tuple[list[str], list[str]]:
    """(flex, custom) TF op names from a ConverterError's structured errors (or its message)."""
    flex: list[str] = []
    custom: list[str] = []
    for err in getattr(exc, "errors", None) or []:
        text = str(err)
        name = getattr(getattr(err, "operator", None), "name", "") or ""
        name = name.removeprefix("tf.")
        if not name:
            continue
        if "ERROR_NEEDS_FLEX_OPS" in text and name not in flex:
            flex.append(name)
        elif "ERROR_NEEDS_CUSTOM_OPS" in text and name not in custom:
            custom.append(name)
    if not flex and not custom:
        flex = sorted(set(_TF_OP.findall(str(exc))))
    return flex, custom


def _describe_ops(flex: list[str], custom: list[str]) -> str:
    parts = [f"Flex (select TF) ops {', '.join(flex)}"] if flex else []
    parts += [f"custom ops {', '.join(custom)}"] if custom else []
    return " and ".join(parts)


_TIMEOUT_S = 1800


def _run_converter(req: dict[str, Any], precision: Precision) -> None:
    """Run the TFLite converter in a child process (converters/tflite_converter_child.py); raise the artifact's
    one-line error when it fails or crashes."""
    work = Path(req["out"])
    request = work.with_suffix(".request.json")
    request.write_text(json.dumps(req))
    cmd = [sys.executable, "-m", "edge_sdk.converters.tflite_converter_child", str(request)]

    def failed(exc: subprocess.CalledProcessError) -> str:
        how = (f"crashed ({signal.Signals(-exc.returncode).name})" if exc.returncode < 0
               else f"ended with exit {exc.returncode}")
        tail = [ln.strip() for ln in exc.stderr.splitlines() if ln.strip() and not re.match(
            r"^([IWE]\d{4} |WARNING: All log messages)", ln.strip())][-1:]
        return (f"the TFLite converter {how} converting the model to {precision.value}"
                + (f" ({tail[0][:200]})" if tail else "") + ": use another --route or target")

    run_tool(cmd, timeout_s=_TIMEOUT_S, failed=failed,
             timed_out=f"the TFLite converter did not finish in {_TIMEOUT_S} s: use another target")
    error = Path(req["error"])
    if not error.exists():
        return
    err = json.loads(error.read_text())
    if err["flex"] or err["custom"]:
        raise UnsupportedConversionError(
            f"the model needs {_describe_ops(err['flex'], err['custom'])} that LiteRT builtins do not provide and the "
            "plain LiteRT runtime cannot run: replace those operations or choose another target (onnx, openvino)")
    if precision is Precision.INT8:
        raise UnsupportedConversionError(
            f"TFLite full-integer quantization failed ({err['message']}): some op has no int8 kernel; "
            "use --precision dynamic or fp16 for tflite")
    raise ConversionError(f"TFLite conversion failed ({err['message']}): check the model exports with "
                          "model.export() and uses standard Keras layers")


# the calibration and mixed rungs: NNCF-like ranges and bias correction (MobileNetV2 int8, 240 photo crops: top-1
# agreement 85.4% with the default histogram ranges -> 87.9% minmax-mean -> 90.0% with bias correction)
_MINMAX_MEAN_BC = (("tflite_quantizer", "aeq"), ("tflite_ranges", "minmax-mean"), ("tflite_bias_correction", True))
# the mixed rungs: the stem (float input) and the head (float outputs, int8 weights) computed in float, GPTQ-rounded
# int8 weights, int8 biases corrected on the int8 model; MobileNetV2 (240 photo crops) 90.0% -> mixed:stem 93.8% ->
# with the most sensitive layer outside the stem computed in float from int8 weights (mixed:k1) 97.1% at 0.29x fp32
# size, 0.56x latency
_INT8_WEIGHTS_MAX_ERROR = 1e-3  # a layer kept in float gets int8 weights only below this relative output error
_ON_STEM = (("tflite_quantizer", "aeq"), ("tflite_float_stem", True), ("tflite_float_head", True),
            ("tflite_weight_rounding", "gptq"), ("tflite_full_bias_correction", True))


class TFLiteConverter:
    """Base of the X -> .tflite converters: what every TFLite path produces, and the accuracy-budget rungs it
    offers for an int8 file over budget (converters/accuracy_budget.py)."""

    target = Format.TFLITE
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8)
    budget_ladder = (  # accuracy-budget rungs (converters/accuracy_budget.py)
        LadderStep("calibration:minmax-mean", _MINMAX_MEAN_BC),
        LadderStep("mixed:stem", _ON_STEM, best_calibration=True),
        LadderStep("mixed", (*_ON_STEM, ("tflite_float_layer_weights", "int8")), mixed="tflite",
                   best_calibration=True),
        LadderStep("int16-activations", (("tflite_activation_bits", 16),)),
        LadderStep("qat", qat=True),
        LadderStep("fp16", precision=Precision.FP16),
    )
    extra_options = (
        OptionSpec("tflite_quantizer", str, "", ("aeq", "native"),
                   help="int8 quantizer: aeq = AI Edge Quantizer on the fp32 .tflite (fully integer graph; the "
                        "PyTorch default), native = the source's own path (PT2E, TF converter, onnx2tf)"),
        OptionSpec("tflite_activation_bits", int, 8, (8, 16),
                   help="16 = int16 activations with int8 weights (AI Edge Quantizer a16w8; slower, closer to fp32)"),
        OptionSpec("tflite_ranges", str, "histogram", ("histogram", "minmax-mean"),
                   help="AI Edge Quantizer activation ranges: histogram = least-error clipping per tensor, "
                        "minmax-mean = mean of each sample's min / max (NNCF's choice)"),
        OptionSpec("tflite_bias_correction", bool, False, (),
                   help="shift each layer's bias by minus the mean error its int8 weights add (NNCF's fast bias "
                        "correction) before the AI Edge Quantizer runs"),
        OptionSpec("tflite_float_layers", (list, tuple), (), (),
                   help="weighted layers kept in float, as 'i/N' (the i-th of N convolution / fully connected "
                        "layers in graph order; the accuracy budget's mixed rung sets it)"),
        OptionSpec("tflite_float_stem", bool, False, (),
                   help="keep the stem (the layers from the input up to the first branch, found on the ONNX "
                        "export) in float"),
        OptionSpec("tflite_full_bias_correction", bool, False, (),
                   help="after quantizing, correct each int8 layer's bias by its mean output error measured on the "
                        "int8 model against the fp32 one (kept only where the outputs get closer)"),
        OptionSpec("tflite_float_layer_weights", str, "fp32", ("fp32", "int8"),
                   help="weights of the tflite_float_layers layers: fp32, or int8 dequantized to float before the "
                        "layer computes (the activations stay float, the file stays small)"),
        OptionSpec("tflite_hybrid_fc", bool, True, (),
                   help="PT2E int8: store the fp32 weights of fully connected ops it left float (an LSTM's gates) "
                        "as int8; LiteRT runs them as hybrid ops"),
        OptionSpec("tflite_xnnpack_activations", bool, True, (),
                   help="int8: fold standalone RELU / RELU6 / RELU_0_TO_1 clamps into the op before them and split "
                        "HARD_SWISH into MUL / ADD / MUL, which XNNPACK runs (converters/tflite_activations.py)"),
        OptionSpec("tflite_float_head", bool, False, (),
                   help="compute the layer(s) writing the graph outputs in float from int8 weights, with float "
                        "outputs (the logits are not rounded to 256 levels)"),
        OptionSpec("tflite_weight_rounding", str, "nearest", ("nearest", "gptq"),
                   help="int8 weight rounding: nearest, or GPTQ on the calibration data (rounded on the ONNX "
                        "export, written into the fp32 .tflite before the AI Edge Quantizer runs)"),
    )
    default_quantizer = "native"  # what the int8 path uses without --option tflite_quantizer

    @staticmethod
    def delegable_int8(ctx: ConversionContext, path: Path, notes: list[str], versions: dict[str, str]) -> None:
        """Rewrite the int8 ops of ``path`` XNNPACK would leave to LiteRT's reference kernels (standalone clamps,
        HARD_SWISH; converters/tflite_activations.py), unless ``tflite_xnnpack_activations`` is off; noted."""
        if not ctx.options.extra.get("tflite_xnnpack_activations", True):
            return
        from edge_sdk.converters.tflite_activations import delegable_activations

        try:
            data, done = delegable_activations(path.read_bytes())
        except Exception as exc:  # an optional speed pass on a graph it does not understand: keep the file as is
            notes.append(f"int8 activations left as they are (the XNNPACK rewrite failed: {first_line(exc, 120)})")
            return
        if not done:
            return
        path.write_bytes(data)
        what = ", ".join(f"{n} {name}" for name, n in sorted(done.items()))
        versions["tflite_xnnpack_activations"] = what
        notes.append(f"int8 ops XNNPACK does not run rewritten into ops it runs: {what} (clamps folded into the "
                     "op before them, HARD_SWISH as MUL / ADD / MUL)")

    def aeq_or_note(self, ctx: ConversionContext, native: str, notes: list[str]) -> ArtifactDraft | None:
        """:meth:`int8_with_aeq`'s draft, or None after noting why the ``native`` int8 path runs instead."""
        draft, why = self.int8_with_aeq(ctx)
        if draft is None and why:
            notes.append(f"{why}: used {native} instead")
        return draft

    def int8_with_aeq(self, ctx: ConversionContext) -> tuple[ArtifactDraft | None, str]:
        """The int8 artifact through the AI Edge Quantizer (converters/tflite_quantize.py) when this converter
        uses it, as (draft, ""); (None, one-line reason) when it is not used or failed and the native int8 path
        should run instead. int16 activations have no native fallback: their failure raises."""
        plan = _AeqPlan.from_extra(ctx.options.extra, self.default_quantizer)
        if plan.quantizer != "aeq" and not plan.special:
            return None, ""
        from edge_sdk.converters.tflite_quantize import float_ops, quantize_tflite

        samples = ctx.require_calibration("TFLite full-integer quantization (AI Edge Quantizer)")
        samples.check(ctx.source.input_shapes, "calibration")
        fp32 = self.convert(ctx, Precision.FP32)[0]  # the converter's own fp32 .tflite (cached where it can be)
        out = ctx.path_for(Format.TFLITE, Precision.INT8, ".tflite")
        try:
            perms = fp32.runtime.get("input_permutations") or [None] * len(samples.arrays)  # onnx2tf: NCHW -> NHWC
            arrays = [np.ascontiguousarray(a.transpose(p)) if p else a
                      for a, p in zip(samples.arrays, perms, strict=True)]
            floats = _FloatPlan.make(ctx, fp32.path, samples, plan)
            res = quantize_tflite(floats.source, out, arrays, list(ctx.source.input_names),
                                  activation_bits=plan.bits, int8_io=bool(ctx.options.tflite_int8_io),
                                  float_scopes=floats.scopes, ranges=plan.ranges, bias_correction=plan.bias_correction,
                                  weight_only_scopes=floats.heads + floats.light_scopes,
                                  float_edges=plan.stem or plan.head,
                                  full_bias_correction_against=fp32.path if plan.full_bias_correction else None)
            left = float_ops(out)
            if left and not (floats.mixed or floats.heads):
                raise ConversionError(f"the AI Edge Quantizer left {len(left)} ops in float "
                                      f"({', '.join(sorted(set(left))[:5])})")
        except (ConversionError, MissingDependencyError) as exc:
            if plan.special:
                raise
            return None, first_line(exc, 300)
        kept = {k: v for k, v in fp32.runtime.items()
                if k not in ("runtime", "input_dtypes", "output_dtypes", "edgetpu", "input_order")}
        notes = [*res.notes, *(n for n in fp32.notes if not n.startswith("TFLite inputs are ordered"))]
        versions = {**fp32.tool_versions, "ai-edge-quantizer": version_of("ai-edge-quantizer")}
        self.delegable_int8(ctx, out, notes, versions)
        summary = tflite_summary(out)
        check_builtin_ops(summary, "the AI Edge Quantizer")
        draft = tflite_draft(out, Precision.INT8, summary, list(ctx.source.input_names), notes, versions,
                             input_layout=fp32.input_layout, extra_runtime=kept)
        draft.runtime["quantizer"] = f"ai-edge-quantizer {res.recipe}"
        if plan.bits == 16 or floats.mixed or floats.heads:
            draft.runtime.pop("edgetpu", None)  # int16 activations / float layers: not an Edge TPU model
        floats.record(draft, plan)
        return draft, ""


@dataclass(frozen=True)
class _AeqPlan:
    """What ``ConvertOptions.extra`` asks of the AI Edge Quantizer path (the option names are in the module
    docstring); ``special`` is any request beyond plain int8, which has no native-converter fallback."""

    quantizer: str
    bits: int
    float_layers: tuple[str, ...]
    ranges: str
    bias_correction: bool
    stem: bool
    head: bool
    full_bias_correction: bool
    rounding: str
    int8_layer_weights: bool

    @classmethod
    def from_extra(cls, extra: dict[str, Any], default_quantizer: str) -> _AeqPlan:
        def word(key: str, default: str) -> str:
            return str(extra.get(key) or default).strip().lower()

        return cls(quantizer=word("tflite_quantizer", default_quantizer),
                   bits=int(extra.get("tflite_activation_bits", 8)),
                   float_layers=tuple(extra.get("tflite_float_layers") or ()),
                   ranges=word("tflite_ranges", "histogram"),
                   bias_correction=bool(extra.get("tflite_bias_correction", False)),
                   stem=bool(extra.get("tflite_float_stem", False)), head=bool(extra.get("tflite_float_head", False)),
                   full_bias_correction=bool(extra.get("tflite_full_bias_correction", False)),
                   rounding=word("tflite_weight_rounding", "nearest"),
                   int8_layer_weights=word("tflite_float_layer_weights", "fp32") == "int8")

    @property
    def special(self) -> bool:
        return (self.bits == 16 or bool(self.float_layers) or self.ranges != "histogram" or self.bias_correction
                or self.stem or self.head or self.full_bias_correction or self.rounding != "nearest")


@dataclass
class _FloatPlan:
    """Which ops of the fp32 .tflite stay float, and with which weights: ``scopes`` compute in float from fp32
    weights (the ranked layers, the stem and the ops feeding them), ``heads`` (the layer writing the outputs) and
    ``light_scopes`` (ranked layers whose int8 rounding barely changes their output) in float from int8 weights.
    ``source`` is the .tflite to quantize: the fp32 one, or a copy with GPTQ-rounded weights (``rounded`` says so)."""

    source: Path
    mixed: list[str]
    stem_entries: list[str]
    scopes: list[str]
    heads: list[str]
    light_scopes: list[str]
    rounded: str

    @classmethod
    def make(cls, ctx: ConversionContext, fp32: Path, samples: Any, plan: _AeqPlan) -> _FloatPlan:
        from edge_sdk.converters.tflite_quantize import float_scopes_for, head_scopes, layer_scopes

        ranked = list(plan.float_layers)
        stem_entries = _stem_layers(ctx) if plan.stem else []
        mixed = ranked + [x for x in stem_entries if x not in ranked]
        scopes = float_scopes_for(fp32, _layer_indices(fp32, mixed)) if mixed else []
        heads, passing = head_scopes(fp32) if plan.head else ([], [])
        scopes += [sc for sc in passing if sc not in scopes]
        floats = _layer_indices(fp32, mixed)
        candidates = _layer_indices(fp32, [x for x in ranked if x not in stem_entries]) \
            if plan.int8_layer_weights else []
        light: list[int] = []

        def fp32_weights(errors: list[float]) -> set[int]:
            # the stem's few weights stay fp32; so do those whose int8 rounding changes the layer's output by
            # more than 0.1% on the calibration inputs (e.g. tiny weights reading huge inputs round to zero)
            light.extend(i for i in candidates if i < len(errors) and errors[i] <= _INT8_WEIGHTS_MAX_ERROR)
            return set(floats) - set(light)

        source, rounded = fp32, ""
        if plan.rounding == "gptq":
            source, rounded = _gptq_weights(ctx, fp32, samples, fp32_weights)
        elif candidates:
            raise ConversionError("tflite_float_layer_weights 'int8' needs tflite_weight_rounding 'gptq' (its "
                                  "error measure decides which layers can take int8 weights)")
        light_scopes = [sc for sc in layer_scopes(fp32, light) if sc not in heads]
        scopes = [sc for sc in scopes if sc not in heads and sc not in light_scopes]
        return cls(source, mixed, stem_entries, scopes, heads, light_scopes, rounded)

    def record(self, draft: ArtifactDraft, plan: _AeqPlan) -> None:
        """Say in the manifest (``tool_versions``, notes) what was kept in float and how the int8 was made."""
        versions = draft.tool_versions
        if plan.ranges != "histogram":
            versions["tflite_ranges"] = plan.ranges
        if plan.bias_correction:
            versions["tflite_bias_correction"] = "fast"
        if plan.rounding == "gptq":
            versions["tflite_weight_rounding"] = self.rounded
        if plan.stem:
            versions["tflite_float_stem"] = f"{len(self.stem_entries)} layers"
        if self.heads:
            versions["tflite_float_head"] = f"{len(self.heads)} layers (int8 weights, float compute)"
        if self.light_scopes:
            versions["tflite_float_layer_weights"] = f"int8 for {len(self.light_scopes)} of the float layers"
        if self.mixed:
            versions["tflite_float_layers"] = ",".join(map(str, self.mixed))
            draft.notes.append(f"kept in float: {len(self.mixed)} weighted layers and the ops feeding them "
                               f"({len(self.scopes)} ops; layers {', '.join(map(str, self.mixed))})")


def _stem_layers(ctx: ConversionContext) -> list[str]:
    """The stem's weighted layers as 'i/N' entries, found on the fp32 ONNX export of the source (the graph the
    mixed rungs rank): converters/onnx_quantize.py :func:`stem_of_file`."""
    from edge_sdk.converters.onnx_quantize import stem_of_file

    stem, order = stem_of_file(ctx.onnx(Precision.FP32).path)
    return [f"{order.index(name)}/{len(order)}" for name in stem if name in order]


def _gptq_weights(ctx: ConversionContext, fp32: Path, samples: Any,
                  keep: Callable[[list[float]], set[int]]) -> tuple[Path, str]:
    """(an fp32 .tflite with GPTQ-rounded weights, what was done): converters/tflite_weight_rounding.py."""
    from edge_sdk.converters.onnx_common import onnx_input_names
    from edge_sdk.converters.tflite_weight_rounding import gptq_tflite

    onnx_path = ctx.onnx(Precision.FP32).path
    names = onnx_input_names(onnx_path)
    if sorted(ctx.source.input_names) == sorted(names):
        names = list(ctx.source.input_names)
    work = ctx.scratch("tflite-gptq")
    out = work / "gptq.tflite"
    info = gptq_tflite(fp32, onnx_path, out, samples, names, work, keep)
    return out, info["tflite_weight_rounding"]


def _layer_indices(path: Path, layers: list[Any]) -> list[int]:
    """``tflite_float_layers`` entries ('i/N': the i-th of N weighted layers, graph order, as ranked on the ONNX
    export) as indices into the .tflite file's weighted ops; a one-line error when the two graphs differ."""
    from edge_sdk.converters.tflite_quantize import weighted_ops

    ops = weighted_ops(path)
    out = []
    for item in layers:
        i, _, n = str(item).partition("/")
        if not (i.strip().isdigit() and n.strip().isdigit()):
            raise ConversionError(f"tflite_float_layers entry {item!r} is not 'i/N' (the i-th of N weighted layers)")
        if int(n) != len(ops) or int(i) >= len(ops):
            raise ConversionError(f"cannot keep layer {item} in float: the .tflite has {len(ops)} convolution / "
                                  f"fully connected layers, the ranked graph {n} (the graphs differ)")
        out.append(int(i))
    return out


@register
class KerasToTFLite(TFLiteConverter):
    """Keras models and SavedModels -> .tflite through the TensorFlow Lite converter."""

    sources = (Framework.KERAS,)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Convert the source's SavedModel export to one .tflite file of ``precision``."""
        check_precision(self, precision)
        src = ctx.source
        notes: list[str] = []
        if precision is Precision.INT8 and (draft := self.aeq_or_note(ctx, "the TF converter's int8", notes)):
            return [draft]
        samples = ctx.require_calibration("TFLite full-integer (int8) quantization") \
            if precision is Precision.INT8 else ctx.calibration
        tf = require("tensorflow", "tflite", "converting Keras models to TFLite")
        int8_io = bool(ctx.options.tflite_int8_io)
        out = ctx.path_for(Format.TFLITE, precision, ".tflite")
        req: dict[str, Any] = {"saved_model": str(src.saved_model_dir()), "precision": precision.value,
                               "out": str(out), "error": str(out.with_suffix(".error.json")), "int8_io": int8_io}
        if precision is Precision.FP16:
            notes.append("float16 weights; CPU kernels dequantize them to float32, GPU delegates run fp16")
        elif precision is Precision.DYNAMIC:
            notes.append("dynamic range: int8 weights, activations quantized at run time, float32 I/O")
        elif precision is Precision.INT8:
            samples.check(src.input_shapes, "calibration")
            names = list(getattr(src, "signature_input_names", src.input_names))
            req["samples"] = str(out.with_suffix(".calib.npz"))
            np.savez(req["samples"], **{f"input_{k}": a for k, a in enumerate(samples.arrays)})
            req.update(input_names=list(src.input_names), by_name=set(names) == set(src.input_names) and len(names) > 1)
            notes.append(f"full integer, calibrated on {len(samples)} samples; "
                         + ("int8 inputs/outputs" if int8_io else "float32 inputs/outputs"))
        _run_converter(req, precision)
        versions = {"tensorflow": tf.__version__, "ai-edge-litert": version_of("ai-edge-litert")}
        if precision is Precision.INT8:
            self.delegable_int8(ctx, out, notes, versions)
        summary = tflite_summary(out)
        check_builtin_ops(summary, "the TFLite converter")
        return [tflite_draft(out, precision, summary, src.input_names, notes, versions)]


def tflite_draft(path: Path, precision: Precision, summary: dict[str, Any], source_inputs: list[str], notes: list[str],
           tool_versions: dict[str, str], input_layout: str | None = None,
           extra_runtime: dict[str, Any] | None = None) -> ArtifactDraft:
    """An ArtifactDraft with the runtime hints every TFLite artifact carries."""
    runtime: dict[str, Any] = {
        "runtime": "litert",
        "input_dtypes": [t["dtype"] for t in summary["inputs"]],
        "output_dtypes": [t["dtype"] for t in summary["outputs"]],
    }
    if precision is Precision.INT8 and all(t["dtype"] in ("int8", "uint8") for t in summary["inputs"]):
        runtime["edgetpu"] = "needs edgetpu_compiler first; then load with delegate='edgetpu'"
    order = input_order([t["name"] for t in summary["inputs"]], source_inputs)
    if order is not None:
        runtime["input_order"] = order
        notes.append(f"TFLite inputs are ordered {order} relative to the source inputs")
    runtime.update(extra_runtime or {})
    return ArtifactDraft(format=Format.TFLITE, precision=precision, path=path, tool_versions=tool_versions,
                         runtime=runtime, notes=notes, input_layout=input_layout)
