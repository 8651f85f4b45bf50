"""A signed release through the ``edge-sdk`` command line (issue 13 follow-up): ``convert --version-code --fleet``,
``bundle sign --version-code --fleet``, ``registry promote`` of a signed version, ``deploy --rollback-key`` (refused
without the key, and outside the bundle's fleets) and ``rollback --rollback-key`` whose command carries a rollback
authorisation that verifies against the release key.

Real conversion, real ed25519 keys made by ``edge-sdk keys new``, a real SQLite fleet database and the machine's
Mosquitto (a subscriber on the test's own fleet sees what was sent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mqtt_helpers import SYSTEM_BROKER, Subscriber, require_system_broker, unique_fleet, wait_until

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny:1 converted by the CLI with --version-code 1 --fleet FLEET (unsigned), a key pair and its trust dir."""
    import torch
    from tiny_models import make_tiny

    d = tmp_path_factory.mktemp("release")
    fleet = unique_fleet("rel")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    code = main(["convert", str(d / "tiny.pt"), "--model-class", "tiny_models:TinyCNN", "--input-shape", "1,3,32,32",
                 "--to", "onnx", "--no-ort", "--name", "tiny", "--model-version", "1", "--version-code", "1",
                 "--fleet", fleet, "--out", str(d / "v1"), "--json"])
    assert code == 0
    assert main(["keys", "new", "--dir", str(d / "keys"), "--name", "release"]) == 0
    trust = d / "trust"
    trust.mkdir()
    shutil.copy(d / "keys" / "release.pub.pem", trust)
    return {"dir": d, "fleet": fleet, "key": str(d / "keys" / "release.key"), "trust": str(trust)}


def test_convert_writes_the_identity_and_refuses_a_bad_one(release: dict, capsys: pytest.CaptureFixture) -> None:
    m = Bundle.load(release["dir"] / "v1").manifest
    assert (m.version_code, m.fleets) == (1, [release["fleet"]])
    assert json.loads((release["dir"] / "v1" / "manifest.json").read_text())["version_code"] == 1
    with pytest.raises(SystemExit) as exit_:  # a parse error, before any model is loaded
        main(["convert", "m.onnx", "--out", str(release["dir"] / "never"), "--version-code", "-3"])
    assert exit_.value.code == 2 and "whole number" in capsys.readouterr().err
    code = main(["convert", "m.onnx", "--out", str(release["dir"] / "never"), "--fleet", "a/b"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--fleet 'a/b' is not valid" in err and "\n" not in err, err
    assert not (release["dir"] / "never").exists()


def test_signed_release_promote_deploy_and_rollback(release: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    require_system_broker()
    d, fleet, key, trust = release["dir"], release["fleet"], release["key"], release["trust"]
    v1 = Path(shutil.copytree(d / "v1", tmp_path / "v1"))
    assert main(["bundle", "sign", str(v1), "--key", key]) == 0  # the identity written by convert is kept
    assert "version_code" not in capsys.readouterr().out
    v2 = Path(shutil.copytree(d / "v1", tmp_path / "v2"))
    b = Bundle.load(v2)
    b.manifest.version = "2"
    b.save()
    assert main(["bundle", "sign", str(v2), "--key", key, "--version-code", "2", "--fleet", fleet,
                 "--fleet", "spare"]) == 0
    out = capsys.readouterr().out
    assert "(version_code 2; fleet(s) " in out and "spare" in out
    m2 = Bundle.load(v2).manifest
    assert m2.version_code == 2 and m2.fleets == sorted([fleet, "spare"])
    assert main(["bundle", "verify", str(v2), "--trusted-keys", trust]) == 0  # the identity is under the signature

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    reg = ["--db", db, "--registry-dir", str(tmp_path / "reg")]
    for bundle in (v1, v2):
        assert main(["registry", "add", str(bundle), *reg, "--trusted-keys", trust]) == 0
    assert main(["registry", "promote", "tiny", "2", *reg]) == 0  # signed: no --allow-unsigned needed
    assert "tiny:2 promoted to canary" in capsys.readouterr().out
    deploy = ["deploy", "tiny", "2", "--fleet", fleet, "--hold", "30s", "--devices", "cam-a,cam-b", "--base-url",
              "http://bundles.local:8081", "--mqtt", SYSTEM_BROKER, *reg]
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/cmd/#") as sub:
        # a version_code without a key to sign rollbacks with: refused, nothing sent
        assert main(deploy) == 2
        err = capsys.readouterr().err.strip()
        assert "--rollback-key" in err and "\n" not in err, err
        # another fleet than the signed ones: refused
        other = [("elsewhere" if a == fleet else a) for a in deploy]
        assert main([*other, "--rollback-key", key]) == 2
        assert "signed to run only in fleet(s)" in capsys.readouterr().err
        assert main([*deploy, "--rollback-key", key]) == 0
        assert "stage 1 sent to" in capsys.readouterr().out
        assert wait_until(lambda: any(m.topic.endswith("/cmd/update") for m in sub.received()))
        n = len(sub.received())
        assert main(["rollback", "tiny", "--fleet", fleet, "--reason", "canary unhappy", "--mqtt", SYSTEM_BROKER,
                     "--rollback-key", key, *reg]) == 0
        assert "rolled back: canary unhappy" in capsys.readouterr().out
        assert wait_until(lambda: any(m.topic.endswith("/cmd/rollback") for m in sub.received()[n:]))
        back = json.loads(next(m.payload for m in sub.received()[n:] if m.topic.endswith("/cmd/rollback")))
    from edge_sdk.rollback_auth import verify_rollback

    statement = verify_rollback(back["authorisation"], trust)
    assert (statement["name"], statement["from_version"], statement["from_version_code"], statement["fleet"]) == \
        ("tiny", "2", 2, fleet)
    assert statement["reason"] == "canary unhappy"
