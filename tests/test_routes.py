"""Issue 11: routes tried in order and recorded, symbolic ONNX axes pinned, one failure never takes the rest down,
integer multi-input models, and the two failure classes the issue reported (TorchScript -> tflite, an ONNX
detector with dynamic H/W) on real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main
from edge_sdk.converters.pipeline import convert
from edge_sdk.converters.routes import candidate_routes, parse_forced_routes, routes_for
from edge_sdk.errors import SourceModelError, UnsupportedConversionError, ValidationError
from edge_sdk.formats import Format, Framework

torch = pytest.importorskip("torch")


class _Src:
    def __init__(self, framework: Framework, kind: str = "module") -> None:
        self.framework, self.kind = framework, kind


def test_route_table_orders_and_skips_what_cannot_apply() -> None:
    assert [r.name for r in routes_for(Framework.PYTORCH, Format.TFLITE)] == ["litert-torch", "onnx2tf",
                                                                               "onnx2torch"]
    routes, skipped = candidate_routes(_Src(Framework.PYTORCH, "torchscript"), Format.TFLITE, {})
    assert [r.name for r in routes] == ["onnx2tf", "onnx2torch"]
    assert skipped and "torch.export" in skipped[0]
    routes, _ = candidate_routes(_Src(Framework.PYTORCH), Format.TFLITE, parse_forced_routes(["tflite=onnx2tf"]))
    assert [r.name for r in routes] == ["onnx2tf"]
    with pytest.raises(UnsupportedConversionError, match="choose from litert-torch, onnx2tf, onnx2torch"):
        candidate_routes(_Src(Framework.PYTORCH), Format.TFLITE, parse_forced_routes(["tflite=nope"]))
    with pytest.raises(ValueError, match="unknown format"):
        parse_forced_routes(["tfl=onnx2tf"])
    with pytest.raises(UnsupportedConversionError, match="no converter from onnx to coreml"):
        routes_for(Framework.ONNX, Format.COREML)


@pytest.fixture(scope="module")
def tiny_torchscript(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from tiny_models import make_tiny

    d = tmp_path_factory.mktemp("ts")
    traced = torch.jit.trace(make_tiny(), torch.zeros(1, 3, 32, 32))
    traced.save(str(d / "tiny_ts.pt"))
    return d / "tiny_ts.pt", np.random.default_rng(0).random((48, 3, 32, 32), dtype=np.float32)


def test_torchscript_reaches_tflite_via_onnx_route_recorded(tiny_torchscript, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    path, calib = tiny_torchscript
    np.save(tmp_path / "calib.npy", calib)
    code = main(["convert", str(path), "--input-shape", "1,3,32,32", "--to", "tflite", "--precision", "fp32",
                 "--calib", str(tmp_path / "calib.npy"), "--out", str(tmp_path / "b"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    (res,) = out["results"]
    assert res["route"] == "onnx2tf" and res["status"] == "passed"
    assert "litert-torch needs torch.export" in res["attempts"][0]
    art = Bundle.load(tmp_path / "b").artifact("tflite", "fp32")
    assert art.route == "onnx2tf" and art.validation.cosine > 0.9999
    assert any("route onnx2tf used after" in n for n in art.notes)


def test_forcing_a_route_that_cannot_apply_is_refused_in_one_line(tiny_torchscript, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    path, _ = tiny_torchscript
    code = main(["convert", str(path), "--input-shape", "1,3,32,32", "--to", "tflite", "--route",
                 "tflite=litert-torch", "--out", str(tmp_path / "b")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and not (tmp_path / "b").exists()
    assert len(err) == 1 and "litert-torch needs torch.export" in err[0]


def test_a_vendor_exception_of_any_type_fails_only_its_artifact(tiny_torchscript, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """openvino.convert_model raising a bare Exception (as vendor tools do) becomes openvino's one-line reason;
    the ONNX artifacts still ship and the command ends with the validation error listing it."""
    ov = pytest.importorskip("openvino")
    path, calib = tiny_torchscript

    def broken(*args, **kwargs):
        raise Exception("Incomplete symbolic shape inference\n  at frame 3\n  at frame 4")

    monkeypatch.setattr(ov, "convert_model", broken)
    with pytest.raises(ValidationError) as info:
        convert(str(path), out=tmp_path / "b", input_shape=[1, 3, 32, 32], to="openvino,onnx", precision="fp32",
                calib=calib, ort=False, quiet=True)
    results = {r.key: r for r in info.value.results}
    assert results["onnx/fp32"].status == "passed"
    bad = results["openvino/fp32"]
    assert bad.status == "error" and "\n" not in bad.reason
    assert "Incomplete symbolic shape inference" in bad.reason and "at frame" not in bad.reason
    assert {a.key for a in Bundle.load(tmp_path / "b").artifacts} == {"onnx/fp32"}


def _dynamic_onnx(tmp_path: Path) -> Path:
    from tiny_models import make_tiny

    class Fcn(torch.nn.Module):  # fully convolutional: any H/W, like a detector backbone
        def __init__(self) -> None:
            super().__init__()
            self.body = make_tiny().features

        def forward(self, x):
            return self.body(x).mean(1, keepdim=True)

    path = tmp_path / "fcn_dynamic.onnx"
    torch.onnx.export(Fcn().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h4", 3: "w4"}}, dynamo=False)
    return path


def test_symbolic_axes_are_pinned_and_dynamic_kept_on_request(tmp_path: Path) -> None:
    import onnx

    from edge_sdk.converters.sources import OnnxSource

    path = _dynamic_onnx(tmp_path)
    with pytest.raises(SourceModelError, match=r"dimensions \['n', 3, 'h', 'w'\]: pass --input-shape x=N,3,N,N"):
        OnnxSource(path)
    with pytest.raises(SourceModelError, match="does not fit"):
        OnnxSource(path, [1, 4, 64, 64])
    src = OnnxSource(path, {"x": [1, 3, 64, 48]}, dynamic=["batch", "height", "width"])
    try:
        pinned = onnx.load(str(src.model))
        dims = [d.dim_value for d in pinned.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [1, 3, 64, 48]
        assert src.path == path and src.input_shapes == [[1, 3, 64, 48]]
        kept = onnx.load(str(src.dynamic_model)).graph.input[0].type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in kept] == [True, False, True, True]
        out = src.predict([np.zeros((1, 3, 64, 48), np.float32)])
        assert out[0].shape == (1, 1, 16, 12)
    finally:
        src.close()
    assert path.read_bytes() == path.read_bytes() and onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[
        2].dim_param == "h"  # the user's file is untouched


def test_dynamic_onnx_converts_with_pinned_shape_and_dynamic_onnx_artifact(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    path = _dynamic_onnx(tmp_path)
    calib = np.random.default_rng(1).random((40, 3, 64, 48), dtype=np.float32)
    b = convert(str(path), out=tmp_path / "b", input_shape={"x": [1, 3, 64, 48]}, dynamic="batch,height,width",
                to="onnx,openvino", precision="fp32,int8", calib=calib, ort=False, quiet=True)
    assert {r.key: r.status for r in b.results} == {k: "passed" for k in
                                                    ("onnx/fp32", "onnx/int8", "openvino/fp32", "openvino/int8")}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(b.root / b.artifact("onnx", "fp32").path))
    (y,) = sess.run(None, {"x": np.zeros((2, 3, 96, 80), np.float32)})  # another size: the axes stayed dynamic
    assert y.shape == (2, 1, 24, 20)
    assert b.manifest.inputs[0].shape == [1, 3, 64, 48]


class _TextEncoder(torch.nn.Module):
    """Token ids + attention mask (int64) -> a pooled embedding and per-token states (dict outputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 16)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.proj(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"pooled": (h * m).sum(1) / m.sum(1).clamp(min=1.0), "states": h}


def test_integer_multi_input_dict_output_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (40, 12)).astype(np.int64)
    mask = (np.arange(12)[None] < rng.integers(4, 13, (40, 1))).astype(np.int64)
    b = convert(_TextEncoder().eval(), out=tmp_path / "b",
                input_shape={"input_ids": [1, 12], "attention_mask": [1, 12]},
                input_dtypes={"input_ids": "int64", "attention_mask": "int64"}, to="onnx,openvino",
                precision="fp32", calib={"input_ids": ids, "attention_mask": mask}, ort=False, quiet=True)
    m = b.manifest
    assert [(t.name, t.dtype) for t in m.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    assert [t.name for t in m.outputs] == ["pooled", "states"]
    assert all(r.status == "passed" for r in b.results), [(r.key, r.reason) for r in b.results]


def test_cli_named_input_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _dynamic_onnx(tmp_path)
    code = main(["convert", str(path), "--input-shape", "x=1,3,64,48", "--input-shape", "1,3,64,48", "--out",
                 str(tmp_path / "b")])
    assert code == 2 and "name every input" in capsys.readouterr().err
    code = main(["convert", str(path), "--input-shape", "y=1,3,64,48", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "['y']" in err and "['x']" in err


def test_openvino_pytorch_frontend_route(tmp_path: Path) -> None:
    """The second route to OpenVINO (no ONNX step) gives the same numbers as the source; forced by name."""
    pytest.importorskip("openvino")
    from tiny_models import make_tiny

    calib = np.random.default_rng(0).random((48, 3, 32, 32), dtype=np.float32)
    b = convert(make_tiny(), out=tmp_path / "b", input_shape=[1, 3, 32, 32], to="openvino", precision="fp32,int8",
                calib=calib, quiet=True, route="openvino-pytorch")
    res = {r.key: r for r in b.results}
    assert res["openvino/fp32"].route == "openvino-pytorch" and res["openvino/fp32"].validation.cosine > 0.9999
    assert res["openvino/int8"].status == "passed" and res["openvino/int8"].validation.cosine > 0.99
    assert "PyTorch frontend" in b.artifact("openvino", "fp32").notes[0]


def test_validation_matches_reordered_same_shape_outputs() -> None:
    """TFLite returns a SavedModel's outputs in its own order (basic-pitch: onset, note, contour vs contour, note,
    onset): same-shape outputs are matched by closeness and the order is recorded for the device."""
    from edge_sdk.converters.validate import compare_outputs

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((6, 4, 8)).astype(np.float32) for _ in range(3))
    wide = rng.standard_normal((6, 4, 24)).astype(np.float32)
    v = compare_outputs([wide, a, b], [b, a, wide], classifier=False)
    assert v.cosine == pytest.approx(1.0) and v.checks["output_order"] == [2, 1, 0]
    v = compare_outputs([a, b], [a, b], classifier=False)
    assert "output_order" not in v.checks
    v = compare_outputs([a, b], [c, a], classifier=False)  # a real mismatch still shows
    assert v.cosine < 0.9


def test_integer_pass_through_outputs_do_not_hide_a_broken_float_output() -> None:
    """paraphrase-MiniLM returns its int64 token ids beside the embeddings: pooled into one cosine, ids in the
    tens of thousands made any embedding score 1.0000. Integer outputs are now compared exactly and left out of the
    cosine, so a destroyed embedding shows."""
    from edge_sdk.converters.validate import compare_outputs

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30_000, size=(8, 16)).astype(np.int64)
    emb = rng.standard_normal((8, 384)).astype(np.float32) * 0.1
    broken = rng.standard_normal((8, 384)).astype(np.float32) * 0.1
    v = compare_outputs([ids, emb], [ids, broken], classifier=False)
    assert v.cosine < 0.5 and not v.failures, v
    v = compare_outputs([ids, emb], [ids, emb], classifier=False)
    assert v.cosine == pytest.approx(1.0) and not v.failures
    v = compare_outputs([ids, emb], [ids + 1, emb], classifier=False)
    assert v.failures == ["integer output 0 equals the source's on 0.0% of values (limit >= 90%)"]
    flipped = ids.copy()
    flipped[0, :4] += 1  # a few computed labels may flip (4 of 128 values): recorded, not a failure
    v = compare_outputs([ids, emb], [flipped, emb], classifier=False)
    assert not v.failures and v.checks["output_0_integer_equal"] == pytest.approx(124 / 128)


def test_sequence_classifier_agreement_is_per_position() -> None:
    """A CTC recogniser's [N, T, C] output is one decision per position: one wrong position of 40 costs 1/40 of a
    sample's agreement, where an argmax over all T * C scores would have judged only the single loudest score."""
    from edge_sdk.converters.validate import compare_outputs

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 40, 30)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    worse = probs.copy()
    for i in range(5):  # swap top-1 and top-2 at one position per sample
        order = np.argsort(-worse[i, 7])
        worse[i, 7, order[[0, 1]]] = worse[i, 7, order[[1, 0]]]
    v = compare_outputs([probs], [worse], classifier=True)
    assert v.top1_agreement == pytest.approx(39 / 40) and v.top5_containment == 1.0
    labels = probs.argmax(-1)  # per-position labels are scored per position
    v = compare_outputs([probs], [worse], classifier=True, labels=labels)
    assert v.source_accuracy == 1.0 and v.accuracy == pytest.approx(39 / 40)
    flat = compare_outputs([probs.reshape(5, -1)], [worse.reshape(5, -1)], classifier=True)
    assert flat.top1_agreement is not None and flat.top1_agreement != v.top1_agreement


def test_keras_custom_layer_needs_and_takes_custom_objects(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A .keras model with a custom layer: without --custom-objects a one-line error says to pass it; with it the
    model converts (in a fresh process, so the class is not already registered by an import)."""
    import os
    import subprocess
    import sys

    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import keras, numpy as np
from keras_custom_layer import ScaledTanh
inp = keras.Input((12,)); x = keras.layers.Dense(8)(inp); out = keras.layers.Dense(3)(ScaledTanh(0.7)(x))
m = keras.Model(inp, out); m.save({str(tmp_path / "custom.keras")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    run = [sys.executable, "-m", "edge_sdk.cli", "convert", str(tmp_path / "custom.keras"), "--to", "onnx", "--no-ort",
           "--out"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bad = subprocess.run([*run, str(tmp_path / "b1")], capture_output=True, text=True, timeout=300, env=env)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "--custom-objects" in errors[0], bad.stderr[-2000:]
    good = subprocess.run([*run, str(tmp_path / "b2"), "--custom-objects", "keras_custom_layer:ScaledTanh"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0, good.stderr[-2000:]
    assert Bundle.load(tmp_path / "b2").artifact("onnx", "fp32").validation.cosine > 0.9999


def test_a_crash_of_a_child_tool_is_that_artifacts_reason(tiny_torchscript, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx2tf runs in a child process; a segfault there (signal 11) is the tflite artifact's one-line reason."""
    import signal
    import subprocess

    from edge_sdk.converters import onnx_to_tflite

    def crash(cmd, **kwargs):
        raise subprocess.CalledProcessError(-signal.SIGSEGV, cmd, output="", stderr="Fatal Python error: ...")

    monkeypatch.setattr(onnx_to_tflite.subprocess, "run", crash)
    path, calib = tiny_torchscript
    with pytest.raises(ValidationError) as info:
        convert(str(path), out=tmp_path / "b", input_shape=[1, 3, 32, 32], to="tflite,onnx", precision="fp32",
                calib=calib, ort=False, quiet=True, route=["tflite=onnx2tf"])  # else onnx2torch ships it
    res = {r.key: r for r in info.value.results}
    assert res["onnx/fp32"].status == "passed"
    assert res["tflite/fp32"].status == "error" and "onnx2tf crashed (SIGSEGV)" in res["tflite/fp32"].reason


def test_openvino_tensorflow_frontend_route_for_keras(tmp_path: Path) -> None:
    """Keras -> OpenVINO without the tf2onnx step (the route Keras 2 recurrent models need), forced by name."""
    pytest.importorskip("openvino")
    pytest.importorskip("tensorflow")
    from keras_models import build_keras_fashion_cnn

    model = build_keras_fashion_cnn()
    calib = np.random.default_rng(0).random((40, 28, 28, 1), dtype=np.float32)
    b = convert(model, out=tmp_path / "b", to="openvino", precision="fp32", calib=calib, quiet=True,
                route="openvino-tf")
    (res,) = b.results
    assert res.route == "openvino-tf" and res.status == "passed" and res.validation.cosine > 0.9999
    assert b.artifact("openvino", "fp32").inputs[0].shape == [1, 28, 28, 1]  # the Keras layout, kept
