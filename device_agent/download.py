"""Resumable downloads for model updates: HTTP(S) with ``Range`` requests, ``file://`` URLs and plain paths.

:func:`fetch` writes to ``dest`` (a ``.part`` file) and resumes from whatever that file already holds —
after a dropped connection (retried here, with back-off) or after the whole process was killed. A sidecar
``<dest>.json`` remembers the URL and the server's validator (ETag / Last-Modified), sent as ``If-Range``:
when the file on the server changed, the server answers 200 with the whole file and the download restarts
from zero instead of splicing two versions together. Size and sha256 are checked at the end.

Bounded (issue 13): reading stops as soon as more bytes arrive than ``expected_size`` (or ``max_bytes``), whatever
the server's headers say, and a download needs its size plus ``reserve_bytes`` free on the disk. URLs in error
messages are redacted (:func:`redact_url`: no user, password or query string), since those messages end up in
events and logs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_sdk import safe_json
from edge_sdk.errors import DownloadError

__all__ = ["DownloadError", "FetchResult", "copy_tree", "fetch", "is_remote", "local_path", "redact_text",
           "redact_url"]

_CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class FetchResult:
    """A completed download: the file, its size and sha256, where it resumed from, and the attempts made."""

    path: Path
    size: int
    sha256: str
    resumed_from: int
    attempts: int


def is_remote(source: str) -> bool:
    """True for http:// and https:// URLs."""
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def redact_url(source: str) -> str:
    """``source`` without credentials, query string or fragment when it is a URL (for events and logs)."""
    parts = urllib.parse.urlsplit(str(source))
    if not parts.scheme or not parts.netloc:
        return str(source)
    try:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a malformed port: keep nothing of the authority but the host text
        netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_space(dest: Path, needed: int, reserve: int) -> None:
    """DownloadError when the disk holding ``dest`` cannot take ``needed`` more bytes and keep ``reserve`` free."""
    free = shutil.disk_usage(dest.parent).free
    if needed + reserve > free:
        raise DownloadError(f"not enough free space for the download: {needed} bytes needed, {reserve} to keep free, "
                            f"{free} free in {dest.parent}: free disk space on the device")


def local_path(source: str) -> Path:
    """The file a ``file://`` URL or plain path names."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(meta: Path) -> dict:
    try:
        data = safe_json.loads(meta.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_meta(meta: Path, data: dict) -> None:
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, meta)


def _restart(dest: Path) -> None:
    with open(dest, "wb"):
        pass


def _copy_local(src: Path, dest: Path, progress: Callable[[int, int | None], None] | None) -> int:
    """Copy ``src`` into ``dest`` from the offset ``dest`` already has; returns that offset."""
    if not src.is_file():
        raise DownloadError(f"{src} does not exist or is not a file: give a bundle archive (.tar.gz) path or URL")
    total = src.stat().st_size
    start = dest.stat().st_size if dest.exists() else 0
    if start > total:
        _restart(dest)
        start = 0
    with open(src, "rb") as fin, open(dest, "ab") as fout:
        fin.seek(start)
        _append(fout, iter(lambda: fin.read(1 << 20), b""), start, total, progress)
    return start


class _OverLimit(Exception):
    """More bytes arrived than the download may hold (raised by :func:`_append`, turned into a DownloadError)."""


def _append(fh: BinaryIO, blocks: Iterable[bytes], done: int, total: int | None,
            progress: Callable[[int, int | None], None] | None, *, limit: int | None = None) -> int:
    """Append ``blocks`` to ``fh`` (which holds ``done`` bytes), reporting progress, then fsync them, since a resumed
    download trusts what the ``.part`` holds; return the new size. A block past ``limit`` raises _OverLimit
    before it is written."""
    for block in blocks:
        if limit is not None and done + len(block) > limit:
            raise _OverLimit
        fh.write(block)
        done += len(block)
        if progress:
            progress(done, total)
    fh.flush()
    os.fsync(fh.fileno())
    return done


def _http_attempt(url: str, dest: Path, meta_path: Path, *, timeout: float, context: ssl.SSLContext | None,
                  expected_size: int | None, progress: Callable[[int, int | None], None] | None,
                  max_bytes: int | None = None, reserve: int = 0) -> int:
    """One HTTP request that appends to ``dest``; returns the offset it resumed from. Network errors propagate.
    Never writes beyond ``max_bytes`` (the expected size when given)."""
    shown = redact_url(url)
    limit = expected_size if expected_size is not None else max_bytes
    meta = _read_meta(meta_path)
    have = dest.stat().st_size if dest.exists() else 0
    if meta.get("url") != url or (expected_size is not None and have > expected_size):
        _restart(dest)
        have, meta = 0, {}
    if expected_size is not None and have == expected_size:
        return have  # complete already (the caller checks the sha256)
    headers = {"User-Agent": "edge-sdk-agent", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout, context=context)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            m = re.match(r"bytes\s+\*/(\d+)", exc.headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == have:
                return have  # the .part already holds the whole file
            _restart(dest)  # the file on the server is shorter than what we hold: start again
            raise ConnectionError(f"server answered 416 for bytes {have}- of {shown}; restarting") from None
        if 500 <= exc.code < 600 or exc.code in (408, 429):
            raise ConnectionError(f"HTTP {exc.code} from {shown}") from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {shown}: check the update URL") from None
    with resp:
        start = 0
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                _restart(dest)
                raise ConnectionError(f"{shown} answered a range other than bytes={have}-; restarting")
            start = have
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            _restart(dest)  # 200: the whole file (no range support, or it changed: If-Range did not match)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if validator and "W/" not in validator[:2]:
            _write_meta(meta_path, {"url": url, "validator": validator, "total": total})
        else:
            _write_meta(meta_path, {"url": url, "total": total})
        if total is not None and expected_size is not None and total != expected_size:
            _discard(dest, meta_path)
            raise DownloadError(f"{shown} is {total} bytes, the update command says {expected_size}: refusing it")
        if total is not None and limit is None and max_bytes is not None and total > max_bytes:
            _discard(dest, meta_path)
            raise DownloadError(f"{shown} is {total} bytes, more than the {max_bytes} allowed: refusing it")
        try:
            _check_space(dest, (limit if limit is not None else (total or 0)) - start, reserve)
        except DownloadError:
            _discard(dest, meta_path)  # what it holds cannot be completed here: give the space back
            raise
        try:
            with open(dest, "ab") as fh:
                done = _append(fh, iter(lambda: resp.read(_CHUNK), b""), start, total, progress, limit=limit)
        except _OverLimit:
            _discard(dest, meta_path)
            raise DownloadError(f"{shown} sent more than {limit} bytes (the update command says "
                                f"{expected_size}): refusing it" if expected_size is not None else
                                f"{shown} sent more than the {limit} bytes allowed: refusing it") from None
        if total is not None and done < total:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")
        return start


def fetch(source: str | os.PathLike, dest: str | os.PathLike, *, expected_sha256: str | None = None,
          expected_size: int | None = None, timeout: float = 30.0, retries: int = 5, backoff_s: float = 0.5,
          ca_file: str | os.PathLike | None = None,
          progress: Callable[[int, int | None], None] | None = None, max_bytes: int | None = None,
          reserve_bytes: int = 0) -> FetchResult:
    """Download ``source`` (http(s) URL, ``file://`` URL or path) into ``dest``, resuming what ``dest`` holds.

    Dropped connections, timeouts and HTTP 5xx are retried up to ``retries`` times (resuming each time, with
    exponential back-off from ``backoff_s``). A finished file with the wrong size or sha256 is deleted and
    DownloadError raised; so are HTTP 4xx answers, a body longer than ``expected_size`` (or ``max_bytes``; the
    download stops there), and too little free space to keep ``reserve_bytes`` free afterwards.
    """
    src, dest = str(source), Path(dest)
    shown = redact_url(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    meta_path = dest.with_name(dest.name + ".json")
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    attempts, resumed_from = 0, None
    while True:
        attempts += 1
        try:
            if is_remote(src):
                start = _http_attempt(src, dest, meta_path, timeout=timeout, context=context,
                                      expected_size=expected_size, progress=progress, max_bytes=max_bytes,
                                      reserve=reserve_bytes)
            else:
                local = local_path(src)
                if local.is_file():
                    size = local.stat().st_size
                    limit = expected_size if expected_size is not None else max_bytes
                    if limit is not None and size > limit:
                        raise DownloadError(f"{shown} is {size} bytes, more than the {limit} expected: refusing it")
                    _check_space(dest, size - (dest.stat().st_size if dest.exists() else 0), reserve_bytes)
                start = _copy_local(local, dest, progress)
            resumed_from = start if resumed_from is None else min(resumed_from, start)
            break
        except (TimeoutError, http.client.HTTPException, OSError) as exc:  # OSError covers URLError, resets
            if isinstance(exc, OSError) and not is_remote(src) and not isinstance(exc, ConnectionError):
                raise DownloadError(f"cannot read {shown}: {exc.strerror or exc}") from None
            if attempts > retries:
                raise DownloadError(f"download of {shown} failed after {attempts} attempts ({redact_text(exc)}): check "
                                    "the network "
                                    "and the URL; a later update resumes from the bytes already fetched") from None
            time.sleep(min(backoff_s * 2 ** (attempts - 1), 10.0))
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        _discard(dest, meta_path)
        raise DownloadError(f"{shown} gave {size} bytes, expected {expected_size}: the file on the server differs "
                            "from the update command")
    digest = _sha256(dest)
    if expected_sha256 and digest != expected_sha256.lower():
        _discard(dest, meta_path)
        raise DownloadError(f"{shown} has sha256 {digest[:12]}…, the update command says {expected_sha256[:12]}…: "
                            "refusing it (corrupted or replaced on the server)")
    return FetchResult(dest, size, digest, resumed_from or 0, attempts)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(exc: BaseException | str) -> str:
    """A message (or an exception's text) with every URL in it redacted (see :func:`redact_url`)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), str(exc))


def _discard(dest: Path, meta: Path) -> None:
    for p in (dest, meta):
        p.unlink(missing_ok=True)


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a bundle directory (no symlinks followed) — the local-directory form of an update."""
    shutil.copytree(src, dest, symlinks=True)
