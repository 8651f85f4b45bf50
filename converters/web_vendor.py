"""The browser runtime's files, vendored from the npm registry at build time (never a CDN at run time).

A web artifact carries its own copy of ONNX Runtime Web: the ES module entry ``ort.wasm.min.mjs`` (WASM backend
only, no WebGL/WebGPU code), its loader ``ort-wasm-simd-threaded.mjs`` and ``ort-wasm-simd-threaded.wasm`` (SIMD,
threads when the page is cross-origin isolated) — ~15 MB together, so the page works offline and from any static
host. The version is pinned (:data:`ORT_WEB_VERSION`) together with the registry's ``integrity`` (sha512) of its
tarball: the download is refused unless it matches. The three files are cached, with their sha256, under
``$EDGE_SDK_CACHE`` (default ``~/.cache/edge_sdk``)/``npm/onnxruntime-web-<version>/``, so later builds and tests
reuse them without the network. Offline, a tarball from ``npm pack onnxruntime-web@<version>`` placed at
:func:`tarball_path` is used instead of a download.

Why ONNX Runtime Web and not LiteRT.js (``@litertjs/core``): it is maintained by the ONNX Runtime team, its WASM
build is the same CPU kernels as native ONNX Runtime (every op of the ONNX artifacts this SDK already produces,
int8 QDQ included — checked: no op of the test corpus was missing), so the web artifact *is* the ONNX artifact
and one validation story covers both; LiteRT.js would need the .tflite route (onnx2tf / litert-torch) for
PyTorch sources and was not measured here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConversionError

__all__ = ["ORT_WEB_FILES", "ORT_WEB_INTEGRITY", "ORT_WEB_VERSION", "VendoredRuntime", "cache_dir", "tarball_path",
           "vendor_runtime"]

ORT_WEB_PACKAGE = "onnxruntime-web"
ORT_WEB_VERSION = "1.31.1"
#: the npm registry's ``dist.integrity`` of onnxruntime-web-1.31.1.tgz (``npm view onnxruntime-web@1.31.1``)
ORT_WEB_INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
#: the files a web artifact needs, as they sit in the tarball (``package/`` + this)
ORT_WEB_FILES = ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm")
ENTRY = "ort.wasm.min.mjs"
_MAX_TARBALL = 128 * 1024 * 1024  # the 1.31.1 tarball is 34.6 MB
_TIMEOUT_S = 120


@dataclass(frozen=True)
class VendoredRuntime:
    """The cached runtime files: ``files`` maps file name -> path; ``sha256`` file name -> digest."""

    package: str
    version: str
    integrity: str
    tarball_url: str
    files: dict[str, Path]
    sha256: dict[str, str]


def cache_dir() -> Path:
    """``$EDGE_SDK_CACHE`` or ``$XDG_CACHE_HOME/edge_sdk`` or ``~/.cache/edge_sdk``."""
    env = os.environ.get("EDGE_SDK_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edge_sdk"


def tarball_path(version: str = ORT_WEB_VERSION) -> Path:
    """Where an offline copy of the tarball is looked for (what ``npm pack`` writes)."""
    return cache_dir() / "npm" / f"{ORT_WEB_PACKAGE}-{version}.tgz"


def _registry() -> str:
    return (os.environ.get("EDGE_SDK_NPM_REGISTRY") or os.environ.get("npm_config_registry")
            or "https://registry.npmjs.org/").rstrip("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_integrity(data: bytes, integrity: str, what: str) -> None:
    algo, _, want = integrity.partition("-")
    if algo not in ("sha512", "sha384", "sha256"):
        raise ConversionError(f"unknown integrity algorithm {algo!r} for {what}")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise ConversionError(f"{what} does not match the pinned npm integrity {integrity[:24]}…: the download is "
                              "corrupt or the registry served another file; delete it and retry")


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = int(resp.headers.get("Content-Length") or 0)
            if length > _MAX_TARBALL:
                raise ConversionError(f"{url} is {length} bytes, over the {_MAX_TARBALL >> 20} MB limit")
            data = resp.read(_MAX_TARBALL + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConversionError(
            f"cannot download {ORT_WEB_PACKAGE} {ORT_WEB_VERSION} from {url} ({reason}): connect to the network "
            f"once (the files are cached), or run `npm pack {ORT_WEB_PACKAGE}@{ORT_WEB_VERSION}` elsewhere and put "
            f"the tarball at {tarball_path()}") from None
    if len(data) > _MAX_TARBALL:
        raise ConversionError(f"{url} is over the {_MAX_TARBALL >> 20} MB limit: not the expected tarball")
    return data


def _cached(folder: Path) -> VendoredRuntime | None:
    meta = folder / "vendored.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
        files = {name: folder / name for name in info["sha256"]}
        if info.get("integrity") != ORT_WEB_INTEGRITY or set(files) != {Path(f).name for f in ORT_WEB_FILES}:
            return None
        for name, path in files.items():
            if not path.is_file() or _sha256(path.read_bytes()) != info["sha256"][name]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return VendoredRuntime(ORT_WEB_PACKAGE, ORT_WEB_VERSION, ORT_WEB_INTEGRITY, info["tarball"], files,
                           dict(info["sha256"]))


def vendor_runtime() -> VendoredRuntime:
    """The pinned ONNX Runtime Web files from the cache, downloading and verifying the tarball on first use."""
    folder = cache_dir() / "npm" / f"{ORT_WEB_PACKAGE}-{ORT_WEB_VERSION}"
    found = _cached(folder)
    if found is not None:
        return found
    url = f"{_registry()}/{ORT_WEB_PACKAGE}/-/{ORT_WEB_PACKAGE}-{ORT_WEB_VERSION}.tgz"
    local = tarball_path()
    if local.is_file():
        data, source = local.read_bytes(), str(local)
    else:
        data, source = _download(url), url
    _check_integrity(data, ORT_WEB_INTEGRITY, source)
    tmp = Path(tempfile.mkdtemp(prefix=".vendor-", dir=_mkdir(folder.parent)))
    try:
        sums: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for rel in ORT_WEB_FILES:
                try:
                    member = tar.getmember(f"package/{rel}")
                    blob = tar.extractfile(member)
                except KeyError:
                    blob = None
                if blob is None:
                    raise ConversionError(f"{source} has no {rel}: not the expected {ORT_WEB_PACKAGE} tarball")
                content = blob.read()
                name = Path(rel).name
                (tmp / name).write_bytes(content)
                sums[name] = _sha256(content)
        (tmp / "vendored.json").write_text(json.dumps(
            {"package": ORT_WEB_PACKAGE, "version": ORT_WEB_VERSION, "integrity": ORT_WEB_INTEGRITY,
             "tarball": url, "sha256": sums}, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another build put it there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _cached(folder)
    if found is None:
        raise ConversionError(f"the {ORT_WEB_PACKAGE} cache at {folder} could not be written or read back: "
                              "check the folder's permissions (or set EDGE_SDK_CACHE)")
    return found


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
