"""Third-party plugins (issue 12): a runtime (and a converter) from the test-only package tests/plugins/
edge_sdk_echo_runtime plug in through entry points with no edit anywhere in the SDK, and a broken plugin costs one
warning line, never the agent.

Each check runs in a fresh interpreter with ``tests/plugins`` on ``PYTHONPATH`` (what ``pip install`` of the plugin
would give): the registries fill at import, so the plugin must not leak into this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_sdk.bundle import Artifact, Bundle, Manifest, TensorSpec, Validation, sha256_path

PLUGINS = Path(__file__).resolve().parent / "plugins"

# Runs in the child: every place a runtime name is listed or checked, then an Agent on a real bundle.
_PROBE = r"""
import json, sys
import numpy as np
from edge_sdk import _bench_worker, benchmark
from edge_sdk.device_agent.agent import DEFAULT_RUNTIME_ORDER, Agent
from edge_sdk.device_agent.config import ConfigError, load_config
from edge_sdk.runtimes import RUNTIMES, default_order
from edge_sdk.targets.profiles import TargetProfileError, load_profile
from edge_sdk.formats import Format, Framework

bundle, cfg_path, profile_path = sys.argv[1:4]
out = {"runtimes": list(RUNTIMES), "default_order": list(default_order()),
       "agent_default": list(DEFAULT_RUNTIME_ORDER), "bench_modules": _bench_worker.RUNTIME_MODULES.get("echo")}
try:
    out["config_order"] = list(load_config(cfg_path).runtime_order)
except ConfigError as exc:
    out["config_error"] = str(exc)
try:
    out["profile_runtimes"] = list(load_profile(profile_path).runtimes)
except TargetProfileError as exc:
    out["profile_error"] = str(exc)
try:
    with Agent(bundle) as agent:  # the default order: the registry's
        pred = agent.predict(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32))
        out["default_agent"] = [agent.runtime_name, pred.outputs["y"].tolist()]
except Exception as exc:  # without the plugin ONNX Runtime gets the file, which is no ONNX model
    out["default_agent"] = [type(exc).__name__, str(exc)]
try:
    cfg = load_config(cfg_path)
    with Agent(bundle, runtime_order=cfg.runtime_order) as agent:
        out["config_agent"] = [agent.runtime_name, agent.predict(np.ones((1, 4), np.float32)).outputs["y"].tolist()]
except ConfigError:
    pass
import edge_sdk.converters as conv
try:
    out["converter"] = type(conv.get_converter(Framework.OPENVINO, Format.ONNX)).__name__
except Exception as exc:
    out["converter"] = type(exc).__name__
print("PROBE " + json.dumps(out))
"""


def _echo_bundle(root: Path) -> Path:
    """A bundle whose one artifact (onnx/fp32) is an echo model: only the echo runtime can run it correctly."""
    (root / "onnx").mkdir(parents=True)
    f = root / "onnx" / "fp32.onnx"
    f.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 4]}], "outputs": [{"name": "y", "shape": [1, 4]}],
                             "gain": 2.0}))
    art = Artifact("onnx", "fp32", "onnx/fp32.onnx", sha256_path(f), f.stat().st_size,
                   inputs=[TensorSpec("x", [1, 4], "float32")], outputs=[TensorSpec("y", [1, 4], "float32")],
                   validation=Validation(passed=True, cosine=1.0))
    manifest = Manifest(name="echo", version="1", source={"framework": "onnx", "file": "m.onnx", "sha256": "0" * 64},
                        artifacts=[art], inputs=[TensorSpec("x", [1, 4], "float32")],
                        outputs=[TensorSpec("y", [1, 4], "float32")])
    Bundle(root, manifest).save()
    return root


def _probe(tmp_path: Path, pythonpath: list[Path]) -> tuple[dict, str]:
    bundle = _echo_bundle(tmp_path / "bundle")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('runtime_order = ["echo", "onnxruntime"]\n')
    profile = tmp_path / "echo-box.toml"
    profile.write_text('description = "a box with the echo runtime"\narch = "any"\nruntimes = ["echo"]\n'
                       '[[candidates]]\nformat = "onnx"\nprecision = "fp32"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(bundle), str(cfg), str(profile)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):]), proc.stderr


def test_runtime_plugin_needs_no_edit_outside_its_package(tmp_path: Path) -> None:
    """With the plugin on the path: listed, first in the default order (its rank 5), accepted by the agent config
    and a target profile, known to the benchmark worker, and an Agent runs the bundle with it (2 * x)."""
    got, _ = _probe(tmp_path, [PLUGINS])
    assert got["runtimes"][0] == "echo" and "onnxruntime" in got["runtimes"]
    assert got["default_order"] == got["agent_default"] == got["runtimes"]
    assert got["bench_modules"] == ["edge_sdk_echo_runtime"]
    assert got["config_order"] == ["echo", "onnxruntime"]
    assert got["profile_runtimes"] == ["echo"]
    assert got["default_agent"] == ["echo", [[2.0, 4.0, 6.0, 8.0]]]
    assert got["config_agent"] == ["echo", [[2.0, 2.0, 2.0, 2.0]]]
    assert got["converter"] == "IrToEcho"  # the same package's converter entry point


def test_without_the_plugin_echo_is_unknown_everywhere(tmp_path: Path) -> None:
    """The control: the same probe without the plugin refuses `echo` in the config and the profile."""
    got, _ = _probe(tmp_path, [])
    assert "echo" not in got["runtimes"] and got["bench_modules"] is None
    assert "unknown runtime(s) echo" in got["config_error"]
    assert "unknown value 'echo'" in got["profile_error"]
    assert got["default_agent"][0] == "InferenceError" and "ONNX Runtime" in got["default_agent"][1]
    assert got["converter"] == "UnsupportedConversionError"


def test_broken_plugin_is_one_warning_line_and_the_agent_still_runs(tmp_path: Path) -> None:
    """Entry points naming a missing module and a non-runtime: each one line on stderr; the SDK works on."""
    broken = tmp_path / "broken"
    info = broken / "edge_sdk_broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-sdk-broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[edge_sdk.runtimes]\nghost = no_such_module_xyz:Ghost\n"
                                           "notaruntime = json:dumps\n"
                                           "[edge_sdk.converters]\nghost = no_such_module_xyz:Ghost\n")
    got, stderr = _probe(tmp_path, [PLUGINS, broken])
    assert got["default_agent"][0] == "echo"  # the good plugin still loads beside the broken one
    lines = [ln for ln in stderr.splitlines() if "plugin" in ln]
    assert len(lines) == 3, stderr
    assert any("runtime plugin 'ghost'" in ln and "ModuleNotFoundError" in ln for ln in lines)
    assert any("runtime plugin 'notaruntime'" in ln and "is not a runtime" in ln for ln in lines)
    assert any("converter plugin 'ghost'" in ln for ln in lines)


def test_edge_sdk_agent_run_serves_with_the_plugin_runtime(tmp_path: Path) -> None:
    """`edge-sdk agent run --runtime echo` (the shipped command) serves the bundle with the plugin's runtime."""
    import socket
    import time
    import urllib.request

    bundle = _echo_bundle(tmp_path / "bundle")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle),
                             "--runtime", "echo", "--http", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert health is not None, proc.communicate(timeout=10)
        assert health["runtime"] == "echo", health
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", method="POST",
                                     data=json.dumps({"inputs": [[0.5, 1.0, 1.5, 2.0]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
        assert body["outputs"]["y"] == [[1.0, 2.0, 3.0, 4.0]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
