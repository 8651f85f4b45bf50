"""ONNX int8 weight formats: 7-bit ``reduce_range`` weights (with and without GPTQ), uint8 weights (U8U8),
on a trained Fashion-MNIST CNN, quantized by the SDK and run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _weights(path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, str]]:
    """(levels, scale, zero point, name) of every constant weight DequantizeLinear in ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.ndim >= 2:
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            out.append((q, inits[node.input[1]], zp, node.input[0]))
    return out


def _run(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_reduce_range_gptq_weights_stay_on_the_7bit_grid(fashion_onnx: Path, fashion_calibration: np.ndarray,
                                                         fashion_test: tuple, tmp_path: Path) -> None:
    """7-bit weights: every level within +-64 and each channel's largest at +-64 (GPTQ rounds onto that grid, so
    ORT's quantizer keeps GPTQ's integers); the manifest fields say so; accuracy stays near fp32's."""
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    calib = SampleSet([fashion_calibration[:200]])
    out = tmp_path / "rr.onnx"
    info = quantize_static_qdq(fashion_onnx, out, calib, ConvertOptions(extra={
        "onnx_quantizer": "ort", "onnx_reduce_range": True, "onnx_weight_rounding": "gptq"}), ["x"])
    assert info["onnx_reduce_range"] == "all layers" and info["onnx_weight_type"] == "int8"
    assert "levels +-64" in info["onnx_weight_rounding"]
    weights = _weights(out)
    assert len(weights) == 3  # the layer reading the input stays float (onnx_float_input_layers)
    for q, _s, _zp, name in weights:
        assert q.dtype == np.int8 and int(np.abs(q).max()) == 64, name
        per_channel = np.abs(q.reshape(q.shape[0], -1)).max(axis=1)
        assert (per_channel == 64).all(), name  # the largest weight of each channel pins the 7-bit scale
    x, _y = fashion_test
    fp = _run(fashion_onnx, x[:500], "ALL").argmax(1)
    q8 = _run(out, x[:500], "ALL").argmax(1)
    assert (q8 == fp).mean() >= 0.97, (q8 == fp).mean()


def test_uint8_weights_fused_equals_emulated(fashion_onnx: Path, fashion_calibration: np.ndarray,
                                                                fashion_test: tuple, tmp_path: Path) -> None:
    """U8U8: uint8 weights (zero point 128); ORT's fused integer kernels (graph opt ALL) give the same
    top-1 as the float emulation of the QDQ graph (BASIC) — no int16 saturation, whatever the CPU."""
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    out = tmp_path / "u8u8.onnx"
    info = quantize_static_qdq(fashion_onnx, out, SampleSet([fashion_calibration[:200]]), ConvertOptions(
        extra={"onnx_quantizer": "ort", "onnx_weight_type": "uint8"}), ["x"])
    assert info["onnx_weight_type"] == "uint8" and info["onnx_reduce_range"] == "no"
    weights = _weights(out)
    assert weights and all(q.dtype == np.uint8 and zp is not None and zp.dtype == np.uint8 for q, _s, zp, _n in weights)
    assert all((zp == 128).all() for _q, _s, zp, _n in weights)  # ORT 1.32: per-channel uint8 weights symmetric
    x, _y = fashion_test
    fused, emulated = _run(out, x[:500], "ALL"), _run(out, x[:500], "BASIC")
    assert (fused.argmax(1) == emulated.argmax(1)).mean() >= 0.99


def test_weight_format_errors(fashion_onnx: Path, fashion_calibration: np.ndarray, tmp_path: Path) -> None:
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq
    from edge_sdk.errors import ConversionError

    calib = SampleSet([fashion_calibration[:20]])
    cases = (({"onnx_weight_type": "int4"}, "onnx_weight_type 'int4' is not supported: choose from int8, uint8"),
             ({"onnx_quantizer": "ort", "onnx_weight_type": "uint8", "onnx_weight_rounding": "gptq"},
              "onnx_weight_rounding 'gptq' needs symmetric int8 weights"),
             ({"onnx_quantizer": "nncf", "onnx_weight_type": "uint8"}, "needs onnx_quantizer 'ort'"),
             ({"onnx_quantizer": "ort", "onnx_reduce_range": "yes"}, "onnx_reduce_range must be true or false"))
    for extra, message in cases:
        with pytest.raises(ConversionError, match=message):
            quantize_static_qdq(fashion_onnx, tmp_path / "q.onnx", calib, ConvertOptions(extra=extra), ["x"])
