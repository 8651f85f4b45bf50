"""200 hostile images against a real agent HTTP server in its own process (issue 13, acceptance 3).

The images (``tests/test_hostile_images.py::hostile_images``): PNG decompression bombs of 16 to 64 MP (the old
limit), a 64 MP palette PNG, JPEGs whose header claims 9000x9000 or 65000x65000, truncated JPEG/PNG, a PNG header
on a JPEG body, garbage after a JPEG header, random bytes, a BMP claiming 8000x8000, a GIF and an empty body.
Each is posted as ``application/octet-stream`` to ``/predict``, followed by a good JPEG; the run fails unless
every hostile image is a 4xx and every good request a 200. Printed: the agent process's peak RSS (VmHWM, reset
after warm-up) against the shipped unit's MemoryMax (512 MiB), and the time per hostile request.

    python benchmarks/hostile_images.py [--n 200] [--bundle DIR] [--agent-path {current,apply_encoded}]

``--agent-path apply_encoded`` runs the agent with ``predict_image`` decoding bytes through
``Preprocessing.apply_encoded`` (the device path proposed in issue 13), for a before/after comparison while the
agent still calls ``decode_image``. Without ``--bundle`` a tiny 32x32 CNN bundle is built (needs torch).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_MAX_MB = 512.0

_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer
    if sys.argv[2] == "apply_encoded":
        from edge_sdk.errors import InputError
        _orig = Agent.predict_image
        def predict_image(self, data):
            if isinstance(data, (bytes, bytearray, memoryview)) and self.preprocessing is not None:
                try:
                    x = self.preprocessing.apply_encoded(data)
                except InputError:
                    if self._telemetry is not None:
                        self._telemetry.record_error("preprocess")
                    raise
                return self.predict(x)
            return _orig(self, data)
        Agent.predict_image = predict_image
    agent = Agent(Path(sys.argv[1]))
    srv = AgentServer(agent, "127.0.0.1", 0, queue_size=4, max_body_bytes=8 * 1024 * 1024, request_timeout_s=120)
    print(srv.start(), flush=True)
    sys.stdin.read()
    srv.shutdown()
""")


def build_tiny_bundle(out: Path) -> Path:
    """A tiny CNN (32x32 RGB input) bundle with image preprocessing."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    torch.save(make_tiny().state_dict(), out / "tiny.pt")
    edge_sdk.convert(out / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)), out=out / "bundle",
                     name="tiny", version="1", quiet=True)
    return out / "bundle"


def _post(port: int, body: bytes, ctype: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def run(bundle: Path, n: int, agent_path: str) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_images import good_jpeg, hostile_images

    t0 = time.perf_counter()
    images = hostile_images(n)
    print(f"{len(images)} hostile images built in {time.perf_counter() - t0:.1f} s "
          f"({sum(len(d) for _, d in images) / 1e6:.1f} MB in all)", flush=True)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(bundle), agent_path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        good = good_jpeg()
        for _ in range(5):  # warm-up: runtime, first allocations
            assert _post(port, good, "image/jpeg")[0] == 200
        Path(f"/proc/{child.pid}/clear_refs").write_text("5")  # reset the peak RSS
        base_mb = _status_kb(child.pid, "VmRSS") / 1024
        times: list[float] = []
        failures: list[str] = []
        for name, data in images:
            t = time.perf_counter()
            status, doc = _post(port, data, "application/octet-stream")
            times.append(time.perf_counter() - t)
            if not 400 <= status < 500:
                failures.append(f"{name}: HTTP {status}")
            status, doc = _post(port, good, "image/jpeg")
            if status != 200:
                failures.append(f"good request after {name}: HTTP {status} {doc}")
        peak_mb = _status_kb(child.pid, "VmHWM") / 1024
    finally:
        child.stdin.close()
        child.wait(30)
    times.sort()
    print(f"agent path: {agent_path}")
    print(f"hostile requests: {len(images)}, 4xx: {len(images) - sum(1 for f in failures if not f.startswith('good'))}"
          f", good requests answered after each: {len(images) - sum(1 for f in failures if f.startswith('good'))}")
    print(f"agent RSS: {base_mb:.0f} MB after warm-up, peak {peak_mb:.0f} MB (MemoryMax {MEMORY_MAX_MB:.0f} MB)")
    print(f"time per hostile request: p50 {times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms, "
          f"total {sum(times):.1f} s")
    for f in failures[:20]:
        print("FAIL", f)
    ok = not failures and peak_mb < MEMORY_MAX_MB
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--bundle", type=Path, help="an image-model bundle (default: a tiny CNN, built now)")
    ap.add_argument("--agent-path", choices=("current", "apply_encoded"), default="current")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_tiny_bundle(Path(tmp))
        return run(bundle, args.n, args.agent_path)


if __name__ == "__main__":
    sys.exit(main())
