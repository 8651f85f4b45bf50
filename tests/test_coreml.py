"""Core ML: real conversions of a small PyTorch CNN and a small Keras CNN with coremltools.

On Linux the packages cannot be run (Core ML predict is macOS-only), so these tests check what can be
checked here — the package spec (I/O names, shapes, dtypes, spec version), the weight storage
actually present, file sizes, and the stored weights themselves against the source's weights. The
numeric tests against the source model run on macOS only.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk._deps import has_module
from edge_sdk.bundle import size_of
from edge_sdk.errors import ConversionError, InferenceError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

pytestmark = pytest.mark.skipif(not has_module("coremltools"), reason="coremltools is not installed")

PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.PALETTIZED)
ON_MAC = sys.platform == "darwin"
NOT_MAC = "Core ML predict needs macOS"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- fixtures (session scope: coremltools is heavy)

@pytest.fixture(scope="session")
def torch_source():
    torch = pytest.importorskip("torch")
    from edge_sdk.converters.sources import load_source

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(  # weights dominate: 3 convs of 3x3x64 and a 1024x256 dense (~360k params)
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return load_source(model.eval(), input_shape=[1, 3, 32, 32])


@pytest.fixture(scope="session")
def keras_source():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    from edge_sdk.converters.sources import load_source

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    src = load_source(keras.Model(inp, out, name="tiny_keras_cnn"))
    yield src
    src.close()


def _convert_all(source, workdir: Path) -> dict:
    import edge_sdk.converters.keras_to_coreml
    import edge_sdk.converters.torch_to_coreml  # noqa: F401
    from edge_sdk.converters.base import ConversionContext, get_converter

    ctx = ConversionContext(source, workdir)
    conv = get_converter(source.framework, Format.COREML)
    return {p: conv.convert(ctx, p)[0] for p in PRECISIONS}


@pytest.fixture(scope="session")
def torch_packages(torch_source, tmp_path_factory):
    return _convert_all(torch_source, tmp_path_factory.mktemp("coreml_torch"))


@pytest.fixture(scope="session")
def keras_packages(keras_source, tmp_path_factory):
    return _convert_all(keras_source, tmp_path_factory.mktemp("coreml_keras"))


def _weights(path: Path, decompress: bool = False) -> list[np.ndarray]:
    """Weight tensors stored in a package (decompressed to float when asked), in program order."""
    from edge_sdk.converters.coreml_spec import import_coremltools

    ct = import_coremltools()
    from coremltools.optimize.coreml import decompress_weights, get_weights_metadata

    model = ct.models.MLModel(str(path), skip_model_load=True)
    if decompress:
        model = decompress_weights(model)
    return [m.val for m in get_weights_metadata(model, weight_threshold=256).values()]


# ---------------------------------------------------------------- PyTorch

@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_torch_package_spec(torch_packages, precision):
    draft = torch_packages[precision]
    assert draft.path.name == f"{precision.value}.mlpackage" and (draft.path / "Manifest.json").is_file()
    checks = draft.spec_checks
    assert checks["passed"] and checks["model_type"] == "mlProgram"
    assert checks["spec_version"] == 7 and checks["minimum_os"] == "iOS16"
    assert checks["inputs"] == [{"name": "input", "kind": "multiArrayType", "shape": [1, 3, 32, 32],
                                 "dtype": "float32"}]
    assert checks["outputs"] == [{"name": "output", "kind": "multiArrayType", "shape": [1, 10],
                                  "dtype": "float32"}]
    weights = checks["weights"]
    total = sum(g["elements"] for g in weights.values())
    assert total > 350_000  # every conv / dense weight is found (BatchNorm folded into the first conv)
    if precision is Precision.FP32:
        assert set(weights) == {"fp32"}
    elif precision is Precision.FP16:
        assert set(weights) == {"fp16"}
    elif precision is Precision.INT8:
        assert set(weights) == {"fp16", "int8"} and weights["int8"]["op"] == ["constexpr_affine_dequantize"]
        assert weights["int8"]["elements"] / total > 0.95
    else:
        assert set(weights) == {"fp16", "palettized"} and weights["palettized"]["nbits"] == [6]
        assert weights["palettized"]["elements"] / total > 0.95
    assert draft.tool_versions["coremltools"]
    assert draft.runtime["compute_units"] == "ALL"
    if ON_MAC:
        assert draft.validation_skipped is None
    else:
        assert "needs macOS" in draft.validation_skipped


def test_torch_package_sizes(torch_packages):
    sizes = {p: size_of(torch_packages[p].path) for p in PRECISIONS}
    fp32 = sizes[Precision.FP32]
    assert fp32 > 4 * 350_000
    assert sizes[Precision.FP16] <= 0.55 * fp32
    assert sizes[Precision.INT8] <= 0.30 * fp32
    assert sizes[Precision.PALETTIZED] <= 0.30 * fp32
    assert sizes[Precision.PALETTIZED] < sizes[Precision.INT8]  # 6-bit indices < 8-bit values


def test_torch_stored_weights_match_the_source(torch_source, torch_packages):
    """Decompressed weights in each package equal the source's within the precision's rounding."""
    state = torch_source.model.state_dict()
    want = {"linear_1024": state["12.weight"].numpy(), "conv3": state["8.weight"].numpy(),
            "linear_256": state["14.weight"].numpy()}
    for precision, tol_cos in [(Precision.FP32, 0.999999), (Precision.FP16, 0.99999),
                               (Precision.INT8, 0.9999), (Precision.PALETTIZED, 0.999)]:
        stored = _weights(torch_packages[precision].path, decompress=True)
        by_shape = {}
        for w in stored:
            by_shape.setdefault(w.shape, []).append(w.astype(np.float32))
        got = {"linear_1024": by_shape[(256, 1024)][0], "conv3": by_shape[(64, 64, 3, 3)][1],
               "linear_256": by_shape[(10, 256)][0]}
        for key, ref in want.items():
            assert _cosine(got[key], ref) > tol_cos, (precision, key)
        if precision is Precision.INT8:  # per-output-channel symmetric int8: error ≤ half a step
            ref = want["linear_1024"]
            step = np.abs(ref).max(axis=1, keepdims=True) / 127
            assert (np.abs(got["linear_1024"] - ref) <= step * 0.5 + 1e-3).all()
        if precision is Precision.PALETTIZED:
            assert len(np.unique(got["linear_1024"])) <= 64


def test_spec_contradicting_the_request_is_rejected(torch_source, torch_packages):
    from edge_sdk.converters.coreml_spec import check_package

    fp32, fp16 = torch_packages[Precision.FP32].path, torch_packages[Precision.FP16].path
    common = {"input_names": ["input"], "output_shapes": [[1, 10]], "output_names": ["output"]}
    with pytest.raises(ConversionError, match="int8 was asked"):
        check_package(fp32, Precision.INT8, input_shapes=[[1, 3, 32, 32]], **common)
    with pytest.raises(ConversionError, match="fp32 was asked"):
        check_package(fp16, Precision.FP32, input_shapes=[[1, 3, 32, 32]], **common)
    with pytest.raises(ConversionError, match=r"shape \[1, 3, 32, 32\], the source has \[1, 3, 64, 64\]"):
        check_package(fp16, Precision.FP16, input_shapes=[[1, 3, 64, 64]], **common)
    with pytest.raises(ConversionError, match="newer than the requested iOS15"):
        check_package(fp16, Precision.FP16, input_shapes=[[1, 3, 32, 32]], target="iOS15", **common)
    with pytest.raises(ConversionError, match="not a Core ML package"):
        check_package(fp16 / "Data", Precision.FP16, input_shapes=[[1, 3, 32, 32]], **common)


def test_unsupported_requests(torch_source, tmp_path):
    import edge_sdk.converters.torch_to_coreml  # noqa: F401
    from edge_sdk.converters.base import ConversionContext, ConvertOptions, get_converter

    conv = get_converter(Framework.PYTORCH, Format.COREML)
    with pytest.raises(UnsupportedConversionError, match="cannot be produced in dynamic"):
        conv.convert(ConversionContext(torch_source, tmp_path), Precision.DYNAMIC)
    ctx = ConversionContext(torch_source, tmp_path, options=ConvertOptions(coreml_minimum_deployment_target="iOS99"))
    with pytest.raises(UnsupportedConversionError, match="unknown Core ML deployment target 'iOS99'"):
        conv.convert(ctx, Precision.FP16)
    ctx = ConversionContext(torch_source, tmp_path, options=ConvertOptions(coreml_palette_bits=5))
    with pytest.raises(UnsupportedConversionError, match="not 5"):
        conv.convert(ctx, Precision.PALETTIZED)


def test_ios18_target_uses_blockwise_int8(torch_source, tmp_path):
    from edge_sdk.converters.base import ConversionContext, ConvertOptions, get_converter

    ctx = ConversionContext(torch_source, tmp_path, options=ConvertOptions(coreml_minimum_deployment_target="iOS18"))
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ctx, Precision.INT8)[0]
    checks = draft.spec_checks
    assert checks["spec_version"] == 9 and checks["opset"] == "CoreML8"
    assert checks["weights"]["int8"]["op"] == ["constexpr_blockwise_shift_scale"]
    assert checks["compressed_share"] > 0.95


@pytest.mark.parametrize("kind", ["pt2", "torchscript"])
def test_torch_file_sources(kind, tmp_path):
    """torch.export programs (.pt2) are re-exported; TorchScript files go to coremltools as they are."""
    torch = pytest.importorskip("torch")
    from edge_sdk.converters.base import ConversionContext, get_converter
    from edge_sdk.converters.sources import load_source

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3),
                                torch.nn.Flatten(), torch.nn.Linear(64 * 24 * 24, 10)).eval()
    x = torch.zeros(1, 1, 28, 28)
    path = tmp_path / ("m.pt2" if kind == "pt2" else "m.ts")
    if kind == "pt2":
        torch.export.save(torch.export.export(model, (x,)), path)
    else:
        torch.jit.save(torch.jit.trace(model, (x,)), path)
    src = load_source(path, input_shape=[1, 1, 28, 28])
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ConversionContext(src, tmp_path / "w"),
                                                                    Precision.INT8)[0]
    assert draft.notes[0].startswith("captured with " + ("torch.export" if kind == "pt2" else "torchscript"))
    assert draft.spec_checks["inputs"][0]["shape"] == [1, 1, 28, 28]
    assert draft.spec_checks["outputs"][0]["shape"] == [1, 10]
    assert draft.spec_checks["compressed_share"] > 0.95
    stored = _weights(draft.path, decompress=True)
    dense = next(w for w in stored if w.shape == (10, 64 * 24 * 24)).astype(np.float32)
    assert _cosine(dense, model[4].weight.detach().numpy()) > 0.9999


# ---------------------------------------------------------------- Keras

@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_keras_package_spec(keras_source, keras_packages, precision):
    checks = keras_packages[precision].spec_checks
    assert checks["passed"] and checks["model_type"] == "mlProgram" and checks["spec_version"] == 7
    assert checks["inputs"] == [{"name": "image", "kind": "multiArrayType", "shape": [1, 32, 32, 3],
                                 "dtype": "float32"}]
    # TF names the output "Identity"; the converter renames it to the source's output name
    assert checks["outputs"] == [{"name": keras_source.output_names[0], "kind": "multiArrayType",
                                  "shape": [1, 10], "dtype": "float32"}]
    weights = checks["weights"]
    total = sum(g["elements"] for g in weights.values())
    assert total > 130_000
    expected = {Precision.FP32: "fp32", Precision.FP16: "fp16", Precision.INT8: "int8",
                Precision.PALETTIZED: "palettized"}[precision]
    assert weights[expected]["elements"] / total > 0.95


@pytest.mark.slow
def test_keras_package_sizes_and_weights(keras_source, keras_packages):
    sizes = {p: size_of(keras_packages[p].path) for p in PRECISIONS}
    assert sizes[Precision.FP16] <= 0.55 * sizes[Precision.FP32]
    assert sizes[Precision.INT8] <= 0.30 * sizes[Precision.FP32]
    assert sizes[Precision.PALETTIZED] <= 0.30 * sizes[Precision.FP32]
    dense = keras_source.model.layers[-2].kernel.numpy()  # (in, out), kept as a matmul operand by Core ML
    for precision in PRECISIONS:
        stored = [w for w in _weights(keras_packages[precision].path, decompress=True) if w.shape == (256, 256)]
        assert len(stored) == 1
        assert _cosine(stored[0].astype(np.float32), dense) > 0.999, precision


@pytest.mark.slow
def test_keras_savedmodel_directory_source(keras_source, tmp_path):
    """A SavedModel folder source converts through its serving_default signature."""
    from edge_sdk.converters.base import ConversionContext, get_converter
    from edge_sdk.converters.sources import load_source

    saved = tmp_path / "saved"
    shutil.copytree(keras_source.saved_model_dir(), saved)
    src = load_source(saved)
    draft = get_converter(Framework.KERAS, Format.COREML).convert(ConversionContext(src, tmp_path / "w"),
                                                                  Precision.FP16)[0]
    assert [o["name"] for o in draft.spec_checks["outputs"]] == src.output_names
    assert draft.spec_checks["inputs"][0]["shape"] == [1, 32, 32, 3]


# ---------------------------------------------------------------- runtime

def test_runtime_reads_io_anywhere(torch_packages):
    from edge_sdk.runtimes.coreml import package_io

    inputs, outputs = package_io(torch_packages[Precision.INT8].path)
    assert [(t.name, t.shape, t.dtype) for t in inputs] == [("input", [1, 3, 32, 32], "float32")]
    assert [(t.name, t.shape, t.dtype) for t in outputs] == [("output", [1, 10], "float32")]


@pytest.mark.skipif(ON_MAC, reason="checks the refusal on hosts without Core ML")
def test_runtime_refuses_off_macos(torch_packages):
    from edge_sdk.runtimes.coreml import CoreMLRuntime

    rt = CoreMLRuntime()
    assert rt.name == "coreml" and rt.formats == (Format.COREML,) and rt.extra == "coreml"
    assert rt.is_available() is False
    assert rt.version()
    with pytest.raises(InferenceError, match=r"Core ML runs only on macOS/iOS: .* use the tflite/onnx/openvino"):
        rt.load(torch_packages[Precision.FP16].path)


@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
@pytest.mark.parametrize("precision, min_cos, max_abs", [
    (Precision.FP32, 0.99999, 1e-3), (Precision.FP16, 0.999, 5e-2),
    (Precision.INT8, 0.995, 0.2), (Precision.PALETTIZED, 0.99, 0.3)], ids=str)
def test_runtime_matches_torch_source_on_macos(torch_source, torch_packages, precision, min_cos, max_abs):
    from edge_sdk.errors import InputError
    from edge_sdk.runtimes.coreml import CoreMLRuntime

    session = CoreMLRuntime().load(torch_packages[precision].path)
    rng = np.random.default_rng(0)
    for _ in range(8):
        x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        got = session.run([x])[0]
        ref = torch_source.predict([x])[0]
        assert got.shape == ref.shape == (1, 10) and got.dtype == np.float32
        assert _cosine(got, ref) > min_cos and np.abs(got - ref).max() < max_abs
    with pytest.raises(InputError):
        session.run([np.zeros((1, 3, 16, 16), np.float32)])
    session.close()


@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_runtime_matches_keras_source_on_macos(keras_source, keras_packages, precision):
    from edge_sdk.runtimes.coreml import CoreMLRuntime

    session = CoreMLRuntime().load(keras_packages[precision].path)
    rng = np.random.default_rng(1)
    for _ in range(8):
        x = rng.random((1, 32, 32, 3), dtype=np.float32)
        got, ref = session.run([x])[0], keras_source.predict([x])[0]
        assert got.shape == ref.shape == (1, 10) and abs(float(got.sum()) - 1.0) < 1e-2  # softmax survives
        assert _cosine(got, ref) > (0.99999 if precision is Precision.FP32 else 0.99)
        assert np.abs(got - ref).max() < (1e-4 if precision is Precision.FP32 else 0.02)


@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
def test_runtime_rejects_a_corrupt_package_on_macos(torch_packages, tmp_path):
    from edge_sdk.runtimes.coreml import CoreMLRuntime

    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(torch_packages[Precision.FP16].path, broken)
    spec_file = next(broken.rglob("model.mlmodel"))
    spec_file.write_bytes(spec_file.read_bytes()[:100])
    with pytest.raises(InferenceError):
        CoreMLRuntime().load(broken)
