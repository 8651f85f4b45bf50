"""ONNX -> OpenVINO converter and OpenVINO runtime, checked against a small trained torch CNN.

The model is trained for a few seconds on scikit-learn digits (8x8 upscaled to 3x32x32) so that
activations and calibration data are realistic; every artifact is compared with the torch model on
held-out digits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConversionContext, ConvertOptions, get_converter
from edge_sdk.errors import CalibrationError, InferenceError, InputError, UnsupportedConversionError
from edge_sdk.formats import Format, Precision

torch = pytest.importorskip("torch")
pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("sklearn")

from edge_sdk.converters.pipeline import load_builtin_converters  # noqa: E402
from edge_sdk.converters.sources import load_source  # noqa: E402
from edge_sdk.runtimes.openvino import OpenVINORuntime  # noqa: E402

SHAPE = [1, 3, 32, 32]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x.repeat(1, 3, 1, 1) - 0.5) / 0.5).numpy().astype(np.float32)
    return x, d.target.astype(np.int64)


def _cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )


@pytest.fixture(scope="session")
def trained() -> dict:
    """A CNN trained on digits 0..1199; returns model, calibration and held-out test inputs."""
    torch.manual_seed(0)
    x, y = _digits()
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core box spin and run ~25x slower
    try:
        for _ in range(150):
            idx = torch.randint(0, 1200, (32,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    test = x[1500:]
    with torch.no_grad():
        ref = model(torch.from_numpy(test)).numpy()
    acc = float(np.mean(ref.argmax(1) == y[1500:]))
    assert acc > 0.8, f"test model did not train (accuracy {acc:.2f})"
    return {"model": model, "calib": x[:200], "test": test, "ref": ref}


@pytest.fixture(scope="session")
def artifacts(trained, tmp_path_factory) -> dict:
    """fp32 / fp16 / int8 OpenVINO drafts converted from the torch source (one shared ONNX export)."""
    load_builtin_converters()
    src = load_source(trained["model"], input_shape=SHAPE)
    ctx = ConversionContext(src, tmp_path_factory.mktemp("ov"), calibration=SampleSet([trained["calib"]]))
    conv = get_converter(src.framework, Format.OPENVINO)
    out = {p: conv.convert(ctx, p)[0] for p in (Precision.FP32, Precision.FP16, Precision.INT8)}
    out["ctx"] = ctx
    return out


def _run_all(path: Path, test: np.ndarray, **kw) -> np.ndarray:
    sess = OpenVINORuntime().load(path, **kw)
    try:
        return np.concatenate([sess.run([test[i:i + 1]])[0] for i in range(len(test))])
    finally:
        sess.close()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _size(draft) -> int:
    return os.path.getsize(draft.path) + sum(os.path.getsize(f) for f in draft.files)


def test_drafts_describe_xml_and_bin(artifacts):
    for p in (Precision.FP32, Precision.FP16, Precision.INT8):
        d = artifacts[p]
        assert d.format is Format.OPENVINO and d.precision is p
        assert d.path.suffix == ".xml" and d.path.is_file()
        assert d.files == [d.path.with_suffix(".bin")] and d.files[0].stat().st_size > 0
        assert d.runtime["precision_hint"] == "f32" and d.runtime["device"] == "CPU"
        assert d.tool_versions["openvino"][0].isdigit()
    assert "nncf" in artifacts[Precision.INT8].tool_versions
    assert "nncf" not in artifacts[Precision.FP32].tool_versions


def test_fp32_matches_torch(artifacts, trained):
    got = _run_all(artifacts[Precision.FP32].path, trained["test"])
    assert np.abs(got - trained["ref"]).max() < 1e-4
    assert _cos(got, trained["ref"]).min() > 0.999999


def test_fp16_close_to_torch_and_half_the_weights(artifacts, trained):
    got = _run_all(artifacts[Precision.FP16].path, trained["test"])
    ref = trained["ref"]
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert _cos(got, ref).min() > 0.9999
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.99
    fp32_bin = artifacts[Precision.FP32].files[0].stat().st_size
    assert artifacts[Precision.FP16].files[0].stat().st_size < 0.55 * fp32_bin


def test_int8_accurate_and_small(artifacts, trained):
    got = _run_all(artifacts[Precision.INT8].path, trained["test"])
    ref = trained["ref"]
    cos = _cos(got, ref)
    assert cos.mean() > 0.999 and cos.min() > 0.99, (cos.mean(), cos.min())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert _size(artifacts[Precision.INT8]) <= 0.3 * _size(artifacts[Precision.FP32])


def test_default_precision_hint_is_what_the_device_picks(artifacts, trained):
    xml = artifacts[Precision.FP32].path
    sess = OpenVINORuntime().load(xml, precision_hint=None, threads=1)
    try:
        test = trained["test"][:50]
        got = np.concatenate([sess.run([test[i:i + 1]])[0] for i in range(len(test))])
        precision = sess.inference_precision
    finally:
        sess.close()
    ref = trained["ref"][:50]
    assert _cos(got, ref).min() > 0.999
    if precision == "bf16":  # AMX / AVX512-BF16 CPUs: visibly lower precision than the f32 hint
        assert np.abs(got - ref).max() > 1e-3
    else:
        assert np.abs(got - ref).max() < 1e-3


def test_session_specs_threads_and_dtypes(artifacts, trained):
    sess = OpenVINORuntime().load(artifacts[Precision.FP32].path, threads=1)
    try:
        assert sess.inference_precision == "f32" and sess.threads == 1
        assert sess._compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert [s.shape for s in sess.inputs] == [SHAPE] and sess.inputs[0].dtype == "float32"
        assert [s.shape for s in sess.outputs] == [[1, 10]] and sess.outputs[0].dtype == "float32"
        x = trained["test"][:1]
        a = sess.run([x])[0]
        b = sess.run([x.astype(np.float64)])[0]  # same-kind casts are accepted
        np.testing.assert_array_equal(a, b)
        a_before = a.copy()
        sess.run([trained["test"][1:2]])
        np.testing.assert_array_equal(a, a_before)  # outputs are copies, not views of the request
        with pytest.raises(InputError, match="shape"):
            sess.run([np.zeros((1, 3, 28, 28), np.float32)])
        with pytest.raises(InputError, match="dtype"):
            sess.run([np.zeros(SHAPE, np.complex64)])
        with pytest.raises(InputError, match="NaN"):
            sess.run([np.full(SHAPE, np.nan, np.float32)])
        with pytest.raises(InputError, match="takes 1 input"):
            sess.run([x, x])
    finally:
        sess.close()
    with pytest.raises(InferenceError, match="closed"):
        sess.run([x])


def _copy_ir(draft, dest: Path) -> Path:
    xml = dest / "m.xml"
    xml.write_bytes(draft.path.read_bytes())
    xml.with_suffix(".bin").write_bytes(draft.files[0].read_bytes())
    return xml


@pytest.mark.parametrize("damage", ["truncated_bin", "missing_bin", "garbage_xml", "missing_xml"])
def test_broken_files_raise_one_line_inference_error(artifacts, tmp_path, damage):
    xml = _copy_ir(artifacts[Precision.FP32], tmp_path)
    bin_ = xml.with_suffix(".bin")
    if damage == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:1000])
    elif damage == "missing_bin":
        bin_.unlink()
    elif damage == "garbage_xml":
        xml.write_text("<net><layers><layer id='0' type='Nope'/>")
    else:
        xml.unlink()
    with pytest.raises(InferenceError) as info:
        OpenVINORuntime().load(xml)
    msg = str(info.value)
    assert "\n" not in msg and ":" in msg and len(msg) < 400, msg


def test_load_accepts_directory_and_rejects_bad_hint(artifacts, tmp_path, trained):
    xml = _copy_ir(artifacts[Precision.FP32], tmp_path)
    sess = OpenVINORuntime().load(tmp_path)
    try:
        np.testing.assert_allclose(sess.run([trained["test"][:1]])[0], trained["ref"][:1], atol=1e-4)
    finally:
        sess.close()
    with pytest.raises(InferenceError, match="precision_hint"):
        OpenVINORuntime().load(xml, precision_hint="f64")


def test_runtime_metadata():
    rt = OpenVINORuntime()
    assert rt.name == "openvino" and rt.formats == (Format.OPENVINO,) and rt.extra == "openvino"
    assert rt.is_available() and rt.version()[0].isdigit()


def test_int8_without_calibration_and_unsupported_precision(trained, tmp_path):
    load_builtin_converters()
    src = load_source(trained["model"], input_shape=SHAPE)
    ctx = ConversionContext(src, tmp_path, options=ConvertOptions())
    conv = get_converter(src.framework, Format.OPENVINO)
    with pytest.raises(CalibrationError):
        conv.convert(ctx, Precision.INT8)
    with pytest.raises(UnsupportedConversionError):
        conv.convert(ctx, Precision.DYNAMIC)


def test_onnx_source_with_performance_preset(artifacts, trained, tmp_path, capsys):
    """An ONNX file as the source; int8 with the alternative preset and fast bias correction still works."""
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(artifacts["ctx"].onnx(Precision.FP32).path.read_bytes())
    src = load_source(onnx_path)
    opts = ConvertOptions(extra={"openvino_preset": "performance", "openvino_fast_bias_correction": True})
    ctx = ConversionContext(src, tmp_path / "work", calibration=SampleSet([trained["calib"]]), options=opts)
    conv = get_converter(src.framework, Format.OPENVINO)
    fp32 = conv.convert(ctx, Precision.FP32)[0]
    int8 = conv.convert(ctx, Precision.INT8)[0]
    assert "preset performance, fast bias correction" in " ".join(int8.notes)
    assert "Statistics collection" not in capsys.readouterr().out  # NNCF progress bars are kept quiet
    sess = OpenVINORuntime().load(fp32.path)
    try:
        assert [s.name for s in sess.inputs] == src.input_names
        assert [s.name for s in sess.outputs] == src.output_names
    finally:
        sess.close()
    test, ref = trained["test"], trained["ref"]
    np.testing.assert_allclose(_run_all(fp32.path, test), ref, atol=1e-4)
    assert _cos(_run_all(int8.path, test), ref).mean() > 0.98


def test_calibration_layout_is_moved_to_the_onnx_layout():
    from edge_sdk.converters.onnx_to_openvino import _to_layout

    nhwc = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    nchw = _to_layout(nhwc, "NHWC", "NCHW")
    assert nchw.shape == (2, 3, 4, 5) and nchw[1, 2, 3, 4] == nhwc[1, 3, 4, 2]
    np.testing.assert_array_equal(_to_layout(nchw, "NCHW", "NHWC"), nhwc)
    assert _to_layout(nhwc, "NHWC", "NHWC") is nhwc
    flat = np.zeros((2, 7), np.float32)
    assert _to_layout(flat, "NHWC", "NCHW") is flat


def test_lstm_weights_of_an_int8_ir_are_stored_int8_and_outputs_stay(tmp_path: Path) -> None:
    """NNCF's int8 leaves LSTMSequence alone, so its W and R stayed f32 in the "int8" IR (ddddocr's BiLSTM: 31 % of
    the parameters). recurrent_weights_int8 stores them int8 (per gate row) behind a decompression Convert +
    Multiply: the .bin shrinks by about 3/4 of their bytes and the outputs stay those of the f32 LSTM."""
    import openvino as ov

    from edge_sdk.converters.onnx_to_openvino import recurrent_weights_int8

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(64, 96, batch_first=True, bidirectional=True).eval()
    onnx_path = tmp_path / "lstm.onnx"
    torch.onnx.export(lstm, (torch.zeros(1, 20, 64),), str(onnx_path), input_names=["x"], dynamo=False,
                      opset_version=17)
    x = np.random.default_rng(0).standard_normal((1, 20, 64)).astype(np.float32)
    core = ov.Core()
    sizes, outs = {}, {}
    for int8 in (False, True):
        model = ov.convert_model(str(onnx_path))
        if int8:
            assert "LSTMSequence" in [op.get_type_name() for op in model.get_ordered_ops()]
            assert recurrent_weights_int8(model) == 2 * (4 * 96 * 64 + 4 * 96 * 96)
            assert recurrent_weights_int8(model) == 0  # nothing f32 left to store
        xml = tmp_path / f"lstm_{int8}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        sizes[int8] = xml.with_suffix(".bin").stat().st_size
        outs[int8] = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([x])[0]
    assert sizes[True] < 0.35 * sizes[False], sizes
    ref, got = outs[False].ravel(), outs[True].ravel()
    cos = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999 and np.abs(ref - got).max() < 0.05, (cos, np.abs(ref - got).max())
