"""Model registry (issue 6) on a real tiny-CNN ONNX bundle and real databases (SQLite file, PostgreSQL), and
the archive HTTP server with range requests (partial, resumed, 416)."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import postgres_db, sqlite_db

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.cli import main
from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer, RangeNotSatisfiable, bundle_path, parse_range
from edge_sdk.fleet.lifecycle.registry import Registry, RegistryError, parse_model_ref


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle: the tiny CNN converted to ONNX fp32, named tiny:1."""
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("registry")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, out=d / "bundle", name="tiny", version="1", quiet=True)
    return d / "bundle"


def variant(built: Path, dest: Path, version: str, note: str | None = None) -> Path:
    """A copy of the bundle with another version (and optionally other manifest content)."""
    out = Path(shutil.copytree(built, dest))
    b = Bundle.load(out)
    b.manifest.version = version
    if note:
        b.manifest.extra["note"] = note
    b.save()
    return out


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_add_stores_archive_lineage_and_validation(built: Path, tmp_path: Path) -> None:
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        rec = reg.add(built)
        manifest = json.loads((built / "manifest.json").read_text())
        assert (rec.name, rec.version, rec.state) == ("tiny", "1", "candidate")
        archive = tmp_path / "store" / "tiny" / "1.tar.gz"
        assert rec.archive_path == str(archive.resolve())
        assert rec.bundle_sha256 == sha256_file(archive) and rec.size_bytes == archive.stat().st_size
        assert rec.lineage["source"]["sha256"] == manifest["source"]["sha256"]
        assert rec.lineage["source"]["framework"] == "pytorch"
        tools = rec.lineage["artifacts"]["onnx/fp32"]["tool_versions"]
        assert tools["torch"] and tools["onnxruntime"] and tools["onnx"]
        assert rec.lineage["artifacts"]["onnx/fp32"]["runtime"]["runtime"] == "onnxruntime"
        assert rec.validation["onnx/fp32"]["passed"] is True and rec.validation["onnx/fp32"]["samples"] > 0
        assert rec.manifest["name"] == "tiny" and rec.signed_key_id is None and rec.holdout_result is None
        # the stored archive is a complete, verifiable bundle
        unpacked = Bundle.extract(archive, tmp_path / "unpacked")
        unpacked.verify()
        assert unpacked.manifest.to_dict() == manifest
        [t] = reg.transitions("tiny", "1")
        assert (t["from_state"], t["to_state"]) == (None, "candidate") and str(built) in t["reason"]


def test_same_content_is_idempotent_and_other_content_refused(built: Path, tmp_path: Path) -> None:
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        first = reg.add(built)
        again = reg.add(built)
        assert again == first
        archive = Bundle.load(built).archive(tmp_path / "tiny-1.tar.gz")  # a new archive of the same files
        assert reg.add(archive) == first
        changed = variant(built, tmp_path / "changed", "1", note="retrained")
        with pytest.raises(RegistryError) as exc:
            reg.add(changed)
        assert "already registered with different content" in one_line(exc)
        assert len(reg.list()) == 1
        assert sha256_file(first.archive_path) == first.bundle_sha256  # the stored archive was not touched


def test_list_show_activate_and_transitions(built: Path, tmp_path: Path) -> None:
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        reg.add(built)
        reg.add(variant(built, tmp_path / "v2", "2"))
        reg.add(variant(built, tmp_path / "v3", "3"))
        assert [r.version for r in reg.list("tiny")] == ["1", "2", "3"]
        assert reg.list("other") == []
        assert reg.show("tiny").version == "3"  # no active version: the newest
        reg.activate("tiny", "2", "first rollout")
        assert reg.show("tiny").version == "2" and reg.active("tiny").version == "2"
        reg.activate("tiny", "3", "second rollout")
        assert reg.show("tiny", "2").state == "retired"
        assert [(t["version"], t["from_state"], t["to_state"]) for t in reg.transitions("tiny")][-3:] == [
            ("2", "candidate", "active"), ("2", "active", "retired"), ("3", "candidate", "active")]
        with pytest.raises(RegistryError) as exc:
            reg.show("tiny", "9")
        assert "versions of tiny: 1, 2, 3" in one_line(exc)
        with pytest.raises(RegistryError):
            reg.show("nope")
        with pytest.raises(RegistryError):
            reg.set_state("tiny", "1", "shipped", "bad state")
    assert parse_model_ref("tiny:2") == ("tiny", "2") and parse_model_ref("tiny") == ("tiny", None)
    with pytest.raises(RegistryError):
        parse_model_ref("tiny:")


def test_unsafe_names_and_missing_paths_are_refused(built: Path, tmp_path: Path) -> None:
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        with pytest.raises(RegistryError) as exc:
            reg.add(variant(built, tmp_path / "bad", "../../etc"))
        assert "cannot be stored" in one_line(exc)
        with pytest.raises(RegistryError):
            reg.add(tmp_path / "missing")
        (tmp_path / "file.txt").write_text("x")
        with pytest.raises(RegistryError):
            reg.add(tmp_path / "file.txt")
        assert reg.list() == [] and not (tmp_path / "store" / "etc").exists()


def test_holdout_registration(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        np.savez(tmp_path / "good.npz", inputs=rng.random((20, 3, 32, 32), dtype=np.float32),
                 labels=rng.integers(0, 10, 20))
        h = reg.register_holdout("tiny", tmp_path / "good.npz")
        assert h.samples == 20 and h.sha256 == sha256_file(tmp_path / "good.npz") and Path(h.path).is_file()
        assert reg.holdout("tiny") == h
        np.savez(tmp_path / "bigger.npz", inputs=rng.random((30, 3, 32, 32), dtype=np.float32),
                 labels=rng.integers(0, 10, 30))
        assert reg.register_holdout("tiny", tmp_path / "bigger.npz").samples == 30
        assert reg.holdout("tiny").samples == 30  # replaced
        np.savez(tmp_path / "nolabels.npz", inputs=np.zeros((3, 2)))
        np.savez(tmp_path / "mismatch.npz", inputs=np.zeros((3, 2)), labels=np.zeros(4, np.int64))
        np.savez(tmp_path / "float_labels.npz", inputs=np.zeros((3, 2)), labels=np.zeros(3))
        for bad, words in (("nolabels", "no labels array"), ("mismatch", "one label per input"),
                           ("float_labels", "integer array")):
            with pytest.raises(RegistryError) as exc:
                reg.register_holdout("tiny", tmp_path / f"{bad}.npz")
            assert words in one_line(exc), bad
        (tmp_path / "junk.npz").write_bytes(b"not a zip")
        with pytest.raises(RegistryError):
            reg.register_holdout("tiny", tmp_path / "junk.npz")
        assert reg.holdout("tiny").samples == 30
        assert reg.holdout("other") is None


def test_signed_bundle_key_id_recorded_and_verified(built: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from edge_sdk.signing import SignatureError, generate_keypair, sign_bundle

    private, _ = generate_keypair(tmp_path / "keys", "release")
    other_private, _ = generate_keypair(tmp_path / "other", "other")
    signed = variant(built, tmp_path / "signed", "2")
    kid = sign_bundle(signed, private)
    with sqlite_db(tmp_path) as db:
        rec = Registry(db, tmp_path / "store").add(signed)
        assert rec.signed_key_id == kid and rec.signature_verified is False
        # with trusted keys configured, the signature is checked at add
        other = variant(built, tmp_path / "signed3", "3")
        sign_bundle(other, private)
        rec3 = Registry(db, tmp_path / "store", trusted_keys=tmp_path / "keys").add(other)
        assert rec3.signed_key_id == kid and rec3.signature_verified is True
        wrong = variant(built, tmp_path / "signed4", "4")
        sign_bundle(wrong, other_private)
        with pytest.raises(SignatureError) as exc:
            Registry(db, tmp_path / "store", trusted_keys=tmp_path / "keys").add(wrong)
        assert "none of them trusted" in one_line(exc)
        with pytest.raises(SignatureError) as exc:
            Registry(db, tmp_path / "store", trusted_keys=tmp_path / "keys", require_signed=True).add(
                variant(built, tmp_path / "unsigned5", "5"))
        assert "unsigned" in one_line(exc)
        assert [r.version for r in Registry(db).list("tiny")] == ["2", "3"]


def test_registry_on_postgresql(built: Path, tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    with postgres_db("edge_registry") as db:
        reg = Registry(db, tmp_path / "store")
        rec = reg.add(built)
        assert reg.add(built) == rec
        reg.add(variant(built, tmp_path / "v2", "2"))
        reg.activate("tiny", "1")
        reg.activate("tiny", "2")
        assert [(r.version, r.state) for r in reg.list("tiny")] == [("1", "retired"), ("2", "active")]
        assert reg.show("tiny").lineage == rec.lineage


def test_cli_add_list_show(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = str(tmp_path / "store")
    assert main(["registry", "add", str(built), "--db", db, "--store", store]) == 0
    assert "tiny:1: candidate" in capsys.readouterr().out
    assert main(["registry", "list", "--json", "--db", db, "--store", store]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["version"], row["state"]) == ("tiny", "1", "candidate")
    assert main(["registry", "show", "tiny:1", "--db", db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["source"]["framework"] == "pytorch" and shown["transitions"][0]["to_state"] == "candidate"
    assert main(["registry", "show", "tiny:7", "--db", db]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tiny:7 is not registered") and "\n" not in err


# ---- the archive server: HTTP range requests ----------------------------------------------------------------------

@pytest.fixture()
def served(built: Path, tmp_path: Path):
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        rec = reg.add(built)
        reg.activate("tiny", "1", "served")  # only versions being deployed or active are served (issue 13)
        with BundleHTTPServer(reg) as srv:
            yield srv, rec


def request(srv: BundleHTTPServer, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_full_download_head_and_etag(served) -> None:
    srv, rec = served
    data = Path(rec.archive_path).read_bytes()
    status, headers, body = request(srv, bundle_path("tiny", "1"))
    assert status == 200 and body == data and hashlib.sha256(body).hexdigest() == rec.bundle_sha256
    assert headers["accept-ranges"] == "bytes" and headers["etag"] == f'"{rec.bundle_sha256}"'
    assert int(headers["content-length"]) == len(data) and "content-range" not in headers
    status, headers, body = request(srv, bundle_path("tiny", "1"), method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(data)
    status, _, _ = request(srv, bundle_path("tiny", "1"), {"If-None-Match": f'"{rec.bundle_sha256}"'})
    assert status == 304
    for path in (bundle_path("tiny", "2"), "/bundles/tiny", "/other"):
        assert request(srv, path)[0] == 404


def test_partial_and_resumed_download(served) -> None:
    srv, rec = served
    data = Path(rec.archive_path).read_bytes()
    size = len(data)
    status, headers, body = request(srv, bundle_path("tiny", "1"), {"Range": "bytes=100-1099"})
    assert status == 206 and body == data[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{size}" and headers["content-length"] == "1000"
    # an interrupted download: read the first 64 KiB, drop the connection, resume from there with If-Range
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", bundle_path("tiny", "1"))
    resp = conn.getresponse()
    first = resp.read(65536)
    conn.close()
    status, headers, rest = request(srv, bundle_path("tiny", "1"),
                                    {"Range": f"bytes={len(first)}-", "If-Range": headers["etag"]})
    assert status == 206 and headers["content-range"] == f"bytes {len(first)}-{size - 1}/{size}"
    assert hashlib.sha256(first + rest).hexdigest() == rec.bundle_sha256
    # suffix range, and a range running past the end is cut at the end
    assert request(srv, bundle_path("tiny", "1"), {"Range": "bytes=-10"})[2] == data[-10:]
    status, headers, body = request(srv, bundle_path("tiny", "1"), {"Range": f"bytes={size - 5}-{size + 100}"})
    assert status == 206 and body == data[-5:] and headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"
    # a stale If-Range (another version's ETag) gets the whole archive
    status, _, body = request(srv, bundle_path("tiny", "1"), {"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert status == 200 and body == data


def test_unsatisfiable_and_ignored_ranges(served) -> None:
    srv, rec = served
    size = rec.size_bytes
    for bad in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        status, headers, body = request(srv, bundle_path("tiny", "1"), {"Range": bad})
        assert status == 416 and headers["content-range"] == f"bytes */{size}" and body == b"", bad
    for ignored in ("bytes=5-1", "items=0-5", "bytes=0-1,5-9", "garbage"):
        status, _, body = request(srv, bundle_path("tiny", "1"), {"Range": ignored})
        assert status == 200 and len(body) == size, ignored


def test_parse_range_unit() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-0", 100) == (0, 0)
    assert parse_range("bytes=10-", 100) == (10, 99)
    assert parse_range("bytes=-150", 100) == (0, 99)
    assert parse_range("bytes=90-500", 100) == (90, 99)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=100-", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-5", 0)
