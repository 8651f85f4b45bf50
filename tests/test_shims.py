"""Vendor-tool shims (converters/shims.py): the registry's rules, and for every shim the bug it hides.

Each shim has a reproduction here that runs the real failing conversion in a fresh process with the
shim disabled (``EDGE_SDK_DISABLE_SHIMS=<name>``) and expects the upstream error, then the same
conversion with the shim, which must succeed. When upstream fixes a bug, its "bug is real" test
fails and says the shim can go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk._deps import has_module
from edge_sdk.converters import shims
from edge_sdk.converters.shims import SHIMS, Shim, apply_shims, disabled_names, explain

ROOT = Path(__file__).resolve().parent.parent
INT_CAST = "coreml-torch-int-cast"
INT_CAST_ERROR = "only 0-dimensional arrays can be converted to Python scalars"
PRELU = "coreml-torch-prelu-rank"
SCOPE = "onnx2tf-scope-names"
needs_coreml_torch = pytest.mark.skipif(not (has_module("coremltools") and has_module("torch")),
                                        reason="coremltools and torch are needed")

# shim name -> the test below that reproduces its bug (checked by test_every_shim_has_a_reproduction)
REPRODUCTIONS = {INT_CAST: "test_int_cast_bug_is_real_without_the_shim",
                  PRELU: "test_prelu_bug_is_real_without_the_shim",
                  SCOPE: "test_onnx2tf_scope_name_bug_is_real_and_the_shim_fixes_it"}


# ---------------------------------------------------------------- registry rules (no heavy import)

def test_every_shim_has_a_reproduction():
    assert set(REPRODUCTIONS) == {s.name for s in SHIMS}
    for name in REPRODUCTIONS.values():
        assert callable(globals()[name])


def test_shims_are_documented():
    from packaging.specifiers import SpecifierSet

    assert len({s.name for s in SHIMS}) == len(SHIMS)
    for shim in SHIMS:
        assert shim.issue.startswith("https://github.com/") and "/issues/" in shim.issue
        assert SpecifierSet(shim.versions) and shim.summary and shim.signature and shim.frontends
        for spec in shim.requires.values():
            SpecifierSet(spec)


def test_disable_env_parsing(monkeypatch):
    monkeypatch.setenv("EDGE_SDK_DISABLE_SHIMS", " a, b ,,")
    assert disabled_names() == {"a", "b"}
    monkeypatch.delenv("EDGE_SDK_DISABLE_SHIMS")
    assert disabled_names() == set()


def _fake(name: str, versions: str, calls: list[str], frontends: tuple[str, ...] = ("f",),
          requires: dict[str, str] | None = None) -> Shim:
    return Shim(name=name, tool="numpy", versions=versions, issue="https://github.com/x/y/issues/1",
                summary="s", apply=lambda: calls.append(name), signature=f"boom {name}", frontends=frontends,
                requires=requires or {})


def test_apply_respects_version_range_requires_frontend_and_env(monkeypatch):
    """Only in-range, enabled shims of the asked tool/frontend run; the installed numpy decides the range."""
    import importlib.metadata

    numpy_version = importlib.metadata.version("numpy")
    calls: list[str] = []
    fakes = (
        _fake("in-range", f">={numpy_version}", calls),
        _fake("too-new", "<1.0", calls),  # a bug fixed long before the installed numpy
        _fake("needs-missing-dist", "", calls, requires={"no-such-distribution-xyz": ""}),
        _fake("trigger-out-of-range", "", calls, requires={"numpy": "<1.0"}),
        _fake("other-frontend", "", calls, frontends=("g",)),
    )
    monkeypatch.setattr(shims, "SHIMS", fakes)
    monkeypatch.delenv("EDGE_SDK_DISABLE_SHIMS", raising=False)
    assert apply_shims("numpy", frontend="f") == ["in-range"]
    assert apply_shims("numpy") == ["in-range", "other-frontend"]
    assert apply_shims("coremltools") == []
    monkeypatch.setenv("EDGE_SDK_DISABLE_SHIMS", "in-range")
    assert apply_shims("numpy") == ["other-frontend"]
    monkeypatch.setenv("EDGE_SDK_DISABLE_SHIMS", "all")
    assert apply_shims("numpy") == []
    assert calls == ["in-range", "in-range", "other-frontend", "other-frontend"]
    assert "disabled by EDGE_SDK_DISABLE_SHIMS" in explain("numpy", "x boom in-range y")
    monkeypatch.delenv("EDGE_SDK_DISABLE_SHIMS")
    assert "not applied" in explain("numpy", "boom too-new")
    assert explain("numpy", "an unrelated error") is None


@needs_coreml_torch
def test_int_cast_shim_is_idempotent_and_in_the_registry():
    from edge_sdk.converters.coreml_spec import import_coremltools

    import_coremltools()
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    if INT_CAST not in apply_shims("coremltools"):
        pytest.skip("the installed coremltools / numpy are outside the shim's range")
    mapping = _TORCH_OPS_REGISTRY.name_to_func_mapping
    first = mapping["int"]
    assert first is not ops._int and first._edge_sdk_shim == INT_CAST
    assert mapping["_int"] is first
    assert INT_CAST in apply_shims("coremltools")
    assert mapping["int"] is first  # re-applying registered nothing new
    prelu = mapping["prelu"]
    assert prelu._edge_sdk_shim == PRELU
    apply_shims("coremltools")
    assert mapping["prelu"] is prelu
    assert mapping["bool"] is ops._bool  # untouched: bool() of a 1-element array still works in NumPy 2


# ---------------------------------------------------------------- reproductions on a real model

@pytest.fixture(scope="module")
def mobilenet_size_cast_ts(mobilenet_v2, tmp_path_factory) -> Path:
    """The real ImageNet MobileNetV2 with an EfficientNet-style head, traced and saved as TorchScript.

    ``x.view(x.size(0), -1)`` is how many classifier heads flatten; traced, it leaves ``aten::size``
    -> ``prim::NumToTensor`` -> ``aten::Int``, the op coremltools 9.0 cannot fold under NumPy >= 2.4.
    """
    import torch

    class SizeCastHead(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.adaptive_avg_pool2d(self.net.features(x), 1)
            return self.net.classifier(x.view(x.size(0), -1))

    wrapped = SizeCastHead(mobilenet_v2).eval()
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, torch.zeros(1, 3, 224, 224))
    assert "aten::Int" in {n.kind() for n in traced.inlined_graph.nodes()}
    path = tmp_path_factory.mktemp("shim_ts") / "mobilenet_v2_size_cast.ts"
    torch.jit.save(traced, path)
    return path


_CONVERT = """
import json, sys
from pathlib import Path
import edge_sdk.converters.torch_to_coreml  # registers the converter
from edge_sdk.converters.base import ConversionContext, get_converter
from edge_sdk.converters.sources import load_source
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Format, Framework, Precision

src = load_source(sys.argv[1], input_shape=json.loads(sys.argv[3]))
conv = get_converter(Framework.PYTORCH, Format.COREML)
try:
    d = conv.convert(ConversionContext(src, Path(sys.argv[2])), Precision.FP32)[0]
except ConversionError as exc:
    cause = exc.__cause__
    out = {"ok": False, "error": str(exc), "cause": type(cause).__name__, "cause_text": str(cause)}
else:
    out = {"ok": True, "path": str(d.path), "notes": d.notes, "checks": d.spec_checks}
print("RESULT " + json.dumps(out))
"""


def _convert_in_subprocess(ts_path: Path, workdir: Path, disable: str,
                           shape: tuple[int, ...] = (1, 3, 224, 224)) -> dict[str, Any]:
    env = {**os.environ, "EDGE_SDK_DISABLE_SHIMS": disable}
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(ts_path), str(workdir), json.dumps(list(shape))],
                          capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"converter process crashed:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
@needs_coreml_torch
def test_int_cast_bug_is_real_without_the_shim(mobilenet_size_cast_ts, tmp_path):
    got = _convert_in_subprocess(mobilenet_size_cast_ts, tmp_path, disable=INT_CAST)
    if got["ok"]:
        pytest.fail(f"the conversion succeeded without {INT_CAST}: coremltools fixed "
                    "https://github.com/apple/coremltools/issues/2633 for these versions; narrow the shim's "
                    "version range or drop it")
    assert got["cause"] == "TypeError" and got["cause_text"] == INT_CAST_ERROR
    # the user-facing error names the upstream bug instead of blaming an unsupported op
    assert "apple/coremltools/issues/2633" in got["error"] and "disabled by EDGE_SDK_DISABLE_SHIMS" in got["error"]


@pytest.mark.slow
@needs_coreml_torch
def test_int_cast_shim_converts_the_same_model(mobilenet_size_cast_ts, mobilenet_v2, tmp_path):
    got = _convert_in_subprocess(mobilenet_size_cast_ts, tmp_path, disable="")
    assert got["ok"], got
    assert got["notes"][0].startswith("captured with torchscript")
    assert any(INT_CAST in n and "issues/2633" in n for n in got["notes"])
    checks = got["checks"]
    assert checks["passed"] and checks["outputs"][0]["shape"] == [1, 1000]
    assert set(checks["weights"]) == {"fp32"} and checks["weights"]["fp32"]["elements"] > 3_400_000
    # the package holds the real ImageNet classifier, not something the shim made up
    from edge_sdk.converters.coreml_spec import import_coremltools

    ct = import_coremltools()
    from coremltools.optimize.coreml import get_weights_metadata

    model = ct.models.MLModel(got["path"], skip_model_load=True)
    stored = [m.val for m in get_weights_metadata(model, weight_threshold=2048).values()]
    dense = next(w for w in stored if w.shape == (1000, 1280))
    np.testing.assert_allclose(dense, mobilenet_v2.classifier[1].weight.detach().numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
@needs_coreml_torch
def test_torchscript_classifier_bundle_through_edge_sdk_convert(mobilenet_size_cast_ts, photo_crops, tmp_path):
    """The issue's case end to end: a TorchScript classifier -> Core ML fp32 + int8 bundle, spec-checked."""
    import edge_sdk

    calib = tmp_path / "calib.npy"
    np.save(calib, photo_crops[:32])
    bundle = edge_sdk.convert(str(mobilenet_size_cast_ts), input_shape=[1, 3, 224, 224], to="coreml",
                              precision="fp32,int8", calib=str(calib), out=tmp_path / "bundle", quiet=True)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    arts = {a["precision"]: a for a in manifest["artifacts"] if a["format"] == "coreml"}
    assert set(arts) == {"fp32", "int8"}, [(a["format"], a["precision"]) for a in manifest["artifacts"]]
    for precision, art in arts.items():
        checks = art["validation"]["checks"]
        assert checks["passed"] and checks["model_type"] == "mlProgram", precision
        assert checks["inputs"][0]["shape"] == [1, 3, 224, 224] and checks["outputs"][0]["shape"] == [1, 1000]
        assert any(INT_CAST in n for n in art["notes"]), art["notes"]
        if sys.platform != "darwin":
            assert "needs macOS" in art["validation"]["skipped_reason"]
    assert arts["int8"]["validation"]["checks"]["compressed_share"] > 0.95
    assert arts["int8"]["size_bytes"] < 0.3 * arts["fp32"]["size_bytes"]
    assert bundle is not None


# ---------------------------------------------------------------- per-channel PReLU on rank 2 (MTCNN RNet)

@pytest.fixture(scope="module")
def rnet_torchscript() -> Path:
    """MTCNN's RNet with the real facenet-pytorch weights, traced (examples/corpus.py): PReLU(128) after a Linear."""
    import corpus

    return corpus.get("facenet-rnet").source()["source"]


@pytest.mark.slow
@needs_coreml_torch
def test_prelu_bug_is_real_without_the_shim(rnet_torchscript, tmp_path):
    got = _convert_in_subprocess(rnet_torchscript, tmp_path, disable=PRELU, shape=(1, 3, 24, 24))
    if got["ok"]:
        pytest.fail(f"the conversion succeeded without {PRELU}: coremltools fixed per-channel PReLU on rank 2-3 "
                    "inputs (apple/coremltools#2781) for these versions; narrow the shim's range or drop it")
    assert got["cause"] == "ValueError" and "all the values of alpha are same" in got["cause_text"]
    assert "apple/coremltools/issues/2002" in got["error"]


@pytest.mark.slow
@needs_coreml_torch
def test_prelu_shim_converts_rnet_keeping_per_channel_alphas(rnet_torchscript, tmp_path):
    got = _convert_in_subprocess(rnet_torchscript, tmp_path, disable="", shape=(1, 3, 24, 24))
    assert got["ok"], got
    assert any(PRELU in n for n in got["notes"])
    checks = got["checks"]
    assert checks["passed"] and [o["shape"] for o in checks["outputs"]] == [[1, 4], [1, 2]]
    from edge_sdk.converters.coreml_spec import import_coremltools

    ct = import_coremltools()
    spec = ct.models.MLModel(got["path"], skip_model_load=True).get_spec()
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    prelus = [op for op in block.operations if op.type == "prelu"]
    assert len(prelus) == 4  # three after convs (rank 4) and the one after the Linear, now rank 4 too
    sizes = [[d.constant.size for d in consts[op.inputs["alpha"].arguments[0].name].attributes["val"].type
              .tensorType.dimensions] for op in prelus]
    assert [128] in sizes  # one alpha per channel of the Linear's output, not a single shared value


# ---------------------------------------------------------------- onnx2tf: node names TensorFlow refuses (PaddleOCR)

_ONNX2TF = """
import json, sys
sys.path.insert(0, "examples")
import corpus
from edge_sdk.converters.pipeline import convert
from edge_sdk.errors import ValidationError
m = corpus.get("ppocr-cls")
kw = m.source()
try:
    res = convert(kw.pop("source"), out=sys.argv[1], to="tflite", precision="fp32", val=m.inputs(4, seed=2),
                  route="tflite=onnx2tf", quiet=True, **kw).results  # onnx2tf alone: not rescued by a later route
except ValidationError as exc:
    res = exc.results
print("RESULT " + json.dumps({"status": res[0].status, "reason": res[0].reason}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not has_module("onnx2tf"), reason="onnx2tf is needed")
def test_onnx2tf_scope_name_bug_is_real_and_the_shim_fixes_it(tmp_path):
    """PP-OCR's text-angle classifier names a node 'Softmax@0': onnx2tf stops on it unless the shim renames it."""
    got = {}
    for disable in (SCOPE, ""):
        proc = subprocess.run([sys.executable, "-c", _ONNX2TF, str(tmp_path / f"b{len(got)}")], capture_output=True,
                              text=True, cwd=ROOT, timeout=600, env={**os.environ, "EDGE_SDK_DISABLE_SHIMS": disable})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, proc.stderr[-2000:]
        got[disable] = json.loads(lines[-1].removeprefix("RESULT "))
    if got[SCOPE]["status"] == "passed":
        pytest.fail("onnx2tf converted 'Softmax@0' without the shim: drop onnx2tf-scope-names")
    assert "is not a valid scope name" in got[SCOPE]["reason"] and "onnx-tensorflow/issues/821" in got[SCOPE]["reason"]
    assert got[""]["status"] == "passed", got[""]["reason"]
