"""Target profiles (built-in and user TOML files, errors naming file and field) and compatibility checks on real
artifacts: Edge TPU op mapping of real TFLite models, Flex ops, ORT reduced-build operators, Core ML minimum OS."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import Artifact, Bundle, Manifest, Validation, size_of
from edge_sdk.errors import BundleError, EdgeSDKError, ValidationError
from edge_sdk.formats import Format, Precision
from edge_sdk.targets import (
    ENV_VAR,
    TargetProfileError,
    check_artifact,
    check_bundle,
    coreml_spec_version,
    format_profiles,
    list_profiles,
    load_profile,
    read_required_operators,
)
from edge_sdk.targets.edgetpu_ops import parse_compiler_log

BUILTIN = {"rpi4", "rpi5", "coral-edgetpu", "ios", "android", "x86-openvino", "host", "web"}


# ---------------------------------------------------------------- profiles

def test_every_builtin_profile_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == BUILTIN
    for p in profiles.values():
        assert p.description and p.candidates and p.runtimes and p.path.is_file()
        assert load_profile(p.name) == p
        assert p.accuracy.max_accuracy_drop_pp > 0 and 0.9 < p.accuracy.min_cosine < 1
    assert {n for n, p in profiles.items() if p.benchmark_on_host} == {"host", "x86-openvino", "web"}
    coral = profiles["coral-edgetpu"]
    assert [c.key for c in coral.candidates] == ["tflite/int8"]
    assert coral.constraints.int8_io_required and coral.constraints.supported_ops == "edgetpu"
    assert coral.delegates == ("edgetpu",) and coral.convert_options()["tflite_int8_io"] is True
    assert profiles["ios"].formats == (Format.COREML,) and profiles["ios"].constraints.min_os == "iOS16"
    assert profiles["rpi4"].candidates[0].precision is Precision.INT8
    assert profiles["rpi5"].convert_options()["ort_target_platform"] == "arm"
    assert profiles["host"].convert_options()["ort_target_platform"] == "amd64"
    assert profiles["x86-openvino"].formats[0] is Format.OPENVINO
    assert profiles["android"].allows("ort", "int8") and not profiles["android"].allows("openvino", "int8")
    table = format_profiles(profiles.values())
    assert all(name in table for name in BUILTIN) and len(table.splitlines()) == len(BUILTIN) + 2
    assert "tflite/int8 > tflite/fp16" in table


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(TargetProfileError) as info:
        load_profile("rpi3")
    msg = str(info.value)
    assert "unknown target 'rpi3'" in msg and "\n" not in msg
    assert all(name in msg for name in BUILTIN)
    assert isinstance(info.value, EdgeSDKError)
    with pytest.raises(TargetProfileError, match="not found"):
        load_profile("/nowhere/my.toml")


GOOD = """
description = "my board"
arch = "arm64"
runtimes = ["litert"]

[[candidates]]
format = "tflite"
precision = "int8"

[[candidates]]
format = "tflite"
precision = "{second}"
"""


@pytest.mark.parametrize(("text", "field", "problem"), [
    (GOOD.format(second="int3"), "candidates[1].precision", "unknown precision 'int3'"),
    (GOOD.format(second="fp32").replace('description = "my board"', ""), "description", "missing required field"),
    (GOOD.format(second="fp32").replace('"tflite"\nprecision = "fp32"', '"tensorrt"\nprecision = "fp32"'),
     "candidates[1].format", "unknown format 'tensorrt'"),
    (GOOD.format(second="fp32") + "\n[constraints]\nint8_io_required = \"yes\"\n",
     "constraints.int8_io_required", "must be bool"),
    (GOOD.format(second="fp32") + "\n[accuracy]\nmax_acuracy_drop_pp = 2\n",
     "accuracy.max_acuracy_drop_pp", "unknown key"),
    (GOOD.format(second="fp32").replace('["litert"]', '["tensorrt"]'), "runtimes[0]", "unknown value 'tensorrt'"),
    (GOOD.format(second="int8"), "candidates[1]", "tflite/int8 is listed twice"),
    # a top-level key written after a table belongs to that table: caught as an unknown key there
    (GOOD.format(second="fp32") + 'threads = 2\n', "candidates[1].threads", "unknown key"),
    (GOOD.format(second="fp32").replace("[[candidates]]", "[[candidates]", 1), None, "not valid TOML"),
])
def test_malformed_profile_names_file_and_field(tmp_path: Path, text: str, field: str | None, problem: str) -> None:
    path = tmp_path / "my.toml"
    path.write_text(text)
    with pytest.raises(TargetProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert str(path) in msg and problem in msg and "\n" not in msg, msg
    if field is not None:
        assert f"{path}: {field}: " in msg, msg


def test_user_profiles_on_env_path_override_and_extend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "rpi4.toml").write_text(GOOD.format(second="fp32"))  # overrides the built-in rpi4
    (a / "jetson.toml").write_text('extends = "rpi5"\ndescription = "Jetson Orin Nano"\nthreads = 6\n'
                                   "[accuracy]\nmax_accuracy_drop_pp = 0.5\n")
    (b / "jetson.toml").write_text('extends = "rpi5"\ndescription = "Jetson, later dir wins"\n')
    monkeypatch.setenv(ENV_VAR, os.pathsep.join([str(a)]))
    rpi4 = load_profile("rpi4")
    assert rpi4.path == a / "rpi4.toml" and rpi4.description == "my board"
    assert [c.key for c in rpi4.candidates] == ["tflite/int8", "tflite/fp32"]
    jetson = load_profile("jetson")
    rpi5 = load_profile("rpi5")
    assert jetson.description == "Jetson Orin Nano" and jetson.threads == 6 and jetson.extends == "rpi5"
    assert jetson.candidates == rpi5.candidates and jetson.runtimes == rpi5.runtimes  # inherited
    assert jetson.accuracy.max_accuracy_drop_pp == 0.5 and jetson.accuracy.min_cosine == rpi5.accuracy.min_cosine
    assert {p.name for p in list_profiles()} == BUILTIN | {"jetson"}
    monkeypatch.setenv(ENV_VAR, os.pathsep.join([str(a), str(b)]))
    assert load_profile("jetson").description == "Jetson, later dir wins"
    (b / "loop.toml").write_text('extends = "loop"\n')
    with pytest.raises(TargetProfileError, match=r"loop\.toml: extends: profile 'loop' extends itself"):
        load_profile("loop")


# ---------------------------------------------------------------- real TFLite models

def _bundle_of(root: Path, files: dict[tuple[str, str], Path], checks: dict | None = None) -> Bundle:
    """A bundle around existing model files (format, precision) -> path."""
    arts = [Artifact(fmt, prec, p.name, size_bytes=size_of(p), validation=Validation(checks=dict(checks or {})))
            for (fmt, prec), p in files.items()]
    return Bundle(root, Manifest(name="t", version="1", source={}, artifacts=arts))


@pytest.fixture(scope="session")
def keras_tflite(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A bundle with tflite/fp32 and full-int8 tflite/int8 (int8 I/O) of a small trained Keras CNN."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    import edge_sdk

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((256, 16, 16, 3), dtype=np.float32)
    y = (x[:, :8].mean((1, 2, 3)) > x[:, 8:].mean((1, 2, 3))).astype(np.int64)
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(2),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    out = tmp_path_factory.mktemp("keras_tfl") / "bundle"
    try:
        return edge_sdk.convert(model, out=out, to="tflite", precision="fp32,int8", calib=x[:100], quiet=True,
                                keep_failed=True)
    except ValidationError as exc:  # kept: this test is about op mapping, not accuracy
        return exc.bundle


@pytest.fixture(scope="session")
def odd_tflites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real TFLite files: an int8 model with a float-only SIN op, a dynamic-shape model, a Flex-op model."""
    tf = pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("odd_tfl")
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def mixed(x):
        return tf.nn.relu(tf.math.sin(tf.nn.conv2d(x, w, 1, "SAME")))

    def rep():
        r = np.random.default_rng(1)
        for _ in range(16):
            yield [r.random((1, 8, 8, 3), dtype=np.float32)]

    conv = tf.lite.TFLiteConverter.from_concrete_functions([mixed.get_concrete_function()], mixed)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep  # no int8-only op set: SIN falls back to float
    (d / "mixed.tflite").write_bytes(conv.convert())

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def dyn(x):
        return tf.nn.relu(x * 2.0)

    (d / "dyn.tflite").write_bytes(
        tf.lite.TFLiteConverter.from_concrete_functions([dyn.get_concrete_function()], dyn).convert())

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4], tf.float32)])
    def det(x):
        return tf.linalg.det(x) + 1.0

    conv = tf.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    (d / "flex.tflite").write_bytes(conv.convert())
    return {k: d / f"{k}.tflite" for k in ("mixed", "dyn", "flex")}


def _edgetpu_cpu_ops(report) -> dict[str, str]:
    return {e["op"]: e["reason"] for e in report.details["edgetpu"]["cpu_ops"]}


def test_edgetpu_passes_clean_full_int8_model(keras_tflite: Bundle) -> None:
    coral = load_profile("coral-edgetpu")
    art = keras_tflite.artifact("tflite", "int8")
    report = check_artifact(coral, keras_tflite, art)
    assert report.ok, report.summary()
    assert report.details["edgetpu"]["ops_on_cpu"] == 0 and report.details["edgetpu"]["ops_total"] >= 4
    assert {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D"} <= set(report.details["ops"])
    assert "all" in report.issues[-1].message and report.issues[-1].severity == "info"
    # check_bundle picks only the candidate (tflite/int8), not the fp32 file
    reports = check_bundle(coral, keras_tflite)
    assert [r.artifact for r in reports] == ["tflite/int8"] and reports[0].ok
    # the same file is fine on a Pi (no Edge TPU rules there)
    assert check_artifact(load_profile("rpi4"), keras_tflite, art).ok


def test_edgetpu_rejects_fp32_model_naming_every_op(keras_tflite: Bundle) -> None:
    coral = load_profile("coral-edgetpu")
    report = check_artifact(coral, keras_tflite, keras_tflite.artifact("tflite", "fp32"))
    assert not report.ok
    checks = {i.check for i in report.errors}
    assert checks == {"candidate", "int8_io", "edgetpu"}
    cpu = _edgetpu_cpu_ops(report)
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(cpu) and all("float32 tensors" in r for r in cpu.values())
    assert report.details["edgetpu"]["ops_on_cpu"] == report.details["edgetpu"]["ops_total"]
    edgetpu_issue = next(i for i in report.errors if i.check == "edgetpu")
    assert "CONV_2D: float32 tensors" in edgetpu_issue.message and "int8 I/O" in edgetpu_issue.message
    int8_io = next(i for i in report.errors if i.check == "int8_io")
    assert "(float32)" in int8_io.message


def test_edgetpu_names_float_only_op_in_mixed_model(odd_tflites: dict[str, Path]) -> None:
    bundle = _bundle_of(odd_tflites["mixed"].parent, {("tflite", "int8"): odd_tflites["mixed"]})
    report = check_artifact(load_profile("coral-edgetpu"), bundle, bundle.artifacts[0])
    assert not report.ok
    cpu = _edgetpu_cpu_ops(report)
    assert "unsupported op" in cpu["SIN"] and "float32" in cpu["SIN"]
    assert "unsupported op" in cpu["DEQUANTIZE"]
    assert cpu["RELU"].startswith("after the unmapped DEQUANTIZE")  # supported, but past the mapped segment
    assert "CONV_2D" not in cpu  # the int8 conv maps
    issue = next(i for i in report.errors if i.check == "edgetpu")
    assert {"SIN", "DEQUANTIZE"} <= set(issue.ops) and "replace the unsupported ops" in issue.message


def test_dynamic_shapes_and_flex_ops(odd_tflites: dict[str, Path]) -> None:
    root = odd_tflites["dyn"].parent
    bundle = _bundle_of(root, {("tflite", "fp32"): odd_tflites["dyn"]})
    report = check_artifact(load_profile("rpi4"), bundle, bundle.artifacts[0])
    assert [i.check for i in report.errors] == ["static_shapes"]
    assert "[-1, 4]" in report.errors[0].message
    assert check_artifact(load_profile("host"), bundle, bundle.artifacts[0]).ok  # host allows dynamic shapes
    coral = check_artifact(load_profile("coral-edgetpu"), bundle, bundle.artifacts[0])
    assert "dynamic shape" in _edgetpu_cpu_ops(coral)["MUL"]

    bundle = _bundle_of(root, {("tflite", "fp32"): odd_tflites["flex"]})
    report = check_artifact(load_profile("android"), bundle, bundle.artifacts[0])
    assert [i.check for i in report.errors] == ["flex_ops"]
    assert report.errors[0].ops == ("FlexMatrixDeterminant",) and "plain LiteRT" in report.errors[0].message


def test_edgetpu_compiler_log_parsing() -> None:
    log = """Edge TPU Compiler version 16.0.384591198
Input: model.tflite
Output: model_edgetpu.tflite

Operator                       Count      Status

CONV_2D                        11         Mapped to Edge TPU
RESIZE_NEAREST_NEIGHBOR        1          Operation version not supported
QUANTIZE                       1          Operation is otherwise supported, but not mapped due to some unspecified\
 limitation
MAX_POOL_2D                    6          Mapped to Edge TPU
"""
    rows = parse_compiler_log(log)
    assert rows[0] == ("CONV_2D", 11, "Mapped to Edge TPU")
    assert rows[1] == ("RESIZE_NEAREST_NEIGHBOR", 1, "Operation version not supported")
    assert len(rows) == 4 and rows[2][2].startswith("Operation is otherwise supported")


# ---------------------------------------------------------------- ORT reduced build, bundle errors

@pytest.fixture(scope="session")
def ort_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tiny_models import make_tiny

    import edge_sdk

    calib = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    out = tmp_path_factory.mktemp("ort") / "bundle"
    return edge_sdk.convert(make_tiny(), out=out, to="onnx", precision="fp32,int8", calib=calib,
                            input_shape=[1, 3, 32, 32], quiet=True)


def test_ort_required_operators_listed(ort_bundle: Bundle) -> None:
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    android = load_profile("android")
    for prec in ("fp32", "int8"):
        art = ort_bundle.artifact("ort", prec)
        report = check_artifact(android, ort_bundle, art)
        config = ort_bundle.root / report.details["reduced_build_config"]
        reference, _ = parse_config(str(config))  # ONNX Runtime's own parser of the same file
        want = {(dom, op) for dom, by_opset in reference.items() for ops in by_opset.values() for op in ops}
        got = {(e["domain"], op) for e in report.details["required_operators"] for op in e["ops"]}
        assert got == want and len(got) >= 4
        info = next(i for i in report.issues if i.check == "ort_ops")
        assert info.severity == "info" and len(info.ops) == len(want)
        # the bundle was built for amd64 (the convert default): NCHWc ops, wrong layout for an arm phone
        assert [i.check for i in report.errors] == ["ort_layout"], report.summary()
        assert "ort_target_platform='arm'" in report.errors[0].message
        if ("com.microsoft.nchwc", "Conv") in got:
            assert "com.microsoft.nchwc:Conv" in report.errors[0].ops
        # on an x86 target the same file is fine
        x86 = load_profile("x86-openvino")
        assert x86.ort_target_platform == "amd64" and not [
            i for i in check_artifact(x86, ort_bundle, art).errors if i.check == "ort_layout"]
    int8 = check_artifact(android, ort_bundle, ort_bundle.artifact("ort", "int8"))
    int8_ops = {op for e in read_required_operators(ort_bundle.root / int8.details["reduced_build_config"])
                for op in e["ops"]}
    assert int8_ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}, int8_ops


def test_bundle_lacking_what_the_target_needs(ort_bundle: Bundle) -> None:
    with pytest.raises(BundleError) as info:
        check_bundle(load_profile("coral-edgetpu"), ort_bundle)
    msg = str(info.value)
    assert "tflite/int8" in msg and "onnx/fp32" in msg and "--target coral-edgetpu" in msg and "\n" not in msg
    reports = check_bundle(load_profile("x86-openvino"), ort_bundle)
    assert [r.artifact for r in reports] == ["onnx/int8", "onnx/fp32"] and all(r.ok for r in reports)


# ---------------------------------------------------------------- Core ML minimum OS

def test_coreml_minimum_os_against_profile(tmp_path: Path) -> None:
    pkg = tmp_path / "model.mlpackage"
    data = pkg / "Data" / "com.apple.CoreML"
    data.mkdir(parents=True)
    (data / "model.mlmodel").write_bytes(bytes([0x08, 0x08, 0x12, 0x00]))  # specificationVersion = 8 (iOS17)
    assert coreml_spec_version(pkg) == 8
    ios = load_profile("ios")
    bundle = _bundle_of(tmp_path, {("coreml", "fp16"): pkg})
    report = check_artifact(ios, bundle, bundle.artifacts[0])
    assert report.details["coreml_spec_source"] == "package" and report.details["minimum_os"]["iOS"] == 17
    assert [i.check for i in report.errors] == ["coreml_os"] and "needs iOS17" in report.errors[0].message
    assert "supports iOS16" in report.errors[0].message
    # the manifest's spec checks (written by the Core ML converters) take precedence over the file
    bundle = _bundle_of(tmp_path, {("coreml", "fp16"): pkg}, checks={"spec_version": 7, "minimum_os": "iOS16"})
    report = check_artifact(ios, bundle, bundle.artifacts[0])
    assert report.ok and report.details["coreml_spec_source"] == "manifest"
    assert "needs iOS16" in report.issues[-1].message


def test_ort_built_with_profile_options_is_compatible(tmp_path: Path) -> None:
    """Converting with the android profile's options gives .ort files the android check accepts."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.converters.base import ConvertOptions

    android = load_profile("android")
    bundle = edge_sdk.convert(make_tiny(), out=tmp_path / "b", to="onnx", precision="fp32", input_shape=[1, 3, 32, 32],
                              options=ConvertOptions(**android.convert_options()), quiet=True)
    (report,) = check_bundle(android, bundle)  # ort/fp32 is the only android candidate in this bundle
    assert report.artifact == "ort/fp32" and report.ok, report.summary()
    ops = {op for e in report.details["required_operators"] for op in e["ops"]}
    assert {"FusedConv", "MaxPool"} <= ops  # arm layout: plain NCHW kernels, no x86-only NCHWc ops
    assert not any(e["domain"] == "com.microsoft.nchwc" for e in report.details["required_operators"])


def test_edgetpu_compiled_file_ships_with_its_int8_artifact(keras_tflite: Bundle, tmp_path: Path) -> None:
    """Issue 16: the compiler's ``_edgetpu.tflite`` is kept in the bundle, hashed, with its op mapping; the agent
    runs the portable int8 file where libedgetpu is absent and says so.

    ``edgetpu_compiler`` cannot be installed on this machine (it comes only from Google's apt repository), so the
    compiled file is stood in by a copy of the int8 model: what is tested is the bundle bookkeeping and the agent's
    choice, not compilation (the compiler's log parsing is tested above)."""
    import shutil

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.runtimes.litert import edgetpu_library_present
    from edge_sdk.targets.edgetpu_ops import attach_compiled

    root = tmp_path / "bundle"
    shutil.copytree(keras_tflite.root, root)
    bundle = Bundle.load(root)
    art = bundle.artifact("tflite", "int8")
    stand_in = tmp_path / "model_edgetpu.tflite"
    shutil.copyfile(bundle.path_of(art), stand_in)
    log = "Operator  Count  Status\n\nCONV_2D  2  Mapped to Edge TPU\nFULLY_CONNECTED  1  Mapped to Edge TPU\n"
    details = {"op_mapping": [{"op": o, "count": c, "status": s} for o, c, s in parse_compiler_log(log)],
               "ops_on_cpu": 0, "ops_total": 3, "compiler_version": "16.0.384591198"}
    entry = attach_compiled(bundle, art, stand_in, details)
    bundle.save()

    again = Bundle.load(root)
    a = again.artifact("tflite", "int8")
    assert a.runtime["edgetpu"] == entry and entry["delegate"] == "edgetpu"
    assert entry["path"] == str(Path(art.path).with_name(Path(art.path).stem + "_edgetpu.tflite").as_posix())
    assert [m["op"] for m in entry["op_mapping"]] == ["CONV_2D", "FULLY_CONNECTED"]
    (side,) = [f for f in a.files if f["path"] == entry["path"]]
    assert side["role"] == "edgetpu" and side["size_bytes"] == (root / entry["path"]).stat().st_size
    again.verify(a)  # the compiled file is hashed like every side file

    if not edgetpu_library_present():
        agent = Agent(root, artifact="tflite/int8")
        try:
            assert "not used: no edgetpu runtime" in agent.selection_reason
            x = np.random.default_rng(0).random((1, 16, 16, 3), dtype=np.float32)
            assert agent.predict(x).outputs  # the portable int8 file serves
        finally:
            agent.close()

    (root / entry["path"]).write_bytes(b"tampered")
    with pytest.raises(BundleError, match="edgetpu"):
        Bundle.load(root).verify(a)
