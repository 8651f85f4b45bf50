"""The agent speaks the standard serving protocols to other people's clients, on the real MobileNetV2.

One fp32 ONNX bundle of the real ImageNet MobileNetV2 is built per module and served on 127.0.0.1. The unchanged
``tritonclient.http.InferenceServerClient`` (Open Inference Protocol v2) checks health, metadata and inference
with binary and JSON tensors; TF Serving ``:predict``, Vertex routes, Azure ``/score`` and SageMaker ``x-npy`` /
``x-image`` requests are compared with ``POST /predict`` on the same tensor or image: outputs must be identical
(max abs diff 0). Bad and hostile requests get a 400 (404 for another model) with the one-line ``{"error"}`` body,
and the agent serves the next request.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edge_sdk.device_agent.agent import Agent  # noqa: E402
from edge_sdk.device_agent.protocols.sagemaker import load_npy  # noqa: E402
from edge_sdk.device_agent.protocols.tf_serving import VertexRoutes, vertex_port  # noqa: E402
from edge_sdk.device_agent.server import AgentServer  # noqa: E402
from edge_sdk.errors import ConfigError, HTTPError  # noqa: E402
from edge_sdk.httpbase import HTTPSecurity  # noqa: E402
from edge_sdk.preprocessing import Preprocessing  # noqa: E402

NAME, VERSION = "mobilenet-v2", "3"
LABELS = [f"imagenet-{i:04d}" for i in range(1000)]
TOKEN = "serving-protocols-test-token-0123456789"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    import edge_sdk

    d = tmp_path_factory.mktemp("protocols_mnv2")
    np.save(d / "val.npy", photo_crops(n=8, seed=0))
    edge_sdk.convert(mobilenet_v2_weights_path(), model_class="torch_models:MobileNetV2",
                     input_shape=[1, 3, 224, 224], out=d / "bundle", to="onnx", precision="fp32", ort=False,
                     val=d / "val.npy", labels=LABELS, preprocessing=Preprocessing.imagenet(), name=NAME,
                     version=VERSION, quiet=True)
    return d / "bundle"


@pytest.fixture(scope="module")
def agent(bundle: Path) -> Agent:
    a = Agent(bundle, threads=1)
    yield a
    a.close()


@pytest.fixture(scope="module")
def server(agent: Agent) -> AgentServer:
    srv = AgentServer(agent, "127.0.0.1", 0, queue_size=4, request_timeout_s=30,
                      vertex=VertexRoutes("/v1/endpoints/7/deployedModels/9:predict", "/vertex/health"))
    srv.start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server: AgentServer) -> Any:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from skimage import data as skdata

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(skdata.chelsea(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def tensor(jpeg: bytes) -> np.ndarray:
    return Preprocessing.imagenet().apply(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))


def _req(srv: AgentServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _post_json(srv: AgentServer, path: str, doc: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, raw = _req(srv, "POST", path, json.dumps(doc).encode(),
                          {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw)


def _predict(srv: AgentServer, doc: dict[str, Any]) -> np.ndarray:
    """``POST /predict``'s output tensor (the reference every protocol must equal)."""
    status, got = _post_json(srv, "/predict", doc)
    assert status == 200, got
    return np.asarray(got["outputs"]["output"], np.float32)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _still_serving(srv: AgentServer, tensor: np.ndarray) -> None:
    status, doc = _post_json(srv, f"/v2/models/{NAME}/infer", {"inputs": [
        {"name": "input", "datatype": "FP32", "shape": list(tensor.shape), "data": tensor.reshape(-1).tolist()}]})
    assert status == 200 and doc["outputs"][0]["shape"] == [1, 1000], doc


# -- Open Inference Protocol v2 with the unchanged tritonclient ---------------------------------------------------
def test_tritonclient_health_and_metadata(client: Any, server: AgentServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, VERSION)
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(NAME, "99")
    meta = client.get_server_metadata()
    assert meta["name"] == "edge-sdk-agent" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(NAME)
    assert model == client.get_model_metadata(NAME, VERSION)
    assert model["name"] == NAME and model["versions"] == [VERSION] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [1, 1000]}]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("resnet50")
    assert err.value.status() == "404" and f"this agent serves '{NAME}'" in err.value.message()


def test_tritonclient_infer_binary_and_json_equal_predict(client: Any, server: AgentServer,
                                                          tensor: np.ndarray) -> None:
    want = _predict(server, {"inputs": tensor.tolist()})
    diffs = {}
    for binary_in in (True, False):
        for outputs in (None, True, False):  # None: no outputs named -> binary_data_output for all
            inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
            inp.set_data_from_numpy(tensor, binary_data=binary_in)
            req = None if outputs is None else [httpclient.InferRequestedOutput("output", binary_data=outputs)]
            result = client.infer(NAME, [inp], outputs=req, request_id="r-1")
            got = result.as_numpy("output")
            diffs[(binary_in, outputs)] = _max_diff(got, want)
            resp = result.get_response()
            assert resp["model_name"] == NAME and resp["model_version"] == VERSION and resp["id"] == "r-1"
            assert ("parameters" in resp["outputs"][0]) == (outputs is not False)  # binary_data_size when binary
    assert all(d == 0.0 for d in diffs.values()), diffs
    # versioned route, and the prediction id feeds /feedback like /predict's
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor)
    result = client.infer(NAME, [inp], model_version=VERSION)
    assert _max_diff(result.as_numpy("output"), want) == 0.0
    status, doc = _post_json(server, "/feedback", {"prediction_id": result.get_response()["parameters"][
        "prediction_id"], "label": int(want.argmax())})
    assert status == 200 and doc["correct"] is True


def test_tritonclient_gzip_request_and_bytes_image(client: Any, server: AgentServer, tensor: np.ndarray,
                                                   jpeg: bytes) -> None:
    want = _predict(server, {"inputs": tensor.tolist()})
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor)
    for algo in ("gzip", "deflate"):
        got = client.infer(NAME, [inp], request_compression_algorithm=algo).as_numpy("output")
        assert _max_diff(got, want) == 0.0
    # BYTES holding an encoded image: the manifest preprocessing runs, as for /predict's image path
    want_image = _predict(server, {"image": base64.b64encode(jpeg).decode()})
    img = httpclient.InferInput("input", [1], "BYTES")
    img.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    assert _max_diff(client.infer(NAME, [img]).as_numpy("output"), want_image) == 0.0
    status, doc = _post_json(server, f"/v2/models/{NAME}/infer", {"inputs": [
        {"name": "input", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}]})
    assert status == 200, doc
    assert _max_diff(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(1, 1000), want_image) == 0.0


def test_tritonclient_bad_requests_get_400_and_agent_serves_on(client: Any, server: AgentServer,
                                                               tensor: np.ndarray) -> None:
    cases = []
    wrong_type = httpclient.InferInput("input", list(tensor.shape), "FP64")
    wrong_type.set_data_from_numpy(tensor.astype(np.float64))
    cases.append((wrong_type, "datatype FP64, the model expects FP32"))
    wrong_shape = httpclient.InferInput("input", [1, 3, 112, 448], "FP32")
    wrong_shape.set_data_from_numpy(tensor.reshape(1, 3, 112, 448))
    cases.append((wrong_shape, "has shape [1, 3, 112, 448], the model expects [1, 3, 224, 224]"))
    unknown = httpclient.InferInput("pixels", list(tensor.shape), "FP32")
    unknown.set_data_from_numpy(tensor)
    cases.append((unknown, "unknown input 'pixels': the model takes 'input'"))
    for inp, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(NAME, [inp])
        assert err.value.status() == "400" and needle in err.value.message(), err.value.message()
        assert "\n" not in err.value.message() and "Traceback" not in err.value.message()
        assert client.is_server_ready()
        _still_serving(server, tensor)


def _v2_body(header: dict[str, Any], binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + binary, headers


def _fp32(shape: list[int], **params: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": "FP32", "shape": shape, **({"parameters": params} if params else {})}


_X = np.zeros((1, 3, 224, 224), np.float32).tobytes()
HOSTILE: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("header length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": str(2**62)}, 400,
     "outside the"),
    ("negative header length", b'{"inputs": []}', {"Inference-Header-Content-Length": "-5"}, 400, "outside the"),
    ("header length not a number", b'{"inputs": []}', {"Inference-Header-Content-Length": "1e3"}, 400,
     "is not an integer"),
    ("negative binary size", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=-1)]}, _X), 400,
     "binary_data_size must be an integer >= 0"),
    ("boolean binary size", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=True)]}, _X), 400,
     "binary_data_size must be an integer >= 0"),
    ("binary size short of the shape", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=len(_X) - 4)]},
                                                 _X[:-4]), 400,
     "binary_data_size is 602108 bytes, shape [1, 3, 224, 224] of FP32 needs 602112"),
    ("binary size past the body", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=2**40)]}, _X), 400,
     "runs past the end of the body"),
    ("bytes nobody claims", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=len(_X))]}, _X + b"xx"),
     400, "claimed by no input"),
    ("shape product overflowing int64", *_v2_body({"inputs": [_fp32([2**62, 2**62, 3, 224], binary_data_size=8)]},
                                                  b"\0" * 8), 400, "has shape"),
    ("negative dimension", *_v2_body({"inputs": [_fp32([1, -3, 224, 224], binary_data_size=len(_X))]}, _X), 400,
     "integers >= 0"),
    ("too many dimensions", *_v2_body({"inputs": [_fp32([1] * 40, binary_data_size=4)]}, b"\0" * 4), 400,
     "at most 16 integers"),
    ("unknown datatype", *_v2_body({"inputs": [{"name": "input", "datatype": "BF16", "shape": [1], "data": [1]}]}),
     400, "unsupported datatype"),
    ("wrong datatype, JSON", *_v2_body({"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 3, 224, 224],
                                                    "data": [0] * 10}]}), 400, "datatype INT8, the model expects FP32"),
    ("values short of the shape", *_v2_body({"inputs": [{"name": "input", "datatype": "FP32",
                                                          "shape": [1, 3, 224, 224], "data": [0.0] * 10}]}), 400,
     "has 10 values, its shape [1, 3, 224, 224] needs 150528"),
    ("strings as FP32", *_v2_body({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                               "data": ["x"] * 150528}]}), 400, "must hold numbers"),
    ("deeply nested JSON", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "nested too deeply"),
    ("not JSON", b"\x00\xff garbage", {}, 400, "not valid JSON"),
    ("no inputs", b'{"outputs": []}', {}, 400, "\"inputs\" must be a non-empty list"),
    ("unknown input", *_v2_body({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}),
     400, "unknown input 'pixels'"),
    ("unknown output", *_v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=len(_X))],
                                  "outputs": [{"name": "logits"}]}, _X), 400, "unknown output 'logits'"),
    ("BYTES with two images", *_v2_body({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2],
                                                     "data": ["aGk=", "aGk="]}]}), 400, "exactly one encoded image"),
    ("BYTES length prefix lying", *_v2_body({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                         "parameters": {"binary_data_size": 8}}]},
                                             (2**31).to_bytes(4, "little") + b"abcd"), 400, "does not hold one"),
    ("BYTES not an image", *_v2_body({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                  "data": [base64.b64encode(b"not an image").decode()]}]}), 400,
     "not a decodable image"),
    ("gzip bomb", gzip.compress(b"{" + b" " * (20 << 20)), {"Content-Encoding": "gzip"}, 413, "inflates to more"),
    ("unknown encoding", b"{}", {"Content-Encoding": "br"}, 415, "not supported"),
]


@pytest.mark.parametrize(("what", "body", "headers", "status", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_v2_bodies_get_a_clean_error(server: AgentServer, tensor: np.ndarray, what: str, body: bytes,
                                             headers: dict[str, str], status: int, needle: str) -> None:
    t0 = time.perf_counter()
    got, _, raw = _req(server, "POST", f"/v2/models/{NAME}/infer", body,
                                  {"Content-Type": "application/json", **headers})
    doc = json.loads(raw)
    assert got == status and list(doc) == ["error"], (got, doc)
    assert needle in doc["error"] and "\n" not in doc["error"] and "Traceback" not in doc["error"], doc
    assert time.perf_counter() - t0 < 10
    _still_serving(server, tensor)


@pytest.mark.parametrize(("path", "needle"), [
    ("/v2/models/resnet50/infer", "unknown model 'resnet50'"),
    (f"/v2/models/{NAME}/versions/4/infer", "has no version '4'"),
    ("/v1/models/resnet50:predict", "unknown model 'resnet50'"),
])
def test_unknown_model_or_version_is_404(server: AgentServer, tensor: np.ndarray, path: str, needle: str) -> None:
    status, doc = _post_json(server, path, {"inputs": []})
    assert status == 404 and needle in doc["error"], doc
    _still_serving(server, tensor)


# -- TF Serving / Vertex, Azure, SageMaker --------------------------------------------------------------------------
def test_tf_serving_and_vertex_predict_equal_predict(server: AgentServer, tensor: np.ndarray, jpeg: bytes) -> None:
    want = _predict(server, {"inputs": tensor.tolist()})
    for path in (f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}/versions/{VERSION}:predict",
                 "/v1/endpoints/7/deployedModels/9:predict", "/predict"):
        status, doc = _post_json(server, path, {"instances": [tensor[0].tolist(), tensor[0].tolist()],
                                                "parameters": {"confidence": 0.5}})
        assert status == 200 and len(doc["predictions"]) == 2, (path, doc)
        for row in doc["predictions"]:
            assert _max_diff(np.asarray(row, np.float32)[None], want) == 0.0
    status, doc = _post_json(server, f"/v1/models/{NAME}:predict", {"inputs": {"input": tensor.tolist()}})
    assert status == 200 and _max_diff(np.asarray(doc["outputs"], np.float32), want) == 0.0
    want_image = _predict(server, {"image": base64.b64encode(jpeg).decode()})
    status, doc = _post_json(server, f"/v1/models/{NAME}:predict",
                             {"instances": [{"b64": base64.b64encode(jpeg).decode()}]})
    assert status == 200 and _max_diff(np.asarray(doc["predictions"][0], np.float32)[None], want_image) == 0.0
    status, _, raw = _req(server, "GET", f"/v1/models/{NAME}")
    assert status == 200 and json.loads(raw)["model_version_status"][0] == {
        "version": VERSION, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert _req(server, "GET", "/vertex/health")[0] == 200
    for doc_in, needle in (({"instances": []}, "non-empty list"), ({"instances": [[1.0, 2.0]]}, "shape"),
                           ({"instances": [[0.0]] * 65}, "at most 64"), ({"rows": []}, "neither \"instances\""),
                           ({"instances": [{"b64": "@@"}]}, "not valid base64")):
        status, doc = _post_json(server, f"/v1/models/{NAME}:predict", doc_in)
        assert status == 400 and needle in doc["error"], doc
    _still_serving(server, tensor)


def test_azure_score_equals_predict(server: AgentServer, tensor: np.ndarray, jpeg: bytes) -> None:
    for doc in ({"inputs": tensor.tolist()}, {"image": base64.b64encode(jpeg).decode()}):
        status, got = _post_json(server, "/score", doc)
        assert status == 200
        assert _max_diff(np.asarray(got["outputs"]["output"], np.float32), _predict(server, doc)) == 0.0


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def test_sagemaker_npy_and_image_equal_predict(server: AgentServer, tensor: np.ndarray, jpeg: bytes) -> None:
    want = _predict(server, {"inputs": tensor.tolist()})
    status, _, raw = _req(server, "POST", "/invocations", _npy(tensor), {"Content-Type": "application/x-npy"})
    assert status == 200 and _max_diff(np.asarray(json.loads(raw)["outputs"]["output"], np.float32), want) == 0.0
    status, headers, raw = _req(server, "POST", "/invocations", _npy(tensor),
                                {"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert _max_diff(np.load(io.BytesIO(raw), allow_pickle=False), want) == 0.0
    # Fortran order and big-endian arrays are the same tensor
    for variant in (np.asfortranarray(tensor), tensor.astype(">f4")):
        status, _, raw = _req(server, "POST", "/invocations", _npy(variant), {"Content-Type": "application/x-npy"})
        assert status == 200 and _max_diff(np.asarray(json.loads(raw)["outputs"]["output"], np.float32), want) == 0.0
    want_image = _predict(server, {"image": base64.b64encode(jpeg).decode()})
    status, _, raw = _req(server, "POST", "/invocations", jpeg, {"Content-Type": "application/x-image"})
    assert status == 200 and _max_diff(np.asarray(json.loads(raw)["outputs"]["output"], np.float32), want_image) == 0
    status, _, raw = _req(server, "POST", "/invocations", jpeg, {"Content-Type": "application/x-image",
                                                                 "Accept": "text/csv"})
    assert status == 406 and "application/x-npy" in json.loads(raw)["error"]


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize(("body", "needle"), [
    (_npy_header("<f4", (10**12, 10**12)) + b"\0" * 16, "announces shape"),
    (_npy_header("<f4", (1, 3, 224, 224)) + b"\0" * 100, "announces shape"),
    (_npy_header("|O", (1,)) + b"\0" * 8, "not numeric"),
    (b"\x80\x04\x95" + b"pickle" * 10, "not a .npy array"),
    (b"\x93NUMPY\x01\x00\xff\xff{'descr': __import__('os')}", "not a .npy array"),
    (_npy(np.zeros((1, 3, 224, 224), np.int32)), "dtype int32, the model expects float32"),
    (_npy(np.zeros((3, 224, 224), np.float32)), "has shape [3, 224, 224]"),
])
def test_hostile_npy_bodies_get_400(server: AgentServer, tensor: np.ndarray, body: bytes, needle: str) -> None:
    status, _, raw = _req(server, "POST", "/invocations", body, {"Content-Type": "application/x-npy"})
    doc = json.loads(raw)
    assert status == 400 and needle in doc["error"] and "\n" not in doc["error"], doc
    _still_serving(server, tensor)


def test_load_npy_views_in_place_and_refuses_without_allocating() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(load_npy(_npy(x)), x)
    with pytest.raises(HTTPError, match="announces shape"):
        load_npy(_npy_header("<f8", (2**40,)) + b"\0" * 8)  # numpy.load on bytes would try 8 TB


# -- the same queue, token and metrics as /predict ------------------------------------------------------------------
def test_v2_infer_shares_the_bounded_queue(agent: Agent, tensor: np.ndarray) -> None:
    srv = AgentServer(agent, "127.0.0.1", 0, queue_size=1, request_timeout_s=30)
    release = threading.Event()
    srv.before_inference = lambda: release.wait(20)
    srv.start()
    try:
        body, headers = _v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=tensor.nbytes)]},
                                 tensor.tobytes())
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            _req(srv, "POST", f"/v2/models/{NAME}/infer", body, headers)[0])) for _ in range(2)]
        for t in threads:  # one runs (held), one waits in the queue of 1
            t.start()
            time.sleep(0.3)
        status, got_headers, raw = _req(srv, "POST", f"/v1/models/{NAME}:predict",
                                        json.dumps({"instances": [tensor[0].tolist()]}).encode())
        assert status == 429 and got_headers["retry-after"] == "1" and "queue is full" in json.loads(raw)["error"]
        release.set()
        for t in threads:
            t.join(30)
        assert results == [200, 200]
    finally:
        release.set()
        srv.shutdown()


def test_token_guards_every_protocol_but_health_probes(agent: Agent, tensor: np.ndarray) -> None:
    srv = AgentServer(agent, "127.0.0.1", 0, security=HTTPSecurity(token=TOKEN),
                      vertex=VertexRoutes("/vx:predict", "/vx/health"))
    srv.start()
    try:
        for path in ("/v2/health/live", "/v2/health/ready", "/ping", "/vx/health"):
            assert _req(srv, "GET", path)[0] == 200, path
        for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{NAME}"), ("POST", f"/v2/models/{NAME}/infer"),
                             ("POST", f"/v1/models/{NAME}:predict"), ("POST", "/vx:predict"), ("POST", "/score"),
                             ("GET", f"/v1/models/{NAME}")):
            assert _req(srv, method, path, b"{}" if method == "POST" else None)[0] == 401, path
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
        inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
        inp.set_data_from_numpy(tensor)
        with pytest.raises(InferenceServerException) as err:
            c.infer(NAME, [inp])
        assert err.value.status() == "401"
        got = c.infer(NAME, [inp], headers={"Authorization": f"Bearer {TOKEN}"}).as_numpy("output")
        assert got.shape == (1, 1000)
        c.close()
    finally:
        srv.shutdown()


def test_requests_are_counted_by_route_template(server: AgentServer, client: Any, tensor: np.ndarray) -> None:
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor)
    client.infer(NAME, [inp])
    lines = [line for line in _req(server, "GET", "/metrics")[2].decode().splitlines()
             if line.startswith("edge_agent_requests_total{")]
    assert any(all(label in line for label in ('route="/v2/models/{name}/infer"', 'method="POST"', 'code="200"'))
               for line in lines), lines
    assert not any("mobilenet-v2" in line for line in lines)  # a template, not one label per model name


def test_vertex_settings_from_the_environment() -> None:
    assert vertex_port({"AIP_HTTP_PORT": "8080"}) == 8080 and vertex_port({}) is None
    assert VertexRoutes.from_env({"AIP_PREDICT_ROUTE": "/v1/endpoints/1:predict", "AIP_HEALTH_ROUTE": "/h/"}) == \
        VertexRoutes("/v1/endpoints/1:predict", "/h")
    for env in ({"AIP_HTTP_PORT": "80a"}, {"AIP_HTTP_PORT": "70000"}, {"AIP_PREDICT_ROUTE": "predict"}):
        with pytest.raises(ConfigError):
            vertex_port(env) if "AIP_HTTP_PORT" in env else VertexRoutes.from_env(env)


def test_agent_run_listens_on_aip_http_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.cli import build_parser
    from edge_sdk.cli.agent import _runner_config

    monkeypatch.setenv("AIP_HTTP_PORT", "9137")
    assert _runner_config(build_parser().parse_args(["agent", "run", "--bundle", "b"])).agent.port == 9137
    cfg = _runner_config(build_parser().parse_args(["agent", "run", "--bundle", "b", "--http", "127.0.0.1:9001"]))
    assert cfg.agent.port == 9001  # the flag wins


def test_vertex_route_clashing_with_an_agent_route_is_refused(agent: Agent) -> None:
    with pytest.raises(ConfigError, match="AIP_PREDICT_ROUTE=/metrics"):
        AgentServer(agent, "127.0.0.1", 0, vertex=VertexRoutes(predict="/metrics"))


def test_keep_alive_connection_outlives_the_request_deadline(agent: Agent, tensor: np.ndarray) -> None:
    """A client reusing its connection after more than request_timeout_s is answered (the pool parks idle
    keep-alive connections; they were closed silently, breaking long benchmark runs on one connection)."""
    srv = AgentServer(agent, "127.0.0.1", 0, request_timeout_s=2)
    srv.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        body, headers = _v2_body({"inputs": [_fp32([1, 3, 224, 224], binary_data_size=tensor.nbytes)]},
                                 tensor.tobytes())
        for pause in (0.0, 2.5):
            time.sleep(pause)
            conn.request("POST", f"/v2/models/{NAME}/infer", body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Connection") != "close"
            resp.read()
    finally:
        conn.close()
        srv.shutdown()
