"""Shared ONNX precision helpers: static QDQ int8, dynamic int8 and fp16 conversion of an fp32 ONNX file.

Every helper reads an fp32 ``.onnx`` file, writes a new single-file ``.onnx`` and returns the versions of the
tools it used (for ``ArtifactDraft.tool_versions``). Frameworks are imported inside the functions. The two int8
quantizer backends (NNCF, ONNX Runtime) and their calibration glue are in
:mod:`~edge_sdk.converters.onnx_qdq_backends`; their names stay importable from here (``_feed_array``,
``_ort_qdq``, ...) for the modules that reach into this one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_sdk._deps import has_module, require
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    ConvertOptions,
    LadderStep,
    OptionSpec,
    check_precision,
)
from edge_sdk.converters.onnx_common import onnx_input_names, onnx_versions
from edge_sdk.converters.onnx_qdq_backends import CALIBRATIONS as _CALIBRATIONS
from edge_sdk.converters.onnx_qdq_backends import WEIGHT_TYPES as _WEIGHT_TYPES
from edge_sdk.converters.onnx_qdq_backends import calibration_method as _calibration
from edge_sdk.converters.onnx_qdq_backends import feed_array as _feed_array  # noqa: F401  (re-exported)
from edge_sdk.converters.onnx_qdq_backends import nncf_qdq as _nncf_qdq
from edge_sdk.converters.onnx_qdq_backends import ort_qdq as _ort_qdq
from edge_sdk.converters.onnx_qdq_backends import weight_format as _weight_format
from edge_sdk.errors import CalibrationError, ConversionError, first_line
from edge_sdk.formats import Format, Precision
from edge_sdk.runtimes import onnxruntime as _ort

__all__ = [
    "convert_fp16",
    "derive_onnx_precision",
    "quantize_dynamic_onnx",
    "quantize_static_qdq",
    "stem_layers",
    "stem_of_file",
]

_ACTIVATION_TYPES = ("uint8", "int8", "uint16", "int16")  # 16-bit: ORT quantizer only (accuracy fallback)
_QUANTIZERS = ("auto", "nncf", "ort")
_ROUNDINGS = ("nearest", "gptq")
_GPTQ = (("onnx_weight_rounding", "gptq"),)
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _pre_process(fp32_path: Path, out_path: Path) -> Path:
    """Run ``quant_pre_process`` (shape inference + graph optimization) into a sibling file.

    Symbolic shape inference gives up on many real graphs (``Exception: Incomplete symbolic shape inference``,
    a bare Exception, on detectors with dynamic H/W): then ONNX shape inference only, then no pre-processing at
    all (the quantizers still work, with fewer fusions) — never a crash.
    """
    shape_inference = require("onnxruntime.quantization.shape_inference", "onnx", "ONNX quantization")
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    fp32_path = _at_least_opset(fp32_path, out_path.with_name(out_path.stem + ".opset.onnx"))
    for skip_symbolic in (False, True):
        try:
            # when symbolic inference gives up, ORT saves sym_shape_infer_temp.onnx + <uuid>.data into the current
            # directory: keep that litter in the work directory, never in the user's
            with contextlib.chdir(out_path.parent):
                shape_inference.quant_pre_process(str(fp32_path.resolve()), str(pre.resolve()),
                                                  skip_symbolic_shape=skip_symbolic)
            return pre
        except Exception as exc:  # any failure of the optional pre-processing falls back to the next option
            logging.getLogger(__name__).info("quant_pre_process (skip_symbolic_shape=%s) failed: %s",
                                             skip_symbolic, str(exc).splitlines()[:1])
            pre.unlink(missing_ok=True)
    shutil.copyfile(fp32_path, pre)
    return pre


_MIN_QDQ_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs opset 13


def _at_least_opset(path: Path, out: Path) -> Path:
    """``path`` upgraded to opset 13 when it is older (ddddocr's detector is opset 11: per-channel Q/DQ in it is
    an invalid graph); ``path`` itself when it is new enough or the upgrade fails (then quantizers may refuse)."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _MIN_QDQ_OPSET)
    if opset >= _MIN_QDQ_OPSET:
        return path
    try:
        upgraded = onnx.version_converter.convert_version(model, _MIN_QDQ_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the version converter lacks adapters for some ops: quantize the original
        logging.getLogger(__name__).info("opset %d -> %d upgrade failed: %s", opset, _MIN_QDQ_OPSET, first_line(exc))
        return path
    onnx.save_model(upgraded, str(out))
    return out


def _rewrite_pre(pre: Path, rewrite: Callable[[Any], int], key: str) -> dict[str, str]:
    """Apply ``rewrite`` (an in-place pass over an ``onnx.ModelProto`` returning how many changes it made) to the
    pre-processed file; the manifest record ``{key: count}``, empty when nothing changed."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    model = onnx.load(str(pre))
    try:
        done = rewrite(model)
    except Exception as exc:  # an optional pass on a graph it does not understand: the file stays as it is
        logging.getLogger(__name__).info("%s skipped: %s", key, first_line(exc))
        return {}
    if not done:
        return {}
    onnx.save_model(model, str(pre))
    return {key: str(done)}


def _weight_rounding(options: ConvertOptions) -> str:
    """How int8 weights are rounded: ``options.extra['onnx_weight_rounding']``, ``nearest`` (default) or ``gptq``
    (error-compensating rounding on the calibration data, converters/weight_rounding.py).

    Measured on ImageNet MobileNetV2 (240 photo crops, top-1 agreement with fp32, ORT quantizer): weights only
    int8 87.1% nearest -> 98.3% GPTQ; with 16-bit activations 87.1% -> 95.8%; with 8-bit activations 87.1% ->
    86.3% (8-bit activation error dominates), so GPTQ is the default of the ``int16-activations`` rung only."""
    name = str(options.extra.get("onnx_weight_rounding", "nearest")).strip().lower()
    if name not in _ROUNDINGS:
        raise ConversionError(f"onnx_weight_rounding {name!r} is not supported: choose from {', '.join(_ROUNDINGS)}")
    return name


def _bias_correction(options: ConvertOptions, tool: str) -> bool:
    """``options.extra['onnx_bias_correction']``: correct the int8 biases after ORT's quantizer
    (converters/onnx_bias_correction.py; NNCF always corrects its own, so it is a no-op there)."""
    value = options.extra.get("onnx_bias_correction", False)
    if not isinstance(value, bool):
        raise ConversionError(f"onnx_bias_correction must be true or false, not {value!r}")
    return value and tool == "ort"


def stem_layers(model: Any) -> list[str]:
    """The weighted layers of the network's stem: those on the single path from the (one) graph input up to the
    first tensor that two nodes read or the first node that joins two tensors, at most a quarter of the weighted
    layers (at least one). ImageNet MobileNetV2: its first six convolutions (17% of its multiply-adds).

    The stem reads the raw input, whose 8-bit rounding alone flips 5% of MobileNetV2's top-1 decisions on photo
    crops: keeping it in float is the ``mixed:stem`` rung of the accuracy budget."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    consts = inits | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inputs = [i.name for i in graph.input if i.name not in inits]
    weighted = sum(n.op_type in _WEIGHTED_OPS for n in graph.node)
    if len(inputs) != 1 or not weighted:
        return _input_layers(model)
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    outputs = {o.name for o in graph.output}
    cap = max(1, weighted // 4)
    found: list[str] = []
    tensor = inputs[0]
    while len(found) < cap:
        nxt = readers.get(tensor, [])
        if len(nxt) != 1 or tensor in outputs:
            break
        node = nxt[0]
        if sum(1 for x in node.input if x and x not in consts) != 1:
            break
        if node.op_type in _WEIGHTED_OPS and node.name:
            found.append(node.name)
        live = [o for o in node.output if o in readers or o in outputs]
        if len(live) != 1:
            break
        tensor = live[0]
    return found or _input_layers(model)


def stem_of_file(path: Path) -> tuple[list[str], list[str]]:
    """(the stem's layer names, every weighted layer's name in graph order) of the ONNX file ``path``: what the
    accuracy budget's mixed rungs (names) and TFLite's ``tflite_float_stem`` (graph positions) need."""
    onnx = require("onnx", "onnx", "finding the stem of a model")
    model = onnx.load(str(path), load_external_data=False)
    return stem_layers(model), [n.name for n in model.graph.node if n.op_type in _WEIGHTED_OPS]


def _input_layers(model: Any) -> list[str]:
    """Names of the weighted nodes (Conv/Gemm/MatMul) fed directly (or via layout ops) by a graph input."""
    inits = {i.name for i in model.graph.initializer}
    reach = {i.name for i in model.graph.input if i.name not in inits}
    found: list[str] = []
    for node in model.graph.node:  # nodes are topologically sorted
        if not any(x in reach for x in node.input):
            continue
        if node.op_type in _LAYOUT_OPS:
            reach.update(node.output)
        elif node.op_type in _WEIGHTED_OPS and node.name:
            found.append(node.name)
    return found


def _float_outputs(path: Path) -> int:
    """Remove the Quantize/Dequantize pair in front of each graph output so the model returns exact floats.

    Quantizing the final logits to 256 levels over their calibration range rounds (or, with a tighter range,
    clips) the top scores and flips near-tied top-1 decisions; the pair costs accuracy and saves nothing.
    Returns how many outputs were changed.
    """
    onnx = require("onnx", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producer:
            continue
        tensor = q.input[0]
        for node in graph.node:
            for seq in (node.input, node.output):
                for i, name in enumerate(seq):
                    if name == tensor:
                        seq[i] = out.name
        graph.node.remove(q)
        graph.node.remove(dq)
        changed += 1
    if changed:
        used = {x for n in graph.node for x in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        onnx.save_model(model, str(path))
    return changed


def _quantizer(options: ConvertOptions) -> str:
    """The int8 tool named by ``options.extra['onnx_quantizer']``: ``nncf``, ``ort`` or ``auto`` (default).

    ``auto`` picks NNCF when it is installed (the ``openvino-convert`` extra), unless an ORT calibration method
    is asked for with ``onnx_calibration``; otherwise ONNX Runtime's own quantizer.
    """
    name = str(options.extra.get("onnx_quantizer", "auto")).strip().lower()
    if name not in _QUANTIZERS:
        raise ConversionError(f"onnx_quantizer {name!r} is not supported: choose from {', '.join(_QUANTIZERS)}")
    if name == "auto":
        return "ort" if "onnx_calibration" in options.extra or not has_module("nncf") else "nncf"
    return name


def _check_loads(path: Path) -> None:
    """Raise ConversionError when ONNX Runtime refuses the quantized graph (NNCF's Q/DQ placement can break a
    Concat's rank on some real graphs: "All inputs to Concat must have same rank")."""
    ort = require("onnxruntime", "onnx", "ONNX quantization")
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        first = first_line(exc, 200)
        raise ConversionError(f"the quantized model does not load in ONNX Runtime ({first})") from None


def quantize_static_qdq(fp32_path: Path, out_path: Path, samples: SampleSet, options: ConvertOptions,
                        sample_names: list[str] | None = None) -> dict[str, str]:
    """Static int8 QDQ quantization: per-channel int8 weights, uint8 (default) or int8 activations.

    ``sample_names`` names the ONNX input each of ``samples.arrays`` feeds (default: graph input order).
    The tool is chosen by ``_quantizer`` (``options.extra['onnx_quantizer']``). Measured on ImageNet
    MobileNetV2 (240 photos, 1 thread): NNCF (default) kept 100% of the confident top-1 decisions at 3.7 ms;
    ORT's quantizer with mean-of-per-sample min/max ranges and the input layer(s) kept in float 96.5-97.9%
    at 3.3 ms. ``options.extra['onnx_float_input_layers']`` keeps the layer(s) reading the graph inputs float
    (default: True for ORT, False for NNCF) and ``options.extra['onnx_float_outputs']`` (default True) removes
    any Q/DQ pair on the graph outputs; ``options.extra['onnx_float_nodes']`` (node names of the pre-processed
    graph, see converters/sensitivity.py) are kept in float too. The returned dict records these choices.
    """
    act = options.onnx_activation_type.strip().lower()
    if act not in _ACTIVATION_TYPES:
        raise ConversionError(f"onnx_activation_type {options.onnx_activation_type!r} is not supported: "
                              f"choose from {', '.join(_ACTIVATION_TYPES)}")
    tool = _quantizer(options)
    if act.endswith("16") and tool == "nncf":
        if str(options.extra.get("onnx_quantizer", "auto")).strip().lower() == "nncf":
            raise ConversionError(f"onnx_activation_type {act} needs onnx_quantizer 'ort' (NNCF makes 8-bit only)")
        tool = "ort"
    names = onnx_input_names(fp32_path)
    if sample_names is not None and sorted(sample_names) == sorted(names):
        names = list(sample_names)
    if len(samples.arrays) != len(names):
        raise CalibrationError(f"calibration data has {len(samples.arrays)} input(s) but the ONNX model takes "
                               f"{len(names)} ({', '.join(names)}): give one array per input")
    if len(samples) == 0:
        raise CalibrationError("calibration data is empty: give 100-500 representative inputs")
    if tool == "ort":
        _calibration(require("onnxruntime.quantization", "onnx", "ONNX static quantization"), options)
    rounding = _weight_rounding(options)
    pre = _pre_process(fp32_path, out_path)
    rounding_info: dict[str, str] = {"onnx_weight_rounding": rounding}
    if options.extra.get("onnx_fuse_hard_swish", True):  # converters/onnx_hard_swish.py
        from edge_sdk.converters.onnx_hard_swish import fuse_hard_swish

        rounding_info.update(_rewrite_pre(pre, fuse_hard_swish, "onnx_hard_swish_fused"))
    if options.extra.get("onnx_fold_conv_affine", True):  # converters/onnx_conv_affine.py
        from edge_sdk.converters.onnx_conv_affine import fold_conv_affine

        rounding_info.update(_rewrite_pre(pre, fold_conv_affine, "onnx_conv_affine_folded"))
    correct = _bias_correction(options, tool)
    reference = pre.with_name(pre.stem + ".fp32.onnx")  # what the bias correction matches: before GPTQ rounds
    if correct:
        shutil.copyfile(pre, reference)
    if rounding == "gptq":
        from edge_sdk.converters.weight_rounding import gptq_onnx

        wtype, reduce = _weight_format(options)
        if wtype != "int8":
            pre.unlink(missing_ok=True)
            raise ConversionError(f"onnx_weight_rounding 'gptq' needs symmetric int8 weights, not {wtype}: set "
                                  "onnx_weight_type to 'int8' or onnx_weight_rounding to 'nearest'")
        rounded = pre.with_name(pre.stem + ".gptq.onnx")
        try:
            rounding_info = gptq_onnx(pre, rounded, samples, names, qmax=64 if reduce else 127)
            if rounded.exists():  # nothing to round (e.g. only 1-D convolutions): the model stays as it is
                rounded.replace(pre)
        finally:
            rounded.unlink(missing_ok=True)
    onnx = require("onnx", "onnx", "ONNX quantization")
    graph = onnx.load(str(pre), load_external_data=False)
    float_layers = _input_layers(graph) if options.extra.get("onnx_float_input_layers", tool == "ort") else []
    stem = stem_layers(graph) if options.extra.get("onnx_float_stem", False) else []
    float_layers += [n for n in stem if n not in float_layers]
    if stem:
        rounding_info["onnx_float_stem"] = f"{len(stem)} layers"
    float_layers += [n for n in options.extra.get("onnx_float_nodes", ()) if n not in float_layers]
    auto = str(options.extra.get("onnx_quantizer", "auto")).strip().lower() == "auto"
    try:
        run = _nncf_qdq if tool == "nncf" else _ort_qdq
        try:
            info = run(pre, out_path, samples, names, options, act, float_layers)
            if auto and tool == "nncf":
                _check_loads(out_path)
        except Exception as exc:
            if not (auto and tool == "nncf"):
                raise
            # NNCF's graph analysis fails on some real graphs (If/Loop, custom domains): ONNX Runtime's own
            # quantizer is the next choice, and the manifest records why
            first = first_line(exc, 200)
            out_path.unlink(missing_ok=True)
            tool = "ort"
            info = {**_ort_qdq(pre, out_path, samples, names, options, act, float_layers),
                    "onnx_quantizer_fallback": f"nncf failed ({first})"}
        try:
            _check_loads(out_path)
        except ConversionError as exc:
            raise ConversionError(f"{exc} after {tool} quantization: a quantizer bug on this graph; ship fp16 or "
                                  "another target's int8 (openvino)") from None
        if correct and tool == "ort":  # NNCF corrects its biases itself
            from edge_sdk.converters.onnx_bias_correction import bias_correct_qdq

            info = {**info, **bias_correct_qdq(reference, out_path, samples, names)}
    finally:
        pre.unlink(missing_ok=True)
        reference.unlink(missing_ok=True)
    floats = _float_outputs(out_path) if options.extra.get("onnx_float_outputs", True) else 0
    if options.extra.get("onnx_fusion_layout", True):
        from edge_sdk.converters.onnx_qdq_fusion import ready_for_fusion

        info = {**info, **ready_for_fusion(out_path)}
    if options.extra.get("onnx_lstm_int8", True):
        from edge_sdk.converters.onnx_weight_only import quantize_lstm_weights

        info = {**info, **quantize_lstm_weights(out_path)}
    if options.extra.get("onnx_weight_only_int8", True):
        from edge_sdk.converters.onnx_weight_only import weight_only_int8

        info = {**info, **weight_only_int8(out_path, set(float_layers))}
    if {"onnx_lstm_int8", "onnx_fusion_layout", "onnx_weight_only_int8"} & set(info):
        _check_loads(out_path)
    return {**onnx_versions(), **info, **rounding_info, "onnx_quantizer": tool, "onnx_activation_type": act,
            "onnx_per_channel": str(options.onnx_per_channel),
            "onnx_float_layers": ",".join(float_layers) or "none", "onnx_float_outputs": str(floats)}


def quantize_dynamic_onnx(fp32_path: Path, out_path: Path, options: ConvertOptions) -> dict[str, str]:
    """Dynamic-range quantization: int8 weights, activations quantized at run time (slow for conv nets)."""
    quant = require("onnxruntime.quantization", "onnx", "ONNX dynamic quantization")
    pre = _pre_process(fp32_path, out_path)
    try:
        quant.quantize_dynamic(str(pre), str(out_path), per_channel=options.onnx_per_channel,
                               weight_type=quant.QuantType.QInt8)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConversionError(f"ONNX dynamic quantization failed ({exc}): use precision 'int8' or 'fp16'") from exc
    finally:
        pre.unlink(missing_ok=True)
    return onnx_versions()


def convert_fp16(fp32_path: Path, out_path: Path) -> dict[str, str]:
    """fp16 weights and compute with float32 inputs/outputs (``keep_io_types=True``)."""
    onnx = require("onnx", "onnx", "ONNX fp16 conversion")
    float16 = require("onnxruntime.transformers.float16", "onnx", "ONNX fp16 conversion")
    model = onnx.load(str(fp32_path))
    try:
        model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConversionError(f"ONNX fp16 conversion failed ({exc}): use precision 'fp32' or 'int8'") from exc
    onnx.save_model(model16, str(out_path))
    return {**onnx_versions(), "fp16_tool": "onnxruntime.transformers.float16"}


def _saturating_host() -> bool:
    """Whether validation here runs ORT's saturating U8S8 kernels (x86 without VNNI, exact mode off)."""
    return _ort.u8s8_saturates() and not _ort.exact_int8()


def derive_onnx_precision(ctx: ConversionContext, precision: Precision, note: str = "") -> ArtifactDraft:
    """Build a non-fp32 ONNX artifact from ``ctx.onnx(FP32)`` with the helpers above."""
    fp32 = ctx.onnx(Precision.FP32)
    out = ctx.path_for(Format.ONNX, precision, ".onnx")
    out.unlink(missing_ok=True)
    notes: list[str] = []
    if precision is Precision.FP16:
        versions = convert_fp16(fp32.path, out)
        notes.append("fp16 weights and compute; inputs and outputs stay float32")
    elif precision is Precision.DYNAMIC:
        versions = quantize_dynamic_onnx(fp32.path, out, ctx.options)
        notes.append("dynamic-range int8: weights int8, activations quantized per call (often slow for conv nets)")
    elif precision is Precision.INT8:
        samples = ctx.require_calibration("ONNX int8 quantization")
        versions = quantize_static_qdq(fp32.path, out, samples, ctx.options, list(ctx.source.input_names))
        notes.append(f"static QDQ int8 by {versions['onnx_quantizer']} "
                     f"({versions['onnx_activation_type']} activations, "
                     f"{'per-channel' if ctx.options.onnx_per_channel else 'per-tensor'} "
                     f"{versions.get('onnx_weight_type', 'int8')} weights, 7-bit range: "
                     f"{versions.get('onnx_reduce_range', 'no')}) "
                     f"calibrated on {len(samples)} samples ({versions['onnx_calibration']} ranges); "
                     "inputs and outputs stay float32")
        if versions.get("onnx_weight_rounding", "nearest") != "nearest":
            notes.append(f"int8 weights rounded by {versions['onnx_weight_rounding']} (error-compensating, "
                         "on the calibration data; converters/weight_rounding.py)")
        if versions["onnx_float_layers"] != "none":
            notes.append(f"kept in float: {versions['onnx_float_layers']}")
        if versions.get("onnx_weight_type", "int8") == "int8" and _saturating_host():
            notes.append("validated on an x86 CPU without VNNI, where ONNX Runtime's fast U8S8 kernels saturate "
                         "(about 3 pp of top-1 on MobileNetV2); VNNI / ARM CPUs and the browser compute exactly, "
                         f"and {_ort.EXACT_INT8_ENV}=1 does here, at fp32 speed")
        if "onnx_weight_only_int8" in versions:
            notes.append(f"int8 weights computed in float for the {versions['onnx_weight_only_int8']} the "
                         "quantizer left float")
        if "onnx_lstm_int8" in versions:
            notes.append(f"LSTM weights int8 ({versions['onnx_lstm_int8']}; ONNX Runtime's DynamicQuantizeLSTM "
                         "quantizes their inputs per call)")
        if versions["onnx_float_outputs"] != "0":
            notes.append("graph outputs are not quantized (no rounding of the final scores)")
    else:  # pragma: no cover - guarded by check_precision
        raise ConversionError(f"{precision.value} is not an ONNX precision: choose fp32, fp16, dynamic or int8")
    if note:
        notes.append(note)
    return ArtifactDraft(format=Format.ONNX, precision=precision, path=out,
                         tool_versions={**fp32.tool_versions, **versions},
                         runtime={"runtime": "onnxruntime"}, notes=notes, input_layout=fp32.input_layout)


class OnnxExporter:
    """Base of the converters that produce ONNX: the fp32 file comes from :meth:`export_fp32`; fp16, dynamic
    and int8 are always derived from that one fp32 file (``ctx.onnx(FP32)``, exported once)."""

    target = Format.ONNX
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8)
    #: accuracy-budget rungs for int8 ONNX (and the .ort made from it): other calibrations, layers in float,
    #: 16-bit activations, fp16 (converters/accuracy_budget.py)
    budget_ladder = (
        LadderStep("calibration:ort-minmax-mean", (("onnx_quantizer", "ort"),), unless=(("onnx_quantizer", "ort"),)),
        LadderStep("calibration:percentile", (("onnx_quantizer", "ort"), ("onnx_calibration", "percentile"))),
        LadderStep("mixed:stem", (("onnx_quantizer", "ort"), ("onnx_float_stem", True), *_GPTQ,
                                  ("onnx_bias_correction", True))),
        LadderStep("mixed", mixed="onnx"),
        LadderStep("int16-activations", (("onnx_quantizer", "ort"), ("onnx_activation_type", "uint16"), *_GPTQ)),
        LadderStep("qat", qat=True),
        LadderStep("fp16", precision=Precision.FP16),
    )
    extra_options = (
        OptionSpec("onnx_quantizer", str, "auto", _QUANTIZERS, "int8 tool: NNCF or ONNX Runtime's quantizer"),
        OptionSpec("onnx_calibration", str, "minmax-mean", _CALIBRATIONS, "ORT activation-range calibration"),
        OptionSpec("onnx_calib_percentile", float, 99.999, (), "percentile of the 'percentile' calibration"),
        OptionSpec("onnx_float_input_layers", bool, None, (), "keep the layers reading the inputs in float"),
        OptionSpec("onnx_float_outputs", bool, True, (), "no Q/DQ pair on the graph outputs"),
        OptionSpec("onnx_output_quantizers", bool, True, (),
                   "NNCF: quantize the outputs of int8 layers it left unquantized, so ORT runs them in int8"),
        OptionSpec("onnx_fp16_unfused_convs", bool, False, (),
                   "NNCF: store the weights of convs ORT cannot fuse as fp16 (faster float convs, 2x int8 bytes)"),
        OptionSpec("onnx_fuse_hard_swish", bool, True, (),
                   "int8: hard-swish written as Add/Clip/Mul/Div becomes one HardSwish op before quantization"),
        OptionSpec("onnx_fold_conv_affine", bool, True, (),
                   "int8: constant Mul / Add chains right after a Conv folded into its weights and bias (exact)"),
        OptionSpec("onnx_fusion_layout", bool, True, (),
                   "move dequantizers to their layer, int32 biases: lets ORT fuse heads it would run in float"),
        OptionSpec("onnx_lstm_int8", bool, True, (),
                   "int8 LSTM weights (ONNX Runtime's DynamicQuantizeLSTM); the static quantizers leave them fp32"),
        OptionSpec("onnx_weight_only_int8", bool, True, (),
                   "int8 weights (computed in float) for layers the quantizer skipped, not for those kept float"),
        OptionSpec("onnx_float_nodes", (list, tuple), (), (), "node names kept in float"),
        OptionSpec("onnx_float_stem", bool, False, (), "keep the stem (the layers up to the first branch) in float"),
        OptionSpec("onnx_bias_correction", bool, False, (), "correct the int8 biases (ORT's quantizer; NNCF does)"),
        OptionSpec("onnx_weight_rounding", str, "nearest", _ROUNDINGS, "int8 weight rounding: nearest or GPTQ"),
        OptionSpec("onnx_weight_type", str, "int8", _WEIGHT_TYPES, "int8 or uint8 weights (U8U8 kernels, ORT only)"),
        OptionSpec("onnx_reduce_range", bool, False, (), "7-bit weights (no int16 saturation on AVX2 without VNNI)"),
    )

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Produce the ONNX artifact of ``precision``."""
        check_precision(self, precision)
        if precision is not Precision.FP32:
            return [derive_onnx_precision(ctx, precision)]
        out = ctx.path_for(Format.ONNX, Precision.FP32, ".onnx")
        out.unlink(missing_ok=True)
        return [self.export_fp32(ctx, out)]

    def export_fp32(self, ctx: ConversionContext, out: Path) -> ArtifactDraft:
        """Write the source as fp32 ONNX to ``out`` and describe it (see onnx_common.fp32_onnx_draft)."""
        raise NotImplementedError
