"""ed25519 signatures over a bundle's ``manifest.json``.

The manifest carries the sha256 of every file of the bundle (artifacts and their side files), so one
signature over the exact bytes of ``manifest.json`` covers the whole bundle. The signatures live beside
it in ``signature.json``::

    {"schema_version": "1.0", "manifest_sha256": "<hex>",
     "signatures": [{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>", "signed_at": "..."}]}

Each signature is over the raw bytes of ``manifest.json`` (no prefix, no re-serialisation), so it can be
checked with standard tools too. A key's id is the first 16 hex digits of the sha256 of its raw 32-byte
public key.

Key rotation: a device trusts a set of public keys (a directory of ``*.pem`` files). To rotate, add the new
public key to the devices, co-sign bundles with the new key (signing again *adds* a signature), then retire
the old key by deleting its file from the devices. A bundle co-signed by the old and the new key verifies
against either.

:func:`verify_bundle` refuses, with one line naming the reason: an unsigned bundle, a malformed
``signature.json``, a signature by a key that is not trusted, a signature that does not match the manifest
(the manifest changed after signing), a file whose sha256 differs from the manifest, a missing file, a file
not listed in the manifest (only ``manifest.json`` and ``signature.json`` may sit beside the listed files),
and any symbolic link or special file.

Listed files are each artifact's ``path`` (a file, or a directory whose files are all covered by its
sha256), each artifact's side ``files``, and the optional bundle-level ``extra.files`` list
(``[{"path", "sha256"}]``, e.g. a smoke-test sample).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edge_sdk import safe_json
from edge_sdk._deps import require
from edge_sdk.bundle import MANIFEST_NAME, Bundle, Manifest, sha256_path
from edge_sdk.errors import BundleError, SignatureError

__all__ = [
    "ALGORITHM",
    "SIGNATURE_NAME",
    "SignatureError",
    "generate_keypair",
    "key_id",
    "load_public_keys",
    "sign_bundle",
    "verify_archive_manifest",
    "verify_bundle",
]

log = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.json"
ALGORITHM = "ed25519"
SCHEMA_VERSION = "1.0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PRIVATE_SUFFIX = ".key"
_PUBLIC_SUFFIX = ".pub.pem"


def _crypto() -> Any:
    """The ``cryptography`` primitives used here (imported on first use)."""
    require("cryptography", extra="agent", purpose="bundle signatures")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def key_id(public_key: Any) -> str:
    """Id of an ed25519 public key: the first 16 hex digits of sha256 of its raw 32 bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: str | os.PathLike, name: str | None = None) -> tuple[Path, Path]:
    """Make a new ed25519 key pair; return ``(private_path, public_path)``.

    The private key is ``NAME.key`` (PEM, PKCS8, unencrypted, mode 0600) and the public key ``NAME.pub.pem``
    (PEM, SubjectPublicKeyInfo); ``name`` defaults to ``key-<key id>``. Existing files are never overwritten.
    """
    serialization, ed25519 = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    name = name if name is not None else f"key-{key_id(private.public_key())}"
    if not _NAME_RE.match(name):
        raise SignatureError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                             "letter or digit)")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}{_PRIVATE_SUFFIX}", directory / f"{name}{_PUBLIC_SUFFIX}"
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise SignatureError(f"{p} already exists: choose another --name (keys are never overwritten)")
    priv_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(priv_path, priv_pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        priv_path.unlink()
        raise
    return priv_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never replacing an existing file) and write ``data`` durably."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SignatureError(f"{path} already exists: choose another --name (keys are never overwritten)") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it; never widened beyond mode


def _read_key(path: Path, what: str, fix: str = "") -> bytes:
    """The bytes of a key file, or a one-line SignatureError naming ``what`` key could not be read and why."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read {what} {path} ({exc.strerror}){fix}") from None


def _load_private_key(path: str | os.PathLike) -> Any:
    serialization, ed25519 = _crypto()
    path = Path(path)
    data = _read_key(path, "private key", ": pass a key made by `edge-sdk keys new`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"private key {path} is encrypted: decrypt it (openssl pkey -in {path} -out "
                             "PLAIN.key) or make one with `edge-sdk keys new`") from None
    except ValueError:
        raise SignatureError(f"{path} is not a PEM private key: pass the .key file made by "
                             "`edge-sdk keys new`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is a {type(key).__name__}, not an ed25519 key: make one with "
                             "`edge-sdk keys new`")
    return key


def _load_public_key(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    data = _read_key(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        hint = " (it looks like a private key: trust the .pub.pem file)" if b"PRIVATE KEY" in data else ""
        raise SignatureError(f"trusted key {path} is not a PEM public key{hint}: use the .pub.pem made by "
                             "`edge-sdk keys new`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"trusted key {path} is not an ed25519 public key: use the .pub.pem made by "
                             "`edge-sdk keys new`")
    return key


def load_public_keys(trusted: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, Any]:
    """The trusted ed25519 public keys by key id, from a directory of ``*.pem`` files, one file, or a list of
    files/directories. Raises :class:`SignatureError` when a file is not an ed25519 public key or none is found."""
    sources = [trusted] if isinstance(trusted, str | os.PathLike) else list(trusted)
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files.extend(sorted(q for q in p.glob("*.pem") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise SignatureError(f"trusted keys {p} not found: pass a directory of .pub.pem files or one such file")
    keys = {}
    for f in files:
        key = _load_public_key(f)
        keys[key_id(key)] = key
    if not keys:
        where = ", ".join(str(s) for s in sources) or "(nothing given)"
        raise SignatureError(f"no trusted public keys in {where}: copy a .pub.pem made by `edge-sdk keys new` there")
    return keys


def _safe_relpath(text: Any) -> str | None:
    """The normalised relative POSIX path, or None when ``text`` is absolute, has ``..``, or is not a path."""
    if not isinstance(text, str) or not text or "\\" in text or "\0" in text or PureWindowsPath(text).drive:
        return None
    p = PurePosixPath(text)
    if p.is_absolute() or ".." in p.parts or str(p) == ".":
        return None
    return str(p)


def _listed(manifest: Manifest) -> tuple[list[tuple[str, str]], list[str]]:
    """``(path, sha256)`` of every file or directory the manifest lists, and problems with the listing."""
    entries: list[tuple[str, Any]] = []
    for a in manifest.artifacts:
        entries.append((a.path, a.sha256))
        entries.extend((side.get("path"), side.get("sha256")) for side in a.files if isinstance(side, dict))
        entries.extend(("?", None) for side in a.files if not isinstance(side, dict))
    extra_files = manifest.extra.get("files", [])
    if not isinstance(extra_files, list):
        return [], ["manifest extra.files is not a list"]
    entries.extend((f.get("path"), f.get("sha256")) if isinstance(f, dict) else ("?", None) for f in extra_files)
    listed, problems = [], []
    for path, digest in entries:
        rel = _safe_relpath(path)
        if rel is None:
            problems.append(f"manifest lists an unsafe path {path!r}")
        elif not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"manifest lists {rel} without a sha256")
        else:
            listed.append((rel, digest))
    return list(dict.fromkeys(listed)), problems  # a side file listed by several artifacts is checked once


def _file_problems(root: Path, manifest: Manifest) -> list[str]:
    """Every way the files under ``root`` differ from the manifest (empty when they match exactly)."""
    listed, problems = _listed(manifest)
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                problems.append(f"{rel} is a symbolic link (bundles must not contain links)")
            elif name in filenames:
                if full.is_file():
                    present.add(rel)
                else:
                    problems.append(f"{rel} is not a regular file")
        dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
    covered: set[str] = {MANIFEST_NAME, SIGNATURE_NAME}
    for rel, digest in listed:
        path = root / rel
        if path.is_symlink():
            continue  # already reported above
        if path.is_dir():
            covered.update(f for f in present if f.startswith(rel + "/"))
        elif path.is_file():
            covered.add(rel)
        else:
            problems.append(f"{rel} is missing")
            continue
        if sha256_path(path) != digest:
            problems.append(f"{rel} does not match its sha256 in the manifest (tampered or damaged)")
    problems.extend(f"{f} is not listed in the manifest" for f in sorted(present - covered))
    return problems


def _manifest_bytes(root: Path) -> bytes:
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink() or not mpath.is_file():
        raise SignatureError(f"{root} is not a bundle: {MANIFEST_NAME} not found (or not a regular file)")
    return mpath.read_bytes()


def _parse_manifest(root: Path, data: bytes) -> Manifest:
    try:
        doc = safe_json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{root / MANIFEST_NAME} is not valid JSON ({exc}): rebuild the bundle") from None
    if not isinstance(doc, dict):
        raise SignatureError(f"{root / MANIFEST_NAME} is not a JSON object: rebuild the bundle")
    try:
        return Manifest.from_dict(doc)
    except BundleError as exc:
        raise SignatureError(str(exc)) from None


def _read_signatures(root: Path) -> dict[str, Any] | None:
    """The parsed ``signature.json`` (validated structure), or None when there is none."""
    spath = root / SIGNATURE_NAME
    if not spath.exists() and not spath.is_symlink():
        return None
    if spath.is_symlink() or not spath.is_file():
        raise SignatureError(f"{spath} is malformed (not a regular file): re-sign the bundle with `edge-sdk bundle "
                             "sign`")
    return _parse_signatures(spath.read_bytes(), spath)


def _parse_signatures(data: bytes, spath: Path | str) -> dict[str, Any]:
    """``signature.json`` bytes parsed and structurally validated (SignatureError naming ``spath`` if not)."""
    bad = f"{spath} is malformed"
    fix = "re-sign the bundle with `edge-sdk bundle sign`"
    try:
        doc = safe_json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{bad} (not JSON: {exc}): {fix}") from None
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(sigs, list) or not sigs:
        raise SignatureError(f"{bad} (no `signatures` list): {fix}")
    for s in sigs:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("algorithm", "key_id", "signature")):
            raise SignatureError(f"{bad} (each signature needs algorithm, key_id and signature strings): {fix}")
        if s["algorithm"] != ALGORITHM:
            raise SignatureError(f"{bad} (algorithm {s['algorithm']!r} is not supported, only {ALGORITHM}): {fix}")
    return doc


def sign_bundle(bundle_dir: str | os.PathLike, private_key_path: str | os.PathLike, *,
                version_code: int | None = None, fleets: Iterable[str] | None = None) -> str:
    """Sign a bundle directory's ``manifest.json`` with an ed25519 private key; return the key id.

    The bundle is verified first (every listed file matches its sha256, nothing unlisted is present). Signing
    a bundle that already carries signatures over the same manifest adds this key's signature (co-signing for
    key rotation); signatures over an older manifest are dropped (with a log warning), since they no longer
    verify. ``version_code`` (a whole number, higher = newer) and ``fleets`` (the fleets the bundle may run in)
    are written into the manifest first, so they are signed: devices refuse a lower version_code of the same
    model, and another model, unless a signed rollback authorisation names it (:mod:`edge_sdk.rollback_auth`).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise SignatureError(f"{root} is not a bundle directory: sign the unpacked bundle, then archive it")
    key = _load_private_key(private_key_path)
    bundle = Bundle.load(root)
    bundle.verify()
    m = bundle.manifest
    if version_code is not None or fleets is not None:
        if version_code is not None:
            if isinstance(version_code, bool) or not isinstance(version_code, int) or version_code < 0:
                raise SignatureError(f"version_code {version_code!r} must be a whole number >= 0 (higher = newer)")
            m.version_code = version_code
        if fleets is not None:
            m.fleets = sorted({str(f) for f in fleets}) or None
        bundle.save()
    if m.version_code is None:
        log.warning("%s: %s:%s has no version_code, so devices cannot refuse a downgrade to it: sign with "
                    "--version-code N (higher = newer)", root, m.name, m.version)
    data = _manifest_bytes(root)
    problems = _file_problems(root, _parse_manifest(root, data))
    if problems:
        raise SignatureError(f"cannot sign {root}: " + "; ".join(problems) + " — rebuild the bundle or remove the "
                             "unlisted files")
    kid = key_id(key.public_key())
    digest = hashlib.sha256(data).hexdigest()
    try:
        existing = _read_signatures(root)
    except SignatureError as exc:
        log.warning("%s: replacing a malformed %s (%s)", root, SIGNATURE_NAME, exc)
        existing = None
    kept: list[dict[str, Any]] = []
    if existing is not None:
        if existing.get("manifest_sha256") == digest:
            kept = [s for s in existing["signatures"] if s["key_id"] != kid]
        else:
            log.warning("%s: dropping %d signature(s) over an older manifest.json", root, len(existing["signatures"]))
    entry = {"algorithm": ALGORITHM, "key_id": kid, "signature": base64.b64encode(key.sign(data)).decode("ascii"),
             "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # noqa: UP017 (UTC is 3.11+)
    doc = {"schema_version": SCHEMA_VERSION, "manifest_sha256": digest, "signatures": [*kept, entry]}
    fd, tmp = tempfile.mkstemp(prefix=".signature.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / SIGNATURE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return kid


def verify_bundle(bundle_dir: str | os.PathLike, trusted_keys: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
    """Check a bundle's signature against trusted public keys and its files against the signed manifest.

    ``bundle_dir`` is a bundle directory or a ``.tar.gz`` archive (unpacked safely into a temporary
    directory that is removed afterwards). ``trusted_keys`` is a directory of ``*.pem`` public keys, one key
    file, or a list of them. Returns the id of the trusted key whose signature verified; raises
    :class:`SignatureError` with a one-line reason otherwise.
    """
    root = Path(bundle_dir)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix=".verify.", dir=root.parent) as tmp:
            unpacked = Path(tmp) / "bundle"
            try:
                Bundle.extract(root, unpacked)
            except BundleError as exc:  # an unsafe or unreadable archive is refused like a bad signature
                raise SignatureError(str(exc)) from None
            try:
                return verify_bundle(unpacked, trusted_keys)
            except SignatureError as exc:  # name the archive, not the temporary directory
                raise SignatureError(str(exc).replace(str(unpacked), str(root))) from None
    if not root.is_dir():
        raise SignatureError(f"bundle {root} not found: pass a bundle directory or .tar.gz archive")
    keys = load_public_keys(trusted_keys)
    doc = _read_signatures(root)
    if doc is None:
        raise SignatureError(f"bundle {root} is unsigned: sign it with `edge-sdk bundle sign {root} --key KEY`")
    data = _manifest_bytes(root)
    verified = _signed_by(root, data, doc, keys)
    problems = _file_problems(root, _parse_manifest(root, data))  # the bytes just verified, not a re-read
    if problems:
        raise SignatureError(f"bundle {root} does not match its signed manifest: " + "; ".join(problems)
                             + " — re-fetch the bundle")
    return verified


def _signed_by(root: Path | str, data: bytes, doc: dict[str, Any], keys: dict[str, Any]) -> str:
    """The id of the trusted key whose signature in ``doc`` verifies over the manifest bytes ``data``."""
    sigs = doc["signatures"]
    candidates = [s for s in sigs if s["key_id"] in keys]
    if not candidates:
        signers = ", ".join(sorted({s["key_id"] for s in sigs}))
        raise SignatureError(f"bundle {root} is signed by key(s) {signers}, none of them trusted (trusted: "
                             f"{', '.join(sorted(keys))}): add the signer's .pub.pem to the trusted keys or "
                             "re-sign with a trusted key")
    verified = None
    for s in candidates:
        try:
            raw = base64.b64decode(s["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"{root / SIGNATURE_NAME} is malformed (signature of key {s['key_id']} is not "
                                 "base64): re-sign the bundle with `edge-sdk bundle sign`") from None
        if _ed25519_ok(keys[s["key_id"]], raw, data):
            verified = s["key_id"]
            break
    if verified is None:
        raise SignatureError(f"bundle {root}: the signature of key {candidates[0]['key_id']} does not match "
                             f"{MANIFEST_NAME} (it changed after signing): re-fetch the bundle or re-sign it")
    return verified


def verify_archive_manifest(archive: str | os.PathLike,
                            trusted_keys: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[str, Manifest]:
    """Check a ``.tar.gz`` bundle's manifest signature and its member list BEFORE anything is unpacked.

    Reads only ``manifest.json`` and ``signature.json`` from the archive (each at most 16 MiB): the signature
    must verify with a trusted key, and every file member must be listed by the signed manifest (exactly, or
    under a listed directory) with the size it declares, so unpacking writes no more than the signer shipped.
    Returns ``(key id, manifest)``; the files' sha256 are checked after unpacking (:func:`verify_bundle`).
    """
    import tarfile

    keys = load_public_keys(trusted_keys)
    name = Path(archive).name
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}

            def read(member: str) -> bytes | None:
                m = members.get(member)
                if m is None or not m.isfile() or m.size > 16 << 20:
                    return None
                fh = tar.extractfile(m)
                return fh.read() if fh is not None else None

            data, sig = read(MANIFEST_NAME), read(SIGNATURE_NAME)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SignatureError(f"{name} is not a readable bundle archive ({exc}): re-fetch it") from None
    if data is None:
        raise SignatureError(f"{name} has no {MANIFEST_NAME} (or an oversized one): re-fetch or rebuild it")
    if sig is None:
        raise SignatureError(f"bundle {name} is unsigned: sign it with `edge-sdk bundle sign DIR --key KEY`")
    kid = _signed_by(name, data, _parse_signatures(sig, f"{name}:{SIGNATURE_NAME}"), keys)
    manifest = _parse_manifest(Path(name), data)
    listed, problems = _listed(manifest)
    sizes = {a.path: a.size_bytes for a in manifest.artifacts if a.size_bytes}
    sizes.update({f["path"]: f["size_bytes"] for a in manifest.artifacts for f in a.files
                  if isinstance(f, dict) and isinstance(f.get("size_bytes"), int)})
    dirs: dict[str, int] = {}
    for rel, m in members.items():
        if not m.isfile() or rel in (MANIFEST_NAME, SIGNATURE_NAME):
            continue
        under = next((p for p, _ in listed if rel.startswith(p + "/")), None)
        if under is not None:
            dirs[under] = dirs.get(under, 0) + m.size
        elif rel not in {p for p, _ in listed}:
            problems.append(f"{rel} is not listed in the signed manifest")
        elif rel in sizes and m.size != sizes[rel]:
            problems.append(f"{rel} is {m.size} bytes, the signed manifest says {sizes[rel]}")
    problems += [f"{d}/ holds {n} bytes, the signed manifest says {sizes[d]}" for d, n in dirs.items()
                 if d in sizes and n != sizes[d]]
    if problems:
        raise SignatureError(f"bundle {name} does not match its signed manifest: " + "; ".join(problems[:5])
                             + " — refusing to unpack it; re-fetch the bundle")
    return kid, manifest


def _ed25519_ok(public_key: Any, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
