"""The agent's HTTP under hostile clients (issue 13): slow/idle sockets, parsing after admission, auth and TLS.

A real tiny-CNN ONNX bundle served by :class:`AgentServer` on 127.0.0.1 (and on the machine's non-loopback
address where there is one); real sockets, no mocks:

* 200 idle or header-trickling sockets: normal requests are still answered and the thread count stays bounded;
  a socket trickling its headers or its body is closed at the request deadline;
* the body is parsed on the bounded inference executor: with the queue full, a malformed body is answered 429
  (not admitted, not parsed), and deep JSON or a multipart body of many parts is a 400, not a 500;
* a bearer token (from a file or an environment variable) guards every route but ``/ping``/``/healthz``; TLS
  from the standard library; a non-loopback address without a token refuses to start unless opted out;
  ``/feedback`` from a non-loopback client without a token is refused.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from edge_sdk.device_agent.agent import Agent  # noqa: E402
from edge_sdk.device_agent.server import AgentServer  # noqa: E402
from edge_sdk.errors import EdgeSDKError  # noqa: E402
from edge_sdk.preprocessing import Preprocessing  # noqa: E402

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Agent:
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("http_hardening")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)),
                     labels=[f"c{i}" for i in range(10)], out=d / "bundle", name="tiny", version="1", quiet=True)
    a = Agent(d / "bundle")
    yield a
    a.close()


def _jpeg() -> bytes:
    img = cv2.resize(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48))
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _req(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         *, host: str = "127.0.0.1", context: ssl.SSLContext | None = None,
         timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if context is not None
            else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _predict(port: int, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = _req(port, "POST", "/predict", _jpeg(), {"Content-Type": "image/jpeg", **(headers or {})}, **kw)
    return status, json.loads(raw)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> float | None:
    """Send ``trickle`` one byte every 0.1 s; the time until the server closed the socket (None: still open)."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    i = 0
    while time.monotonic() - t0 < seconds:
        try:
            if i < len(trickle):
                sock.sendall(trickle[i:i + 1])
                i += 1
            data = sock.recv(4096)
            if data == b"" or data.startswith(b"HTTP/1.1 408"):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
    return None


# ---- slow and idle sockets ----------------------------------------------------------------------------------------

def test_200_idle_and_slow_sockets_bounded_threads_and_normal_requests_answered(agent: Agent) -> None:
    with AgentServer(agent, "127.0.0.1", 0, queue_size=4) as srv:
        assert _predict(srv.port)[0] == 200
        before = threading.active_count()
        socks: list[socket.socket] = []
        try:
            for i in range(200):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                if i % 2:  # half of them start a request and never finish its headers
                    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                socks.append(s)
            time.sleep(0.5)
            latencies = []
            for _ in range(20):
                t0 = time.perf_counter()
                status, doc = _predict(srv.port, timeout=5)
                latencies.append(time.perf_counter() - t0)
                assert status == 200 and "class" in doc
            threads = threading.active_count() - before
            assert threads <= 32, f"{threads} threads for 200 idle/slow sockets"
            assert sorted(latencies)[-1] < 3.0, latencies
        finally:
            for s in socks:
                s.close()


def test_trickled_headers_and_body_are_closed_at_the_request_deadline(agent: Agent) -> None:
    with AgentServer(agent, "127.0.0.1", 0, request_timeout_s=1.0) as srv:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            took = _closed_within(s, 6, head)
        assert took is not None and took < 4, f"header trickle still open after {took}"
        body_req = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(body_req)
            took = _closed_within(s, 6, b"{" + b" " * 398)
        assert took is not None and took < 4, f"body trickle still open after {took}"
        assert _predict(srv.port)[0] == 200


# ---- parsing inside the bounded executor ---------------------------------------------------------------------------

def test_body_is_parsed_only_after_admission_to_the_bounded_queue(agent: Agent) -> None:
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert release.wait(30)

    with AgentServer(agent, "127.0.0.1", 0, queue_size=1) as srv:
        srv.before_inference = hold
        out: list[Any] = []
        threads = [threading.Thread(target=lambda: out.append(_predict(srv.port)), daemon=True) for _ in range(2)]
        threads[0].start()
        assert started.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while srv.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:  # the queue is full: a malformed body is refused unread, not parsed on the HTTP thread
            status, _, raw = _req(srv.port, "POST", "/predict", b"{not json", {"Content-Type": "application/json"})
            assert status == 429, raw
        finally:
            release.set()
            for t in threads:
                t.join(10)
        assert [o[0] for o in out] == [200, 200]
        status, _, raw = _req(srv.port, "POST", "/predict", b"{not json", {"Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in json.loads(raw)["error"]


def test_deep_json_and_many_part_multipart_are_400(agent: Agent) -> None:
    from edge_sdk.device_agent.http_io import parse_multipart
    from edge_sdk.errors import HTTPError

    with AgentServer(agent, "127.0.0.1", 0) as srv:
        deep = b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        status, _, raw = _req(srv.port, "POST", "/predict", deep, {"Content-Type": "application/json"})
        assert status == 400, raw
        assert _predict(srv.port)[0] == 200
    many = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(5000))
    with pytest.raises(HTTPError) as info:
        parse_multipart(many + b"--b--\r\n", "multipart/form-data; boundary=b")
    assert info.value.status == 400 and "parts" in str(info.value)


# ---- authentication, TLS -------------------------------------------------------------------------------------------

def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route's source address is chosen
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def test_non_loopback_without_token_refuses_to_start_unless_opted_out(agent: Agent) -> None:
    from edge_sdk.httpbase import HTTPSecurity

    with pytest.raises(EdgeSDKError) as info:
        AgentServer(agent, "0.0.0.0", 0)
    msg = str(info.value)
    assert "\n" not in msg and "token" in msg and "--http-token-file" in msg
    srv = AgentServer(agent, "0.0.0.0", 0, security=HTTPSecurity(allow_insecure=True))
    srv.shutdown()
    srv = AgentServer(agent, "0.0.0.0", 0, security=HTTPSecurity(token=TOKEN))
    srv.shutdown()


def test_token_from_file_or_env_guards_every_route_but_liveness(agent: Agent, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.httpbase import HTTPSecurity

    (tmp_path / "token").write_text(TOKEN + "\n")
    sec = HTTPSecurity.load(token_file=tmp_path / "token")
    assert sec.token == TOKEN
    monkeypatch.setenv("EDGE_TEST_TOKEN", TOKEN)
    assert HTTPSecurity.load(token_env="EDGE_TEST_TOKEN").token == TOKEN
    for bad in ({"token_env": "EDGE_TEST_UNSET_VAR"}, {"token_file": tmp_path / "missing"}):
        with pytest.raises(EdgeSDKError) as info:
            HTTPSecurity.load(**bad)
        assert "\n" not in str(info.value)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(EdgeSDKError, match="at least"):
        HTTPSecurity.load(token_file=tmp_path / "short")
    with AgentServer(agent, "127.0.0.1", 0, security=sec) as srv:
        status, headers, raw = _req(srv.port, "POST", "/predict", _jpeg(), {"Content-Type": "image/jpeg"})
        assert status == 401 and "bearer" in headers["www-authenticate"].lower() and "token" in json.loads(raw)["error"]
        assert _predict(srv.port, {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        status, doc = _predict(srv.port, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, doc
        assert _req(srv.port, "GET", "/metrics")[0] == 401
        assert _req(srv.port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _req(srv.port, "GET", "/ping")[0] == 200 and _req(srv.port, "GET", "/healthz")[0] == 200
        fb = json.dumps({"prediction_id": doc["id"], "label": 1}).encode()
        assert _req(srv.port, "POST", "/feedback", fb, {"Content-Type": "application/json"})[0] == 401
        status, _, raw = _req(srv.port, "POST", "/feedback", fb, {"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {TOKEN}"})
        assert status == 200, raw


def test_feedback_from_a_non_loopback_client_needs_a_token(agent: Agent) -> None:
    from edge_sdk.httpbase import HTTPSecurity

    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with AgentServer(agent, "0.0.0.0", 0, security=HTTPSecurity(allow_insecure=True)) as srv:
        status, doc = _predict(srv.port, host=addr)
        assert status == 200
        fb = json.dumps({"prediction_id": doc["id"], "label": 1}).encode()
        status, _, raw = _req(srv.port, "POST", "/feedback", fb, {"Content-Type": "application/json"}, host=addr)
        assert status == 403 and "token" in json.loads(raw)["error"], raw
        status, _, raw = _req(srv.port, "POST", "/feedback", fb, {"Content-Type": "application/json"})
        assert status == 200, raw  # from loopback, with no token configured: allowed


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_token_together(agent: Agent, tmp_path: Path) -> None:
    from edge_sdk.httpbase import HTTPSecurity

    cert, key = _self_signed(tmp_path)
    with pytest.raises(EdgeSDKError) as info:
        HTTPSecurity(tls_cert=str(cert)).ssl_context()
    assert "\n" not in str(info.value) and "key" in str(info.value)
    ctx = ssl.create_default_context(cafile=str(cert))
    with AgentServer(agent, "127.0.0.1", 0, security=HTTPSecurity(token=TOKEN, tls_cert=str(cert),
                                                                  tls_key=str(key))) as srv:
        assert srv.url.startswith("https://")
        status, doc = _predict(srv.port, {"Authorization": f"Bearer {TOKEN}"}, context=ctx)
        assert status == 200, doc
        assert _req(srv.port, "GET", "/ping", context=ctx)[0] == 200
        with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP to the TLS port: no answer
            _req(srv.port, "GET", "/ping", timeout=3)
        with socket.create_connection(("127.0.0.1", srv.port)) as s:  # a TLS handshake never finished: closed
            s.sendall(b"\x16\x03\x01")
            time.sleep(0.2)
        assert _req(srv.port, "GET", "/ping", context=ctx)[0] == 200


def test_agent_toml_http_security_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.device_agent.config import load_config
    from edge_sdk.errors import ConfigError

    (tmp_path / "token").write_text(TOKEN)
    cert, key = _self_signed(tmp_path)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('[http]\nhost = "0.0.0.0"\ntoken_file = "token"\ntls_cert = "cert.pem"\n'
                        'tls_key = "key.pem"\nworkers = 6\n')
    cfg = load_config(cfg_file)
    sec = cfg.http_security()
    assert sec.token == TOKEN and sec.tls_cert == str(cert) and sec.tls_key == str(key) and cfg.http_workers == 6
    monkeypatch.setenv("EDGE_TEST_TOKEN", TOKEN)
    cfg_file.write_text('[http]\ntoken_env = "EDGE_TEST_TOKEN"\ninsecure = true\n')
    cfg = load_config(cfg_file)
    assert cfg.http_security().token == TOKEN and cfg.http_security().allow_insecure
    for text, needle in (('[http]\ntoken = "abc"\n', "token_file"), ('[http]\ntoken_file = "nope"\n', "nope"),
                         ('[http]\ninsecure = "yes"\n', "true or false")):
        cfg_file.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(cfg_file)
        assert needle in str(info.value) and "\n" not in str(info.value)
