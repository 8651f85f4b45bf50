"""TFLite activation ops rewritten into ops the tools can handle: XNNPACK after int8 quantization, the AI Edge
Quantizer before it.

**After quantization: int8 activations LiteRT's XNNPACK delegate can run** (:func:`delegable_activations`).

A full-integer ``.tflite`` runs fast only where XNNPACK takes its ops. XNNPACK takes int8 convolutions, fully
connected, ADD / MUL / SUB, MEAN, pooling, but **not** a standalone int8 ``RELU`` / ``RELU6`` / ``RELU_N1_TO_1`` /
``RELU_0_TO_1`` nor an int8 ``HARD_SWISH`` (measured with ai-edge-litert 2.x: a lone int8 RELU on 36,864 values
takes 0.3 ms in LiteRT's reference kernel, 8 ns a value). Each such op runs in a reference kernel and splits the
delegated graph in two. The PP-OCR text-angle classifier (MobileNetV3 with hard-swish and hard-sigmoid, through
onnx2tf) had 18 HARD_SWISH and 9 RELU_0_TO_1 int8 ops, 28 delegate partitions, and ran 4.3x *slower* than fp32.

:func:`delegable_activations` rewrites those ops without changing what the graph computes:

- A clamp is removed when the op producing its input requantizes (convolutions, fully connected, ADD / SUB / MUL,
  MEAN, BATCH_MATMUL) and nothing else reads that input: the producer writes the clamp's output tensor directly.
  Int8 saturation does the clamp when the output range lies inside the clamp interval (RELU with zero point -128,
  RELU_0_TO_1 with a range inside [0, 1], ...); otherwise the producer's fused activation does it (RELU, RELU6,
  RELU_N1_TO_1 into an op with none); otherwise the clamp stays.
- ``HARD_SWISH(x) = x * clip(x / 6 + 1/2, 0, 1)`` becomes MUL(x, 1/6) -> ADD(., 1/2) into a [0, 1] int8 range
  (saturation is the clip) -> MUL(x, .), three ops XNNPACK runs. The first MUL's output keeps x's integers
  (its scale is x's / 6), so the only added rounding is the [0, 1] gate in steps of 1/255.

Both need only the int8 graph (no calibration).

**Before quantization: ops the AI Edge Quantizer leaves float** (:func:`aeq_quantizable`). It has no int8 or int16
``RELU_0_TO_1`` (litert-torch's lowering of a hard-sigmoid, every MobileNetV3 squeeze-excitation gate) and no int16
``HARD_SWISH``; one such op left the PP-OCRv4 recogniser's int8 to PT2E's graph with float islands. In the fp32
graph, ``RELU_0_TO_1(x)`` becomes MUL(x, 6) with a fused RELU6 -> MUL(., 1/6), and (for int16 activations)
``HARD_SWISH(x)`` becomes ADD(x, 3) with a fused RELU6 -> MUL(x, .) -> MUL(., 1/6): the same function, in ops it
quantizes. The op's output tensor (and its name, which the mixed-precision rungs select ops by) is kept.

The edited graphs are validated like every artifact. Frameworks are imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sdk._deps import require

__all__ = ["aeq_quantizable", "delegable_activations", "opcode_index"]

_FLOAT32, _INT8 = 0, 9  # tflite TensorType
_CLAMPS = {"RELU": (0.0, np.inf), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}
_REQUANTIZING = ("ADD", "SUB", "MUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MEAN", "BATCH_MATMUL")


def opcode_index(model: Any, schema: Any, builtin: int, version: int = 1) -> int:
    """Index of builtin operator ``builtin`` in ``model.operatorCodes`` (a ``ModelT``), appended (at ``version``)
    when the model has none."""
    for k, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == builtin:
            return k
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


class _Graph:
    """One subgraph of a ``ModelT`` with the producer / reader maps the rewrites need."""

    def __init__(self, model: Any, sg: Any, schema: Any) -> None:
        self.model, self.sg, self.schema = model, sg, schema
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.op_names = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?") for c in model.operatorCodes]
        self.boundary = {int(i) for i in list(sg.inputs) + list(sg.outputs)}
        self.producer: dict[int, Any] = {}
        self.readers: dict[int, int] = {}
        for op in sg.operators:
            for t in op.outputs:
                self.producer[int(t)] = op
            for t in op.inputs:
                self.readers[int(t)] = self.readers.get(int(t), 0) + 1

    def name(self, op: Any) -> str:
        return self.op_names[op.opcodeIndex]

    def per_tensor_int8(self, index: int) -> tuple[float, int] | None:
        """(scale, zero point) of a per-tensor int8 tensor, else None."""
        t = self.sg.tensors[index]
        q = t.quantization
        if t.type != _INT8 or q is None or q.scale is None or len(q.scale) != 1 or q.zeroPoint is None:
            return None
        return float(q.scale[0]), int(q.zeroPoint[0])

    def opcode(self, name: str) -> int:
        """Index of the builtin opcode ``name``, added when the model has none (version 2: the int8 kernels of
        ADD / MUL)."""
        index = opcode_index(self.model, self.schema, getattr(self.schema.BuiltinOperator, name), version=2)
        if index == len(self.op_names):
            self.op_names.append(name)
        return index

    def tensor(self, name: str, shape: list[int], scale: float | None, zero_point: int = 0,
               data: bytes | None = None) -> int:
        """Append a per-tensor int8 tensor, or a float32 one when ``scale`` is None (a constant when ``data`` is
        given); returns its index."""
        s = self.schema
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), _INT8 if scale is not None else _FLOAT32
        if scale is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [float(scale)], [int(zero_point)]
        buf = s.BufferT()
        if data is not None:
            buf.data = np.frombuffer(data, np.uint8)
        self.model.buffers.append(buf)
        t.buffer = len(self.model.buffers) - 1
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def binary(self, name: str, a: int, b: int, out: int, fused: str = "NONE") -> Any:
        s = self.schema
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = self.opcode(name), [a, b], [out]
        op.builtinOptionsType = s.BuiltinOptions.MulOptions if name == "MUL" else s.BuiltinOptions.AddOptions
        op.builtinOptions = s.MulOptionsT() if name == "MUL" else s.AddOptionsT()
        op.builtinOptions.fusedActivationFunction = getattr(s.ActivationFunctionType, fused)
        return op

    def float_scalar(self, name: str, value: float) -> int:
        return self.tensor(name, [1], None, data=np.float32(value).tobytes())

    def base_name(self, index: int) -> str:
        name = self.sg.tensors[index].name
        return name.decode() if isinstance(name, bytes) else str(name)


def _fold_clamp(g: _Graph, op: Any) -> bool:
    """Remove a standalone int8 clamp whose output range its producer's saturation already enforces."""
    lo, hi = _CLAMPS[g.name(op)]
    src, dst = int(op.inputs[0]), int(op.outputs[0])
    out_q = g.per_tensor_int8(dst)
    producer = g.producer.get(src)
    if (out_q is None or g.per_tensor_int8(src) is None or producer is None or g.name(producer) not in _REQUANTIZING
            or g.readers.get(src, 0) != 1 or src in g.boundary):
        return False
    scale, zp = out_q
    if scale * (-128 - zp) < lo - scale / 2 or scale * (127 - zp) > hi + scale / 2:
        # the clamp cuts inside the int8 range: saturation alone would not do it, the producer's fused one can
        options = getattr(producer, "builtinOptions", None)
        fused = getattr(g.schema.ActivationFunctionType, g.name(op), None)
        if fused is None or getattr(options, "fusedActivationFunction", None) != 0:
            return False
        options.fusedActivationFunction = fused
    producer.outputs = [dst if int(t) == src else int(t) for t in producer.outputs]
    g.producer[dst] = producer
    return True


def _split_hard_swish(g: _Graph, op: Any) -> list[Any] | None:
    """MUL(x, 1/6) -> ADD(., 1/2) saturating into [0, 1] -> MUL(x, .) in place of an int8 HARD_SWISH."""
    x, y = int(op.inputs[0]), int(op.outputs[0])
    xq = g.per_tensor_int8(x)
    if xq is None or g.per_tensor_int8(y) is None:
        return None
    shape = [int(d) for d in g.sg.tensors[x].shape]
    base = g.base_name(y)
    sixth = g.tensor(f"{base}/hard_swish_sixth", [1], (1 / 6) / 127, 0, np.int8(127).tobytes())
    half = g.tensor(f"{base}/hard_swish_half", [1], 0.5 / 127, 0, np.int8(127).tobytes())
    scaled = g.tensor(f"{base}/hard_swish_x6", shape, xq[0] / 6, xq[1])
    gate = g.tensor(f"{base}/hard_swish_gate", shape, 1 / 255, -128)
    return [g.binary("MUL", x, sixth, scaled), g.binary("ADD", scaled, half, gate), g.binary("MUL", x, gate, y)]


def _float_io(g: _Graph, op: Any) -> tuple[int, int] | None:
    """(input, output) of a float32 one-input op, else None."""
    x, y = int(op.inputs[0]), int(op.outputs[0])
    ok = g.sg.tensors[x].type == _FLOAT32 and g.sg.tensors[y].type == _FLOAT32
    return (x, y) if ok else None


def _float_relu_0_to_1(g: _Graph, op: Any) -> list[Any] | None:
    """MUL(x, 6) fused RELU6 -> MUL(., 1/6) in place of a float RELU_0_TO_1."""
    io = _float_io(g, op)
    if io is None:
        return None
    x, y = io
    base = g.base_name(y)
    six = g.tensor(f"{base}/relu6_of_6x", [int(d) for d in g.sg.tensors[x].shape], None)
    return [g.binary("MUL", x, g.float_scalar(f"{base}/six", 6.0), six, fused="RELU6"),
            g.binary("MUL", six, g.float_scalar(f"{base}/sixth", 1 / 6), y)]


def _float_hard_swish(g: _Graph, op: Any) -> list[Any] | None:
    """ADD(x, 3) fused RELU6 -> MUL(x, .) -> MUL(., 1/6) in place of a float HARD_SWISH."""
    io = _float_io(g, op)
    if io is None:
        return None
    x, y = io
    base, shape = g.base_name(y), [int(d) for d in g.sg.tensors[x].shape]
    gate = g.tensor(f"{base}/relu6_x_plus_3", shape, None)
    prod = g.tensor(f"{base}/x_relu6_x_plus_3", shape, None)
    return [g.binary("ADD", x, g.float_scalar(f"{base}/three", 3.0), gate, fused="RELU6"),
            g.binary("MUL", x, gate, prod), g.binary("MUL", prod, g.float_scalar(f"{base}/sixth", 1 / 6), y)]


def _rewrite(tflite_model: bytes, rules: dict[str, Any]) -> tuple[bytes, dict[str, int]]:
    """Apply ``rules`` ({op name: fn(graph, op) -> replacement ops or None}) to every subgraph."""
    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "editing .tflite files")
    model = fb.read_model_from_bytearray(bytearray(tflite_model))
    done: dict[str, int] = {}
    for sg in model.subgraphs:
        g = _Graph(model, sg, schema)
        ops: list[Any] = []
        for op in sg.operators:
            name = g.name(op)
            new = rules[name](g, op) if name in rules else None
            if new is not None:
                done[name] = done.get(name, 0) + 1
            ops.extend([op] if new is None else new)
        sg.operators = ops
    if not done:
        return tflite_model, done
    return bytes(fb.convert_object_to_bytearray(model)), done


def delegable_activations(tflite_model: bytes) -> tuple[bytes, dict[str, int]]:
    """(``tflite_model`` with its int8 clamps folded and HARD_SWISH split, {op name: how many rewritten})."""
    def clamp(g: _Graph, op: Any) -> list[Any] | None:
        return [] if _fold_clamp(g, op) else None

    return _rewrite(tflite_model, {**dict.fromkeys(_CLAMPS, clamp), "HARD_SWISH": _split_hard_swish})


def aeq_quantizable(float_model: bytes, activation_bits: int = 8) -> tuple[bytes, dict[str, int]]:
    """(the fp32 ``float_model`` with the float ops the AI Edge Quantizer cannot quantize at ``activation_bits``
    rewritten into ops it can, {op name: how many rewritten})."""
    rules: dict[str, Any] = {"RELU_0_TO_1": _float_relu_0_to_1}
    if activation_bits == 16:
        rules["HARD_SWISH"] = _float_hard_swish
    return _rewrite(float_model, rules)
