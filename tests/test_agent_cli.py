"""`edge-sdk agent run` as a real process: loads a bundle, serves HTTP, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny

    import edge_sdk

    out = tmp_path_factory.mktemp("agentcli") / "b"
    edge_sdk.convert(make_tiny(), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", out=out, ort=False,
                     quiet=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agent_run_serves_and_stops_on_sigterm(bundle: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle),
                             "--http", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    assert r.status == 200
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "agent did not come up"
                time.sleep(0.2)
        x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"inputs": {"input": x.tolist()}}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            got = json.load(r)
        from tiny_models import make_tiny

        want = make_tiny()(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(got["outputs"]["output"]), want, rtol=1e-4, atol=1e-4)
        assert got["model_version"] == "model:1" and got["class"] == int(want.argmax())
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        err = proc.stderr.read()
    assert code == 0, err
    assert "running onnx/fp32 with onnxruntime" in err


def test_agent_run_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('bundle = "x"\nthreds = 2\n')
    res = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "threds" in lines[0] and "agent.toml" in lines[0], res.stderr


def test_agent_run_takes_runtime_order_from_target_profile(bundle: Path) -> None:
    # x86-openvino prefers openvino, but this bundle only has ONNX: the agent says what it runs and why
    res = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle),
                          "--target", "x86-openvino", "--source", f"folder:{bundle / 'nonexistent'}"],
                         capture_output=True, text=True, timeout=60)
    assert "running onnx/fp32 with onnxruntime" in res.stderr, res.stderr
    assert res.returncode == 2 and "error: folder source" in res.stderr and "does not exist" in res.stderr
