"""Agent-side telemetry: window aggregates (latency sketch, histograms, drift PSI on real photos), windows stored in
the real outbox and valid against telemetry.schema.json, feedback over HTTP on a real tiny ONNX classifier, the
[telemetry]/[mqtt] config, and `edge-sdk agent run` publishing windows to the Mosquitto at 127.0.0.1:1883.
"""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.baseline import CONFIDENCE_BINS, compute_baseline
from edge_sdk.device_agent.aggregates import WindowAggregator
from edge_sdk.device_agent.health import cpu_temperature, read_health
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings
from edge_sdk.errors import TelemetryError
from edge_sdk.schema import load_schema

jsonschema = pytest.importorskip("jsonschema")

LABELS = [f"class-{i}" for i in range(10)]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
MODEL = {"name": "tiny", "version": "7", "artifact": "onnx/fp32", "runtime": "onnxruntime"}


def _validate(doc: dict[str, Any], schema: str = "telemetry") -> None:
    jsonschema.Draft202012Validator(load_schema(schema)).validate(doc)


def _baseline(rng: np.random.Generator, channels: int = 3) -> dict[str, Any]:
    x = rng.normal(0.0, 1.0, (64, channels, 16, 16)).astype(np.float32)
    return compute_baseline(x, "NCHW", rng.normal(0, 3, (64, 10)), classifier=True)


# ---- aggregator maths ---------------------------------------------------------------------------------------

def test_latency_percentiles_match_numpy_within_sketch_accuracy() -> None:
    rng = np.random.default_rng(1)
    lat = rng.lognormal(mean=1.0, sigma=0.6, size=20_000)
    agg = WindowAggregator(None, classifier=False)
    for v in lat:
        agg.record(float(v))
    w = agg.take()
    assert w["count"] == 20_000 and w["errors"] == {} and w["confidence"] is None and w["classes"] is None
    assert w["input"] is None and w["feedback"] is None
    ms = w["latency_ms"]
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        want = float(np.quantile(lat, q))
        assert abs(ms[key] - want) <= 0.021 * want, (key, ms[key], want)
    assert ms["max"] == pytest.approx(lat.max(), rel=1e-12)
    assert ms["mean"] == pytest.approx(lat.mean(), rel=1e-9)
    assert ms["sketch"]["count"] == 20_000 and sum(ms["sketch"]["bins"].values()) == 20_000
    empty = agg.take()  # reset: a fresh, empty window
    assert empty["count"] == 0 and empty["latency_ms"]["p50"] is None and empty["latency_ms"]["max"] is None
    assert empty["latency_ms"]["sketch"]["count"] == 0


def test_confidence_classes_errors_feedback_counts() -> None:
    rng = np.random.default_rng(2)
    conf = np.concatenate([rng.uniform(0, 1, 997), [0.0, 1.0, 0.1]])
    cls = rng.integers(0, 1000, conf.size)
    agg = WindowAggregator(None, classifier=True, num_classes=1000)
    for c, k in zip(conf, cls, strict=True):
        agg.record(1.0, confidence=float(c), class_index=int(k))
    for kind in ("input", "input", "runtime", "preprocess"):
        agg.record_error(kind)
    for ok in (True, True, False):
        agg.record_feedback(ok)
    agg.record_unknown_feedback()
    with pytest.raises(ValueError, match="error kind"):
        agg.record_error("Bad Kind!")
    w = agg.take()
    want, _ = np.histogram(conf, bins=CONFIDENCE_BINS)
    assert w["confidence"]["counts"] == want.tolist() and w["confidence"]["bin_edges"] == CONFIDENCE_BINS
    assert w["confidence"]["mean"] == pytest.approx(conf.mean(), rel=1e-12)
    assert w["classes"] == {str(k): v for k, v in Counter(cls.tolist()).items()}
    assert w["errors"] == {"input": 2, "runtime": 1, "preprocess": 1} and w["count"] == conf.size
    assert w["feedback"] == {"labelled": 3, "correct": 2, "unknown_id": 1}
    nxt = agg.take()
    assert nxt["classes"] == {} and sum(nxt["confidence"]["counts"]) == 0 and nxt["confidence"]["mean"] is None
    assert nxt["errors"] == {} and nxt["feedback"] is None


@pytest.mark.parametrize("probabilities", [False, True])
def test_score_rows_give_softmax_confidence_and_classes_in_bulk(probabilities: bool) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (300, 1000)).astype(np.float32)
    e = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    rows = probs.astype(np.float32) if probabilities else logits
    agg = WindowAggregator(None, classifier=True)
    for r in rows:
        agg.record(2.0, scores=r)
    bad = logits[0].copy()
    bad[7] = np.nan
    agg.record(2.0, scores=bad)  # a NaN output is an error, not a completed inference
    w = agg.take()
    conf = probs.max(1)
    assert agg.probabilities is probabilities  # told apart from the first row
    assert w["count"] == 300 and w["errors"] == {"output": 1} and w["latency_ms"]["sketch"]["count"] == 301
    assert w["confidence"]["counts"] == np.histogram(conf, bins=CONFIDENCE_BINS)[0].tolist()
    assert w["confidence"]["mean"] == pytest.approx(conf.mean(), rel=1e-5)
    assert w["classes"] == {str(k): v for k, v in Counter(probs.argmax(1).tolist()).items()}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_input_histograms_and_moments_equal_numpy(layout: str) -> None:
    rng = np.random.default_rng(3)
    base = _baseline(rng)
    base["layout"] = layout
    agg = WindowAggregator(base, classifier=False, input_values=10**9)  # stride 1: every value enters
    xs = [rng.normal(0.3, 1.5, (1, 3, 24, 20)).astype(np.float32) for _ in range(40)]  # partly outside the edges
    for x in xs:
        agg.record(1.0, x=x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    w = agg.take()
    allx = np.concatenate(xs).transpose(1, 0, 2, 3).reshape(3, -1)
    assert w["input"]["sampled"] == 40
    for ch, got in enumerate(w["input"]["channels"]):
        edges = np.asarray(base["input_channels"][ch]["hist_edges"])
        want, _ = np.histogram(np.clip(allx[ch], edges[0], edges[-1]), bins=edges)
        assert sum(got["counts"]) == allx.shape[1]
        # float32 bin arithmetic may move a value sitting on an edge by one bin
        assert np.abs(np.asarray(got["counts"]) - want).sum() <= 4, (got["counts"], want.tolist())
        assert got["mean"] == pytest.approx(float(allx[ch].mean()), abs=1e-4)
        assert got["std"] == pytest.approx(float(allx[ch].std()), rel=1e-4)
        assert got["psi"] > 0.05  # the live data are wider and shifted
    assert w["input"]["psi_max"] == max(c["psi"] for c in w["input"]["channels"])
    batch = np.concatenate(xs[:3])  # one call with a batch of 3 counts 3 inputs
    agg.record(1.0, x=batch if layout == "NCHW" else np.ascontiguousarray(batch.transpose(0, 2, 3, 1)))
    wb = agg.take()["input"]
    assert wb["sampled"] == 3 and [sum(c["counts"]) for c in wb["channels"]] == [3 * 24 * 20] * 3
    assert wb["channels"][1]["mean"] == pytest.approx(float(batch[:, 1].mean()), abs=1e-5)


def test_uneven_bins_nan_values_sampling_and_mismatched_inputs() -> None:
    edges = [-3.0, -1.0, 0.0, 0.5, 3.0]
    base = {"layout": "NCHW", "input_channels": [{"hist_edges": edges, "hist_fractions": [0.1, 0.4, 0.2, 0.3]}]}
    agg = WindowAggregator(base, classifier=False, input_values=10**9, input_sample_every=3)
    x = np.array([-5, -2, -1, -0.5, 0, 0.2, 0.5, 1, 9, np.nan], np.float32).reshape(1, 1, 2, 5)
    for _ in range(7):  # inputs 3 and 6 are sampled
        agg.record(1.0, x=x)
    agg.record(1.0, x=np.zeros((1, 3, 2, 2), np.float32))  # 3 channels against a 1-channel baseline: ignored
    w = agg.take()
    ch = w["input"]["channels"][0]
    assert w["input"]["sampled"] == 2 and w["count"] == 8
    assert ch["counts"] == [2 * 2, 2 * 2, 2 * 2, 2 * 3]  # NaN left out; -5 and 9 in the end bins
    finite = x[np.isfinite(x)]
    assert ch["mean"] == pytest.approx(float(finite.mean()), rel=1e-6)
    json.dumps(w, allow_nan=False)
    broken = WindowAggregator({"input_channels": [{"hist_edges": [0, 0], "hist_fractions": [1]}]}, classifier=False)
    broken.record(1.0, x=x)  # an unusable hand-written baseline disables drift statistics, not the agent
    assert broken.take()["input"] is None


def test_record_and_take_from_several_threads_lose_nothing() -> None:
    rng = np.random.default_rng(4)
    agg = WindowAggregator(_baseline(rng), classifier=True)
    x = rng.normal(size=(1, 3, 16, 16)).astype(np.float32)
    windows: list[dict[str, Any]] = []
    done = threading.Event()

    def taker() -> None:
        while not done.is_set():
            windows.append(agg.take())
            time.sleep(0.002)

    def worker() -> None:
        for i in range(3000):
            agg.record(1.0, confidence=0.5, class_index=i % 7, x=x)

    t = threading.Thread(target=taker)
    t.start()
    workers = [threading.Thread(target=worker) for _ in range(4)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    done.set()
    t.join()
    windows.append(agg.take())
    assert len(windows) > 2
    assert sum(w["count"] for w in windows) == 12_000
    assert sum(sum(w["classes"].values()) for w in windows) == 12_000
    assert sum((w["input"] or {"sampled": 0})["sampled"] for w in windows) == 12_000


@pytest.fixture(scope="module")
def photo_baseline(photo_crops: np.ndarray) -> dict[str, Any]:
    """Baseline measured on the first 120 real photo crops (what the model saw at build time)."""
    return compute_baseline(photo_crops[:120], "NCHW", None, classifier=False)


def test_psi_small_for_same_photos_and_large_for_darkened(photo_crops: np.ndarray,
                                                          photo_baseline: dict[str, Any]) -> None:
    agg = WindowAggregator(photo_baseline, classifier=False)  # default strided subsample
    live = photo_crops[120:]
    for i in range(len(live)):
        agg.record(3.0, x=live[i : i + 1])
    same = agg.take()["input"]
    assert same["sampled"] == 120 and same["psi_max"] < 0.05, same["psi_max"]
    dark = (live * IMAGENET_STD + IMAGENET_MEAN) * 0.45  # night-time: the same scenes at 45 % brightness
    dark = ((dark - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    for i in range(len(dark)):
        agg.record(3.0, x=dark[i : i + 1])
    drifted = agg.take()["input"]
    assert drifted["psi_max"] > 0.2 and all(c["psi"] > 0.2 for c in drifted["channels"]), drifted["psi_max"]
    assert all(d["mean"] < s["mean"] for d, s in zip(drifted["channels"], same["channels"], strict=True))


# ---- health -------------------------------------------------------------------------------------------------

def test_health_fields_and_thermal_zones(tmp_path: Path) -> None:
    h = read_health(tmp_path, thermal_root=tmp_path / "none")
    assert h["cpu_temp_c"] is None and h["cpu_count"] >= 1 and 0 < h["disk_free_frac"] <= 1
    assert h["rss_mb"] > 10 and 0 < h["mem_used_frac"] < 1 and h["uptime_s"] > 0 and h["load1"] >= 0
    _validate({"health": h} | _minimal_window(), "telemetry")
    root = tmp_path / "thermal"
    for name, kind, temp in (("thermal_zone0", "acpitz", "30000"), ("thermal_zone1", "cpu-thermal", "47500"),
                             ("thermal_zone2", "x86_pkg_temp", "not a number")):
        (root / name).mkdir(parents=True)
        (root / name / "type").write_text(kind + "\n")
        (root / name / "temp").write_text(temp + "\n")
    assert cpu_temperature(root) == 47.5  # x86_pkg is preferred but unreadable: the CPU zone is used
    (root / "thermal_zone2" / "temp").write_text("61250\n")
    assert cpu_temperature(root) == 61.2


def _minimal_window() -> dict[str, Any]:
    agg = WindowAggregator(None, classifier=False)
    return {"schema": "edge-sdk/telemetry-window", "schema_version": "1.0", "window_id": uuid.uuid4().hex,
            "stream": uuid.uuid4().hex, "seq": 1, "fleet": "f", "device": "d", "model": MODEL, "start": time.time(),
            "end": time.time(), "dropped_windows": 0, **agg.take()}


# ---- windows through the real outbox ----------------------------------------------------------------------

def test_windows_in_outbox_are_schema_valid_and_sequenced(tmp_path: Path, photo_crops: np.ndarray,
                                                          photo_baseline: dict[str, Any]) -> None:
    settings = TelemetrySettings(enabled=True, window_s=0.2, fleet="f1", device="dev-1",
                                 outbox_path=str(tmp_path / "outbox.db"))
    with Outbox(settings.outbox_path) as outbox:
        tel = Telemetry(settings, model=MODEL, baseline=photo_baseline, classifier=True, num_classes=10,
                        outbox=outbox)
        event = tel.emit_event("model.loaded", {"artifact": "onnx/fp32"})
        _validate(event, "event")
        for i in range(5):
            tel.aggregator.record(2.0 + i, confidence=0.9, class_index=i, x=photo_crops[i : i + 1])
        tel.aggregator.record_error("runtime")
        first = tel.emit_window()
        assert first["count"] == 5 and first["errors"] == {"runtime": 1} and first["seq"] == 1
        assert first["input"]["sampled"] == 5 and first["model"] == MODEL
        idle = tel.emit_window()  # nothing happened: still a window (liveness)
        assert idle["count"] == 0 and idle["input"] is None and idle["start"] == first["end"]
        tel.start()
        time.sleep(1.1)
        tel.aggregator.record(1.0, confidence=0.2, class_index=3)
        tel.stop()  # emits the final partial window
        tel.stop()  # idempotent
        rows = outbox.pending(limit=1000)
        windows = [json.loads(r.payload) for r in rows if r.topic == "edge/f1/dev-1/telemetry"]
        events = [json.loads(r.payload) for r in rows if r.topic == "edge/f1/dev-1/events"]
        assert [e["kind"] for e in events] == ["model.loaded"]
        assert len(windows) >= 5, len(windows)
        for w in windows:
            _validate(w)
            assert w["stream"] == outbox.stream and w["fleet"] == "f1" and w["device"] == "dev-1"
        assert [w["seq"] for w in windows] == list(range(1, len(windows) + 1))
        assert len({w["window_id"] for w in windows}) == len(windows)
        assert sum(w["count"] for w in windows) == 6 and windows[-1]["classes"] == {"3": 1}
        for a, b in itertools.pairwise(windows):
            assert b["start"] == a["end"] and b["end"] >= b["start"]
        assert tel.windows_emitted == len(windows) and tel.windows_failed == 0


def test_settings_validation() -> None:
    with pytest.raises(TelemetryError, match="fleet 'a/b'"):
        TelemetrySettings(fleet="a/b")
    with pytest.raises(TelemetryError, match="window_s"):
        TelemetrySettings(window_s=0)
    with pytest.raises(TelemetryError, match="input_sample_every"):
        TelemetrySettings(input_sample_every=0)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", TelemetrySettings().device)


# ---- the agent: errors, feedback over HTTP ---------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("telemetry")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)), labels=LABELS,
                     out=d / "bundle", name="tiny", version="7", quiet=True)
    return d / "bundle"


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _post(port: int, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_agent_feeds_telemetry_and_feedback_over_http(bundle_dir: Path) -> None:
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer

    agent = Agent(bundle_dir, remember=50)
    agg = WindowAggregator(agent.bundle.manifest.baseline, classifier=True, num_classes=agent.num_classes)
    agent.set_telemetry(agg)
    assert agent.num_classes == 10 and agent.telemetry is agg
    server = AgentServer(agent, "127.0.0.1", 0)
    port = server.start()
    try:
        preds = []
        for seed in range(4):
            status, doc = _post(port, "/predict", json.dumps({"image": base64.b64encode(_png(seed)).decode()}).encode())
            assert status == 200, doc
            assert re.fullmatch(r"[0-9a-f]{32}", doc["id"])
            preds.append(doc)
        assert len({p["id"] for p in preds}) == 4
        # errors by kind: bad tensors (parser and model checks), an undecodable image
        assert _post(port, "/predict", b'{"inputs": [[1.0, 2.0], [3.0]]}')[0] == 400
        assert _post(port, "/predict", json.dumps({"inputs": np.zeros((1, 3, 8, 8)).tolist()}).encode())[0] == 400
        assert _post(port, "/predict", b"\x89PNG\r\n\x1a\n garbage", "image/png")[0] == 400
        # feedback: right (class index), wrong (label name), repeated, unknown, malformed
        p0, p1 = preds[0], preds[1]
        wrong = LABELS[(p1["class"] + 1) % 10]
        status, doc = _post(port, "/feedback", json.dumps({"prediction_id": p0["id"], "label": p0["class"]}).encode())
        assert (status, doc) == (200, {"prediction_id": p0["id"], "correct": True})
        status, doc = _post(port, "/feedback", json.dumps({"prediction_id": p1["id"], "label": wrong}).encode())
        assert (status, doc) == (200, {"prediction_id": p1["id"], "correct": False})
        status, doc = _post(port, "/feedback", json.dumps({"prediction_id": p0["id"], "label": 1}).encode())
        assert status == 404 and "unknown" in doc["error"]
        assert _post(port, "/feedback", json.dumps({"prediction_id": "f" * 32, "label": 1}).encode())[0] == 404
        for body, needle in ((b"{not json", "not valid JSON"), (b"[1]", "JSON object"),
                             (json.dumps({"label": 1}).encode(), "prediction_id"),
                             (json.dumps({"prediction_id": preds[2]["id"], "label": True}).encode(), '"label"'),
                             (json.dumps({"prediction_id": preds[2]["id"], "label": "zebra"}).encode(),
                              "unknown label 'zebra'"),
                             (json.dumps({"prediction_id": preds[2]["id"], "label": 10}).encode(), "0..9")):
            status, doc = _post(port, "/feedback", body)
            assert status == 400 and needle in doc["error"] and "\n" not in doc["error"], (body, doc)
        assert agent.feedback(preds[2]["id"], preds[2]["label"]) is True  # a 400 did not consume the id
    finally:
        server.shutdown()
    w = agg.take()
    assert w["count"] == 4 and w["errors"] == {"input": 2, "preprocess": 1}
    assert sum(w["classes"].values()) == 4 and sum(w["confidence"]["counts"]) == 4
    assert w["classes"] == {str(k): v for k, v in Counter(p["class"] for p in preds).items()}
    assert w["input"]["sampled"] == 4 and len(w["input"]["channels"]) == 3
    assert w["feedback"] == {"labelled": 3, "correct": 2, "unknown_id": 2}
    expected_conf = np.mean([p["confidence"] for p in preds])
    assert w["confidence"]["mean"] == pytest.approx(expected_conf, rel=1e-5)
    # a runtime failure (the session is closed under the agent) is counted as "runtime"
    agent.close()
    with pytest.raises(Exception, match="closed"):
        agent.predict(np.zeros((1, 3, 32, 32), np.float32))
    assert agg.take()["errors"] == {"runtime": 1}


def test_agent_remembers_a_bounded_number_of_ids(bundle_dir: Path) -> None:
    from edge_sdk.device_agent.agent import Agent

    with Agent(bundle_dir, remember=3) as agent:
        x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
        preds = [agent.predict(x) for _ in range(5)]
        assert preds[0].to_json()["id"] == preds[0].id
        assert [agent.feedback(p.id, p.class_index) for p in preds] == [None, None, True, True, True]
        assert len(agent._recent) == 0


# ---- configuration ------------------------------------------------------------------------------------------

def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "needle"), [
    ('[telemetry]\nwindow = 5\n', "'telemetry.window' is unknown"),
    ('[telemetry]\nwindow_s = 0\n', "'telemetry.window_s' must be a number of seconds"),
    ('[telemetry]\nfleet = "a b"\n', "'telemetry.fleet'"),
    ('[telemetry]\nenabled = "yes"\n', "'telemetry.enabled' must be true or false"),
    ('[telemetry]\ninput_sample_every = 0\n', "'telemetry.input_sample_every' must be >= 1"),
    ('telemetry = 3\n', "'telemetry' must be a table"),
    ('[mqtt]\nurl = "http://x"\n', "must look like mqtt://host:1883"),
    ('[mqtt]\nusername = "u"\n', "'mqtt.url' is missing"),
    ('[mqtt]\nurl = "mqtt://h"\nport = 1\n', "'mqtt.port' is unknown"),
    ('[mqtt]\nurl = "mqtt://h"\nca_file = "nope.crt"\n', "'mqtt.ca_file' names"),
    ('[mqtt]\nurl = "mqtt://h"\npassword = "a"\npassword_file = "pw"\n', "both set"),
    ('[mqtt]\nurl = "mqtt://h"\nkeepalive = 1\n', "'mqtt.keepalive' must be between 5 and 65535"),
])
def test_config_errors_are_one_line(tmp_path: Path, text: str, needle: str) -> None:
    from edge_sdk.device_agent.config import ConfigError, load_config

    (tmp_path / "pw").write_text("secret\n")
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, text))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and "agent.toml" in msg, msg


def test_config_tables_map_to_settings(tmp_path: Path) -> None:
    from edge_sdk.device_agent.config import ConfigError, load_config

    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config(_config(tmp_path, '[telemetry]\nwindow_s = 2.5\nfleet = "north"\ndevice = "cam-1"\n'
                                        'outbox = "data/out.db"\ninput_sample_every = 4\n[mqtt]\n'
                                        'url = "mqtts://broker.local:8883"\nusername = "cam-1"\npassword_file = "pw"\n'
                                        'ca_file = "ca.crt"\nkeepalive = 20\nmax_inflight = 7\n'))
    ts = cfg.telemetry_settings()
    assert ts.enabled and ts.window_s == 2.5 and (ts.fleet, ts.device) == ("north", "cam-1")
    assert ts.outbox_path == str(tmp_path / "data" / "out.db") and ts.input_sample_every == 4
    m = ts.mqtt
    assert (m.url, m.fleet, m.device, m.username, m.password) == ("mqtts://broker.local:8883", "north", "cam-1",
                                                                   "cam-1", "s3cret")
    assert m.ca_file == str(tmp_path / "ca.crt") and m.keepalive == 20 and m.max_inflight == 7 and m.tls
    off = load_config(_config(tmp_path, '[telemetry]\nenabled = false\n[mqtt]\nurl = "mqtt://h"\n'))
    assert not off.telemetry_settings().enabled and off.telemetry_settings().mqtt is None
    plain = load_config(_config(tmp_path, 'top_k = 3\n'))
    assert not plain.telemetry.enabled
    flags = plain.with_telemetry(fleet="f2", mqtt_url="mqtt://127.0.0.1:1883", window_s=1.0)
    ts2 = flags.telemetry_settings()
    assert ts2.enabled and ts2.fleet == "f2" and ts2.window_s == 1.0 and ts2.mqtt.url == "mqtt://127.0.0.1:1883"
    assert plain.with_telemetry() is plain
    with pytest.raises(ConfigError, match="fleet 'x y'"):
        plain.with_telemetry(fleet="x y")
    with pytest.raises(ConfigError, match="--mqtt"):
        plain.with_telemetry(mqtt_url="localhost:1883")


def test_device_agent_imports_no_fleet_converters_or_paho() -> None:
    code = ("import sys\nimport edge_sdk.device_agent.telemetry, edge_sdk.device_agent.config, "
            "edge_sdk.device_agent.server, edge_sdk.device_agent.agent\n"
            "print(sorted(m for m in sys.modules if m.startswith(('edge_sdk.fleet', 'edge_sdk.converters', 'paho'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---- end to end: `edge-sdk agent run` -> outbox -> publisher -> Mosquitto -> subscriber ---------------------

class _Subscriber:
    """A paho MQTT v5 client collecting every message below edge/<fleet>/ (decoded JSON)."""

    def __init__(self, fleet: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{fleet}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"edge/{fleet}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        assert self.ready.wait(10), "could not subscribe on 127.0.0.1:1883"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if not msg.payload:  # a retained status being cleared
            return
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def of(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def close(self, clear_retained: str | None = None) -> None:
        if clear_retained:  # leave no retained status of a test device on the shared broker
            self.client.publish(clear_retained, b"", qos=1, retain=True).wait_for_publish(5)
        self.client.loop_stop()
        self.client.disconnect()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_agent_run_publishes_valid_windows_to_mosquitto(bundle_dir: Path, tmp_path: Path) -> None:
    fleet, device = f"t{uuid.uuid4().hex[:8]}", "dev-e2e"
    sub = _Subscriber(fleet)
    outbox = tmp_path / "outbox.db"
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--bundle", str(bundle_dir),
                             "--http", "127.0.0.1:0", "--mqtt", "mqtt://127.0.0.1:1883", "--fleet", fleet,
                             "--device", device, "--window", "0.5", "--outbox", str(outbox)],
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        _wait(lambda: any("serving http://" in ln for ln in lines) or proc.poll() is not None, 60, "the agent")
        assert proc.poll() is None, "".join(lines)
        port = int(re.search(r"serving http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        ids = []
        for seed in range(5):
            status, doc = _post(port, "/predict", _png(seed), "image/png")
            assert status == 200, doc
            ids.append(doc)
        assert _post(port, "/feedback", json.dumps({"prediction_id": ids[0]["id"],
                                                    "label": ids[0]["label"]}).encode())[0] == 200
        assert _post(port, "/predict", b"not an image", "image/png")[0] == 400
        _wait(lambda: sum(w["count"] for w in sub.of("/telemetry")) >= 5, 30, "windows with 5 inferences")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(lines)
        _wait(lambda: any(s["state"] == "offline" for s in sub.of("/status")), 10, "the offline status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close(clear_retained=f"edge/{fleet}/{device}/status")
    windows = sub.of("/telemetry")
    for w in windows:
        _validate(w)
    by_seq = {w["seq"]: w for w in windows}  # QoS 1 may deliver a window twice: same window_id
    assert sorted(by_seq) == list(range(1, max(by_seq) + 1)) and len({w["stream"] for w in windows}) == 1
    assert len({w["window_id"] for w in windows}) == len(by_seq)
    uniq = list(by_seq.values())
    assert sum(w["count"] for w in uniq) == 5 and sum(w["errors"].get("preprocess", 0) for w in uniq) == 1
    assert sum((w["feedback"] or {}).get("correct", 0) for w in uniq) == 1
    assert all(w["fleet"] == fleet and w["device"] == device and w["model"]["name"] == "tiny" for w in uniq)
    assert sum((w["input"] or {}).get("sampled", 0) for w in uniq) == 5
    events = sub.of("/events")
    assert [e["kind"] for e in events][:1] == ["model.loaded"]
    for e in events:
        _validate(e, "event")
    states = [s["state"] for s in sub.of("/status")]
    assert states[0] == "online" and states[-1] == "offline"
    assert math.isclose(max(w["end"] for w in uniq), time.time(), abs_tol=60)
    # the final window was delivered before the clean offline: nothing stays in the outbox
    with Outbox(outbox) as box:
        assert box.stats()["pending"] == 0
