"""One source of truth per format and runtime (issue 12): the manifest schema, the enums and every derived list
agree with the runtime and converter registries; converter capabilities are well formed; duplicates are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest

import edge_sdk.converters as converters
from edge_sdk import _bench_worker
from edge_sdk.converters.base import (
    ConvertOptions,
    LadderStep,
    budget_ladder_of,
    check_options,
    extra_options_of,
    needs_calibration,
)
from edge_sdk.converters.registry import BUILTIN_CONVERTERS, registered_classes, target_formats
from edge_sdk.converters.routes import ROUTES, all_route_converters
from edge_sdk.device_agent import agent as agent_mod
from edge_sdk.device_agent.config import ConfigError, load_config
from edge_sdk.errors import ConversionError, EdgeSDKError, InferenceError
from edge_sdk.formats import Format, Framework, Precision
from edge_sdk.runtimes import (
    RUNTIMES,
    all_runtimes,
    bench_modules,
    default_order,
    get_runtime,
    plot_markers,
    register_runtime,
    unregister_runtime,
)
from edge_sdk.targets import profiles


def _schema() -> dict:
    return json.loads(resources.files("edge_sdk").joinpath("schemas/manifest.schema.json").read_text())


def _enums(node: object, found: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
    """Every ``{"<property>": {"enum": [...]}}`` in the schema, by property name (wherever it is defined)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(value.get("enum"), list):
                found.setdefault(key, []).append(value["enum"])
            _enums(value, found)
    elif isinstance(node, list):
        for item in node:
            _enums(item, found)
    return found


def test_schema_enums_equal_the_registries() -> None:
    enums = _enums(_schema(), {})
    assert enums["format"], "the schema lists no artifact formats"
    for formats in enums["format"]:
        assert sorted(formats) == sorted(f.value for f in Format)
        assert sorted(formats) == sorted(f.value for f in target_formats())  # every format has a converter
        assert sorted(formats) == sorted({str(f) for rt in all_runtimes() for f in rt.formats})  # and a runtime
    for precisions in enums["precision"]:
        assert sorted(precisions) == sorted(p.value for p in Precision)
    for frameworks in enums["framework"]:
        assert sorted(frameworks) == sorted(f.value for f in Framework)
    for key in ("runtime", "runtimes", "runtime_order"):  # wherever the schema lists runtime names
        for names in enums.get(key, []):
            assert sorted(names) == sorted(RUNTIMES)


def test_every_runtime_list_derives_from_the_registry(tmp_path) -> None:
    names = list(RUNTIMES)  # the built-ins, by rank
    assert names == ["onnxruntime", "openvino", "litert", "coreml", "onnxruntime-web", "litertjs"]
    assert list(default_order()) == list(agent_mod.DEFAULT_RUNTIME_ORDER) == names
    assert list(_bench_worker.RUNTIME_MODULES) == list(bench_modules()) == names
    assert all(_bench_worker.RUNTIME_MODULES[n] for n in names)  # each built-in names what it imports
    assert set(plot_markers()) == {f.value for f in Format}  # every format has a plot marker
    assert profiles.RUNTIMES is RUNTIMES
    for n in names:
        assert get_runtime(n).name == n and get_runtime(n).extra
        cfg = tmp_path / f"{n}.toml"
        cfg.write_text(f'runtime_order = ["{n}"]\n')
        assert load_config(cfg).runtime_order == (n,)
    bad = tmp_path / "bad.toml"
    bad.write_text('runtime_order = ["tensorrt"]\n')
    with pytest.raises(ConfigError, match="unknown runtime"):
        load_config(bad)
    with pytest.raises(InferenceError, match="unknown runtime 'tensorrt': choose from onnxruntime"):
        get_runtime("tensorrt")


def test_builtin_target_profiles_name_registered_runtimes() -> None:
    for p in profiles.list_profiles():
        assert set(p.runtimes) <= set(RUNTIMES), p.name


def test_runtime_registration_ranks_and_refuses_duplicates() -> None:
    class Fast:
        name, formats, extra, rank = "fastest", (Format.ONNX,), "fastest", 1

        def is_available(self) -> bool:
            return False

        def version(self) -> None:
            return None

        def load(self, path, *, threads=None):
            raise InferenceError("never")

    register_runtime(Fast)
    try:
        assert default_order()[0] == "fastest" and "fastest" in RUNTIMES
        register_runtime(Fast)  # the same class again: a no-op
        clash = type("Clash", (Fast,), {})
        with pytest.raises(EdgeSDKError, match="already registered"):
            register_runtime(clash)
        register_runtime(clash, overwrite=True)
        assert type(get_runtime("fastest")).__name__ == "Clash"
        with pytest.raises(EdgeSDKError, match="is not a runtime"):
            register_runtime(object())
    finally:
        unregister_runtime("fastest")
    assert "fastest" not in RUNTIMES


def test_converter_registry_fills_on_package_import_without_frameworks() -> None:
    code = ("import sys, json\nimport edge_sdk.converters as c\n"
            "heavy = [m for m in ('torch', 'tensorflow', 'openvino', 'nncf', 'coremltools', 'onnx2tf', 'keras', "
            "'onnx', 'onnxruntime') if m in sys.modules]\n"
            "print(json.dumps([len(c.registered()), heavy]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert count == len(registered_classes()) >= len(BUILTIN_CONVERTERS)
    assert heavy == []


def test_converter_capabilities_are_well_formed() -> None:
    convs = [*converters.registered().values(), *all_route_converters()]
    for conv in convs:
        ladder = budget_ladder_of(conv)
        assert all(isinstance(s, LadderStep) for s in ladder), conv
        assert all(s.mixed in ("", "onnx", "openvino", "tflite") for s in ladder), conv
        if ladder:
            assert ladder[-1].name == "fp16" and ladder[-1].precision is Precision.FP16
            assert [s.name for s in ladder if s.qat] == ["qat"] and ladder[-2].qat, conv  # the last int8 rung
        for spec in extra_options_of(conv):
            assert spec.name and spec.type, conv
    byname = {type(c).__name__: c for c in convs}
    # calibration: int8 everywhere except weight-only Core ML and files bundled as they are
    assert needs_calibration(byname["OnnxToOpenVINO"], Precision.INT8)
    assert not needs_calibration(byname["OnnxToOpenVINO"], Precision.FP16)
    assert not needs_calibration(byname["TorchToCoreML"], Precision.INT8)
    assert not needs_calibration(byname["TFLiteToTFLite"], Precision.INT8)
    # the ladders the formats had before they moved onto the converters
    assert [s.name for s in budget_ladder_of(byname["TorchToOnnx"])] == [
        "calibration:ort-minmax-mean", "calibration:percentile", "mixed:stem", "mixed", "int16-activations", "qat",
        "fp16"]
    assert budget_ladder_of(byname["OnnxToOrt"]) == budget_ladder_of(byname["TorchToOnnx"])
    assert [s.name for s in budget_ladder_of(byname["OnnxToOpenVINO"])][:2] == ["calibration:mean-quantile", "mixed"]
    assert budget_ladder_of(byname["KerasToCoreML"]) == ()
    # every route's converter resolves
    for (fw, fmt), routes in ROUTES.items():
        assert routes and converters.get_converter(fw, fmt)


def test_convert_options_are_checked_against_what_converters_read() -> None:
    convs = [*converters.registered().values(), *all_route_converters()]
    check_options(ConvertOptions(extra={"onnx_quantizer": "ORT", "openvino_ignored_names": ["a"],
                                        "onnx_calib_percentile": 99}), convs)
    with pytest.raises(ConversionError, match=r"extra\['onnx_quantiser'\] is not read by any converter"):
        check_options(ConvertOptions(extra={"onnx_quantiser": "ort"}), convs)
    with pytest.raises(ConversionError, match="choose from auto, nncf, ort"):
        check_options(ConvertOptions(extra={"onnx_quantizer": "tensorrt"}), convs)
    with pytest.raises(ConversionError, match="must be bool"):
        check_options(ConvertOptions(extra={"onnx_float_outputs": "no"}), convs)


def test_converter_duplicates_raise_unless_overwrite() -> None:
    from edge_sdk.converters import register, unregister

    original = registered_classes()[(Framework.ONNX, Format.TFLITE)]
    impostor = type("Impostor", (original,), {"sources": (Framework.ONNX,)})
    with pytest.raises(ConversionError, match="onnx -> tflite is already registered"):
        register(impostor)
    register(original)  # the same class again: a no-op
    try:
        register(impostor, overwrite=True)
        assert type(converters.get_converter(Framework.ONNX, Format.TFLITE)) is impostor
    finally:
        register(original, overwrite=True)
    assert type(converters.get_converter(Framework.ONNX, Format.TFLITE)) is original
    new = type("IrToOrt", (), {"sources": (Framework.OPENVINO,), "target": Format.ORT, "precisions": (),
                               "convert": lambda self, ctx, p: []})
    register(new)
    try:
        assert type(converters.get_converter(Framework.OPENVINO, Format.ORT)) is new
    finally:
        unregister(Framework.OPENVINO, Format.ORT)
    with pytest.raises(ConversionError, match="is not a converter"):
        register(type("Nothing", (), {}))
