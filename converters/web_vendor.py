"""The browser runtimes' files, vendored from the npm registry at build time (never a CDN at run time).

A web artifact carries its own copy of its JavaScript runtime, so the page works offline and from any static host:

* ``onnxruntime-web`` (the default): the ES module entry ``ort.wasm.min.mjs`` (WASM backend only, no
  WebGL/WebGPU code), its loader ``ort-wasm-simd-threaded.mjs`` and ``ort-wasm-simd-threaded.wasm`` (SIMD, threads
  when the page is cross-origin isolated) — ~15 MB.
* ``litertjs`` (LiteRT.js): ``@litertjs/core`` (``core/index.js`` and three WASM builds in ``wasm/``: relaxed SIMD,
  relaxed SIMD + threads, and the compat build for browsers without relaxed SIMD) plus its one dependency
  ``@litertjs/wasm-utils`` (``wasm-utils/index.js``, imported by the bare name, so a page needs an import map) —
  ~28 MB.

Each package is pinned (:data:`PACKAGES`) together with the registry's ``integrity`` (sha512) of its tarball: the
download is refused unless it matches. The kept files are cached, with their sha256, under ``$EDGE_SDK_CACHE``
(default ``~/.cache/edge_sdk``)/``npm/<package>-<version>/``, so later builds and tests reuse them without the
network. Offline, a tarball from ``npm pack <package>@<version>`` placed at :func:`tarball_path` is used instead of
a download. One function (:func:`vendor_package`) does this for every package.

Why ONNX Runtime Web stays the default: its WASM build is the same CPU kernels as native ONNX Runtime (every op of
the ONNX artifacts this SDK produces, int8 QDQ included), so the web artifact *is* the ONNX artifact. LiteRT.js
(``--web-runtime litertjs``) was measured faster on MobileNetV2 in Chromium (fp32 p50 1.7x, load 2x, same
accuracy; benchmarks/web_litertjs.py) and runs the ``.tflite`` artifact instead; it has float32/int32/uint8 tensors
only (int8 models need float I/O).
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

__all__ = ["ENTRY", "LITERTJS_CORE", "LITERTJS_WASM_UTILS", "ORT_WEB", "ORT_WEB_FILES", "ORT_WEB_INTEGRITY",
           "ORT_WEB_PACKAGE", "ORT_WEB_VERSION", "PACKAGES", "WEB_RUNTIMES", "NpmPackage", "VendoredRuntime",
           "cache_dir", "tarball_path", "vendor_package", "vendor_runtime"]

_MAX_TARBALL = 128 * 1024 * 1024  # onnxruntime-web 1.31.1 is 34.6 MB, @litertjs/core 2.5.3 11.8 MB
_TIMEOUT_S = 120


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package: ``files`` maps a path inside the tarball (below ``package/``) to where it goes."""

    name: str
    version: str
    integrity: str  # the registry's dist.integrity (``npm view NAME@VERSION dist.integrity``)
    files: tuple[tuple[str, str], ...]

    @property
    def tarball_name(self) -> str:
        """``core-2.5.3.tgz`` for ``@litertjs/core`` 2.5.3 (what ``npm pack`` writes, without the scope)."""
        return f"{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def cache_name(self) -> str:
        """A folder name for the package: ``litertjs-core-2.5.3``."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"

    def url(self) -> str:
        """The tarball's URL on the configured registry."""
        return f"{_registry()}/{self.name}/-/{self.tarball_name}"


ORT_WEB = NpmPackage(
    "onnxruntime-web", "1.31.1",
    "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==",
    (("dist/ort.wasm.min.mjs", "ort.wasm.min.mjs"), ("dist/ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.mjs"),
     ("dist/ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.wasm")))
LITERTJS_CORE = NpmPackage(
    "@litertjs/core", "2.5.3",
    "sha512-PlGmbMOq9WitX7FO0jhbdJw9GthatsyuCQXjTt/wJZo0FLaw48q4tz8IwqgqCIkviYGr9OFDL1kCnN4nzWoyJQ==",
    (("dist/index.js", "core/index.js"),
     *((f"wasm/litert_wasm_{v}internal.{ext}", f"wasm/litert_wasm_{v}internal.{ext}")
       for v in ("", "threaded_", "compat_") for ext in ("js", "wasm"))))
LITERTJS_WASM_UTILS = NpmPackage(
    "@litertjs/wasm-utils", "2.5.3",
    "sha512-4fJiw6tBQnIs+0jH/OQ16nYOiSl8/+zZnn5h2ul8aTKHi05sVqZW580Tmk78pC2kT39A9OYBVdFawteZ/sI1kQ==",
    (("dist/index.js", "wasm-utils/index.js"),))
PACKAGES = (ORT_WEB, LITERTJS_CORE, LITERTJS_WASM_UTILS)
#: web runtime name -> its packages, the first one being the runtime itself (its version is the runtime's)
WEB_RUNTIMES: dict[str, tuple[NpmPackage, ...]] = {
    "onnxruntime-web": (ORT_WEB,),
    "litertjs": (LITERTJS_CORE, LITERTJS_WASM_UTILS),
}

# the names the ONNX Runtime Web code already uses
ORT_WEB_PACKAGE, ORT_WEB_VERSION, ORT_WEB_INTEGRITY = ORT_WEB.name, ORT_WEB.version, ORT_WEB.integrity
ORT_WEB_FILES = tuple(src for src, _ in ORT_WEB.files)
ENTRY = "ort.wasm.min.mjs"


@dataclass(frozen=True)
class VendoredRuntime:
    """The cached files of one package: ``files`` maps relative path -> cached path; ``sha256`` path -> digest."""

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


def tarball_path(version: str = ORT_WEB_VERSION, package: NpmPackage = ORT_WEB) -> Path:
    """Where an offline copy of ``package``'s tarball is looked for (what ``npm pack`` writes)."""
    return cache_dir() / "npm" / f"{package.name.rsplit('/', 1)[-1]}-{version}.tgz"


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


def _download(pkg: NpmPackage, url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = int(resp.headers.get("Content-Length") or 0)
            if length > _MAX_TARBALL:
                raise ConversionError(f"{url} is {length} bytes, over the {_MAX_TARBALL >> 20} MB limit")
            data = resp.read(_MAX_TARBALL + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConversionError(
            f"cannot download {pkg.name} {pkg.version} from {url} ({reason}): connect to the network once (the "
            f"files are cached), or run `npm pack {pkg.name}@{pkg.version}` elsewhere and put the tarball at "
            f"{tarball_path(pkg.version, pkg)}") from None
    if len(data) > _MAX_TARBALL:
        raise ConversionError(f"{url} is over the {_MAX_TARBALL >> 20} MB limit: not the expected tarball")
    return data


def _cached(pkg: NpmPackage, folder: Path) -> VendoredRuntime | None:
    meta = folder / "vendored.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
        files = {name: folder / name for name in info["sha256"]}
        if info.get("integrity") != pkg.integrity or set(files) != {dest for _, dest in pkg.files}:
            return None
        for name, path in files.items():
            if not path.is_file() or _sha256(path.read_bytes()) != info["sha256"][name]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return VendoredRuntime(pkg.name, pkg.version, pkg.integrity, info["tarball"], files, dict(info["sha256"]))


def vendor_package(pkg: NpmPackage) -> VendoredRuntime:
    """``pkg``'s files from the cache, downloading and verifying its tarball on first use."""
    folder = cache_dir() / "npm" / pkg.cache_name
    found = _cached(pkg, folder)
    if found is not None:
        return found
    url = pkg.url()
    local = tarball_path(pkg.version, pkg)
    if local.is_file():
        if local.stat().st_size > _MAX_TARBALL:
            raise ConversionError(f"{local} is over the {_MAX_TARBALL >> 20} MB limit: not the expected tarball "
                                  f"(remove it, or replace it with `npm pack {pkg.name}@{pkg.version}`)")
        data, source = local.read_bytes(), str(local)
    else:
        data, source = _download(pkg, url), url
    _check_integrity(data, pkg.integrity, source)
    tmp = Path(tempfile.mkdtemp(prefix=".vendor-", dir=_mkdir(folder.parent)))
    try:
        sums: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for rel, dest in pkg.files:
                try:
                    blob = tar.extractfile(tar.getmember(f"package/{rel}"))
                except KeyError:
                    blob = None
                if blob is None:
                    raise ConversionError(f"{source} has no {rel}: not the expected {pkg.name} tarball")
                content = blob.read()
                _mkdir((tmp / dest).parent)
                (tmp / dest).write_bytes(content)
                sums[dest] = _sha256(content)
        (tmp / "vendored.json").write_text(json.dumps(
            {"package": pkg.name, "version": pkg.version, "integrity": pkg.integrity, "tarball": url,
             "sha256": sums}, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another build put it there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _cached(pkg, folder)
    if found is None:
        raise ConversionError(f"the {pkg.name} cache at {folder} could not be written or read back: check the "
                              "folder's permissions (or set EDGE_SDK_CACHE)")
    return found


def vendor_runtime(name: str = "onnxruntime-web") -> list[VendoredRuntime]:
    """Every package of the web runtime ``name`` (:data:`WEB_RUNTIMES`), the runtime itself first."""
    if name not in WEB_RUNTIMES:
        raise ConversionError(f"unknown web runtime {name!r}: choose from {', '.join(WEB_RUNTIMES)}")
    return [vendor_package(pkg) for pkg in WEB_RUNTIMES[name]]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
