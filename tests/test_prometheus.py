"""Issue 15: Prometheus the conventional way, checked with Prometheus' own tools.

* ``promtool check metrics`` (the exposition linter: base units, ``_total`` counters, real histograms) passes on the
  agent's ``/metrics`` (a real model answering HTTP requests and a folder source) and on the collector's (real
  stored telemetry);
* ``promtool check rules`` passes on the shipped ``edge_sdk/fleet/prometheus/rules.yml``, and ``promtool check
  config`` on the shipped scrape config;
* a real Prometheus server scrapes an agent and the collector every second, and
  ``histogram_quantile(0.95, sum by (le) (rate(edge_fleet_inference_seconds_bucket[5m])))`` gives the fleet-wide p95
  the collector itself reports from its merged sketches, within 10 % (the per-model-version fleet histogram
  ``edge_fleet_inference_seconds``; the per-device one has the agent's coarser standard buckets).

Prometheus is the Debian package ``prometheus`` (``make apt-deps``); without it these tests skip, except under CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collector_helpers import payload_bytes, status, window

from edge_sdk.fleet.dashboard.fleet_metrics import PROMETHEUS_DIR as PROM_DIR


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package 'prometheus': make apt-deps)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([_tool("promtool"), *args], input=stdin, capture_output=True, timeout=60, check=False)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("prom")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).normal(0, 1, (16, 3, 32, 32)).astype(np.float32))
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, preprocessing=Preprocessing(size=(32, 32)), calib=d / "calib.npy",
                     labels=[f"c{i}" for i in range(10)], out=d / "bundle", name="tiny", version="3", quiet=True)
    return d / "bundle"


@contextlib.contextmanager
def _served_agent(bundle_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """A real agent (ONNX Runtime) with telemetry, serving HTTP; 5 HTTP predictions and 3 from a folder source."""
    import cv2

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.inputs import run_source
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.server import AgentServer
    from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings

    agent = Agent(bundle_dir, runtime_order=["onnxruntime"], threads=1)
    outbox = Outbox(tmp_path / "outbox.db", synchronous="NORMAL")
    telemetry = Telemetry.for_agent(agent, TelemetrySettings(enabled=True, window_s=3600, fleet="f", device="d1",
                                                             outbox_path=str(tmp_path / "outbox.db")), outbox=outbox)
    server = AgentServer(agent, port=0)
    server.start()
    try:
        rng = np.random.default_rng(1)
        images = [cv2.imencode(".png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))[1].tobytes()
                  for _ in range(5)]
        for img in images:
            req = urllib.request.Request(f"{server.url}/predict", data=img, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(req, timeout=20) as resp:
                assert resp.status == 200
        folder = tmp_path / "inbox"
        folder.mkdir()
        for i, img in enumerate(images[:3]):
            (folder / f"{i}.png").write_bytes(img)
        assert run_source(agent, f"folder:{folder}", lambda *_: None, max_items=3) == 3
        telemetry.emit_window()  # a closed window: the drift gauge
        yield server
    finally:
        server.shutdown()
        telemetry.stop(final_window=False)
        outbox.close()
        agent.close()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_agent_metrics_pass_promtool_and_count_every_source(bundle_dir: Path, tmp_path: Path) -> None:
    _tool("promtool")
    with _served_agent(bundle_dir, tmp_path) as server:
        text = _get(f"{server.url}/metrics").decode()
    check = _promtool("check", "metrics", stdin=text.encode())
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    s = _samples(text)
    assert s['edge_agent_inferences_total{source="api"}'] == 5
    assert s['edge_agent_inferences_total{source="folder"}'] == 3
    assert s["edge_agent_inference_seconds_count"] == 8 and s['edge_agent_inference_seconds_bucket{le="+Inf"}'] == 8
    assert s["edge_agent_prediction_confidence_count"] == 8
    assert 0.1 * 8 <= s["edge_agent_prediction_confidence_sum"] <= 8
    assert s['edge_agent_requests_total{code="200",method="POST",route="/predict"}'] == 5
    assert s["edge_agent_input_psi_max"] >= 0
    assert "# TYPE edge_agent_inference_seconds histogram" in text


def test_shipped_rules_and_scrape_config_pass_promtool() -> None:
    _tool("promtool")
    rules = _promtool("check", "rules", str(PROM_DIR / "rules.yml"))
    assert rules.returncode == 0, (rules.stdout + rules.stderr).decode()
    assert b"SUCCESS" in rules.stdout
    config = _promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert config.returncode == 0, (config.stdout + config.stderr).decode()
    names = {line.split(":", 1)[1].strip() for line in (PROM_DIR / "rules.yml").read_text().splitlines()
             if line.strip().startswith("- alert:")}
    from edge_sdk.fleet.collector.alert_rules import load_rules

    rules_obj = load_rules()
    collector_rules = {n for n in ("drift", "latency_sla", "error_rate", "confidence_drop", "offline")
                       if getattr(rules_obj, n).enabled}
    assert collector_rules <= names, "every collector rule has its Prometheus twin"


class _Prometheus:
    """A real Prometheus server on a free port with its own TSDB directory."""

    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = _free_port()
        scrape = "\n".join(f"  - job_name: {job}\n    honor_labels: true\n    static_configs:\n"
                           f"      - targets: ['{target}']" for job, target in targets.items())
        cfg = tmp / "prometheus.yml"
        cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n"
                       f"  - {PROM_DIR / 'rules.yml'}\nscrape_configs:\n{scrape}\n")
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [_tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(f"{self.url}/-/ready"):
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = json.loads(_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, expr: str, want: Any, timeout: float = 30.0) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(expr)
            if v is not None and want(v):
                return v
            assert time.monotonic() < deadline, f"{expr} = {v}"
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def test_prometheus_scrapes_agent_and_collector_and_computes_the_fleet_p95(bundle_dir: Path, tmp_path: Path) -> None:
    _tool("prometheus")
    from edge_sdk.fleet.collector.ingest import Ingestor, Message
    from edge_sdk.fleet.dashboard import views
    from edge_sdk.fleet.dashboard.server import CollectorHTTP
    from edge_sdk.fleet.db import Database

    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate()
    ingestor = Ingestor(db)
    fleet, devices = "plant", [f"cam-{i:02d}" for i in range(20)]
    now = time.time()
    ingestor.store_batch([Message(f"edge/{fleet}/{d}/status", payload_bytes(status(fleet, d, ts=now)), now)
                          for d in devices])
    stack = contextlib.ExitStack()
    with stack:
        stack.callback(db.close)
        http = CollectorHTTP(db, port=0)  # its counters start now: the devices are known, at zero
        http.start()
        stack.callback(http.shutdown)
        server = stack.enter_context(_served_agent(bundle_dir, tmp_path))
        prom = _Prometheus(tmp_path, {"edge-collector": f"127.0.0.1:{http.port}",
                                      "edge-agents": f"127.0.0.1:{server.port}"})
        stack.callback(prom.stop)
        # the zero counts are scraped before any window arrives, so rate() sees the whole increase
        prom.wait(f'count(edge_device_inference_seconds_count{{fleet="{fleet}"}})', lambda v: v == len(devices))
        prom.wait(f'count(edge_fleet_inference_seconds_count{{fleet="{fleet}"}})', lambda v: v == 1)
        prom.wait('sum(edge_agent_inferences_total)', lambda v: v == 8)
        text = _get(f"{http.url}/metrics").decode()
        check = _promtool("check", "metrics", stdin=text.encode())
        assert check.returncode == 0, (check.stdout + check.stderr).decode()

        rng = np.random.default_rng(7)
        batch, total, t = [], 0, time.time()
        for k, d in enumerate(devices):  # devices of different speeds: the fleet p95 is not any device's p95
            median = 4.0 * (1.15 ** k)
            for w in range(3):
                lat = rng.lognormal(np.log(median), 0.35, 60).tolist()
                total += len(lat)
                batch.append(Message(f"edge/{fleet}/{d}/telemetry", payload_bytes(window(
                    fleet, d, seq=w + 1, end=t - 20 + 10 * w, latency_ms=lat, errors={"runtime": 1})), t))
        ingestor.store_batch(batch)
        prom.wait(f'sum(edge_device_inference_seconds_count{{fleet="{fleet}"}})', lambda v: v == total)
        prom.wait(f'sum(edge_fleet_inference_seconds_count{{fleet="{fleet}"}})', lambda v: v == total)
        time.sleep(2.5)  # two more scrapes of the same totals
        prom_p95_s = prom.value(f'histogram_quantile(0.95, sum by (le) '
                                f'(rate(edge_fleet_inference_seconds_bucket{{fleet="{fleet}"}}[5m])))')
        [model] = views.model_versions(db, fleet)
        own_p95_s = model["p95_ms"] / 1000.0
        print(f"\nfleet p95: Prometheus {prom_p95_s * 1000:.2f} ms, collector (merged sketches) "
              f"{own_p95_s * 1000:.2f} ms, ratio {prom_p95_s / own_p95_s:.3f}; {total} inferences on "
              f"{len(devices)} devices")
        assert prom_p95_s == pytest.approx(own_p95_s, rel=0.10)
        assert prom.value(f'sum(edge_device_errors_total{{fleet="{fleet}",cause="model"}})') == 3 * len(devices)
        assert prom.value('edge_agent_inferences_total{source="folder"}') == 3
        assert prom.value("sum(edge_fleet_devices)") == len(devices)
        groups = json.loads(_get(f"{prom.url}/api/v1/rules"))["data"]["groups"]
        assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}, groups
