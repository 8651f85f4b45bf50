"""Multiplies and adds by constants right after a Conv folded into its weights and bias, before ONNX int8.

``Conv -> Mul(scale) -> Add(bias)`` with constant, per-output-channel (or one-element) operands is the same as one
Conv with ``W[o] * scale[o]`` and ``B[o] * scale[o] + bias[o]``: exactly, whatever the padding, because the affine
acts on the conv's output. ONNX Runtime's own Conv + Mul / Add fusions do not take them when the constant comes
first (``Mul(scale, x)``) or is a ``[1]`` tensor, and a quantizer puts its Q/DQ pair between the two first, so
they stay: PP-LCNetV3 (PP-OCRv4's recogniser backbone) follows each of its 38 convolutions with a learnable
``scale * x + bias``, two float passes over the activation between int8 layers. The rewrite runs on the graph
being quantized only: the fp32 artifact stays the source as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.onnx_probe import has_subgraphs, node_attr

__all__ = ["fold_conv_affine"]

_OPS = ("Mul", "Add", "Sub", "Div")


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as a [channels] vector when it broadcasts along the output channels of a rank-``rank`` conv output
    only (one element, or shape [C, 1, ...] / [1, C, 1, ...]); else None."""
    if value.ndim > rank or not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def _zero_pads(conv: Any) -> bool:
    """True when ``conv`` pads nothing (no ``pads`` but zeros, no SAME auto-padding)."""
    return not any(node_attr(conv, "pads", [])) and node_attr(conv, "auto_pad", b"NOTSET") in (b"", b"NOTSET", b"VALID")


def _conv_params(conv: Any, inits: dict[str, Any], nh: Any) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """(weights, bias, weight dtype) of a Conv whose weight (and bias, if any) are initializers, in float64 (a
    zero bias when it has none); None otherwise."""
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2 \
            or conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
        return None
    w = nh.to_array(inits[conv.input[1]])
    b = nh.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
        else np.zeros(w.shape[0])
    return w.astype(np.float64), b, w.dtype


def _set_conv_params(graph: Any, inits: dict[str, Any], conv: Any, w: np.ndarray, b: np.ndarray, dtype: Any,
                     suffix: str, nh: Any) -> list[str]:
    """Give ``conv`` new weight and bias initializers (``dtype``); returns the names it read before."""
    base = conv.name or conv.output[0]
    graph.initializer.extend([nh.from_array(w.astype(dtype), f"{base}_{suffix}_W"),
                              nh.from_array(b.astype(dtype), f"{base}_{suffix}_B")])
    inits.update({t.name: t for t in graph.initializer[-2:]})
    old = list(conv.input[1:])
    del conv.input[1:]
    conv.input.extend([f"{base}_{suffix}_W", f"{base}_{suffix}_B"])
    return old


def _fold_into_next(graph: Any, inits: dict[str, Any], readers: dict[str, list[Any]], outputs: set[str],
                    mul: Any, nh: Any) -> tuple[list[Any], list[str]] | None:
    """For ``Mul(h, s)`` (one-element ``s``) followed by an optional ``Add(., t)`` and a Conv reading only that:
    the Conv's weights take ``s``; ``t`` goes into its bias when it pads nothing, else stays as ``Add(h, t / s)``
    before it (zero padding commutes with the scale, not with the shift). Returns (the nodes to drop, the
    initializers they and the Conv no longer read), or None."""
    k = next((i for i, name in enumerate(mul.input) if name in inits), None)
    if k is None or len(mul.input) != 2 or mul.output[0] in outputs or len(readers.get(mul.output[0], [])) != 1:
        return None
    sv = nh.to_array(inits[mul.input[k]])
    if sv.size != 1 or not np.issubdtype(sv.dtype, np.floating) or not np.isfinite(sv).all() or not sv.any():
        return None
    scale, h = float(sv.reshape(())), mul.input[1 - k]
    nxt, add, shift = readers[mul.output[0]][0], None, None
    if nxt.op_type == "Add" and len(nxt.input) == 2 and nxt.output[0] not in outputs \
            and len(readers.get(nxt.output[0], [])) == 1:
        j = next((i for i, name in enumerate(nxt.input) if name in inits), None)
        tv = nh.to_array(inits[nxt.input[j]]) if j is not None else None
        if tv is not None and tv.size == 1 and np.issubdtype(tv.dtype, np.floating) and np.isfinite(tv).all():
            add, shift, nxt = nxt, float(tv.reshape(())), readers[nxt.output[0]][0]
    conv = nxt
    params = _conv_params(conv, inits, nh)
    if params is None or conv.input[0] != (add or mul).output[0]:
        return None
    w0, b, dtype = params
    w = w0 * scale
    drop, drop_consts = [mul], []
    if add is not None and _zero_pads(conv):
        b = b + shift * w0.reshape(w.shape[0], -1).sum(axis=1)
        drop.append(add)
        conv.input[0] = h
    elif add is not None:  # Add(h, t / s) -> Conv(W * s)
        name = f"{conv.name or conv.output[0]}_shift_over_scale"
        graph.initializer.append(nh.from_array(np.asarray([shift / scale], dtype=sv.dtype), name))
        inits[name] = graph.initializer[-1]
        drop_consts = [i for i in add.input if i in inits]
        del add.input[:]
        add.input.extend([h, name])
    else:
        conv.input[0] = h
    old = [*drop_consts, *(i for n in drop for i in n.input if i in inits)]
    return drop, old + _set_conv_params(graph, inits, conv, w, b, dtype, "scaled", nh)


def fold_conv_affine(model: Any) -> int:
    """Fold the constant Mul / Add / Sub / Div chains that follow Convs of ``model`` (an ``onnx.ModelProto``) into
    them, in place; returns how many ops were folded. A Conv is touched only when its weight (and bias) are
    initializers and each folded op is the only reader of the tensor before it and not a graph output."""
    nh = require("onnx.numpy_helper", "onnx", "ONNX graph editing")
    graph = model.graph
    if has_subgraphs(graph):  # a subgraph may read an outer tensor by name
        return 0
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    replaced: set[str] = set()
    folded = 0
    for conv in list(graph.node):
        params = _conv_params(conv, inits, nh)
        if params is None:
            continue
        w, b, dtype = params
        out, chain = conv.output[0], []
        while out not in outputs and len(readers.get(out, [])) == 1:
            nxt = readers[out][0]
            if nxt.op_type not in _OPS or len(nxt.input) != 2 or id(nxt) in drop:
                break
            k = 1 if nxt.input[0] == out else 0
            if nxt.input[1 - k] != out or nxt.input[k] not in inits or (k == 0 and nxt.op_type in ("Sub", "Div")):
                break
            v = _per_channel(nh.to_array(inits[nxt.input[k]]), w.ndim, w.shape[0])
            if v is None or (nxt.op_type == "Div" and (v == 0).any()):
                break
            scale = {"Mul": v, "Div": 1 / v}.get(nxt.op_type)
            if scale is not None:
                w, b = w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), b * scale
            else:
                b = b + (v if nxt.op_type == "Add" else -v)
            chain.append(nxt)
            out = nxt.output[0]
        if not chain:
            continue
        replaced.update(i for n in chain for i in n.input if i in inits)
        replaced.update(_set_conv_params(graph, inits, conv, w, b, dtype, "affine", nh))
        conv.output[0] = out
        drop.update(id(n) for n in chain)
        folded += len(chain)
    for mul in list(graph.node):  # learnable scale (and shift) before a Conv: PP-LCNetV3's after each activation
        if mul.op_type != "Mul" or id(mul) in drop:
            continue
        done = _fold_into_next(graph, inits, readers, outputs, mul, nh)
        if done:
            gone, names = done
            replaced.update(names)
            drop.update(id(n) for n in gone)
            folded += len(gone)
    if folded:
        kept = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        used = {name for n in graph.node for name in n.input} | {i.name for i in graph.input}
        for i in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
            graph.initializer.remove(i)
    return folded
