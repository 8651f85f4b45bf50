"""Existing .tflite files and OpenVINO IR as sources, bundled as they are and validated against themselves.

Real models throughout: MediaPipe's palm detector and selfie segmenter (shipped inside the installed
``mediapipe`` wheel, found without importing it), the trained Fashion-MNIST Keras CNN written out by the
TFLite converter at each precision, and the ImageNet MobileNetV2 saved as OpenVINO IR. Inputs are real:
scikit-image photos resized to the model's input in [0, 1] RGB NHWC (MediaPipe's image-to-tensor range for
these models), Fashion-MNIST test images, and ImageNet-normalised photo crops (NCHW) for MobileNetV2.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from edge_sdk.bundle import sha256_path
from edge_sdk.errors import EdgeSDKError, SourceModelError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

pytest.importorskip("ai_edge_litert")

from edge_sdk.converters.base import ConversionContext, get_converter
from edge_sdk.converters.prebuilt import OpenVINOSource, TFLiteSource, load_prebuilt

# ---------------------------------------------------------------- material


@pytest.fixture(scope="session")
def mediapipe_models() -> Path:
    """The ``modules`` folder of the installed mediapipe wheel (mediapipe itself is not imported)."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or spec.origin is None:
        pytest.skip("mediapipe is not installed")
    return Path(spec.origin).parent / "modules"


def _photos(h: int, w: int, n: int = 6) -> np.ndarray:
    """(n, h, w, 3) float32 RGB in [0, 1]: scikit-image photos and their mirror images, area-resized."""
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    out = []
    for name in ("astronaut", "chelsea", "coffee"):
        img = cv2.resize(getattr(skdata, name)(), (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        out += [img, np.ascontiguousarray(img[:, ::-1])]
    return np.stack(out[:n])


def _keras_tflite(model: Any, precision: Precision, calib: np.ndarray) -> bytes:
    """The Fashion CNN through tf.lite.TFLiteConverter.from_keras_model (batch stays dynamic: shape_signature -1)."""
    tf = pytest.importorskip("tensorflow")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision is Precision.FP16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision is Precision.DYNAMIC:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision is Precision.INT8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return conv.convert()


@pytest.fixture(scope="session")
def fashion_tflites(fashion_keras_cnn, fashion_test_nhwc, tmp_path_factory) -> dict[Precision, Path]:
    """The trained Fashion CNN as ``model.tflite`` in fp32, fp16, dynamic and full-int8 (int8 I/O)."""
    x, _ = fashion_test_nhwc
    root = tmp_path_factory.mktemp("fashion_tflite")
    out = {}
    for p in (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8):
        (root / p.value).mkdir()
        path = root / p.value / "model.tflite"
        path.write_bytes(_keras_tflite(fashion_keras_cnn, p, x[-200:]))
        out[p] = path
    return out


@pytest.fixture(scope="session")
def mobilenet_ir(mobilenet_v2, tmp_path_factory) -> dict[Precision, Path]:
    """The ImageNet MobileNetV2 as OpenVINO IR: fp32 (uncompressed) and fp16 (save_model's default)."""
    ov = pytest.importorskip("openvino")
    torch = pytest.importorskip("torch")
    model = ov.convert_model(mobilenet_v2, example_input=torch.zeros(1, 3, 224, 224), input=[[1, 3, 224, 224]])
    root = tmp_path_factory.mktemp("mobilenet_ir")
    paths = {Precision.FP32: root / "fp32" / "mobilenet_v2.xml", Precision.FP16: root / "fp16" / "mobilenet_v2.xml"}
    for p, xml in paths.items():
        xml.parent.mkdir()
        ov.save_model(model, str(xml), compress_to_fp16=p is Precision.FP16)
    return paths


@pytest.fixture(scope="session")
def imagenet_photos() -> np.ndarray:
    """8 real ImageNet-normalised photo crops (8, 3, 224, 224)."""
    from data import photo_crops

    return photo_crops(n=8, seed=1)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _artifact(bundle: Any, fmt: str) -> Any:
    return next(a for a in bundle.manifest.artifacts if a.format == fmt)


# ---------------------------------------------------------------- source classes


def test_load_prebuilt_dispatches_on_suffix(mediapipe_models: Path, tmp_path: Path) -> None:
    src = load_prebuilt(mediapipe_models / "palm_detection" / "palm_detection_lite.tflite", None)
    try:
        assert isinstance(src, TFLiteSource) and src.framework is Framework.TFLITE
        assert src.input_shapes == [[1, 192, 192, 3]] and src.layout == "NHWC" and src.input_dtypes == ["float32"]
        assert src.output_names == ["Identity", "Identity_1"]
        assert src.precision is Precision.FP16  # float16 weights + DEQUANTIZE
    finally:
        src.close()
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    assert load_prebuilt(other, None) is None


def test_tflite_precision_is_detected(fashion_tflites: dict[Precision, Path], mediapipe_models: Path) -> None:
    for p, path in fashion_tflites.items():
        src = TFLiteSource(path)
        try:
            assert src.precision is p, path
            assert src.input_shapes == [[1, 28, 28, 1]]  # dynamic batch (shape_signature -1) pinned to 1
            assert src.input_dtypes == ["float32"]  # int8 inputs are quantized by the LiteRT session
            assert src.raw_input_dtypes == (["int8"] if p is Precision.INT8 else ["float32"])
        finally:
            src.close()
    seg = TFLiteSource(mediapipe_models / "selfie_segmentation" / "selfie_segmentation.tflite")
    assert seg.precision is Precision.FP16
    seg.close()


def test_dynamic_batch_is_pinned_from_input_shape(fashion_tflites: dict[Precision, Path],
                                                  fashion_test_nhwc) -> None:
    x, _ = fashion_test_nhwc
    src = TFLiteSource(fashion_tflites[Precision.FP32], [4, 28, 28, 1])
    try:
        assert src.input_shapes == [[4, 28, 28, 1]]
        assert src.predict([x[:4]])[0].shape == (4, 10)
    finally:
        src.close()
    with pytest.raises(SourceModelError, match=r"does not fit the TFLite input") as err:
        TFLiteSource(fashion_tflites[Precision.FP32], [1, 32, 32, 1])
    _one_line(err.value)


def test_int8_tflite_source_returns_float(fashion_tflites, fashion_keras_cnn, fashion_test_nhwc) -> None:
    """A full-integer file takes float32 and returns dequantized float32, close to the Keras model it came from."""
    x, _ = fashion_test_nhwc
    src = TFLiteSource(fashion_tflites[Precision.INT8])
    try:
        got = np.concatenate([src.predict([x[i:i + 1]])[0] for i in range(100)])
    finally:
        src.close()
    ref = np.asarray(fashion_keras_cnn.predict(x[:100], verbose=0))
    assert got.dtype == np.float32
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


# ---------------------------------------------------------------- bundles, as they are


def test_tflite_fp32_bundled_as_is(fashion_tflites, fashion_test_nhwc, tmp_path: Path) -> None:
    x, y = fashion_test_nhwc
    path = fashion_tflites[Precision.FP32]
    bundle = edge_sdk.convert(path, out=tmp_path / "b", to="tflite", precision="fp32", val=x[:64],
                              val_labels=y[:64], quiet=True)
    art = _artifact(bundle, "tflite")
    assert art.sha256 == sha256_path(path)  # the same bytes
    assert art.validation.passed and art.validation.max_abs_error == 0.0
    assert art.validation.cosine == pytest.approx(1.0, abs=1e-12)
    assert art.validation.top1_agreement == 1.0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["framework"] == "tflite" and manifest["source"]["precision"] == "fp32"
    assert manifest["baseline"]["samples"] == 64 and manifest["baseline"]["layout"] == "NHWC"
    assert "confidence" in manifest["baseline"]


def test_int8_tflite_bundled_as_is_and_other_precisions_refused(fashion_tflites, fashion_test_nhwc,
                                                                 tmp_path: Path) -> None:
    x, _ = fashion_test_nhwc
    path = fashion_tflites[Precision.INT8]
    bundle = edge_sdk.convert(path, out=tmp_path / "b", to="tflite", precision="int8", val=x[:32], quiet=True)
    art = _artifact(bundle, "tflite")
    assert art.sha256 == sha256_path(path) and art.validation.max_abs_error == 0.0
    assert art.runtime["input_dtypes"] == ["int8"]
    reason = ("model.tflite is int8 already: an existing model is bundled as it is; pass --precision int8, or "
              "convert from the training framework for other precisions")
    src = TFLiteSource(path)
    try:
        ctx = ConversionContext(src, tmp_path / "work")
        with pytest.raises(UnsupportedConversionError) as err:
            get_converter(Framework.TFLITE, Format.TFLITE).convert(ctx, Precision.FP32)
        assert _one_line(err.value) == reason
        for fmt in (Format.ONNX, Format.OPENVINO):  # tf2onnx / OpenVINO would keep the raw int8 I/O
            with pytest.raises(UnsupportedConversionError, match="full-integer model with int8 inputs/outputs"):
                get_converter(Framework.TFLITE, fmt).convert(ctx, Precision.FP32)
    finally:
        src.close()
    with pytest.raises(EdgeSDKError) as err:
        edge_sdk.convert(path, out=tmp_path / "c", to="tflite", precision="fp16", val=x[:8], quiet=True)
    assert reason in str(err.value)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_mediapipe_selfie_segmentation_bundled_as_is(mediapipe_models: Path, tmp_path: Path) -> None:
    """An fp16 MediaPipe model with a MediaPipe custom op: bundled as it is; tf2onnx is refused with the reason."""
    path = mediapipe_models / "selfie_segmentation" / "selfie_segmentation.tflite"
    bundle = edge_sdk.convert(path, out=tmp_path / "b", to="tflite", precision="fp16", val=_photos(256, 256),
                              quiet=True)
    art = _artifact(bundle, "tflite")
    assert art.sha256 == sha256_path(path) and art.validation.max_abs_error == 0.0
    assert any("Convolution2DTransposeBias" in n for n in art.notes)
    assert bundle.manifest.baseline["samples"] == 6
    src = TFLiteSource(path)
    try:
        with pytest.raises(UnsupportedConversionError, match="custom ops Convolution2DTransposeBias") as err:
            get_converter(Framework.TFLITE, Format.ONNX).convert(ConversionContext(src, tmp_path / "w"),
                                                                 Precision.FP32)
        _one_line(err.value)
    finally:
        src.close()


@pytest.mark.slow
def test_palm_detection_onward_routes_match_the_tflite(mediapipe_models: Path, tmp_path: Path) -> None:
    """tflite (as is) + ONNX (tf2onnx) + ORT + OpenVINO (TFLite frontend), all validated against the .tflite."""
    path = mediapipe_models / "palm_detection" / "palm_detection_lite.tflite"
    bundle = edge_sdk.convert(path, out=tmp_path / "b", quiet=True, val=_photos(192, 192),
                              variants=[("tflite", "fp16"), ("onnx", "fp32"), ("ort", "fp32"), ("openvino", "fp32")])
    assert _artifact(bundle, "tflite").validation.max_abs_error == 0.0
    for fmt in ("onnx", "ort", "openvino"):
        v = _artifact(bundle, fmt).validation
        assert v.passed and v.cosine >= 0.9999, (fmt, v)
    assert _artifact(bundle, "onnx").tool_versions.get("tf2onnx")


# ---------------------------------------------------------------- OpenVINO IR


def test_openvino_ir_bundled_as_is(mobilenet_ir: dict[Precision, Path], imagenet_photos: np.ndarray,
                                   tmp_path: Path) -> None:
    for p, xml in mobilenet_ir.items():
        src = OpenVINOSource(xml)
        assert src.precision is p and src.input_shapes == [[1, 3, 224, 224]] and src.layout == "NCHW"
        src.close()
    xml = mobilenet_ir[Precision.FP16]
    bundle = edge_sdk.convert(xml, out=tmp_path / "b", to="openvino", precision="fp16", val=imagenet_photos,
                              quiet=True)
    art = _artifact(bundle, "openvino")
    assert art.sha256 == sha256_path(xml) and art.files[0]["sha256"] == sha256_path(xml.with_suffix(".bin"))
    assert art.validation.max_abs_error == 0.0 and art.validation.top1_agreement == 1.0
    assert art.validation.cosine == pytest.approx(1.0, abs=1e-12)
    assert bundle.manifest.source["weights_sha256"] == sha256_path(xml.with_suffix(".bin"))
    assert bundle.manifest.baseline["layout"] == "NCHW"
    src = OpenVINOSource(xml)
    try:
        with pytest.raises(UnsupportedConversionError) as err:
            get_converter(Framework.OPENVINO, Format.OPENVINO).convert(ConversionContext(src, tmp_path / "w"),
                                                                     Precision.FP32)
        assert _one_line(err.value).startswith("mobilenet_v2.xml is fp16 already: an existing model is bundled")
    finally:
        src.close()


def test_openvino_dynamic_dims_need_input_shape(mobilenet_ir, imagenet_photos, tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino")
    model = ov.Core().read_model(str(mobilenet_ir[Precision.FP32]))
    model.reshape([-1, 3, -1, -1])
    xml = tmp_path / "dyn.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    with pytest.raises(SourceModelError, match=r"dynamic dimensions \[1, 3, '\?', '\?'\]: pass --input-shape") as err:
        OpenVINOSource(xml)
    _one_line(err.value)
    src, ref = OpenVINOSource(xml, [1, 3, 224, 224]), OpenVINOSource(mobilenet_ir[Precision.FP32])
    try:
        assert src.input_shapes == [[1, 3, 224, 224]]
        np.testing.assert_allclose(src.predict([imagenet_photos[:1]])[0], ref.predict([imagenet_photos[:1]])[0],
                                   atol=1e-4)
    finally:
        src.close()
        ref.close()


# ---------------------------------------------------------------- broken files


def test_corrupt_files_give_one_line_errors(mediapipe_models: Path, mobilenet_ir, tmp_path: Path) -> None:
    good = (mediapipe_models / "palm_detection" / "palm_detection_lite.tflite").read_bytes()
    cases = {"truncated.tflite": good[: len(good) // 3], "garbage.tflite": b"not a flatbuffer at all" * 50}
    xml = mobilenet_ir[Precision.FP32]
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    cut = tmp_path / "cut"
    cut.mkdir()
    text = xml.read_text()
    (cut / "m.xml").write_text(text[: len(text) // 2])
    shutil.copyfile(xml.with_suffix(".bin"), cut / "m.bin")
    short_bin = tmp_path / "short"
    short_bin.mkdir()
    shutil.copyfile(xml, short_bin / "m.xml")
    (short_bin / "m.bin").write_bytes(xml.with_suffix(".bin").read_bytes()[:1000])
    no_bin = tmp_path / "nobin"
    no_bin.mkdir()
    shutil.copyfile(xml, no_bin / "m.xml")
    for path in (tmp_path / "truncated.tflite", tmp_path / "garbage.tflite", cut / "m.xml", short_bin / "m.xml",
                 no_bin / "m.xml"):
        with pytest.raises(SourceModelError) as err:
            edge_sdk.convert(path, out=tmp_path / f"out_{path.parent.name}_{path.stem}", to="tflite", quiet=True)
        msg = _one_line(err.value)
        assert path.name in msg, msg
