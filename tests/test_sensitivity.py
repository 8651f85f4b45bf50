"""Per-layer int8 sensitivity (converters/sensitivity.py): a layer is scored by what int8 on that layer alone
does to the model's outputs, measured with ONNX Runtime on a real exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConvertOptions

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class _ThreeLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)

    def forward(self, x: Any) -> Any:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = _ThreeLayers().eval()
    with torch.no_grad():
        net.a.weight[:, 0] /= 1000  # input feature 0 comes ~1000x larger: a's outputs stay well scaled
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, torch.zeros(1, 16), str(path), input_names=["x"], dynamo=False, opset_version=17)
    return path


def test_the_layer_whose_int8_input_wrecks_the_output_ranks_first(tmp_path: Path) -> None:
    """Feature 0 of the input is ~1000x the others (layer a weighs it down): rounding a's input to 8 bits per
    tensor zeroes every other feature, so int8 on layer a alone changes the outputs far more than on b or c. The
    old score (error growth across the layer, kept as ``growth``) does not rank a first."""
    from edge_sdk.converters.sensitivity import _only_layer_int8, float_nodes_for, rank_onnx_layers

    path = _export(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    x[:, 0] *= 1000
    ranked = rank_onnx_layers(path, SampleSet([x]), ["x"], tmp_path / "work", ConvertOptions(), max_samples=16)
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(ranked) == 3 and ranked[0].node == names[0], [(r.node, r.score) for r in ranked]
    assert ranked[0].score > 10 * max(r.score for r in ranked[1:]), [(r.node, r.score) for r in ranked]
    assert max(ranked, key=lambda r: r.growth).node != names[0]  # what the growth score got wrong
    assert sorted((r.index, r.of) for r in ranked) == [(0, 3), (1, 3), (2, 3)]
    assert float_nodes_for(ranked, 1, "input_nodes")[0] == names[0]
    # the graph that gives a layer its score: the fp32 graph plus one Quantize/Dequantize pair, that layer's
    # weight and bias rounded, nothing else touched
    fp = onnx.load(str(path))
    q = onnx.load(str(tmp_path / "work" / "sensitivity.int8.onnx"))
    alone = onnx.load_from_string(_only_layer_int8(onnx, fp, q, names[1]))
    assert [n.op_type for n in alone.graph.node].count("QuantizeLinear") == 1
    assert len(alone.graph.node) == len(fp.graph.node) + 2
    changed = [n.name for n in alone.graph.node if any("__int8_alone" in i or "__dq_alone" in i for i in n.input)]
    assert changed == [names[1]], changed


def test_scores_follow_the_data(tmp_path: Path) -> None:
    """The same model on well-scaled inputs (no outlier feature): no layer stands out by 10x (the ranking is
    measured, not fixed)."""
    from edge_sdk.converters.sensitivity import rank_onnx_layers

    path = _export(tmp_path)
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    ranked = rank_onnx_layers(path, SampleSet([x]), ["x"], tmp_path / "work", ConvertOptions(), max_samples=16)
    scores = sorted(r.score for r in ranked)
    assert scores[-1] < 10 * scores[-2], [(r.node, r.score) for r in ranked]
    assert all(0 < s < 0.05 for s in scores), scores  # int8 of one layer: about 1 % relative error here
