"""The folder-to-namespace mapping works for a wheel as it does for the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_folders_into_namespace() -> None:
    import edge_sdk.converters
    import edge_sdk.device_agent
    import edge_sdk.targets

    assert Path(edge_sdk.converters.__file__).parent == ROOT / "converters"
    assert Path(edge_sdk.device_agent.__file__).parent == ROOT / "device_agent"
    assert Path(edge_sdk.targets.__file__).parent == ROOT / "targets"


@pytest.mark.slow
def test_wheel_contains_and_imports_every_subpackage(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("edge_sdk-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("edge_sdk/converters/pipeline.py", "edge_sdk/converters/torch_to_onnx.py",
                 "edge_sdk/runtimes/onnxruntime.py", "edge_sdk/targets/__init__.py",
                 "edge_sdk/schemas/manifest.schema.json", "edge_sdk/py.typed"):
        assert must in names, must
    assert not any(n.startswith(("converters/", "device_agent/", "targets/", "tests/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import edge_sdk, edge_sdk.converters.pipeline as p, edge_sdk.runtimes as r\n"
            "from edge_sdk.schema import load_schema\n"
            "p.load_builtin_converters(); r.all_runtimes(); load_schema()\n"
            "print(edge_sdk.__file__); print(p.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert all(line.startswith(str(target)) for line in out), out
