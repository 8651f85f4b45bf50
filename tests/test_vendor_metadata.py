"""What the vendors' tool-chains read from inside the artifacts (issue 16, items 1 and 2).

Core ML: the package spec read back with coremltools (Linux can read it; Core ML numerics need macOS, covered by
test_coreml.py's macOS-only tests): an ``ImageType`` input whose scale / bias ops equal the manifest's
normalisation, ``ClassifierConfig`` labels, metadata; a non-image model keeps ``TensorType``.
TFLite: metadata written with MediaPipe's writer, read back with MediaPipe's ``MetadataDisplayer`` (labels file,
normalization options, descriptions), outputs bit-identical before and after, sha256 in the manifest taken after.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk._deps import has_module
from edge_sdk.converters.base import ConversionContext, ConvertOptions, get_converter
from edge_sdk.converters.model_card import card_of, with_card
from edge_sdk.errors import InputError
from edge_sdk.formats import Format, Framework, Precision
from edge_sdk.preprocessing import Preprocessing

coreml = pytest.mark.skipif(not has_module("coremltools"), reason="coremltools is not installed")
tflite_md = pytest.mark.skipif(not (has_module("mediapipe") and has_module("ai_edge_litert")),
                               reason="mediapipe (metadata writer) and ai-edge-litert are needed")
LABELS = [f"class-{i}" for i in range(5)]
IMAGENET = Preprocessing(size=(32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _card_options(**kw) -> ConvertOptions:
    base = ConvertOptions(extra={"model_author": "Edge team", "model_license": "Apache-2.0"})
    args = {"name": "tiny", "version": "1.2", "task": "classification", "labels": LABELS, "preprocessing": IMAGENET}
    return with_card(base, **{**args, **kw})


@pytest.fixture(scope="module")
def torch_cnn():
    torch = pytest.importorskip("torch")
    from edge_sdk.converters.sources import load_source

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 128, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5))
    return load_source(model.eval(), input_shape=[1, 3, 32, 32])


@pytest.fixture(scope="module")
def classifier_packages(torch_cnn, tmp_path_factory):
    ctx = ConversionContext(torch_cnn, tmp_path_factory.mktemp("coreml_cls"), options=_card_options())
    conv = get_converter(Framework.PYTORCH, Format.COREML)
    return {p: conv.convert(ctx, p)[0] for p in (Precision.FP32, Precision.FP16, Precision.INT8)}


def _spec(path: Path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


# ---------------------------------------------------------------- Core ML


@coreml
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16, Precision.INT8])
def test_coreml_image_classifier_spec_read_back(classifier_packages, precision):
    from edge_sdk.runtimes.coreml import image_inputs

    spec = _spec(classifier_packages[precision].path)
    desc = spec.description
    (inp,) = desc.input
    assert inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (32, 32)
    assert inp.type.imageType.colorSpace == 20  # RGB
    img = image_inputs(spec)[inp.name]
    # the manifest's (pixel*scale - mean)/std, per channel, is what Core ML's mul/add ops compute
    want_scale = [IMAGENET.scale / s for s in IMAGENET.std]
    want_bias = [-m / s for m, s in zip(IMAGENET.mean, IMAGENET.std, strict=True)]
    np.testing.assert_allclose(img.scale, want_scale, rtol=1e-6)
    np.testing.assert_allclose(img.bias, want_bias, rtol=1e-6)
    assert len(set(img.scale)) == 3  # per-channel std kept exact, not averaged into one scale
    # classifier for Vision, tensor output kept for the agent
    assert desc.predictedFeatureName == "classLabel" and desc.predictedProbabilitiesName == "classLabel_probs"
    kinds = {o.name: o.type.WhichOneof("Type") for o in desc.output}
    assert kinds == {"classLabel": "stringType", "classLabel_probs": "dictionaryType", "output": "multiArrayType"}
    from edge_sdk.converters.coreml_spec import inspect_package

    info = inspect_package(classifier_packages[precision].path)
    assert info["classifier"]["labels"] == LABELS
    meta = desc.metadata
    assert (meta.author, meta.license, meta.versionString) == ("Edge team", "Apache-2.0", "1.2")
    assert "5-class classifier" in meta.shortDescription
    assert json.loads(meta.userDefined["edge_sdk.preprocessing"]) == IMAGENET.to_dict()
    assert meta.userDefined["edge_sdk.vision.imageCropAndScaleOption"] == "scaleFill"
    assert classifier_packages[precision].spec_checks["passed"] is True


@coreml
def test_coreml_image_input_matches_agent_preprocessing(classifier_packages):
    """Linux-side numeric check: Core ML's image math on the pixels == the agent's Preprocessing tensor, and the
    runtime's tensor -> image inversion gives back exactly those pixels."""
    from edge_sdk.runtimes.coreml import image_inputs, package_io

    path = classifier_packages[Precision.FP32].path
    img = next(iter(image_inputs(_spec(path)).values()))
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    agent = IMAGENET.apply(bgr)  # what the device agent feeds
    rgb = bgr[:, :, ::-1]
    np.testing.assert_allclose(img.to_tensor(rgb), agent, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(img.to_pixels(agent), rgb)
    assert img.to_image(agent).mode == "RGB"
    with pytest.raises(InputError, match="not made from an 8-bit image"):
        img.to_pixels(agent + 0.01)
    ins, outs = package_io(path)
    assert [(s.name, s.shape) for s in ins] == [("input", [1, 3, 32, 32])]
    assert [(s.name, s.shape) for s in outs] == [("output", [1, 5])]  # the classifier's extras are for Vision


@coreml
@pytest.mark.parametrize("precision", [Precision.INT8, Precision.PALETTIZED])
def test_coreml_compressed_image_model_without_labels_keeps_the_image_math(torch_cnn, tmp_path, precision):
    """No labels (``--preset imagenet`` without ``--labels``): the weights used to be compressed on the saved
    model, whose re-export fused the image ``mul``/``add`` into a ``batch_norm`` (epsilon 1e-5, so Core ML's math
    drifted from the manifest's and the spec check found no scale). Now compressed on the MIL program."""
    from edge_sdk.converters.coreml_spec import inspect_package
    from edge_sdk.runtimes.coreml import image_inputs

    ctx = ConversionContext(torch_cnn, tmp_path, options=_card_options(labels=None))
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ctx, precision)[0]
    assert draft.spec_checks["passed"] is True
    spec = _spec(draft.path)
    f = spec.mlProgram.functions["main"]
    types = [o.type for o in f.block_specializations[f.opset].operations]
    assert "batch_norm" not in types and {"mul", "add"} <= set(types)
    img = image_inputs(spec)["input"]
    np.testing.assert_allclose(img.scale, [IMAGENET.scale / s for s in IMAGENET.std], rtol=1e-6)
    np.testing.assert_allclose(img.bias, [-m / s for m, s in zip(IMAGENET.mean, IMAGENET.std, strict=True)],
                               rtol=1e-6)
    assert not spec.description.predictedFeatureName  # no labels: no classifier
    weights = inspect_package(draft.path)["weights"]
    assert ("int8" if precision is Precision.INT8 else "palettized") in weights, weights


@coreml
def test_coreml_image_inputs_reads_a_fused_batch_norm(torch_cnn, tmp_path):
    """A package whose image ``mul``/``add`` a coremltools pass fused into ``batch_norm`` (compressing a saved
    model does it): the read-back gives what Core ML computes, gamma / sqrt(variance + epsilon) and beta."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from edge_sdk.runtimes.coreml import image_inputs

    ctx = ConversionContext(torch_cnn, tmp_path, options=_card_options(labels=None))
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ctx, Precision.FP32)[0]
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
    fused = cto.linear_quantize_weights(ct.models.MLModel(str(draft.path), skip_model_load=True), config=config)
    spec = fused.get_spec()
    f = spec.mlProgram.functions["main"]
    bn = [o for o in f.block_specializations[f.opset].operations if o.type == "batch_norm"]
    assert [o.outputs[0].name for o in bn] == ["input__biased__"]
    img = image_inputs(spec)["input"]
    eps = 1e-5  # coremltools' fuse_elementwise_to_batchnorm leaves batch_norm's default epsilon
    np.testing.assert_allclose(img.scale, [IMAGENET.scale / s / np.sqrt(1 + eps) for s in IMAGENET.std], rtol=1e-6)
    np.testing.assert_allclose(img.bias, [-m / s for m, s in zip(IMAGENET.mean, IMAGENET.std, strict=True)],
                               rtol=1e-6)


@coreml
def test_coreml_non_image_model_keeps_tensor_types(tmp_path):
    torch = pytest.importorskip("torch")
    from edge_sdk.converters.sources import load_source

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).eval()
    src = load_source(mlp, input_shape=[1, 16])
    ctx = ConversionContext(src, tmp_path, options=_card_options(preprocessing=None, task="other", labels=None))
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ctx, Precision.FP32)[0]
    spec = _spec(draft.path)
    assert [i.type.WhichOneof("Type") for i in spec.description.input] == ["multiArrayType"]
    assert [o.type.WhichOneof("Type") for o in spec.description.output] == ["multiArrayType"]
    assert not spec.description.predictedFeatureName
    assert spec.description.metadata.versionString == "1.2"  # metadata still written


@coreml
def test_coreml_image_input_without_card_stays_a_tensor(torch_cnn, tmp_path):
    """A converter called without the pipeline's card keeps the old tensor contract."""
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ConversionContext(torch_cnn, tmp_path),
                                                                    Precision.FP32)[0]
    spec = _spec(draft.path)
    assert spec.description.input[0].type.WhichOneof("Type") == "multiArrayType"
    assert not spec.description.predictedFeatureName


@coreml
def test_coreml_keras_grayscale_nhwc(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    from edge_sdk.converters.sources import load_source
    from edge_sdk.runtimes.coreml import image_inputs

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(96, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax")])
    src = load_source(model)
    gray = Preprocessing(size=(28, 28), color="GRAY", layout="NHWC", mean=(0.5,), std=(0.5,))
    ctx = ConversionContext(src, tmp_path, options=_card_options(preprocessing=gray))
    draft = get_converter(Framework.KERAS, Format.COREML).convert(ctx, Precision.FP16)[0]
    spec = _spec(draft.path)
    img = next(iter(image_inputs(spec).values()))
    assert (img.color, img.layout, img.shape) == ("GRAY", "NHWC", [1, 28, 28, 1])
    np.testing.assert_allclose(img.scale, [1 / 255 / 0.5], rtol=1e-6)
    np.testing.assert_allclose(img.bias, [-1.0], rtol=1e-6)
    outs = {o.name for o in spec.description.output}
    assert set(src.output_names) < outs and {"classLabel", "classLabel_probs"} < outs
    assert any("classLabel_probs = the output" in n for n in draft.notes)  # softmax model: no second softmax


@coreml
@pytest.mark.slow
def test_coreml_real_mobilenet_v2_for_vision(mobilenet_v2, tmp_path):
    from edge_sdk.converters.coreml_spec import inspect_package
    from edge_sdk.converters.sources import load_source

    labels = [f"imagenet-{i:04d}" for i in range(1000)]
    pre = Preprocessing.imagenet()
    src = load_source(mobilenet_v2, input_shape=[1, 3, 224, 224])
    ctx = ConversionContext(src, tmp_path, options=_card_options(labels=labels, preprocessing=pre,
                                                                 name="mobilenet_v2"))
    draft = get_converter(Framework.PYTORCH, Format.COREML).convert(ctx, Precision.FP16)[0]
    info = inspect_package(draft.path)
    (inp,) = info["inputs"]
    assert (inp["kind"], inp["color"], inp["shape"]) == ("imageType", "RGB", [1, 3, 224, 224])
    np.testing.assert_allclose(inp["scale"], [1 / 255 / s for s in pre.std], rtol=1e-6)
    np.testing.assert_allclose(inp["bias"], [-m / s for m, s in zip(pre.mean, pre.std, strict=True)], rtol=1e-6)
    assert info["classifier"]["labels"] == labels
    assert info["metadata"]["user_defined"]["edge_sdk.vision.imageCropAndScaleOption"] == "centerCrop"
    assert info["outputs"][0]["shape"] == [1, 1000]


# ---------------------------------------------------------------- TFLite metadata


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> Path:
    """A real TFLite classifier (Keras CNN, NHWC RGB 32x32, 5 classes) made with TensorFlow's converter."""
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3), batch_size=1), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
    path = tmp_path_factory.mktemp("tfl") / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    from edge_sdk.runtimes.litert import RUNTIME

    session = RUNTIME.load(path)
    try:
        return session.run([x], raw=True)
    finally:
        session.close()


def _image_input_with_normalization(subgraph: dict, pre: Preprocessing) -> dict:
    """The single input's metadata, checked: NormalizationOptions on 0-255 pixels equal to ``pre``, RGB."""
    (inp,) = subgraph["input_tensor_metadata"]
    norm = next(u for u in inp["process_units"] if u["options_type"] == "NormalizationOptions")["options"]
    np.testing.assert_allclose(norm["mean"], [m * 255 for m in pre.mean], rtol=1e-5)
    np.testing.assert_allclose(norm["std"], [s * 255 for s in pre.std], rtol=1e-5)
    assert inp["content"]["content_properties"]["color_space"] == "RGB"
    return inp


@tflite_md
def test_tflite_metadata_read_back_and_identical_outputs(tiny_tflite, tmp_path):
    from mediapipe.tasks.python.metadata import metadata

    from edge_sdk.bundle import Artifact, sha256_path
    from edge_sdk.converters.tflite_metadata import annotate_tflite

    pre = Preprocessing(size=(32, 32), layout="NHWC", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    card = card_of(_card_options(preprocessing=pre))
    bdir = tmp_path / "bundle"
    (bdir / "tflite").mkdir(parents=True)
    dest = bdir / "tflite" / "fp32.tflite"
    dest.write_bytes(tiny_tflite.read_bytes())
    art = Artifact(format="tflite", precision="fp32", path="tflite/fp32.tflite", sha256=sha256_path(dest),
                   size_bytes=dest.stat().st_size)
    annotate_tflite(bdir, art, card)
    assert art.sha256 == sha256_path(dest) != sha256_path(tiny_tflite)  # hashed after the rewrite
    assert art.size_bytes == dest.stat().st_size
    assert any("TFLite Metadata written" in n for n in art.notes)

    shown = metadata.MetadataDisplayer.with_model_file(str(dest))
    md = json.loads(shown.get_metadata_json())
    assert (md["name"], md["version"], md["author"], md["license"]) == ("tiny", "1.2", "Edge team", "Apache-2.0")
    assert shown.get_packed_associated_file_list() == ["labels.txt"]
    assert shown.get_associated_file_buffer("labels.txt").decode().splitlines() == LABELS
    sub = md["subgraph_metadata"][0]
    inp = _image_input_with_normalization(sub, pre)
    assert "mean=[0.485, 0.456, 0.406]" in inp["description"]
    (out,) = sub["output_tensor_metadata"]
    assert out["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS" and "5 classes" in out["description"]

    x = pre.apply(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for before, after in zip(_run(tiny_tflite, x), _run(dest, x), strict=True):
        np.testing.assert_array_equal(before, after)


@tflite_md
def test_tflite_metadata_for_a_non_image_model_describes_tensors(tiny_tflite):
    from mediapipe.tasks.python.metadata import metadata

    from edge_sdk.converters.model_card import ModelCard
    from edge_sdk.converters.tflite_metadata import write_metadata

    out, _ = write_metadata(tiny_tflite.read_bytes(), ModelCard(name="m", version="3"))
    md = json.loads(metadata.MetadataDisplayer.with_model_buffer(out).get_metadata_json())
    sub = md["subgraph_metadata"][0]
    assert "process_units" not in sub["input_tensor_metadata"][0]
    assert sub["output_tensor_metadata"][0]["description"].startswith("output tensor 0")


@tflite_md
def test_pipeline_ships_tflite_with_metadata_and_hashes_it_after(tmp_path):
    keras = pytest.importorskip("keras")
    from mediapipe.tasks.python.metadata import metadata

    from edge_sdk.bundle import Bundle, sha256_path
    from edge_sdk.converters.pipeline import convert

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
    rng = np.random.default_rng(0)
    val = np.stack([IMAGENET_NHWC.apply(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[0] for _ in range(8)])
    np.save(tmp_path / "val.npy", val)
    convert(model, to="tflite", precision="fp32", val=tmp_path / "val.npy", labels=LABELS,
            preprocessing=IMAGENET_NHWC, out=tmp_path / "b", quiet=True, name="tiny")
    bundle = Bundle.load(tmp_path / "b")
    art = bundle.manifest.artifacts[0]
    path = tmp_path / "b" / art.path
    assert art.sha256 == sha256_path(path)
    bundle.verify()
    shown = metadata.MetadataDisplayer.with_model_file(str(path))
    assert shown.get_associated_file_buffer("labels.txt").decode().splitlines() == LABELS
    assert bundle.manifest.labels == LABELS  # the agent keeps reading the manifest


IMAGENET_NHWC = Preprocessing(size=(32, 32), layout="NHWC", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@tflite_md
@pytest.mark.slow
def test_tflite_metadata_of_the_real_mobilenet_v2_lists_labels_and_normalization(mobilenet_v2, photo_crops, tmp_path):
    """Issue 16: the real ImageNet MobileNetV2 through the NHWC TFLite route (torch.onnx + onnx2tf): the standard
    metadata reader lists the 1,000 labels and the ImageNet normalization on 0-255 pixels."""
    from mediapipe.tasks.python.metadata import metadata

    from edge_sdk.converters.pipeline import convert

    pre = Preprocessing(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    labels = [f"imagenet_{i:04d}" for i in range(1000)]
    bundle = convert(mobilenet_v2, out=tmp_path / "b", to="tflite", precision="fp32", val=photo_crops[:24],
                     input_shape=(1, 3, 224, 224), labels=labels, preprocessing=pre, name="mobilenet_v2",
                     version="2.0", route="tflite=onnx2tf", quiet=True)
    (art,) = bundle.artifacts
    assert art.route == "onnx2tf" and art.validation.passed, art.validation
    shown = metadata.MetadataDisplayer.with_model_file(str(bundle.path_of(art)))
    md = json.loads(shown.get_metadata_json())
    assert (md["name"], md["version"]) == ("mobilenet_v2", "2.0")
    assert shown.get_associated_file_buffer("labels.txt").decode().splitlines() == labels
    sub = md["subgraph_metadata"][0]
    _image_input_with_normalization(sub, pre)
    (out,) = sub["output_tensor_metadata"]
    assert out["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS" and "1000 classes" in out["description"]

