"""converters/tflite_xnnpack.py: int8 clamps and HARD_SWISH rewritten into ops LiteRT's XNNPACK delegate runs.

Real int8 graphs from the TensorFlow Lite converter (a conv -> hard-swish -> mean -> ReLU6 -> conv net, the shape of
MobileNetV3's squeeze-excitation blocks), run on LiteRT before and after the rewrite.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from edge_sdk.converters.tflite_xnnpack import delegable_activations

SHAPE = (1, 16, 16, 8)


def _int8_model(seed: int = 0) -> tuple[bytes, object]:
    """(full-integer .tflite, the float tf.function) of conv -> hard-swish -> mean -> relu6 -> conv -> sigmoid-gate."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    w1 = tf.constant(rng.normal(0, 0.4, (3, 3, 8, 16)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.3, (1, 1, 16, 16)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def net(x):
        h = tf.nn.conv2d(x, w1, 1, "SAME")
        h = h * tf.nn.relu6(h + 3.0) / 6.0                          # HARD_SWISH
        s = tf.nn.relu(tf.reduce_mean(h, axis=[1, 2], keepdims=True))        # MEAN -> RELU: folded
        s = tf.nn.relu6(tf.reduce_mean(s * h, axis=[1, 2], keepdims=True))   # MEAN -> RELU6 up to 13: kept
        g = tf.nn.conv2d(s * 4.0 - 1.0, w2, 1, "SAME")
        return h * tf.clip_by_value(g * 0.2 + 0.5, 0.0, 1.0)         # hard-sigmoid gate

    conv = tf.lite.TFLiteConverter.from_concrete_functions([net.get_concrete_function()])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rng.normal(0, 1, SHAPE).astype(np.float32)] for _ in range(32))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert(), net


def _run(model: bytes, xs: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    (si, zi), (so, zo) = i["quantization"], o["quantization"]
    out = []
    for x in xs:
        it.set_tensor(i["index"], np.clip(np.round(x / si + zi), -128, 127).astype(np.int8))
        it.invoke()
        out.append((it.get_tensor(o["index"]).astype(np.float32) - zo) * so)
    return np.stack(out), [d["op_name"] for d in it._get_ops_details()]


def _ops(model: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return [d["op_name"] for d in Interpreter(model_content=model)._get_ops_details()]


@pytest.fixture(scope="module")
def built() -> tuple[bytes, object]:
    return _int8_model()


def _quant(model: bytes, op_name: str) -> tuple[float, int]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    op = next(o for o in it._get_ops_details() if o["op_name"] == op_name)
    return next(t["quantization"] for t in it.get_tensor_details() if t["index"] == op["outputs"][0])


def test_rewrite_keeps_the_numbers_and_hands_more_to_xnnpack(built):
    model, net = built
    before_ops = _ops(model)
    assert {"HARD_SWISH", "RELU", "RELU6"} <= set(before_ops)  # the converter left them standalone (after MEAN)
    scale6, zp6 = _quant(model, "RELU6")
    assert scale6 * (127 - zp6) > 6.5  # its int8 range goes past 6: only the op itself clamps there
    new, done = delegable_activations(model)
    assert done == {"HARD_SWISH": 1, "RELU": 1}, done
    left = _ops(new)
    assert "HARD_SWISH" not in left and "RELU6" in left
    assert left.count("RELU") == before_ops.count("RELU") - 1  # the gate's MINIMUM -> RELU stays (MINIMUM keeps scales)
    xs = [np.random.default_rng(k).normal(0, 1, SHAPE).astype(np.float32) for k in range(8)]
    ref = np.stack([net(x).numpy() for x in xs])
    before, ops_before = _run(model, xs)
    after, ops_after = _run(new, xs)
    # each op XNNPACK refuses ends a delegated partition (a DELEGATE node): fewer refused ops, fewer partitions
    assert 1 <= ops_after.count("DELEGATE") < ops_before.count("DELEGATE"), (ops_before, ops_after)
    err_before = np.abs(before - ref).mean()
    err_after = np.abs(after - ref).mean()
    scale = np.abs(ref).mean()
    assert err_after < 0.05 * scale, (err_after, scale)       # still the float function, to int8 precision
    assert err_after < 1.5 * err_before + 1e-6, (err_after, err_before)


def test_clamp_that_cuts_inside_the_int8_range_is_kept(built):
    """A clamp whose output range reaches past its bounds, after an op with no fused activation, does real
    clamping: saturation cannot replace it."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model, _ = built
    m = fb.read_model_from_bytearray(bytearray(model))
    sg = m.subgraphs[0]
    relu = next(op for op in sg.operators
                if max(m.operatorCodes[op.opcodeIndex].builtinCode,
                       m.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == 19)
    sg.tensors[relu.outputs[0]].quantization.zeroPoint = [-100]  # the int8 range now reaches below 0
    _, done = delegable_activations(bytes(fb.convert_object_to_bytearray(m)))
    assert "RELU" not in done and done.get("HARD_SWISH") == 1


def test_nothing_to_do_returns_the_same_bytes():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 8), tf.float32)], autograph=False)
    def lin(x):
        return tf.nn.relu(tf.matmul(x, tf.ones((8, 4))))  # RELU fused into FULLY_CONNECTED

    conv = tf.lite.TFLiteConverter.from_concrete_functions([lin.get_concrete_function()])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.ones((1, 8), np.float32) * k] for k in range(4))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    model = conv.convert()
    new, done = delegable_activations(model)
    assert done == {} and new == model
