"""Hard-swish written out in elementary ops -> one ``HardSwish`` node, before ONNX int8 quantization.

Exporters that predate ONNX's ``HardSwish`` (opset 14), Paddle2ONNX among them, write ``x * relu6(x + 3) / 6`` as
Add -> Clip -> Mul -> Div (or ``x * HardSigmoid(x)``). In an int8 model those four float ops stay float between
the int8 layers, each a full pass over the activation: PP-OCRv4's recogniser has 28 of them, 6.7 ms of its
16 ms ONNX Runtime int8 run. One ``HardSwish`` node computes the same function (exactly, up to float rounding) in
one pass (graphs older than opset 14: ``HardSigmoid(x, 1/6, 0.5) * x``, two). The rewrite runs on the graph being
quantized only: the fp32 artifact stays the source as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.onnx_probe import has_subgraphs, node_attr, relay_nodes

__all__ = ["fuse_hard_swish"]


def _const(name: str, inits: dict[str, Any]) -> float | None:
    """The value of a one-element float initializer, or None."""
    t = inits.get(name)
    if t is None or int(np.prod(t.dims)) != 1:
        return None
    nh = require("onnx.numpy_helper", "onnx", "ONNX graph editing")
    return float(nh.to_array(t).reshape(()))


def _other(node: Any, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None when neither / both are)."""
    a, b = node.input[0], node.input[1]
    if a == name and b != name:
        return b
    if b == name and a != name:
        return a
    return None


def _near(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-6 * max(1.0, abs(want))


def _gate_input(gate: Any, producer: dict[str, Any], inits: dict[str, Any]) -> str | None:
    """``x`` when ``gate`` computes relu6(x + 3) / 6 (Clip(Add(x, 3), 0, 6) -- divided later) or HardSigmoid(x)
    with alpha 1/6, beta 0.5; None otherwise."""
    if gate.op_type == "HardSigmoid":
        alpha, beta = node_attr(gate, "alpha", 0.2), node_attr(gate, "beta", 0.5)
        return gate.input[0] if _near(alpha, 1 / 6) and _near(beta, 0.5) else None
    if gate.op_type != "Clip" or len(gate.input) < 3:
        return None
    if not (_near(_const(gate.input[1], inits), 0.0) and _near(_const(gate.input[2], inits), 6.0)):
        return None
    add = producer.get(gate.input[0])
    if add is None or add.op_type != "Add":
        return None
    for x, c in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        if _near(_const(c, inits), 3.0):
            return x
    return None


def _hard_swish(onnx: Any, x: str, out: str, name: str, native: bool) -> list[Any]:
    """``out = hardswish(x)``: one HardSwish (opset >= 14), else HardSigmoid(x, 1/6, 0.5) * x (opset 6)."""
    base = name or out
    if native:
        return [onnx.helper.make_node("HardSwish", [x], [out], name=f"{base}_hswish")]
    return [onnx.helper.make_node("HardSigmoid", [x], [f"{base}_hsigmoid"], name=f"{base}_hsigmoid",
                                  alpha=1 / 6, beta=0.5),
            onnx.helper.make_node("Mul", [x, f"{base}_hsigmoid"], [out], name=f"{base}_hswish")]


def fuse_hard_swish(model: Any, native: bool | None = None) -> int:
    """Rewrite each hard-swish pattern of ``model`` (an ``onnx.ModelProto``) into one ``HardSwish`` node (opset >= 14;
    older graphs get HardSigmoid * x, two ops, unless ``native`` asks for HardSwish anyway: a reader that is not
    bound by the opset, onnx2torch), in place; returns how many. The pattern's inner ops are removed when nothing
    else reads them."""
    onnx = require("onnx", "onnx", "ONNX graph editing")
    if native is None:
        native = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) >= 14
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def gated(mul: Any, gate_op: str) -> str | None:
        """``x`` when ``mul`` is ``x * gate(x)`` with a ``gate_op`` gate, in either operand order."""
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        for gate_name in mul.input:
            gate = producer.get(gate_name)
            x = _gate_input(gate, producer, inits) if gate is not None and gate.op_type == gate_op else None
            if x is not None and _other(mul, gate_name) == x:
                return x
        return None

    before: dict[str, list[Any]] = {}
    removed: set[tuple[str, str]] = set()
    for node in graph.node:
        x = None
        if node.op_type in ("Div", "Mul") and len(node.input) == 2:  # (x * relu6(x + 3)) / 6 or * 1/6
            scale = _const(node.input[1], inits)
            if _near(scale, 6.0 if node.op_type == "Div" else 1 / 6):
                x = gated(producer.get(node.input[0]), "Clip")
        if x is None and native:  # x * HardSigmoid(x): already two ops; one with HardSwish
            x = gated(node, "HardSigmoid")
        if x is not None:
            before[node.output[0]] = _hard_swish(onnx, x, node.output[0], node.name, native)
            removed.add((node.op_type, node.output[0]))
    if not before:
        return 0
    relay_nodes(graph, before, removed)
    if not has_subgraphs(graph):  # a subgraph may read an outer tensor by name: then ORT drops the dead ops
        _drop_dead(graph)
    return len(before)


def _drop_dead(graph: Any) -> None:
    """Remove nodes none of whose outputs is read (by a node or as a graph output), repeatedly."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if not n.output or any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)
