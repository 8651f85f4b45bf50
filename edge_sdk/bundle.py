"""The model bundle: a directory holding ``manifest.json`` and the artifacts it lists.

A bundle is built in a temporary directory and moved into place only when complete, so a failed
build never leaves a partial bundle behind. ``Bundle.archive`` packs it into one ``.tar.gz`` file
for shipping; ``Bundle.extract`` unpacks such an archive safely (no absolute paths, no ``..``,
no links of any kind, no special files, no duplicate names, bounded size and member count).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edge_sdk import safe_json
from edge_sdk.errors import BundleError

__all__ = [
    "MANIFEST_NAME",
    "MAX_ARCHIVE_BYTES",
    "MAX_ARCHIVE_MEMBERS",
    "SCHEMA_VERSION",
    "Artifact",
    "Bundle",
    "Manifest",
    "TensorSpec",
    "Validation",
    "atomic_bundle_dir",
    "sha256_file",
    "sha256_path",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = "1.0"
MAX_ARCHIVE_MEMBERS = 10_000  # Bundle.extract's default bounds against archive bombs
MAX_ARCHIVE_BYTES = 32 << 30  # 32 GiB unpacked


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory (its relative file names and contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    digest = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        digest.update(f.relative_to(p).as_posix().encode() + b"\0")
        digest.update(sha256_file(f).encode() + b"\0")
    return digest.hexdigest()


def size_of(path: str | os.PathLike) -> int:
    """Bytes of a file, or of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


@dataclass
class TensorSpec:
    """One model input or output as the artifact sees it."""

    name: str
    shape: list[int | None]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None
    layout: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(**{k: d.get(k) for k in ("name", "shape", "dtype", "scale", "zero_point", "layout")})


@dataclass
class Validation:
    """How an artifact compared with the source model on held-out inputs."""

    passed: bool | None = None
    samples: int = 0
    top1_agreement: float | None = None
    top1_agreement_confident: float | None = None
    top5_containment: float | None = None
    max_abs_error: float | None = None
    cosine: float | None = None
    accuracy: float | None = None
    source_accuracy: float | None = None
    skipped_reason: str | None = None
    failures: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validation:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Artifact:
    """One converted model file (or package directory) in a bundle."""

    format: str
    precision: str
    path: str
    sha256: str = ""
    size_bytes: int = 0
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    validation: Validation = field(default_factory=Validation)
    files: list[dict[str, Any]] = field(default_factory=list)  # side files: {path, sha256, size_bytes}
    notes: list[str] = field(default_factory=list)
    route: str = ""  # which converter route produced it (edge_sdk.converters.routes), e.g. "onnx2tf"

    @property
    def key(self) -> str:
        """``format/precision``, the artifact's name in tables and logs."""
        return f"{self.format}/{self.precision}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(
            format=d["format"],
            precision=d["precision"],
            path=d["path"],
            sha256=d.get("sha256", ""),
            size_bytes=int(d.get("size_bytes", 0)),
            inputs=[TensorSpec.from_dict(t) for t in d.get("inputs", [])],
            outputs=[TensorSpec.from_dict(t) for t in d.get("outputs", [])],
            runtime=dict(d.get("runtime", {})),
            tool_versions=dict(d.get("tool_versions", {})),
            validation=Validation.from_dict(d.get("validation", {})),
            files=list(d.get("files", [])),
            notes=list(d.get("notes", [])),
            route=str(d.get("route", "")),
        )


@dataclass
class Manifest:
    """The content of ``manifest.json``."""

    name: str
    version: str
    source: dict[str, Any]
    task: str = "other"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))  # noqa: UP017
    schema_version: str = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # Signed model identity (issue 13): devices never move to a lower version_code of the same model, nor to
    # another model, without a signed rollback authorisation; ``fleets`` limits where the bundle may run.
    # Both are optional (None: an old bundle, written without the key so its manifest bytes stay the same).
    version_code: int | None = None
    fleets: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["schema_version", "name", "version", "version_code", "fleets", "created_at", "task", "source",
                 "inputs", "outputs", "preprocessing", "labels", "baseline", "artifacts", "extra"]
        return {k: d[k] for k in order if k not in ("version_code", "fleets") or d[k] is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            return cls(
                schema_version=str(d["schema_version"]),
                name=d["name"],
                version=str(d["version"]),
                created_at=d["created_at"],
                task=d.get("task", "other"),
                source=dict(d["source"]),
                inputs=[TensorSpec.from_dict(t) for t in d.get("inputs", [])],
                outputs=[TensorSpec.from_dict(t) for t in d.get("outputs", [])],
                preprocessing=dict(d.get("preprocessing") or {}),
                labels=d.get("labels"),
                baseline=dict(d.get("baseline") or {}),
                artifacts=[Artifact.from_dict(a) for a in d.get("artifacts", [])],
                extra=dict(d.get("extra") or {}),
                version_code=_version_code(d.get("version_code")),
                fleets=_fleets(d.get("fleets")),
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest is missing or has a malformed key {exc}: rebuild the bundle "
                              "with `edge-sdk convert`") from None


def _version_code(value: Any) -> int | None:
    """The manifest's ``version_code``: None or a whole number >= 0 (a bool or a string is refused)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"manifest version_code {value!r} is not a whole number >= 0: re-sign the bundle with "
                          "`edge-sdk bundle sign --version-code N`")
    return value


def _fleets(value: Any) -> list[str] | None:
    """The manifest's ``fleets``: None (any fleet) or a list of fleet ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(f, str) and f for f in value):
        raise BundleError(f"manifest fleets {str(value)[:80]!r} is not a list of fleet ids: re-sign the bundle with "
                          "`edge-sdk bundle sign --fleet F`")
    return list(value)


class Bundle:
    """A bundle directory and its manifest."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.root)!r}, {m.name}:{m.version}, {len(m.artifacts)} artifacts)"

    @property
    def artifacts(self) -> list[Artifact]:
        """The manifest's artifacts."""
        return self.manifest.artifacts

    def artifact(self, format: str, precision: str) -> Artifact:
        """The artifact with this format and precision, or a BundleError listing what there is."""
        for a in self.manifest.artifacts:
            if a.format == str(format) and a.precision == str(precision):
                return a
        have = ", ".join(a.key for a in self.manifest.artifacts) or "none"
        raise BundleError(f"bundle {self.root} has no {format}/{precision} artifact (it has: {have})")

    def path_of(self, artifact: Artifact) -> Path:
        """Absolute path of an artifact inside the bundle."""
        return self.root / artifact.path

    @classmethod
    def load(cls, root: str | os.PathLike) -> Bundle:
        """Read a bundle directory (or a ``.tar.gz`` archive, extracted next to it)."""
        p = Path(root)
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            return cls.extract(p, p.with_name(p.name.split(".tar")[0].removesuffix(".tgz")))
        mpath = p / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleError(f"{p} is not a bundle: {MANIFEST_NAME} not found")
        try:
            data = safe_json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}): the bundle is damaged, rebuild it") from None
        return cls(p, Manifest.from_dict(data))

    def save(self) -> Path:
        """Write ``manifest.json`` atomically."""
        mpath = self.root / MANIFEST_NAME
        tmp = mpath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest.to_dict(), indent=2) + "\n")
        os.replace(tmp, mpath)
        return mpath

    def verify(self, artifact: Artifact | None = None) -> None:
        """Check that files exist and match their sha256; raise BundleError naming each mismatch."""
        problems = []
        for a in [artifact] if artifact else self.manifest.artifacts:
            path = self.path_of(a)
            if not path.exists():
                problems.append(f"{a.key}: {a.path} is missing")
            elif a.sha256 and sha256_path(path) != a.sha256:
                problems.append(f"{a.key}: {a.path} does not match its sha256")
            for side in a.files:
                fpath = self.root / side["path"]
                if not fpath.exists():
                    problems.append(f"{a.key}: {side['path']} is missing")
                elif side.get("sha256") and sha256_path(fpath) != side["sha256"]:
                    problems.append(f"{a.key}: {side['path']} does not match its sha256")
        if problems:
            raise BundleError("bundle verification failed: " + "; ".join(problems)
                              + " — re-fetch or rebuild the bundle")

    def archive(self, dest: str | os.PathLike | None = None) -> Path:
        """Pack the bundle into one ``.tar.gz`` (written atomically). Links and special files are refused, since
        :meth:`extract` would refuse them."""
        dest = Path(dest) if dest else self.root.with_name(self.root.name + ".tar.gz")
        files = []
        for f in sorted(self.root.rglob("*")):
            if f.is_symlink() or not (f.is_file() or f.is_dir()):
                raise BundleError(f"{f} is a link or special file: a bundle holds only regular files and "
                                  "directories, replace it with a copy")
            if f.is_file():
                files.append(f)
        tmp = dest.with_name(dest.name + ".partial")
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                for f in files:
                    tar.add(f, arcname=f.relative_to(self.root).as_posix(), recursive=False)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    @classmethod
    def extract(cls, archive: str | os.PathLike, dest: str | os.PathLike, *,
                max_members: int = MAX_ARCHIVE_MEMBERS, max_bytes: int = MAX_ARCHIVE_BYTES,
                reserve_bytes: int = 0) -> Bundle:
        """Unpack an archive made by :meth:`archive` into ``dest`` (which must not exist or be empty).

        Every member is checked before anything is written: regular files and directories only (any symbolic
        or hard link, device, fifo or sparse file is refused), relative names without ``..``, no duplicate
        names (compared case-insensitively, for case-insensitive file systems), at most ``max_members``
        members and ``max_bytes`` bytes in total (archive bombs), and enough free disk space (plus
        ``reserve_bytes`` left free afterwards, so an update never fills the device's disk). The archive
        must hold a readable ``manifest.json``. On any refusal or failure nothing is left at ``dest``.
        """
        dest = Path(dest)
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar, archive, max_members=max_members, max_bytes=max_bytes)
                _check_free_space(dest, sum(m.size for m in members), archive, reserve_bytes)
                with atomic_bundle_dir(dest) as tmp:
                    tar.extractall(tmp, members=members, filter="data")
                    manifest = cls.load(tmp).manifest  # no manifest: refused before anything reaches dest
        except tarfile.TarError as exc:
            raise BundleError(f"{archive} is not a readable bundle archive ({exc}): re-fetch it") from None
        except OSError as exc:
            raise BundleError(f"cannot unpack {archive} into {dest}: {exc.strerror or exc}") from None
        return cls(dest, manifest)


def _safe_members(tar: tarfile.TarFile, archive: str | os.PathLike, *, max_members: int,
                  max_bytes: int) -> list[tarfile.TarInfo]:
    """All members of ``tar``, or a BundleError naming the first unsafe one (nothing is extracted here)."""
    members: list[tarfile.TarInfo] = []
    seen: dict[str, bool] = {}  # casefolded normalised name -> is a file
    total = 0
    for m in tar:  # lazily, so a member-count bomb is stopped without reading its whole index
        if len(members) >= max_members:
            raise BundleError(f"{archive} has more than {max_members} members: refusing to unpack (archive bomb?)")
        why = _unsafe_reason(m)
        if why:
            raise BundleError(f"unsafe archive member {m.name!r} in {archive} ({why}): refusing to unpack")
        key = str(PurePosixPath(m.name)).casefold()
        if key in seen and (m.isfile() or seen[key]):
            raise BundleError(f"unsafe archive member {m.name!r} in {archive} (duplicate name): refusing to unpack")
        seen[key] = seen.get(key, False) or m.isfile()
        total += m.size
        if total > max_bytes:
            raise BundleError(f"{archive} unpacks to more than {max_bytes} bytes: refusing to unpack (archive bomb?)")
        members.append(m)
    for key in seen:
        parent = next((str(p) for p in PurePosixPath(key).parents if seen.get(str(p))), None)
        if parent:
            raise BundleError(f"unsafe archive member {key!r} in {archive} (inside the file {parent!r}): "
                              "refusing to unpack")
    return members


def _unsafe_reason(m: tarfile.TarInfo) -> str | None:
    """Why one archive member may not be unpacked, or None when it is a plain relative file or directory."""
    if m.issym() or m.islnk():
        return f"a link to {m.linkname!r}; bundles may not contain links"
    if m.issparse() or not (m.isfile() or m.isdir()):
        return "not a regular file or directory"
    if not m.name or "\\" in m.name or "\0" in m.name or PureWindowsPath(m.name).drive:
        return "not a portable relative name"
    p = PurePosixPath(m.name)
    if p.is_absolute():
        return "absolute path"
    if ".." in p.parts:
        return "'..' in the path"
    if m.isfile() and str(p) == ".":
        return "a file without a name"
    return None


def _check_free_space(dest: Path, needed: int, archive: str | os.PathLike, reserve: int = 0) -> None:
    """Raise BundleError when the file system that will hold ``dest`` has less than ``needed`` (+ ``reserve``)
    bytes free."""
    where = dest.absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed + reserve > free:
        keep = f" and keep {reserve} free" if reserve else ""
        raise BundleError(f"{archive} needs {needed} bytes{keep} but {where} has {free} free: free space or unpack "
                          "elsewhere")


@contextmanager
def atomic_bundle_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; move it to ``dest`` only on success.

    On any exception the temporary directory is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise BundleError(f"{dest} already exists: choose another --out or remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
