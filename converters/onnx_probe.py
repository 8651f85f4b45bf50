"""Running part of an ONNX graph: the tensors a quantization pass needs to see, computed on calibration data.

Shared by the passes that read intermediate tensors (converters/onnx_bias_correction.py,
converters/onnx_qdq_fusion.py). Frameworks are imported inside the functions.
"""

from __future__ import annotations

from typing import Any

from edge_sdk._deps import require

__all__ = ["only_outputs", "ort_session"]


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
