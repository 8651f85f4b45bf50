"""converters/tflite_activations.py: int8 clamps and HARD_SWISH rewritten into ops LiteRT's XNNPACK delegate runs.

Real int8 graphs from the TensorFlow Lite converter (a conv -> hard-swish -> mean -> ReLU6 -> conv net, the shape of
MobileNetV3's squeeze-excitation blocks), run on LiteRT before and after the rewrite.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from edge_sdk.converters.tflite_activations import delegable_activations

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


def _float_model(fn, shape: tuple[int, ...]) -> bytes:
    import tensorflow as tf

    conc = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False)
    return tf.lite.TFLiteConverter.from_concrete_functions([conc.get_concrete_function()]).convert()


def _swap_op(model: bytes, old: int, new: int) -> bytes:
    """``model`` with every ``old`` builtin op turned into ``new`` (RELU_0_TO_1 has no TF op that lowers to it)."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    m = fb.read_model_from_bytearray(bytearray(model))
    for code in m.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == old:
            code.builtinCode, code.deprecatedBuiltinCode = new, min(new, 127)
            code.version = 1
    return bytes(fb.convert_object_to_bytearray(m))


def _float_run(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def test_aeq_rewrite_of_float_hard_sigmoid_and_hard_swish_is_the_same_function():
    import tensorflow as tf

    from edge_sdk.converters.tflite_activations import aeq_quantizable

    x = np.linspace(-8, 8, 4 * 64, dtype=np.float32).reshape(4, 64)
    relu01 = _swap_op(_float_model(tf.nn.relu, (4, 64)), 19, 152)  # RELU -> RELU_0_TO_1
    assert _ops(relu01) == ["RELU_0_TO_1"]
    np.testing.assert_allclose(_float_run(relu01, x), np.clip(x, 0, 1), atol=1e-6)
    hswish = _float_model(lambda v: v * tf.nn.relu6(v + 3.0) / 6.0, (4, 64))
    assert "HARD_SWISH" in _ops(hswish)
    for model, bits, name in ((relu01, 8, "RELU_0_TO_1"), (hswish, 16, "HARD_SWISH")):
        new, done = aeq_quantizable(model, bits)
        assert done == {name: 1} and name not in _ops(new), (done, _ops(new))
        np.testing.assert_allclose(_float_run(new, x), _float_run(model, x), rtol=1e-5, atol=1e-6)
    assert aeq_quantizable(hswish, 8) == (hswish, {})  # int8: the quantizer has HARD_SWISH, XNNPACK's pass splits it


def test_pytorch_hard_swish_squeeze_excite_block_is_fully_integer_and_xnnpack_ready(tmp_path):
    """A MobileNetV3 block (hard-swish, hard-sigmoid squeeze-excitation) from PyTorch: the AI Edge Quantizer now
    quantizes all of it (before, its RELU_0_TO_1 stayed float and PT2E's graph with float islands was used)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edge_sdk.converters.pipeline import convert

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.act = torch.nn.Hardswish()
            self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(16, 4, 1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(4, 16, 1))
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.conv(x))
            gate = torch.clamp(self.se(h) * 0.2 + 0.5, 0.0, 1.0)  # Paddle's hard-sigmoid as onnx2torch writes it
            return self.head((h * gate).mean(dim=(2, 3)))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    val = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    bundle = convert(Block().eval(), out=tmp_path / "b", to="tflite", precision="int8", input_shape=[1, 3, 16, 16],
                     calib=calib, val=val, quiet=True, keep_failed=True, task="classification")
    art = bundle.artifact("tflite", "int8")
    assert art.runtime.get("quantizer", "").startswith("ai-edge-quantizer"), art.notes  # not the PT2E fallback
    ops = _ops(bundle.path_of(art).read_bytes())
    assert not {"DEQUANTIZE", "RELU_0_TO_1", "HARD_SWISH"} & set(ops), ops
    assert "HARD_SWISH" in art.tool_versions.get("tflite_xnnpack_activations", ""), art.tool_versions
    assert art.validation.cosine > 0.98, art.validation


def test_a_file_the_rewrite_cannot_read_is_kept_as_it_is_and_noted(tmp_path):
    """The XNNPACK rewrite is an optional speed pass: on bytes it cannot parse the artifact stays and says so."""
    from types import SimpleNamespace

    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.keras_to_tflite import TFLiteConverter

    path = tmp_path / "odd.tflite"
    data = b"TFL3" + bytes(range(256)) * 4
    path.write_bytes(data)
    notes: list[str] = []
    versions: dict[str, str] = {}
    TFLiteConverter.delegable_int8(SimpleNamespace(options=ConvertOptions()), path, notes, versions)
    assert path.read_bytes() == data and versions == {}
    assert len(notes) == 1 and notes[0].startswith("int8 activations left as they are"), notes
    notes.clear()
    TFLiteConverter.delegable_int8(SimpleNamespace(options=ConvertOptions(extra={"tflite_xnnpack_activations": False})),
                                   path, notes, versions)
    assert notes == [] and path.read_bytes() == data  # off: not even read
