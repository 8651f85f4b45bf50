"""Issue 13: signed, monotonic model identity on the device; authenticated, single-use rollbacks; a hardened OTA path.

Real tiny bundles signed with real ed25519 keys, a real HTTP server, a real SQLite fleet database; nothing mocked.

- a replayed older signed bundle, another model's bundle, an unauthenticated or duplicated rollback: all refused,
  each with an event, and ``current`` untouched;
- a downgrade goes through only with a rollback authorisation signed by a trusted key that names it (single use,
  remembered across restarts, bounded in time), as produced by the rollout's automatic and manual rollbacks;
- OTA: only http(s) URLs from MQTT, the size is required and enforced while downloading, a free-space reserve,
  the manifest signature is checked before the archive is unpacked, and no URL credentials in events or logs;
- the registry refuses to promote and the rollout to deploy an unsigned version unless ``allow_unsigned=True``.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ota_helpers import Events, LoopbackServer, make_updater, serving

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.device_agent.updater import UpdateError, Updater

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")


# ---- material ------------------------------------------------------------------------------------------------------


def _set_manifest(d: Path, **fields: Any) -> None:
    """Write top-level manifest keys as raw JSON (so that the material builds with any version of Bundle.save)."""
    doc = json.loads((d / "manifest.json").read_text())
    doc.update(fields)
    (d / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")


class Material:
    """One converted tiny model, re-labelled into signed bundles: tiny:1 (version_code 1), tiny:2 (2), tiny:3 (3),
    other:9 (another model, same key), and their archives served from ``www``."""

    def __init__(self, root: Path) -> None:
        from tiny_models import make_tiny

        import edge_sdk
        from edge_sdk.signing import generate_keypair, sign_bundle

        self.root = root
        self.key, self.pub = generate_keypair(root / "keys", "release")
        self.other_key, self.other_pub = generate_keypair(root / "other_keys", "intruder")
        base = root / "base"
        val = np.random.default_rng(7).random((8, 3, 32, 32), dtype=np.float32)
        edge_sdk.convert(make_tiny(0), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", ort=False, val=val,
                         out=base, name="tiny", version="0", quiet=True)
        self.dirs: dict[str, Path] = {}
        for tag, name, version, code in (("1", "tiny", "1", 1), ("2", "tiny", "2", 2), ("3", "tiny", "3", 3),
                                         ("other", "other", "9", 9), ("legacy", "tiny", "L", None)):
            d = Path(shutil.copytree(base, root / f"b-{tag}"))
            fields: dict[str, Any] = {"name": name, "version": version}
            if code is not None:
                fields["version_code"] = code
            _set_manifest(d, **fields)
            sign_bundle(d, self.key)
            self.dirs[tag] = d
        self.www = root / "www"
        self.www.mkdir()
        self.archives = {k: Bundle.load(d).archive(self.www / f"{k}.tar.gz") for k, d in self.dirs.items()}
        # an archive signed by an untrusted key that also carries 64 MiB of zeros (~64 kB compressed), unlisted
        junk = Path(shutil.copytree(self.dirs["3"], root / "b-junk"))
        (junk / "signature.json").unlink()
        sign_bundle(junk, self.other_key)
        self.archives["junk"] = self.www / "junk.tar.gz"
        with tarfile.open(self.archives["junk"], "w:gz") as tar:
            for f in sorted(junk.rglob("*")):
                if f.is_file():
                    tar.add(f, arcname=f.relative_to(junk).as_posix(), recursive=False)
            info = tarfile.TarInfo("zeros.bin")
            info.size = 64 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))

    def sha(self, key: str) -> str:
        return sha256_file(self.archives[key])

    def size(self, key: str) -> int:
        return self.archives[key].stat().st_size


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("ota_security"))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies: no Content-Length needed

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv: FileServer = self.server  # type: ignore[assignment]
        name = self.path.lstrip("/").split("?")[0]
        if name == "endless":  # no Content-Length, far more bytes than any command says
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(400):
                    self.wfile.write(bytes(1 << 16))
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FileServer(LoopbackServer):
    def __init__(self, root: Path) -> None:
        super().__init__(_Handler)
        self.root = root


@pytest.fixture()
def server(material: Material) -> Iterator[FileServer]:
    with serving(FileServer(material.www)) as srv:
        yield srv


def _updater(material: Material, root: Path, **kw: Any) -> tuple[Updater, Events]:
    return make_updater(material.pub, root, **kw)


def _label(up: Updater) -> str | None:
    path = up.current_bundle()
    if path is None:
        return None
    m = Bundle.load(path).manifest
    return f"{m.name}:{m.version}"


def _update_cmd(material: Material, server: FileServer, key: str, **extra: Any) -> dict[str, Any]:
    m = Bundle.load(material.dirs[key]).manifest
    return {"schema": "edge-sdk/command", "schema_version": "1.0", "command": "update",
            "command_id": uuid.uuid4().hex, "ts": time.time(), "expires_at": time.time() + 3600,
            "deployment_id": uuid.uuid4().hex,
            "model": {"name": m.name, "version": m.version, "url": server.url(f"{key}.tar.gz"),
                      "sha256": material.sha(key), "size_bytes": material.size(key)}, **extra}


@pytest.fixture()
def store_v2(material: Material, tmp_path: Path) -> Path:
    """A store on which tiny:1 then tiny:2 were installed: current tiny:2, previous tiny:1."""
    up, _ = _updater(material, tmp_path / "store")
    up.update(material.archives["1"])
    up.update(material.archives["2"])
    assert _label(up) == "tiny:2"
    return tmp_path / "store"


# ---- acceptance: replay of an older signed bundle, another model's bundle, a duplicated rollback ------------------


def test_replayed_older_signed_bundle_is_refused_with_an_event(material: Material, store_v2: Path,
                                                                server: FileServer) -> None:
    up, events = _updater(material, store_v2)
    before = os.readlink(store_v2 / "current")
    r = up.handle_command("update", _update_cmd(material, server, "1"))
    assert r["status"] in ("failed", "refused") and "version_code 1" in r["reason"] and "lower" in r["reason"], r
    assert _label(up) == "tiny:2" and os.readlink(store_v2 / "current") == before
    failed = events.last("update.failed")
    assert failed["step"] == "policy" and "version_code 1" in failed["reason"], failed
    assert "update.switched" not in events.kinds
    # the same replay again is refused without downloading it a second time
    n = len(events.items)
    r = up.handle_command("update", _update_cmd(material, server, "1"))
    assert r["status"] == "refused" and _label(up) == "tiny:2"
    assert "update.downloading" not in events.kinds[n:] and "update.refused" in events.kinds[n:]
    # a bundle without a version_code (an old bundle) is not an upgrade of a versioned one either
    r = up.handle_command("update", _update_cmd(material, server, "legacy"))
    assert r["status"] in ("failed", "refused") and _label(up) == "tiny:2"
    assert "no version_code" in r["reason"], r
    # a newer version still installs
    assert up.handle_command("update", _update_cmd(material, server, "3"))["status"] == "switched"
    assert _label(up) == "tiny:3"


def test_another_models_bundle_is_refused_with_an_event(material: Material, store_v2: Path,
                                                        server: FileServer) -> None:
    up, events = _updater(material, store_v2)
    cmd = _update_cmd(material, server, "other")
    for k in ("name", "version"):  # the command need not say: the signed manifest decides
        cmd["model"].pop(k)
    r = up.handle_command("update", cmd)
    assert r["status"] in ("failed", "refused") and "model 'other'" in r["reason"], r
    assert _label(up) == "tiny:2"
    assert events.last("update.failed")["step"] == "policy" and "update.switched" not in events.kinds


def test_rollback_needs_a_signed_authorisation_and_is_single_use(material: Material, store_v2: Path) -> None:
    from edge_sdk.rollback_auth import sign_rollback

    up, events = _updater(material, store_v2)
    # unauthenticated: refused (it used to swap current and previous)
    r = up.handle_command("rollback", {"command": "rollback", "command_id": uuid.uuid4().hex, "reason": "x"})
    assert r["status"] == "refused" and "authorisation" in r["reason"], r
    assert _label(up) == "tiny:2" and events.last("update.refused")["command"] == "rollback"
    # signed by a key the device does not trust: refused
    forged = sign_rollback(material.other_key, name="tiny", from_version="2", from_version_code=2,
                           to_version="1", to_version_code=1)
    r = up.handle_command("rollback", {"command": "rollback", "command_id": uuid.uuid4().hex,
                                       "target_version": "1", "authorisation": forged})
    assert r["status"] == "refused" and "trusted" in r["reason"] and _label(up) == "tiny:2", r
    # naming another target than the version the device kept: refused
    wrong = sign_rollback(material.key, name="tiny", from_version="2", from_version_code=2, to_version="0")
    r = up.handle_command("rollback", {"command": "rollback", "command_id": uuid.uuid4().hex,
                                       "target_version": "0", "authorisation": wrong})
    assert r["status"] == "refused" and _label(up) == "tiny:2", r
    # expired: refused
    old = sign_rollback(material.key, name="tiny", from_version="2", from_version_code=2, to_version="1",
                        to_version_code=1, ttl_s=60, now=time.time() - 3600)
    r = up.handle_command("rollback", {"command": "rollback", "command_id": uuid.uuid4().hex,
                                       "target_version": "1", "authorisation": old})
    assert r["status"] == "refused" and "expired" in r["reason"] and _label(up) == "tiny:2", r
    # the real thing
    auth = sign_rollback(material.key, name="tiny", from_version="2", from_version_code=2, to_version="1",
                         to_version_code=1, reason="canary unhealthy")
    cmd = {"command": "rollback", "command_id": uuid.uuid4().hex, "target_version": "1", "authorisation": auth,
           "expires_at": time.time() + 60}
    r = up.handle_command("rollback", cmd)
    assert r["status"] == "rolled_back" and _label(up) == "tiny:1", r
    # the QoS 1 duplicate: refused (it used to flip back to tiny:2)
    r = up.handle_command("rollback", cmd)
    assert r["status"] == "refused" and "duplicate" in r["reason"] and _label(up) == "tiny:1", r
    # the same authorisation under a new command id: refused
    r = up.handle_command("rollback", {**cmd, "command_id": uuid.uuid4().hex})
    assert r["status"] == "refused" and _label(up) == "tiny:1", r
    assert [k for k in events.kinds if k in ("update.rolled_back", "update.refused")].count("update.rolled_back") == 1
    # ... and after a restart (a new Updater on the same store), still refused
    again, ev2 = _updater(material, store_v2)
    r = again.handle_command("rollback", cmd)
    assert r["status"] == "refused" and _label(again) == "tiny:1" and ev2.kinds == ["update.refused"]
    # an expired command is refused before anything else
    r = again.handle_command("rollback", {**cmd, "command_id": uuid.uuid4().hex, "expires_at": time.time() - 1})
    assert r["status"] == "refused" and "expired" in r["reason"]


def test_a_downgrade_by_update_goes_through_only_with_an_authorisation(material: Material, store_v2: Path,
                                                                       server: FileServer) -> None:
    from edge_sdk.rollback_auth import sign_rollback

    up, events = _updater(material, store_v2)
    assert up.handle_command("update", _update_cmd(material, server, "3"))["status"] == "switched"
    auth = sign_rollback(material.key, name="tiny", from_version="3", from_version_code=3, to_version="1",
                         to_version_code=1)
    r = up.handle_command("update", _update_cmd(material, server, "1", authorisation=auth))
    assert r["status"] == "switched" and _label(up) == "tiny:1", r
    assert events.last("update.switched")["authorisation"] == auth["statement"]["id"]
    # single use: back on 3 (an upgrade needs nothing), the same authorisation cannot take it down again
    assert up.handle_command("update", _update_cmd(material, server, "3"))["status"] == "switched"
    r = up.handle_command("update", _update_cmd(material, server, "1", authorisation=auth))
    assert r["status"] in ("failed", "refused") and _label(up) == "tiny:3", r


# ---- OTA -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "file:///etc", "ftp://127.0.0.1/x.tar.gz"])
def test_update_commands_accept_only_http_urls(material: Material, store_v2: Path, url: str) -> None:
    up, events = _updater(material, store_v2)
    cmd = {"command": "update", "command_id": uuid.uuid4().hex,
           "model": {"url": url, "sha256": "0" * 64, "size_bytes": 1000}}
    r = up.handle_command("update", cmd)
    assert r["status"] in ("failed", "refused") and "http" in r["reason"], r
    assert "update.downloading" not in events.kinds
    assert not any((store_v2 / "staging").iterdir()) and _label(up) == "tiny:2"


def test_update_commands_must_give_the_size(material: Material, store_v2: Path, server: FileServer) -> None:
    up, events = _updater(material, store_v2)
    cmd = _update_cmd(material, server, "3")
    del cmd["model"]["size_bytes"]
    r = up.handle_command("update", cmd)
    assert r["status"] in ("failed", "refused") and "size_bytes" in r["reason"], r
    assert "update.downloading" not in events.kinds and _label(up) == "tiny:2"


def test_download_is_cut_at_the_expected_size(tmp_path: Path, server: FileServer) -> None:
    from edge_sdk.device_agent.download import DownloadError, fetch

    seen: list[int] = []
    with pytest.raises(DownloadError) as exc:
        fetch(server.url("endless"), tmp_path / "x.part", expected_size=100_000, retries=0,
              progress=lambda done, total: seen.append(done))
    assert "100000" in str(exc.value) and "\n" not in str(exc.value)
    assert max(seen) <= 100_000 + (1 << 16), max(seen)  # stopped within one read of the limit (26 MB offered)
    assert not (tmp_path / "x.part").exists()


def test_download_keeps_a_free_space_reserve(material: Material, store_v2: Path, server: FileServer) -> None:
    up, events = _updater(material, store_v2, free_space_reserve_bytes=1 << 62)
    r = up.handle_command("update", _update_cmd(material, server, "3"))
    assert r["status"] == "failed" and "free" in r["reason"], r
    assert events.last("update.failed")["step"] == "download" and _label(up) == "tiny:2"
    assert not [p for p in (store_v2 / "staging").iterdir() if p.name.endswith(".part")]


def test_signature_is_checked_before_the_archive_is_unpacked(material: Material, store_v2: Path,
                                                             server: FileServer) -> None:
    up, events = _updater(material, store_v2)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:  # the bytes written under staging/, sampled while the update runs
        while not stop.is_set():
            total = 0
            for dirpath, _, files in os.walk(store_v2 / "staging"):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
            peak[0] = max(peak[0], total)
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        r = up.handle_command("update", {"command": "update", "command_id": uuid.uuid4().hex,
                                         "model": {"url": server.url("junk.tar.gz"), "sha256": material.sha("junk"),
                                                   "size_bytes": material.size("junk")}})
    finally:
        stop.set()
        t.join(5)
    assert r["status"] == "failed" and "none of them trusted" in r["reason"], r
    assert events.last("update.failed")["step"] == "verify" and _label(up) == "tiny:2"
    assert peak[0] < 8 << 20, f"{peak[0]} bytes written under staging before the signature was checked"


def test_events_and_logs_carry_no_url_credentials(material: Material, store_v2: Path, server: FileServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    up, events = _updater(material, store_v2, retries=0)
    port = server.server_address[1]
    url = f"http://agent:hunter2pw@127.0.0.1:{port}/missing.tar.gz?X-Amz-Signature=TOPSECRETSIG&token=abc123tok"
    caplog.set_level(logging.DEBUG)
    r = up.handle_command("update", {"command": "update", "command_id": uuid.uuid4().hex,
                                     "model": {"url": url, "sha256": "0" * 64, "size_bytes": 1000}})
    assert r["status"] == "failed"
    text = json.dumps(events.items) + json.dumps(r) + caplog.text
    for secret in ("hunter2pw", "TOPSECRETSIG", "abc123tok"):
        assert secret not in text, secret
    assert "missing.tar.gz" in events.last("update.failed")["reason"]  # still says what failed
    with pytest.raises(UpdateError) as exc:
        up.update(url, expected_sha256="0" * 64, expected_size=1000)
    assert "hunter2pw" not in str(exc.value) and "TOPSECRETSIG" not in str(exc.value)


# ---- the registry and the rollout ----------------------------------------------------------------------------------


class Capture:
    """A PublishFn that keeps what was published (topic, payload, retain)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bool]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.items.append((topic, payload, retain))

    def json(self, suffix: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.items if t.endswith(suffix) and p]


def test_promote_and_deploy_of_an_unsigned_version_need_allow_unsigned(material: Material, tmp_path: Path) -> None:
    from fleet_helpers import sqlite_db

    from edge_sdk.errors import EdgeSDKError
    from edge_sdk.fleet.lifecycle.registry import Registry
    from edge_sdk.fleet.lifecycle.rollout import Rollout

    unsigned = Path(shutil.copytree(material.dirs["1"], tmp_path / "u1"))
    (unsigned / "signature.json").unlink()
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store", trusted_keys=material.pub)
        assert not reg.add(unsigned).signature_verified
        with pytest.raises(EdgeSDKError) as exc:
            reg.promote("tiny", "1")
        assert "unsigned" in str(exc.value) and "allow_unsigned" in str(exc.value) and "\n" not in str(exc.value)
        assert reg.show("tiny", "1").state == "candidate"
        reg.promote("tiny", "1", allow_unsigned=True)
        ro = Rollout(db, Capture(), "http://bundles.local", registry=reg, rollback_key=material.key)
        with pytest.raises(EdgeSDKError) as exc:
            ro.start("tiny", "1", "f1", devices=["d1"])
        assert "unsigned" in str(exc.value) and "allow_unsigned" in str(exc.value)
        assert ro.start("tiny", "1", "f1", devices=["d1"], allow_unsigned=True)


def test_rollout_commands_carry_ids_expiry_and_a_signed_rollback(material: Material, tmp_path: Path) -> None:
    from fleet_helpers import sqlite_db

    from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer
    from edge_sdk.fleet.lifecycle.registry import Registry
    from edge_sdk.fleet.lifecycle.rollout import Rollout
    from edge_sdk.rollback_auth import verify_rollback

    up, _ = _updater(material, tmp_path / "dev", fleet="f1")
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store", trusted_keys=material.pub, require_signed=True)
        for k in ("2", "3"):
            assert reg.add(material.dirs[k]).signature_verified
        up.update(reg.get("tiny", "2").archive_path)  # the device runs the registry's archive of tiny:2
        reg.activate("tiny", "2", "the fleet runs it")
        reg.promote("tiny", "3", force_reason="no holdout in this test")
        cap = Capture()
        srv = BundleHTTPServer(reg).start()
        base = srv.url
        ro = Rollout(db, cap, base, registry=reg, rollback_key=material.key)
        dep = ro.start("tiny", "3", "f1", devices=["d1"])
        [upd] = cap.json("/cmd/update")
        assert len(upd["command_id"]) == 32 and upd["expires_at"] > time.time() + 3600
        assert up.handle_command("update", upd)["status"] == "switched" and _label(up) == "tiny:3"
        ro.rollback("tiny", "f1", reason="customer complaint")
        back = cap.json("/cmd/update")[-1]
        assert back["model"]["version"] == "2" and back["deployment_id"] == dep
        st = verify_rollback(back["authorisation"], material.pub)
        assert (st["name"], st["from_version"], st["to_version"], st["to_version_code"], st["fleet"]) == \
            ("tiny", "3", "2", 2, "f1")
        r = up.handle_command("update", back)
        assert r["status"] == "switched" and _label(up) == "tiny:2", r
        assert up.handle_command("update", back)["status"] == "current"  # the retained command after a reconnect
        srv.stop()
    # a rollout without a rollback key refuses to start a deployment it could not roll back on the devices
    (tmp_path / "db2").mkdir()
    with sqlite_db(tmp_path / "db2") as db2:
        reg2 = Registry(db2, tmp_path / "store2", trusted_keys=material.pub, require_signed=True)
        for k in ("2", "3"):
            reg2.add(material.dirs[k])
        reg2.activate("tiny", "2", "the fleet runs it")
        reg2.promote("tiny", "3", force_reason="no holdout in this test")
        from edge_sdk.fleet.lifecycle.rollout import RolloutError

        with pytest.raises(RolloutError) as exc:
            Rollout(db2, Capture(), base, registry=reg2).start("tiny", "3", "f1", devices=["d1"])
        assert "rollback_key" in str(exc.value) and "\n" not in str(exc.value)


def test_command_payloads_carry_an_expiry() -> None:
    from edge_sdk.fleet.lifecycle.commands import command_payload

    p = json.loads(command_payload("rollback", reason="x"))
    assert len(p["command_id"]) == 32 and p["ts"] < p["expires_at"] <= p["ts"] + 7 * 86400
    p = json.loads(command_payload("update", ttl_s=60))
    assert p["expires_at"] == pytest.approx(p["ts"] + 60)
