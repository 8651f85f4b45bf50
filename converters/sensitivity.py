"""Per-layer quantization sensitivity of an ONNX model, measured on calibration data.

A plain int8 QDQ copy is made with ONNX Runtime's quantizer (the same pre-processed graph, so the tensor names
match). A layer's score is what int8 does to the **model's outputs** when that layer alone is int8: the fp32
graph runs with only this layer's input rounded (the scale and zero point the quantizer chose) and its weight
rounded (the quantizer's int8 weight), and the normalised squared error of every output against fp32 is summed.
The layers with the largest scores are the ones worth keeping in float.

An earlier score, the growth of the error across the layer (``nmse(layer output) - nmse(layer input)``, both in
the fully int8 copy), is kept as :attr:`LayerSensitivity.growth` but no longer ranks: it cannot see that an
early layer's error is amplified by everything after it. On ImageNet MobileNetV2 (240 photo crops, NNCF int8 on
ONNX Runtime, top-1 agreement with fp32) it ranked five late projection convolutions first, and keeping the top
8 in float gave 90.8%; the stem (the first three convolutions) was never picked, yet keeping it and three late
layers in float gives 95.8% — the output score ranks exactly those first.

Keeping a layer in float means excluding it, the layout/activation ops between it and the weighted layer
that feeds it, and that feeding layer (so the tensor between them is never rounded to 8 bits) from
quantization: :attr:`LayerSensitivity.float_nodes`. Frameworks are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConvertOptions
from edge_sdk.converters.onnx_probe import dequantized_value
from edge_sdk.converters.onnx_qdq_backends import feed_array
from edge_sdk.errors import ConversionError

__all__ = ["LayerSensitivity", "float_nodes_for", "rank_onnx_layers"]

_OUTPUT_RUNS = 4096  # model runs for the output scores, over all layers
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ops that do not change which values a tensor holds much: walked through to find the feeding layer
_PASS_THROUGH = frozenset({"Relu", "Clip", "MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Identity",
                           "Squeeze", "Unsqueeze", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "HardSigmoid",
                           "HardSwish", "Mul", "Add", "Concat", "Resize", "Pad", "BatchNormalization"})


@dataclass(frozen=True)
class LayerSensitivity:
    """One weighted layer and its measured contribution to the int8 error."""

    node: str
    op_type: str
    score: float  # normalised squared error of the model outputs when only this layer is int8
    output_nmse: float  # of this layer's output in the fully int8 copy
    float_nodes: tuple[str, ...] = field(default=())  # nodes to exclude from ORT quantization to keep it float
    input_nodes: tuple[str, ...] = field(default=())  # the layer and the ops in front of it (NNCF: inputs only)
    outputs: tuple[str, ...] = field(default=())  # output tensor names of input_nodes (OpenVINO names ops so)
    growth: float = 0.0  # growth of the normalised squared error across this layer in the fully int8 copy
    index: int = -1  # position among the graph's Conv / ConvTranspose / Gemm / MatMul nodes, in graph order ...
    of: int = 0  # ... of this many (how other formats' converters find the same layer: tflite_float_layers)


def _nmse(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64).ravel()
    got = got.astype(np.float64).ravel()
    denom = float(ref @ ref)
    return float(((ref - got) ** 2).sum() / denom) if denom > 0 else 0.0


def _feeding_chain(node: Any, producer: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The pass-through nodes between ``node`` and the node(s) feeding its data input that do real work;
    and those feeding nodes."""
    chain: list[str] = []
    feeders: list[str] = []
    stack = [node.input[0]] if node.input else []
    seen: set[str] = set()
    while stack:
        p = producer.get(stack.pop())
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        if p.op_type in _PASS_THROUGH:
            chain.append(p.name)
            stack.extend(x for x in p.input if x in producer)
        else:
            feeders.append(p.name)
    return chain, feeders


def float_nodes_for(ranked: list[LayerSensitivity], k: int, attr: str = "float_nodes") -> list[str]:
    """The union of the nodes (``attr``: float_nodes, input_nodes or outputs) for the ``k`` most sensitive
    layers (order kept)."""
    out: list[str] = []
    for layer in ranked[:k]:
        out.extend(n for n in getattr(layer, attr) if n not in out)
    return out


def _with_outputs(model: Any, names: list[str]) -> bytes:
    onnx = require("onnx", "onnx", "quantization sensitivity analysis")
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _run_all(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, list]:
    ort = require("onnxruntime", "onnx", "quantization sensitivity analysis")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    out: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed), strict=True):
            out[n].append(np.asarray(v, np.float32))
    return out


def _run_outputs(model_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every float graph output of the model over ``feeds``, concatenated per output."""
    ort = require("onnxruntime", "onnx", "quantization sensitivity analysis")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # the float weights a rounded copy replaced are unused: no warning for each
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    runs = [sess.run(None, feed) for feed in feeds]
    return [np.concatenate([np.asarray(r[i], np.float32).reshape(1, -1) for r in runs])
            for i in range(len(runs[0])) if np.issubdtype(np.asarray(runs[0][i]).dtype, np.floating)]


def _only_layer_int8(onnx: Any, fp: Any, q: Any, name: str) -> bytes | None:
    """The fp32 graph with only node ``name`` int8, as the quantized copy ``q`` has it: its activation inputs get
    that copy's QuantizeLinear -> DequantizeLinear pair, its constant inputs (weights, bias) the rounded values.
    None when the copy rounds nothing of this node."""
    q_producer = {o: n for n in q.graph.node for o in n.output}
    q_inits = {i.name: i for i in q.graph.initializer}
    qn = next((n for n in q.graph.node if n.name == name), None)
    m = onnx.ModelProto()
    m.CopyFrom(fp)
    at = next((i for i, n in enumerate(m.graph.node) if n.name == name), None)
    if qn is None or at is None:
        return None
    node, added, changed = m.graph.node[at], [], False
    for k, qin in enumerate(qn.input):
        dq = q_producer.get(qin)
        if k >= len(node.input) or dq is None or dq.op_type != "DequantizeLinear":
            continue
        values = dequantized_value(dq, q_inits)
        if values is not None:  # a rounded weight / bias: a private copy, so layers sharing it stay float
            fresh = f"{node.input[k]}__int8_alone"
            m.graph.initializer.append(onnx.numpy_helper.from_array(values.astype(np.float32), fresh))
            node.input[k], changed = fresh, True
            continue
        qq = q_producer.get(dq.input[0])
        if qq is None or qq.op_type != "QuantizeLinear":
            continue
        params = [p for p in qq.input[1:] if p]
        if not all(p in q_inits for p in params):
            continue
        fresh = [f"{p}__alone{k}" for p in params]
        for p, f in zip(params, fresh, strict=True):
            t = onnx.TensorProto()
            t.CopyFrom(q_inits[p])
            t.name = f
            m.graph.initializer.append(t)
        src, qt, dqt = node.input[k], f"{node.input[k]}__q_alone{k}", f"{node.input[k]}__dq_alone{k}"
        added += [onnx.helper.make_node("QuantizeLinear", [src, *fresh], [qt], name=f"{name}__q_alone{k}"),
                  onnx.helper.make_node("DequantizeLinear", [qt, *fresh], [dqt], name=f"{name}__dq_alone{k}")]
        node.input[k], changed = dqt, True
    if not changed:
        return None
    for offset, n in enumerate(added):
        m.graph.node.insert(at + offset, n)
    return m.SerializeToString()


def rank_onnx_layers(fp32_path: Path, samples: SampleSet, input_names: list[str], workdir: Path,
                     options: ConvertOptions, *, max_samples: int = 32) -> list[LayerSensitivity]:
    """Rank the weighted layers of ``fp32_path`` by the int8 error they add, most sensitive first.

    Node names are those of the quantization pre-processed graph, which is what ``nodes_to_exclude`` (ORT)
    and NNCF's ignored scope see.
    """
    from edge_sdk.converters.onnx_quantize import _ort_qdq, _pre_process

    onnx = require("onnx", "onnx", "quantization sensitivity analysis")
    workdir.mkdir(parents=True, exist_ok=True)
    qpath = workdir / "sensitivity.int8.onnx"
    pre = _pre_process(fp32_path, qpath)
    plain = replace(options, extra={k: v for k, v in options.extra.items()
                                    if k in ("onnx_calibration", "onnx_calib_percentile")})
    _ort_qdq(pre, qpath, samples, input_names, plain, "uint8", [])
    fp = onnx.load(str(pre))
    q = onnx.load(str(qpath))
    fp_tensors = {o for n in fp.graph.node for o in n.output} | {i.name for i in fp.graph.input}
    producer = {o: n for n in fp.graph.node for o in n.output}
    q_producer = {o: n for n in q.graph.node for o in n.output}
    q_consumer = {x: n for n in q.graph.node for x in n.input}
    q_nodes = {n.name: n for n in q.graph.node}
    pairs: dict[str, tuple[str, str, str, str]] = {}  # node -> (fp input, q input, fp output, q output)
    for n in fp.graph.node:
        qn = q_nodes.get(n.name)
        if n.op_type not in _WEIGHTED or not n.name or not n.input or qn is None:
            continue
        # compare what the next layers read: after this layer's output Quantize/Dequantize (which also applies
        # a ReLU that ORT folded away), against the fp32 tensor of that name
        q_out = fp_out = qn.output[0]
        qq = q_consumer.get(q_out)
        if qq is not None and qq.op_type == "QuantizeLinear":
            dq = q_consumer.get(qq.output[0])
            if dq is not None and dq.op_type == "DequantizeLinear":
                q_out = dq.output[0]
        if fp_out not in fp_tensors:
            fp_out = n.output[0]
        q_in = fp_in = qn.input[0]
        dq = q_producer.get(q_in)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in q_producer:
            fp_in = q_producer[dq.input[0]].input[0]
        if fp_in not in fp_tensors:
            fp_in = n.input[0]
        pairs[n.name] = (fp_in, q_in, fp_out, q_out)
    weighted = [n for n in fp.graph.node if n.name in pairs]
    if not weighted:
        raise ConversionError("found no weighted layer (Conv/Gemm/MatMul) to rank for mixed precision: "
                              "use the fp16 fallback")
    fp_names = list(dict.fromkeys(t for v in pairs.values() for t in (v[0], v[2])))
    q_names = list(dict.fromkeys(t for v in pairs.values() for t in (v[1], v[3])))
    take = samples.take(max_samples)
    feeds = [{n: feed_array(x) for n, x in zip(input_names, item, strict=True)} for item in take]
    fp_bytes = fp.SerializeToString()  # before _with_outputs adds every inner tensor to the graph outputs
    ref = _run_all(_with_outputs(fp, fp_names), feeds, fp_names)
    got = _run_all(_with_outputs(q, q_names), feeds, q_names)

    def nmse(fp_t: str, q_t: str) -> float:
        return _nmse(np.concatenate(ref[fp_t]), np.concatenate(got[q_t]))

    pre.unlink(missing_ok=True)
    # output score: the model with one layer int8 at a time; fewer samples for many layers (about 4k runs at most)
    out_feeds = feeds[:max(4, min(len(feeds), _OUTPUT_RUNS // len(weighted)))]
    fp = onnx.load_from_string(fp_bytes)
    ref_out = _run_outputs(fp_bytes, out_feeds)
    by_name = {n.name: n for n in fp.graph.node}
    order = [n.name for n in fp.graph.node if n.op_type in _WEIGHTED]
    ranked = []
    for n in weighted:
        fp_in, q_in, fp_out, q_out = pairs[n.name]
        e_in, e_out = nmse(fp_in, q_in), nmse(fp_out, q_out)
        alone = _only_layer_int8(onnx, fp, q, n.name)
        score = 0.0 if alone is None else sum(
            _nmse(r, g) for r, g in zip(ref_out, _run_outputs(alone, out_feeds), strict=True))
        chain, feeders = _feeding_chain(n, producer)
        ins = (n.name, *chain)
        ranked.append(LayerSensitivity(n.name, n.op_type, score, e_out, (*ins, *feeders), ins,
                                       tuple(o for x in ins for o in by_name[x].output), growth=e_out - e_in,
                                       index=order.index(n.name), of=len(order)))
    return sorted(ranked, key=lambda s: -s.score)
