"""Deeply nested JSON from the network in a process whose recursion limit a converter library raised.

``litert_converter`` (imported by the TFLite paths) sets ``sys.setrecursionlimit(100000)`` and onnx2tf sets 2**31-1;
after that ``json.loads`` of a 200 kB ``[[[…`` on a thread overflows the C stack: SIGSEGV, the process is gone (this
took down a pytest worker in CI). Every parser of network input goes through :mod:`edge_sdk.safe_json`, which
measures the depth first. Each case runs in a child process with the limit raised, on a thread (as the HTTP and
MQTT workers do), so a regression shows as a crashed child, not as a crashed test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CASES = {
    "safe_json": "from edge_sdk import safe_json; safe_json.loads(DEEP)",
    "predict body": "from edge_sdk.device_agent.http_io import parse_predict_body; "
                    "parse_predict_body(DEEP, 'application/json', {})",
    "feedback body": "from edge_sdk.device_agent.http_io import parse_feedback_body; parse_feedback_body(DEEP)",
    "v2 / TF Serving body": "from edge_sdk.device_agent.protocols.base import load_json; load_json(DEEP, 'x')",
    "MQTT command": "from edge_sdk.mqtt import loads_command; loads_command(DEEP, max_bytes=10**7)",
    "collector telemetry": "from edge_sdk.fleet.collector.validate import validate_payload; "
                           "validate_payload('telemetry', DEEP)",
    "bundle manifest": "import pathlib, tempfile; from edge_sdk.bundle import Bundle; "
                       "d = pathlib.Path(tempfile.mkdtemp()); (d / 'manifest.json').write_bytes(DEEP); Bundle.load(d)",
    "pipeline webhook": "from edge_sdk.pipeline.serve import parse_alerts; parse_alerts(DEEP)",
}

CHILD = textwrap.dedent("""
    import sys, threading
    sys.setrecursionlimit(100_000)  # what litert_converter does at import
    DEEP = b'{"inputs": ' + b"[" * 120_000 + b"]" * 120_000 + b"}"  # 240 kB: under the collector's size limit
    out = []
    def run():
        try:
            CODE
        except Exception as exc:  # the one-line refusal each boundary gives
            out.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        else:
            out.append("accepted")
    t = threading.Thread(target=run)
    t.start()
    t.join()
    print(out[0])
""")


@pytest.mark.parametrize("where", list(CASES))
def test_deep_json_is_refused_without_crashing_the_process(where: str) -> None:
    code = CHILD.replace("CODE", CASES[where])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{where}: child died with {proc.returncode}: {proc.stderr[-500:]}"
    line = proc.stdout.strip()
    assert line != "accepted" and "deep" in line.lower(), f"{where}: {line}"
