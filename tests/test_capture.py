"""Issue 18, item 1: data capture on the device. Real agents (DeviceRunner with a real ONNX model, its HTTP API and
telemetry), a real collector HTTP server with a SampleStore on SQLite and PostgreSQL; no mocks.

- each policy captures what it should and nothing else: random (rate), low_confidence (exactly the predictions under
  the threshold), drift (inputs of the window whose PSI is over the limit, none of the calm window's), and
  feedback_disagree (exactly the /feedback answers that disagree, with their label);
- a /feedback label travels with a captured sample, also as a label update after the upload;
- the on-device cap holds under a flood (oldest dropped and counted); a stalled writer drops (and counts) instead of
  blocking inference;
- with the collector down, nothing is lost, the cap holds, the device restarts, and uploads resume when the collector
  comes back; a sample the collector already has is acknowledged as a duplicate; a wrong token stores nothing.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_helpers import free_port

from edge_sdk.device_agent.capture import Capture, CaptureSettings
from edge_sdk.device_agent.config import AgentConfig, ConfigError, load_config
from edge_sdk.device_agent.runner import DeviceRunner, RunnerConfig
from edge_sdk.device_agent.telemetry import TelemetrySettings

pytest.importorskip("onnxruntime")
TOKEN = "capture-test-token-0123456789"
LABELS = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("capture")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    # the baseline's inputs: noise images as the preprocessing makes them (so noise PNGs do not drift, dark ones do)
    val = np.random.default_rng(7).integers(0, 256, (64, 3, 32, 32)).astype(np.float32) / 255.0
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)), labels=LABELS,
                     val=val, out=d / "bundle", name="tiny", version="7", quiet=True)
    return d / "bundle"


def _png(seed: int, dark: bool = False, size: tuple[int, int] = (40, 48)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 20 if dark else 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _runner(bundle: Path, tmp: Path, *, telemetry: bool = False, http: bool = False, **capture: Any) -> DeviceRunner:
    tel = TelemetrySettings(enabled=telemetry, window_s=3600, fleet="capfleet", device="cam-1",
                            outbox_path=str(tmp / "outbox.db"))
    cs = CaptureSettings(enabled=True, **{"dir": str(tmp / "capture"), **capture})
    cfg = AgentConfig(bundle=str(bundle), port=0, telemetry=tel, capture=cs)
    return DeviceRunner(RunnerConfig(agent=cfg, serve_http=http, flush_s=0), say=lambda _: None).start()


def _stored(runner: DeviceRunner) -> dict[str, dict[str, Any]]:
    """The device's stored samples by sha256 (after the queue is written)."""
    assert runner.capture.flush(10)
    return {r["sha256"]: r for r in runner.capture.store.pending(10_000)}


def _post(port: int, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- configuration -------------------------------------------------------------------------------------------

def test_capture_table_in_agent_toml(tmp_path: Path) -> None:
    token = tmp_path / "t.token"
    token.write_text(TOKEN)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('[capture]\nsample_rate = 0.5\nlow_confidence = 0.4\ndrift = true\nfeedback_disagree = true\n'
                        'dir = "cap"\nmax_bytes = 1000000\nupload_url = "http://127.0.0.1:9"\n'
                        'token_file = "t.token"\nupload_interval_s = 2\n')
    cs = load_config(cfg_file).capture
    assert cs.enabled and cs.policies() == ["random", "low_confidence", "drift", "feedback_disagree"]
    assert cs.dir == str(tmp_path / "cap") and cs.token_file == str(token) and cs.max_bytes == 1_000_000
    assert not AgentConfig().capture.enabled  # off by default
    for body, needle in (("[capture]\nsample_rate = 2\n", "between 0 and 1"),
                         ("[capture]\nenabled = true\n", "no policy is on"),
                         ("[capture]\nsample_rate = 0.1\nbogus = 1\n", "capture.bogus"),
                         ("[capture]\nsample_rate = 0.1\nmax_bytes = 10\nmax_sample_bytes = 20\n", "max_sample_bytes"),
                         ("[capture]\nsample_rate = 0.1\nupload_url = \"ftp://x\"\n", "http"),
                         ("[capture]\nsample_rate = 0.1\ntoken_file = \"missing\"\n", "not a readable file")):
        cfg_file.write_text(body)
        with pytest.raises(ConfigError, match=needle) as info:
            load_config(cfg_file)
        assert "\n" not in str(info.value)


# ---- policies ------------------------------------------------------------------------------------------------

def test_random_policy_takes_its_rate_and_records_the_prediction(bundle_dir: Path, tmp_path: Path) -> None:
    r = _runner(bundle_dir, tmp_path, sample_rate=1.0)
    try:
        images = [_png(i) for i in range(12)]
        preds = [r.current_agent().predict_image(b) for b in images]
        stored = _stored(r)
        assert set(stored) == {_sha(b) for b in images}
        for b, p in zip(images, preds, strict=True):
            row = stored[_sha(b)]
            assert row["ext"] == "png" and r.capture.store.read(row["sha256"], "png") == b
            m = row["meta"]
            assert (m["policy"], m["prediction"], m["model_name"], m["model_version"], m["fleet"], m["device"]) == \
                ("random", p.class_index, "tiny", "7", "capfleet", "cam-1")
            assert m["confidence"] == pytest.approx(p.confidence) and abs(m["captured_at"] - time.time()) < 60
        assert r.capture.stats()["captured"] == {"random": 12, "low_confidence": 0, "drift": 0,
                                                 "feedback_disagree": 0}
        # a tensor input is captured as .npy of the tensor; a fractional rate takes about that fraction
        x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
        r.current_agent().predict(x)
        npy = [row for row in _stored(r).values() if row["ext"] == "npy"]
        assert len(npy) == 1
        assert np.array_equal(np.load(io.BytesIO(r.capture.store.read(npy[0]["sha256"], "npy"))), x)
    finally:
        r.stop()
    r = _runner(bundle_dir, tmp_path / "quarter", sample_rate=0.25)
    try:
        x = np.random.default_rng(1).random((400, 1, 3, 32, 32), dtype=np.float32)
        for i in range(400):
            r.current_agent().predict(x[i])
        n = len(_stored(r))
        assert 60 <= n <= 140, n  # binomial(400, 0.25): mean 100, sd 8.7
    finally:
        r.stop()


def test_low_confidence_captures_exactly_the_uncertain_predictions(bundle_dir: Path, tmp_path: Path) -> None:
    from edge_sdk.device_agent.agent import Agent

    images = [_png(100 + i) for i in range(30)]
    with Agent(bundle_dir) as plain:
        conf = [plain.predict_image(b).confidence for b in images]
    threshold = float(np.median(conf))
    r = _runner(bundle_dir, tmp_path, low_confidence=threshold)
    try:
        for b in images:
            r.current_agent().predict_image(b)
        stored = _stored(r)
        want = {_sha(b) for b, c in zip(images, conf, strict=True) if c < threshold}
        assert 5 <= len(want) < 30 and set(stored) == want
        assert {row["meta"]["policy"] for row in stored.values()} == {"low_confidence"}
        assert all(row["meta"]["confidence"] < threshold for row in stored.values())
    finally:
        r.stop()


def test_drift_captures_inputs_of_the_drifting_window_only(bundle_dir: Path, tmp_path: Path) -> None:
    r = _runner(bundle_dir, tmp_path, telemetry=True, drift=True, drift_psi=0.2, drift_per_window=4)
    try:
        calm = [_png(200 + i, size=(32, 32)) for i in range(20)]
        dark = [_png(300 + i, dark=True, size=(32, 32)) for i in range(20)]
        for b in calm:
            r.current_agent().predict_image(b)
        w1 = r.telemetry.emit_window()
        assert _stored(r) == {}
        for b in dark:
            r.current_agent().predict_image(b)
        w2 = r.telemetry.emit_window()
        assert w1["input"]["psi_max"] < 0.2 < w2["input"]["psi_max"], (w1["input"]["psi_max"], w2["input"]["psi_max"])
        stored = _stored(r)
        assert len(stored) == 4 and set(stored) <= {_sha(b) for b in dark}
        assert {row["meta"]["policy"] for row in stored.values()} == {"drift"}
        r.telemetry.emit_window()  # an idle window after it: nothing more
        assert len(_stored(r)) == 4
    finally:
        r.stop()


def test_drift_needs_telemetry(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs telemetry"):
        _runner(bundle_dir, tmp_path, drift=True)


def test_feedback_disagree_captures_exactly_the_corrected_predictions(bundle_dir: Path, tmp_path: Path) -> None:
    r = _runner(bundle_dir, tmp_path, http=True, feedback_disagree=True)
    port = r.server.port
    try:
        images = [_png(400 + i) for i in range(10)]
        preds = []
        for b in images:
            status, doc = _post(port, "/predict", {"image": base64.b64encode(b).decode()})
            assert status == 200, doc
            preds.append(doc)
        want = {}
        for i, (b, p) in enumerate(zip(images, preds, strict=True)):
            label = p["class"] if i % 3 == 0 else (p["class"] + 1) % 10  # agree on 0, 3, 6, 9
            status, doc = _post(port, "/feedback", {"prediction_id": p["id"], "label": LABELS[label]})
            assert status == 200 and doc["correct"] == (i % 3 == 0)
            if i % 3:
                want[_sha(b)] = label
        stored = _stored(r)
        assert {s: row["label"] for s, row in stored.items()} == want
        assert all(row["meta"]["policy"] == "feedback_disagree" and row["meta"]["prediction"] is not None
                   for row in stored.values())
    finally:
        r.stop()


def test_feedback_labels_a_sample_captured_by_another_policy(bundle_dir: Path, tmp_path: Path) -> None:
    r = _runner(bundle_dir, tmp_path, sample_rate=1.0)
    try:
        b = _png(500)
        p = r.current_agent().predict_image(b)
        assert r.current_agent().feedback(p.id, 4) is not None
        row = _stored(r)[_sha(b)]
        assert row["meta"]["policy"] == "random" and row["label"] == 4
    finally:
        r.stop()


# ---- bounded store -------------------------------------------------------------------------------------------

def test_cap_holds_under_a_flood_oldest_dropped_and_counted(bundle_dir: Path, tmp_path: Path) -> None:
    size = len(_png(0))
    cap = 10 * size + size // 2
    r = _runner(bundle_dir, tmp_path, sample_rate=1.0, max_bytes=cap, max_sample_bytes=cap, queue_size=10_000)
    images = [_png(1000 + i) for i in range(200)]
    highest = [0]

    def flood(part: list[bytes]) -> None:
        for b in part:
            r.current_agent().predict_image(b)
            highest[0] = max(highest[0], r.capture.store.total_bytes)

    try:
        threads = [threading.Thread(target=flood, args=(images[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = _stored(r)
        st = r.capture.stats()
        on_disk = sorted(p for p in (tmp_path / "capture" / "blobs").iterdir())
        assert st["stored_bytes"] <= cap and highest[0] <= cap and sum(p.stat().st_size for p in on_disk) <= cap
        assert len(on_disk) == len(stored) == st["stored"] >= 9
        assert st["captured"]["random"] == 200 and st["dropped"] == 200 - st["stored"]
        assert st["queue_dropped"] == 0
        # one by one: the survivors are exactly the newest
        more = [_png(5000 + i) for i in range(30)]
        for b in more:
            r.current_agent().predict_image(b)
        stored = _stored(r)
        assert list(stored) == [_sha(b) for b in more[-len(stored):]] and 9 <= len(stored) <= 10
        st = r.capture.stats()
        assert st["dropped"] == 230 - st["stored"] and st["stored_bytes"] <= cap
    finally:
        r.stop()
    # the drop counter survives a restart
    r = _runner(bundle_dir, tmp_path, sample_rate=1.0, max_bytes=cap, max_sample_bytes=cap)
    try:
        assert r.capture.stats()["dropped"] == st["dropped"] and r.capture.stats()["stored"] == st["stored"]
    finally:
        r.stop()


def test_a_stalled_writer_drops_and_counts_never_blocks_inference(bundle_dir: Path, tmp_path: Path) -> None:
    from edge_sdk.device_agent.agent import Agent

    cap = Capture(CaptureSettings(enabled=True, dir=str(tmp_path / "c"), sample_rate=1.0, queue_size=5),
                  fleet="f", device="d")  # not started: the writer never drains the queue
    with Agent(bundle_dir) as agent:
        agent.set_capture(cap)
        x = np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32)
        t0 = time.perf_counter()
        for _ in range(100):
            agent.predict(x)
        elapsed = time.perf_counter() - t0
    st = cap.stats()
    assert st["queued"] == 5 and st["queue_dropped"] == 95 and elapsed < 5
    cap.store.close()


# ---- upload: outage, restart, dedup, auth --------------------------------------------------------------------

def _collector(db: Any, port: int, samples_dir: Path) -> Any:
    from edge_sdk.fleet.dashboard.server import CollectorHTTP
    from edge_sdk.fleet.samples import SampleStore
    from edge_sdk.httpbase import HTTPSecurity

    http_ = CollectorHTTP(db, "127.0.0.1", port, samples=SampleStore(db, samples_dir),
                          security=HTTPSecurity(TOKEN))
    http_.start()
    return http_


def test_collector_down_nothing_lost_cap_held_uploads_resume(bundle_dir: Path, tmp_path: Path, db_url: str) -> None:
    from edge_sdk.fleet.db import Database

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    size = len(_png(0))
    cap = 40 * size
    kw = {"sample_rate": 1.0, "upload_url": f"http://127.0.0.1:{port}", "token_file": str(token),
          "upload_interval_s": 0.05, "max_bytes": cap}
    images = [_png(2000 + i) for i in range(30)]
    r = _runner(bundle_dir, tmp_path, **kw)
    try:  # the collector is down: every upload fails, the samples stay under the cap
        preds = [r.current_agent().predict_image(b) for b in images[:20]]
        _wait(lambda: r.capture.stats()["upload_failures"] >= 3, 20, "failed uploads")
        assert len(_stored(r)) == 20 and r.capture.stats()["stored_bytes"] <= cap
        assert "127.0.0.1" in (r.capture.last_upload_error or "")
    finally:
        r.stop()  # the device restarts while the collector is still down
    r = _runner(bundle_dir, tmp_path, **kw)
    db = Database.connect(db_url)
    http_ = None
    try:
        assert len(_stored(r)) == 20
        for b in images[20:]:
            r.current_agent().predict_image(b)
        assert len(_stored(r)) == 30 and r.capture.stats()["stored_bytes"] <= cap
        # the collector already holds one of them (a crash after its answer): a duplicate, acknowledged
        dup = images[5]
        from edge_sdk.fleet.samples import SampleStore, check_meta

        meta = r.capture.store.pending(100)[5]["meta"]
        assert meta["sha256"] == _sha(dup)
        SampleStore(db, tmp_path / "samples").add(check_meta({**meta, "label": None}), dup)
        http_ = _collector(db, port, tmp_path / "samples")  # the collector comes back
        _wait(lambda: r.capture.store.count() == 0, 30, "uploads to resume")
        rows = db.query("SELECT sha256, policy, device, model_version, label FROM samples WHERE fleet = 'capfleet'")
        assert {row["sha256"] for row in rows} == {_sha(b) for b in images} and len(rows) == 30
        st = r.capture.stats()
        assert st["upload_duplicates"] == 1 and st["uploaded"] == 29
        assert st["dropped"] == 0 and st["rejected"] == 0
        # feedback after the upload travels as a label update
        assert len(preds) == 20  # the first runner's predictions went with it: feed back a new one
        late = _png(2100)
        p = r.current_agent().predict_image(late)
        _wait(lambda: db.query("SELECT COUNT(*) AS n FROM samples WHERE sha256 = ?", (_sha(late),))[0]["n"] == 1
              and r.capture.store.count() == 0, 30, "the upload")
        r.current_agent().feedback(p.id, 6)
        _wait(lambda: db.query("SELECT label FROM samples WHERE sha256 = ?", (_sha(late),))[0]["label"] == 6,
              30, "the label update")
        # the collector stores the label before the device reads its answer and counts it
        _wait(lambda: r.capture.stats()["labels_sent"] == 1, 10, "the device to count the label it sent")
    finally:
        r.stop()
        if http_ is not None:
            http_.shutdown()
        db.close()


def test_a_wrong_token_stores_nothing_and_keeps_the_samples(bundle_dir: Path, tmp_path: Path) -> None:
    from edge_sdk.fleet.db import Database

    token = tmp_path / "token"
    token.write_text("another-token-0123456789abcdef")
    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    http_ = _collector(db, 0, tmp_path / "samples")
    r = _runner(bundle_dir, tmp_path, sample_rate=1.0, upload_url=http_.url, token_file=str(token),
                upload_interval_s=0.05)
    try:
        r.current_agent().predict_image(_png(3000))
        _wait(lambda: r.capture.stats()["upload_failures"] >= 2, 20, "refused uploads")
        assert "401" in (r.capture.last_upload_error or "")
        assert r.capture.store.count() == 1
        assert db.query("SELECT COUNT(*) AS n FROM samples")[0]["n"] == 0
        assert not any(p.is_file() for p in (tmp_path / "samples").rglob("*"))
    finally:
        r.stop()
        http_.shutdown()
        db.close()
