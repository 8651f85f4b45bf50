"""int8 weights for what the static quantizers leave fp32 in an ONNX int8 model.

NNCF and ONNX Runtime's QDQ quantizer quantize the Conv / Gemm / MatMul layers they place activation quantizers
around. Two kinds of weights stay fp32, and on real models they are a large share of the bytes:

- **LSTMs.** Neither quantizer touches an ``LSTM``: ddddocr's CRNN OCR carries 31 % of its parameters in one
  bidirectional LSTM (plain int8: 0.49x fp32 size); Silero VAD and BeatNet are mostly LSTM. ONNX Runtime has a kernel
  for exactly this, ``com.microsoft.DynamicQuantizeLSTM``: int8 W and R (per output channel scales, zero point 0),
  inputs and hidden state quantized per call. :func:`quantize_lstm_weights` rewrites each eligible LSTM into it, in
  place of ORT's ``quantize_dynamic``, whose LSTM rewrite silently drops the ``layout`` attribute. Eligible: W and R
  are 3-D initializers, ``layout`` is 0 (time-major, the op's only layout).
- **Layers the quantizer skipped.** NNCF leaves squeeze-excitation convs float (its SE-block pattern): PP-OCRv4's
  recogniser keeps four of them (0.58 MB) and its int8 is 0.32x fp32 size instead of 0.27x. :func:`weight_only_int8`
  stores such a weight as per-channel symmetric int8 behind a DequantizeLinear: the layer still computes in float
  (ORT dequantizes the weight per call, at most as many operations as the layer's own multiply-adds). Layers kept
  float on purpose (the accuracy budget's float nodes, a float stem / input layer) are left alone.

The results only run on ONNX Runtime (the ``.ort`` and the web artifact too); the other targets (OpenVINO, TFLite)
are made from the fp32 file, not from this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.onnx_probe import has_subgraphs, node_attr, node_key, relay_nodes
from edge_sdk.converters.weight_rounding import symmetric_int8

__all__ = ["MIN_WEIGHTS", "quantize_lstm_weights", "weight_only_int8"]

#: weights smaller than this stay fp32 (a few biases' worth of bytes is not worth a DequantizeLinear per call)
MIN_WEIGHTS = 4096

MS_DOMAIN = "com.microsoft"


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 of ``w`` [dirs, 4H, in]: (int8 weights as [dirs, in, 4H], scales [dirs, 4H])."""
    q, scale = symmetric_int8(w, 2)
    return np.ascontiguousarray(q.transpose(0, 2, 1)), scale[..., 0]


def quantize_lstm_weights(path: Path) -> dict[str, str]:
    """Rewrite every eligible ``LSTM`` of the ONNX file at ``path`` (in place) to int8 weights.

    Returns the manifest record ``{"onnx_lstm_int8": "<k> of <n> LSTM"}`` (with the reason any stayed float), or
    ``{}`` when the model has no LSTM.
    """
    onnx = require("onnx", "onnx", "ONNX LSTM quantization")
    numpy_helper = onnx.numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    if not lstms:
        return {}
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    nested = has_subgraphs(graph)  # a subgraph may read an initializer by name: then none is removed
    done, skipped, before, removed = 0, [], {}, set()
    for node in lstms:
        w_name, r_name = node.input[1], node.input[2]
        if node_attr(node, "layout", 0) != 0:
            skipped.append(f"{node.name or 'LSTM'}: batch-major layout")
            continue
        if w_name not in inits or r_name not in inits:
            skipped.append(f"{node.name or 'LSTM'}: weights are computed, not constants")
            continue
        w, r = numpy_helper.to_array(inits[w_name]), numpy_helper.to_array(inits[r_name])
        if w.ndim != 3 or r.ndim != 3 or w.dtype != np.float32 or r.dtype != np.float32:
            skipped.append(f"{node.name or 'LSTM'}: W/R are not 3-D float32")
            continue
        new_inputs = list(node.input[:8]) + [""] * (8 - min(len(node.input), 8))
        for k, (name, arr) in enumerate(((w_name, w), (r_name, r))):
            q, scale = _int8_rows(arr)
            base = f"{name}_lstm_int8"
            graph.initializer.extend([numpy_helper.from_array(q, base),
                                      numpy_helper.from_array(scale, base + "_scale"),
                                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zp")])
            new_inputs[1 + k] = base
            new_inputs.append(base + "_scale")
            new_inputs.append(base + "_zp")
        # DynamicQuantizeLSTM: X, W, R, B, seq_lens, h0, c0, P, W_scale, W_zp, R_scale, R_zp
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        quant = onnx.helper.make_node("DynamicQuantizeLSTM", new_inputs, list(node.output),
                                      name=(node.name or "LSTM") + "_int8", domain=MS_DOMAIN, **attrs)
        before[node_key(node)] = [quant]
        removed.add(("LSTM", node_key(node)))
        for name in (w_name, r_name):
            users[name] -= 1
            if users[name] == 0 and not nested:  # no other node reads the fp32 copy
                graph.initializer.remove(inits.pop(name))
        done += 1
    if before:
        relay_nodes(graph, before, removed)
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save_model(model, str(path))
    record = f"{done} of {len(lstms)} LSTM"
    if skipped:
        record += " (float: " + "; ".join(skipped) + ")"
    return {"onnx_lstm_int8": record}


def _weight_axis(node: Any) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None for ops this pass leaves alone."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0 if node.op_type == "Conv" else None  # ConvTranspose: out channels x group on axis 1, left alone
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    return None


def weight_only_int8(path: Path, keep_float: set[str]) -> dict[str, str]:
    """Give each Conv / Gemm / MatMul of the ONNX file at ``path`` whose weight is still an fp32 initializer (the
    quantizer skipped it) int8 weights behind a DequantizeLinear, in place. ``keep_float``: node names kept float on
    purpose (left alone). Returns ``{"onnx_weight_only_int8": "<k> layers"}``, or ``{}`` when none changed."""
    onnx = require("onnx", "onnx", "ONNX weight quantization")
    numpy_helper = onnx.numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    nested = has_subgraphs(graph)
    done, before = 0, {}
    for node in graph.node:
        axis = _weight_axis(node)
        if axis is None or node.name in keep_float or len(node.input) < 2:
            continue
        name = node.input[1]
        init = inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or users.get(name) != 1:
            continue
        w = numpy_helper.to_array(init)
        if w.size < MIN_WEIGHTS or w.ndim < 2 or (node.op_type != "Conv" and w.ndim != 2):
            continue
        q, scale = symmetric_int8(w.astype(np.float32), tuple(a for a in range(w.ndim) if a != axis))
        scale = scale.reshape(-1)
        base = f"{name}_weight_int8"
        graph.initializer.extend([numpy_helper.from_array(q, base),
                                  numpy_helper.from_array(scale, f"{base}_scale"),
                                  numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zp")])
        dq = onnx.helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zp"], [f"{base}_dequantized"],
                                   name=f"{base}_dequantize", axis=axis)
        before[node_key(node)] = [dq]
        node.input[1] = f"{base}_dequantized"
        if not nested:
            graph.initializer.remove(inits.pop(name))
        done += 1
    if not done:
        return {}
    relay_nodes(graph, before)
    onnx.save_model(model, str(path))
    return {"onnx_weight_only_int8": f"{done} layers"}
