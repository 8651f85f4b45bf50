"""TFLite's ``mixed:stem`` rung pieces (converters/keras_to_tflite.py options, converters/tflite_quantize.py,
converters/tflite_weight_rounding.py, converters/tflite_bias_correction.py) on the trained Fashion-MNIST CNN,
converted for real from PyTorch: float stem and head with float inputs / outputs, GPTQ integers carried from the
ONNX twin into the .tflite, the int8 biases corrected on the int8 model, accuracy measured on real test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.converters.base import ConvertOptions

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")

_STEM_RUNG = {"tflite_quantizer": "aeq", "tflite_float_stem": True, "tflite_float_head": True,
              "tflite_weight_rounding": "gptq", "tflite_full_bias_correction": True}


def test_matching_layout_finds_each_weight_layout() -> None:
    from edge_sdk.converters.tflite_weight_rounding import matching_layout

    rng = np.random.default_rng(0)
    conv = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)  # ONNX (O, I, kh, kw)
    assert matching_layout(conv, conv.transpose(0, 2, 3, 1)) == (0, 2, 3, 1)  # TFLite CONV_2D (O, kh, kw, I)
    dw = rng.normal(size=(6, 1, 3, 3)).astype(np.float32)  # ONNX depthwise (C, 1, kh, kw)
    assert matching_layout(dw, dw.reshape(6, 3, 3).transpose(1, 2, 0)[None]) == (1, 2, 0)  # TFLite (1, kh, kw, C)
    fc = rng.normal(size=(4, 7)).astype(np.float32)
    assert matching_layout(fc, fc) == (0, 1) and matching_layout(fc.T.copy(), fc) == (1, 0)
    assert matching_layout(conv, (conv + 0.1).transpose(0, 2, 3, 1)) is None  # other values: no match
    assert matching_layout(fc, np.zeros((3, 9), np.float32)) is None


@pytest.fixture(scope="module")
def stem_bundles(fashion_torch_cnn: Any, fashion_calibration: np.ndarray, fashion_test: tuple,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from edge_sdk.converters.pipeline import convert

    torch.set_num_threads(1)
    x, y = fashion_test
    out = {}
    for name, extra in (("plain", {"tflite_quantizer": "aeq"}), ("stem", _STEM_RUNG)):
        out[name] = convert(fashion_torch_cnn, out=tmp_path_factory.mktemp(name) / "b", to="tflite",
                            precision="fp32,int8" if name == "plain" else "int8",
                            calib=fashion_calibration[:200], val=x[:1000], val_labels=y[:1000],
                            input_shape=(1, 1, 28, 28), quiet=True, options=ConvertOptions(extra=extra))
    return out


def _interpreter(path: Path) -> Any:
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(model_path=str(path),
                                experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    return interp


def test_stem_rung_graph_float_edges_gptq_integers_and_accuracy(stem_bundles: dict[str, Any],
                                                                fashion_onnx: Path,
                                                                fashion_calibration: np.ndarray,
                                                                tmp_path: Path) -> None:
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.weight_rounding import gptq_onnx

    (art,) = stem_bundles["stem"].artifacts
    tv = art.tool_versions
    assert tv["tflite_float_stem"] == "1 layers"  # a plain chain of 4 weighted layers: the stem is capped at 1
    assert tv["tflite_float_head"].startswith("1 layers")
    assert tv["tflite_weight_rounding"].startswith("gptq (3 of 4")  # the float stem keeps its fp32 weights
    assert "edgetpu" not in art.runtime
    note = " ".join(art.notes)
    assert "int8 layers corrected on the int8 model" in note, note
    interp = _interpreter(stem_bundles["stem"].root / art.path)
    assert interp.get_input_details()[0]["dtype"] == np.float32  # no 8-bit rounding of the input ...
    assert interp.get_output_details()[0]["dtype"] == np.float32  # ... nor of the scores
    details = {int(d["index"]): d for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    dtype = [details[int(op["inputs"][0])]["dtype"] for op in weighted]
    assert dtype[0] == np.float32 and dtype[-1] == np.float32  # stem and head compute in float
    assert all(d == np.int8 for d in dtype[1:-1]), dtype
    producer = {int(o): op for op in ops for o in op["outputs"]}
    head_w = producer[int(weighted[-1]["inputs"][1])]
    assert head_w["op_name"] == "DEQUANTIZE"  # the head's weights are stored int8
    # the int8 weights of the middle layers are the GPTQ levels computed on the ONNX twin
    info = gptq_onnx(fashion_onnx, tmp_path / "g.onnx", SampleSet([fashion_calibration[:200]]), ["x"])
    assert info["onnx_weight_rounding"].startswith("gptq")
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(tmp_path / "g.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    onnx_w = [inits[n.input[1]] for n in g.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    q = interp.get_tensor(int(weighted[1]["inputs"][1]))  # second conv: int8 (O, kh, kw, I)
    scale = details[int(weighted[1]["inputs"][1])]["quantization_parameters"]["scales"]
    want = onnx_w[1].transpose(0, 2, 3, 1)
    got = q.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
    assert np.allclose(got, want, atol=1e-5 * np.abs(want).max()), np.abs(got - want).max()
    # accuracy on 1000 real test images: not worse than the plain int8 file by more than 0.3 pp
    plain = next(a for a in stem_bundles["plain"].artifacts if a.key == "tflite/int8")
    assert art.validation.accuracy >= plain.validation.accuracy - 0.003, (art.validation.accuracy,
                                                                          plain.validation.accuracy)
    assert art.validation.source_accuracy - art.validation.accuracy <= 0.003


def test_full_bias_correction_never_moves_the_outputs_away(stem_bundles: dict[str, Any],
                                                           fashion_calibration: np.ndarray) -> None:
    """Applied again to the plain int8 file: the corrected file's outputs are at least as close to fp32 on the
    calibration samples it was measured on (each op's correction is kept only if so)."""
    from edge_sdk.converters import tflite_bias_correction as tbc
    from edge_sdk.converters.onnx_bias_correction import output_error

    bundle = stem_bundles["plain"]
    paths = {a.key: bundle.root / a.path for a in bundle.artifacts}
    int8, fp32 = paths["tflite/int8"].read_bytes(), paths["tflite/fp32"]
    interp = _interpreter(paths["tflite/int8"])
    key = next(iter(interp.get_signature_list()))
    name, detail = next(iter(interp.get_signature_runner(key).get_input_details().items()))
    # one channel: the NCHW sample and the file's input shape hold the same values in the same order
    feeds = [{name: fashion_calibration[i:i + 1].reshape(detail["shape"])} for i in range(16)]
    fixed, kept, tried = tbc.full_bias_correction(int8, fp32.read_bytes(), key, feeds)
    assert tried >= 3
    watch: list[int] = []
    ref = tbc._Pass(fp32.read_bytes(), key, feeds, watch).outputs
    before = output_error(ref, tbc._Pass(int8, key, feeds, watch).outputs)
    after = output_error(ref, tbc._Pass(fixed, key, feeds, watch).outputs)
    assert after <= before and (kept == 0) == (fixed == int8), (before, after, kept)
