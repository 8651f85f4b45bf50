"""A newcomer's run prints the SDK's output, not third-party chatter, and OpenVINO never forks (issue 12).

Each check runs in a fresh interpreter: the quieting is process-wide (env, warning filters, an import hook), and
TensorFlow reads its log level once, when it loads. The verbose run is the control that shows the noise exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOISE = ("absl::InitializeLog", "oneDNN custom operations", "Failed to load", "FutureWarning", "os.fork()")


def _run(code: str, tmp_path: Path, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "GLOG", "EDGE_SDK_VERBOSE"))}
    env.pop("CI", None)  # openvino_telemetry stays silent in CI by itself: the fork check needs a normal run
    if verbose:
        env["EDGE_SDK_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_third_party_noise_silenced_and_sdk_warnings_kept(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    code = """
        import logging, warnings, sys
        from edge_sdk._quiet import quiet_third_party
        quiet_third_party(False)
        import tensorflow
        logging.getLogger("torchao").warning("Failed to load libfoo.so")   # what torchao logs when a .so is missing
        exec(compile("import warnings; warnings.warn('x', FutureWarning)", "t", "exec"), {"__name__": "torch.x"})
        warnings.warn_explicit("edge_sdk: own warning", UserWarning, "edge_sdk/x.py", 1, module="edge_sdk.x")
        logging.getLogger("edge_sdk.x").warning("own log line")
        print("tf", tensorflow.__version__)
    """
    quiet, loud = _run(code, tmp_path), _run(code, tmp_path, verbose=True)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "own warning" in quiet.stderr and "own log line" in quiet.stderr  # the SDK's own output is untouched
    assert [n for n in NOISE if n in loud.stderr], loud.stderr  # the control: the noise is real
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr


@pytest.mark.parametrize("how", ["opted-out", "sdk-import", "control"])
def test_openvino_conversion_does_not_fork(how: str, tmp_path: Path) -> None:
    """``openvino_telemetry`` sends each event from a forked process; after the opt-out nothing forks. The SDK's
    own import of OpenVINO (``_deps.require``, what the Python API's converters use) opts out by itself."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    code = f"""
        import os, time
        forks = []
        os.register_at_fork(before=lambda: forks.append(1))
        from edge_sdk._quiet import no_openvino_telemetry
        if {how == "opted-out"}:
            no_openvino_telemetry()
        from onnx import TensorProto, helper, save
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "m.onnx")
        if {how == "sdk-import"}:
            from edge_sdk._deps import require
            ov = require("openvino", "openvino-convert")
        else:
            import openvino as ov
        ov.convert_model("m.onnx")
        time.sleep(0.5)  # telemetry sends from a background thread
        print("forks", len(forks))
    """
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    forks = int(proc.stdout.split("forks")[-1])
    if how != "control":
        assert forks == 0, proc.stderr[-2000:]
    elif forks == 0:
        pytest.skip("OpenVINO telemetry is already declined on this machine (~/intel/openvino_telemetry)")


def test_ort_quantizer_axis_warnings_on_1d_weights_are_dropped(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """ONNX Runtime's quantizer logs one root WARNING per 1-D weight it quantizes per tensor ("Axis 1 is
    out-of-range for weight ..."; crepe-tiny printed 6): the SDK drops those records while it quantizes, and only
    those."""
    import logging

    import numpy as np

    torch = pytest.importorskip("torch")
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_qdq_backends import _AxisNoise
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(8)).eval()
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), input_names=["x"], dynamo=False, opset_version=17)
    calib = SampleSet([np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)])
    with caplog.at_level(logging.WARNING):
        quantize_static_qdq(path, tmp_path / "bn.int8.onnx", calib, ConvertOptions(extra={"onnx_quantizer": "ort"}))
    assert (tmp_path / "bn.int8.onnx").exists()
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()], caplog.text
    assert logging.getLogger().filters == []  # removed again
    keep = logging.LogRecord("root", logging.WARNING, __file__, 1, "something else is wrong", None, None)
    drop = logging.LogRecord("root", logging.WARNING, __file__, 1, "Axis 1 is out-of-range for weight 'w'", None, None)
    assert _AxisNoise().filter(keep) and not _AxisNoise().filter(drop)
