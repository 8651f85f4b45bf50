"""int8 weights for the fully connected ops an int8 ``.tflite`` still computes in float.

PT2E's int8 quantizer (the PyTorch path when the AI Edge Quantizer leaves ops float) annotates ``linear`` and
convolution modules only. A ``torch.nn.LSTM`` is exported unrolled: per time step, fully connected ops over the
gate weights, which no quantizer annotates, so those weights stay fp32. ddddocr's CRNN OCR (one bidirectional LSTM,
31 % of its parameters) came out at 0.49x fp32 size as "int8".

:func:`hybrid_fully_connected` stores every such weight as per-output-channel symmetric int8 in place of fp32.
LiteRT runs a FULLY_CONNECTED with float input and int8 weights as its "hybrid" kernel: the input is quantized per
call, the product is int8, the output float. A buffer shared by several ops (the recurrent weight, read once per
time step) is converted once, and only when every op reading it is such a fully connected op. Frameworks are
imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.weight_rounding import symmetric_int8

__all__ = ["MIN_WEIGHTS", "hybrid_fully_connected"]

MIN_WEIGHTS = 4096  # smaller weights stay fp32: not worth a per-call input quantization
_FLOAT32, _INT8 = 0, 9  # tflite TensorType


def _float_fc_weights(model: Any, schema: Any) -> dict[int, list[Any]]:
    """Buffer index -> the weight tensors reading it, for float-input FULLY_CONNECTED ops with constant fp32
    weights; a buffer any other op (or input position) reads is left out."""
    fc_codes = {k for k, c in enumerate(model.operatorCodes)
                if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED}
    found: dict[int, list[Any]] = {}
    other: set[int] = set()
    for sg in model.subgraphs:
        for op in sg.operators:
            ins = [int(i) for i in op.inputs]
            for pos, i in enumerate(ins):
                if i < 0:
                    continue
                t = sg.tensors[i]
                data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
                is_weight = (op.opcodeIndex in fc_codes and pos == 1 and t.type == _FLOAT32
                             and data is not None and len(data) > 0 and ins[0] >= 0
                             and sg.tensors[ins[0]].type == _FLOAT32 and len(t.shape) == 2)
                if is_weight:
                    found.setdefault(t.buffer, []).append(t)
                elif data is not None and len(data) > 0:
                    other.add(t.buffer)
    return {b: ts for b, ts in found.items() if b not in other}


def hybrid_fully_connected(tflite_model: bytes) -> tuple[bytes, int]:
    """(``tflite_model`` with the float fully connected weights as int8, how many weights were converted)."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "editing .tflite files")
    model = fb.read_model_from_bytearray(bytearray(tflite_model))
    done = 0
    for buf_index, tensors in _float_fc_weights(model, schema).items():
        buf = model.buffers[buf_index]
        shape = [int(d) for d in tensors[0].shape]
        w = np.frombuffer(bytes(buf.data), np.float32)
        if w.size != int(np.prod(shape)) or w.size < MIN_WEIGHTS or not np.isfinite(w).all():
            continue
        w = w.reshape(shape)
        q, scale = symmetric_int8(w, 1)
        scale = scale[:, 0]
        buf.data = np.frombuffer(q.tobytes(), np.uint8)
        for t in tensors:
            t.type = _INT8
            t.quantization = schema.QuantizationParametersT()
            t.quantization.scale = scale.tolist()
            t.quantization.zeroPoint = [0] * len(scale)
            t.quantization.quantizedDimension = 0
        done += int(w.size)
    if not done:
        return tflite_model, 0
    return bytes(fb.convert_object_to_bytearray(model)), done
