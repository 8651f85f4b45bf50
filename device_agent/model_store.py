"""The device's model store: installed bundle versions, the ``current`` / ``previous`` links, crash recovery.

Layout under ``root``::

    versions/<name>-<version>-<sha12>/bundle/      an unpacked bundle, byte-identical to what was signed
    versions/<name>-<version>-<sha12>/.verified    JSON marker, written (and fsynced) last, after the signature,
                                                   hash and smoke-test checks passed
    current  -> versions/<...>                     relative symlink: the model to run
    previous -> versions/<...>                     the model before it (instant rollback)
    staging/                                       downloads (``<id>.part``, resumable) and unpack work dirs
    state.json                                     history, failures; written atomically (tmp, fsync, rename)
    .lock                                          flock held by whoever changes the store

Every change is made so that a ``kill -9`` (or power loss) at any instant leaves ``current`` naming a complete,
verified version: a version is prepared and marked in ``staging/``, renamed into ``versions/`` in one step, and
only then linked, by replacing the link with ``os.replace`` (atomic on POSIX). Removal goes the other way
(rename out of ``versions/`` first, then delete). :meth:`ModelStore.recover` removes what an interrupted
update left behind and checks the links. ``sha12`` is the first 12 hex digits of the sha256 of
``manifest.json``, which lists the sha256 of every file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.bundle import MANIFEST_NAME, Bundle, sha256_file
from edge_sdk.errors import BundleError, UpdateError

__all__ = ["BUNDLE_DIR", "MARKER", "ModelStore", "RecoveryResult", "UpdateError", "VersionInfo"]

log = logging.getLogger("edge_sdk.updater")

MARKER = ".verified"
BUNDLE_DIR = "bundle"
_LINKS = ("current", "previous")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HISTORY = 50


@dataclass(frozen=True)
class VersionInfo:
    """One installed version: its directory, bundle path and what its ``.verified`` marker records."""

    path: Path
    name: str
    version: str
    manifest_sha256: str
    archive_sha256: str | None
    key_id: str | None
    installed_at: float
    marker: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def bundle_path(self) -> Path:
        """The bundle directory to load."""
        return self.path / BUNDLE_DIR

    @property
    def dir_name(self) -> str:
        """``<name>-<version>-<sha12>``."""
        return self.path.name

    @property
    def label(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class RecoveryResult:
    """What :meth:`ModelStore.recover` chose: the version to start on (None if there is none) and why."""

    version: VersionInfo | None
    reason: str
    changed: bool
    removed: list[str] = field(default_factory=list)

    @property
    def bundle_path(self) -> Path | None:
        """The bundle directory to load, or None."""
        return self.version.bundle_path if self.version else None


def fsync_dir(path: Path) -> None:
    """fsync a directory, so renames and new entries in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), then ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file: fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ModelStore:
    """Installed model versions under ``root`` (see the module docstring). Thread- and process-safe via
    :meth:`lock`; every method that changes the store takes it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.state_path = self.root / "state.json"
        for d in (self.root, self.versions_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive access to the store, across threads and processes (re-entrant within a thread)."""
        with self._thread_lock:
            if self._depth == 0:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    # ---- links and versions ------------------------------------------------------------------------------------

    def link(self, which: str) -> Path | None:
        """The version directory ``current`` or ``previous`` points to (None when there is no such link)."""
        p = self.root / which
        if not p.is_symlink():
            return None
        return (self.root / os.readlink(p)).resolve(strict=False)

    def set_link(self, which: str, version_dir: Path | None) -> None:
        """Point ``current`` / ``previous`` at ``version_dir`` atomically (None removes the link)."""
        if which not in _LINKS:
            raise UpdateError(f"unknown store link {which!r}: use current or previous")
        link = self.root / which
        if version_dir is None:
            if link.is_symlink():
                link.unlink()
                fsync_dir(self.root)
            return
        tmp = self.root / f"{which}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(version_dir, self.root), tmp)
        os.replace(tmp, link)
        fsync_dir(self.root)

    @staticmethod
    def dir_name(name: str, version: str, manifest_sha256: str) -> str:
        """``<name>-<version>-<sha12>`` with anything outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
        safe = [(_UNSAFE.sub("_", s).strip(".") or "_")[:64] for s in (name, version)]
        return f"{safe[0]}-{safe[1]}-{manifest_sha256[:12]}"

    def info(self, version_dir: Path) -> VersionInfo | None:
        """The version's marker as a VersionInfo, or None when the marker is missing or unreadable."""
        try:
            m = json.loads((version_dir / MARKER).read_text())
            return VersionInfo(version_dir, str(m["name"]), str(m["version"]), str(m["manifest_sha256"]),
                               m.get("archive_sha256"), m.get("key_id"), float(m["installed_at"]), m)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check(self, version_dir: Path | None, *, deep: bool = True) -> tuple[VersionInfo | None, str]:
        """``(info, "")`` when ``version_dir`` is a complete verified version, else ``(None, reason)``.

        Checks the marker, that ``manifest.json`` is the one the marker recorded, and (``deep``) every file of
        the bundle against its sha256.
        """
        if version_dir is None:
            return None, "no link"
        if not version_dir.is_dir():
            return None, f"{version_dir.name} does not exist"
        info = self.info(version_dir)
        if info is None:
            return None, f"{version_dir.name} has no {MARKER} marker (its install did not finish)"
        mpath = info.bundle_path / MANIFEST_NAME
        if not mpath.is_file() or sha256_file(mpath) != info.manifest_sha256:
            return None, f"{version_dir.name}: {MANIFEST_NAME} is missing or differs from the verified one"
        if deep:
            try:
                Bundle.load(info.bundle_path).verify()
            except BundleError as exc:
                return None, f"{version_dir.name}: {exc}"
        return info, ""

    def versions(self) -> list[VersionInfo]:
        """Every marked version, newest install first (markers only; use :meth:`check` for a full check)."""
        found = [i for d in self.versions_dir.iterdir() if d.is_dir() and (i := self.info(d)) is not None]
        return sorted(found, key=lambda i: i.installed_at, reverse=True)

    def find(self, *, archive_sha256: str | None = None, manifest_sha256: str | None = None) -> VersionInfo | None:
        """An installed version with this archive or manifest sha256 that passes :meth:`check`, or None."""
        for info in self.versions():
            if (archive_sha256 and info.archive_sha256 == archive_sha256.lower()) or \
                    (manifest_sha256 and info.manifest_sha256 == manifest_sha256):
                ok, _ = self.check(info.path)
                if ok is not None:
                    return ok
        return None

    # ---- changes -----------------------------------------------------------------------------------------------

    def new_work_dir(self, prefix: str) -> Path:
        """A fresh directory in ``staging/`` (removed by :meth:`clean_staging` if left behind)."""
        d = self.staging_dir / f"{prefix}.{uuid.uuid4().hex[:8]}.work"
        d.mkdir()
        return d

    def mark_verified(self, work_dir: Path, marker: dict[str, Any]) -> None:
        """fsync the unpacked bundle in ``work_dir``, then write its ``.verified`` marker last (fsynced)."""
        fsync_tree(work_dir / BUNDLE_DIR)
        write_json_atomic(work_dir / MARKER, {**marker, "installed_at": time.time()})

    def install(self, work_dir: Path, dir_name: str) -> VersionInfo:
        """Move a marked work dir into ``versions/<dir_name>`` in one rename; an existing verified copy of the same
        bundle is kept instead. Returns the installed version."""
        with self.lock():
            dest = self.versions_dir / dir_name
            if dest.exists():
                existing, _ = self.check(dest)
                if existing is not None:
                    self._discard(work_dir)
                    return existing
                if dest in (self.link("current"), self.link("previous")):
                    raise UpdateError(f"{dir_name} is linked but fails its check: run recover() first")
                self._discard(dest)
            os.replace(work_dir, dest)
            fsync_dir(self.versions_dir)
            info = self.info(dest)
            if info is None:
                raise UpdateError(f"{dir_name} lost its {MARKER} marker while being installed: retry the update")
            return info

    def switch(self, version: VersionInfo) -> tuple[bool, VersionInfo | None]:
        """Make ``version`` current and the old current previous (each link replaced atomically).

        Returns ``(changed, the version that was current before or None)``; ``changed`` is False when ``version``
        already was current.
        """
        with self.lock():
            old_dir = self.link("current")
            old = self.info(old_dir) if old_dir is not None else None
            if old_dir == version.path:
                return False, old
            if old is not None:
                self.set_link("previous", old.path)  # a crash here leaves current == previous == old: still fine
            self.set_link("current", version.path)
            return True, old

    def rollback(self) -> tuple[VersionInfo, VersionInfo | None]:
        """Swap ``current`` and ``previous`` after checking previous; returns (new current, new previous)."""
        with self.lock():
            prev_dir, cur_dir = self.link("previous"), self.link("current")
            prev, why = self.check(prev_dir)
            if prev is None:
                raise UpdateError(f"nothing to roll back to: the previous version is unusable ({why})")
            self.set_link("current", prev.path)  # a crash here leaves current == previous: still fine
            cur = self.info(cur_dir) if cur_dir is not None else None
            self.set_link("previous", cur.path if cur else None)
            return prev, cur

    def gc(self, keep_old: int) -> list[str]:
        """Remove all but the ``keep_old`` newest versions besides current and previous; returns removed names."""
        with self.lock():
            linked = {self.link(w) for w in _LINKS}
            removed = []
            old = [d for d in self.versions_dir.iterdir() if d.resolve() not in linked]
            marked = sorted((i for d in old if (i := self.check(d, deep=False)[0]) is not None),
                            key=lambda i: i.installed_at, reverse=True)
            keep = {i.path for i in marked[:max(0, keep_old)]}
            for d in old:
                if d not in keep:
                    self._discard(d)
                    removed.append(d.name)
            return removed

    def _discard(self, path: Path) -> None:
        """Rename out of the way into staging (one atomic step), then delete."""
        trash = self.staging_dir / f"{path.name}.{uuid.uuid4().hex[:8]}.trash"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self, *, keep: set[str] | frozenset[str] = frozenset(), keep_parts: bool = True,
                      max_part_age_s: float = 7 * 24 * 3600) -> list[str]:
        """Remove leftovers of interrupted work: unpack dirs, trash, temporary links and files. Resumable
        downloads (``*.part`` and their ``.json``) younger than ``max_part_age_s`` stay when ``keep_parts``;
        names in ``keep`` always stay. Returns what was removed."""
        with self.lock():
            removed = []
            now = time.time()
            for p in self.staging_dir.iterdir():
                if p.name in keep:
                    continue
                part = p.name.endswith((".part", ".part.json"))
                if part and keep_parts and now - p.stat().st_mtime < max_part_age_s:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(f"staging/{p.name}")
            for p in self.root.iterdir():
                if p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
            return removed

    # ---- state -------------------------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        """``state.json`` (an empty state when missing or unreadable)."""
        try:
            data = json.loads(self.state_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, entry: dict[str, Any], *, failure: bool = False) -> None:
        """Append ``entry`` (with a timestamp) to the history (or the failures) in ``state.json``, atomically."""
        with self.lock():
            state = self.read_state()
            key = "failures" if failure else "history"
            items = [*state.get(key, []), {"ts": time.time(), **entry}][-_HISTORY:]
            state[key] = items
            cur, prev = (self.info(d) if d else None for d in (self.link("current"), self.link("previous")))
            state["current"] = cur.dir_name if cur else None
            state["previous"] = prev.dir_name if prev else None
            write_json_atomic(self.state_path, state)

    # ---- start-up ----------------------------------------------------------------------------------------------

    def recover(self, *, deep: bool = True) -> RecoveryResult:
        """Make the store consistent after a crash and choose the version to start on.

        Removes staging leftovers and unmarked version dirs, then keeps ``current`` if it passes :meth:`check`,
        else falls back to ``previous``, else to the newest other verified version, else reports there is none.
        """
        with self.lock():
            removed = self.clean_staging()
            linked = {self.link(w) for w in _LINKS}
            for d in list(self.versions_dir.iterdir()):
                if self.info(d) is None and d.resolve() not in linked:
                    self._discard(d)
                    removed.append(f"versions/{d.name}")
            cur, why = self.check(self.link("current"), deep=deep)
            prev_dir = self.link("previous")
            prev, prev_why = self.check(prev_dir, deep=deep) if prev_dir is not None else (None, "no link")
            if prev is None and prev_dir is not None:
                self.set_link("previous", None)
                log.warning("previous version dropped: %s", prev_why)
            if prev is not None and cur is not None and prev.path == cur.path:
                self.set_link("previous", None)  # an interrupted switch or rollback left both on one version
            if cur is not None:
                return RecoveryResult(cur, f"current {cur.label} ({cur.dir_name}) is verified", False, removed)
            chosen, how = prev, "previous"
            if chosen is None:
                for info in self.versions():
                    chosen, _ = self.check(info.path, deep=deep)
                    if chosen is not None:
                        how = "newest verified"
                        break
            if chosen is None:
                if self.link("current") is not None:
                    self.set_link("current", None)
                return RecoveryResult(None, f"no verified model installed (current: {why})",
                                      why != "no link", removed)
            self.set_link("current", chosen.path)
            if how == "previous":
                self.set_link("previous", None)
            reason = f"current unusable ({why}): fell back to {how} version {chosen.label} ({chosen.dir_name})"
            self.record({"action": "recovered", "to": chosen.dir_name, "reason": reason})
            return RecoveryResult(chosen, reason, True, removed)
