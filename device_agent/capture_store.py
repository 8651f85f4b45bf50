"""The bounded on-device store of captured samples: content-addressed files with an SQLite index, at most
``max_bytes`` (the oldest samples are dropped and counted beyond it)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from edge_sdk.device_agent.capture_settings import CaptureError
from edge_sdk.errors import first_line

__all__ = ["LocalSampleStore"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE, "
    "ext TEXT NOT NULL, size INTEGER NOT NULL, meta TEXT NOT NULL, label INTEGER, created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS labels (sha256 TEXT PRIMARY KEY, label INTEGER NOT NULL, ts REAL NOT NULL)",
)


class LocalSampleStore:
    """Content-addressed sample files (``<dir>/blobs/<sha256>.<ext>``) with an SQLite index (``<dir>/index.db``),
    holding at most ``max_bytes`` of samples: adding beyond it drops the oldest, counted in :attr:`dropped`
    (persisted). A crash between a file write and its index row leaves an orphan file, removed at the next open.
    Thread-safe (one connection, one lock)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, synchronous: str = "NORMAL") -> None:
        self.dir = Path(directory).expanduser()
        self.blobs = self.dir / "blobs"
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # captured inputs are private data
            self.blobs.mkdir(mode=0o700, exist_ok=True)
            self._conn = sqlite3.connect(self.dir / "index.db", timeout=5.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
            for stmt in _SCHEMA:
                self._conn.execute(stmt)
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            self.dropped = int(meta.get("dropped", "0"))
            self.total_bytes = int(self._conn.execute("SELECT COALESCE(SUM(size), 0) FROM samples").fetchone()[0])
            known = {f"{s}.{e}" for s, e in self._conn.execute("SELECT sha256, ext FROM samples")}
        except (OSError, sqlite3.Error) as exc:
            raise CaptureError(f"capture store {self.dir} cannot be opened ({first_line(exc)}): check the folder is "
                               "writable, or move a damaged index.db aside") from None
        for f in self.blobs.iterdir():  # orphans of a crash (and temporary files)
            if f.name not in known:
                f.unlink(missing_ok=True)

    def _path(self, sha: str, ext: str) -> Path:
        return self.blobs / f"{sha}.{ext}"

    def add(self, sha: str, ext: str, data: bytes, meta: dict[str, Any], label: int | None = None) -> bool:
        """Store one sample (file first, then its row); False when this sha256 is stored already. Drops the oldest
        samples when the cap would be exceeded."""
        with self._lock:
            if self._conn.execute("SELECT 1 FROM samples WHERE sha256=?", (sha,)).fetchone():
                return False
            path = self._path(sha, ext)
            tmp = self.blobs / f".tmp-{sha}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
                victims: list[tuple[str, str]] = []
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute("INSERT INTO samples (sha256, ext, size, meta, label, created_at) VALUES "
                                       "(?, ?, ?, ?, ?, ?)", (sha, ext, len(data), json.dumps(meta), label,
                                                              time.time()))
                    total = self.total_bytes + len(data)
                    if total > self.max_bytes:
                        for s, e, size in self._conn.execute("SELECT sha256, ext, size FROM samples ORDER BY id"):
                            if total <= self.max_bytes:
                                break
                            victims.append((s, e))
                            total -= size
                        self._conn.executemany("DELETE FROM samples WHERE sha256=?", [(s,) for s, _ in victims])
                        self._conn.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT (key) "
                                           "DO UPDATE SET value=excluded.value", (str(self.dropped + len(victims)),))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except (OSError, sqlite3.Error) as exc:
                tmp.unlink(missing_ok=True)
                raise CaptureError(f"capture store {self.dir}: storing a sample failed ({first_line(exc)}): free "
                                   "disk space or check the folder") from None
            self.total_bytes = total
            self.dropped += len(victims)
            for s, e in victims:
                self._path(s, e).unlink(missing_ok=True)
            return True

    def pending(self, limit: int = 32) -> list[dict[str, Any]]:
        """The oldest ``limit`` samples: ``{"sha256", "ext", "meta", "label"}`` (the file is read on upload)."""
        with self._lock:
            rows = self._conn.execute("SELECT sha256, ext, meta, label FROM samples ORDER BY id LIMIT ?",
                                      (limit,)).fetchall()
        return [{"sha256": s, "ext": e, "meta": json.loads(m), "label": lab} for s, e, m, lab in rows]

    def read(self, sha: str, ext: str) -> bytes | None:
        """A sample's bytes (None when it was dropped meanwhile)."""
        try:
            return self._path(sha, ext).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, sha: str, sent_label: int | None) -> None:
        """The collector has ``sha``: delete it. A label set since it was read (``sent_label`` differs) becomes a
        label update, in the same transaction."""
        with self._lock:
            row = self._conn.execute("SELECT ext, size, label FROM samples WHERE sha256=?", (sha,)).fetchone()
            if row is None:
                return
            ext, size, label = row
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM samples WHERE sha256=?", (sha,))
                if label is not None and label != sent_label:
                    self._conn.execute("INSERT OR REPLACE INTO labels (sha256, label, ts) VALUES (?, ?, ?)",
                                       (sha, label, time.time()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.total_bytes -= int(size)
            self._path(sha, ext).unlink(missing_ok=True)

    def set_label(self, sha: str, label: int) -> None:
        """Label a sample: on its row while it waits for upload, else as a label update for the collector."""
        with self._lock:
            cur = self._conn.execute("UPDATE samples SET label=? WHERE sha256=?", (label, sha))
            if cur.rowcount == 0:
                self._conn.execute("INSERT OR REPLACE INTO labels (sha256, label, ts) VALUES (?, ?, ?)",
                                   (sha, label, time.time()))

    def label_updates(self, limit: int = 200) -> list[tuple[str, int]]:
        """Label updates waiting for the collector, oldest first."""
        with self._lock:
            return [(s, int(v)) for s, v in self._conn.execute("SELECT sha256, label FROM labels ORDER BY ts LIMIT ?",
                                                               (limit,))]

    def labels_sent(self, items: list[tuple[str, int]]) -> None:
        """The collector took these label updates (a newer label for the same sample stays)."""
        with self._lock:
            self._conn.executemany("DELETE FROM labels WHERE sha256=? AND label=?", items)

    def count(self) -> int:
        """Samples stored."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def close(self) -> None:
        """Close the index (idempotent)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

