"""What the device agent costs over the bare runtime, with the real ImageNet MobileNetV2 (issue 4, acceptance 1-3).

Side by side in one run, interleaved call by call, medians reported:

(a) ``Agent.predict`` on a ready tensor vs the bare runtime's own call (ONNX Runtime ``InferenceSession.run``,
    LiteRT ``Interpreter.set_tensor/invoke/get_tensor``, OpenVINO ``InferRequest.infer``) on the same loaded
    model object (two separately loaded ONNX Runtime sessions would fight over 2 cores with spinning thread
    pools); also edge_sdk's ``Session.run`` alone.                                          goal: p50 ratio <= 1.05
(b) REST ``POST /predict`` with a JPEG (keep-alive connection; base64 JSON and a raw image/jpeg body) vs the same
    image decoded + preprocessed + inferred in process (``Agent.predict_image``).            goal: p50 ratio <= 1.25
(c) process start -> first prediction (wall time, fresh interpreter each run) and idle RSS after it, for an
    agent process and for a bare ONNX Runtime process.                          goal: <= 1 s; RSS <= bare + 30 MB

    python benchmarks/agent_overhead.py [--bundle demo_out/mobilenet_v2] [--iters 300] [--starts 7]

The bundle comes from ``python examples/demo.py --mobilenet --out demo_out``; when ``--bundle`` does not exist
it is built here (onnx, openvino, tflite fp32) with edge_sdk.convert.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

ARTIFACTS = {"onnxruntime": "onnx/fp32", "litert": "tflite/fp32", "openvino": "openvino/fp32"}


def ensure_bundle(path: Path) -> Path:
    """The MobileNetV2 bundle at ``path`` (onnx,openvino,tflite, fp32), built when missing."""
    from mobilenet_bundle import ensure_mobilenet_bundle

    return ensure_mobilenet_bundle(path, to="onnx,openvino,tflite", n_val=32)


def photo_jpeg() -> bytes:
    """A real photo (scikit-image's chelsea, ImageNet class 285 'Egyptian cat') as JPEG bytes."""
    import cv2
    from skimage import data

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def bare_call(runtime: str, session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The runtime's own API on the very model object the agent's session loaded (same settings, same thread
    pool), so the comparison measures the agent's per-call work and nothing else."""
    if runtime == "onnxruntime":
        sess = session._session  # onnxruntime.InferenceSession
        name, outs = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
        return lambda x: sess.run(outs, {name: x})[0]
    if runtime == "litert":
        interp = session._interp  # ai_edge_litert Interpreter, tensors allocated
        i_in, i_out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

        def run(x: np.ndarray) -> np.ndarray:
            interp.set_tensor(i_in, x)
            interp.invoke()
            return interp.get_tensor(i_out)

        return run
    req = session._compiled.create_infer_request()  # openvino CompiledModel

    def run_ov(x: np.ndarray) -> np.ndarray:
        req.infer({0: x}, share_inputs=True)
        return req.get_output_tensor(0).data.copy()

    return run_ov


def interleaved(calls: dict[str, Callable[[], Any]], iters: int, warmup: int = 15) -> dict[str, list[float]]:
    """Run every call once per round (rotating the order), ``iters`` rounds; per-call times in ms."""
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            calls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append((time.perf_counter() - t0) * 1000.0)
    return times


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def part_a(bundle: Path, x: np.ndarray, iters: int) -> list[tuple[str, float, float, float, float]]:
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.runtimes import get_runtime

    rows = []
    for runtime, key in ARTIFACTS.items():
        if not get_runtime(runtime).is_available():
            print(f"(a) {runtime}: not installed, skipped")
            continue
        agent = Agent(bundle, artifact=key)
        sess = agent.session
        bare = bare_call(runtime, sess)
        want = bare(x)
        got = agent.predict(x)
        np.testing.assert_allclose(next(iter(got.outputs.values())), want, rtol=1e-5, atol=1e-5)
        t = interleaved({"bare": lambda b=bare: b(x), "session": lambda s=sess: s.run([x]),
                         "agent": lambda a=agent: a.predict(x)}, iters)
        rows.append((runtime, p50(t["bare"]), p50(t["session"]), p50(t["agent"]), p50(t["agent"]) / p50(t["bare"])))
        agent.close()
    return rows


def part_b(bundle: Path, jpeg: bytes, iters: int) -> list[tuple[str, float, float, float]]:
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer

    agent = Agent(bundle, artifact=ARTIFACTS["onnxruntime"])
    server = AgentServer(agent, "127.0.0.1", 0)
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    json_body = json.dumps({"image": base64.b64encode(jpeg).decode()}).encode()

    def post(body: bytes, ctype: str) -> dict[str, Any]:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200, doc
        return doc

    in_process = agent.predict_image(jpeg)
    doc = post(json_body, "application/json")
    assert doc["class"] == in_process.class_index, (doc["class"], in_process.class_index)
    print(f"(b) photo -> class {doc['class']} {doc['label'] or ''} confidence {doc['confidence']:.3f}")
    t = interleaved({"in_process": lambda: agent.predict_image(jpeg),
                     "rest_json_b64": lambda: post(json_body, "application/json"),
                     "rest_raw_jpeg": lambda: post(jpeg, "image/jpeg")}, iters)
    conn.close()
    server.shutdown()
    agent.close()
    base = p50(t["in_process"])
    return [(name, base, p50(t[name]), p50(t[name]) / base) for name in ("rest_json_b64", "rest_raw_jpeg")]


CHILD = {
    "bare onnxruntime": """
        import onnxruntime as ort, numpy as np
        s = ort.InferenceSession(PATH, providers=["CPUExecutionProvider"])
        s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, 224, 224), np.float32)})
    """,
    "agent (tensor)": """
        import numpy as np
        from edge_sdk.device_agent.agent import Agent
        a = Agent(BUNDLE, artifact="onnx/fp32")
        a.predict(np.zeros((1, 3, 224, 224), np.float32))
    """,
    "agent + HTTP server (JPEG)": """
        from edge_sdk.device_agent.agent import Agent
        from edge_sdk.device_agent.server import AgentServer
        a = Agent(BUNDLE, artifact="onnx/fp32")
        AgentServer(a, "127.0.0.1", 0).start()
        a.predict_image(open(JPEG, "rb").read())
    """,
}
CHILD_TAIL = """
    T_FIRST = time.time()
    import gc; gc.collect(); time.sleep(0.5)
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    print(json.dumps({"first": T_FIRST, "rss_kb": rss}))
"""


def part_c(bundle: Path, jpeg_path: Path, starts: int) -> list[tuple[str, float, float]]:
    from edge_sdk.device_agent.agent import Agent

    onnx_path = Agent(bundle, artifact="onnx/fp32", verify=False).artifact
    path = str(bundle / onnx_path.path)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in CHILD}
    for i in range(starts + 1):  # the first round only warms the page cache
        for name, body in CHILD.items():
            code = (f"import time, json\nPATH, BUNDLE, JPEG = {path!r}, {str(bundle)!r}, {str(jpeg_path)!r}\n"
                    + textwrap.dedent(body) + textwrap.dedent(CHILD_TAIL))
            t0 = time.time()
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            doc = json.loads(out.stdout.strip().splitlines()[-1])
            if i:
                results[name].append((doc["first"] - t0, doc["rss_kb"] / 1024))
    return [(name, p50([r[0] for r in rs]) * 1000, p50([r[1] for r in rs])) for name, rs in results.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "demo_out" / "mobilenet_v2")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--starts", type=int, default=7, help="process starts per variant for (c)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    bundle = ensure_bundle(args.bundle)
    from edge_sdk.preprocessing import Preprocessing, decode_image

    jpeg = photo_jpeg()
    jpeg_path = Path("/tmp/edge_sdk_bench_chelsea.jpg")
    jpeg_path.write_bytes(jpeg)
    x = Preprocessing.imagenet().apply(decode_image(jpeg))
    import os
    import platform

    print(f"MobileNetV2 bundle {bundle}; {platform.machine()} {os.cpu_count()} CPUs; iters {args.iters}")
    if "a" not in skip:
        rows = part_a(bundle, x, args.iters)
        print("\n(a) ready tensor, p50 ms (goal: agent / bare <= 1.05)")
        print("| runtime | bare runtime call | edge_sdk Session.run | Agent.predict | agent / bare |")
        print("|---|---|---|---|---|")
        for r, b, s, a, ratio in rows:
            print(f"| {r} | {b:.3f} | {s:.3f} | {a:.3f} | {ratio:.3f} |")
    if "b" not in skip:
        rows_b = part_b(bundle, jpeg, args.iters)
        print(f"\n(b) JPEG {len(jpeg) // 1024} KB {decode_image(jpeg).shape[1::-1]} -> class, p50 ms "
              "(goal: REST / in-process <= 1.25)")
        print("| request | in-process decode+preprocess+infer | REST POST /predict | REST / in-process |")
        print("|---|---|---|---|")
        for name, base, rest, ratio in rows_b:
            print(f"| {name} | {base:.3f} | {rest:.3f} | {ratio:.3f} |")
    if "c" not in skip:
        rows_c = part_c(bundle, jpeg_path, args.starts)
        bare_rss = next(r[2] for r in rows_c if r[0].startswith("bare"))
        print(f"\n(c) fresh process, median of {args.starts} (goal: first prediction <= 1000 ms; RSS <= bare + 30 MB)")
        print("| process | start -> first prediction ms | idle RSS MB | RSS - bare MB |")
        print("|---|---|---|---|")
        for name, ms, rss in rows_c:
            print(f"| {name} | {ms:.0f} | {rss:.1f} | {rss - bare_rss:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
