"""Health signals that clients cannot forge (issue 13): a request the agent refuses as bad input (HTTP 4xx, the
InputError family) is a *client* error, kept apart from model/runtime errors in the device's telemetry window,
in the collector's ``windows`` rows and in the canary judgement, so garbage requests cannot roll back a healthy
deployment. Feedback refused by the agent (no token) is counted, never mixed into accuracy.

Real components: a tiny ONNX classifier behind the real :class:`AgentServer`, the real outbox-backed
:class:`Telemetry`, the collector's :class:`Ingestor` on real SQLite and PostgreSQL, the canary's
:func:`window_figures` / :func:`health_checks` over rows selected as the rollout selects them.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import postgres_db, sqlite_db

from edge_sdk.device_agent.aggregates import WindowAggregator
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings
from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.collector.validate import validate_payload
from edge_sdk.fleet.lifecycle.canary import Thresholds, health_checks, window_figures
from edge_sdk.schema import load_schema
from edge_sdk.testing.synthetic import make_window

jsonschema = pytest.importorskip("jsonschema")

MODEL = {"name": "tiny", "version": "7", "artifact": "onnx/fp32", "runtime": "onnxruntime"}
ROLLOUT_SELECT = "SELECT w.device, w.count, w.errors, w.conf_mean, w.psi_max, w.payload FROM windows w "


def _validate(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(load_schema("telemetry")).validate(doc)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    ctx = sqlite_db(tmp_path) if request.param == "sqlite" else postgres_db("edge_clienterr")
    with ctx as database:
        yield database


def test_aggregator_keeps_client_input_errors_apart_from_model_errors() -> None:
    agg = WindowAggregator(None, classifier=True, num_classes=10)
    for _ in range(5):
        agg.record(1.0, confidence=0.9, class_index=1)
    for kind in ("input", "input", "preprocess", "runtime", "output"):
        agg.record_error(kind)
    agg.record_error("decode", client=True)
    agg.record_rejected_feedback()
    agg.record_rejected_feedback()
    w = agg.take()
    assert w["errors"] == {"input": 2, "preprocess": 1, "runtime": 1, "output": 1, "decode": 1}
    assert w["client_errors"] == {"input": 2, "preprocess": 1, "decode": 1}
    assert w["feedback"] == {"labelled": 0, "correct": 0, "unknown_id": 0, "rejected": 2}
    nxt = agg.take()
    assert nxt["client_errors"] == {} and nxt["feedback"] is None


def test_window_with_client_errors_is_schema_valid_and_old_windows_stay_valid(tmp_path: Path) -> None:
    settings = TelemetrySettings(fleet="f1", device="cam-1", outbox_path=str(tmp_path / "outbox.db"))
    with Outbox(settings.outbox_path) as outbox:
        tel = Telemetry(settings, model=MODEL, baseline=None, classifier=True, num_classes=10, outbox=outbox)
        tel.aggregator.record(1.0, confidence=0.5, class_index=0)
        tel.aggregator.record_error("input")
        tel.aggregator.record_rejected_feedback()
        new = tel.emit_window()
    assert new["client_errors"] == {"input": 1} and new["feedback"]["rejected"] == 1
    _validate(new)
    validate_payload("telemetry", json.dumps(new).encode(), fleet="f1", device="cam-1")
    old = {k: v for k, v in new.items() if k != "client_errors"}
    old["feedback"] = {"labelled": 1, "correct": 1}
    _validate(old)
    validate_payload("telemetry", json.dumps(old).encode(), fleet="f1", device="cam-1")


def _msg(w: dict[str, Any], received_at: float) -> Message:
    return Message(f"edge/{w['fleet']}/{w['device']}/telemetry", json.dumps(w).encode(), received_at=received_at)


def test_collector_stores_client_errors_and_the_canary_ignores_them(db: Any) -> None:
    """A canary device hammered with garbage requests: every window has 30 client errors and no model error.
    Also a device on an older agent (no ``client_errors`` field): its ``input``/``preprocess`` kinds count as
    client errors too. The reference has a 1 % model error rate; the canary must pass the error-rate check."""
    ing = Ingestor(db, retention=False)
    now = time.time()
    rng = np.random.default_rng(0)
    msgs = []
    for k in range(6):
        end = now - 60 + 10 * k
        dev = "canary-new" if k % 2 else "canary-old"
        w = make_window(fleet="f1", device=dev, model={"name": "net", "version": "2"}, start=end - 10, end=end,
                        latencies_ms=rng.lognormal(1.0, 0.2, 50), confidences=rng.uniform(0.6, 0.9, 50),
                        errors={"input": 20, "preprocess": 10}, stream=uuid.uuid5(uuid.NAMESPACE_DNS, dev).hex,
                        seq=k // 2 + 1)
        if dev == "canary-new":
            w["client_errors"] = {"input": 20, "preprocess": 10}
        msgs.append(_msg(w, end + 0.5))
        ref = make_window(fleet="f1", device="ref", model={"name": "net", "version": "1"}, start=end - 10, end=end,
                          latencies_ms=rng.lognormal(1.0, 0.2, 99), confidences=rng.uniform(0.6, 0.9, 99),
                          errors={"runtime": 1}, stream=uuid.uuid5(uuid.NAMESPACE_DNS, "ref").hex, seq=k + 1)
        msgs.append(_msg(ref, end + 0.5))
    result = ing.store_batch(msgs)
    assert result.stored == 12 and result.dead_letters == 0
    rows = db.query("SELECT device, errors, client_errors FROM windows ORDER BY device")
    assert {(r["device"], r["errors"], r["client_errors"]) for r in rows} == {
        ("canary-new", 30, 30), ("canary-old", 30, 30), ("ref", 1, 0)}
    canary = window_figures(db.query(ROLLOUT_SELECT + "WHERE w.model_version = ?", ("2",)))
    ref = window_figures(db.query(ROLLOUT_SELECT + "WHERE w.model_version = ?", ("1",)))
    assert canary["errors"] == 0 and canary["client_errors"] == 180 and canary["error_rate"] == 0.0
    assert ref["errors"] == 6 and ref["error_rate"] == pytest.approx(0.01)
    checks = health_checks(canary, ref, Thresholds())
    assert checks["error_rate"]["ok"], checks


# ---- end to end: garbage HTTP requests on a real agent ------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("clienterr")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)),
                     labels=[f"c{i}" for i in range(10)], out=d / "bundle", name="tiny", version="7", quiet=True)
    return d / "bundle"


def _post(port: int, body: bytes, ctype: str = "application/json") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_garbage_requests_do_not_fail_the_canary_error_check(bundle_dir: Path, tmp_path: Path) -> None:
    """Unauthenticated garbage on ``/predict`` (bad JSON, wrong shape, undecodable image) gets 400s; the window the
    agent emits carries them as client errors, and the canary judged from the stored windows stays healthy."""
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer

    agent = Agent(bundle_dir, remember=10)
    settings = TelemetrySettings(fleet="f1", device="canary", outbox_path=str(tmp_path / "outbox.db"))
    windows = []
    with Outbox(settings.outbox_path) as outbox:
        tel = Telemetry.for_agent(agent, settings, outbox=outbox)
        server = AgentServer(agent, "127.0.0.1", 0)
        port = server.start()
        try:
            for _ in range(3):
                for seed in range(20):
                    body = json.dumps({"image": base64.b64encode(_png(seed)).decode()}).encode()
                    assert _post(port, body) == 200
                garbage = [(b'{"inputs": [[1.0, 2.0], [3.0]]}', "application/json"),
                           (json.dumps({"inputs": np.zeros((1, 3, 8, 8)).tolist()}).encode(), "application/json"),
                           (b"\x89PNG\r\n\x1a\n garbage", "image/png"), (b"{not json", "application/json")]
                for body, ctype in garbage * 5:
                    assert _post(port, body, ctype) == 400
                windows.append(tel.emit_window())
        finally:
            server.shutdown()
            agent.close()
    for w in windows:
        _validate(w)
        assert w["count"] == 20 and sum(w["client_errors"].values()) == 20
        assert sum(w["errors"].values()) == 20  # errors keeps every kind; client_errors says which ones
    with sqlite_db(tmp_path) as db:
        assert Ingestor(db, retention=False).store_batch([_msg(w, w["end"] + 0.1) for w in windows]).stored == 3
        canary = window_figures(db.query(ROLLOUT_SELECT + "WHERE w.device = ?", ("canary",)))
    assert canary["error_rate"] == 0.0 and canary["client_errors"] == 60
    ref = {"error_rate": 0.0, "p95_ms": canary["p95_ms"], "conf_mean": canary["conf_mean"], "psi_mean": None}
    check = health_checks(canary, ref, Thresholds())["error_rate"]
    assert check["ok"] and check["value"] == 0.0, check
