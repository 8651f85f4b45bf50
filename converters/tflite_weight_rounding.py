"""GPTQ-rounded int8 weights for a ``.tflite`` file, taken from the ONNX twin of the same source.

The AI Edge Quantizer rounds every weight to its nearest int8 level. :func:`~edge_sdk.converters.weight_rounding.
gptq_onnx` rounds them error-compensating on the calibration data (the closed-form GPTQ of the ONNX route) and
leaves them on their int8 grids as float (per output channel, symmetric, scale max|w| / 127, the channel's largest
weight kept: the scale the AI Edge Quantizer computes again). The fp32 ``.tflite`` and the fp32 ONNX made from the
same source hold the same weights, in other layouts; the N-th weighted op of one is the N-th of the other (graph
order, the correspondence ``tflite_float_layers`` uses). Each GPTQ-rounded ONNX weight is written into the
``.tflite`` in the layout (axis permutation) under which the two fp32 weights agree (to 1e-4 of the layer's largest
weight); a layer whose weights agree under no permutation keeps the quantizer's rounding. The quantizer that runs
next then picks the GPTQ integers. Frameworks are imported inside the functions.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_sdk._deps import require
from edge_sdk.calibration import SampleSet
from edge_sdk.errors import ConversionError

__all__ = ["gptq_tflite", "matching_layout"]

_WEIGHTED_ONNX = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT32 = 0  # tflite TensorType
_TOLERANCE = 1e-4


def matching_layout(onnx_w: np.ndarray, tflite_w: np.ndarray) -> tuple[int, ...] | None:
    """The axis permutation that turns ``onnx_w`` into ``tflite_w`` (values equal to 1e-4 of the largest
    weight), or None. Size-1 axes may be dropped or added (a depthwise kernel is (C, 1, kh, kw) in ONNX and
    (1, kh, kw, C) in TFLite)."""
    a = np.asarray(onnx_w, dtype=np.float64)
    b = np.asarray(tflite_w, dtype=np.float64)
    if a.size != b.size or a.size == 0:
        return None
    tol = _TOLERANCE * max(float(np.abs(a).max()), 1e-12)
    a_core = a.reshape([d for d in a.shape if d != 1] or [1])
    b_core = b.reshape([d for d in b.shape if d != 1] or [1])
    if a_core.ndim != b_core.ndim:
        return None
    for perm in itertools.permutations(range(a_core.ndim)):
        t = np.transpose(a_core, perm)
        if t.shape == b_core.shape and float(np.abs(t - b_core).max()) <= tol:
            return perm
    return None


def _onnx_weights(path: Path) -> list[np.ndarray | None]:
    onnx = require("onnx", "onnx", "GPTQ weight rounding")
    numpy_helper = require("onnx.numpy_helper", "onnx", "GPTQ weight rounding")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) if len(n.input) > 1 and n.input[1] in inits else None
            for n in model.graph.node if n.op_type in _WEIGHTED_ONNX]


def gptq_tflite(tflite_fp32: Path, onnx_fp32: Path, out: Path, samples: SampleSet, input_names: list[str],
                workdir: Path, keep: Callable[[list[float]], set[int]] | None = None) -> dict[str, str]:
    """Write ``out``: ``tflite_fp32`` with the GPTQ-rounded weights of ``onnx_fp32`` (the same source), rounded on
    ``samples`` (fed to the ONNX inputs ``input_names``). Returns the manifest entries that say what was done.
    ``keep`` gets each weighted op's relative output error with nearest int8 weights (NaN where not measured; op
    order) and returns the ops whose fp32 weights stay as they are (layers that will compute in float)."""
    from edge_sdk.converters.tflite_quantize import _WEIGHTED_OPS, buffer_uses
    from edge_sdk.converters.weight_rounding import gptq_onnx

    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    litert = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    workdir.mkdir(parents=True, exist_ok=True)
    rounded = workdir / "gptq.onnx"
    by_name: dict[str, float] = {}
    info = gptq_onnx(onnx_fp32, rounded, samples, input_names, errors=by_name)
    onnx = require("onnx", "onnx", "GPTQ weight rounding")
    errors = [by_name.get(n.name, float("nan")) for n in onnx.load(str(onnx_fp32)).graph.node
              if n.op_type in _WEIGHTED_ONNX]
    untouched = keep(errors) if keep is not None else set()
    if not rounded.exists():  # nothing GPTQ could round
        shutil.copyfile(tflite_fp32, out)
        return {"tflite_weight_rounding": f"nearest ({info.get('onnx_weight_rounding', 'no layer to round')})"}
    before, after = _onnx_weights(onnx_fp32), _onnx_weights(rounded)
    model_bytes = Path(tflite_fp32).read_bytes()
    interp = litert.Interpreter(model_content=model_bytes)
    ops = [op for op in interp._get_ops_details() if op["op_name"] in _WEIGHTED_OPS]  # no public op list
    if len(ops) != len(before):
        raise ConversionError(f"GPTQ weights: the .tflite has {len(ops)} weighted ops and the ONNX twin "
                              f"{len(before)}, so layers cannot be matched; set tflite_weight_rounding to 'nearest'")
    m = fb.read_model_from_bytearray(bytearray(model_bytes))
    sg = m.subgraphs[0]
    uses = buffer_uses(sg)
    written = 0
    for k, (op, w0, w1) in enumerate(zip(ops, before, after, strict=True)):
        if k in untouched or w0 is None or w1 is None or np.array_equal(w0, w1) or len(op["inputs"]) < 2:
            continue
        t = sg.tensors[int(op["inputs"][1])]
        buf = m.buffers[t.buffer]
        if t.type != _FLOAT32 or buf.data is None or not len(buf.data) or uses.get(t.buffer, 0) != 1:
            continue  # fp16 / int8 / shared / external weights stay as they are
        tw = np.frombuffer(bytes(buf.data), np.float32).reshape(list(t.shape))
        perm = matching_layout(w0, tw)
        if perm is None:
            continue
        core = np.asarray(w1, np.float32).reshape([d for d in w1.shape if d != 1] or [1])
        new = np.ascontiguousarray(np.transpose(core, perm).reshape(tw.shape), np.float32)
        buf.data = np.frombuffer(new.tobytes(), np.uint8)
        written += 1
    out.write_bytes(bytes(fb.convert_object_to_bytearray(m)))
    return {"tflite_weight_rounding": f"gptq ({written} of {len(ops)} layers; "
                                      f"{info.get('onnx_weight_rounding', 'gptq')})"}
