"""The device agent core with real runtimes and real models.

- agent outputs equal the bare runtime's on the same input: a tiny CNN bundle (ONNX Runtime, OpenVINO,
  LiteRT fp32 and full-int8) and MediaPipe's bundled TFLite models (non-classifier named outputs);
- classifier top-k with labels on the real ImageNet MobileNetV2 (Chelsea the cat -> 285);
- bad input, tampered / truncated artifacts, recovery after a bad request, selection, config, sources.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import statistics
import threading
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.bundle import Artifact, Bundle, Manifest, TensorSpec, sha256_path
from edge_sdk.device_agent.agent import Agent, Prediction
from edge_sdk.device_agent.config import AgentConfig, ConfigError, load_config
from edge_sdk.device_agent.inputs import iter_source, parse_source, run_source
from edge_sdk.errors import BundleError, InferenceError, InputError
from edge_sdk.preprocessing import Preprocessing
from edge_sdk.runtimes import get_runtime

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

TINY_RUNTIMES = {"onnx/fp32": "onnxruntime", "onnx/int8": "onnxruntime", "openvino/fp32": "openvino",
                 "tflite/fp32": "litert", "tflite/int8": "litert"}
LABELS = [f"class-{i}" for i in range(10)]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny CNN (1x3x32x32 -> 10) as ONNX fp32/int8, OpenVINO fp32, TFLite fp32/int8, with labels and preprocessing."""
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("agent_tiny")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32))
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], out=d / "bundle",
                     variants=[(k.split("/")[0], k.split("/")[1]) for k in TINY_RUNTIMES], calib=d / "calib.npy",
                     labels=LABELS, preprocessing=Preprocessing(size=(32, 32)), ort=False, name="tiny", version="7",
                     quiet=True)
    return d / "bundle"


@pytest.fixture(scope="module")
def tiny_agent(tiny_bundle: Path) -> Agent:
    agent = Agent(tiny_bundle, artifact="onnx/fp32", threads=1)
    yield agent
    agent.close()


def _x(seed: int, shape: tuple[int, ...] = (1, 3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("key", list(TINY_RUNTIMES))
def test_agent_equals_bare_runtime(tiny_bundle: Path, key: str) -> None:
    with Agent(tiny_bundle, artifact=key, threads=1) as agent:
        assert agent.runtime_name == TINY_RUNTIMES[key] and agent.artifact.key == key
        assert agent.model_version == "tiny:7" and agent.task == "classification"
        bare = get_runtime(TINY_RUNTIMES[key]).load(agent.bundle.path_of(agent.artifact), threads=1)
        for seed in range(3):
            x = _x(seed)
            pred = agent.predict(x)
            want = bare.run([x])[0]
            assert list(pred.outputs) == ["output"]  # the source model's output name, whatever the artifact calls it
            np.testing.assert_allclose(pred.outputs["output"], want, rtol=0, atol=1e-6)
            # top-k is the softmax of those very logits, with labels
            probs = np.exp(want[0] - want[0].max())
            probs /= probs.sum()
            order = np.argsort(-want[0], kind="stable")[:5]  # the agent's rule: ties to the lower class index
            assert [t["class"] for t in pred.top_k] == order.tolist()
            assert pred.class_index == order[0] and pred.label == LABELS[order[0]]
            assert pred.confidence == pytest.approx(float(probs[order[0]]), rel=1e-6)
            assert [t["label"] for t in pred.top_k] == [LABELS[i] for i in order]
        bare.close()


def test_top_k_ties_go_to_the_lower_class_index(tiny_bundle: Path) -> None:
    """int8 models' dequantized outputs often tie: equal scores rank by class index, lowest first, also when the
    tie straddles the k-th place."""
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0, 3.0, 2.0]], np.float32)
    with Agent(tiny_bundle, artifact="onnx/fp32", threads=1) as agent:  # its own: the softmax decision is cached
        top = agent._top_k(logits)
    assert [t["class"] for t in top] == [1, 3, 8, 2, 4]
    assert top[0]["score"] == top[1]["score"] == top[2]["score"] and top[3]["score"] == top[4]["score"]


def test_dict_and_list_inputs_and_json(tiny_agent: Agent) -> None:
    x = _x(4)
    a = tiny_agent.predict(x)
    b = tiny_agent.predict({"input": x})
    c = tiny_agent.predict([x.astype(np.float64)])  # float64 is cast to the model's float32
    np.testing.assert_array_equal(a.outputs["output"], b.outputs["output"])
    np.testing.assert_array_equal(a.outputs["output"], c.outputs["output"])
    j = a.to_json()
    assert set(j) == {"id", "outputs", "class", "label", "confidence", "top_k", "latency_ms", "model_version"}
    assert np.allclose(np.asarray(j["outputs"]["output"], np.float32), a.outputs["output"])
    assert j["model_version"] == "tiny:7" and j["latency_ms"] > 0 and len(j["top_k"]) == 5
    import json

    json.dumps(j)  # JSON-ready


def test_predict_image_applies_manifest_preprocessing(tiny_agent: Agent) -> None:
    img = (np.random.default_rng(3).random((48, 40, 3)) * 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", img)
    assert ok
    want = tiny_agent.predict(Preprocessing(size=(32, 32)).apply(img)).outputs["output"]
    np.testing.assert_array_equal(tiny_agent.predict_image(png.tobytes()).outputs["output"], want)
    np.testing.assert_array_equal(tiny_agent.predict_image(img).outputs["output"], want)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.predict(_x(0, (1, 3, 16, 16))), "has shape [1, 3, 16, 16], the model expects [1, 3, 32, 32]"),
        (lambda a: a.predict(_x(0, (3, 32, 32))), "has shape [3, 32, 32]"),
        (lambda a: a.predict((_x(0) * 255).astype(np.uint8)), "dtype uint8, the model expects float32"),
        (lambda a: a.predict(np.full((1, 3, 32, 32), "a")), "the model expects float32"),
        (lambda a: a.predict(np.where(_x(0) > 0.5, np.nan, _x(0)).astype(np.float32)), "NaN or Inf"),
        (lambda a: a.predict(np.full((1, 3, 32, 32), np.inf, np.float32)), "NaN or Inf"),
        (lambda a: a.predict({"image": _x(0)}), "unknown input name(s) 'image'"),
        (lambda a: a.predict([_x(0), _x(1)]), "model takes 1 input(s)"),
        (lambda a: a.predict("not an array"), "inputs must be an array"),
        (lambda a: a.predict_image(b"GIF89a not really an image"), "not a decodable image"),
        (lambda a: a.predict_image(b""), "not an image"),
        (lambda a: a.predict_image(np.zeros((8,), np.float32)), "image array must be uint8"),
    ],
)
def test_bad_input_is_refused_and_the_agent_keeps_serving(tiny_agent: Agent, call: Any, message: str) -> None:
    x = _x(9)
    before = tiny_agent.predict(x).outputs["output"]
    with pytest.raises(InputError) as exc:
        call(tiny_agent)
    assert message in _one_line(exc)
    np.testing.assert_array_equal(tiny_agent.predict(x).outputs["output"], before)


def test_no_preprocessing_means_no_images(tiny_bundle: Path) -> None:
    b = Bundle.load(tiny_bundle)
    b.manifest.preprocessing = {}
    with Agent(b, artifact="onnx/fp32") as agent, pytest.raises(InputError) as exc:
        agent.predict_image(b"\x89PNG")
    assert "records no image preprocessing" in _one_line(exc)


@pytest.fixture()
def tampered(tiny_bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def test_hash_mismatch_is_refused_at_load(tampered: Path) -> None:
    f = tampered / Bundle.load(tampered).artifact("onnx", "fp32").path
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one byte flipped: still loads in ONNX Runtime
    f.write_bytes(bytes(blob))
    with pytest.raises(BundleError) as exc:
        Agent(tampered, artifact="onnx/fp32")
    assert "onnx/fp32" in _one_line(exc) and "sha256" in str(exc.value)


@pytest.mark.parametrize("key", ["onnx/fp32", "tflite/fp32", "openvino/fp32"])
def test_truncated_artifact_is_refused_at_load(tampered: Path, key: str) -> None:
    art = Bundle.load(tampered).artifact(*key.split("/"))
    f = tampered / art.path
    f = f.with_suffix(".bin") if key.startswith("openvino") else f
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(BundleError) as exc:  # verified: the hash no longer matches
        Agent(tampered, artifact=key)
    assert "sha256" in _one_line(exc)
    with pytest.raises(InferenceError) as exc:  # unverified: the runtime refuses, as one line
        Agent(tampered, artifact=key, verify=False)
    assert exc.type is not InputError and _one_line(exc)


def test_selection_order_build_and_reason(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="edge_sdk.agent"), Agent(tiny_bundle) as agent:
        assert agent.artifact.key == "onnx/fp32" and agent.runtime_name == "onnxruntime"
        assert "first runtime in order" in agent.selection_reason
    assert any("running onnx/fp32 with onnxruntime" in r.getMessage() for r in caplog.records)
    with Agent(tiny_bundle, runtime_order=["litert", "openvino"]) as agent:
        assert (agent.artifact.key, agent.runtime_name) == ("tflite/fp32", "litert")
    with Agent(tiny_bundle, runtime_order=["coreml", "openvino"]) as agent:  # no Core ML on Linux
        assert (agent.artifact.key, agent.runtime_name) == ("openvino/fp32", "openvino")
        assert "coreml" in agent.selection_reason
    b = Bundle.load(tiny_bundle)
    manifest = deepcopy(b.manifest)
    manifest.extra["build"] = {"selected": "tflite/int8", "target": "rpi4"}
    with Agent(Bundle(b.root, manifest)) as agent:
        assert agent.artifact.key == "tflite/int8" and "build for target rpi4" in agent.selection_reason
    with pytest.raises(InferenceError) as exc:  # Core ML only runs on macOS, and the bundle has none anyway
        Agent(tiny_bundle, runtime_order=["coreml"])
    assert "no installed runtime" in _one_line(exc) and 'pip install one of "edge-sdk[agent,' in str(exc.value)
    manifest.artifacts = []
    with pytest.raises(BundleError):
        Agent(Bundle(b.root, manifest))
    with pytest.raises(BundleError) as exc:
        Agent(tiny_bundle, artifact="coreml/fp16")
    assert "has no coreml/fp16 artifact" in _one_line(exc)
    with pytest.raises(InferenceError) as exc:
        Agent(tiny_bundle, runtime_order=["tensorrt"])
    assert "unknown runtime(s) tensorrt" in _one_line(exc)


@pytest.fixture(scope="module")
def nhwc_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CNN from an ONNX source through onnx2tf: the .tflite takes NHWC, the source NCHW."""
    import warnings

    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("agent_nhwc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(make_tiny(), (torch.zeros(1, 3, 32, 32),), str(d / "tiny.onnx"), input_names=["input"],
                          output_names=["output"], dynamo=False)
    edge_sdk.convert(d / "tiny.onnx", out=d / "bundle", to="tflite", precision="fp32", ort=False, quiet=True,
                     name="tiny-onnx")
    return d / "bundle"


def test_agent_transposes_to_the_artifact_layout(nhwc_bundle: Path) -> None:
    with Agent(nhwc_bundle, threads=1) as agent:
        assert agent.artifact.runtime["input_layout"] == "NHWC" and agent.input_specs[0].shape == [1, 3, 32, 32]
        bare = get_runtime("litert").load(agent.bundle.path_of(agent.artifact), threads=1)
        assert bare.inputs[0].shape == [1, 32, 32, 3]
        x = _x(11)
        want = bare.run([np.ascontiguousarray(x.transpose(0, 2, 3, 1))])[0]
        np.testing.assert_allclose(agent.predict(x).outputs["output"], want, rtol=0, atol=1e-6)
        ref = make_tiny_output(x)
        np.testing.assert_allclose(want, ref, rtol=1e-4, atol=1e-4)  # and the transposition is the right one
        with pytest.raises(InputError) as exc:  # callers speak the source layout, not the artifact's
            agent.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        assert "the model expects [1, 3, 32, 32]" in _one_line(exc)
        bare.close()


def make_tiny_output(x: np.ndarray) -> np.ndarray:
    from tiny_models import make_tiny

    with torch.no_grad():
        return make_tiny()(torch.from_numpy(x)).numpy()


# ---- MediaPipe's TFLite models through a hand-written bundle ------------------------------------------------

MEDIAPIPE_MODELS = ["selfie_segmentation/selfie_segmentation.tflite", "palm_detection/palm_detection_lite.tflite",
                    "hand_landmark/hand_landmark_lite.tflite", "pose_detection/pose_detection.tflite",
                    "pose_landmark/pose_landmark_full.tflite", "face_detection/face_detection_short_range.tflite"]


def _mediapipe_file(rel: str) -> Path:
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mediapipe not installed: pip install --no-deps mediapipe==0.10.21")
    path = Path(next(iter(spec.submodule_search_locations))) / "modules" / rel
    if not path.is_file():
        pytest.skip(f"{rel} not shipped by this mediapipe")
    return path


def _hand_written_bundle(model: Path, root: Path) -> Path:
    """A real bundle around a bare .tflite: manifest + artifact with its sha256 (no converter involved)."""
    (root / "tflite").mkdir(parents=True)
    dest = root / "tflite" / "fp32.tflite"
    shutil.copyfile(model, dest)
    sess = get_runtime("litert").load(dest)
    ins = [TensorSpec(s.name, list(s.shape), s.dtype, layout="NHWC") for s in sess.inputs]
    outs = [TensorSpec(s.name, list(s.shape), s.dtype) for s in sess.outputs]
    sess.close()
    art = Artifact(format="tflite", precision="fp32", path="tflite/fp32.tflite", sha256=sha256_path(dest),
                   size_bytes=dest.stat().st_size, inputs=ins, outputs=outs,
                   runtime={"runtime": "litert", "input_layout": "NHWC"})
    manifest = Manifest(name=model.stem, version="0.10.21", task="other",
                        source={"framework": "tflite", "file": model.name, "sha256": art.sha256},
                        inputs=ins, outputs=outs, artifacts=[art])
    Bundle(root, manifest).save()
    return root


@pytest.mark.parametrize("rel", MEDIAPIPE_MODELS)
def test_mediapipe_outputs_equal_bare_litert(rel: str, tmp_path: Path) -> None:
    from skimage import data as skdata

    model = _mediapipe_file(rel)
    root = _hand_written_bundle(model, tmp_path / "bundle")
    with Agent(root, threads=1) as agent:
        assert agent.runtime_name == "litert" and agent.task == "other"
        (_, h, w, _), = [s.shape for s in agent.input_specs]
        photo = cv2.resize(skdata.astronaut(), (w, h), interpolation=cv2.INTER_AREA)  # a real photo, RGB
        x = (photo.astype(np.float32) / 255.0)[None]
        pred = agent.predict(x)
        bare = get_runtime("litert").load(model, threads=1)
        want = bare.run([x])
        assert list(pred.outputs) == [s.name for s in bare.outputs]
        for name, ref in zip(pred.outputs, want, strict=True):
            np.testing.assert_allclose(pred.outputs[name], ref, rtol=0, atol=1e-6, err_msg=name)
        assert any(float(np.std(o)) > 0 for o in want)  # the model computed something image-dependent
        assert pred.class_index is None and pred.top_k == []
        assert set(pred.to_json()) == {"id", "outputs", "latency_ms", "model_version"}
        bare.close()


def test_mediapipe_model_with_custom_ops_is_refused_at_load(tmp_path: Path) -> None:
    model = _mediapipe_file("face_landmark/face_landmark_with_attention.tflite")
    root = _hand_written_bundle_lenient(model, tmp_path / "bundle")
    with pytest.raises(InferenceError) as exc:
        Agent(root)
    assert "Landmarks2TransformMatrix" in _one_line(exc)


def _hand_written_bundle_lenient(model: Path, root: Path) -> Path:
    """Like :func:`_hand_written_bundle` for a model the interpreter cannot load (specs left empty)."""
    (root / "tflite").mkdir(parents=True)
    dest = root / "tflite" / "fp32.tflite"
    shutil.copyfile(model, dest)
    art = Artifact(format="tflite", precision="fp32", path="tflite/fp32.tflite", sha256=sha256_path(dest),
                   size_bytes=dest.stat().st_size, runtime={"runtime": "litert"})
    Bundle(root, Manifest(name=model.stem, version="1", source={"framework": "tflite"}, artifacts=[art])).save()
    return root


# ---- the real MobileNetV2 ----------------------------------------------------------------------------------

IMAGENET_LABELS = [f"imagenet-{i:04d}" for i in range(1000)]  # no class-name list ships offline; index names


@pytest.fixture(scope="module")
def mobilenet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    import edge_sdk

    d = tmp_path_factory.mktemp("agent_mnv2")
    np.save(d / "val.npy", photo_crops(n=8, seed=0))
    edge_sdk.convert(mobilenet_v2_weights_path(), model_class="torch_models:MobileNetV2",
                     input_shape=[1, 3, 224, 224], out=d / "bundle", to="onnx", precision="fp32", ort=False,
                     val=d / "val.npy", labels=IMAGENET_LABELS, preprocessing=Preprocessing.imagenet(),
                     name="mobilenet-v2", version="1", quiet=True)
    return d / "bundle"


def _chelsea_jpeg() -> bytes:
    from skimage import data as skdata

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(skdata.chelsea(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def test_mobilenet_v2_top_k_with_labels(mobilenet_bundle: Path) -> None:
    jpeg = _chelsea_jpeg()
    with Agent(mobilenet_bundle, threads=1) as agent:
        assert agent.artifact.key == "onnx/fp32" and agent.labels == IMAGENET_LABELS
        pred = agent.predict_image(jpeg)
        assert pred.class_index == 285 and pred.label == "imagenet-0285"
        scores = [t["score"] for t in pred.top_k]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0.3 < pred.confidence <= 1.0
        assert pred.top_k[0] == {"class": 285, "label": "imagenet-0285", "score": pred.confidence}
        x = Preprocessing.imagenet().apply(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
        bare = get_runtime("onnxruntime").load(agent.bundle.path_of(agent.artifact), threads=1)
        np.testing.assert_allclose(pred.outputs["output"], bare.run([x])[0], rtol=0, atol=1e-6)
        bare.close()


@pytest.mark.slow
def test_measure_predict_overhead_mobilenet_v2(mobilenet_bundle: Path, record_property: Any) -> None:
    """Measured, not asserted: agent.predict vs Session.run vs raw onnxruntime InferenceSession.run (1 thread)."""
    from skimage import data as skdata

    with Agent(mobilenet_bundle, threads=1) as agent:
        x = Preprocessing.imagenet().apply(cv2.cvtColor(skdata.chelsea(), cv2.COLOR_RGB2BGR))
        raw = agent.session._session  # the onnxruntime.InferenceSession itself
        calls = {"raw_ort": lambda: raw.run(None, {"input": x}), "session_run": lambda: agent.session.run([x]),
                 "agent_predict": lambda: agent.predict(x), "agent_predict_top5": lambda: agent.predict(x).top_k}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(20):
            for f in calls.values():
                f()
        rng = random.Random(0)
        keys = list(calls)
        for _ in range(150):  # interleaved in shuffled order so drift and cache effects hit all alike
            rng.shuffle(keys)
            for k in keys:
                f = calls[k]
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1000)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        summary = {**{f"{k}_p50_ms": round(v, 4) for k, v in p50.items()},
                   "agent_over_raw": round(p50["agent_predict"] / p50["raw_ort"], 4),
                   "agent_over_session": round(p50["agent_predict"] / p50["session_run"], 4),
                   "agent_top5_over_raw": round(p50["agent_predict_top5"] / p50["raw_ort"], 4)}
        record_property("overhead", summary)
        print("\nMobileNetV2 ONNX fp32, 1 thread:", summary)
        assert all(v > 0 for v in p50.values())


# ---- configuration ---------------------------------------------------------------------------------------------


def test_load_config(tmp_path: Path) -> None:
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text('bundle = "models/mnv2"\nruntime_order = ["litert", "onnxruntime"]\nthreads = 2\n'
                        'artifact = "tflite/int8"\ntop_k = 3\nsource = "folder:incoming"\n'
                        '[http]\nhost = "0.0.0.0"\nport = 9000\nqueue_size = 4\nmax_body_bytes = 1000000\n')
    cfg = load_config(cfg_path)
    assert cfg == AgentConfig(bundle=str(tmp_path / "models/mnv2"), runtime_order=("litert", "onnxruntime"),
                              artifact="tflite/int8", threads=2, top_k=3, source=f"folder:{tmp_path / 'incoming'}",
                              host="0.0.0.0", port=9000, queue_size=4, max_body_bytes=1000000)
    assert cfg.merged(port=8081, threads=None).port == 8081 and cfg.merged(threads=None).threads == 2
    assert load_config(_write(tmp_path, "")) == AgentConfig()


def test_example_config_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "agent.toml")
    assert cfg.bundle and cfg.runtime_order and cfg.port > 0


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / f"c{abs(hash(text))}.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bundel = 'x'\n", "key 'bundel' is unknown"),
        ("threads = '2'\n", "key 'threads' must be an integer"),
        ("threads = 0\n", "key 'threads' must be >= 1"),
        ("verify = 1\n", "key 'verify' must be true or false"),
        ("runtime_order = ['tensorrt']\n", "key 'runtime_order' names unknown runtime(s) tensorrt"),
        ("artifact = 'onnx'\n", "key 'artifact' must be 'format/precision'"),
        ("source = 'webcam:0'\n", "key 'source' is not a valid source"),
        ("[http]\nport = 70000\n", "key 'http.port' must be between 0 and 65535"),
        ("[http]\nport = true\n", "key 'http.port' must be an integer"),
        ("[http]\nbind = 'x'\n", "key 'http.bind' is unknown"),
        ("threads = \n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in _one_line(exc) and str(path) in str(exc.value)


# ---- input sources ------------------------------------------------------------------------------------------


def test_parse_source() -> None:
    assert parse_source("camera:0") == ("camera", 0)
    assert parse_source("folder:/data/in") == ("folder", "/data/in")
    assert parse_source("rtsp://cam.local/stream") == ("stream", "rtsp://cam.local/stream")
    for bad in ("camera:front", "webcam:0", "folder:", "/data/in"):
        with pytest.raises(InputError):
            parse_source(bad)


def _img(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((40, 50, 3)) * 255).astype(np.uint8)


def test_folder_source_processes_existing_then_new_images(tiny_agent: Agent, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _img(1))
    cv2.imwrite(str(folder / "b.png"), _img(2))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped with a warning
    (folder / "notes.txt").write_text("ignored")
    results: list[tuple[str, Prediction]] = []
    stop = threading.Event()
    worker = threading.Thread(target=lambda: run_source(tiny_agent, f"folder:{folder}", lambda n, p:
                                                        results.append((n, p)), stop, max_items=3, poll_interval=0.05))
    worker.start()
    deadline = time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [n for n, _ in results] == ["a.png", "b.png"]
    _, png = cv2.imencode(".png", _img(3))
    (folder / "c.png.part").write_bytes(png.tobytes())
    os.replace(folder / "c.png.part", folder / "c.png")  # appears complete, as a well-behaved uploader does
    worker.join(timeout=10)
    stop.set()
    assert not worker.is_alive()
    assert [n for n, _ in results] == ["a.png", "b.png", "c.png"]
    for name, pred in results:
        want = tiny_agent.predict_image(cv2.imread(str(folder / name))).outputs["output"]
        np.testing.assert_array_equal(pred.outputs["output"], want)


def test_folder_source_stops_on_event(tmp_path: Path) -> None:
    stop = threading.Event()
    frames = iter_source(f"folder:{tmp_path}", stop_event=stop, poll_interval=0.02)
    threading.Timer(0.1, stop.set).start()
    assert list(frames) == []
    with pytest.raises(InputError):
        list(iter_source(f"folder:{tmp_path / 'missing'}"))


def test_file_sources_image_and_video(tiny_agent: Agent, tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "one.png"), _img(5))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((48, 64, 3), i * 40, np.uint8))
    writer.release()
    names: list[str] = []
    assert run_source(tiny_agent, f"file:{tmp_path / 'one.png'}", lambda n, p: names.append(n)) == 1
    assert run_source(tiny_agent, f"file:{video}", lambda n, p: names.append(n)) == 6
    assert names == ["one.png"] + [f"clip.avi#{i}" for i in range(6)]
    assert run_source(tiny_agent, f"file:{video}", lambda n, p: None, max_items=2) == 2
    (tmp_path / "fake.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(InputError):
        run_source(tiny_agent, f"file:{tmp_path / 'fake.mp4'}", lambda n, p: None)
    with pytest.raises(InputError):
        run_source(tiny_agent, "camera:57", lambda n, p: None)
