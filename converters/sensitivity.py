"""Per-layer quantization sensitivity of an ONNX model, measured on calibration data.

The fp32 model and a plain int8 QDQ copy (ONNX Runtime's quantizer, the same pre-processed graph, so the
tensor names match) run side by side with every weighted layer's input and output exposed. A layer's
score is how much the relative error against fp32 grows across it: ``nmse(output) - nmse(input)``, where
the input is taken before its own quantization. Quantizing that layer's input (and weights) is what adds
the score, so the layers with the largest scores are the ones worth keeping in float.

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
from edge_sdk.converters.onnx_qdq_backends import feed_array
from edge_sdk.errors import ConversionError

__all__ = ["LayerSensitivity", "float_nodes_for", "rank_onnx_layers"]

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
    score: float  # growth of the normalised squared error across this layer
    output_nmse: float
    float_nodes: tuple[str, ...] = field(default=())  # nodes to exclude from ORT quantization to keep it float
    input_nodes: tuple[str, ...] = field(default=())  # the layer and the ops in front of it (NNCF: inputs only)
    outputs: tuple[str, ...] = field(default=())  # output tensor names of input_nodes (OpenVINO names ops so)


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
    ref = _run_all(_with_outputs(fp, fp_names), feeds, fp_names)
    got = _run_all(_with_outputs(q, q_names), feeds, q_names)

    def nmse(fp_t: str, q_t: str) -> float:
        return _nmse(np.concatenate(ref[fp_t]), np.concatenate(got[q_t]))

    pre.unlink(missing_ok=True)
    by_name = {n.name: n for n in fp.graph.node}
    ranked = []
    for n in weighted:
        fp_in, q_in, fp_out, q_out = pairs[n.name]
        e_in, e_out = nmse(fp_in, q_in), nmse(fp_out, q_out)
        chain, feeders = _feeding_chain(n, producer)
        ins = (n.name, *chain)
        ranked.append(LayerSensitivity(n.name, n.op_type, e_out - e_in, e_out, (*ins, *feeders), ins,
                                       tuple(o for x in ins for o in by_name[x].output)))
    return sorted(ranked, key=lambda s: -s.score)
