"""The same tensor through the agent's Open Inference Protocol v2 routes and ``POST /predict`` (issue 15, item 4).

The real ImageNet MobileNetV2 (ONNX fp32) is served on 127.0.0.1; one preprocessed photo tensor (1x3x224x224
float32) is sent, request after request, interleaved (the order rotates every round), through:

    /predict JSON      POST /predict {"inputs": [[...]]}                      (the agent's own format; the baseline)
    v2 JSON            POST /v2/models/NAME/infer, "data" lists in and out
    v2 binary          POST /v2/models/NAME/infer, binary tensor extension in and out (Inference-Header-Content-Length)
    v2 tritonclient    the same binary request made by tritonclient.http.InferenceServerClient (encoding included)
    in process         Agent.predict on the tensor (no HTTP: the floor)

The http.client rows send pre-encoded bodies on a keep-alive connection and decode each answer, so they time what
the server adds; the tritonclient row is what a Triton / KServe user sees. Every path's output is first checked
equal to /predict's (max abs diff 0). Medians are compared with /predict's; the goal is v2 binary <= 1.1x.

    python benchmarks/serving_protocols.py [--bundle DIR] [--iters 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
GOAL = 1.1
sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_overhead import interleaved  # noqa: E402  (one interleaving loop for both benchmarks)


def ensure_bundle(path: Path) -> Path:
    """The MobileNetV2 bundle at ``path`` (onnx, fp32), built when missing."""
    from mobilenet_bundle import ensure_mobilenet_bundle

    return ensure_mobilenet_bundle(path, to="onnx", n_val=8)


def photo_tensor() -> np.ndarray:
    """A real photo (scikit-image's cat) through the ImageNet preprocessing: (1, 3, 224, 224) float32."""
    from skimage import data as skdata

    from edge_sdk.preprocessing import Preprocessing

    return Preprocessing.imagenet().apply(np.ascontiguousarray(skdata.chelsea()[:, :, ::-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="MobileNetV2 bundle (built in a temporary folder when not given)")
    ap.add_argument("--iters", type=int, default=200, help="requests per path (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="inference threads (default 1: steadier on a shared CPU)")
    args = ap.parse_args(argv)

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer

    bundle = ensure_bundle(args.bundle or Path(tempfile.mkdtemp(prefix="serving-bench-")) / "mobilenet_v2")
    agent = Agent(bundle, artifact="onnx/fp32", threads=args.threads)
    name = agent.bundle.manifest.name
    server = AgentServer(agent, "127.0.0.1", 0, queue_size=4)
    server.start()
    x = photo_tensor()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

    def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise SystemExit(f"{path}: HTTP {resp.status}: {raw[:300]!r}")
        return raw, {k.lower(): v for k, v in resp.getheaders()}

    predict_body = json.dumps({"inputs": x.tolist()}).encode()
    json_head = {"Content-Type": "application/json"}

    def via_predict() -> np.ndarray:
        return np.asarray(json.loads(post("/predict", predict_body, json_head)[0])["outputs"]["output"], np.float32)

    v2_path = f"/v2/models/{name}/infer"
    v2_json_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                           "data": x.reshape(-1).tolist()}]}).encode()

    def via_v2_json() -> np.ndarray:
        out = json.loads(post(v2_path, v2_json_body, json_head)[0])["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    v2_bin_body = head + x.tobytes()
    bin_head = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}

    def via_v2_binary() -> np.ndarray:
        raw, headers = post(v2_path, v2_bin_body, bin_head)
        n = int(headers["inference-header-content-length"])
        out = json.loads(raw[:n])["outputs"][0]
        return np.frombuffer(raw, np.float32, offset=n).reshape(out["shape"])

    calls: dict[str, Callable[[], Any]] = {"/predict JSON": via_predict, "v2 JSON": via_v2_json,
                                           "v2 binary": via_v2_binary}
    try:
        import tritonclient.http as triton

        client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)

        def via_tritonclient() -> np.ndarray:
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(name, [inp]).as_numpy("output")
        calls["v2 tritonclient"] = via_tritonclient
    except ImportError:
        client = None
        print("tritonclient not installed (pip install 'tritonclient[http]'): its row is skipped")
    calls["in process"] = lambda: agent.predict(x).outputs["output"]

    want = via_predict()
    for label, call in calls.items():
        got = call()
        diff = float(np.abs(got.astype(np.float64) - want).max())
        print(f"check {label:16s} output {list(got.shape)} max abs diff vs /predict: {diff}")
        if diff != 0.0:
            raise SystemExit(f"{label}: output differs from /predict's (max abs diff {diff})")

    times = interleaved(calls, args.iters, warmup=10)
    base = statistics.median(times["/predict JSON"])
    print(f"\nMobileNetV2 onnx/fp32, {args.threads} inference thread(s), {args.iters} requests per path, interleaved; "
          f"request bodies: /predict JSON {len(predict_body):,} B, v2 JSON {len(v2_json_body):,} B, v2 binary "
          f"{len(v2_bin_body):,} B")
    print(f"{'path':18s} {'median ms':>10s} {'p90 ms':>9s} {'vs /predict':>12s}")
    summary: dict[str, Any] = {}
    for label, ts in times.items():
        med, p90 = statistics.median(ts), float(np.percentile(ts, 90))
        print(f"{label:18s} {med:10.2f} {p90:9.2f} {med / base:11.3f}x")
        summary[label] = {"median_ms": round(med, 3), "p90_ms": round(p90, 3), "ratio": round(med / base, 4)}
    ratio = summary["v2 binary"]["ratio"]
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"\nv2 binary overhead vs /predict: {ratio:.3f}x (goal <= {GOAL}x): {verdict}")
    print(json.dumps({"serving_protocols": summary}))
    conn.close()
    if client is not None:
        client.close()
    server.shutdown()
    agent.close()
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
