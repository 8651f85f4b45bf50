"""The collector's HTTP side on a real SQLite database: JSON API, /metrics, static files, errors, and the dashboard
rendered by headless Chromium (DOM shows the devices and a chart; screenshot in tests/_artifacts/dashboard.png)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import fill_demo_fleet, sqlite_db

from edge_sdk.fleet.dashboard.server import CollectorHTTP

FLEET = "plant-7"
ARTIFACTS = Path(__file__).resolve().parent / "_artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000", "--hide-scrollbars"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[CollectorHTTP, dict[str, Any]]]:
    with sqlite_db(tmp_path) as db:
        filled = fill_demo_fleet(db, FLEET, time.time())
        server = CollectorHTTP(db, port=0, stats=lambda: {"received": 153, "stored": 150, "queue": 4, "lag_p99_s": 0.25,
                                                          "protocol": "5", "dead_letters": {"schema": 2, "json": 1}})
        server.start()
        try:
            yield server, filled
        finally:
            server.shutdown()


def _get(server: CollectorHTTP, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path)  # sent as is: no client-side normalisation of ".."
        res = conn.getresponse()
        return res.status, res.getheader("Content-Type", ""), res.read()
    finally:
        conn.close()


def _json(server: CollectorHTTP, path: str, status: int = 200) -> dict[str, Any]:
    code, ctype, body = _get(server, path)
    assert (code, ctype) == (status, "application/json"), (path, code, body[:200])
    return json.loads(body)


def test_api_metrics_static_and_errors(served: tuple[CollectorHTTP, dict[str, Any]], tmp_path: Path) -> None:
    server, filled = served
    devices = _json(server, "/api/devices")["devices"]
    assert [d["device"] for d in devices] == filled["devices"]
    assert [d["state"] for d in devices] == ["online", "online", "offline"]
    assert all(d["p95_ms"] > d["p50_ms"] > 0 for d in devices)
    assert {m["model_version"] for m in _json(server, f"/api/models?fleet={FLEET}")["models"]} == {"1", "2"}
    series = _json(server, f"/api/devices/{FLEET}/cam-02/series?since=3600&max_points=20")
    assert len(series["points"]) == 20 and sum(p["windows"] for p in series["points"]) == 60
    assert series["points"][-1]["psi_max"] > 0.2 > series["points"][0]["psi_max"]
    assert [a["rule"] for a in _json(server, "/api/alerts?state=open")["alerts"]] == ["drift", "offline"]
    assert _json(server, "/api/dead_letters")["dead_letters"] == []
    assert _json(server, "/healthz") == {"status": "ok", "db": "sqlite"}

    code, ctype, body = _get(server, "/metrics")
    text = body.decode()
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert 'edge_fleet_devices{state="online"} 2' in text and 'edge_fleet_devices{state="offline"} 1' in text
    assert f'edge_device_up{{device="cam-03",fleet="{FLEET}"}} 0' in text  # prometheus_client sorts labels
    # issue 15: histograms (tests/test_prometheus.py checks them), counters from the server's start, alerts per device
    assert f'edge_device_inference_seconds_bucket{{device="cam-02",fleet="{FLEET}",le="+Inf"}} 0' in text
    assert re.search(rf'edge_device_psi_max{{device="cam-02",fleet="{FLEET}"}} (\d\.\d+)', text)
    assert re.search(rf'edge_alerts_open{{device="[^"]*",fleet="{FLEET}",rule="drift",severity="warning"}} 1', text)
    assert re.search(rf'edge_alerts_open{{device="[^"]*",fleet="{FLEET}",rule="offline",severity="critical"}} 1', text)
    assert "edge_collector_received_total 153" in text and "edge_collector_dead_letters_schema_total 2" in text
    assert "# TYPE edge_collector_stored_total counter" in text
    assert "# TYPE edge_collector_queue gauge" in text and "edge_collector_lag_p99_seconds 0.25" in text
    assert "protocol" not in text

    code, ctype, body = _get(server, "/")
    assert code == 200 and ctype.startswith("text/html") and b'id="devices"' in body
    code, ctype, _ = _get(server, "/static/dashboard.js")
    assert code == 200 and ctype.startswith("text/javascript")
    for path in ("/static/../views.py", "/static/%2e%2e/http.py", "/static/..%2f..%2fdb.py", "/static//etc/passwd",
                 "/static/nope.js", "/static/"):
        assert "error" in _json(server, path, 404), path
    assert "no route /nope" in _json(server, "/nope", 404)["error"]
    assert "no API route" in _json(server, "/api/devices/x", 404)["error"]
    assert "not valid" in _json(server, "/api/devices/bad%2Fid/cam/series", 400)["error"]
    assert "not a number" in _json(server, "/api/devices?since=abc", 400)["error"]
    assert "open or resolved" in _json(server, "/api/alerts?state=maybe", 400)["error"]
    code, _, body = _get(server, "/api/devices", method="POST")
    assert code == 405 and "read-only" in json.loads(body)["error"]

    # a broken database answers 500 with one line, and the server keeps serving
    server.db.execute("ALTER TABLE windows RENAME TO windows_gone")
    err = _json(server, "/api/devices", 500)["error"]
    assert "no such table: windows" in err and "\n" not in err
    server.db.execute("ALTER TABLE windows_gone RENAME TO windows")
    assert len(_json(server, "/api/devices")["devices"]) == 3


@pytest.fixture
def exe() -> str:
    """The Chromium binary; skipped (with the reason) only when it is missing outside CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI: `make apt-deps` installs it")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return found


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_dashboard_in_headless_chromium(served: tuple[CollectorHTTP, dict[str, Any]], tmp_path: Path, exe: str) -> None:
    server, filled = served
    url = f"{server.url}/"
    dom = _run_chromium(exe, tmp_path / "profile-dom", "--dump-dom", url).stdout

    body = dom[dom.index('<table id="devices"'):]
    body = body[body.index("<tbody>"):body.index("</tbody>")]
    rows = re.findall(r'<tr data-device="([^"]+)"', body)
    assert rows == [f"{FLEET}/{d}" for d in filled["devices"]]
    for device in filled["devices"]:
        assert f'<span class="dev-name">{device}</span>' in body
    assert len(re.findall(r'class="badge state-online"', body)) == 2
    assert len(re.findall(r'class="badge state-offline"', body)) == 1
    # charts of the selected device (cam-02: it has an open alert): lines with many points
    assert re.search(r'<h2 id="detail-title">cam-02</h2>', dom)
    paths = re.findall(r'<path class="line ([a-z0-9]+)" d="([^"]+)"', dom)
    assert {cls for cls, _ in paths} == {"p50", "p95", "conf", "psi"}
    assert all(d.count("L") >= 50 for _, d in paths), [(c, d.count("L")) for c, d in paths]
    assert len(re.findall(r'<svg class="chart"', dom)) == 3
    assert len(re.findall(r'<li class="alert sev-', dom)) == 2
    assert 'id="error" class="error" hidden' in dom.replace('hidden=""', "hidden")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    _run_chromium(exe, tmp_path / "profile-shot", "--window-size=1440,1000", f"--screenshot={shot}", url)
    from PIL import Image

    assert shot.stat().st_size > 30_000
    with Image.open(shot) as img:
        assert img.size == (1440, 1000)
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colors) > 200  # text, badges, chart lines: far from a blank page
        # the chart lines are drawn: pixels of the p95 orange (#e8710a) and the PSI teal (#0f9d8f) are present
        near = {(0xE8, 0x71, 0x0A): 0, (0x0F, 0x9D, 0x8F): 0}
        for count, (r, g, b) in colors:
            for (cr, cg, cb) in near:
                if abs(r - cr) + abs(g - cg) + abs(b - cb) < 30:
                    near[(cr, cg, cb)] += count
        assert all(n > 100 for n in near.values()), near


def test_dashboard_of_an_empty_fleet(tmp_path: Path, exe: str) -> None:
    with sqlite_db(tmp_path) as db, CollectorHTTP(db, port=0) as server:
        dom = _run_chromium(exe, tmp_path / "profile", "--dump-dom", f"{server.url}/").stdout
    assert "No devices have reported yet." in dom and "No open alerts." in dom
    assert "<path" not in dom and 'id="error" class="error" hidden' in dom.replace('hidden=""', "hidden")
