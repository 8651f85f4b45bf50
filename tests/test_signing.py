"""Bundle signing and safe unpacking (issue 6, acceptance 4) on a real tiny-CNN ONNX bundle.

A flipped byte, a wrong key, an unsigned bundle, unlisted files, and archives with ``../`` paths, absolute
paths, links, devices or duplicate names are all refused with a one-line reason; nothing is left behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main
from edge_sdk.errors import BundleError, EdgeSDKError
from edge_sdk.signing import (
    SIGNATURE_NAME,
    SignatureError,
    generate_keypair,
    key_id,
    load_public_keys,
    sign_bundle,
    verify_bundle,
)

ARTIFACT = "onnx/fp32.onnx"
SIDE_FILE = "ort/fp32.required_operators.config"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle: a tiny CNN converted to ONNX fp32 plus .ort (which carries a side file)."""
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("signing")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", preprocessing=Preprocessing(size=(32, 32)), out=d / "bundle", name="tiny",
                     version="3", quiet=True)
    return d / "bundle"


@pytest.fixture()
def bundle(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the real bundle for one test."""
    return Path(shutil.copytree(built, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two key pairs, ``old`` and ``new``, each with its public key alone in a trust directory."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("old", "new"):
        priv, pub = generate_keypair(d / "private", name)
        trust = d / f"trust-{name}"
        trust.mkdir()
        shutil.copy(pub, trust / pub.name)
        out[name] = (priv, trust)
    return out


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# --- keys ----------------------------------------------------------------------------------------------------

def test_keypair_files_modes_id_and_no_overwrite(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k", "signer")
    assert (priv.name, pub.name) == ("signer.key", "signer.pub.pem")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(pub.read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert list(load_public_keys(pub)) == [hashlib.sha256(raw).hexdigest()[:16]] == [key_id(public)]
    before = priv.read_bytes()
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path / "k", "signer")
    assert priv.read_bytes() == before
    with pytest.raises(SignatureError, match="key name"):
        generate_keypair(tmp_path / "k", "../escape")
    a, _ = generate_keypair(tmp_path / "k")
    b, _ = generate_keypair(tmp_path / "k")
    assert a != b and a.name.startswith("key-")


def test_private_key_is_not_a_trusted_key(tmp_path: Path) -> None:
    priv, _ = generate_keypair(tmp_path, "k")
    with pytest.raises(SignatureError, match="looks like a private key"):
        load_public_keys(priv)
    with pytest.raises(SignatureError, match="not found"):
        load_public_keys(priv.with_name("missing.pub.pem"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureError, match="no trusted public keys"):
        load_public_keys(tmp_path / "empty")


# --- sign and verify -----------------------------------------------------------------------------------------

def test_sign_and_verify_real_bundle(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    kid = sign_bundle(bundle, priv)
    assert verify_bundle(bundle, trust) == kid == next(iter(load_public_keys(trust)))
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    assert doc["manifest_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert [(s["algorithm"], s["key_id"]) for s in doc["signatures"]] == [("ed25519", kid)]
    assert len(base64.b64decode(doc["signatures"][0]["signature"])) == 64
    Bundle.load(bundle).verify()  # signature.json does not disturb the bundle's own check


def test_flipped_byte_in_artifact_is_refused_naming_the_file(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    _flip(bundle / ARTIFACT)
    with pytest.raises(SignatureError, match=f"{ARTIFACT} does not match its sha256") as err:
        verify_bundle(bundle, trust)
    assert "\n" not in str(err.value) and SIDE_FILE not in str(err.value)


def test_flipped_byte_in_side_file_is_refused_naming_the_file(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    _flip(bundle / SIDE_FILE, 0)
    with pytest.raises(SignatureError, match=f"{SIDE_FILE} does not match its sha256"):
        verify_bundle(bundle, trust)


def test_flipped_byte_in_manifest_is_refused(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    mpath = bundle / "manifest.json"
    text = mpath.read_bytes()
    mpath.write_bytes(text.replace(b'"version": "3"', b'"version": "4"', 1))
    assert mpath.read_bytes() != text
    with pytest.raises(SignatureError, match=r"does not match manifest\.json \(it changed after signing\)"):
        verify_bundle(bundle, trust)


def test_replaced_artifact_with_updated_manifest_hash_is_refused(bundle: Path, keys: dict) -> None:
    """The real attack: swap the model and fix its sha256 in the manifest; the signature no longer matches."""
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    _flip(bundle / ARTIFACT)
    b = Bundle.load(bundle)
    b.artifact("onnx", "fp32").sha256 = hashlib.sha256((bundle / ARTIFACT).read_bytes()).hexdigest()
    b.save()
    b.verify()  # hashes alone are consistent again ...
    with pytest.raises(SignatureError, match="changed after signing"):  # ... but the signature is not
        verify_bundle(bundle, trust)


def test_wrong_key_is_refused(bundle: Path, keys: dict) -> None:
    sign_bundle(bundle, keys["old"][0])
    old_id = next(iter(load_public_keys(keys["old"][1])))
    with pytest.raises(SignatureError, match=f"signed by key\\(s\\) {old_id}, none of them trusted"):
        verify_bundle(bundle, keys["new"][1])


def test_forged_signature_under_a_trusted_key_id_is_refused(bundle: Path, keys: dict) -> None:
    """Signed by an attacker's key but labelled with the trusted key's id: the trusted key does not verify it."""
    sign_bundle(bundle, keys["new"][0])
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    doc["signatures"][0]["key_id"] = next(iter(load_public_keys(keys["old"][1])))
    (bundle / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_bundle(bundle, keys["old"][1])


def test_unsigned_bundle_is_refused(bundle: Path, keys: dict) -> None:
    with pytest.raises(SignatureError, match=r"is unsigned: sign it with `edge-sdk bundle sign .* --key KEY`"):
        verify_bundle(bundle, keys["old"][1])


def test_unlisted_file_and_link_are_refused_and_not_signed(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    (bundle / "onnx" / "hook.py").write_text("import os\n")
    with pytest.raises(SignatureError, match=r"onnx/hook\.py is not listed in the manifest"):
        verify_bundle(bundle, trust)
    with pytest.raises(SignatureError, match=r"cannot sign .*onnx/hook\.py is not listed"):
        sign_bundle(bundle, priv)
    (bundle / "onnx" / "hook.py").unlink()
    (bundle / "extra-link").symlink_to("/etc/passwd")
    with pytest.raises(SignatureError, match="extra-link is a symbolic link"):
        verify_bundle(bundle, trust)
    (bundle / "extra-link").unlink()
    assert verify_bundle(bundle, trust)


def test_artifact_replaced_by_link_is_refused(bundle: Path, keys: dict, tmp_path: Path) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / ARTIFACT, outside)  # same bytes, same sha256, but reached through a link
    (bundle / ARTIFACT).symlink_to(outside)
    with pytest.raises(SignatureError, match=f"{ARTIFACT} is a symbolic link"):
        verify_bundle(bundle, trust)


def test_missing_file_is_refused(bundle: Path, keys: dict) -> None:
    priv, trust = keys["old"]
    sign_bundle(bundle, priv)
    (bundle / SIDE_FILE).unlink()
    with pytest.raises(SignatureError, match=f"{SIDE_FILE} is missing"):
        verify_bundle(bundle, trust)


def test_tampered_bundle_is_not_signed(bundle: Path, keys: dict) -> None:
    _flip(bundle / ARTIFACT)
    with pytest.raises(BundleError, match="does not match its sha256"):
        sign_bundle(bundle, keys["old"][0])
    assert not (bundle / SIGNATURE_NAME).exists()


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not JSON"),
    (b'{"signatures": []}', "no `signatures` list"),
    (b'{"signatures": [{"algorithm": "ed25519", "key_id": 5, "signature": "x"}]}', "key_id and signature"),
    (b'{"signatures": [{"algorithm": "rsa", "key_id": "K", "signature": "x"}]}', "'rsa' is not supported"),
])
def test_malformed_signature_file_is_refused(bundle: Path, keys: dict, content: bytes, reason: str) -> None:
    (bundle / SIGNATURE_NAME).write_bytes(content)
    with pytest.raises(SignatureError, match=f"signature.json is malformed .*{reason}"):
        verify_bundle(bundle, keys["old"][1])


def test_non_base64_signature_is_refused(bundle: Path, keys: dict) -> None:
    sign_bundle(bundle, keys["old"][0])
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    doc["signatures"][0]["signature"] = "not base64!"
    (bundle / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="is not base64"):
        verify_bundle(bundle, keys["old"][1])


def test_key_rotation_cosign_then_retire(bundle: Path, keys: dict, tmp_path: Path) -> None:
    (old_priv, old_trust), (new_priv, new_trust) = keys["old"], keys["new"]
    old_id, new_id = next(iter(load_public_keys(old_trust))), next(iter(load_public_keys(new_trust)))
    device = tmp_path / "device-trust"  # the device trusts both keys during the rotation
    device.mkdir()
    for t in (old_trust, new_trust):
        for f in t.iterdir():
            shutil.copy(f, device / f.name)
    assert sign_bundle(bundle, old_priv) == old_id
    assert verify_bundle(bundle, device) == old_id
    assert sign_bundle(bundle, new_priv) == new_id  # co-sign
    assert sign_bundle(bundle, new_priv) == new_id  # signing twice with one key keeps one entry
    ids = [s["key_id"] for s in json.loads((bundle / SIGNATURE_NAME).read_text())["signatures"]]
    assert ids == [old_id, new_id]
    assert verify_bundle(bundle, old_trust) == old_id  # devices not yet rotated
    for f in device.glob("old*"):
        f.unlink()  # retire the old key
    assert verify_bundle(bundle, device) == new_id
    assert verify_bundle(bundle, [old_trust / "old.pub.pem", new_trust / "new.pub.pem"]) in (old_id, new_id)
    # a bundle signed only by the retired key is now refused
    only_old = tmp_path / "only-old"
    shutil.copytree(bundle, only_old)
    (only_old / SIGNATURE_NAME).unlink()
    sign_bundle(only_old, old_priv)
    with pytest.raises(SignatureError, match="none of them trusted"):
        verify_bundle(only_old, device)


def test_resigning_after_manifest_change_drops_stale_signatures(bundle: Path, keys: dict) -> None:
    sign_bundle(bundle, keys["old"][0])
    b = Bundle.load(bundle)
    b.manifest.extra["note"] = "benchmarks stored"
    b.save()
    new_id = sign_bundle(bundle, keys["new"][0])
    assert [s["key_id"] for s in json.loads((bundle / SIGNATURE_NAME).read_text())["signatures"]] == [new_id]
    assert verify_bundle(bundle, keys["new"][1]) == new_id
    with pytest.raises(SignatureError, match="none of them trusted"):
        verify_bundle(bundle, keys["old"][1])


def test_signed_archive_roundtrip_and_tampered_archive(bundle: Path, keys: dict, tmp_path: Path) -> None:
    priv, trust = keys["old"]
    kid = sign_bundle(bundle, priv)
    arc = Bundle.load(bundle).archive(tmp_path / "tiny.tar.gz")
    assert verify_bundle(arc, trust) == kid
    _flip(bundle / ARTIFACT)
    bad = Path(shutil.make_archive(str(tmp_path / "bad"), "gztar", bundle))  # a tar made by another tool
    with pytest.raises(SignatureError, match=f"{ARTIFACT} does not match its sha256") as err:
        verify_bundle(bad, trust)
    assert f"bundle {bad} does not match its signed manifest" in str(err.value)  # names the archive, not a temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "bundle", "tiny.tar.gz"]  # no temp dirs
    unpacked = Bundle.extract(arc, tmp_path / "unpacked")
    assert verify_bundle(unpacked.root, trust) == kid


# --- safe unpacking ------------------------------------------------------------------------------------------

def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _archive(path: Path, members: list[tuple], manifest: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info, data = _member("manifest.json", manifest)
        tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


UNSAFE = {
    "dotdot": ([_member("../escape.txt", b"x")], "'..' in the path"),
    "dotdot-nested": ([_member("onnx/../../escape.txt", b"x")], "'..' in the path"),
    "absolute": ([_member("{abs}", b"x")], "absolute path"),
    "symlink-out": ([_member("onnx/fp32.onnx", kind=tarfile.SYMTYPE, link="/etc/passwd")], "a link to '/etc/passwd'"),
    "symlink-rel": ([_member("up", kind=tarfile.SYMTYPE, link="../..")], "a link to '../..'"),
    "symlink-inside": ([_member("m2", kind=tarfile.SYMTYPE, link="manifest.json")], "bundles may not contain links"),
    "hardlink-out": ([_member("pw", kind=tarfile.LNKTYPE, link="/etc/passwd")], "a link to '/etc/passwd'"),
    "hardlink-inside": ([_member("m2", kind=tarfile.LNKTYPE, link="manifest.json")], "bundles may not contain links"),
    "char-device": ([_member("dev", kind=tarfile.CHRTYPE)], "not a regular file"),
    "fifo": ([_member("pipe", kind=tarfile.FIFOTYPE)], "not a regular file"),
    "duplicate": ([_member("manifest.json", b"{}")], "duplicate name"),
    "case-duplicate": ([_member("MANIFEST.json", b"{}")], "duplicate name"),
    "dot-duplicate": ([_member("./manifest.json", b"{}")], "duplicate name"),
    "file-in-file": ([_member("manifest.json/x", b"x")], "inside the file"),
    "windows-drive": ([_member("C:\\evil.txt", b"x")], "not a portable relative name"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_and_leave_nothing(built: Path, tmp_path: Path, case: str) -> None:
    members, reason = UNSAFE[case]
    outside = tmp_path / "abs-escape.txt"
    members = [(_member(str(outside), b"x")[0] if i.name == "{abs}" else i, d) for i, d in members]
    work = tmp_path / "work"
    work.mkdir()
    arc = _archive(work / "evil.tar.gz", members, (built / "manifest.json").read_bytes())
    before = _files(tmp_path)
    with pytest.raises(BundleError, match="refusing to unpack") as err:
        Bundle.extract(arc, work / "out")
    message = str(err.value)
    assert reason in message and "\n" not in message and "unsafe archive member" in message
    assert _files(tmp_path) == before  # nothing written: no dest, no partial dir, nothing outside
    assert not outside.exists() and not (tmp_path / "escape.txt").exists()


def test_archive_without_manifest_leaves_nothing(tmp_path: Path) -> None:
    arc = tmp_path / "nomanifest.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        info, data = _member("onnx/fp32.onnx", b"model")
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match=r"manifest\.json not found"):
        Bundle.extract(arc, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nomanifest.tar.gz"]


def test_archive_bombs_are_refused(built: Path, tmp_path: Path) -> None:
    manifest = (built / "manifest.json").read_bytes()
    many = _archive(tmp_path / "many.tar.gz", [_member(f"f{i}", b"x") for i in range(50)], manifest)
    with pytest.raises(BundleError, match="more than 20 members"):
        Bundle.extract(many, tmp_path / "out", max_members=20)
    zeros = tmp_path / "zeros.tar.gz"
    with tarfile.open(zeros, "w:gz") as tar:  # 64 MiB of zeros compress to ~64 KiB
        info, data = _member("manifest.json", manifest)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("big.bin")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert zeros.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match=r"unpacks to more than 1048576 bytes"):
        Bundle.extract(zeros, tmp_path / "out", max_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.tar.gz", "zeros.tar.gz"]
    assert Bundle.extract(zeros, tmp_path / "ok").root == tmp_path / "ok"  # the default bound allows it


def test_archive_refuses_a_bundle_holding_a_link(bundle: Path, tmp_path: Path) -> None:
    (bundle / "link").symlink_to(bundle / "manifest.json")
    with pytest.raises(BundleError, match="is a link or special file"):
        Bundle.load(bundle).archive(tmp_path / "x.tar.gz")
    assert not list(tmp_path.glob("x.tar.gz*"))


# --- CLI -----------------------------------------------------------------------------------------------------

def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_cli_keys_sign_verify_and_refusals(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kd = tmp_path / "keys"
    code, out, _ = _run(capsys, "keys", "new", "--dir", str(kd), "--name", "ops")
    assert code == 0 and "key id: " in out and str(kd / "ops.key") in out and str(kd / "ops.pub.pem") in out
    code, _, err = _run(capsys, "keys", "new", "--dir", str(kd), "--name", "ops")
    assert code == 2 and len(err) == 1 and "already exists" in err[0]
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(kd / "ops.pub.pem", trust)

    code, _, err = _run(capsys, "bundle", "verify", str(bundle), "--keys", str(trust))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and "is unsigned" in err[0]
    code, out, _ = _run(capsys, "bundle", "sign", str(bundle), "--key", str(kd / "ops.key"))
    kid = next(iter(load_public_keys(trust)))
    assert code == 0 and kid in out
    code, out, _ = _run(capsys, "bundle", "verify", str(bundle), "--keys", str(trust))
    assert code == 0 and out.startswith("ok: ") and kid in out

    other = tmp_path / "other"
    generate_keypair(other, "x")
    (other / "x.key").unlink()
    code, _, err = _run(capsys, "bundle", "verify", str(bundle), "--keys", str(other))
    assert code == 1 and len(err) == 1 and "none of them trusted" in err[0]
    _flip(bundle / ARTIFACT)
    code, _, err = _run(capsys, "bundle", "verify", str(bundle), "--keys", str(trust))
    assert code == 1 and len(err) == 1 and f"{ARTIFACT} does not match its sha256" in err[0]
    code, _, err = _run(capsys, "bundle", "sign", str(bundle), "--key", str(kd / "ops.key"))
    assert code == 2 and len(err) == 1 and "does not match its sha256" in err[0]


def test_cli_verify_refuses_unsafe_archive(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, trust = generate_keypair(tmp_path / "k", "k")
    arc = _archive(tmp_path / "evil.tar.gz", [_member("../escape.txt", b"x")], (built / "manifest.json").read_bytes())
    code, _, err = _run(capsys, "bundle", "verify", str(arc), "--keys", str(trust))
    assert code == 1 and len(err) == 1 and "'..' in the path" in err[0]
    assert not (tmp_path / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "k"]


def test_cli_entry_point_exit_code_and_one_line(bundle: Path, keys: dict) -> None:
    """The real ``edge-sdk`` process: exit 1 and exactly one line on stderr for a tampered bundle."""
    sign_bundle(bundle, keys["old"][0])
    (bundle / "onnx" / "extra.bin").write_bytes(b"x")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "bundle", "verify", str(bundle), "--keys",
                           str(keys["old"][1])], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "onnx/extra.bin is not listed in the manifest" in lines[0]
    assert proc.stdout == ""


def test_signing_errors_are_edge_sdk_errors() -> None:
    assert issubclass(SignatureError, BundleError) and issubclass(SignatureError, EdgeSDKError)
