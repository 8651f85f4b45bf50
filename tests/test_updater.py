"""The device's model updater with real tiny bundles, real signatures, a real HTTP server and real kill -9.

- the converters store a smoke sample in every bundle (listed, hashed, signed) and the device checks it;
- an update over HTTP resumes after a dropped connection and after the updating process was killed;
- a wrong sha256 / size, an unsigned, tampered or wrongly signed bundle, and a failing smoke test are refused,
  each with one line, and ``current`` is left untouched;
- rollback, MQTT command handling (idempotent on the retained cmd/update), recovery, garbage collection;
- acceptance 3: kill -9 at random instants of an update, then a fresh process recovers and runs the smoke test.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ota_helpers import Events, LoopbackServer, make_updater, serving

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.device_agent.agent import Agent
from edge_sdk.device_agent.smoke import run_smoke_test
from edge_sdk.device_agent.updater import ModelStore, UpdateError, Updater
from edge_sdk.errors import BundleError
from edge_sdk.smoke import load_smoke_sample

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

REPO = Path(__file__).resolve().parent.parent


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---- material: tiny signed bundles --------------------------------------------------------------------------------


def _convert(out: Path, seed: int, version: str) -> Path:
    from tiny_models import make_tiny

    import edge_sdk

    val = np.random.default_rng(100 + seed).random((20, 3, 32, 32), dtype=np.float32)
    edge_sdk.convert(make_tiny(seed), input_shape=[1, 3, 32, 32], to="onnx", precision="fp32", ort=False, val=val,
                     out=out, name="tiny", version=version, quiet=True)
    return out


def _rehash_side_file(bundle_dir: Path, rel: str) -> None:
    b = Bundle.load(bundle_dir)
    for a in b.artifacts:
        for f in a.files:
            if f["path"] == rel:
                f["sha256"] = sha256_file(bundle_dir / rel)
                f["size_bytes"] = (bundle_dir / rel).stat().st_size
    b.save()


class Material:
    """Keys, bundle dirs and signed archives shared by the tests of this module."""

    def __init__(self, root: Path) -> None:
        from edge_sdk.signing import generate_keypair, sign_bundle

        self.root = root
        self.key, self.pub = generate_keypair(root / "keys", "release")
        self.other_key, self.other_pub = generate_keypair(root / "other_keys", "intruder")
        self.dirs: dict[str, Path] = {}
        for seed, version in ((0, "1"), (1, "2"), (2, "3")):
            d = _convert(root / f"v{version}", seed, version)
            sign_bundle(d, self.key)
            self.dirs[version] = d
        # "4": the artifact of v2 with a wrong recorded reference (v1's output): signed and hashed, smoke test fails
        bad = root / "v4"
        shutil.copytree(self.dirs["2"], bad)
        (bad / "signature.json").unlink()
        b = Bundle.load(bad)
        b.manifest.version = "4"
        b.save()
        shutil.copy(self.dirs["1"] / "smoke/reference_output_0.npy", bad / "smoke/reference_output_0.npy")
        _rehash_side_file(bad, "smoke/reference_output_0.npy")
        sign_bundle(bad, self.key)
        self.dirs["4"] = bad
        # unsigned, signed by an untrusted key, and tampered after signing (one flipped byte in the model)
        for tag, how in (("unsigned", None), ("intruder", self.other_key), ("tampered", self.key)):
            d = root / f"v2-{tag}"
            shutil.copytree(self.dirs["2"], d)
            (d / "signature.json").unlink()
            if how is not None:
                sign_bundle(d, how)
            if tag == "tampered":
                onnx = d / Bundle.load(d).artifacts[0].path
                data = bytearray(onnx.read_bytes())
                data[len(data) // 2] ^= 0x01
                onnx.write_bytes(bytes(data))
            self.dirs[tag] = d
        self.www = root / "www"
        self.www.mkdir()
        self.archives = {k: Bundle.load(d).archive(self.www / f"tiny-{k}.tar.gz") for k, d in self.dirs.items()}

    def sha(self, key: str) -> str:
        return sha256_file(self.archives[key])

    def size(self, key: str) -> int:
        return self.archives[key].stat().st_size


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("updater_material"))


# ---- a real HTTP server with Range support ----------------------------------------------------------------------


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv: RangeServer = self.server  # type: ignore[assignment]
        path = srv.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        size = len(data)
        etag = f'"{sha256_file(path)[:16]}"'
        start, end, status = 0, size - 1, 200
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                srv.log.append({"range": rng, "status": 416, "sent": 0})
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        drop_after = srv.drop_after.pop(0) if srv.drop_after else None
        entry = {"range": rng, "status": status, "start": start, "sent": 0}
        srv.log.append(entry)
        pos, chunk = start, 16384
        try:
            while pos <= end:
                n = min(chunk, end + 1 - pos)
                if drop_after is not None and entry["sent"] + n > drop_after:
                    n = drop_after - entry["sent"]
                    self.wfile.write(data[pos:pos + n])
                    self.wfile.flush()
                    entry["sent"] += n
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[pos:pos + n])
                entry["sent"] += n
                pos += n
                if srv.rate:
                    time.sleep(n / srv.rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class RangeServer(LoopbackServer):
    """Serves files from ``root`` with Range/If-Range/ETag; ``drop_after`` cuts the next transfers after so many
    bytes; ``rate`` throttles (bytes/s); ``log`` records every request."""

    def __init__(self, root: Path) -> None:
        super().__init__(_RangeHandler)
        self.root = root
        self.drop_after: list[int] = []
        self.rate: float | None = None
        self.log: list[dict[str, Any]] = []


@pytest.fixture()
def server(material: Material) -> Iterator[RangeServer]:
    with serving(RangeServer(material.www)) as srv:
        yield srv


# ---- helpers ------------------------------------------------------------------------------------------------------


def _updater(material: Material, root: Path, **kw: Any) -> tuple[Updater, Events]:
    return make_updater(material.pub, root, **kw)


def _label(path: Path | None) -> str | None:
    return None if path is None else f"{Bundle.load(path).manifest.name}:{Bundle.load(path).manifest.version}"


@pytest.fixture()
def store_v1(material: Material, tmp_path: Path) -> Path:
    """A store with v1 installed (from a local archive path) and current."""
    up, _ = _updater(material, tmp_path / "store")
    up.update(material.archives["1"], expected_sha256=material.sha("1"))
    return tmp_path / "store"


def _snapshot(store: Path) -> tuple[str, str | None]:
    prev = store / "previous"
    return os.readlink(store / "current"), os.readlink(prev) if prev.is_symlink() else None


# ---- the smoke sample -------------------------------------------------------------------------------------------


def test_bundles_carry_a_signed_smoke_sample(material: Material) -> None:
    from edge_sdk.signing import verify_bundle

    b = Bundle.load(material.dirs["1"])
    spec = b.manifest.extra["smoke_test"]
    assert spec["inputs"] == ["smoke/input_0.npy"] and spec["reference_outputs"] == ["smoke/reference_output_0.npy"]
    assert spec["tolerances"]["fp32"]["min_cosine"] == 0.9999 and spec["tolerances"]["fp32"]["atol"] > 0
    listed = {f["path"] for f in b.artifacts[0].files}
    assert {"smoke/input_0.npy", "smoke/reference_output_0.npy"} <= listed
    x, ref = load_smoke_sample(b)
    assert x[0].shape == (1, 3, 32, 32) and ref[0].shape == (1, 10)
    with Agent(b, threads=1) as agent:  # the reference is the source model's output for that real input
        np.testing.assert_allclose(agent.predict(x[0]).outputs["output"], ref[0], atol=1e-5)
    res = run_smoke_test(b)
    assert res.passed and res.cosine > 0.9999 and res.artifact == "onnx/fp32" and res.runtime == "onnxruntime"
    assert verify_bundle(material.dirs["1"], material.pub)  # the smoke files are covered by the signature
    bad = run_smoke_test(material.dirs["4"])
    assert not bad.passed and "cosine" in bad.reason and "\n" not in bad.reason


def test_altered_smoke_file_is_refused(material: Material, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(material.dirs["1"], d)
    np.save(d / "smoke/input_0.npy", np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(BundleError) as exc:
        load_smoke_sample(Bundle.load(d))
    assert "smoke/input_0.npy does not match its sha256" in _one_line(exc)


# ---- updates ------------------------------------------------------------------------------------------------------


def test_update_over_http_resumes_after_a_dropped_connection(material: Material, store_v1: Path,
                                                            server: RangeServer) -> None:
    up, events = _updater(material, store_v1)
    size = material.size("2")
    cut = size * 2 // 5
    server.drop_after = [cut]
    path = up.update(server.url("tiny-2.tar.gz"), expected_sha256=material.sha("2"), expected_size=size,
                     deployment_id="dep-1")
    assert _label(path) == "tiny:2" and up.current_bundle() == path
    # the second request asked for exactly the missing bytes, and nothing was fetched twice
    assert [e["status"] for e in server.log] == [200, 206]
    assert server.log[1]["range"] == f"bytes={cut}-" and server.log[1]["start"] == cut
    assert sum(e["sent"] for e in server.log) == size
    assert events.kinds == ["update.downloading", "update.downloaded", "update.verified", "update.smoke_test",
                            "update.switched"]
    assert events.last("update.downloaded")["attempts"] == 2 and events.last("update.switched")["from"] == "tiny:1"
    assert events.last("update.smoke_test")["passed"] is True
    assert events.last("update.verified")["key_id"] and events.last("update.verified")["signed"] is True
    store = ModelStore(store_v1)
    assert _label(store.link("previous") / "bundle") == "tiny:1"
    assert (store.link("current") / ".verified").is_file()
    assert not list(store.staging_dir.iterdir())  # download and work dirs cleaned
    state = json.loads((store_v1 / "state.json").read_text())
    assert state["current"].startswith("tiny-2-") and state["previous"].startswith("tiny-1-")
    assert state["history"][-1]["deployment_id"] == "dep-1"
    with Agent(path, threads=1) as agent:
        assert agent.model_version == "tiny:2"


def test_download_resumes_after_the_process_was_killed(material: Material, store_v1: Path,
                                                       server: RangeServer, tmp_path: Path) -> None:
    server.rate = 2_000_000  # ~1 s for the archive: time to kill the downloader half-way
    size, sha = material.size("3"), material.sha("3")
    proc = subprocess.Popen([sys.executable, str(_worker_script(tmp_path)), str(store_v1),
                             server.url("tiny-3.tar.gz"), sha, str(size), str(material.pub)],
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().split()[0] == "ready"
    part = store_v1 / "staging" / f"{sha[:16]}.part"
    deadline = time.monotonic() + 30
    while (not part.exists() or part.stat().st_size < size // 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    have = part.stat().st_size
    assert 0 < have < size
    server.rate = None
    up, events = _updater(material, store_v1)
    assert up.recover().version.label == "tiny:1"  # the killed update changed nothing; the .part stays
    assert part.stat().st_size == have
    path = up.update(server.url("tiny-3.tar.gz"), expected_sha256=sha, expected_size=size)
    assert _label(path) == "tiny:3"
    resumed = server.log[-1]
    assert resumed["status"] == 206 and resumed["start"] >= have and resumed["range"].startswith("bytes=")
    assert events.last("update.downloading")["resume_from"] == resumed["start"]
    assert events.last("update.downloaded")["resumed_from"] == resumed["start"]


def test_a_file_changed_on_the_server_is_not_spliced(material: Material, server: RangeServer, tmp_path: Path) -> None:
    from edge_sdk.device_agent.download import DownloadError, fetch

    dest = tmp_path / "x.part"
    name = "changing.tar.gz"
    shutil.copy(material.archives["2"], material.www / name)
    server.drop_after = [material.size("2") // 2]
    with pytest.raises(DownloadError) as exc:
        fetch(server.url(name), dest, retries=0, backoff_s=0)
    assert "failed after 1 attempts" in _one_line(exc)
    assert 0 < dest.stat().st_size < material.size("2")
    shutil.copy(material.archives["3"], material.www / name)  # replaced on the server before the resume
    try:
        res = fetch(server.url(name), dest, expected_sha256=material.sha("3"), backoff_s=0)
    finally:
        (material.www / name).unlink()
    assert res.sha256 == material.sha("3") and res.resumed_from == 0
    assert server.log[-1]["status"] == 200 and server.log[-1]["range"]  # If-Range did not match: the whole file


@pytest.mark.parametrize(("kw", "message"), [
    ({"expected_sha256": "0" * 64}, "sha256"),
    ({"expected_size": 123}, "the update command says 123"),
])
def test_wrong_sha_or_size_is_refused_and_current_untouched(material: Material, store_v1: Path, server: RangeServer,
                                                             kw: dict[str, Any], message: str) -> None:
    up, events = _updater(material, store_v1)
    before = _snapshot(store_v1)
    with pytest.raises(UpdateError) as exc:
        up.update(server.url("tiny-2.tar.gz"), **kw)
    text = _one_line(exc)
    assert "failed at download" in text and message in text
    assert _snapshot(store_v1) == before and _label(up.current_bundle()) == "tiny:1"
    assert events.kinds[-1] == "update.failed" and events.last("update.failed")["step"] == "download"
    assert not list((store_v1 / "staging").iterdir())  # the bad download is not kept for resuming
    assert len(list((store_v1 / "versions").iterdir())) == 1


@pytest.mark.parametrize(("key", "step", "message"), [
    ("unsigned", "verify", "is unsigned"),
    ("intruder", "verify", "none of them trusted"),
    ("tampered", "verify", "does not match its sha256"),
    ("4", "smoke_test", "smoke test of tiny:4 (onnx/fp32 on onnxruntime) failed: cosine"),
])
def test_bad_bundles_are_refused_and_current_untouched(material: Material, store_v1: Path, server: RangeServer,
                                                       key: str, step: str, message: str) -> None:
    up, events = _updater(material, store_v1)
    before = _snapshot(store_v1)
    with pytest.raises(UpdateError) as exc:
        up.update(server.url(f"tiny-{key}.tar.gz"), expected_sha256=material.sha(key))
    text = _one_line(exc)
    assert f"failed at {step}" in text and message in text, text
    assert _snapshot(store_v1) == before and _label(up.current_bundle()) == "tiny:1"
    assert events.last("update.failed")["step"] == step
    if step == "smoke_test":
        assert events.last("update.smoke_test")["passed"] is False
    assert "update.switched" not in events.kinds
    assert not list((store_v1 / "staging").iterdir()) and len(list((store_v1 / "versions").iterdir())) == 1
    failure = json.loads((store_v1 / "state.json").read_text())["failures"][-1]
    assert failure["step"] == step and failure["transient"] is False


def test_name_or_version_must_match_the_command(material: Material, store_v1: Path) -> None:
    up, _ = _updater(material, store_v1)
    with pytest.raises(UpdateError) as exc:
        up.update(material.archives["2"], version="9")
    assert "version '2' (the command says '9')" in _one_line(exc)


def test_keys_are_required_unless_unsigned_is_allowed(material: Material, tmp_path: Path) -> None:
    with pytest.raises(UpdateError) as exc:
        Updater(tmp_path / "s")
    assert "allow_unsigned=True" in _one_line(exc)
    up = Updater(tmp_path / "s", allow_unsigned=True)
    assert _label(up.update(material.archives["unsigned"])) == "tiny:2"


def test_rollback_swaps_current_and_previous(material: Material, store_v1: Path) -> None:
    switched: list[str] = []
    up, events = _updater(material, store_v1, on_switch=lambda p: switched.append(_label(p)))
    up.update(material.archives["2"])
    assert _label(up.rollback()) == "tiny:1"
    store = up.store
    assert _label(store.link("previous") / "bundle") == "tiny:2"
    assert events.last("update.rolled_back") == {"from": "tiny:2", "to": "tiny:1", "reason": "requested"}
    assert _label(up.rollback(reason="again")) == "tiny:2"
    assert switched == ["tiny:2", "tiny:1", "tiny:2"]
    fresh, _ = _updater(material, store_v1 / ".." / "empty")
    with pytest.raises(UpdateError) as exc:
        fresh.rollback()
    assert "nothing to roll back to" in _one_line(exc)


def test_a_model_that_fails_to_start_is_rolled_back(material: Material, store_v1: Path) -> None:
    from edge_sdk.errors import InferenceError

    loaded: list[str] = []

    def on_switch(path: Path) -> None:
        if _label(path) == "tiny:2":
            raise InferenceError("out of memory loading the model")
        loaded.append(_label(path))

    up, events = _updater(material, store_v1, on_switch=on_switch)
    with pytest.raises(UpdateError) as exc:
        up.update(material.archives["2"])
    assert "failed at activate: the new model failed to start: out of memory" in _one_line(exc)
    assert _label(up.current_bundle()) == "tiny:1" and loaded == ["tiny:1"]
    assert "update.rolled_back" in events.kinds


def test_commands_are_idempotent_and_a_rolled_back_deployment_is_not_retried(material: Material, store_v1: Path,
                                                                             server: RangeServer) -> None:
    up, _ = _updater(material, store_v1)
    cmd = {"schema": "edge-sdk/command", "command": "update", "command_id": "a" * 32, "deployment_id": "d1",
           "model": {"name": "tiny", "version": "2", "url": server.url("tiny-2.tar.gz"), "sha256": material.sha("2"),
                     "size_bytes": material.size("2")}}
    r = up.handle_command("update", cmd)
    assert r["status"] == "switched" and r["version"] == "tiny:2" and r["command_id"] == "a" * 32
    n_requests = len(server.log)
    assert up.handle_command("update", cmd)["status"] == "current"  # the retained command seen again
    assert len(server.log) == n_requests  # nothing downloaded
    from edge_sdk.rollback_auth import sign_rollback

    assert up.handle_command("rollback", {"command": "rollback"})["status"] == "refused"  # issue 13: unsigned
    auth = sign_rollback(material.key, name="tiny", from_version="2", to_version="1")
    rb = {"command": "rollback", "command_id": "b" * 32, "target_version": "1", "authorisation": auth}
    assert up.handle_command("rollback", rb)["status"] == "rolled_back"
    assert _label(up.current_bundle()) == "tiny:1"
    r = up.handle_command("update", cmd)  # retained cmd/update after a reconnect: not re-applied
    assert r["status"] == "refused" and "rolled back" in r["reason"]
    r = up.handle_command("update", {**cmd, "deployment_id": "d2"})  # a new deployment of it: installed again
    assert r["status"] == "switched" and len(server.log) == n_requests  # from the installed copy
    bad = {**cmd, "deployment_id": "d3", "model": {**cmd["model"], "version": "4", "url": server.url("tiny-4.tar.gz"),
                                                   "sha256": material.sha("4"), "size_bytes": material.size("4")}}
    r = up.handle_command("update", bad)
    assert r["status"] == "failed" and "failed at smoke_test" in r["reason"]
    assert up.handle_command("update", bad)["status"] == "refused"  # not retried for the same deployment
    assert up.handle_command("update", {"model": {}})["status"] == "failed"
    assert up.handle_command("resend", {})["status"] == "ignored"
    assert _label(up.current_bundle()) == "tiny:2"


def test_on_command_runs_on_a_worker_thread(material: Material, store_v1: Path, server: RangeServer) -> None:
    up, _ = _updater(material, store_v1)
    server.rate = 4_000_000
    up.on_command("update", {"deployment_id": "x", "model": {"url": server.url("tiny-3.tar.gz"),
                                                             "sha256": material.sha("3"),
                                                             "size_bytes": material.size("3")}})
    assert up.last_result is None  # returned at once; the throttled download alone takes ~0.5 s
    assert up.join(60)
    assert up.last_result["status"] == "switched" and _label(up.current_bundle()) == "tiny:3"
    up.close()


def test_recover_falls_back_to_a_verified_version(material: Material, store_v1: Path) -> None:
    up, events = _updater(material, store_v1)
    up.update(material.archives["2"])
    store = up.store
    # leftovers of a crash: a work dir, a temp link, a temp state file, an unmarked version dir
    (store.staging_dir / "update.dead.work" / "bundle").mkdir(parents=True)
    os.symlink("versions/x", store.root / "current.tmp")
    (store.root / "state.json.123.tmp").write_text("{")
    (store.versions_dir / "half-installed").mkdir()
    # the current version's model file is damaged on disk
    cur = store.link("current") / "bundle"
    onnx = cur / Bundle.load(cur).artifacts[0].path
    onnx.write_bytes(onnx.read_bytes()[:-10])
    res = up.recover()
    assert res.changed and res.version.label == "tiny:1" and "fell back to previous" in res.reason
    assert "does not match its sha256" in res.reason
    assert {"staging/update.dead.work", "current.tmp", "state.json.123.tmp", "versions/half-installed"} <= \
        set(res.removed)
    assert events.last("update.recovered")["to"] == "tiny:1"
    assert store.link("previous") is None
    assert up.recover().changed is False  # stable
    assert run_smoke_test(res.bundle_path).passed
    # no verified version at all
    shutil.rmtree(store.link("current") / "bundle")
    res = up.recover()
    assert res.version is None and "no verified model" in res.reason and up.current_bundle() is None


def test_gc_keeps_current_previous_and_k_old(material: Material, tmp_path: Path) -> None:
    up, _ = _updater(material, tmp_path / "s", keep_old=1)
    for v in ("1", "2", "3"):
        up.update(material.archives[v])
    assert len(list(up.store.versions_dir.iterdir())) == 3
    up.keep_old = 0
    up.update(material.archives["1"])  # already installed: the same version dir is reused
    names = sorted(p.name.split("-")[1] for p in up.store.versions_dir.iterdir())
    assert names == ["1", "3"]  # current 1, previous 3; 2 removed
    assert _label(up.current_bundle()) == "tiny:1" and _label(up.store.link("previous") / "bundle") == "tiny:3"


# ---- acceptance 3: kill -9 at random points of an update ---------------------------------------------------------

_WORKER = '''
import sys, time
import onnxruntime  # a running agent has its runtime loaded already
from edge_sdk.device_agent.updater import ModelStore, Updater
store, url, sha, size, keys = sys.argv[1:6]
def say(kind):
    # one write per line: under PYTHONUNBUFFERED print() writes its pieces apart, and a kill between them
    # would leave half a line
    sys.stdout.write(f"{kind} {time.monotonic()}\\n")
    sys.stdout.flush()
def emit(kind, data, level):
    say(kind)
up = Updater(ModelStore(store), trusted_keys=keys, emit_event=emit, keep_old=0)
say("ready")
up.update(url, expected_sha256=sha, expected_size=int(size))
say("done")
'''

_RECOVER = '''
import json, sys
from edge_sdk.device_agent.agent import Agent
from edge_sdk.device_agent.updater import ModelStore, Updater
from edge_sdk.device_agent.smoke import run_smoke_test
up = Updater(ModelStore(sys.argv[1]), trusted_keys=sys.argv[2])
res = up.recover()
out = {"label": res.version.label if res.version else None, "reason": res.reason, "changed": res.changed}
if res.version is not None:
    with Agent(res.bundle_path, threads=1) as agent:
        smoke = run_smoke_test(agent)
        out.update(smoke=smoke.passed, version=agent.model_version)
print(json.dumps(out))
'''


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}


def _worker_script(tmp_path: Path) -> Path:
    p = tmp_path / "update_worker.py"
    p.write_text(_WORKER)
    return p


def _kill_trials(material: Material, tmp_path: Path, n: int, seed: int) -> dict[str, Any]:
    """``n`` updates killed at a uniformly random instant of a full update's duration, each followed by a fresh
    recovering process; the store carries over from trial to trial (leftovers, resumable parts and all)."""
    srv = RangeServer(material.www)
    srv.rate = 8_000_000  # the download is a real phase of the update (~0.25 s), as on a device
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    worker, recover = _worker_script(tmp_path), tmp_path / "recover.py"
    recover.write_text(_RECOVER)
    store = tmp_path / "store"
    cycle = ["1", "2", "3"]
    Updater(ModelStore(store), trusted_keys=material.pub, keep_old=0).update(material.archives["1"])
    rng = random.Random(seed)

    def run_update(target: str, kill_at: float | None) -> list[tuple[str, float]]:
        """Events the worker printed, as (kind, seconds after "ready"), until it finished or was killed."""
        proc = subprocess.Popen([sys.executable, str(worker), str(store), srv.url(f"tiny-{target}.tar.gz"),
                                 material.sha(target), str(material.size(target)), str(material.pub)],
                                stdout=subprocess.PIPE, text=True, env=_env())
        first = proc.stdout.readline().split()
        assert first[0] == "ready", first
        if kill_at is not None:
            time.sleep(kill_at)
            proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()
        proc.wait(60)
        # a kill can land inside a write: a last line without its newline is cut, not an event
        lines = [line.split() for line in out.split("\n")[:-1]]
        return [(kind, float(t) - float(first[1])) for kind, t in lines]

    try:
        # T: the duration of a complete update (worker ready -> update returned), measured now, under this load
        durations = []
        for _ in range(3):
            cur = Updater(ModelStore(store), trusted_keys=material.pub).recover().version.version
            target = cycle[(cycle.index(cur) + 1) % 3]
            seen = run_update(target, None)
            assert [k for k, _ in seen] == ["update.downloading", "update.downloaded", "update.verified",
                                            "update.smoke_test", "update.switched", "done"], seen
            durations.append(seen[-1][1])
        full = sorted(durations)[1]
        outcomes: Counter[str] = Counter()
        phases: Counter[str] = Counter()
        old = f"tiny:{Updater(ModelStore(store), trusted_keys=material.pub).recover().version.version}"
        for _ in range(n):
            target = cycle[(cycle.index(old.split(":")[1]) + 1) % 3]  # never installed (keep_old=0) unless a
            # killed trial installed it without switching: then the update finds it and only switches
            seen = run_update(target, rng.uniform(0, full))
            phases[seen[-1][0] if seen else "ready"] += 1
            after = subprocess.run([sys.executable, str(recover), str(store), str(material.pub)],
                                   capture_output=True, text=True, env=_env())
            assert after.returncode == 0, after.stderr[-2000:]
            res = json.loads(after.stdout)
            assert res["label"] in (old, f"tiny:{target}"), res
            assert res["smoke"] is True and res["version"] == res["label"], res
            outcomes["new" if res["label"] == f"tiny:{target}" else "old"] += 1
            old = res["label"]
        return {"trials": n, "full_update_s": round(full, 3), "outcomes": dict(outcomes), "killed_after": dict(phases)}
    finally:
        srv.shutdown()
        srv.server_close()


def test_kill9_during_update_10_trials(material: Material, tmp_path: Path, record_property: Any) -> None:
    result = _kill_trials(material, tmp_path, 10, seed=1)
    record_property("kill9", result)
    print("kill -9 trials:", json.dumps(result))
    assert sum(result["outcomes"].values()) == 10


@pytest.mark.slow
@pytest.mark.soak  # 100 killed updates (~3 min idle, 12 min under load); the 10-trial test runs in `make test`
def test_kill9_during_update_100_trials(material: Material, tmp_path: Path, record_property: Any) -> None:
    result = _kill_trials(material, tmp_path, 100, seed=2)
    record_property("kill9", result)
    print("kill -9 trials:", json.dumps(result))
    assert sum(result["outcomes"].values()) == 100
