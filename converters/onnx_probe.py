"""Running part of an ONNX graph: the tensors a quantization pass needs to see, computed on calibration data.

Shared by the passes that read intermediate tensors (converters/onnx_bias_correction.py,
converters/onnx_qdq_fusion.py). Frameworks are imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sdk._deps import require

__all__ = ["dequantized_value", "has_subgraphs", "node_attr", "node_key", "only_outputs", "ort_session", "relay_nodes"]


def ort_session(model_bytes: bytes) -> Any:
    """A 1-thread CPU ONNX Runtime session of ``model_bytes``, its warnings silenced."""
    ort = require("onnxruntime", "onnx", "ONNX quantization")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def only_outputs(model: Any, names: list[str]) -> bytes:
    """``model`` with ``names`` as its only outputs (ONNX Runtime then runs only the nodes they need)."""
    onnx = require("onnx", "onnx", "ONNX quantization")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m.SerializeToString()


def dequantized_value(node: Any, inits: dict[str, Any]) -> np.ndarray | None:
    """The float64 values a DequantizeLinear of initializers gives, per tensor or along its ``axis``; None when
    ``node`` is not one or its inputs are not constants."""
    if node is None or node.op_type != "DequantizeLinear" or any(i not in inits for i in node.input if i):
        return None
    nh = require("onnx.numpy_helper", "onnx", "ONNX quantization")
    x = nh.to_array(inits[node.input[0]]).astype(np.float64)
    scale = nh.to_array(inits[node.input[1]]).astype(np.float64)
    zero = nh.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and x.ndim > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return (x - zero) * scale


def node_attr(node: Any, name: str, default: Any = None) -> Any:
    """The Python value of ``node``'s attribute ``name`` (``default`` when it has none)."""
    onnx = require("onnx", "onnx", "reading ONNX graphs")
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def has_subgraphs(graph: Any) -> bool:
    """Whether any node of ``graph`` carries a subgraph (If / Loop / Scan), which may read outer tensors by name."""
    return any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute)


def node_key(node: Any) -> str:
    """A node's first non-empty output name: unique in a valid graph (an optional first output may be "")."""
    return next((o for o in node.output if o), "")


def relay_nodes(graph: Any, before: dict[str, list[Any]], removed: set[tuple[str, str]] = frozenset()) -> None:
    """Re-lay ``graph.node`` in one pass (inserting into a repeated field one node at a time is quadratic): each
    node whose :func:`node_key` is a key of ``before`` gets those nodes (copied) right before it; a node whose
    ``(op_type, node_key)`` is in ``removed`` is dropped."""
    onnx = require("onnx", "onnx", "ONNX graph editing")
    ordered = []
    for node in graph.node:
        key = node_key(node)
        for extra in before.get(key, ()):
            copy = onnx.NodeProto()
            copy.CopyFrom(extra)
            ordered.append(copy)
        if (node.op_type, key) not in removed:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            ordered.append(copy)
    del graph.node[:]
    graph.node.extend(ordered)
