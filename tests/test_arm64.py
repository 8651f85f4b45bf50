"""The agent on Debian bookworm arm64 (Raspberry Pi OS base, Python 3.11), emulated here (issue 16, item 4).

The slow test runs ``benchmarks/arm64_check.py``: this checkout's wheel installed with ``[agent,onnxruntime]``
and with ``[agent,litert]`` in an arm64 userland under qemu-user + proot, serving the real ImageNet MobileNetV2,
with top-1 and logits compared to the same agent on x86 for real photos. It needs ``qemu-user-static`` and
``proot`` (installed by the check when running as root) and PyPI the first time (arm64 wheels; cached after in
``.cache/arm64/``). The fast tests check the pass/fail rule and the CLI's refusals without emulation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "arm64_check.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("arm64_check", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["arm64_check"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


check = _load()


def test_pass_rule_needs_equal_top1_and_close_logits() -> None:
    same = check.Result("onnxruntime", photos=["a", "b"], top1_arm64=[285, 967], top1_x86=[285, 967],
                        max_abs_diff=2e-5)
    assert check.passed([same], atol=1e-3)
    assert not check.passed([same], atol=1e-6)  # logits moved more than allowed
    other = check.Result("litert", photos=["a", "b"], top1_arm64=[285, 281], top1_x86=[285, 967])
    assert other.agree == 1 and not check.passed([same, other], atol=1e-3)
    assert not check.passed([], atol=1e-3)  # nothing compared is not a pass
    assert "1/2" in check.table([other]) and "2/2" in check.table([same])


def test_cli_refuses_unknown_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["--runtimes", "tensorflow"]) == 2
    assert "unknown runtime" in capsys.readouterr().err


def test_fake_cpuinfo_names_an_arm_core() -> None:
    """ONNX Runtime's cpuinfo segfaults under qemu unless every CPU has an ARM implementer and part number."""
    text = "".join(check._CPUINFO_CORE.format(n=n) for n in range(2))
    assert text.count("CPU implementer\t: 0x41") == 2 and text.count("CPU part\t: 0xd08") == 2


_NO_TOOLS = bool(check.missing_tools()) and os.geteuid() != 0


@pytest.mark.slow
@pytest.mark.soak  # ~2.5 min with .cache/arm64 built, ~7.5 min from nothing: `make arm64-check`
@pytest.mark.skipif(_NO_TOOLS, reason=f"needs {', '.join(check.missing_tools())} "
                    "(`sudo apt-get install qemu-user-static proot`) or root to install them")
def test_agent_on_emulated_bookworm_arm64_matches_x86(record_property: Any) -> None:
    """Cold (empty .cache/arm64): about 6 min here; warm: about 2 min (see the module docstring of the check)."""
    p = subprocess.run([sys.executable, str(SCRIPT), "--json", "--photos", "10"], capture_output=True, text=True,
                       timeout=1500, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, check=False)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    summary = json.loads(p.stdout)
    record_property("arm64_check", summary["times"])
    assert summary["guest"]["machine"] == "aarch64" and summary["guest"]["python"].startswith("3.11.")
    by_rt = {r["runtime"]: r for r in summary["results"]}
    assert set(by_rt) == {"onnxruntime", "litert"}
    for rt, r in by_rt.items():
        assert len(r["photos"]) == 10 and r["agree"] == 10, (rt, r["top1_arm64"], r["top1_x86"])
        assert r["max_abs_diff"] <= summary["atol"], (rt, r["max_abs_diff"])
    assert by_rt["onnxruntime"]["top1_x86"][0] == 285  # chelsea the cat: the real model, not a stand-in
    assert p.returncode == 0 and summary["ok"]
