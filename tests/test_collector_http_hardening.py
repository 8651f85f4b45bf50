"""The collector's HTTP and the bundle server under issue 13, on a real SQLite fleet database.

* bearer token (or HTTP Basic with the token as password, for browsers) on everything but ``/healthz`` and the
  bundle downloads; a non-loopback address without a token refuses to start unless opted out;
* ``/api/dead_letters/<id>``: one payload, capped (404 unknown, 400 not an integer); the list limit is capped;
* bundles are served only while some fleet is meant to run them (the active version, the version and the
  rollback target of a fleet's latest deployment): candidates and retired versions are 404.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import sqlite_db

from edge_sdk.errors import EdgeSDKError
from edge_sdk.fleet.dashboard.server import CollectorHTTP

TOKEN = "collector-token-for-tests-0123456789"


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    with sqlite_db(tmp_path) as database:
        yield database


def test_collector_token_bearer_or_basic_and_open_healthz(db: Any) -> None:
    from edge_sdk.httpbase import HTTPSecurity

    with pytest.raises(EdgeSDKError) as info:
        CollectorHTTP(db, "0.0.0.0", 0)
    assert "\n" not in str(info.value) and "--http-token-file" in str(info.value)
    CollectorHTTP(db, "0.0.0.0", 0, security=HTTPSecurity(allow_insecure=True)).shutdown()
    with CollectorHTTP(db, "127.0.0.1", 0, security=HTTPSecurity(token=TOKEN)) as srv:
        for path in ("/api/devices", "/metrics", "/", "/api/dead_letters"):
            status, headers, _ = _get(srv.port, path)
            assert status == 401 and "basic" in headers["www-authenticate"].lower(), path
            assert _get(srv.port, path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert _get(srv.port, "/api/devices", {"Authorization": f"Basic {basic}"})[0] == 200
        wrong = base64.b64encode(b"anyone:nope").decode()
        assert _get(srv.port, "/api/devices", {"Authorization": f"Basic {wrong}"})[0] == 401
        assert _get(srv.port, "/healthz")[0] == 200


def test_dead_letter_by_id_and_capped_list(db: Any) -> None:
    from edge_sdk.fleet.dashboard import views

    db.executemany("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
                   [(time.time(), "edge/f1/cam-1/telemetry", "not JSON", b"y" * 200_000),
                    (time.time(), "edge/f1/cam-2/telemetry", "schema", b'{"a": 1}')])
    ids = [r["id"] for r in db.query("SELECT id FROM dead_letters ORDER BY id")]
    with CollectorHTTP(db, "127.0.0.1", 0) as srv:
        status, _, raw = _get(srv.port, f"/api/dead_letters/{ids[1]}")
        assert status == 200, raw
        doc = json.loads(raw)
        assert doc["payload"] == '{"a": 1}' and doc["truncated"] is False and doc["reason"] == "schema"
        doc = json.loads(_get(srv.port, f"/api/dead_letters/{ids[0]}")[2])
        assert doc["truncated"] is True and doc["size"] == 200_000 and len(doc["payload"]) == views.PAYLOAD_MAX_BYTES
        assert _get(srv.port, "/api/dead_letters/999999")[0] == 404
        status, _, raw = _get(srv.port, "/api/dead_letters/abc")
        assert status == 400 and "integer" in json.loads(raw)["error"]
        over = views.DEAD_LETTERS_MAX_LIMIT + 1
        status, _, raw = _get(srv.port, f"/api/dead_letters?limit={over}")
        assert status == 400 and str(views.DEAD_LETTERS_MAX_LIMIT) in json.loads(raw)["error"]
        listed = json.loads(_get(srv.port, f"/api/dead_letters?limit={views.DEAD_LETTERS_MAX_LIMIT}")[2])
        assert [d["id"] for d in listed["dead_letters"]] == ids[::-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle: the tiny CNN converted to ONNX fp32, named tiny:1."""
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("collector_http")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, out=d / "bundle", name="tiny", version="1", quiet=True)
    return d / "bundle"


def make_bundle(built: Path, dest: Path, version: str) -> Path:
    """A copy of the built bundle under another version."""
    from edge_sdk.bundle import Bundle

    out = Path(shutil.copytree(built, dest))
    b = Bundle.load(out)
    b.manifest.version = version
    b.save()
    return out


def test_bundle_server_serves_only_versions_a_fleet_is_meant_to_run(db: Any, built: Path, tmp_path: Path) -> None:
    from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer, bundle_path
    from edge_sdk.fleet.lifecycle.registry import Registry
    from edge_sdk.fleet.lifecycle.rollout import Rollout

    reg = Registry(db, tmp_path / "store")
    for v in ("1", "2", "3", "4"):
        reg.add(make_bundle(built, tmp_path / f"src{v}", v))
    reg.activate("tiny", "1", "the fleet runs it")
    reg.promote("tiny", "2", force_reason="no holdout in this test", allow_unsigned=True)
    sent: list[tuple[str, Any, bool]] = []
    with BundleHTTPServer(reg) as srv, CollectorHTTP(db, "127.0.0.1", 0) as col:
        def status(v: str, port: int = srv.server_address[1]) -> int:
            return _get(port, bundle_path("tiny", v))[0]

        assert [status(v) for v in "1234"] == [200, 404, 404, 404]  # a candidate or a promoted-only canary: 404
        ro = Rollout(db, lambda topic, payload, retain: sent.append((topic, payload, retain)), srv.url,
                     registry=reg, allow_unsigned=True)
        ro.start("tiny", "2", "f1", devices=["d1"])
        assert [status(v) for v in "1234"] == [200, 200, 404, 404]
        assert [status(v, col.port) for v in "1234"] == [200, 200, 404, 404]  # the collector's /bundles/ too
        reg.set_state("tiny", "3", "retired", "never shipped")
        assert status("3") == 404


def test_candidate_is_served_once_active(db: Any, built: Path, tmp_path: Path) -> None:
    from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer, bundle_path
    from edge_sdk.fleet.lifecycle.registry import Registry

    reg = Registry(db, tmp_path / "store")
    reg.add(make_bundle(built, tmp_path / "src", "9"))
    with BundleHTTPServer(reg) as srv:
        assert _get(srv.server_address[1], bundle_path("tiny", "9"))[0] == 404
        reg.activate("tiny", "9", "now it runs")
        assert _get(srv.server_address[1], bundle_path("tiny", "9"))[0] == 200
