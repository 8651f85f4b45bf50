"""PT2E int8 .tflite: the fully connected ops it leaves float (an unrolled LSTM's gates) get int8 weights.

converters/tflite_weight_only.py. ddddocr's CRNN OCR came out of PT2E at 0.49x fp32 size as "int8" (its BiLSTM's
weights fp32); with the pass 0.26x, and LiteRT's hybrid kernel ran it at 0.26x fp32 latency instead of 0.58x
(VNNI host, 1 thread; timed outside the tests). Here: a small LSTM classifier through the real converter, with
the pass off and on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.converters.base import ConvertOptions

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
litert = pytest.importorskip("ai_edge_litert.interpreter")


class _LstmTagger(torch.nn.Module):
    """[1, 24, 32] features -> LSTM(96) -> per-step 12-class scores [1, 24, 12]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(32, 96, batch_first=True)
        self.head = torch.nn.Linear(96, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def _fc_weight_types(path: Path) -> list[str]:
    interp = litert.Interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    return [tensors[int(op["inputs"][1])]["dtype"].__name__ for op in interp._get_ops_details()
            if op["op_name"] == "FULLY_CONNECTED"]


def test_pt2e_int8_lstm_gates_are_stored_int8_and_the_model_still_validates(tmp_path: Path) -> None:
    from edge_sdk.converters.pipeline import convert

    torch.manual_seed(0)
    model = _LstmTagger().eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((48, 24, 32)).astype(np.float32)
    val = rng.standard_normal((32, 24, 32)).astype(np.float32)
    bundles, paths = {}, {}
    for on in (False, True):
        bundles[on] = convert(model, out=tmp_path / f"b_{on}", to="tflite", precision="int8", input_shape=[1, 24, 32],
                              calib=calib, val=val, quiet=True, keep_failed=True, task="classification",
                              options=ConvertOptions(extra={"tflite_quantizer": "native", "tflite_hybrid_fc": on}))
        art = bundles[on].artifact("tflite", "int8")
        paths[on] = bundles[on].path_of(art)
        assert art.validation.passed, art.validation
    off, on = _fc_weight_types(paths[False]), _fc_weight_types(paths[True])
    assert "float32" in off, off  # PT2E left the gate projections float
    assert "float32" not in on, on
    assert paths[True].stat().st_size < 0.6 * paths[False].stat().st_size
    art = bundles[True].artifact("tflite", "int8")
    assert any("hybrid ops" in n for n in art.notes), art.notes
    assert art.validation.top1_agreement >= 0.95 and art.validation.cosine > 0.99, art.validation
