"""Issue 18, item 2: samples in the collector. Real collector HTTP server (CollectorHTTP with a SampleStore), real
SQLite and PostgreSQL databases, real files; the `edge-sdk data` CLI as a child process.

- an upload is stored once (content-addressed file + one index row); a repeat is acknowledged as a duplicate;
- hostile uploads (oversized, bad hash, no token, no metadata, bad metadata, not an image, pickled .npy,
  truncated .npy, no Content-Length) get a one-line 4xx and store nothing (no row, no file);
- export writes exactly the contract of /tmp/h/export_format.md (columns, order, JSON = CSV, export.json with the
  CSV's sha256), filters by since / policy / labelled, and re-exports into the same folder;
- `data label --from labels.csv` labels by sha256, reports unknown hashes without failing; labels from devices'
  /feedback arrive through POST /api/samples/labels;
- retention deletes old samples with their files (a file shared by two fleets only with its last row).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.fleet.collector.retention import RetentionPolicy, apply_retention
from edge_sdk.fleet.dashboard.server import CollectorHTTP
from edge_sdk.fleet.db import Database
from edge_sdk.fleet.samples import COLUMNS, SampleStore, export_samples, label_samples
from edge_sdk.httpbase import HTTPSecurity

TOKEN = "samples-test-token-0123456789"
REPO = Path(__file__).resolve().parents[1]


def _png(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _meta(data: bytes, **over: Any) -> dict[str, Any]:
    doc = {"sha256": hashlib.sha256(data).hexdigest(), "fleet": "f1", "device": "cam-1", "model_name": "tiny",
           "model_version": "1", "prediction": 3, "confidence": 0.42, "label": None, "policy": "random",
           "captured_at": time.time()}
    doc.update(over)
    return doc


def _post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
          token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _upload(port: int, data: bytes, meta: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any]]:
    return _post(port, "/api/samples", data, {"X-Edge-Sample": json.dumps(meta),
                                              "Content-Type": "application/octet-stream"}, **kw)


@pytest.fixture
def collector(db_url: str, tmp_path: Path) -> Iterator[tuple[CollectorHTTP, SampleStore]]:
    db = Database.connect(db_url)
    store = SampleStore(db, tmp_path / "samples", max_sample_bytes=64 * 1024)
    http_ = CollectorHTTP(db, "127.0.0.1", 0, samples=store, security=HTTPSecurity(TOKEN))
    http_.start()
    try:
        yield http_, store
    finally:
        http_.shutdown()
        db.close()


def _files(store: SampleStore) -> list[Path]:
    return sorted(p for p in store.dir.rglob("*") if p.is_file())


def test_upload_is_stored_once_and_a_repeat_is_a_duplicate(collector: tuple[CollectorHTTP, SampleStore]) -> None:
    http_, store = collector
    data = _png(1)
    meta = _meta(data)
    assert _upload(http_.port, data, meta) == (201, {"sha256": meta["sha256"], "stored": True})
    assert _upload(http_.port, data, meta) == (200, {"sha256": meta["sha256"], "stored": False})
    rows = store.db.query("SELECT * FROM samples")
    assert len(rows) == 1 and rows[0]["ext"] == "png" and rows[0]["size_bytes"] == len(data)
    assert [p.name for p in _files(store)] == [f"{meta['sha256']}.png"]
    assert _files(store)[0].read_bytes() == data
    # a repeat that carries a label (feedback reached the device between two attempts) labels the row
    assert _upload(http_.port, data, {**meta, "label": 7})[0] == 200
    assert store.db.query("SELECT label, label_source FROM samples")[0] == {"label": 7, "label_source": "feedback"}
    # the same bytes from another fleet: a second row, still one file
    assert _upload(http_.port, data, {**meta, "fleet": "f2"})[0] == 201
    assert len(store.db.query("SELECT * FROM samples")) == 2 and len(_files(store)) == 1
    # npy arrays are taken too; GET /api/samples summarises
    arr = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert _upload(http_.port, arr, _meta(arr, policy="drift"))[0] == 201
    conn = http.client.HTTPConnection("127.0.0.1", http_.port, timeout=10)
    conn.request("GET", "/api/samples?fleet=f1", headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    summary = json.loads(resp.read())
    conn.close()
    assert summary == {"count": 2, "bytes": len(data) + len(arr), "labelled": 1, "by_policy": {"drift": 1, "random": 1}}


def test_hostile_uploads_are_refused_in_one_line_and_store_nothing(
        collector: tuple[CollectorHTTP, SampleStore]) -> None:
    http_, store = collector
    port = http_.port
    data = _png(2)
    good = _meta(data)
    big = _png(3, (200, 200))
    assert len(big) > 64 * 1024
    obj = _npy(np.array([{"a": 1}], dtype=object))
    npy = _npy(np.zeros((64, 64), np.float32))
    cases: list[tuple[str, tuple[int, dict[str, Any]], int, str]] = [
        ("oversized", _upload(port, big, _meta(big)), 413, "limit"),
        ("bad hash", _upload(port, data, {**good, "sha256": "0" * 64}), 400, "sha256"),
        ("missing auth", _upload(port, data, good, token=None), 401, "token"),
        ("wrong auth", _upload(port, data, good, token="x" * 30), 401, "token"),
        ("no metadata", _post(port, "/api/samples", data), 400, "X-Edge-Sample"),
        ("metadata not JSON", _post(port, "/api/samples", data, {"X-Edge-Sample": "{nope"}), 400, "not valid JSON"),
        ("bad policy", _upload(port, data, {**good, "policy": "everything"}), 400, "policy"),
        ("bad fleet", _upload(port, data, {**good, "fleet": "../../etc"}), 400, "fleet"),
        ("bad confidence", _upload(port, data, {**good, "confidence": 7}), 400, "confidence"),
        ("negative label", _upload(port, data, {**good, "label": -1}), 400, "label"),
        ("future time", _upload(port, data, {**good, "captured_at": time.time() + 10 * 86400}), 400, "captured_at"),
        ("not an image", _upload(port, b"GIF89a" + b"\0" * 40, _meta(b"GIF89a" + b"\0" * 40)), 415, "PNG"),
        ("pickled npy", _upload(port, obj, _meta(obj)), 415, "objects"),
        ("truncated npy", _upload(port, npy[:200], _meta(npy[:200])), 400, "truncated"),
        ("empty", _upload(port, b"", _meta(b"")), 400, "empty"),
    ]
    for name, (status, doc), want, needle in cases:
        assert status == want, (name, status, doc)
        assert needle in doc["error"] and "\n" not in doc["error"] and len(doc["error"]) < 400, (name, doc)
    # no Content-Length (chunked): 411 before reading
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/api/samples")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("X-Edge-Sample", json.dumps(good))
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    # hostile label updates
    for body, want, needle in ((b"{nope", 400, "not valid JSON"), (b"[]", 400, "labels"),
                               (json.dumps({"fleet": "f1", "labels": [{"sha256": "zz", "label": 1}]}).encode(), 400,
                                "labels[0]"),
                               (json.dumps({"fleet": "f1", "labels": [{"sha256": "a" * 64, "label": 1}] * 10_001})
                                .encode(), 413, "at most")):
        status, doc = _post(port, "/api/samples/labels", body, {"Content-Type": "application/json"})
        assert status == want and needle in doc["error"] and "\n" not in doc["error"], (body[:40], doc)
    assert _post(port, "/api/samples/labels", b"{}", token=None)[0] == 401
    assert store.db.query("SELECT COUNT(*) AS n FROM samples")[0]["n"] == 0
    assert _files(store) == []
    # the server still serves
    assert _upload(port, data, good)[0] == 201


def test_collector_without_samples_dir_answers_404(tmp_path: Path) -> None:
    db = Database.connect(f"sqlite:///{tmp_path / 'f.db'}")
    db.migrate()
    with CollectorHTTP(db, "127.0.0.1", 0) as http_:
        data = _png(4)
        status, doc = _upload(http_.port, data, _meta(data), token=None)
        assert status == 404 and "--samples-dir" in doc["error"]
    db.close()


def _seed(store: SampleStore, now: float) -> dict[str, dict[str, Any]]:
    """Five samples of f1 (policies, ages, one labelled) and one of f2; returns meta by sha256."""
    from edge_sdk.fleet.samples import check_meta

    out = {}
    specs = [("random", 5000, None), ("low_confidence", 4000, 2), ("drift", 3000, None),
             ("feedback_disagree", 2000, 5), ("random", 100, None)]
    for i, (policy, age, label) in enumerate(specs):
        data = _png(100 + i) if i != 2 else _npy(np.full((2, 3), i, np.float32))
        meta = _meta(data, policy=policy, captured_at=now - age, label=label, prediction=i, confidence=0.1 * (i + 1))
        assert store.add(check_meta(meta, now=now), data, now=now)
        out[meta["sha256"]] = {**meta, "data": data}
    other = _png(200)
    store.add(check_meta(_meta(other, fleet="f2"), now=now), other, now=now)
    return out


def _read_export(out: Path) -> tuple[list[dict[str, str]], list[dict[str, Any]], dict[str, Any]]:
    text = (out / "samples.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(COLUMNS)
    return rows, json.loads((out / "samples.json").read_text()), json.loads((out / "export.json").read_text())


def test_export_writes_the_contract_format_and_filters(db_url: str, tmp_path: Path) -> None:
    now = time.time()
    with Database.connect(db_url) as db:
        store = SampleStore(db, tmp_path / "samples")
        seeded = _seed(store, now)
        out = tmp_path / "export"
        res = export_samples(db, "f1", out, now=now)
        rows, objs, manifest = _read_export(out)
        assert res.count == 5 == len(rows) == len(objs) == manifest["count"]
        assert list(objs[0]) == list(COLUMNS)
        # ordered by captured_at; every column as the contract says
        assert [r["sha256"] for r in rows] == [s for s, _ in sorted(seeded.items(),
                                                                      key=lambda kv: kv[1]["captured_at"])]
        for r, o in zip(rows, objs, strict=True):
            m = seeded[r["sha256"]]
            ext = "npy" if m["data"].startswith(b"\x93NUMPY") else "png"
            assert r["file"] == o["file"] == f"images/{r['sha256']}.{ext}"
            assert (out / r["file"]).read_bytes() == m["data"]
            assert (r["fleet"], r["device"], r["model_name"], r["model_version"], r["policy"]) == \
                ("f1", "cam-1", "tiny", "1", m["policy"])
            assert int(r["prediction"]) == o["prediction"] == m["prediction"]
            assert float(r["confidence"]) == pytest.approx(o["confidence"]) and o["confidence"] == \
                pytest.approx(m["confidence"])
            assert r["label"] == ("" if m["label"] is None else str(m["label"])) and o["label"] == m["label"]
            assert r["captured_at"] == o["captured_at"] and r["captured_at"].endswith("Z")
            from datetime import datetime
            assert datetime.fromisoformat(r["captured_at"].replace("Z", "+00:00")).timestamp() == \
                pytest.approx(m["captured_at"], abs=0.001)
        assert set(manifest) == {"fleet", "filters", "count", "bytes", "created_at", "sha256_of_samples_csv"}
        assert manifest["fleet"] == "f1" and manifest["filters"] == {"since": None, "policy": None, "labelled": False}
        assert manifest["sha256_of_samples_csv"] == hashlib.sha256((out / "samples.csv").read_bytes()).hexdigest()
        assert manifest["bytes"] == sum(len(m["data"]) for m in seeded.values())
        assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file"]).name for r in rows)
        # filters; a re-export into the same folder replaces it (images no longer selected removed)
        res = export_samples(db, "f1", out, since=3500, policy="drift,feedback_disagree", labelled=True, now=now)
        rows, objs, manifest = _read_export(out)
        assert [r["policy"] for r in rows] == ["feedback_disagree"] and rows[0]["label"] == "5"
        assert manifest["filters"]["policy"] == ["drift", "feedback_disagree"] and manifest["filters"]["labelled"]
        assert manifest["filters"]["since"].endswith("Z")
        assert len(list((out / "images").iterdir())) == 1
        assert export_samples(db, "f1", out, since="1970-01-01T00:00:00Z", policy=["random"], now=now).count == 2
        # refusals: an unknown policy, a bad since, a non-empty folder that is no export
        other = tmp_path / "other"
        other.mkdir()
        (other / "x.txt").write_text("x")
        for kw, needle in (({"policy": "all"}, "unknown policy"), ({"since": "yesterday"}, "ISO 8601"),
                           ({"out_dir": other}, "not empty")):
            args = {"db": db, "fleet": "f1", "out_dir": tmp_path / "e2", **kw}
            with pytest.raises(ValueError, match=needle):
                export_samples(**args)


def test_label_csv_round_trip_through_the_cli(tmp_path: Path) -> None:
    now = time.time()
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with Database.connect(url) as db:
        seeded = _seed(SampleStore(db, tmp_path / "samples"), now)
    unlabelled = [s for s, m in seeded.items() if m["label"] is None]
    labels = tmp_path / "labels.csv"
    labels.write_text("sha256,label\n" + "".join(f"{s},{i + 7}\n" for i, s in enumerate(unlabelled[:2]))
                      + f"{'e' * 64},1\n")
    run = [sys.executable, "-m", "edge_sdk.cli", "data"]
    p = subprocess.run([*run, "label", "--db", url, "--from", str(labels), "--json"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"rows": 3, "updated": 2, "unknown": ["e" * 64]}
    out = tmp_path / "labelled"
    p = subprocess.run([*run, "export", "--db", url, "--fleet", "f1", "--labelled", "--out", str(out), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    rows, _, manifest = _read_export(out)
    got = {r["sha256"]: r["label"] for r in rows}
    want = {s: str(m["label"]) for s, m in seeded.items() if m["label"] is not None}
    want.update({s: str(i + 7) for i, s in enumerate(unlabelled[:2])})
    assert got == want and json.loads(p.stdout) == manifest
    # a malformed labels file changes nothing and says which row
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{unlabelled[2]},3\n{unlabelled[2]},cat\n")
    p = subprocess.run([*run, "label", "--db", url, "--from", str(bad)], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 2 and "row 2" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    with Database.connect(url) as db:
        assert label_samples(db, labels).updated == 2  # the Python API too (idempotent)
        assert db.query("SELECT label FROM samples WHERE sha256 = ?", (unlabelled[2],))[0]["label"] is None
    # --since in seconds from the command line
    p = subprocess.run([*run, "export", "--db", url, "--fleet", "f1", "--since", "3500", "--out",
                        str(tmp_path / "recent")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0 and json.loads((tmp_path / "recent" / "export.json").read_text())["count"] == 3


def test_label_updates_from_devices(collector: tuple[CollectorHTTP, SampleStore]) -> None:
    http_, store = collector
    data = _png(9)
    meta = _meta(data)
    assert _upload(http_.port, data, meta)[0] == 201
    body = json.dumps({"fleet": "f1", "labels": [{"sha256": meta["sha256"], "label": 4},
                                                 {"sha256": "f" * 64, "label": 1}]}).encode()
    status, doc = _post(http_.port, "/api/samples/labels", body, {"Content-Type": "application/json"})
    assert (status, doc) == (200, {"updated": 1, "unknown": ["f" * 64], "unknown_count": 1})
    assert store.db.query("SELECT label, label_source FROM samples")[0] == {"label": 4, "label_source": "feedback"}


def test_retention_deletes_old_samples_with_their_files(db_url: str, tmp_path: Path) -> None:
    now = time.time()
    with Database.connect(db_url) as db:
        store = SampleStore(db, tmp_path / "samples")
        from edge_sdk.fleet.samples import check_meta

        old, shared, new = _png(300), _png(301), _png(302)
        store.add(check_meta(_meta(old), now=now), old, now=now - 10 * 86400)
        store.add(check_meta(_meta(shared), now=now), shared, now=now - 10 * 86400)
        store.add(check_meta(_meta(shared, fleet="f2"), now=now), shared, now=now - 5)  # same file, a recent row
        store.add(check_meta(_meta(new), now=now), new, now=now)
        assert len(_files(store)) == 3
        out = apply_retention(db, RetentionPolicy(samples_days=7), now=now)
        assert out["samples_dropped"] == 2
        left = {(r["fleet"], r["sha256"]) for r in db.query("SELECT fleet, sha256 FROM samples")}
        sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
        assert left == {("f2", sha(shared)), ("f1", sha(new))}
        assert sorted(p.stem for p in _files(store)) == sorted([sha(shared), sha(new)])
        drops = db.query("SELECT kind, fleet, reason, dropped FROM retention_drops WHERE kind = 'sample'")
        assert drops == [{"kind": "sample", "fleet": "f1", "reason": "random", "dropped": 2}]
        # the row cap: only the newest samples_max rows stay
        assert apply_retention(db, RetentionPolicy(samples_max=1), now=now)["samples_dropped"] == 1
        assert len(db.query("SELECT * FROM samples")) == 1 and len(_files(store)) == 1


def _expect(port: int, path: str, length: int, headers: dict[str, str]) -> str:
    """Send only the headers with ``Expect: 100-continue`` (as curl does) and return the server's status line."""
    import socket

    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {TOKEN}",
            f"Content-Length: {length}", "Expect: 100-continue", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        return sock.makefile("rb").readline().decode().strip()


def test_a_large_upload_announced_with_expect_100_continue_is_taken(tmp_path: Path) -> None:
    """curl announces big bodies with ``Expect: 100-continue``; the collector answers it from the sample store's
    limit (here 4 MiB), not the 1 MiB default of its other routes."""
    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    store = SampleStore(db, tmp_path / "samples", max_sample_bytes=4 * 1024 * 1024)
    http_ = CollectorHTTP(db, "127.0.0.1", 0, samples=store, security=HTTPSecurity(TOKEN))
    http_.start()
    try:
        data = _npy(np.random.default_rng(3).random((512, 1024), dtype=np.float32))  # 2 MiB
        meta = {"X-Edge-Sample": json.dumps(_meta(data)), "Content-Type": "application/octet-stream"}
        assert " 100 " in _expect(http_.port, "/api/samples", len(data), meta) + " "
        status, doc = _post(http_.port, "/api/samples", data, meta)
        assert status in (200, 201), doc
        assert " 413 " in _expect(http_.port, "/api/samples", 5 * 1024 * 1024, meta) + " "  # over the store's limit
        assert " 413 " in _expect(http_.port, "/api/samples/labels", 2 * 1024 * 1024,  # other routes: 1 MiB
                                  {"Content-Type": "application/json"}) + " "
    finally:
        http_.shutdown()
        db.close()
