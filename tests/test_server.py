"""The agent's HTTP API on a real server (127.0.0.1, free port) serving a real tiny-CNN ONNX bundle.

Outputs over HTTP are compared with the in-process agent and with a bare ONNX Runtime session on the same
input; every error class is checked, each followed by a good request (the server keeps serving).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from edge_sdk.device_agent.agent import Agent  # noqa: E402
from edge_sdk.device_agent.server import AgentServer, parse_multipart  # noqa: E402
from edge_sdk.preprocessing import Preprocessing, decode_image  # noqa: E402
from edge_sdk.runtimes import get_runtime  # noqa: E402

LABELS = [f"class-{i}" for i in range(10)]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("server")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)), labels=LABELS,
                     out=d / "bundle", name="tiny", version="7", quiet=True)
    return d / "bundle"


@pytest.fixture(scope="module")
def agent(bundle_dir: Path) -> Agent:
    a = Agent(bundle_dir)
    yield a
    a.close()


@pytest.fixture(scope="module")
def bare(agent: Agent) -> Any:
    """A bare ONNX Runtime session on the same artifact, for equality checks."""
    sess = get_runtime("onnxruntime").load(agent.bundle.path_of(agent.artifact))
    yield sess
    sess.close()


@pytest.fixture(scope="module")
def server(agent: Agent) -> AgentServer:
    srv = AgentServer(agent, "127.0.0.1", 0, queue_size=4, max_body_bytes=MAX_BODY, request_timeout_s=20)
    port = srv.start()
    assert port == srv.port and port > 0 and srv.url == f"http://127.0.0.1:{port}"
    yield srv
    srv.shutdown()


def _image(fmt: str = ".jpg", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (64, 48), interpolation=cv2.INTER_CUBIC)  # smooth, photo-like, not square
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    return buf.tobytes()


def _req(srv: AgentServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _post_json(srv: AgentServer, doc: Any, path: str = "/predict") -> tuple[int, dict[str, Any]]:
    status, _, body = _req(srv, "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def _multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "----edge-sdk-test-7MA4YWxk") -> bytes:
    out = b""
    for name, filename, content in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        ctype = "Content-Type: image/png\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n{ctype}\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _assert_same(got: dict[str, Any], want: Any) -> None:
    (name, values), = want.outputs.items()
    np.testing.assert_allclose(np.asarray(got["outputs"][name], np.float32), values, rtol=1e-6, atol=1e-6)
    assert got["class"] == want.class_index and got["label"] == LABELS[want.class_index]
    assert got["confidence"] == pytest.approx(want.confidence, abs=1e-6)
    assert [t["class"] for t in got["top_k"]] == [t["class"] for t in want.top_k]
    assert got["model_version"] == "tiny:7" and got["latency_ms"] >= 0
    uuid.UUID(got["id"])


def _still_serving(srv: AgentServer) -> None:
    status, doc = _post_json(srv, {"image": base64.b64encode(_image()).decode()})
    assert status == 200 and "class" in doc


def test_predict_base64_jpeg_matches_in_process_and_bare_runtime(server: AgentServer, agent: Agent,
                                                                 bare: Any) -> None:
    jpeg = _image(".jpg")
    status, doc = _post_json(server, {"image": base64.b64encode(jpeg).decode()})
    assert status == 200, doc
    _assert_same(doc, agent.predict_image(jpeg))
    x = Preprocessing(size=(32, 32)).apply(decode_image(jpeg))
    (values,) = doc["outputs"].values()
    np.testing.assert_allclose(np.asarray(values, np.float32), bare.run([x])[0], rtol=1e-5, atol=1e-5)


def test_predict_inputs_json_equals_bare_runtime(server: AgentServer, agent: Agent, bare: Any) -> None:
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = bare.run([x])[0]
    name = agent.input_specs[0].name
    for doc_in, path in (({"inputs": {name: x.tolist()}}, "/predict"), ({"inputs": x.tolist()}, "/invocations")):
        status, doc = _post_json(server, doc_in, path)
        assert status == 200, doc
        (_, values), = doc["outputs"].items()
        np.testing.assert_allclose(np.asarray(values, np.float32), want, rtol=1e-5, atol=1e-5)
        assert doc["class"] == int(want.argmax())


def test_predict_multipart_and_raw_image(server: AgentServer, agent: Agent) -> None:
    png = _image(".png", seed=1)
    want = agent.predict_image(png)
    body = _multipart([("note", None, b"hello"), ("image", "photo.png", png)])
    status, _, raw = _req(server, "POST", "/predict", body,
                          {"Content-Type": "multipart/form-data; boundary=----edge-sdk-test-7MA4YWxk"})
    assert status == 200, raw
    _assert_same(json.loads(raw), want)
    # SageMaker-style raw body on /invocations
    status, _, raw = _req(server, "POST", "/invocations", png, {"Content-Type": "image/png"})
    assert status == 200, raw
    _assert_same(json.loads(raw), want)


def test_parse_multipart_keeps_binary_bytes() -> None:
    payload = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n\r\n"
    fields = parse_multipart(_multipart([("file", "x.bin", payload)], "b0undary"),
                             'multipart/form-data; boundary="b0undary"')
    assert fields == {"file": ("x.bin", payload)}


def test_ping_healthz(server: AgentServer, agent: Agent) -> None:
    status, _, body = _req(server, "GET", "/ping")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = _req(server, "GET", "/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok" and doc["model_version"] == "tiny:7"
    assert doc["runtime"] == "onnxruntime" and doc["artifact"] == "onnx/fp32" and doc["queue_depth"] == 0
    assert doc["uptime_s"] > 0


def _nan_body(name: str) -> bytes:
    x = np.zeros((1, 3, 32, 32), np.float32).tolist()
    x[0][1][2][3] = float("nan")
    return json.dumps({"inputs": {name: x}}).encode()  # json writes the NaN literal


@pytest.mark.parametrize(
    ("method", "path", "body", "ctype", "status", "needle"),
    [
        ("POST", "/predict", json.dumps({"image": base64.b64encode(b"not an image").decode()}).encode(),
         "application/json", 400, "not a decodable image"),
        ("POST", "/predict", json.dumps({"image": "@@@not base64@@@"}).encode(), "application/json", 400,
         "not valid base64"),
        ("POST", "/predict", json.dumps({"inputs": np.zeros((1, 3, 16, 16)).tolist()}).encode(),
         "application/json", 400, "shape"),
        ("POST", "/predict", json.dumps({"inputs": [[["a", "b"]]]}).encode(), "application/json", 400,
         "must hold numbers"),
        ("POST", "/predict", json.dumps({"inputs": [[1.0, 2.0], [3.0]]}).encode(), "application/json", 400,
         "rectangular"),
        ("POST", "/predict", b"NAN", "application/json", 400, "NaN or Inf"),
        ("POST", "/predict", b'{"image": ', "application/json", 400, "not valid JSON"),
        ("POST", "/invocations", b'{"picture": "x"}', "application/json", 400, "needs an \"image\""),
        ("POST", "/predict", _multipart([("note", None, b"hi")]),
         "multipart/form-data; boundary=----edge-sdk-test-7MA4YWxk", 400, "without a file"),
        ("POST", "/predict", b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, "malformed multipart"),
        ("POST", "/predict", b"\x89PNG\r\n\x1a\n garbage", "image/png", 400, "not a decodable image"),
        ("GET", "/nowhere", None, None, 404, "no route /nowhere"),
        ("POST", "/v1/models", b"{}", "application/json", 404, "no route"),
        ("GET", "/predict", None, None, 405, "GET is not allowed on /predict"),
        ("POST", "/ping", b"{}", "application/json", 405, "POST is not allowed on /ping"),
        ("DELETE", "/metrics", None, None, 405, "not allowed"),
    ],
)
def test_bad_requests_answer_4xx_and_server_keeps_serving(server: AgentServer, agent: Agent, method: str,
                                                          path: str, body: bytes | None, ctype: str | None,
                                                          status: int, needle: str) -> None:
    if body == b"NAN":
        body = _nan_body(agent.input_specs[0].name)
    got, headers, raw = _req(server, method, path, body, {"Content-Type": ctype} if ctype else {})
    doc = json.loads(raw)
    assert got == status, doc
    assert needle in doc["error"] and "\n" not in doc["error"] and "Traceback" not in doc["error"]
    if status == 405:
        assert headers["allow"]
    _still_serving(server)


def test_body_over_limit_is_refused_before_reading(server: AgentServer) -> None:
    # Content-Length announces 1 GB but nothing is sent: the answer must come from the header alone
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "over the 262144-byte limit" in doc["error"]
    assert resp.getheader("Connection") == "close"
    # curl-style "Expect: 100-continue": refused instead of "100 Continue"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "over the" in json.loads(resp.read())["error"]
    conn.close()
    big = json.dumps({"image": base64.b64encode(b"\0" * MAX_BODY).decode()}).encode()
    assert _req(server, "POST", "/predict", big, {"Content-Type": "application/json"})[0] == 413
    _still_serving(server)


def test_runtime_failure_is_500_and_server_keeps_serving(bundle_dir: Path) -> None:
    broken = Agent(bundle_dir)
    with AgentServer(broken, port=0) as srv:
        broken.session.close()  # the runtime now fails on every call
        status, doc = _post_json(srv, {"image": base64.b64encode(_image()).decode()})
        assert status == 500 and "closed" in doc["error"] and "\n" not in doc["error"]
        status, doc = _post_json(srv, {"image": base64.b64encode(b"junk").decode()})
        assert status == 400  # still answering, and still telling bad input from runtime failure
        assert _req(srv, "GET", "/ping")[0] == 200
        assert 'edge_agent_errors_total{kind="inference"} 1' in _req(srv, "GET", "/metrics")[2].decode()


class _HeldWorker:
    """Holds the inference worker inside its next job until released (server.before_inference hook)."""

    def __init__(self, srv: AgentServer) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        srv.before_inference = self._hook

    def _hook(self) -> None:
        self.started.set()
        assert self.release.wait(30)


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_full_queue_answers_429_at_once(agent: Agent) -> None:
    doc = {"image": base64.b64encode(_image()).decode()}
    with AgentServer(agent, port=0, queue_size=1) as srv:
        held = _HeldWorker(srv)
        a, out_a = _in_thread(_post_json, srv, doc)
        assert held.started.wait(10)  # the worker is inside job A; the queue is empty
        b, out_b = _in_thread(_post_json, srv, doc)
        _wait_for(lambda: srv.queue_depth == 1)  # job B waits in the queue: it is now full
        t0 = time.perf_counter()
        status, headers, raw = _req(srv, "POST", "/predict", json.dumps(doc).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 429 and headers["retry-after"] == "1" and "queue is full" in json.loads(raw)["error"]
        assert time.perf_counter() - t0 < 2.0
        assert json.loads(_req(srv, "GET", "/healthz")[2])["queue_depth"] == 1
        assert "edge_agent_queue_depth 1" in _req(srv, "GET", "/metrics")[2].decode()
        held.release.set()
        a.join(10)
        b.join(10)
        assert out_a[0][0] == 200 and out_b[0][0] == 200 and out_a[0][1]["class"] == out_b[0][1]["class"]
        metrics = _req(srv, "GET", "/metrics")[2].decode()
        assert 'edge_agent_errors_total{kind="queue_full"} 1' in metrics
        assert 'edge_agent_requests_total{code="429",method="POST",route="/predict"} 1' in metrics


def test_request_timeout_is_504(agent: Agent) -> None:
    with AgentServer(agent, port=0, queue_size=2, request_timeout_s=0.3) as srv:
        held = _HeldWorker(srv)
        try:
            status, doc = _post_json(srv, {"image": base64.b64encode(_image()).decode()})
            assert status == 504 and "no result within 0.3 s" in doc["error"]
            assert held.started.is_set()
        finally:
            held.release.set()


def _scrape(srv: AgentServer) -> dict[str, float]:
    status, headers, raw = _req(srv, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in raw.decode().splitlines():
        if not line or line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")) or not line
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


def test_metrics_parse_and_counters_increase(server: AgentServer) -> None:
    before = _scrape(server)
    for _ in range(3):
        _still_serving(server)
    assert _req(server, "GET", "/nowhere")[0] == 404
    after = _scrape(server)
    key = 'edge_agent_requests_total{code="200",method="POST",route="/predict"}'
    assert after[key] - before.get(key, 0) == 3
    assert after["edge_agent_inference_seconds_count"] - before["edge_agent_inference_seconds_count"] == 3
    assert after["edge_agent_inference_seconds_sum"] > before["edge_agent_inference_seconds_sum"]
    assert after['edge_agent_errors_total{kind="not_found"}'] - before.get('edge_agent_errors_total{kind="not_found"}',
                                                                            0) == 1
    buckets = [v for k, v in after.items() if k.startswith("edge_agent_inference_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after["edge_agent_inference_seconds_count"]
    assert after['edge_agent_model_info{artifact="onnx/fp32",model_version="tiny:7",runtime="onnxruntime"}'] == 1
    assert after["edge_agent_queue_depth"] == 0
