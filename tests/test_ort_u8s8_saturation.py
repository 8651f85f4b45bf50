"""The fact behind the ``session.x64quantprecision`` advice (benchmarks/ort_int8_recipes.py, issues 14 and 17).

On x86 without VNNI, ONNX Runtime's fused U8S8 kernels add each pair of neighbouring uint8 x int8 products in
saturating 16-bit arithmetic (``vpmaddubsw``): a QLinearConv fed 255 on two input channels with weights 127 and 127
returns 32767 instead of 64770. ``session.x64quantprecision=1`` moves the weights to uint8 and the exact U8U8
kernel; ONNX Runtime Web (WASM) and VNNI / ARM CPUs are exact by default. If a future onnxruntime fixes the kernel,
the saturation test fails and the advice can go.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return set()
    for line in info.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


_X86_NO_VNNI = (platform.machine().lower() in ("x86_64", "amd64") and "avx2" in _flags()
                and not _flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _qdq_conv() -> bytes:
    """float x [1,2,1,1] -> Q(u8, scale 1) -> DQ -> Conv(1x1, int8 weights [127, 127]) -> Q(u8, scale 256) -> DQ."""
    h, tp = onnx.helper, onnx.TensorProto
    inits = [
        h.make_tensor("one", tp.FLOAT, [], [1.0]), h.make_tensor("zp_u8", tp.UINT8, [], [0]),
        h.make_tensor("w", tp.INT8, [1, 2, 1, 1], [127, 127]), h.make_tensor("zp_s8", tp.INT8, [], [0]),
        h.make_tensor("out_scale", tp.FLOAT, [], [256.0]),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "one", "zp_u8"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "one", "zp_u8"], ["xf"]),
        h.make_node("DequantizeLinear", ["w", "one", "zp_s8"], ["wf"]),
        h.make_node("Conv", ["xf", "wf"], ["y"]),
        h.make_node("QuantizeLinear", ["y", "out_scale", "zp_u8"], ["yq"]),
        h.make_node("DequantizeLinear", ["yq", "out_scale", "zp_u8"], ["out"]),
    ]
    graph = h.make_graph(nodes, "sat", [h.make_tensor_value_info("x", tp.FLOAT, [1, 2, 1, 1])],
                         [h.make_tensor_value_info("out", tp.FLOAT, [1, 1, 1, 1])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]).SerializeToString()


def _run(level: str, precise: bool) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    if precise:
        so.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(_qdq_conv(), so, providers=["CPUExecutionProvider"])
    return float(sess.run(None, {"x": np.full((1, 2, 1, 1), 255.0, np.float32)})[0].ravel()[0])


def test_float_emulation_and_precise_mode_are_exact() -> None:
    exact = 256.0 * round(255 * 254 / 256)  # 64770 on the output's grid of 256
    assert _run("BASIC", False) == exact
    assert _run("ALL", True) == exact


@pytest.mark.skipif(not _X86_NO_VNNI, reason="the U8S8 saturation is specific to x86 with AVX2 and no VNNI")
def test_fused_u8s8_saturates_on_x86_without_vnni() -> None:
    assert _run("ALL", False) == 256.0 * round(32767 / 256)


def test_the_sdk_runtime_is_exact_with_the_env_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.runtimes import onnxruntime as ort_rt

    model = tmp_path / "sat.onnx"
    model.write_bytes(_qdq_conv())
    x = np.full((1, 2, 1, 1), 255.0, np.float32)
    monkeypatch.setenv(ort_rt.EXACT_INT8_ENV, "1")
    session = ort_rt.RUNTIME.load(model)
    try:
        assert float(session.run([x])[0].ravel()[0]) == 256.0 * round(255 * 254 / 256)
    finally:
        session.close()
    assert ort_rt.u8s8_saturates() is _X86_NO_VNNI
