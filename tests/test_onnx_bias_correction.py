"""The ``mixed:stem`` pieces of ONNX int8 (converters/onnx_quantize.py, converters/onnx_bias_correction.py): the
stem found in a real exported graph, and bias correction after ONNX Runtime's quantizer measured on held-out data."""

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


class _Residual(torch.nn.Module):
    """conv - relu - conv - relu, a residual block (the stem ends where its skip branches off), eight convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
        self.tail = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(8))
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y = y + self.c4(torch.relu(self.c3(y)))
        for c in self.tail:
            y = torch.relu(c(y))
        return self.fc(y.mean(dim=(2, 3)))


class _Chain(torch.nn.Module):
    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(n))

    def forward(self, x: Any) -> Any:
        for c in self.convs:
            x = torch.relu(c(x))
        return x


def _export(net: Any, path: Path, shape: tuple[int, ...]) -> Path:
    torch.onnx.export(net.eval(), torch.zeros(*shape), str(path), input_names=["x"], dynamo=False,
                      opset_version=17)
    return path


def _conv_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")]


def test_stem_stops_where_the_graph_branches_and_at_a_quarter_of_a_chain(tmp_path: Path) -> None:
    from edge_sdk.converters.onnx_quantize import stem_layers

    torch.manual_seed(0)
    res = _export(_Residual(), tmp_path / "res.onnx", (1, 3, 16, 16))
    names = _conv_names(res)
    assert stem_layers(onnx.load(str(res))) == names[:2]  # c1, c2 (of 13, cap 3): c2's output feeds c3 and the Add
    chain = _export(_Chain(8), tmp_path / "chain.onnx", (1, 4, 8, 8))
    assert stem_layers(onnx.load(str(chain))) == _conv_names(chain)[:2]  # no branch: capped at 8 // 4


class _Biased(torch.nn.Module):
    """conv1 (float: ONNX Runtime's quantizer keeps the input layer float) - relu - conv2 - relu - conv3 - mean.
    Every conv2 weight sits 0.45 of an int8 step above a level (one weight per channel pins the scale), so
    rounding lowers every weight and, with its non-negative input, every output mean: a shift bias correction
    can take out."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1),
                                     torch.nn.Conv2d(16, 8, 1))
        with torch.no_grad():
            step = 0.002
            levels = torch.randint(-20, 21, self.c2.weight.shape).float()
            w = (levels + 0.45) * step
            w[:, 0, 0, 0] = 127 * step  # the channel's largest |w|: scale = step exactly
            self.c2.weight.copy_(w)

    def forward(self, x: Any) -> Any:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))).mean(dim=(2, 3))


def _error(fp32: Path, q: Path, x: np.ndarray) -> float:
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(((a - b) ** 2).sum() / (a**2).sum())


def test_bias_correction_removes_a_systematic_int8_shift_on_held_out_data(tmp_path: Path) -> None:
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    torch.manual_seed(0)
    fp32 = _export(_Biased(), tmp_path / "biased.onnx", (1, 3, 16, 16))
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (48, 3, 16, 16)).astype(np.float32)
    held_out = rng.uniform(0, 1, (64, 3, 16, 16)).astype(np.float32)
    errors, infos = {}, {}
    for bc in (False, True):
        out = tmp_path / f"bc_{bc}.onnx"
        infos[bc] = quantize_static_qdq(fp32, out, SampleSet([calib]), ConvertOptions(
            extra={"onnx_quantizer": "ort", "onnx_bias_correction": bc}))
        errors[bc] = np.mean([_error(fp32, out, held_out[i:i + 1]) for i in range(len(held_out))])
    assert "onnx_bias_correction" not in infos[False]
    kept, of = infos[True]["onnx_bias_correction"].split(" layers")[0].split(" of ")
    assert int(kept) >= 1 and int(of) == 2  # conv2 and conv3 are int8 (conv1 reads the input: float)
    assert errors[True] < 0.5 * errors[False], errors


def test_bias_correction_keeps_no_change_that_moves_the_outputs_away(tmp_path: Path) -> None:
    """On calibration data the corrected model is never further from fp32 than the uncorrected one: a layer's
    correction is kept only when the model's outputs get closer (checked here on the same samples)."""
    from edge_sdk.converters.onnx_bias_correction import bias_correct_qdq
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    torch.manual_seed(1)
    fp32 = _export(_Residual(), tmp_path / "res.onnx", (1, 3, 16, 16))
    calib = np.random.default_rng(1).normal(0, 1, (24, 3, 16, 16)).astype(np.float32)
    q = tmp_path / "q.onnx"
    quantize_static_qdq(fp32, q, SampleSet([calib]), ConvertOptions(extra={"onnx_quantizer": "ort"}))
    before = np.mean([_error(fp32, q, calib[i:i + 1]) for i in range(len(calib))])
    info = bias_correct_qdq(fp32, q, SampleSet([calib]), ["x"])
    after = np.mean([_error(fp32, q, calib[i:i + 1]) for i in range(len(calib))])
    assert info["onnx_bias_correction"].endswith("24 samples")
    assert after <= before * (1 + 1e-6), (before, after)
