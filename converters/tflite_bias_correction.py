"""Bias correction measured on the int8 ``.tflite`` itself (NNCF's "full" bias correction, for the AI Edge
Quantizer's output), guarded by the model's outputs.

For each int8 convolution / fully connected op with an int32 bias, in execution order, the mean of its output (after
any fused activation) per channel over the calibration samples (the int8 model with the ops before it already
corrected, dequantized) is compared with the same op's mean in the fp32 ``.tflite``, and the difference is added
to the int32 bias (``round(shift / bias scale)``). The corrected model is kept only if its outputs moved closer to
fp32 on the same samples (normalised squared error); otherwise that op keeps its bias. The fast bias correction of
converters/tflite_quantize.py (:func:`~edge_sdk.converters.tflite_quantize.bias_correct`) corrects only the
weights' rounding, predicted before quantization; this one sees what the int8 activations do too.

Ops are matched between the two files by position among the weighted ops (the AI Edge Quantizer keeps the op
order and adds QUANTIZE / DEQUANTIZE ops only). Frameworks are imported inside the functions.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.converters.onnx_bias_correction import output_error

__all__ = ["SAMPLES", "full_bias_correction"]

SAMPLES = 32  # calibration inputs per pass (one pass per corrected op)
_INT32 = 2  # tflite TensorType
_INT32_MAX = 2**31 - 1


class _Pass:
    """One run of a model over the samples: the per-channel output mean of each watched op, and the outputs."""

    def __init__(self, model: bytes, key: str, feeds: list[dict[str, np.ndarray]], watch: list[int]) -> None:
        litert = require("ai_edge_litert.interpreter", "tflite", "bias correction of .tflite files")
        with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": it is what is needed here
            warnings.simplefilter("ignore", UserWarning)
            interp = litert.Interpreter(model_content=model, num_threads=1, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
        runner = interp.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        details = {int(d["index"]): d for d in interp.get_tensor_details()}
        sums: dict[int, np.ndarray] = {}
        self.outputs: list[list[np.ndarray]] = []
        for feed in feeds:
            got = runner(**{k: _to(ins[k], x) for k, x in feed.items()})
            for t in watch:
                y = _from(details[t], interp.get_tensor(t))
                m = y.reshape(-1, y.shape[-1]).mean(0)
                sums[t] = sums[t] + m if t in sums else m
            self.outputs.append([_from(outs[k], got[k]) for k in sorted(outs)])
        self.means = {t: s / max(len(feeds), 1) for t, s in sums.items()}


def _to(detail: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A float sample as the input tensor takes it (quantized with its scale / zero point when integer)."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return np.asarray(x, dtype=dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float64) / (scale or 1.0) + zero)
    return np.clip(q, info.min, info.max).astype(dtype)


def _from(detail: dict[str, Any], y: np.ndarray) -> np.ndarray:
    """A tensor's values as float (dequantized per tensor when integer)."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        return y.astype(np.float64)
    scale, zero = detail["quantization"]
    return (y.astype(np.float64) - zero) * (scale or 1.0)


def _weighted(model: bytes) -> list[dict[str, Any]]:
    litert = require("ai_edge_litert.interpreter", "tflite", "bias correction of .tflite files")
    interp = litert.Interpreter(model_content=model)
    from edge_sdk.converters.tflite_quantize import _WEIGHTED_OPS

    return [op for op in interp._get_ops_details() if op["op_name"] in _WEIGHTED_OPS]  # no public op list


def full_bias_correction(int8_model: bytes, fp32_model: bytes, key: str, samples: list[dict[str, np.ndarray]],
                         max_samples: int = SAMPLES) -> tuple[bytes, int, int]:
    """(corrected ``int8_model``, ops corrected, ops tried). ``samples``: float inputs by name of the signature
    ``key`` both files have. A model whose weighted ops do not pair up with the fp32 file's is returned as is."""
    from edge_sdk.converters.tflite_quantize import buffer_uses

    fb = require("ai_edge_litert.tools.flatbuffer_utils", "tflite", "editing .tflite files")
    q_ops, fp_ops = _weighted(int8_model), _weighted(fp32_model)
    if len(q_ops) != len(fp_ops) or not q_ops:
        return int8_model, 0, 0
    feeds = samples[:max_samples]
    ref = _Pass(fp32_model, key, feeds, [int(op["outputs"][0]) for op in fp_ops])
    m = fb.read_model_from_bytearray(bytearray(int8_model))
    sg = m.subgraphs[0]
    uses = buffer_uses(sg)
    pairs = []
    for q, f in zip(q_ops, fp_ops, strict=True):
        ins = [int(i) for i in q["inputs"]]
        if len(ins) < 3 or ins[2] < 0:
            continue
        bias = sg.tensors[ins[2]]
        buf = m.buffers[bias.buffer]
        if (bias.type != _INT32 or bias.quantization is None or bias.quantization.scale is None
                or buf.data is None or not len(buf.data) or uses.get(bias.buffer, 0) != 1):
            continue
        pairs.append((int(q["outputs"][0]), int(f["outputs"][0]), bias, buf))
    if not pairs:
        return int8_model, 0, 0
    watch = [t for t, _, _, _ in pairs]
    current = _Pass(int8_model, key, feeds, watch)
    error = output_error(ref.outputs, current.outputs)
    best = int8_model
    kept = 0
    for q_out, fp_out, bias, buf in pairs:
        want, got = ref.means[fp_out], current.means[q_out]
        old = np.frombuffer(bytes(buf.data), np.int32).copy()
        scale = np.asarray(bias.quantization.scale, np.float64)
        if want.shape != got.shape or got.shape != old.shape or scale.size not in (1, old.size):
            continue
        new = np.clip(old.astype(np.int64) + np.round((want - got) / scale), -_INT32_MAX - 1, _INT32_MAX)
        buf.data = np.frombuffer(new.astype(np.int32).tobytes(), np.uint8)
        candidate = bytes(fb.convert_object_to_bytearray(m))
        trial = _Pass(candidate, key, feeds, watch)
        now = output_error(ref.outputs, trial.outputs)
        if now <= error:
            error, current, best, kept = now, trial, candidate, kept + 1
        else:  # matching this op's mean moved the model's outputs away from fp32: undo it
            buf.data = np.frombuffer(old.tobytes(), np.uint8)
    return best, kept, len(pairs)
