"""The second ONNX -> TFLite route (converters/onnx_torch_route.py): ONNX -> PyTorch ops (onnx2torch) ->
litert-torch, tried when onnx2tf stops, validated against the ONNX source like every route."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.converters.pipeline import convert
from edge_sdk.converters.routes import routes_for
from edge_sdk.errors import ValidationError
from edge_sdk.formats import Format, Framework

torch = pytest.importorskip("torch")
if not __import__("edge_sdk._deps", fromlist=["has_module"]).has_module("onnx2torch"):
    pytest.skip("onnx2torch is not installed (extra onnx2torch)", allow_module_level=True)
pytest.importorskip("litert_torch")


class _SignalNet(torch.nn.Module):
    """Audio-style front end in channels-last time series (what basic-pitch's CQT does): reflect padding on the
    time axis of a [B, T, 1] input, a 1-D convolution, a shape-computed reshape, a scaled residual add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(1, 8, 9)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(x.transpose(1, 2), (4, 4), mode="reflect")  # [B, 1, T + 8]
        y = torch.relu(self.conv(y)).transpose(1, 2)  # [B, T, 8]
        y = y.reshape(x.shape[0], -1, 8)
        return self.head(y) + 0.5 * y[..., :4]


def _signal_onnx(tmp: Path) -> Path:
    path = tmp / "signal.onnx"
    torch.onnx.export(_SignalNet().eval(), (torch.zeros(1, 64, 1),), str(path), input_names=["audio"],
                      output_names=["feats"], dynamo=False, opset_version=17)
    return path


class _StftVad(torch.nn.Module):
    """Silero-VAD's front end: reflect-padded samples, an STFT as a strided 1-D convolution, the magnitude, then
    1-D convolutions and a sigmoid. onnx2tf's channel-last rewriting breaks the STFT convolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stft = torch.nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.enc = torch.nn.Conv1d(129, 16, 3, padding=1)
        self.out = torch.nn.Conv1d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stft(torch.nn.functional.pad(x.unsqueeze(1), (64, 64), mode="reflect"))
        real, imag = y[:, :129], y[:, 129:]
        mag = torch.sqrt(real * real + imag * imag)
        return torch.sigmoid(self.out(torch.relu(self.enc(mag)))).mean(2)


def test_onnx2tf_stops_and_onnx2torch_ships_an_stft_net(tmp_path: Path) -> None:
    pytest.importorskip("onnx2tf")
    path = tmp_path / "vad.onnx"
    torch.onnx.export(_StftVad().eval(), (torch.zeros(1, 576),), str(path), input_names=["audio"],
                      output_names=["prob"], dynamo=False, opset_version=18)
    calib = (np.random.default_rng(0).standard_normal((16, 1, 576)) * 0.1).astype(np.float32)[:, 0]
    b = convert(str(path), out=tmp_path / "b", to="tflite", precision="fp32", calib=calib, quiet=True)
    (res,) = b.results
    assert res.status == "passed" and res.route == "onnx2torch", res.reason
    assert res.attempts and res.attempts[0].startswith("onnx2tf: onnx2tf failed")
    assert res.validation.cosine > 0.9999


def test_onnx_tflite_routes_are_onnx2tf_then_onnx2torch() -> None:
    assert [r.name for r in routes_for(Framework.ONNX, Format.TFLITE)] == ["onnx2tf", "onnx2torch"]
    assert [r.name for r in routes_for(Framework.PYTORCH, Format.TFLITE)][-1] == "onnx2torch"


def test_reflect_pad_on_a_middle_axis_and_reverse_slice_match_onnx() -> None:
    from edge_sdk.converters.onnx_torch_route import _pad, _slice

    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    got = _pad(x, [0, 2, 0, 0, 1, 0], 0.0, "reflect").numpy()
    want = np.pad(x.numpy(), [(0, 0), (2, 1), (0, 0)], mode="reflect")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_slice(x, [-1], [-9], [1], [-2]).numpy(), x.numpy()[:, ::-2])


def test_forced_onnx2torch_route_converts_and_validates_signal_net(tmp_path: Path) -> None:
    path = _signal_onnx(tmp_path)
    calib = np.random.default_rng(0).standard_normal((32, 1, 64, 1)).astype(np.float32)[:, 0]
    b = convert(str(path), out=tmp_path / "b", to="tflite", precision="fp32,int8", calib=calib,
                route=["tflite=onnx2torch"], quiet=True)
    res = {r.key: r for r in b.results}
    assert res["tflite/fp32"].status == "passed" and res["tflite/fp32"].route == "onnx2torch"
    assert res["tflite/fp32"].validation.cosine > 0.9999
    assert res["tflite/int8"].status == "passed" and res["tflite/int8"].validation.cosine > 0.98
    art = b.artifact("tflite", "fp32")
    assert art.route == "onnx2torch" and "onnx2torch" in art.tool_versions
    assert art.inputs[0].shape == [1, 64, 1]  # the ONNX layout is kept (onnx2tf would make it [1, 1, 64])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_onnx_lstm_is_translated_exactly(tmp_path: Path, bidirectional: bool) -> None:
    import onnxruntime as ort

    from edge_sdk.converters.onnx_torch_route import onnx_to_torch

    torch.manual_seed(1)
    lstm = torch.nn.LSTM(4, 8, batch_first=True, bidirectional=bidirectional).eval()
    d = 2 if bidirectional else 1
    args = (torch.zeros(2, 5, 4), (torch.zeros(d, 2, 8), torch.zeros(d, 2, 8)))
    path = tmp_path / "lstm.onnx"
    torch.onnx.export(lstm, args, str(path), input_names=["x", "h", "c"], dynamo=False, opset_version=17)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 5, 4)).astype(np.float32),
             "h": rng.standard_normal((d, 2, 8)).astype(np.float32),
             "c": rng.standard_normal((d, 2, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(path)).run(None, feeds)
    gm = onnx_to_torch(path, tmp_path)
    with torch.no_grad():
        got = gm(*(torch.from_numpy(v) for v in feeds.values()))
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-5)


def test_matmul_by_a_constant_becomes_a_linear_layer_the_int8_quantizers_annotate(tmp_path: Path) -> None:
    """onnx2torch turns ONNX MatMul into torch.matmul, which PT2E's int8 quantizer leaves float: PP-OCRv4's
    recogniser kept its 6625-class head and 12 more fully connected layers fp32 in its "int8" .tflite. A MatMul by
    a constant matrix (and the constant bias added after it) is now an nn.Linear; a MatMul of two activations
    (attention) is not touched. The translation stays exact."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_sdk.converters.onnx_torch_route import onnx_to_torch

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["b", "xw"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["att"]),  # activation x activation: stays a matmul
             helper.make_node("MatMul", ["att", "h"], ["ah"]),
             helper.make_node("MatMul", ["ah", "w2"], ["y"])]  # no bias after it
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])], inits)
    path = tmp_path / "mm.onnx"
    import onnx

    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((1, 5, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    gm = onnx_to_torch(path, tmp_path)
    kinds = [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    linears = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), torch.nn.Linear)]
    assert len(linears) == 2 and kinds.count("OnnxMatMul") == 2, kinds
    assert sorted(lin.bias is not None for lin in linears) == [False, True]
    assert "OnnxBinaryMathOperation" not in kinds  # the bias Add went into the Linear
    with torch.no_grad():
        got = gm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_graph_onnx2torch_cannot_translate_fails_in_one_line(tmp_path: Path) -> None:
    gru = torch.nn.GRU(4, 8, batch_first=True).eval()
    path = tmp_path / "gru.onnx"
    torch.onnx.export(gru, (torch.zeros(1, 5, 4),), str(path), input_names=["x"], dynamo=False, opset_version=17)
    calib = np.random.default_rng(0).standard_normal((8, 5, 4)).astype(np.float32)
    with pytest.raises(ValidationError) as info:
        convert(str(path), out=tmp_path / "b", to="tflite", precision="fp32", calib=calib,
                route=["tflite=onnx2torch"], quiet=True)
    (reason,) = info.value.failures
    assert "onnx2torch cannot translate this graph: it has no converter for ONNX GRU (opset 14)" in reason
    assert "\n" not in reason and "Traceback" not in reason and not (tmp_path / "b").exists()


def _lcnet_block_onnx(tmp: Path, opset: int = 11) -> Path:
    """Conv -> learnable affine (scale * x + bias, one-element constants) -> Paddle's hard-swish (Add, Clip, Mul,
    Div) -> depthwise conv -> the same again: PP-LCNetV3's block as Paddle2ONNX writes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arr = {"w1": rng.normal(0, 0.3, (16, 8, 1, 1)), "b1": rng.normal(0, 0.1, 16),
           "w2": rng.normal(0, 0.3, (16, 1, 3, 3)), "b2": rng.normal(0, 0.1, 16),
           "s": [1.3], "t": [0.1], "three": [3.0], "six": [6.0], "zero": 0.0, "six_c": 6.0}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in arr.items()]
    nodes = []
    for i, (src, w, b, group) in enumerate((("x", "w1", "b1", 1), ("h0", "w2", "b2", 16))):
        p = f"l{i}_"
        nodes += [helper.make_node("Conv", [src, w, b], [p + "c"], pads=[1, 1, 1, 1] if group > 1 else [0] * 4,
                                   group=group),
                  helper.make_node("Mul", ["s", p + "c"], [p + "m"]),
                  helper.make_node("Add", [p + "m", "t"], [p + "a"]),
                  helper.make_node("Add", [p + "a", "three"], [p + "a3"]),
                  helper.make_node("Clip", [p + "a3", "zero", "six_c"], [p + "r6"]),
                  helper.make_node("Mul", [p + "a", p + "r6"], [p + "xm"]),
                  helper.make_node("Div", [p + "xm", "six"], [f"h{i}" if i == 0 else "y"])]
    graph = helper.make_graph(nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 40])], inits)
    path = tmp / "lcnet.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_lcnet_block_becomes_hardswish_with_python_scalars_and_stays_channels_last(tmp_path: Path) -> None:
    """The hard-swish pattern becomes one hardswish (even at opset 11, where ONNX has no HardSwish) and the
    one-element constants Python numbers, exactly. On PP-OCRv4's recogniser this took litert-torch's layout pass
    from 70 TRANSPOSE ops to 14 (measured on the real model, outside the suite); this small block is converted
    channels-last either way, so here the .tflite check guards the result, not the cause."""
    import onnxruntime as ort

    from edge_sdk.converters.onnx_torch_route import onnx_to_torch

    path = _lcnet_block_onnx(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 40)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    info: dict = {}
    gm = onnx_to_torch(path, tmp_path, info)
    assert info == {"hard_swish_fused": 2, "scalar_operands": 4}, info
    mods = [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert mods.count("Hardswish") == 2 and "OnnxBinaryMathOperation" not in mods, mods
    with torch.no_grad():
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-5)
    bundle = convert(path, out=tmp_path / "b", to="tflite", precision="fp32", route="onnx2torch", quiet=True)
    art = bundle.artifact("tflite", "fp32")
    import ai_edge_litert.interpreter as litert

    ops = [o["op_name"] for o in litert.Interpreter(model_path=str(bundle.path_of(art)))._get_ops_details()]
    assert ops.count("TRANSPOSE") <= 2 and ops.count("HARD_SWISH") == 2, ops  # the input's and the output's
    assert art.validation.passed, art.validation
    assert "2 hard-swish patterns" in art.notes[0] and "4 one-element constants" in art.notes[0], art.notes[0]
