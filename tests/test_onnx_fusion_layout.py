"""What ONNX Runtime really runs of an ONNX int8 model: heads behind layout ops and LSTMs.

converters/onnx_qdq_fusion.py ``ready_for_fusion``: NNCF leaves a classifier head's input DequantizeLinear behind a
Transpose / Reshape, writes a transB weight's axis as -2 and keeps the bias float; ORT then ran the head as a float
Gemm that dequantized its weights on every call (ddddocr's 8210-class head: 7.4 ms of 16 ms). converters/
onnx_weight_only.py: no static quantizer touches an LSTM, so its fp32 weights stayed (31 % of ddddocr's bytes).
The checks look at ORT's optimized graph, at the outputs against the float graph, and at the real ddddocr model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _ort_graph(path: Path, tmp_path: Path) -> list:
    """The nodes ONNX Runtime runs for ``path`` after its QDQ fusions."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return list(onnx.load(so.optimized_model_filepath).graph.node)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _head_model(path: Path, rng: np.random.Generator) -> None:
    """x [T,1,64] -> Q -> DQ -> Transpose -> Reshape -> Gemm (int8 weight [10,64] per channel, axis -2, transB,
    float bias) -> y [T,10]: NNCF's layout of a CTC recogniser's head."""
    w = rng.standard_normal((10, 64)).astype(np.float32)
    w_scale = (np.abs(w).max(1) / 127).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.rint(w / w_scale[:, None]).astype(np.int8), "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(10, np.int8), "w_zp"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("Transpose", ["xd"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["xt", "shape"], ["xr"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=-2),
        helper.make_node("Gemm", ["xr", "w", "bias"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model))
    onnx.save_model(onnx.shape_inference.infer_shapes(model), str(path))


def test_head_gemm_behind_layout_ops_runs_as_qgemm_with_float_output(tmp_path: Path) -> None:
    from edge_sdk.converters.onnx_qdq_fusion import ready_for_fusion

    rng = np.random.default_rng(0)
    path = tmp_path / "head.onnx"
    _head_model(path, rng)
    x = {"x": rng.uniform(-3, 3, (6, 1, 64)).astype(np.float32)}
    before_ops = [n.op_type for n in _ort_graph(path, tmp_path)]
    assert "QGemm" not in before_ops and "Gemm" in before_ops, before_ops
    before = _run(path, x)[0]
    record = ready_for_fusion(path)
    assert record == {"onnx_fusion_layout": "1 dequantize moved to their layer, 1 biases int32, "
                                            "1 axes made positive"}, record
    nodes = _ort_graph(path, tmp_path)
    qgemm = [n for n in nodes if n.op_type == "QGemm"]
    assert len(qgemm) == 1 and "Gemm" not in [n.op_type for n in nodes], [n.op_type for n in nodes]
    assert len([i for i in qgemm[0].input if i]) == 7 and qgemm[0].output[0] == "y"  # no y_scale: float output
    after = _run(path, x)[0]
    bias_step = float(0.03 * numpy_helper.to_array(
        next(i for i in onnx.load(str(path)).graph.initializer if i.name == "w_scale")).max())
    np.testing.assert_allclose(after, before, atol=bias_step + 1e-4)  # same values but for the bias rounding
    assert ready_for_fusion(path) == {}  # nothing left to do


def _lstm_model(path: Path, rng: np.random.Generator, layout: int = 0) -> dict[str, np.ndarray]:
    """A bidirectional LSTM (input 32, hidden 48) with real-looking weights; returns its feeds."""
    hidden, inp, dirs, steps = 48, 32, 2, 12
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, 4 * hidden, inp)) * 0.2).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((dirs, 4 * hidden, hidden)) * 0.2).astype(np.float32),
                                     "R"),
             numpy_helper.from_array((rng.standard_normal((dirs, 8 * hidden)) * 0.1).astype(np.float32), "B")]
    x_shape = [steps, 1, inp] if layout == 0 else [1, steps, inp]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h", "y_c"], hidden_size=hidden,
                            direction="bidirectional", layout=layout, name="rnn")
    y_shape = [steps, dirs, 1, hidden] if layout == 0 else [1, steps, dirs, hidden]
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return {"x": rng.standard_normal(x_shape).astype(np.float32)}


def test_lstm_weights_become_int8_and_the_outputs_stay(tmp_path: Path) -> None:
    from edge_sdk.converters.onnx_weight_only import quantize_lstm_weights

    rng = np.random.default_rng(1)
    path = tmp_path / "lstm.onnx"
    feeds = _lstm_model(path, rng)
    ref = _run(path, feeds)[0]
    size = path.stat().st_size
    assert quantize_lstm_weights(path) == {"onnx_lstm_int8": "1 of 1 LSTM"}
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeLSTM"]
    assert {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and i.name in ("W", "R")} \
        == set()  # the fp32 copies are gone
    assert path.stat().st_size < 0.4 * size, (path.stat().st_size, size)
    got = _run(path, feeds)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999 and np.abs(got - ref).max() < 0.05, (cos, np.abs(got - ref).max())
    # batch-major LSTMs: DynamicQuantizeLSTM has no layout attribute; ORT's own rewrite would drop it silently
    major = tmp_path / "lstm_batch_major.onnx"
    _lstm_model(major, rng, layout=1)
    record = quantize_lstm_weights(major)
    assert record == {"onnx_lstm_int8": "0 of 1 LSTM (float: rnn: batch-major layout)"}, record
    assert [n.op_type for n in onnx.load(str(major)).graph.node] == ["LSTM"]
    # only the last hidden state used: the LSTM's first output is "" (optional), the rewrite still finds it
    last = tmp_path / "lstm_last_state.onnx"
    feeds = _lstm_model(last, rng)
    m = onnx.load(str(last))
    m.graph.node[0].output[0] = ""
    m.graph.node[0].output[1] = "y"
    m.graph.output[0].type.tensor_type.shape.Clear()
    onnx.save_model(m, str(last))
    ref = _run(last, feeds)[0]
    assert quantize_lstm_weights(last) == {"onnx_lstm_int8": "1 of 1 LSTM"}
    assert [n.op_type for n in onnx.load(str(last)).graph.node] == ["DynamicQuantizeLSTM"]
    got = _run(last, feeds)[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.05


def test_layers_the_quantizer_skipped_get_int8_weights_and_layers_kept_float_do_not(tmp_path: Path) -> None:
    """NNCF leaves squeeze-excitation convs float (PP-OCRv4's recogniser: 0.32x -> 0.28x fp32 size with this);
    a layer kept float on purpose (the budget's float nodes) keeps its fp32 weights."""
    from edge_sdk.converters.onnx_weight_only import weight_only_int8

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((128, 64, 1, 1)).astype(np.float32) * 0.1, "w_se"),
             numpy_helper.from_array(rng.standard_normal((64, 128, 1, 1)).astype(np.float32) * 0.1, "w_keep"),
             numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) * 0.1, "w_tiny")]
    nodes = [helper.make_node("Conv", ["x", "w_se"], ["a"], name="se"),
             helper.make_node("Conv", ["a", "w_keep"], ["b"], name="keep"),
             helper.make_node("Flatten", ["b"], ["f"]),
             helper.make_node("MatMul", ["f", "w_tiny"], ["y"], name="tiny")]  # 640 weights: not worth it
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    path = tmp_path / "se.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {"x": rng.standard_normal((1, 64, 1, 1)).astype(np.float32)}
    ref = _run(path, feeds)[0]
    size = path.stat().st_size
    assert weight_only_int8(path, {"keep"}) == {"onnx_weight_only_int8": "1 layers"}
    model = onnx.load(str(path))
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) > 1}
    assert floats == {"w_keep", "w_tiny"}, floats
    assert path.stat().st_size < size - 20000  # 8192 weights: 32 kB fp32 -> 8 kB int8 + scales
    got = _run(path, feeds)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999, cos
    assert weight_only_int8(path, {"keep"}) == {}  # nothing left to do


@pytest.mark.slow
def test_real_ddddocr_int8_is_a_quarter_of_fp32_and_runs_every_layer_in_int8(tmp_path: Path) -> None:
    """ddddocr's CRNN (CNN + BiLSTM + 8210-class CTC head), its real weights, 100 held-out real text crops. Before:
    0.49x fp32 size (fp32 LSTM), head a float Gemm, 0.95x fp32 latency on a VNNI host; after: 0.25x, QGemm,
    0.35x (1 thread; timed by benchmarks/budget_corpus.py, not here). Asserted: size, what ORT runs, and the
    per-position top-1 agreement, which holds within 0.5 pp of the same int8 without the two passes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import corpus

    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.pipeline import convert

    model = corpus.get("ddddocr-ocr")
    kwargs = model.source()
    source = kwargs.pop("source")
    calib, val = model.inputs(64, seed=1), model.inputs(100, seed=2)
    paths, manifests = {}, {}
    for on in (False, True):
        bundle = convert(source, out=tmp_path / f"b_{on}", to="onnx", precision="fp32,int8", ort=False, quiet=True,
                         calib=calib, val=val, keep_failed=True, options=ConvertOptions(
                             extra={"onnx_lstm_int8": on, "onnx_fusion_layout": on}), **kwargs)
        paths[on] = {a.precision: bundle.path_of(a) for a in bundle.artifacts}
        manifests[on] = next(a for a in bundle.artifacts if a.precision == "int8").tool_versions
    assert manifests[True]["onnx_lstm_int8"] == "1 of 1 LSTM" and "onnx_lstm_int8" not in manifests[False]
    fp32 = paths[True]["fp32"].stat().st_size
    assert paths[True]["int8"].stat().st_size < 0.27 * fp32 < paths[False]["int8"].stat().st_size
    ops = [n.op_type for n in _ort_graph(paths[True]["int8"], tmp_path)]
    assert "QGemm" in ops and "DynamicQuantizeLSTM" in ops and not {"Gemm", "LSTM", "Conv"} & set(ops), ops

    def predictions(p: Path) -> list[np.ndarray]:
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return [sess.run(None, {name: val[i:i + 1]})[0].argmax(-1) for i in range(len(val))]

    ref = predictions(paths[True]["fp32"])
    agree = {on: float(np.mean([(a == r).mean() for a, r in zip(predictions(paths[on]["int8"]), ref, strict=True)]))
             for on in (False, True)}
    assert agree[True] >= agree[False] - 0.005 and agree[True] >= 0.95, agree


@pytest.mark.parametrize("opset", [13, 17])
def test_hard_swish_written_out_becomes_one_op_with_the_same_values(tmp_path: Path, opset: int) -> None:
    """Paddle2ONNX writes hard-swish as Add -> Clip -> Mul -> Div (PP-OCRv4's recogniser: 28 of them, float between
    its int8 layers). Both written forms (/ 6 and * 1/6) become one HardSwish (opset >= 14) or HardSigmoid * x; a
    Clip to other bounds is left alone; the values stay."""
    from edge_sdk.converters.onnx_hard_swish import fuse_hard_swish

    def scalar(v: float, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(v, np.float32), name)

    inits = [scalar(3.0, "three"), scalar(0.0, "zero"), scalar(6.0, "six"), scalar(1 / 6, "sixth"),
             scalar(4.0, "four")]
    nodes = [helper.make_node("Add", ["x", "three"], ["a1"]), helper.make_node("Clip", ["a1", "zero", "six"], ["c1"]),
             helper.make_node("Mul", ["x", "c1"], ["m1"]), helper.make_node("Div", ["m1", "six"], ["h1"]),
             helper.make_node("Add", ["three", "h1"], ["a2"]),  # the other operand order, * 1/6
             helper.make_node("Clip", ["a2", "zero", "six"], ["c2"]), helper.make_node("Mul", ["c2", "h1"], ["m2"]),
             helper.make_node("Mul", ["m2", "sixth"], ["h2"]),
             helper.make_node("Add", ["h2", "three"], ["a3"]),  # relu4, not relu6: not a hard-swish
             helper.make_node("Clip", ["a3", "zero", "four"], ["c3"]), helper.make_node("Mul", ["h2", "c3"], ["m3"]),
             helper.make_node("Div", ["m3", "six"], ["y"])]
    graph = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path, fused = tmp_path / "hs.onnx", tmp_path / "hs_fused.onnx"
    onnx.save_model(model, str(path))
    assert fuse_hard_swish(model) == 2
    onnx.checker.check_model(model)
    onnx.save_model(model, str(fused))
    ops = [n.op_type for n in model.graph.node]
    if opset >= 14:
        assert ops.count("HardSwish") == 2 and ops.count("Clip") == 1 and ops.count("Div") == 1, ops
    else:
        assert ops.count("HardSigmoid") == 2 and ops.count("Clip") == 1, ops
    x = {"x": np.linspace(-8, 8, 128, dtype=np.float32).reshape(2, 64)}
    np.testing.assert_allclose(_run(fused, x)[0], _run(path, x)[0], rtol=1e-5, atol=1e-5)
