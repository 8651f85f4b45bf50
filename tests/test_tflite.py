"""TFLite / LiteRT: Keras, PyTorch (litert-torch) and ONNX (onnx2tf) converters and the LiteRT runtime.

Small CNNs trained briefly on scikit-learn digits (upsampled to 28x28) are converted at every precision and
run in the LiteRT session; outputs are compared with the source model on 100 held-out digits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConversionContext, ConvertOptions
from edge_sdk.errors import CalibrationError, InferenceError, InputError, UnsupportedConversionError
from edge_sdk.formats import Format, Precision

pytest.importorskip("ai_edge_litert")

from edge_sdk.runtimes.litert import LiteRTRuntime

N_VAL = 100


# ---------------------------------------------------------------- data and helpers

@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) float32 digits in [0, 1] and their labels."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    x = zoom(d.images.astype(np.float32) / 16.0, (1, 3.5, 3.5), order=1).clip(0, 1).astype(np.float32)
    return x, d.target.astype(np.int64)


def _metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    max_abs = float(np.abs(ref - got).max())
    return {"cos": float(cos.min()), "max_abs": max_abs, "rel_max_abs": max_abs / float(np.abs(ref).max()),
            "top1": float((ref.argmax(1) == got.argmax(1)).mean())}


def _run_all(path: Path, xs: np.ndarray, **load_kw) -> np.ndarray:
    session = LiteRTRuntime().load(path, threads=1, **load_kw)
    try:
        return np.concatenate([session.run([xs[i:i + 1]])[0] for i in range(len(xs))])
    finally:
        session.close()


# ---------------------------------------------------------------- runtime errors (no conversion needed)

@pytest.fixture(scope="session")
def tiny_tflite(tmp_path_factory) -> Path:
    """A two-op float model written by the TFLite converter from a concrete function."""
    tf = pytest.importorskip("tensorflow")

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def f(x):
        return tf.nn.relu(x * 2.0 - 1.0)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path = tmp_path_factory.mktemp("tiny") / "tiny.tflite"
    path.write_bytes(conv.convert())
    return path


def test_runtime_runs_and_checks_inputs(tiny_tflite: Path) -> None:
    rt = LiteRTRuntime()
    assert rt.is_available() and rt.version()
    s = rt.load(tiny_tflite, threads=1)
    x = np.array([[-1.0, 0.25, 1.0, 3.0]], np.float32)
    np.testing.assert_allclose(s.run([x])[0], np.maximum(2 * x - 1, 0), rtol=1e-6)
    assert s.inputs[0].shape == [1, 4] and s.inputs[0].dtype == "float32"
    with pytest.raises(InputError, match="shape"):
        s.run([np.zeros((1, 5), np.float32)])
    with pytest.raises(InputError, match="NaN"):
        s.run([np.full((1, 4), np.nan, np.float32)])
    with pytest.raises(InputError, match="takes 1 input"):
        s.run([x, x])
    with pytest.raises(InputError, match="dtype"):
        s.run([np.zeros((1, 4), np.bool_)])
    s.close()
    with pytest.raises(InferenceError, match="closed"):
        s.run([x])


def test_runtime_rejects_corrupt_files(tiny_tflite: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(tiny_tflite.read_bytes()[: tiny_tflite.stat().st_size // 3])
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer at all" * 20)
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.tflite"):
        with pytest.raises(InferenceError) as info:
            LiteRTRuntime().load(bad)
        assert "\n" not in str(info.value) and bad.name in str(info.value)


def test_runtime_edgetpu_missing_is_named(tiny_tflite: Path) -> None:
    import ctypes

    try:
        ctypes.CDLL("libedgetpu.so.1")
        pytest.skip("libedgetpu is installed on this host")
    except OSError:
        pass
    with pytest.raises(InferenceError, match=r"libedgetpu\.so\.1 is not installed"):
        LiteRTRuntime().load(tiny_tflite, delegate="edgetpu")
    with pytest.raises(InferenceError, match="unknown LiteRT delegate"):
        LiteRTRuntime().load(tiny_tflite, delegate="gpu-please")


# ---------------------------------------------------------------- Keras -> TFLite

@pytest.fixture(scope="session")
def keras_case(digits, tmp_path_factory):
    """(source, ctx, val inputs NHWC, reference outputs) for a trained Keras CNN."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    import edge_sdk.converters.keras_to_tflite  # noqa: F401  (registers the converter)
    from edge_sdk.converters.sources import load_source

    x, y = digits
    x = x[..., None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, padding="same"), keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x[:1400], y[:1400], epochs=4, batch_size=32, verbose=0)
    val = x[1400:1400 + N_VAL]
    ref = np.asarray(model.predict(val, verbose=0))
    assert (ref.argmax(1) == y[1400:1400 + N_VAL]).mean() > 0.6  # it learned something
    src = load_source(model, input_shape=[1, 28, 28, 1])
    ctx = ConversionContext(src, tmp_path_factory.mktemp("keras_tfl"), calibration=SampleSet([x[:200]]))
    yield src, ctx, val, ref
    src.close()


@pytest.fixture(scope="session")
def keras_artifacts(keras_case):
    from edge_sdk.converters.base import get_converter

    src, ctx, _, _ = keras_case
    conv = get_converter(src.framework, Format.TFLITE)
    return {p: conv.convert(ctx, p)[0] for p in (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8)}


@pytest.mark.parametrize("precision, min_cos, max_rel, min_top1", [
    (Precision.FP32, 0.99999, 1e-5, 1.0),
    (Precision.FP16, 0.9999, 0.005, 0.98),
    (Precision.DYNAMIC, 0.999, 0.05, 0.97),
    (Precision.INT8, 0.99, 0.15, 0.95),
])
def test_keras_precisions_match_source(keras_case, keras_artifacts, precision, min_cos, max_rel, min_top1) -> None:
    _, _, val, ref = keras_case
    draft = keras_artifacts[precision]
    m = _metrics(ref, _run_all(draft.path, val))
    print(f"keras {precision.value}: {m} size={draft.path.stat().st_size}")
    assert m["cos"] >= min_cos and m["rel_max_abs"] <= max_rel and m["top1"] >= min_top1, m
    assert draft.format is Format.TFLITE and draft.precision is precision and draft.input_layout is None
    assert draft.runtime["runtime"] == "litert" and "tensorflow" in draft.tool_versions


def test_keras_int8_is_full_integer_and_small(keras_case, keras_artifacts) -> None:
    _, _, val, _ = keras_case
    fp32 = keras_artifacts[Precision.FP32].path.stat().st_size
    int8 = keras_artifacts[Precision.INT8]
    assert int8.path.stat().st_size <= 0.3 * fp32
    assert keras_artifacts[Precision.FP16].path.stat().st_size <= 0.6 * fp32
    session = LiteRTRuntime().load(int8.path)
    spec_in, spec_out = session.inputs[0], session.outputs[0]
    assert spec_in.dtype == "int8" and spec_out.dtype == "int8" and spec_in.scale and spec_out.scale
    assert int8.runtime["input_dtypes"] == ["int8"]
    raw = session.run([np.round(val[:1] / spec_in.scale + spec_in.zero_point).clip(-128, 127).astype(np.int8)],
                      raw=True)[0]
    assert raw.dtype == np.int8
    np.testing.assert_allclose((raw.astype(np.float32) - spec_out.zero_point) * spec_out.scale,
                               session.run([val[:1]])[0], atol=1e-6)
    with pytest.raises(InputError, match="dtype"):
        session.run([np.zeros((1, 28, 28, 1), np.int32)], raw=True)


def test_keras_int8_float_io_option(keras_case) -> None:
    from edge_sdk.converters.keras_to_tflite import KerasToTFLite

    src, ctx, val, ref = keras_case
    ctx2 = ConversionContext(src, ctx.workdir / "float_io", calibration=ctx.calibration,
                             options=ConvertOptions(tflite_int8_io=False))
    draft = KerasToTFLite().convert(ctx2, Precision.INT8)[0]
    assert draft.runtime["input_dtypes"] == ["float32"] and draft.runtime["output_dtypes"] == ["float32"]
    assert _metrics(ref, _run_all(draft.path, val))["top1"] >= 0.95


def test_keras_int8_needs_calibration(keras_case) -> None:
    from edge_sdk.converters.keras_to_tflite import KerasToTFLite

    src, ctx, _, _ = keras_case
    with pytest.raises(CalibrationError, match="calibration"):
        KerasToTFLite().convert(ConversionContext(src, ctx.workdir / "nocal"), Precision.INT8)
    with pytest.raises(UnsupportedConversionError, match="palettized"):
        KerasToTFLite().convert(ctx, Precision.PALETTIZED)


def test_keras_flex_ops_are_rejected_by_name(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    from edge_sdk.converters.keras_to_tflite import KerasToTFLite
    from edge_sdk.converters.sources import load_source

    class Det(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"det": tf.linalg.det(x)}

    mod = Det()
    tf.saved_model.save(mod, str(tmp_path / "sm"), signatures={"serving_default": mod.serve})
    src = load_source(tmp_path / "sm", input_shape=[1, 4, 4])
    with pytest.raises(UnsupportedConversionError, match="MatrixDeterminant") as info:
        KerasToTFLite().convert(ConversionContext(src, tmp_path / "work"), Precision.FP32)
    assert "Flex" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- PyTorch -> TFLite (litert-torch)

def _torch_cnn():
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
    ), torch


@pytest.fixture(scope="session")
def torch_trained(digits):
    """A small CNN trained for a few epochs on NCHW digits, and the NCHW arrays."""
    pytest.importorskip("torch")
    model, torch = _torch_cnn()
    torch.manual_seed(0)
    x, y = digits
    xt, yt = torch.from_numpy(x[:1400, None]), torch.from_numpy(y[:1400])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    model.eval()
    return model, x[:, None]


@pytest.fixture(scope="session")
def torch_case(torch_trained, tmp_path_factory):
    pytest.importorskip("litert_torch")
    import torch

    import edge_sdk.converters.torch_to_tflite  # noqa: F401
    from edge_sdk.converters.sources import load_source

    model, x = torch_trained
    src = load_source(model, input_shape=[1, 1, 28, 28])
    val = x[1400:1400 + N_VAL]
    with torch.no_grad():
        ref = model(torch.from_numpy(val)).numpy()
    ctx = ConversionContext(src, tmp_path_factory.mktemp("torch_tfl"), calibration=SampleSet([x[:100]]))
    return src, ctx, val, ref


@pytest.mark.parametrize("precision, min_cos, max_rel, min_top1", [
    (Precision.FP32, 0.99999, 1e-5, 1.0),
    pytest.param(Precision.INT8, 0.99, 0.15, 0.95, marks=pytest.mark.slow),
    pytest.param(Precision.FP16, 0.9999, 0.005, 0.98, marks=pytest.mark.slow),
    pytest.param(Precision.DYNAMIC, 0.999, 0.05, 0.97, marks=pytest.mark.slow),
])
def test_torch_precisions_match_source(torch_case, precision, min_cos, max_rel, min_top1) -> None:
    from edge_sdk.converters.base import get_converter

    src, ctx, val, ref = torch_case
    draft = get_converter(src.framework, Format.TFLITE).convert(ctx, precision)[0]
    m = _metrics(ref, _run_all(draft.path, val))  # NCHW inputs: the layout stays PyTorch's
    print(f"torch {precision.value}: {m} size={draft.path.stat().st_size} io={draft.runtime}")
    assert m["cos"] >= min_cos and m["rel_max_abs"] <= max_rel and m["top1"] >= min_top1, m
    assert draft.input_layout is None and draft.runtime["input_layout"] == "NCHW"
    session = LiteRTRuntime().load(draft.path)
    assert session.inputs[0].shape == [1, 1, 28, 28]
    want = "int8" if precision is Precision.INT8 else "float32"
    assert session.inputs[0].dtype == want and session.outputs[0].dtype == want
    if precision is Precision.INT8:
        fp32 = ctx.path_for(Format.TFLITE, Precision.FP32, ".tflite")
        if fp32.exists():
            assert draft.path.stat().st_size <= 0.35 * fp32.stat().st_size


def test_torchscript_is_unsupported(torch_trained, tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    import torch

    from edge_sdk.converters.sources import TorchSource
    from edge_sdk.converters.torch_to_tflite import TorchToTFLite

    model, _ = torch_trained
    scripted = torch.jit.trace(model, torch.zeros(1, 1, 28, 28))
    src = TorchSource(scripted, [[1, 1, 28, 28]])
    with pytest.raises(UnsupportedConversionError, match="TorchScript"):
        TorchToTFLite().convert(ConversionContext(src, tmp_path), Precision.FP32)


# ---------------------------------------------------------------- ONNX -> TFLite (onnx2tf)

@pytest.fixture(scope="session")
def onnx_case(torch_trained, tmp_path_factory):
    pytest.importorskip("onnx2tf")
    pytest.importorskip("onnxruntime")
    import torch

    import edge_sdk.converters.onnx_to_tflite  # noqa: F401
    from edge_sdk.converters.sources import load_source

    model, x = torch_trained
    path = tmp_path_factory.mktemp("onnx_src") / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=True, external_data=False, verbose=False)
    src = load_source(path)
    val = x[1400:1400 + N_VAL]
    ref = np.concatenate([src.predict([val[i:i + 1]])[0] for i in range(len(val))])
    ctx = ConversionContext(src, tmp_path_factory.mktemp("onnx_tfl"), calibration=SampleSet([x[:100]]))
    return src, ctx, val, ref, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("precision, min_cos, max_rel, min_top1", [
    (Precision.FP32, 0.99999, 1e-5, 1.0),
    pytest.param(Precision.FP16, 0.9999, 0.005, 0.98, marks=pytest.mark.slow),
    pytest.param(Precision.DYNAMIC, 0.999, 0.05, 0.97, marks=pytest.mark.slow),
    pytest.param(Precision.INT8, 0.99, 0.15, 0.95, marks=pytest.mark.slow),
])
def test_onnx2tf_precisions_match_source(onnx_case, precision, min_cos, max_rel, min_top1) -> None:
    from edge_sdk.converters.base import get_converter

    src, ctx, val, ref, digest = onnx_case
    draft = get_converter(src.framework, Format.TFLITE).convert(ctx, precision)[0]
    assert draft.input_layout == "NHWC" and draft.runtime["input_permutation"] == [0, 2, 3, 1]
    m = _metrics(ref, _run_all(draft.path, np.ascontiguousarray(val.transpose(0, 2, 3, 1))))
    print(f"onnx2tf {precision.value}: {m} size={draft.path.stat().st_size} io={draft.runtime}")
    assert m["cos"] >= min_cos and m["rel_max_abs"] <= max_rel and m["top1"] >= min_top1, m
    assert hashlib.sha256(Path(src.path).read_bytes()).hexdigest() == digest  # source never rewritten
    if precision is Precision.INT8:
        assert draft.runtime["input_dtypes"] == ["int8"]
        fp32 = ctx.path_for(Format.TFLITE, Precision.FP32, ".tflite")
        if fp32.exists():
            assert draft.path.stat().st_size <= 0.3 * fp32.stat().st_size


# ---------------------------------------------------------------- PyTorch int8: conv + ReLU6 fusion

def _relu6_net():
    """A MobileNetV2-like block (conv-BN-ReLU6, depthwise, linear projection + residual) with wide pre-clamp
    activations, so an unfused ReLU6 quantized with the conv's range would lose most of its precision."""
    import torch
    from torch import nn

    def cbr(i: int, o: int, k: int, s: int = 1, g: int = 1) -> list:
        return [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(*cbr(3, 16, 3, 2), *cbr(16, 16, 3, g=16))
            self.proj = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
            self.head = nn.Sequential(*cbr(16, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            y = self.stem(x)
            return self.head(y + self.proj(y))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4.0)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 1.5)
    return net.eval(), torch


@pytest.mark.slow
def test_torch_int8_fuses_relu6_into_conv(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter

    from edge_sdk.converters.sources import load_source
    from edge_sdk.converters.torch_to_tflite import TorchToTFLite

    model, torch = _relu6_net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(164, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[100:])).numpy()
    src = load_source(model, input_shape=[1, 3, 32, 32])
    ctx = ConversionContext(src, tmp_path, calibration=SampleSet([x[:100]]))
    draft = TorchToTFLite().convert(ctx, Precision.INT8)[0]
    interp = Interpreter(model_path=str(draft.path))
    ops = interp._get_ops_details()
    names = {o["op_name"] for o in ops}
    assert not names & {"RELU6", "RELU_N1_TO_1", "MINIMUM", "MAXIMUM", "HARD_SWISH"}, names  # fused into convs
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    dw_out = [tensors[o["outputs"][0]] for o in ops if o["op_name"] == "DEPTHWISE_CONV_2D"]
    assert dw_out, names
    for t in dw_out:  # the ReLU6 output range [0, 6] (or narrower), not the much wider pre-clamp conv range
        scale, zero_point = t["quantization"]
        assert 0 < scale <= 6 / 255 * 1.001 and zero_point == -128, t["quantization"]
    m = _metrics(ref, _run_all(draft.path, x[100:]))
    print(f"torch int8 relu6 net: {m}")
    assert m["cos"] >= 0.99 and m["top1"] >= 0.95, m
