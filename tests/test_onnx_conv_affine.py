"""converters/onnx_conv_affine.py: constant scale / shift around Convs folded into their weights, exactly.

The graph is PP-LCNetV3's block as Paddle2ONNX writes it (PP-OCRv4's recogniser backbone): Conv -> learnable
``scale * x + bias`` -> activation -> learnable ``scale * x + bias`` -> the next Conv (a padded depthwise one, then
a 1x1 one), with one-element constants, the scale first. ONNX Runtime runs the graph before and after.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_sdk.converters.onnx_conv_affine import fold_conv_affine  # noqa: E402


def _model(extra_reader: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arr = {"w1": rng.normal(0, .3, (16, 8, 1, 1)), "b1": rng.normal(0, .1, 16), "w2": rng.normal(0, .3, (16, 1, 3, 3)),
           "b2": rng.normal(0, .1, 16), "w3": rng.normal(0, .3, (8, 16, 1, 1)), "b3": rng.normal(0, .1, 8),
           "s1": [1.3], "t1": rng.normal(0, .2, (16, 1, 1)), "s2": [0.7], "t2": [0.25], "s3": [1.1], "t3": [-0.4]}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arr.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
             helper.make_node("Mul", ["s1", "c1"], ["m1"]),       # after a conv: into its weights
             helper.make_node("Add", ["m1", "t1"], ["a1"]),       # per-channel shift: into its bias
             helper.make_node("HardSigmoid", ["a1"], ["g1"]),
             helper.make_node("Mul", ["a1", "g1"], ["h1"]),
             helper.make_node("Mul", ["h1", "s2"], ["m2"]),       # before a padded conv: the scale goes in,
             helper.make_node("Add", ["m2", "t2"], ["a2"]),       # the shift stays in front as t2 / s2
             helper.make_node("Conv", ["a2", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Mul", ["s3", "r2"], ["m3"]),       # before a 1x1 conv: both go in
             helper.make_node("Add", ["m3", "t3"], ["a3"]),
             helper.make_node("Conv", ["a3", "w3", "b3"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 20])]
    if extra_reader:  # m1 is read twice: the chain after the first conv must stop before it
        nodes.append(helper.make_node("Relu", ["m1"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 16, 6, 20]))
    graph = helper.make_graph(nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 20])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_scale_and_shift_around_convs_fold_exactly(tmp_path: Path) -> None:
    model = _model()
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 20)).astype(np.float32)
    want = _run(model, x)
    folded = fold_conv_affine(model)
    onnx.checker.check_model(model)
    kinds = [n.op_type for n in model.graph.node]
    # m1 + a1 into conv 1, m2 into conv 2 (a2 kept, rewritten), m3 + a3 into conv 3
    assert folded == 5 and kinds.count("Mul") == 1 and kinds.count("Add") == 1, kinds  # left: hard-swish Mul, a2
    add = next(n for n in model.graph.node if n.op_type == "Add")
    shift = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == add.input[1]))
    np.testing.assert_allclose(shift, [0.25 / 0.7], rtol=1e-6)
    np.testing.assert_allclose(_run(model, x)[0], want[0], rtol=1e-4, atol=1e-5)
    names = {i.name for i in model.graph.initializer}
    assert not {"w1", "w2", "w3", "s1", "t1", "s3", "t3"} & names, names  # replaced constants are gone


def test_a_tensor_read_elsewhere_is_not_folded_past() -> None:
    model = _model(extra_reader=True)
    x = np.random.default_rng(2).standard_normal((1, 8, 6, 20)).astype(np.float32)
    want = _run(model, x)
    folded = fold_conv_affine(model)
    assert folded == 4  # conv 1 takes s1 but not t1: m1 has a second reader (the side Relu)
    got = _run(model, x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
