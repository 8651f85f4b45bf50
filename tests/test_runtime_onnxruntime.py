"""The ONNX Runtime runtime on real ONNX / ORT files built with onnx.helper (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.errors import InferenceError, InputError
from edge_sdk.formats import Format

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_sdk.runtimes.onnxruntime import RUNTIME, OnnxRuntime  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 4)).astype(np.float32)
B = RNG.standard_normal(4).astype(np.float32)
Q_SCALE, Q_ZP = 0.05, 128


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = relu(x @ W + B) with a dynamic batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return _save(graph, tmp_path_factory.mktemp("ort_rt") / "dense.onnx")


@pytest.fixture(scope="module")
def quant_io_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uint8 in -> DequantizeLinear -> Relu -> QuantizeLinear -> uint8 out (quantized graph I/O)."""
    scale = numpy_helper.from_array(np.array(Q_SCALE, np.float32), "s")
    zp = numpy_helper.from_array(np.array(Q_ZP, np.uint8), "zp")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q_in", "s", "zp"], ["f"]), helper.make_node("Relu", ["f"], ["r"]),
         helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q_out"])],
        "qio",
        [helper.make_tensor_value_info("q_in", TensorProto.UINT8, [1, 16])],
        [helper.make_tensor_value_info("q_out", TensorProto.UINT8, [1, 16])],
        [scale, zp],
    )
    return _save(graph, tmp_path_factory.mktemp("ort_q") / "qio.onnx")


def _ref(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W + B, 0)


def test_runtime_metadata():
    assert isinstance(RUNTIME, OnnxRuntime)
    assert RUNTIME.name == "onnxruntime" and RUNTIME.extra == "onnxruntime"
    assert set(RUNTIME.formats) == {Format.ONNX, Format.ORT}
    assert RUNTIME.is_available()
    import onnxruntime

    assert RUNTIME.version() == onnxruntime.__version__


def test_specs_and_outputs_match_numpy(dense_path):
    sess = RUNTIME.load(dense_path, threads=1)
    assert [(s.name, s.shape, s.dtype) for s in sess.inputs] == [("x", [None, 8], "float32")]
    assert [(s.name, s.shape, s.dtype) for s in sess.outputs] == [("y", [None, 4], "float32")]
    x = RNG.standard_normal((1, 8)).astype(np.float32)
    (y,) = sess.run([x])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _ref(x), rtol=1e-5, atol=1e-5)
    xb = RNG.standard_normal((5, 8))  # float64 and a larger batch: cast, dynamic dimension accepted
    np.testing.assert_allclose(sess.run([xb])[0], _ref(xb.astype(np.float32)), rtol=1e-5, atol=1e-5)
    sess.close()
    with pytest.raises(InferenceError, match="closed"):
        sess.run([x])


def test_bad_inputs_raise_input_error(dense_path):
    sess = RUNTIME.load(dense_path)
    with pytest.raises(InputError, match="shape"):
        sess.run([np.zeros((1, 7), np.float32)])
    with pytest.raises(InputError, match="1 input"):
        sess.run([np.zeros((1, 8), np.float32)] * 2)
    bad = np.zeros((1, 8), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        sess.run([bad])
    with pytest.raises(InputError, match="dtype"):
        sess.run([np.zeros((1, 8), bool)])


def test_quantized_io_is_quantized_and_dequantized(quant_io_path):
    sess = RUNTIME.load(quant_io_path)
    (spec_in,), (spec_out,) = sess.inputs, sess.outputs
    assert spec_in.dtype == "uint8" and spec_in.scale == pytest.approx(Q_SCALE) and spec_in.zero_point == Q_ZP
    assert spec_out.dtype == "uint8" and spec_out.scale == pytest.approx(Q_SCALE) and spec_out.zero_point == Q_ZP
    x = np.linspace(-3, 3, 16, dtype=np.float32)[None]
    (y,) = sess.run([x])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.maximum(x, 0), atol=Q_SCALE / 2 + 1e-6)
    q = np.round(x / Q_SCALE + Q_ZP).clip(0, 255).astype(np.uint8)
    (raw,) = sess.run([q], raw=True)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, np.maximum(q, Q_ZP))


def test_corrupt_and_missing_files_raise_inference_error(dense_path, tmp_path):
    data = dense_path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InferenceError, match=r"cannot load truncated\.onnx") as info:
        RUNTIME.load(truncated)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.ort"
    garbage.write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(InferenceError, match=r"cannot load garbage\.ort"):
        RUNTIME.load(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InferenceError, match="empty"):
        RUNTIME.load(empty)
    with pytest.raises(InferenceError, match="does not exist"):
        RUNTIME.load(tmp_path / "missing.onnx")
    with pytest.raises(InferenceError, match="threads"):
        RUNTIME.load(dense_path, threads=0)


def test_ort_format_file_runs_like_the_onnx(dense_path, tmp_path):
    from edge_sdk.converters.onnx_to_ort import convert_to_ort

    ort_file, config = convert_to_ort(dense_path, tmp_path, "amd64")
    assert config is not None and "Gemm" in config.read_text()  # MatMul+Add+Relu fused by Fixed optimization
    sess = RUNTIME.load(ort_file, threads=1)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(sess.run([x])[0], _ref(x), rtol=1e-5, atol=1e-5)
