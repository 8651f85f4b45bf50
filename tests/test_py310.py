"""The device side runs on Python 3.10 (Jetson JetPack 6 and Ubuntu 22.04 ship it; issue 16), checked statically.

`vermin` reads every module a device loads -- the core, the runtimes and the agent layers of
``edge_sdk._layering``, every product module they import, and the ``edge-sdk`` CLI package that starts the agent --
and must report 3.10 as their minimum. The converters stay 3.11+ and say so in one line when imported on 3.10.
A real 3.10 run (agent on a bundle, outbox and server tests) is described in README; this test keeps it true.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk import _layering
from edge_sdk.formats import Format, Precision

DEVICE_LAYERS = ("core", "runtimes", "agent")
# the entry point `edge-sdk agent run` imports the whole CLI package (its handlers import lazily)
DEVICE_EXTRA_PREFIXES = ("edge_sdk.cli",)
# the one deliberate arrow out of core (edge_sdk.convert(), lazy): a device never calls it
NOT_ON_DEVICE = {"edge_sdk.converters.pipeline"}


def _vermin_minimum(paths: list[Path]) -> tuple[tuple[int, int], str]:
    """Run vermin on ``paths``; return its minimum 3.x version and its whole report."""
    if importlib.util.find_spec("vermin") is None:
        pytest.skip("vermin is not installed: pip install -e '.[dev]'")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",  # vermin has no __main__
         "--no-tips", "--violations", "-t=3.10-", "--eval-annotations", *map(str, paths)],
        capture_output=True, text=True, timeout=300, check=False)
    report = proc.stdout + proc.stderr
    found = re.search(r"Minimum required versions:.*?3\.(\d+)", report)
    assert found, f"no minimum in vermin's report:\n{report}"
    return (3, int(found.group(1))), report


def device_modules() -> dict[str, Path]:
    """Every product module a device loads: the device layers, the CLI package, and what they import (closure).

    A device layer's lazy imports count (the agent loads a runtime lazily); the CLI's do not (its handlers import
    host code -- converters, fleet -- only when that command runs).
    """
    modules = _layering.discover(_layering.default_roots())
    edges = _layering.check(modules).edges
    chosen = {m for m in modules if (layer := _layering.layer_of(m)) and layer.name in DEVICE_LAYERS}
    chosen |= {m for m in modules if m.startswith(DEVICE_EXTRA_PREFIXES)}
    frontier = set(chosen)
    while frontier:
        reached = {e.dst for e in edges if e.src in frontier and e.dst not in chosen | NOT_ON_DEVICE
                   and not (e.src.startswith(DEVICE_EXTRA_PREFIXES) and e.kind == "lazy")}
        chosen |= reached
        frontier = reached
    return {m: modules[m] for m in sorted(chosen)}


def test_device_side_needs_python_310_at_most() -> None:
    modules = device_modules()
    assert "edge_sdk.device_agent.agent" in modules and "edge_sdk.runtimes.onnxruntime" in modules
    assert "edge_sdk.tomlfile" in modules and not any(m.startswith("edge_sdk.converters") for m in modules)
    minimum, report = _vermin_minimum(list(modules.values()))
    assert minimum <= (3, 10), f"a device-side module needs Python {minimum[0]}.{minimum[1]}:\n{report}"


def test_the_check_can_fail(tmp_path: Path) -> None:
    """The same vermin call flags the 3.11-only constructs this project used before (so the test above can fail)."""
    for source in ("import tomllib\n", "from datetime import UTC\n", "from enum import StrEnum\n",
                   "import contextlib\nwith contextlib.chdir('.'):\n    pass\n"):
        path = tmp_path / "m.py"
        path.write_text(source)
        assert _vermin_minimum([path])[0] == (3, 11), source


def test_choices_read_as_their_value_like_strenum() -> None:
    """formats' enums left StrEnum (3.11+) for str + Enum; str(), f-strings, == and hashing must not change."""
    assert str(Format.TFLITE) == "tflite" and f"{Precision.INT8}" == "int8" and f"{Format.ONNX:>6}" == "  onnx"
    assert Format.COREML == "coreml" and {"coreml": 1}[Format.COREML] == 1
    assert Format("ort") is Format.ORT and Precision.parse(" FP16 ") is Precision.FP16
    assert "%s" % Format.TFLITE == "tflite"  # noqa: UP031 -- the old formatting path logging uses


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="the 3.10 guard of the converters (run under Python 3.10)")
def test_converters_refuse_python_310_in_one_line() -> None:
    from edge_sdk.errors import EdgeSDKError

    with pytest.raises(EdgeSDKError, match=r"needs Python 3\.11\+ .*3\.10 runs the device side"):
        import edge_sdk.converters  # noqa: F401
