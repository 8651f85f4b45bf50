"""Accuracy budget with automatic fallback (issue 7): a Fashion-MNIST CNN made fragile on purpose breaks a
0.5 pp budget with plain int8 and the fallback brings it back (ORT and OpenVINO); the manifest says what was kept
in float. The slow test measures the same on the real ImageNet MobileNetV2 (label-free agreement budget)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.bundle import Bundle, Validation
from edge_sdk.cli import main
from edge_sdk.converters.accuracy_budget import AccuracyBudget
from edge_sdk.errors import EdgeSDKError, ValidationError

torch = pytest.importorskip("torch")

OUTLIER_CHANNELS = (0, 1, 2, 3)
OUTLIER_FACTOR = 1000.0


def make_fragile(model: Any) -> Any:
    """The same function, fragile under int8: four channels of the second conv block come out x1000 (BN scale
    and shift), and the first linear layer reads them /1000, so fp32 outputs are unchanged but a per-tensor
    activation range is set by the outliers and every other channel is rounded to a few levels."""
    m = copy.deepcopy(model).eval()
    fc = m.classifier[1]
    _add_outliers(m.features[5], lambda c: fc.weight[:, c * 49:(c + 1) * 49])
    return m


def _add_outliers(bn: Any, reader: Any) -> None:
    """Scale the OUTLIER_CHANNELS of ``bn`` by OUTLIER_FACTOR and divide what reads them (``reader(c)``, a view of
    the consuming layer's weights) by it: the same function in fp32."""
    with torch.no_grad():
        for c in OUTLIER_CHANNELS:
            bn.weight[c] *= OUTLIER_FACTOR
            bn.bias[c] *= OUTLIER_FACTOR
            reader(c).div_(OUTLIER_FACTOR)


def make_fragile_embedding(model: Any) -> Any:
    """A dense-output model plain int8 destroys: the Fashion CNN's feature extractor with four channels of the
    FIRST conv block x1000 and the second conv reading them /1000 (the same function in fp32; per-tensor int8
    rounds the other 28 channels to nothing), then a 64 -> 128 conv (seeded) whose 6272 values are the output —
    the bulk of the weights, so an int8 model that keeps the two small convs in float is still compressed."""
    m = copy.deepcopy(model).eval()
    conv = m.features[4]
    _add_outliers(m.features[1], lambda c: conv.weight[:, c])
    torch.manual_seed(0)
    m.features.append(torch.nn.Conv2d(64, 128, 3, padding=1))
    m.classifier = torch.nn.Flatten()
    return m.eval()


def test_budget_judge_and_input_checks() -> None:
    v = Validation(passed=True, top1_agreement=0.96, cosine=0.99, accuracy=0.89, source_accuracy=0.9)
    assert AccuracyBudget(max_drop_pp=1.0).judge(v)[0]
    ok, why = AccuracyBudget(max_drop_pp=0.5).judge(v)
    assert not ok and "accuracy drop 1.00 pp" in why
    assert not AccuracyBudget(min_agreement=0.97).judge(v)[0]
    assert AccuracyBudget(min_agreement=0.95, min_cosine=0.98).judge(v)[0]
    unlabeled = Validation(passed=True, top1_agreement=0.994)
    ok, why = AccuracyBudget(max_drop_pp=0.5).judge(unlabeled)
    assert not ok and "no labels" in why
    for bad in ({}, {"max_drop_pp": -1.0}, {"min_agreement": 1.5}, {"min_cosine": -0.1}):
        with pytest.raises(EdgeSDKError):
            AccuracyBudget(**bad)


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory: pytest.TempPathFactory, fashion_torch_cnn: Any, fashion_test: tuple,
                 fashion_calibration: np.ndarray) -> dict[str, Path]:
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("fragile")
    model = make_fragile(fashion_torch_cnn)
    x, y = fashion_test
    with torch.no_grad():
        a = fashion_torch_cnn(torch.from_numpy(x[:256])).numpy()
        b = model(torch.from_numpy(x[:256])).numpy()
    assert np.abs(a - b).max() < 1e-3 and (a.argmax(1) == b.argmax(1)).all()  # fp32 function unchanged
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), d / "fragile.onnx", input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    np.save(d / "calib.npy", fashion_calibration[:200])
    np.save(d / "val.npy", x[:1000])
    np.save(d / "val_small.npy", x[:200])  # enough where every lossy step must fail (cosine 1.0)
    np.save(d / "val_labels.npy", y[:1000])
    return {"onnx": d / "fragile.onnx", "calib": d / "calib.npy", "val": d / "val.npy",
            "val_small": d / "val_small.npy", "labels": d / "val_labels.npy"}


def _cli(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, dict]:
    code = main([str(a) for a in args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_fragile_cnn_fallback_ort_and_openvino(fragile_onnx: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "bundle"
    code, summary = _cli(capsys, "convert", fragile_onnx["onnx"], "--to", "onnx,openvino", "--precision", "int8",
                         "--calib", fragile_onnx["calib"], "--val", fragile_onnx["val"], "--val-labels",
                         fragile_onnx["labels"], "--max-accuracy-drop", "0.5", "--out", out, "--json")
    assert code == 0, summary
    bundle = Bundle.load(out)
    bundle.verify()
    for fmt in ("onnx", "ort", "openvino"):  # the pick may be fp16 when mixed int8 ran slower than fp32 here
        art = next(a for a in bundle.artifacts if a.format == fmt and "accuracy_budget" in a.validation.checks)
        v = art.validation
        assert v.passed and 100 * (v.source_accuracy - v.accuracy) <= 0.5, (fmt, v)
        record = v.checks["accuracy_budget"]
        assert record["budget"] == {"max_drop_pp": 0.5}
        if fmt == "ort" and (record["kept"] == "int8" or record["steps"][0]["passed"]):
            continue  # made from the ONNX int8 model the ladder kept: its first step can pass (and, timed slower
            # than fp32 on a loaded host, still move on)
        plain = record["steps"][0]
        assert plain["name"] == "int8" and plain["passed"] is False
        drop = float(plain["metric"].split("accuracy drop ")[1].split(" pp")[0])
        assert drop > 0.5  # plain int8 really breaks the budget
        first = next(s for s in record["steps"] if s["passed"])
        assert first["name"].startswith("mixed:k"), record
        assert first["float_nodes"] and any("Gemm" in n or "classifier.1" in n for n in first["float_nodes"])
        if record["kept"] != first["name"]:  # speed-aware: mixed int8 ran slower than fp32 here, a later step not
            kept = next(s for s in record["steps"] if s["name"] == record["kept"])
            ratios = [s["latency_ratio"] for s in record["steps"] if s["passed"]]
            assert first["latency_ratio"] >= 1.0 and (kept["latency_ratio"] < 1.0 or kept["latency_ratio"] == min(
                ratios)), record
            assert v.checks["slower_than_fp32"] is (kept["latency_ratio"] >= 1.0)
            continue
        assert any("kept in float by the accuracy budget" in n for n in art.notes)
        assert all(s["size_bytes"] for s in record["steps"] if s["passed"] is not None)
        if fmt == "openvino":  # the float layer's weights are stored as fp16 (half the bytes), computed in f32
            import openvino as ov

            consts = [op for op in ov.Core().read_model(str(bundle.root / art.path)).get_ops()
                      if op.get_type_name() == "Constant"]
            assert any(str(op.get_element_type()) == "<Type: 'float16'>" for op in consts), art.notes
            assert any("stored as fp16" in n for n in art.notes), art.notes
    assert (out / "manifest.json").read_text().count("kept_in_float") >= 3


def test_over_budget_is_reported_failed_not_shipped(fragile_onnx: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bundle"
    # cosine 1.0 is out of reach for any lossy step; fp16 is requested itself, so the ladder does not end there
    code, summary = _cli(capsys, "convert", fragile_onnx["onnx"], "--to", "onnx", "--no-ort", "--precision",
                         "fp32,fp16,int8", "--calib", fragile_onnx["calib"], "--val", fragile_onnx["val_small"],
                         "--min-cosine", "1.0", "--out", out, "--json")
    assert code == 1
    keys = {a.key for a in Bundle.load(out).artifacts}
    assert keys == {"onnx/fp32", "onnx/fp16"}  # the over-budget int8 model is not written as if it were fine
    failed = [r for r in summary["results"] if r["status"] == "failed"]
    assert [r["format"] + "/" + r["precision"] for r in failed] == ["onnx/int8"]
    assert "over the accuracy budget" in failed[0]["reason"]
    steps = failed[0]["validation"]["checks"]["accuracy_budget"]["steps"]
    names = [s["name"] for s in steps]
    assert names[0] == "int8" and "calibration:percentile" in names and "mixed:k1" in names
    assert "int16-activations" in names
    assert all(s["passed"] is False for s in steps if s["name"] not in ("fp16", "qat"))
    assert next(s for s in steps if s["name"] == "qat")["passed"] is None  # an ONNX source: nothing to fine-tune
    assert next(s for s in steps if s["name"] == "fp16")["passed"] is None  # requested itself: not a fallback


def test_default_convert_has_no_ladder(fragile_onnx: dict, tmp_path: Path) -> None:
    from edge_sdk.converters.pipeline import convert

    with pytest.raises(ValidationError) as exc:  # plain int8 fails its tolerance; nothing falls back silently
        convert(fragile_onnx["onnx"], out=tmp_path / "b", to="onnx", precision="fp32,int8", ort=False,
                calib=np.load(fragile_onnx["calib"]), val=np.load(fragile_onnx["val"])[:200], quiet=True)
    assert "onnx/int8" in str(exc.value)
    assert not any("accuracy_budget" in r.validation.checks for r in exc.value.results)


@pytest.mark.slow
@pytest.mark.soak  # ~6 min alone: `make test-soak` / .ci/run when its time budget allows
def test_mobilenet_v2_agreement_budget(mobilenet_v2: Any, photo_crops: np.ndarray, tmp_path: Path) -> None:
    """Real ImageNet MobileNetV2, 240 real photo crops, label-free budget top-1 agreement >= 95%."""
    pytest.importorskip("openvino")
    from data import photo_crops as make_crops

    from edge_sdk.converters.pipeline import convert
    from edge_sdk.formats import Format
    from edge_sdk.runtimes import runtime_for

    torch.set_num_threads(1)
    bundle = convert(mobilenet_v2, out=tmp_path / "b", to="onnx,openvino", precision="fp32,int8", ort=False,
                     calib=make_crops(n=200, seed=1), val=photo_crops, input_shape=(1, 3, 224, 224), quiet=True,
                     budget=AccuracyBudget(min_agreement=0.95))
    x = photo_crops[:1]
    figures = {}
    for fmt in ("onnx", "openvino"):
        fp32 = next(a for a in bundle.artifacts if a.key == f"{fmt}/fp32")
        kept = next(a for a in bundle.artifacts if a.format == fmt and "accuracy_budget" in a.validation.checks)
        record = kept.validation.checks["accuracy_budget"]
        assert record["steps"][0]["name"] == "int8" and record["steps"][0]["passed"] is False  # plain int8 < 95%
        assert kept.validation.top1_agreement >= 0.95, record
        rt = runtime_for(Format(fmt))
        sessions = [rt.load(bundle.root / a.path, threads=1) for a in (fp32, kept)]
        times: list[list[float]] = [[], []]
        for _ in range(3):
            for s in sessions:
                s.run([x])
        for _ in range(20):  # interleaved so machine load hits both alike
            for i, s in enumerate(sessions):
                t = time.perf_counter()
                s.run([x])
                times[i].append(time.perf_counter() - t)
        for s in sessions:
            s.close()
        figures[fmt] = (kept.size_bytes / fp32.size_bytes, float(np.median(times[1]) / np.median(times[0])))
        print(f"{fmt}: kept {kept.key} by {record['kept']}, agreement {kept.validation.top1_agreement:.3f}, size "
              f"{figures[fmt][0]:.3f}x fp32, latency {figures[fmt][1]:.2f}x fp32; steps "
              + "; ".join(f"{s['name']}={s['metric'] or s['detail'][:60]}" for s in record["steps"]))
    # OpenVINO meets every constraint (mixed precision); ONNX Runtime reaches the budget only through fp16 here,
    # which is larger than 0.45x fp32 and slower: measured and printed, see the report in accuracy_budget.py
    assert figures["openvino"][0] <= 0.45 and figures["openvino"][1] < 1.0, figures


def test_fragile_cnn_tflite_recovers_with_layers_in_float(fashion_torch_cnn: Any, fashion_test: tuple,
                                                          fashion_calibration: np.ndarray, tmp_path: Path) -> None:
    """TFLite's mixed-precision rung: the layer ranked most sensitive on the ONNX export (the first Linear, behind
    the 4 outlier channels) is found in the .tflite by graph position and kept in float, every other op int8 —
    plain int8 drops ~80 pp, ``mixed:stem`` alone 69 pp, ``mixed:k1`` brings it back (measured 0.20 pp), before
    int16 activations (~30x slower here) or fp16 are needed."""
    pytest.importorskip("litert_torch")
    from edge_sdk.converters.pipeline import convert
    from edge_sdk.converters.tflite_quantize import float_ops

    torch.set_num_threads(1)
    x, y = fashion_test
    bundle = convert(make_fragile(fashion_torch_cnn), out=tmp_path / "b", to="tflite", precision="int8",
                     calib=fashion_calibration[:200], val=x[:1000], val_labels=y[:1000], input_shape=(1, 1, 28, 28),
                     quiet=True, budget=AccuracyBudget(max_drop_pp=1.0, speed_check=False))
    (art,) = bundle.artifacts
    record = art.validation.checks["accuracy_budget"]
    assert art.key == "tflite/int8" and record["kept"] == "mixed:k1", record
    # the mixed rungs build on mixed:stem: float stem (so a float input), head computed in float, GPTQ weights
    assert art.runtime["input_dtypes"] == ["float32"] and art.runtime["quantizer"] == "ai-edge-quantizer a8w8"
    assert "edgetpu" not in art.runtime  # float layers: not an Edge TPU model
    names = [s["name"] for s in record["steps"]]
    assert names[:4] == ["int8", "calibration:minmax-mean", "mixed:stem", "mixed:k1"], names
    assert not any(s["passed"] for s in record["steps"][:3])
    # the layer behind the outlier channels keeps fp32 weights: int8 would round its tiny weights to zero
    assert art.tool_versions["tflite_float_head"].startswith("1 layers"), art.tool_versions
    assert "FULLY_CONNECTED" in float_ops(bundle.root / art.path)
    # the mixed rung builds on the calibration rung only when that measured better than plain int8
    drop = [float(s["metric"].split("accuracy drop ")[1].split()[0]) for s in record["steps"][:2]]
    assert (art.tool_versions.get("tflite_ranges") == "minmax-mean") == (drop[1] < drop[0]), (drop, art.tool_versions)
    v = art.validation
    assert 100 * (v.source_accuracy - v.accuracy) <= 1.0


# --- issue 14: GPTQ weight rounding and the speed-aware ladder ---------------------------------------------------


def test_gptq_round_beats_nearest_and_keeps_the_scale() -> None:
    """On correlated inputs, error-compensating rounding gives a smaller layer-output error than nearest rounding,
    every level is an int8 level, and each row's largest weight keeps +-127 (the quantizer recomputes the same
    scale from the rounded weights)."""
    from edge_sdk.converters.weight_rounding import QMAX, gptq_round

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 64)) @ rng.normal(size=(64, 64))  # correlated inputs, as real activations are
    w = rng.normal(size=(1, 32, 64))
    h = (x.T @ x)[None]
    q, scale = gptq_round(w, h)
    nearest = np.clip(np.round(w / scale[..., None]), -QMAX, QMAX)
    assert np.array_equal(q, np.round(q)) and np.abs(q).max() == QMAX
    assert (np.abs(q).max(axis=2) == QMAX).all()
    assert np.allclose(np.abs(q * scale[..., None]).max(axis=2) / QMAX, scale)
    err_gptq = np.linalg.norm(x @ (w[0] - q[0] * scale[0][:, None]).T)
    err_nearest = np.linalg.norm(x @ (w[0] - nearest[0] * scale[0][:, None]).T)
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


def test_gptq_rounds_a_layer_whose_hessian_would_not_fit_over_blocks_of_its_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer reading 5000 inputs would need a 5000 x 5000 float64 H (200 MB, and more to invert it; CREPE full's
    65536-input conv asked for 32 GB and the whole TFLite mixed rung died with MemoryError). It is rounded by GPTQ
    over blocks of its inputs (H's diagonal blocks): on the int8 grid of the whole row, with less output error
    than nearest rounding. Past the block budget too, it keeps its weights for the quantizer's nearest rounding,
    and its error is still estimated from H's diagonal; the small layer after it is rounded by GPTQ either way."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters import weight_rounding
    from edge_sdk.converters.weight_rounding import QMAX, gptq_onnx

    rng = np.random.default_rng(2)
    big, small = rng.normal(size=(5000, 8)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"], name="big_mm"),
         helper.make_node("MatMul", ["h", "small"], ["y"], name="small_mm")], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")])
    src, out = tmp_path / "wide.onnx", tmp_path / "wide_gptq.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    # correlated inputs (what GPTQ exploits): 64 samples in a 32-dimensional subspace plus noise
    x = (rng.normal(size=(64, 32)) @ rng.normal(size=(32, 5000)) + 0.1 * rng.normal(size=(64, 5000)))
    x = x.astype(np.float32)
    scale = np.abs(big).max(axis=0) / QMAX
    d = np.clip(np.round(big / scale), -QMAX, QMAX) * scale - big

    def output_error(w: np.ndarray) -> float:
        x64 = x.astype(np.float64)
        return float(((x64 @ (w - big)) ** 2).sum() / ((x64 @ big) ** 2).sum())

    nearest = output_error(big + d)
    errors: dict[str, float] = {}
    info = gptq_onnx(src, out, SampleSet([x]), ["x"], errors=errors, max_samples=64)
    assert "gptq (2 layers" in info["onnx_weight_rounding"] and "nearest for" not in info["onnx_weight_rounding"]
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    levels = weights["big"] / scale
    assert np.allclose(levels, np.round(levels), atol=1e-3) and np.abs(np.round(levels)).max() == QMAX
    assert output_error(weights["big"]) < 0.7 * nearest, (output_error(weights["big"]), nearest)
    assert 0.5 * nearest < errors["big_mm"] < 2 * nearest, (errors, nearest)  # the estimate is of nearest rounding

    monkeypatch.setattr(weight_rounding, "_MAX_BLOCKED_FLOATS", 1000)  # no room for blocks either
    errors = {}
    info = gptq_onnx(src, out, SampleSet([x]), ["x"], errors=errors)
    assert "gptq (1 layers" in info["onnx_weight_rounding"] and "nearest for 1 too large" in info[
        "onnx_weight_rounding"], info
    assert 0.25 * nearest < errors["big_mm"] < 4 * nearest, (errors, nearest)  # from H's diagonal only
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert np.array_equal(weights["big"], big)
    levels = weights["small"] / (np.abs(weights["small"]).max(axis=0) / QMAX)
    assert np.allclose(levels, np.round(levels), atol=1e-3)


@pytest.mark.parametrize(("group", "stride", "pads"), [(1, 1, (1, 1, 1, 1)), (1, 2, (0, 1, 1, 0)),
                                                       (8, 2, (1, 1, 1, 1)), (2, 1, (0, 0, 0, 0))])
def test_conv_patches_is_the_convolution(group: int, stride: int, pads: tuple[int, int, int, int]) -> None:
    from edge_sdk.converters.weight_rounding import conv_patches

    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 8, 9, 7)).astype(np.float32)
    w = rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32)
    xt = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w), stride=stride, groups=group).numpy()
    p = conv_patches(x[0], (3, 3), (stride, stride), pads, group)  # (group, positions, cols)
    rows = w.reshape(group, 8 // group, -1)
    got = np.einsum("gpc,grc->grp", p, rows).reshape(8, *ref.shape[2:])
    assert np.allclose(got, ref[0], atol=1e-4)


def test_gptq_onnx_int8_weights_are_the_rounded_ones(fashion_onnx: Path, fashion_test: tuple,
                                                     fashion_calibration: np.ndarray, tmp_path: Path) -> None:
    """ORT's quantizer keeps exactly the GPTQ levels (no second rounding), the manifest info says so, and the int8
    model is at least as accurate as with nearest rounding on 1000 Fashion-MNIST test images."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq
    from edge_sdk.converters.weight_rounding import gptq_onnx

    calib = SampleSet([fashion_calibration[:200]])
    info = gptq_onnx(fashion_onnx, tmp_path / "g.onnx", calib, ["x"])
    assert info["onnx_weight_rounding"].startswith("gptq (4 layers")
    rounded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "g.onnx")).graph.initializer}
    x, y = fashion_test
    acc = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.onnx"
        v = quantize_static_qdq(fashion_onnx, out, calib, ConvertOptions(
            extra={"onnx_quantizer": "ort", "onnx_weight_rounding": rounding}), ["x"])
        assert v["onnx_weight_rounding"].split(" ")[0] == rounding
        model = onnx.load(str(out))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        if rounding == "gptq":  # every int8 weight dequantizes to the GPTQ-rounded float weight
            checked = 0
            for node in model.graph.node:
                if node.op_type == "DequantizeLinear" and inits.get(node.input[0], np.zeros(0)).dtype == np.int8:
                    q, s = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
                    name = node.input[0].removesuffix("_quantized")
                    want = next(w for k, w in rounded.items() if k == name)
                    deq = q * s.reshape([-1] + [1] * (q.ndim - 1))
                    assert np.allclose(deq, want, rtol=0, atol=1e-6 * np.abs(want).max()), name
                    checked += 1
            assert checked == 3  # ORT keeps the layer reading the input in float (onnx_float_input_layers)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        pred = np.array([sess.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(1000)])
        acc[rounding] = float((pred == y[:1000]).mean())
    assert acc["gptq"] >= acc["nearest"] - 0.002, acc


def test_gptq_refuses_unknown_rounding(fashion_onnx: Path, fashion_calibration: np.ndarray, tmp_path: Path) -> None:
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq
    from edge_sdk.errors import ConversionError

    with pytest.raises(ConversionError, match="onnx_weight_rounding 'adaround' is not supported: choose from"):
        quantize_static_qdq(fashion_onnx, tmp_path / "q.onnx", SampleSet([fashion_calibration[:20]]),
                            ConvertOptions(extra={"onnx_weight_rounding": "adaround"}), ["x"])


def test_speed_aware_ladder_records_latency_and_skips_slow_steps(fashion_onnx: Path, fashion_calibration: np.ndarray,
                                                                 fashion_test: tuple, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A cosine budget plain int8 cannot meet: every step within budget is timed against fp32 (1 thread,
    interleaved rounds); a step slower than fp32 does not end the ladder; the kept one is the first faster
    step, or — when none is faster — the fastest one, marked ``slower_than_fp32``."""
    x, _ = fashion_test
    np.save(tmp_path / "calib.npy", fashion_calibration[:200])
    np.save(tmp_path / "val.npy", x[:200])
    out = tmp_path / "bundle"
    code, summary = _cli(capsys, "convert", fashion_onnx, "--to", "onnx", "--no-ort", "--precision", "int8",
                         "--calib", tmp_path / "calib.npy", "--val", tmp_path / "val.npy", "--min-cosine", "0.99999",
                         "--out", out, "--json")
    assert code == 0, summary
    (art,) = Bundle.load(out).artifacts
    checks = art.validation.checks
    record = checks["accuracy_budget"]
    steps = record["steps"]
    assert steps[0]["name"] == "int8" and steps[0]["passed"] is False
    passing = [s for s in steps if s["passed"]]
    kept = next(s for s in steps if s["name"] == record["kept"])
    assert all(s["latency_ratio"] is not None and s["latency_ratio"] > 0 for s in passing), passing
    before = passing[:passing.index(kept)]
    assert all(s["latency_ratio"] >= 1.0 for s in before)  # a slower step did not end the ladder
    assert checks["latency_vs_fp32"]["latency_ratio"] == kept["latency_ratio"]
    assert "interleaved rounds" in checks["latency_vs_fp32"]["measured"]
    assert checks["slower_than_fp32"] is (kept["latency_ratio"] >= 1.0)
    if checks["slower_than_fp32"]:  # only slower steps fit: the fastest of them, and the notes say so
        assert all(s["latency_ratio"] >= 1.0 for s in passing)
        assert kept["latency_ratio"] == min(s["latency_ratio"] for s in passing)
        assert any("slower than fp32 on this host" in n for n in art.notes)
    assert record["method"] and record["kept"] in record["method"]
    print({s["name"]: (s["passed"], s["latency_ratio"]) for s in steps}, record["method"])


def test_compare_variants_prints_fp32_plain_and_budgeted_pick(fragile_onnx: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """benchmarks/compare_variants.py --plain: per target, fp32 vs plain int8 vs the budgeted pick with agreement,
    size ratio, latency ratio, the ladder step and the method."""
    import subprocess
    import sys

    common = ["convert", fragile_onnx["onnx"], "--to", "onnx", "--no-ort", "--precision", "fp32,int8", "--calib",
              fragile_onnx["calib"], "--val", fragile_onnx["val"], "--json"]
    code, _ = _cli(capsys, *common, "--out", tmp_path / "plain", "--keep-failed")
    assert code == 1  # plain int8 is over its tolerance on the fragile CNN: kept, marked failed
    code, summary = _cli(capsys, *common, "--out", tmp_path / "budget", "--min-cosine", "0.99")
    assert code == 0, summary
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_variants.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "budget"), "--plain", str(tmp_path / "plain"),
                           "--runs", "5", "--warmup", "1", "--rounds", "2"], capture_output=True, text=True,
                          check=True, timeout=300)
    rows = {r[1]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
                              if ln.startswith("| onnx"))}
    assert set(rows) == {"fp32", "plain int8", "budgeted pick"}, proc.stdout
    assert rows["fp32"][4] == "1.00×" and rows["fp32"][6] == "1.00×"
    plain_agree, pick_agree = (float(rows[k][3].rstrip("%")) for k in ("plain int8", "budgeted pick"))
    assert pick_agree > plain_agree
    pick = next(a for a in Bundle.load(tmp_path / "budget").artifacts if "accuracy_budget" in a.validation.checks)
    record = pick.validation.checks["accuracy_budget"]
    assert rows["budgeted pick"][2] == pick.key
    print(proc.stdout)
    assert rows["budgeted pick"][7] == record["kept"] != "int8"
    assert rows["budgeted pick"][8] == record["method"]
    assert rows["budgeted pick"][6].endswith("×") and rows["budgeted pick"][9] in ("yes", "no")


def test_qat_rung_fine_tunes_a_pytorch_source_once_and_is_not_offered_to_others(
        fashion_torch_cnn: Any, fashion_test: tuple, fashion_calibration: np.ndarray, fragile_onnx: dict,
        tmp_path: Path) -> None:
    """The ``qat`` rung: tried for a PyTorch source (after int16 activations, before fp16) on a model fine-tuned
    once for every format, recorded with its figures; "not offered" for an ONNX source. Cosine 1.0 is out of reach
    of any int8 step, so every step is tried and fails."""
    from edge_sdk.converters.pipeline import convert

    torch.set_num_threads(1)
    x, _ = fashion_test
    budget = AccuracyBudget(min_cosine=1.0, speed_check=False, qat_epochs=1)
    with pytest.raises(ValidationError) as err:
        convert(fashion_torch_cnn, out=tmp_path / "t", to="onnx,openvino", ort=False, precision="int8",
                calib=fashion_calibration[:64], val=x[:64], input_shape=(1, 1, 28, 28), quiet=True, budget=budget)
    results = {f"{r.format}/{r.precision}": r for r in err.value.results}
    for key in ("onnx/int8", "openvino/int8"):
        steps = results[key].validation.checks["accuracy_budget"]["steps"]
        names = [s["name"] for s in steps]
        assert names.index("qat") == len(names) - 2 and names[-1] == "fp16", names  # the last int8 rung
        qat = steps[names.index("qat")]
        assert qat["passed"] is False and qat["size_bytes"] and "cosine" in qat["metric"], qat
        cos = float(qat["metric"].split("cosine ")[1].split(" ")[0])
        assert 0.9 < cos < 1.0  # a real int8 model of the fine-tuned CNN, judged against the original
    # an ONNX source: the rung is reported, not tried
    with pytest.raises(ValidationError) as err:
        convert(fragile_onnx["onnx"], out=tmp_path / "o", to="onnx", ort=False, precision="int8",
                calib=fashion_calibration[:64], val=x[:64], quiet=True, budget=budget)
    steps = err.value.results[0].validation.checks["accuracy_budget"]["steps"]
    qat = next(s for s in steps if s["name"] == "qat")
    assert qat["passed"] is None and "needs a PyTorch nn.Module (this route converts from onnx)" in qat["detail"]


def test_qat_epochs_is_checked_and_recorded_when_not_the_default() -> None:
    assert "qat_epochs" not in AccuracyBudget(min_agreement=0.9).to_dict()
    assert AccuracyBudget(min_agreement=0.9, qat_epochs=5).to_dict() == {"min_agreement": 0.9, "qat_epochs": 5}
    for bad in (-1, 1.5, True):
        with pytest.raises(EdgeSDKError, match="--qat-epochs"):
            AccuracyBudget(min_agreement=0.9, qat_epochs=bad)


class _BatchOneOnly(torch.nn.Module):
    """Runs at batch 1 only (a hard-coded ``view(1, -1)``, as real exported-for-device models often have)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: Any) -> Any:
        return self.fc(torch.relu(self.conv(x)).view(1, -1))


def test_a_rung_that_raises_is_a_failed_step_not_a_lost_artifact(fashion_test: tuple, tmp_path: Path) -> None:
    """Whatever a rung's tool raises (here torch's RuntimeError from fine-tuning a batch-1-only model at batch 16)
    becomes that step's one-line reason; the ladder goes on to the next rung and the artifact is still judged."""
    from edge_sdk.converters.pipeline import convert

    torch.manual_seed(0)
    x, _ = fashion_test
    with pytest.raises(ValidationError) as err:
        convert(_BatchOneOnly().eval(), out=tmp_path / "b", to="onnx", ort=False, precision="int8",
                calib=x[:32], val=x[:16], input_shape=(1, 1, 28, 28), quiet=True,
                budget=AccuracyBudget(min_cosine=1.0, speed_check=False, qat_epochs=1))
    (res,) = err.value.results
    assert res.status == "failed" and "over the accuracy budget" in res.reason, res.reason
    steps = res.validation.checks["accuracy_budget"]["steps"]
    qat = next(s for s in steps if s["name"] == "qat")
    assert qat["passed"] is False and "raised RuntimeError" in qat["detail"] and "\n" not in qat["detail"], qat
    assert steps[-1]["name"] == "fp16" and steps[-1]["passed"] is not None  # the ladder went on after it


class _TokenModel(torch.nn.Module):
    """Token ids (int64) in, a dense embedding out: the shape of a sentence embedder."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)
        self.fc1 = torch.nn.Linear(32, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, ids: Any) -> Any:
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def test_mixed_precision_ranking_feeds_integer_inputs_as_integers(tmp_path: Path) -> None:
    """The layer ranking of the mixed rungs ran every input as float32, so a model taking token ids (int64) lost
    its whole int8 artifact to an ONNX Runtime type error; now the ranking runs and the mixed rungs are tried."""
    from edge_sdk.converters.pipeline import convert

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 100, size=(48, 12)).astype(np.int64)
    with pytest.raises(ValidationError) as err:
        convert(_TokenModel().eval(), out=tmp_path / "b", to="onnx", ort=False, precision="int8", calib=ids[:32],
                val=ids[32:], input_shape=(1, 12), input_dtypes=["int64"], quiet=True,
                budget=AccuracyBudget(min_cosine=1.0, speed_check=False, qat_epochs=0))
    steps = err.value.results[0].validation.checks["accuracy_budget"]["steps"]
    names = [s["name"] for s in steps]
    assert "mixed:k1" in names and "mixed" not in names, steps  # "mixed" alone = "no layer ranking: ..."
    assert all(s["passed"] is not None for s in steps if s["name"].startswith("mixed:k"))


def test_float_weights_of_an_openvino_model_are_stored_as_fp16(fashion_onnx: Path, fashion_test: tuple,
                                                                tmp_path: Path) -> None:
    """What the OpenVINO int8 path does to the layers NNCF left in float: their weights go to fp16 storage behind a
    decompression Convert; the file shrinks and the outputs stay those of the f32 model (to fp16 rounding)."""
    ov = pytest.importorskip("openvino")
    from edge_sdk.converters.onnx_to_openvino import float_weights_as_fp16

    x = fashion_test[0][:64]
    model = ov.convert_model(str(fashion_onnx))
    ov.save_model(model, str(tmp_path / "f32.xml"), compress_to_fp16=False)
    n = float_weights_as_fp16(model)
    ov.save_model(model, str(tmp_path / "w16.xml"), compress_to_fp16=False)
    assert n > 100_000  # the CNN's conv and dense weights
    sizes = [(tmp_path / f"{k}.bin").stat().st_size for k in ("f32", "w16")]
    assert sizes[1] < 0.6 * sizes[0], sizes
    core = ov.Core()
    outs = []
    for k in ("f32", "w16"):
        compiled = core.compile_model(str(tmp_path / f"{k}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outs.append(np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))]))
    cos = float((outs[0] * outs[1]).sum() / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1]))
    assert cos > 0.9999 and (outs[0].argmax(1) == outs[1].argmax(1)).mean() >= 0.98, cos


def test_the_conversion_record_counts_samples_of_named_inputs_and_keeps_listed_dtypes(tmp_path: Path) -> None:
    """Calibration / validation given as {input name: rows} are counted in rows (they were counted in inputs), and
    input dtypes given as a list are recorded (the record crashed on them); the manifest then validates."""
    from edge_sdk.converters.pipeline import convert

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 100, size=(40, 12)).astype(np.int64)
    bundle = convert(_TokenModel().eval(), out=tmp_path / "b", to="onnx", ort=False, precision="fp32",
                     calib={"input": ids[:32]}, val={"input": ids[32:]}, input_shape=(1, 12), input_dtypes=["int64"],
                     quiet=True)
    record = bundle.manifest.extra["conversion"]
    assert record["calibration"] == {"kind": "dict", "samples": 32}
    assert record["validation"] == {"kind": "dict", "samples": 8}
    assert record["input_dtypes"] == ["int64"]


def test_dense_model_destroyed_by_int8_recovers_compressed_on_ort_and_tflite(
        fashion_torch_cnn: Any, fashion_test: tuple, fashion_calibration: np.ndarray, tmp_path: Path) -> None:
    """Issue 14: plain int8 cosine < 0.5 on ONNX Runtime and TFLite, refused; ``--min-cosine 0.95`` recovers an
    int8 artifact (the outlier-fed conv and its feeder in float) at under half the fp32 size on both."""
    pytest.importorskip("litert_torch")
    from edge_sdk.converters.pipeline import convert

    torch.set_num_threads(1)
    x, _ = fashion_test
    bundle = convert(make_fragile_embedding(fashion_torch_cnn), out=tmp_path / "b", to="onnx,tflite",
                     precision="fp32,int8", ort=False, calib=fashion_calibration[:200], val=x[:300],
                     input_shape=(1, 1, 28, 28), quiet=True, budget=AccuracyBudget(min_cosine=0.95, speed_check=False))
    arts = {a.key: a for a in bundle.artifacts}
    for fmt in ("onnx", "tflite"):
        art, fp32 = arts[f"{fmt}/int8"], arts[f"{fmt}/fp32"]
        record = art.validation.checks["accuracy_budget"]
        plain = record["steps"][0]
        plain_cos = float(plain["metric"].split("cosine ")[1].split()[0])
        print(f"{fmt}: plain int8 cosine {plain_cos:.3f} -> {record['kept']} cosine {art.validation.cosine:.4f}, "
              f"{art.size_bytes / fp32.size_bytes:.2f}x fp32 size")
        assert plain["name"] == "int8" and plain["passed"] is False and plain_cos < 0.5, plain
        assert record["kept"].startswith("mixed:") or record["kept"] == "int16-activations", record
        assert art.precision == "int8" and art.validation.cosine >= 0.95
        assert art.size_bytes <= 0.5 * fp32.size_bytes, (art.size_bytes, fp32.size_bytes)
