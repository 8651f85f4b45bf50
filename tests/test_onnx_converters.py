"""ONNX-family converters on real small models: torch/Keras/ONNX -> ONNX fp32/fp16/dynamic/int8 and -> .ort.

Every artifact is run with ONNX Runtime and compared with the source model's own outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConversionContext, ConvertOptions, get_converter
from edge_sdk.errors import CalibrationError, ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edge_sdk.converters.keras_to_onnx  # noqa: E402  (registers the converters)
import edge_sdk.converters.onnx_to_onnx  # noqa: E402
import edge_sdk.converters.onnx_to_ort  # noqa: E402
import edge_sdk.converters.torch_to_onnx  # noqa: E402,F401
from edge_sdk.converters.onnx_to_onnx import copy_onnx  # noqa: E402
from edge_sdk.converters.sources import load_source  # noqa: E402
from edge_sdk.runtimes.onnxruntime import OnnxRuntime  # noqa: E402

SHAPE = [1, 3, 32, 32]
RT = OnnxRuntime()


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    chans = [3, 32, 64, 128]
    for i in range(3):
        layers += [torch.nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, stride=1 if i == 0 else 2),
                   torch.nn.BatchNorm2d(chans[i + 1]), torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10)]
    return torch.nn.Sequential(*layers).eval()


def _samples(n: int, seed: int, shape: list[int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


def _run_all(path: Path, x: np.ndarray) -> np.ndarray:
    sess = RT.load(path, threads=1)
    try:
        return np.concatenate([sess.run([x[i:i + 1]])[0] for i in range(len(x))])
    finally:
        sess.close()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def torch_ctx(tmp_path_factory: pytest.TempPathFactory) -> ConversionContext:
    src = load_source(_cnn(), input_shape=SHAPE)
    calib = SampleSet([_samples(64, 1, SHAPE)])
    return ConversionContext(src, tmp_path_factory.mktemp("onnx_torch"), calibration=calib)


@pytest.fixture(scope="session")
def torch_ref(torch_ctx: ConversionContext) -> tuple[np.ndarray, np.ndarray]:
    x = _samples(16, 2, SHAPE)
    ref = np.concatenate([torch_ctx.source.predict([x[i:i + 1]])[0] for i in range(len(x))])
    return x, ref


def test_torch_fp32_is_one_file_matching_the_source(torch_ctx, torch_ref):
    draft = torch_ctx.onnx(Precision.FP32)
    assert draft.path.suffix == ".onnx" and draft.path.is_file()
    assert not list(draft.path.parent.glob("*.data")), "fp32 export must be a single file"
    model = onnx.load(str(draft.path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert any(op.domain in ("", "ai.onnx") and op.version == 18 for op in model.opset_import)
    assert draft.tool_versions["exporter"] == "dynamo"
    x, ref = torch_ref
    out = _run_all(draft.path, x)
    assert np.abs(out - ref).max() < 1e-4
    assert _cos(out, ref) > 0.99999


def test_torch_fp16_keeps_float32_io(torch_ctx, torch_ref):
    draft = torch_ctx.onnx(Precision.FP16)
    model = onnx.load(str(draft.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert draft.path.stat().st_size < 0.6 * torch_ctx.onnx(Precision.FP32).path.stat().st_size
    x, ref = torch_ref
    out = _run_all(draft.path, x)
    assert _cos(out, ref) > 0.9999
    assert np.abs(out - ref).max() < 0.02 * max(1.0, float(np.abs(ref).max()))


def test_torch_int8_is_qdq_per_channel_uint8_and_close(torch_ctx, torch_ref):
    draft = torch_ctx.onnx(Precision.INT8)
    model = onnx.load(str(draft.path))
    inits = {t.name: t for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    act_zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert act_zps and all(z.data_type == onnx.TensorProto.UINT8 for z in act_zps)
    weight_scales = [onnx.numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_scales and all(s.size > 1 for s in weight_scales), "conv weights must be per-channel"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ratio = draft.path.stat().st_size / torch_ctx.onnx(Precision.FP32).path.stat().st_size
    assert 0.2 < ratio < 0.35
    assert draft.tool_versions["onnx_activation_type"] == "uint8"
    x, ref = torch_ref
    out = _run_all(draft.path, x)
    assert _cos(out, ref) > 0.999
    assert np.abs(out - ref).max() < 0.05 * float(np.abs(ref).max())


def test_torch_dynamic_is_close(torch_ctx, torch_ref):
    draft = torch_ctx.onnx(Precision.DYNAMIC)
    x, ref = torch_ref
    out = _run_all(draft.path, x)
    assert _cos(out, ref) > 0.999
    assert draft.path.stat().st_size < 0.35 * torch_ctx.onnx(Precision.FP32).path.stat().st_size


def test_int8_activation_option_and_missing_calibration(torch_ctx, tmp_path):
    opts = ConvertOptions(onnx_activation_type="int8")
    ctx = ConversionContext(torch_ctx.source, tmp_path / "s8", calibration=torch_ctx.calibration, options=opts)
    ctx._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)  # reuse the export: this test is about int8
    model = onnx.load(str(ctx.onnx(Precision.INT8).path))
    inits = {t.name: t for t in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)

    bad = ConversionContext(torch_ctx.source, tmp_path / "bad", options=ConvertOptions(onnx_activation_type="int4"),
                            calibration=torch_ctx.calibration)
    bad._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    with pytest.raises(ConversionError, match="onnx_activation_type"):
        bad.onnx(Precision.INT8)
    none = ConversionContext(torch_ctx.source, tmp_path / "none")
    none._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    with pytest.raises(CalibrationError, match="calibration"):
        none.onnx(Precision.INT8)


def test_unsupported_precision_is_refused(torch_ctx):
    with pytest.raises(UnsupportedConversionError, match="palettized"):
        get_converter(Framework.PYTORCH, Format.ONNX).convert(torch_ctx, Precision.PALETTIZED)


def test_ort_files_match_onnx_and_carry_reduced_build_config(torch_ctx, torch_ref):
    conv = get_converter(Framework.PYTORCH, Format.ORT)
    x, ref = torch_ref
    for precision in (Precision.FP32, Precision.INT8):
        (draft,) = conv.convert(torch_ctx, precision)
        assert draft.format is Format.ORT and draft.path.suffix == ".ort"
        assert draft.runtime["ort_target_platform"] == "amd64"
        (config,) = draft.files
        assert draft.runtime["reduced_build_config"] == config.name
        text = config.read_text()
        assert "Conv" in text
        if precision is Precision.INT8:
            assert "QuantizeLinear" in text or "QLinearConv" in text
        out = _run_all(draft.path, x)
        onnx_out = _run_all(torch_ctx.onnx(precision).path, x)
        assert np.abs(out - onnx_out).max() < 1e-5
        assert _cos(out, ref) > 0.999


def test_ort_rejects_unknown_platform(torch_ctx, tmp_path):
    ctx = ConversionContext(torch_ctx.source, tmp_path, options=ConvertOptions(ort_target_platform="riscv"))
    ctx._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    with pytest.raises(ConversionError, match="ort_target_platform"):
        get_converter(Framework.PYTORCH, Format.ORT).convert(ctx, Precision.FP32)


def test_torchscript_source_uses_the_torchscript_exporter(tmp_path):
    scripted = torch.jit.script(_cnn())
    src = load_source(scripted, input_shape=SHAPE)
    ctx = ConversionContext(src, tmp_path)
    draft = ctx.onnx(Precision.FP32)
    assert draft.tool_versions["exporter"] == "torchscript"
    x = _samples(4, 3, SHAPE)
    ref = np.concatenate([src.predict([x[i:i + 1]])[0] for i in range(len(x))])
    assert np.abs(_run_all(draft.path, x) - ref).max() < 1e-4


def test_onnx_source_copy_and_int8(torch_ctx, torch_ref, tmp_path):
    src_file = tmp_path / "model.onnx"
    shutil.copyfile(torch_ctx.onnx(Precision.FP32).path, src_file)
    before = src_file.read_bytes()
    src = load_source(src_file)
    ctx = ConversionContext(src, tmp_path / "work", calibration=torch_ctx.calibration)
    fp32 = ctx.onnx(Precision.FP32)
    assert fp32.path != src_file and fp32.path.read_bytes() == before
    x, ref = torch_ref
    out = _run_all(ctx.onnx(Precision.INT8).path, x)
    assert _cos(out, ref) > 0.999
    assert src_file.read_bytes() == before, "the user's ONNX file must not be modified"


def test_onnx_source_with_external_data_becomes_one_file(torch_ctx, torch_ref, tmp_path):
    model = onnx.load(str(torch_ctx.onnx(Precision.FP32).path))
    src_file = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src_file), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "single.onnx"
    assert copy_onnx(src_file, out) is True
    (tmp_path / "ext.onnx.data").unlink()  # the artifact must not depend on the source's data file
    x, ref = torch_ref
    assert np.abs(_run_all(out, x) - ref).max() < 1e-4


def test_corrupt_onnx_copy_raises_conversion_error(torch_ctx, tmp_path):
    data = torch_ctx.onnx(Precision.FP32).path.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConversionError, match="not a valid ONNX model"):
        copy_onnx(bad, tmp_path / "out.onnx")


@pytest.mark.slow
def test_keras_nhwc_model_to_onnx_fp32_and_int8(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    shape = [1, 28, 28, 1]
    src = load_source(model, input_shape=shape)
    rng = np.random.default_rng(4)
    calib = SampleSet([rng.random((64, 28, 28, 1), dtype=np.float32)])
    ctx = ConversionContext(src, tmp_path, calibration=calib)
    x = rng.random((8, 28, 28, 1), dtype=np.float32)
    ref = np.concatenate([src.predict([x[i:i + 1]])[0] for i in range(len(x))])

    fp32 = ctx.onnx(Precision.FP32)
    graph = onnx.load(str(fp32.path)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [28, 28, 1], "Keras NHWC input layout must be kept"
    assert "tf2onnx" in fp32.tool_versions
    out = _run_all(fp32.path, x)
    assert np.abs(out - ref).max() < 1e-4

    int8 = ctx.onnx(Precision.INT8)
    out8 = _run_all(int8.path, x)
    assert _cos(out8, ref) > 0.999
    assert np.abs(out8 - ref).max() < 0.05 * float(np.abs(ref).max())


def _ort_ops(path: Path, tmp_path: Path) -> list[str]:
    """Op types of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_int8_default_is_nncf_and_fuses_in_ort(torch_ctx, torch_ref, tmp_path):
    """Default int8 (NNCF when installed): per-tensor uint8 activations that ORT fuses into QLinearConv."""
    pytest.importorskip("nncf")
    draft = torch_ctx.onnx(Precision.INT8)
    assert draft.tool_versions["onnx_quantizer"] == "nncf" and "nncf" in draft.tool_versions
    assert any("by nncf" in n for n in draft.notes)
    model = onnx.load(str(draft.path))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[model.graph.output[0].name].op_type == "Gemm"  # logits not re-quantized
    ops = _ort_ops(draft.path, tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops and "FusedConv" not in ops
    x, ref = torch_ref
    out = _run_all(draft.path, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    # ORT's quantizer (selectable) gives a comparable result
    ctx = ConversionContext(torch_ctx.source, tmp_path / "ort", calibration=torch_ctx.calibration,
                            options=ConvertOptions(extra={"onnx_quantizer": "ort"}))
    ctx._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    err_nncf = np.abs(out - ref).mean()
    err_ort = np.abs(_run_all(ctx.onnx(Precision.INT8).path, x) - ref).mean()
    assert err_nncf <= 1.5 * err_ort
    bad = ConversionContext(torch_ctx.source, tmp_path / "bad", calibration=torch_ctx.calibration,
                            options=ConvertOptions(extra={"onnx_quantizer": "tensorrt"}))
    bad._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    with pytest.raises(ConversionError, match="onnx_quantizer"):
        bad.onnx(Precision.INT8)


def test_ort_int8_keeps_input_layer_and_outputs_float(torch_ctx, torch_ref, tmp_path):
    """ORT quantizer: mean-of-per-sample min/max ranges, first conv float, logits not re-quantized."""
    ctx = ConversionContext(torch_ctx.source, tmp_path / "def", calibration=torch_ctx.calibration,
                            options=ConvertOptions(extra={"onnx_quantizer": "ort"}))
    ctx._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    draft = ctx.onnx(Precision.INT8)
    model = onnx.load(str(draft.path))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[model.graph.output[0].name].op_type == "Gemm"  # no Q/DQ pair rounding the logits
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    assert first.input[0] == model.graph.input[0].name  # the input conv reads the float input directly
    assert draft.tool_versions["onnx_quantizer"] == "ort"
    assert draft.tool_versions["onnx_calibration"] == "minmax-mean"
    assert draft.tool_versions["onnx_float_layers"] == first.name
    assert any("kept in float" in n for n in draft.notes)
    # the plain min/max option (which selects ORT by itself) quantizes everything; the default is as close
    opts = ConvertOptions(extra={"onnx_calibration": "minmax", "onnx_float_input_layers": False,
                                 "onnx_float_outputs": False})
    ctx2 = ConversionContext(torch_ctx.source, tmp_path / "mm", calibration=torch_ctx.calibration, options=opts)
    ctx2._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    plain_draft = ctx2.onnx(Precision.INT8)
    assert plain_draft.tool_versions["onnx_quantizer"] == "ort"
    plain = onnx.load(str(plain_draft.path))
    plain_producer = {o: n for n in plain.graph.node for o in n.output}
    assert plain_producer[plain.graph.output[0].name].op_type == "DequantizeLinear"
    x, ref = torch_ref
    err_default = np.abs(_run_all(draft.path, x) - ref).mean()
    err_plain = np.abs(_run_all(plain_draft.path, x) - ref).mean()
    assert err_default <= 1.1 * err_plain
    bad = ConversionContext(torch_ctx.source, tmp_path / "bad", calibration=torch_ctx.calibration,
                            options=ConvertOptions(extra={"onnx_calibration": "kl"}))
    bad._onnx[Precision.FP32] = torch_ctx.onnx(Precision.FP32)
    with pytest.raises(ConversionError, match="onnx_calibration"):
        bad.onnx(Precision.INT8)
