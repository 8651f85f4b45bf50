"""Full-integer TFLite from an fp32 ``.tflite`` with the AI Edge Quantizer (``ai-edge-quantizer``).

LiteRT's current quantization path is two steps: convert to an fp32 ``.tflite``, then quantize that file with the
AI Edge Quantizer (successor of the TF converter's built-in quantization). Unlike litert-torch's PT2E int8 (which
leaves residual ADDs in float between DEQUANTIZE / QUANTIZE pairs), its static recipes quantize **every** op,
graph inputs and outputs included: the result is a fully integer graph the Edge TPU compiler can map whole.

Two recipes are used:

- ``a8w8`` (static int8): int8 per-channel symmetric weights, int8 asymmetric per-tensor activations — the
  TFLite int8 spec; int8 inputs and outputs.
- ``a16w8`` (int16 activations / int8 weights, TFLite's "int16x8" mode): the accuracy budget's mixed-precision
  rung for TFLite (converters/accuracy_budget.py); int16 inputs and outputs, slower on CPU than int8.

Activation ranges. The quantizer's default calibration keeps a moving average of per-sample min/max, which on
the real ImageNet MobileNetV2 (240 photo crops) gave 62% top-1 agreement with fp32; global min/max 81%. Here the
global min/max pass is followed by a histogram pass choosing, per activation tensor, the clipping range with the
least expected quantization error (rounding + clipping, as PyTorch's HistogramObserver does); graph inputs and
outputs keep their full min/max so the top scores never saturate into ties. Measured figures are in the
module tests (tests/test_tflite_full_int8.py) and the README.

For the accuracy budget (converters/accuracy_budget.py): ``ranges="minmax-mean"`` (the mean over samples of each
sample's min / max, NNCF's choice), ``bias_correction`` (:func:`bias_correct`: each conv / fully connected bias
shifted by minus the mean error the int8 weights add — the AI Edge Quantizer has none) and ``float_scopes`` (ops
left in float, :func:`float_scopes_for`). MobileNetV2, 240 photo crops, top-1 agreement with fp32: histogram ranges
85.4%, minmax-mean 87.9%, with bias correction 90.0% (with histogram ranges bias correction gives 84.2%).

Float I/O (``ConvertOptions.tflite_int8_io=False``): a QUANTIZE op is put in front of each quantized graph input
and a DEQUANTIZE op after each output (:func:`float_io`), so the model takes and returns float32 as before.

Heavy imports (the quantizer pulls TensorFlow-free LiteRT only, but still) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import ConversionError, first_line

__all__ = ["QuantizeResult", "bias_correct", "buffer_uses", "float_boundary", "float_io", "float_ops",
           "float_scopes_for", "head_scopes", "layer_scopes", "quantize_tflite", "weighted_ops"]

_RECIPES = {8: "a8w8", 16: "a16w8"}
_BINS = 2048
_SHRINK = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1])  # candidate range fractions
_HIST_SAMPLES = 100  # the histogram pass needs fewer samples than the min/max pass to be stable
_RANGES = {"histogram": "min/max, then least-error histogram clipping",
           "minmax-mean": "min/max, then the mean of each sample's min / max"}
_BC_SAMPLES = 32  # calibration inputs whose mean feeds the bias correction
_WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D"})


@dataclass
class QuantizeResult:
    """What :func:`quantize_tflite` did: the recipe, how ranges were chosen, the tensors it narrowed."""

    recipe: str
    samples: int
    ranges: str
    narrowed: int = 0
    notes: list[str] = field(default_factory=list)


def _signature(interp: Any) -> tuple[str, list[str]]:
    sigs = interp.get_signature_list()
    if len(sigs) != 1:
        raise ConversionError(f"the fp32 .tflite has {len(sigs)} signatures, the AI Edge Quantizer path needs "
                              "exactly one: use the converter's own int8 path")
    key = next(iter(sigs))
    return key, list(sigs[key]["inputs"])


def _feed_order(sig_inputs: list[str], source_inputs: list[str]) -> list[int]:
    """For each signature input, the index of the calibration array (source input) that feeds it."""
    if len(sig_inputs) == 1:
        return [0]
    if sorted(sig_inputs) == sorted(source_inputs):
        return [source_inputs.index(n) for n in sig_inputs]
    numbered = [re.fullmatch(r"args_(\d+)", n) for n in sig_inputs]  # litert-torch names inputs args_0, args_1...
    if all(numbered) and sorted(int(m.group(1)) for m in numbered if m) == list(range(len(sig_inputs))):
        return [int(m.group(1)) for m in numbered if m]
    matched = [[k for k, s in enumerate(source_inputs) if re.search(rf"(^|_){re.escape(s)}(:\d+)?$", n)]
               for n in sig_inputs]
    if all(len(m) == 1 for m in matched) and sorted(m[0] for m in matched) == list(range(len(source_inputs))):
        return [m[0] for m in matched]
    raise ConversionError(f"cannot tell which source input feeds each .tflite signature input {sig_inputs} "
                          f"(source inputs {source_inputs}): use the converter's own int8 path")


def _dataset(key: str, names: list[str], order: list[int], arrays: list[np.ndarray], n: int) -> dict[str, Any]:
    return {key: [{name: arrays[order[j]][i:i + 1] for j, name in enumerate(names)} for i in range(n)]}


def _best_range(counts: np.ndarray, lo: float, hi: float, levels: int) -> tuple[float, float]:
    """The [lo', hi'] (fractions of [lo, hi], 0 kept inside) with the least expected quantization error."""
    edges = np.linspace(lo, hi, counts.size + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    los = lo * _SHRINK if lo < 0 else np.zeros(1)
    his = hi * _SHRINK if hi > 0 else np.zeros(1)
    cl, ch = np.meshgrid(los, his, indexing="ij")
    cl, ch = cl.ravel()[:, None], ch.ravel()[:, None]
    step = np.maximum(ch - cl, 1e-12) / (levels - 1)
    clipped = np.clip(centres[None, :], cl, ch)
    inside = (centres[None, :] >= cl) & (centres[None, :] <= ch)
    err = ((centres[None, :] - clipped) ** 2 + inside * step ** 2 / 12) @ counts
    best = int(np.argmin(err))
    return float(cl[best, 0]), float(ch[best, 0])


def _narrow_ranges(float_model: bytes, qsvs: dict[str, Any], dataset: list[dict[str, np.ndarray]], key: str,
                   bits: int, how: str = "histogram") -> int:
    """Replace the min/max of each inner activation tensor by a narrower range: ``histogram``, its least-error
    clipping range; ``minmax-mean``, the mean over samples of each sample's min and max (NNCF's MIXED preset).
    Returns how many tensors were narrowed."""
    litert = require("ai_edge_litert.interpreter", "tflite", "int8 quantization of .tflite files")
    interp = litert.Interpreter(model_content=float_model, num_threads=1, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    runner = interp.get_signature_runner(key)
    boundary = {d["name"] for d in interp.get_input_details()} | {d["name"] for d in interp.get_output_details()}
    tensors: dict[str, tuple[int, float, float]] = {}
    for t in interp.get_tensor_details():
        qsv = qsvs.get(t["name"])
        if qsv is None or t["name"] in boundary or t["dtype"] != np.float32:
            continue
        lo, hi = float(np.min(qsv["min"])), float(np.max(qsv["max"]))
        if np.size(qsv["min"]) == 1 and hi > lo:
            tensors[t["name"]] = (int(t["index"]), min(lo, 0.0), max(hi, 0.0))
    hists = {name: np.zeros(_BINS, dtype=np.float64) for name in tensors}
    sums = {name: [0.0, 0.0, 0] for name in tensors}
    for feed in dataset[:_HIST_SAMPLES]:
        runner(**feed)
        for name, (index, lo, hi) in tensors.items():
            try:
                v = interp.get_tensor(index).ravel()
            except ValueError:  # tensor freed by the runtime despite preserve_all_tensors: keep min/max
                continue
            if how == "minmax-mean":
                acc = sums[name]
                acc[0], acc[1], acc[2] = acc[0] + float(v.min()), acc[1] + float(v.max()), acc[2] + 1
                continue
            idx = np.clip(((v - lo) * (_BINS / (hi - lo))).astype(np.int64), 0, _BINS - 1)
            hists[name] += np.bincount(idx, minlength=_BINS)
    narrowed = 0
    for name, (_, lo, hi) in tensors.items():
        if how == "minmax-mean":
            acc = sums[name]
            if not acc[2]:
                continue
            new_lo, new_hi = min(acc[0] / acc[2], 0.0), max(acc[1] / acc[2], 0.0)
        elif not hists[name].any():
            continue
        else:
            new_lo, new_hi = _best_range(hists[name], lo, hi, 2 ** bits)
        if (new_lo, new_hi) != (lo, hi):
            narrowed += 1
        qsv = qsvs[name]
        qsv["min"] = np.full_like(np.asarray(qsv["min"], dtype=np.float32), new_lo)
        qsv["max"] = np.full_like(np.asarray(qsv["max"], dtype=np.float32), new_hi)
    return narrowed


def buffer_uses(subgraph: Any) -> dict[int, int]:
    """How many op inputs read each buffer of a flatbuffer ``subgraph`` object (a buffer read once can be
    rewritten without touching another op)."""
    uses: dict[int, int] = {}
    for op in subgraph.operators:
        for i in op.inputs:
            if i >= 0:
                uses[subgraph.tensors[i].buffer] = uses.get(subgraph.tensors[i].buffer, 0) + 1
    return uses


def bias_correct(float_model: bytes, dataset: list[dict[str, np.ndarray]], key: str,
                 samples: int = _BC_SAMPLES, keep_float: list[str] | tuple[str, ...] = ()) -> tuple[bytes, int]:
    """Fast bias correction (as NNCF does by default): the fp32 model with each convolution / fully connected
    bias shifted by minus the mean output error its int8 weights will add, ``(Q(W) - W) . E[x]``, where ``Q`` is
    the quantizer's per-channel symmetric rounding (scale max|w| / 127) and ``E[x]`` the mean input per channel
    over ``samples`` calibration inputs of the fp32 model. The quantizer then rounds the weights as before; the
    rounding's average effect on every output channel is cancelled. Ops whose scope is in ``keep_float`` (left in
    float by the quantizer) are not touched. Returns (model, layers corrected)."""
    litert = require("ai_edge_litert.interpreter", "tflite", "int8 quantization of .tflite files")
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    interp = litert.Interpreter(model_content=float_model, num_threads=1, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    runner = interp.get_signature_runner(key)
    names = {int(t["index"]): t["name"] for t in interp.get_tensor_details()}
    skip = set(keep_float)
    ops = [(k, op) for k, op in enumerate(interp._get_ops_details())  # the public API lists no ops
           if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op["inputs"]) > 2
           and int(op["inputs"][2]) >= 0 and _scope(op, names) not in skip]
    sums: dict[int, np.ndarray] = {}
    for feed in dataset[:samples]:
        runner(**feed)
        for k, op in ops:
            try:
                x = interp.get_tensor(int(op["inputs"][0]))
            except ValueError:  # freed despite preserve_all_tensors: this layer is left as it is
                continue
            if x.dtype.kind == "f" and x.ndim >= 1:
                sums[k] = sums.get(k, 0) + x.reshape(-1, x.shape[-1]).astype(np.float64).mean(0)
    n = max(1, min(samples, len(dataset)))
    m = fb.read_model_from_bytearray(bytearray(float_model))
    sg = m.subgraphs[0]
    uses = buffer_uses(sg)
    done = 0
    for k, op in ops:
        fop = sg.operators[k] if k < len(sg.operators) else None
        if k not in sums or fop is None or [int(i) for i in fop.inputs] != [int(i) for i in op["inputs"]]:
            continue
        wt, bt = sg.tensors[fop.inputs[1]], sg.tensors[fop.inputs[2]]
        wbuf, bbuf = m.buffers[wt.buffer], m.buffers[bt.buffer]
        if (wt.type != 0 or bt.type != 0 or wbuf.data is None or bbuf.data is None or uses.get(bt.buffer, 0) != 1
                or not len(wbuf.data) or not len(bbuf.data)):  # 0 = FLOAT32; shared or external buffers stay
            continue
        w = np.frombuffer(bytes(wbuf.data), np.float32).reshape(list(wt.shape)).astype(np.float64)
        b = np.frombuffer(bytes(bbuf.data), np.float32).astype(np.float64)
        mean_x = sums[k] / n
        axis = 3 if op["op_name"] == "DEPTHWISE_CONV_2D" else 0
        wm = np.moveaxis(w, axis, 0)
        scale = np.abs(wm).reshape(wm.shape[0], -1).max(1) / 127
        scale[scale == 0] = 1.0
        err = np.clip(np.round(wm / scale.reshape(-1, *[1] * (wm.ndim - 1))), -127, 127) \
            * scale.reshape(-1, *[1] * (wm.ndim - 1)) - wm
        if op["op_name"] == "DEPTHWISE_CONV_2D":  # (C*mult, kh, kw, 1): channel c reads input c // mult
            mult = max(1, err.shape[0] // mean_x.size)
            shift = err.reshape(err.shape[0], -1).sum(1) * np.repeat(mean_x, mult)[:err.shape[0]]
        else:  # CONV_2D (Cout, kh, kw, Cin) / FULLY_CONNECTED (Cout, Cin)
            cin = err.shape[-1]
            if mean_x.size != cin:
                continue
            shift = err.reshape(err.shape[0], -1, cin).sum(1) @ mean_x
        if shift.shape != b.shape:
            continue
        bbuf.data = np.frombuffer((b - shift).astype(np.float32).tobytes(), np.uint8)
        done += 1
    return bytes(fb.convert_object_to_bytearray(m)), done


def _ops(path: Path) -> tuple[list[dict[str, Any]], dict[int, str], set[int]]:
    """(ops in execution order, tensor names by index, constant tensor indices) of a .tflite file."""
    litert = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    interp = litert.Interpreter(model_path=str(path))
    names = {int(t["index"]): t["name"] for t in interp.get_tensor_details()}
    inputs = {int(d["index"]) for d in interp.get_input_details()}
    ops = list(interp._get_ops_details())  # the public API lists no ops
    produced = {int(i) for op in ops for i in op["outputs"]}
    constants = {i for i in names if i not in produced and i not in inputs}
    return ops, names, constants


def _scope(op: dict[str, Any], names: dict[int, str]) -> str:
    """The AI Edge Quantizer's scope of an op: its output tensor names, each followed by ';'."""
    return "".join(f"{names[int(i)]};" for i in op["outputs"] if int(i) >= 0 and names.get(int(i)))


def weighted_ops(path: Path) -> list[str]:
    """The op name of every convolution / fully connected op of ``path``, in execution order."""
    return [op["op_name"] for op in _ops(path)[0] if op["op_name"] in _WEIGHTED_OPS]


def layer_scopes(path: Path, layers: list[int]) -> list[str]:
    """Scopes of the weighted ops ``layers`` (indices into :func:`weighted_ops`) themselves."""
    ops, names, _ = _ops(path)
    weighted = [k for k, op in enumerate(ops) if op["op_name"] in _WEIGHTED_OPS]
    return [_scope(ops[weighted[i]], names) for i in layers]


def float_scopes_for(path: Path, layers: list[int]) -> list[str]:
    """Scopes of the ops to keep in float so that the weighted ops ``layers`` (indices into :func:`weighted_ops`)
    compute in float on a float input: each of them, the ops between it and the weighted op(s) feeding it, and those
    feeding ops (a quantized op rounds its own output, so the feeder must stay float too)."""
    ops, names, constants = _ops(path)
    weighted = [k for k, op in enumerate(ops) if op["op_name"] in _WEIGHTED_OPS]
    producer = {int(i): k for k, op in enumerate(ops) for i in op["outputs"]}
    keep: list[int] = []
    for layer in layers:
        k = weighted[layer]
        keep.append(k)
        stack = [int(i) for i in ops[k]["inputs"][:1] if int(i) not in constants]
        seen: set[int] = set()
        while stack:
            j = producer.get(stack.pop())
            if j is None or j in seen:
                continue
            seen.add(j)
            keep.append(j)
            if ops[j]["op_name"] not in _WEIGHTED_OPS:
                stack.extend(int(i) for i in ops[j]["inputs"] if int(i) >= 0 and int(i) not in constants)
    return [sc for sc in dict.fromkeys(_scope(ops[k], names) for k in keep) if sc]


_HEAD_PASS = frozenset({"RESHAPE", "SOFTMAX", "LOGISTIC", "TRANSPOSE", "SQUEEZE", "DEQUANTIZE", "QUANTIZE"})


def head_scopes(path: Path) -> tuple[list[str], list[str]]:
    """(weighted op scopes, other op scopes) of the model's head: each weighted op whose output reaches a graph
    output through reshapes / softmax / sigmoid only, and those ops. Computing them in float keeps the outputs
    (e.g. classifier logits) from being rounded to 256 levels, which flips near-tied top-1 decisions."""
    ops, names, _ = _ops(path)
    litert = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    outs = [int(d["index"]) for d in litert.Interpreter(model_path=str(path)).get_output_details()]
    producer = {int(i): k for k, op in enumerate(ops) for i in op["outputs"]}
    weighted: list[int] = []
    passing: list[int] = []
    for t in outs:
        chain: list[int] = []
        k = producer.get(t)
        while k is not None and ops[k]["op_name"] in _HEAD_PASS:
            chain.append(k)
            k = producer.get(int(ops[k]["inputs"][0]))
        if k is not None and ops[k]["op_name"] in _WEIGHTED_OPS:
            weighted.append(k)
            passing.extend(chain)
    return ([sc for sc in dict.fromkeys(_scope(ops[k], names) for k in weighted) if sc],
            [sc for sc in dict.fromkeys(_scope(ops[k], names) for k in passing) if sc])


def float_boundary(model: bytes) -> bytes:
    """``model`` with float32 inputs / outputs where the graph computes in float at its boundary: an integer input
    read only by a DEQUANTIZE becomes that DEQUANTIZE's float output, an integer output written by a QUANTIZE of a
    float tensor becomes that float tensor (the pair would only round the input / output to 8 bits)."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "editing .tflite files")
    m = fb.read_model_from_bytearray(bytearray(model))
    sg = m.subgraphs[0]
    codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
    quantize, dequantize = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE
    readers: dict[int, list[Any]] = {}
    for op in sg.operators:
        for i in op.inputs:
            readers.setdefault(int(i), []).append(op)
    remap: dict[int, int] = {}
    drop: list[Any] = []
    for pos, idx in enumerate(list(sg.inputs)):
        ops = readers.get(int(idx), [])
        if len(ops) == 1 and codes[ops[0].opcodeIndex] == dequantize and idx not in sg.outputs:
            remap[int(idx)] = int(ops[0].outputs[0])
            sg.inputs[pos] = ops[0].outputs[0]
            drop.append(ops[0])
    writer = {int(o): op for op in sg.operators for o in op.outputs}
    for pos, idx in enumerate(list(sg.outputs)):
        op = writer.get(int(idx))
        if op is not None and codes[op.opcodeIndex] == quantize and len(readers.get(int(idx), [])) == 0 \
                and sg.tensors[op.inputs[0]].type == schema.TensorType.FLOAT32:
            remap[int(idx)] = int(op.inputs[0])
            sg.outputs[pos] = op.inputs[0]
            drop.append(op)
    if not drop:
        return model
    sg.operators = [op for op in sg.operators if all(op is not d for d in drop)]
    for sig in m.signatureDefs or []:
        for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    return bytes(fb.convert_object_to_bytearray(m))


def quantize_tflite(float_path: Path, out: Path, arrays: list[np.ndarray], source_inputs: list[str], *,
                    activation_bits: int = 8, int8_io: bool = True, threads: int = 1,
                    float_scopes: list[str] | tuple[str, ...] = (), ranges: str = "histogram",
                    bias_correction: bool = False, weight_only_scopes: list[str] | tuple[str, ...] = (),
                    float_edges: bool = False, full_bias_correction_against: Path | None = None) -> QuantizeResult:
    """Quantize the fp32 ``float_path`` into ``out`` (a fully integer graph) with the AI Edge Quantizer.

    ``arrays``: calibration samples per source input (N, ...), batch-1 rows; ``activation_bits``: 8 (int8
    static) or 16 (int16 activations, int8 weights); ``float_scopes``: ops (their quantizer scopes,
    :func:`float_scopes_for`) left in float, the mixed-precision rung of the accuracy budget;
    ``weight_only_scopes``: ops computed in float from int8 weights (:func:`head_scopes`); ``float_edges``: float
    inputs / outputs where the graph's boundary ops compute in float (:func:`float_boundary`);
    ``full_bias_correction_against``: the fp32 .tflite the int8 biases are corrected against, measured on the
    int8 model (converters/tflite_bias_correction.py). Raises
    ConversionError (one line) when the quantizer fails, so callers can fall back to their own int8 path and
    record why.
    """
    if activation_bits not in _RECIPES:
        raise ConversionError(f"activation_bits {activation_bits} is not supported: use 8 or 16")
    if ranges not in _RANGES:
        raise ConversionError(f"tflite_ranges {ranges!r} is not supported: use {' or '.join(_RANGES)}")
    aeq = require("ai_edge_quantizer.quantizer", "tflite", "full-integer TFLite quantization")
    recipe = require("ai_edge_quantizer.recipe", "tflite", "full-integer TFLite quantization")
    calibrator = require("ai_edge_quantizer.calibrator", "tflite", "full-integer TFLite quantization")
    qsv_utils = require("ai_edge_quantizer.utils.qsv_utils", "tflite", "full-integer TFLite quantization")
    litert = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    from edge_sdk.converters.tflite_activations import aeq_quantizable

    float_model = Path(float_path).read_bytes()
    try:
        float_model, rewritten = aeq_quantizable(float_model, activation_bits)
    except Exception:  # a graph the rewrite does not understand: the quantizer gets it as it is
        rewritten = {}
    n = int(arrays[0].shape[0])
    try:
        if not litert.Interpreter(model_content=float_model).get_signature_list():
            float_model = _with_signature(float_model)  # onnx2tf writes none; the quantizer calibrates by signature
        key, names = _signature(litert.Interpreter(model_content=float_model))
        order = _feed_order(names, list(source_inputs))
        data = _dataset(key, names, order, arrays, n)
        corrected = 0
        if bias_correction:
            float_model, corrected = bias_correct(float_model, data[key], key, keep_float=float_scopes)
        rec = recipe.static_wi8_ai16() if activation_bits == 16 else recipe.static_wi8_ai8()
        if float_scopes or weight_only_scopes:
            manager = require("ai_edge_quantizer.recipe_manager", "tflite", "full-integer TFLite quantization")
            rm = manager.RecipeManager()
            rm.load_quantization_recipe(rec)
            for sc in float_scopes:  # the last matching entry wins: these come after the ".*" one
                rm.add_quantization_config(f"^{re.escape(sc)}$", "*", None, "no_quantize")
            for sc in weight_only_scopes:
                rm.add_weight_only_config(f"^{re.escape(sc)}$", "*", 8)
            rec = rm.get_quantization_recipe()
        q = aeq.Quantizer(float_model, rec)
        # quiet: the quantizer prints tqdm bars and a size report; keep the CLI output ours
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            calib = calibrator.Calibrator(float_model, num_threads=threads, qsv_update_func=qsv_utils.min_max_update)
            calib.calibrate(data, q._recipe_manager)  # the public calibrate() forces the moving-average update
            qsvs = calib.get_model_qsvs()
            narrowed = _narrow_ranges(float_model, qsvs, data[key], key, activation_bits, ranges)
            result = q.quantize(qsvs, enable_progress_report=False)
    except ConversionError:
        raise
    except Exception as exc:  # the quantizer raises plain ValueError/RuntimeError/KeyError on unsupported graphs
        raise ConversionError(f"the AI Edge Quantizer could not quantize the model ({type(exc).__name__}: "
                              f"{first_line(exc, 200)})") from None
    model = bytes(result.quantized_model)
    full = ""
    if full_bias_correction_against is not None:
        from edge_sdk.converters.tflite_bias_correction import full_bias_correction

        try:
            reference = Path(full_bias_correction_against).read_bytes()
            if not litert.Interpreter(model_content=reference).get_signature_list():
                reference = _with_signature(reference)
            model, kept, tried = full_bias_correction(model, reference, key, data[key])
        except Exception as exc:  # the interpreter's own errors: the uncorrected model is kept, and said so
            full = f"; full bias correction failed ({first_line(exc, 120)})"
        else:
            full = f"; biases of {kept} of {tried} int8 layers corrected on the int8 model"
    io_bits = "int16" if activation_bits == 16 else "int8"
    # the quantizer stores weights after the flatbuffer (buffer offsets); tools that re-serialize a model (the
    # TFLite metadata writer) break those offsets, so the file is repacked with inline buffers
    if float_edges:
        model = float_boundary(model)
    out.write_bytes(float_io(model) if not int8_io else _repack(model))
    res = QuantizeResult(_RECIPES[activation_bits], n, _RANGES[ranges], narrowed)
    what = "int16 activations, int8 per-channel weights" if activation_bits == 16 else \
        "int8 activations, int8 per-channel weights"
    if float_scopes:
        what += f"; {len(float_scopes)} ops kept in float"
    if weight_only_scopes:
        what += f"; {len(weight_only_scopes)} ops computed in float from int8 weights"
    what += full
    if bias_correction:
        what += f"; biases of {corrected} layers corrected for the int8 weights' mean error"
    if rewritten:
        what += "; " + ", ".join(f"{k} {name}" for name, k in sorted(rewritten.items())) + \
            " rewritten as MUL / ADD with fused RELU6 first (the quantizer has no kernel for them)"
    res.notes.append(f"AI Edge Quantizer static {_RECIPES[activation_bits]} ({what}), calibrated on {n} samples "
                     f"({_RANGES[ranges]} of {narrowed} inner activations); "
                     + ("mixed int8 / float graph; " if float_scopes else "fully integer graph; ")
                     + (f"{io_bits} inputs/outputs" if int8_io else "float32 inputs/outputs (QUANTIZE/DEQUANTIZE "
                        "at the graph boundary)"))
    return res


def _with_signature(model: bytes) -> bytes:
    """``model`` with a ``serving_default`` signature naming the graph inputs/outputs by their tensor names."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "editing .tflite files")
    m = fb.read_model_from_bytearray(bytearray(model))
    sg = m.subgraphs[0]

    def tensor_map(idx: int) -> Any:
        tm = schema.TensorMapT()
        name = sg.tensors[idx].name
        tm.name, tm.tensorIndex = name.decode() if isinstance(name, bytes) else name, idx
        return tm

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs = [tensor_map(i) for i in sg.inputs]
    sig.outputs = [tensor_map(i) for i in sg.outputs]
    m.signatureDefs = [sig]
    return bytes(fb.convert_object_to_bytearray(m))


def _repack(model: bytes) -> bytes:
    """``model`` as a plain flatbuffer with every buffer inline (no offsets past the end of the flatbuffer)."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    return bytes(fb.convert_object_to_bytearray(fb.read_model_from_bytearray(bytearray(model))))


def float_io(model: bytes) -> bytes:
    """``model`` with float32 graph inputs/outputs: a QUANTIZE op feeds each quantized input, a DEQUANTIZE op
    follows each quantized output (signature tensors are re-pointed at the new float tensors)."""
    from edge_sdk.converters.tflite_activations import opcode_index

    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "editing .tflite files")
    m = fb.read_model_from_bytearray(bytearray(model))
    sg = m.subgraphs[0]

    def float_twin(idx: int, suffix: str) -> int:
        t = sg.tensors[idx]
        f = schema.TensorT()
        f.shape, f.shapeSignature, f.type = t.shape, t.shapeSignature, schema.TensorType.FLOAT32
        f.name = (t.name.decode() if isinstance(t.name, bytes) else t.name) + suffix
        buf = schema.BufferT()
        m.buffers.append(buf)
        f.buffer = len(m.buffers) - 1
        sg.tensors.append(f)
        return len(sg.tensors) - 1

    remap: dict[int, int] = {}
    quantized = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)
    def fence(ids: Any, kind: int, inbound: bool) -> list[Any]:
        """A QUANTIZE (inputs) / DEQUANTIZE (outputs) op between each integer graph-boundary tensor and a float twin."""
        ops = []
        for pos, idx in enumerate(list(ids)):
            if sg.tensors[idx].type in quantized:
                f = float_twin(idx, "_float")
                op = schema.OperatorT()
                op.opcodeIndex = opcode_index(m, schema, kind)
                op.inputs, op.outputs = ([f], [idx]) if inbound else ([idx], [f])
                ops.append(op)
                ids[pos] = f
                remap[idx] = f
        return ops

    front = fence(sg.inputs, schema.BuiltinOperator.QUANTIZE, True)
    back = fence(sg.outputs, schema.BuiltinOperator.DEQUANTIZE, False)
    sg.operators = [*front, *sg.operators, *back]
    for sig in m.signatureDefs or []:
        for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    return bytes(fb.convert_object_to_bytearray(m))


def float_ops(path: Path) -> list[str]:
    """Ops of ``path`` that compute in float (a float32 tensor among their inputs/outputs), except the QUANTIZE
    of a graph input and the DEQUANTIZE of a graph output (float I/O): empty for a fully integer graph."""
    litert = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    interp = litert.Interpreter(model_path=str(path))
    dtypes = {int(t["index"]): t["dtype"] for t in interp.get_tensor_details()}
    ins = {int(d["index"]) for d in interp.get_input_details()}
    outs = {int(d["index"]) for d in interp.get_output_details()}
    found = []
    for op in interp._get_ops_details():  # the public API has no op listing
        tensors = [int(i) for i in [*op["inputs"], *op["outputs"]] if i >= 0]
        if op["op_name"] == "QUANTIZE" and set(int(i) for i in op["inputs"]) <= ins:
            continue
        if op["op_name"] == "DEQUANTIZE" and set(int(i) for i in op["outputs"]) <= outs:
            continue
        if any(dtypes.get(i) in (np.float32, np.float16) for i in tensors):
            found.append(op["op_name"])
    return found
