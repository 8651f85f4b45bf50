"""The device's on-disk outbox: every telemetry window and event is committed here before it is published.

One SQLite file in WAL mode, opened by one process at a time (exclusive locking). A message stays ``pending``
until the broker acknowledges it (:meth:`Outbox.ack`); then sequenced rows (telemetry windows) are kept as ``acked``
so that a collector can ask for them again (:meth:`Outbox.resend`), and other rows are deleted. Every change is one
transaction, so a ``kill -9`` or a power cut at any moment leaves a consistent file (with ``synchronous="FULL"``,
the default, a committed row also survives power loss; ``"NORMAL"`` survives a killed process but may lose the last
commits on power loss).

Bounded: when ``max_pending`` rows are waiting, the oldest pending rows are dropped in the same transaction that
adds new ones, and counted in :attr:`Outbox.dropped` (persisted, reported by the device as ``dropped_windows``).

::

    meta(key, value)            schema_version, stream (uuid4 hex), next_seq, dropped, created_at
    messages(id, topic, payload, seq, state, created_at, acked_at)
        id          INTEGER PRIMARY KEY AUTOINCREMENT: ids never repeat, not even after deletes
        payload     compact JSON (UTF-8); sequenced rows carry "stream" and "seq" inside it
        state       pending | acked | rejected (the broker refused it for good: kept aside, never resent)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from edge_sdk.errors import OutboxError

__all__ = ["SYNCHRONOUS_MODES", "Outbox", "OutboxError", "OutboxMessage"]

SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("FULL", "EXTRA", "NORMAL")
MAX_REJECTED_KEPT = 1000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " topic TEXT NOT NULL,"
    " payload BLOB NOT NULL,"
    " seq INTEGER,"
    " state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'acked', 'rejected')),"
    " created_at REAL NOT NULL,"
    " acked_at REAL)",
    "CREATE INDEX IF NOT EXISTS messages_state_id ON messages (state, id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_seq ON messages (seq) WHERE seq IS NOT NULL",
)


class OutboxMessage(NamedTuple):
    """One stored message: its row id (the outbox's own id, never reused), MQTT topic and JSON payload bytes."""

    rowid: int
    topic: str
    payload: bytes


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return "the file is damaged: move it aside (it is left untouched) and restart to create a new outbox"
    if "locked" in text or "busy" in text:
        return "another process (or another Outbox object) is using this file: run one agent per outbox file"
    if "readonly" in text or "read-only" in text:
        return "make the file and its directory writable by the agent"
    if "unable to open" in text:
        return "check that the directory exists and is writable by the agent"
    if "disk is full" in text or "database or disk is full" in text:
        return "free disk space on the device"
    return "check the file and its directory"


def _encode(payload: dict[str, Any], topic: str) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise OutboxError(f"payload for {topic} is not plain JSON ({exc}): send only str/int/float/bool/None/"
                          "list/dict values and no NaN or infinity") from None


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(a, b) for a, b in merged]


class Outbox:
    """A durable, bounded FIFO of MQTT messages in one SQLite file; thread-safe (one connection, one lock)."""

    def __init__(self, path: str | os.PathLike[str], *, max_pending: int = 100_000, keep_acked: int = 10_000,
                 synchronous: str = "FULL") -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise OutboxError(f"max_pending must be a positive integer, got {max_pending!r}")
        if isinstance(keep_acked, bool) or not isinstance(keep_acked, int) or keep_acked < 0:
            raise OutboxError(f"keep_acked must be an integer >= 0, got {keep_acked!r}")
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise OutboxError(f"synchronous={synchronous!r} is not durable enough: use one of "
                              f"{', '.join(SYNCHRONOUS_MODES)}")
        self.path = Path(path)
        self.max_pending = max_pending
        self.keep_acked = keep_acked
        self.synchronous = sync
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
            self._open()
        except sqlite3.Error as exc:
            self._close_quietly()
            raise self._error("opening", exc) from None
        except OutboxError:
            self._close_quietly()
            raise

    # ---------------------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        conn = self._db()
        # exclusive before the first WAL access: no shared memory file, and a second process gets "locked"
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL journal (got {mode})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables.discard("sqlite_sequence")
        if tables and "meta" not in tables:
            raise OutboxError(f"telemetry outbox {self.path} is an SQLite file of something else "
                              f"(tables {', '.join(sorted(tables))}): choose another outbox path")
        with self._tx() as cur:
            for statement in _SCHEMA:
                cur.execute(statement)
            meta = dict(cur.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {"schema_version": str(SCHEMA_VERSION), "stream": uuid.uuid4().hex, "next_seq": "1",
                        "dropped": "0", "created_at": repr(time.time())}
                cur.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        if int(meta.get("schema_version", "0")) > SCHEMA_VERSION:
            raise OutboxError(f"telemetry outbox {self.path} was written by a newer edge-sdk (schema "
                              f"{meta['schema_version']}): upgrade the agent or choose another outbox path")
        self._stream = meta["stream"]
        self._next_seq = int(meta["next_seq"])
        self._dropped = int(meta["dropped"])
        counts = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
        self._pending = counts.get("pending", 0)
        self._acked = counts.get("acked", 0)
        self._rejected = counts.get("rejected", 0)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"telemetry outbox {self.path} is closed: create a new Outbox")
        return self._conn

    def _error(self, action: str, exc: sqlite3.Error) -> OutboxError:
        return OutboxError(f"telemetry outbox {self.path}: {action} failed ({exc}): {_hint(exc)}")

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Cursor:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn.cursor()

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return
                except sqlite3.Error:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def _tx(self) -> Outbox._Tx:
        return Outbox._Tx(self._db())

    def _close_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    # --------------------------------------------------------------------------------------------- properties
    @property
    def stream(self) -> str:
        """uuid4 hex made when the file was created; the ``seq`` numbers of telemetry windows belong to it."""
        return self._stream

    @property
    def dropped(self) -> int:
        """Cumulative count of pending messages dropped (oldest first) because ``max_pending`` was reached."""
        return self._dropped

    # ---------------------------------------------------------------------------------------------- writing
    def put(self, topic: str, payload: dict[str, Any], *, sequenced: bool = False) -> int:
        """Store one message durably (committed before returning) and return its row id.

        ``sequenced=True`` (telemetry windows) sets ``payload["stream"]`` and ``payload["seq"]`` (the next gap-free
        seq of this stream) in the same transaction; the caller's dict gets both keys once the row is committed.
        """
        return self.put_many([(topic, payload, sequenced)])[0]

    def put_many(self, items: Sequence[tuple[str, dict[str, Any], bool]]) -> list[int]:
        """Store several messages in one transaction (see :meth:`put`); returns their row ids in order."""
        for topic, payload, _ in items:
            if not isinstance(topic, str) or not topic:
                raise OutboxError(f"topic must be a non-empty string, got {topic!r}")
            if not isinstance(payload, dict):
                raise OutboxError(f"payload for {topic} must be a dict, got {type(payload).__name__}")
        if not items:
            return []
        now = time.time()
        with self._lock:
            next_seq = self._next_seq
            rows: list[tuple[str, bytes, int | None]] = []
            stamped: list[tuple[dict[str, Any], int]] = []
            for topic, payload, sequenced in items:
                if sequenced:
                    rows.append((topic, _encode({**payload, "stream": self._stream, "seq": next_seq}, topic), next_seq))
                    stamped.append((payload, next_seq))
                    next_seq += 1
                else:
                    rows.append((topic, _encode(payload, topic), None))
            overflow = max(0, self._pending + len(rows) - self.max_pending)
            try:
                with self._tx() as cur:
                    ids = []
                    for topic, body, seq in rows:
                        cur.execute("INSERT INTO messages (topic, payload, seq, state, created_at) "
                                    "VALUES (?, ?, ?, 'pending', ?)", (topic, body, seq, now))
                        ids.append(int(cur.lastrowid or 0))
                    if next_seq != self._next_seq:
                        cur.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(next_seq),))
                    if overflow:
                        cur.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE state='pending' "
                                    "ORDER BY id LIMIT ?)", (overflow,))
                        cur.execute("UPDATE meta SET value=? WHERE key='dropped'", (str(self._dropped + overflow),))
            except sqlite3.Error as exc:
                raise self._error("storing a message", exc) from None
            self._next_seq = next_seq
            self._pending += len(rows) - overflow
            self._dropped += overflow
        for payload, seq in stamped:
            payload["stream"] = self._stream
            payload["seq"] = seq
        return ids

    # ---------------------------------------------------------------------------------------------- reading
    def pending(self, limit: int = 100, *, after: int = 0) -> list[OutboxMessage]:
        """Up to ``limit`` pending messages with row id > ``after``, oldest first."""
        with self._lock:
            try:
                rows = self._db().execute(
                    "SELECT id, topic, payload FROM messages WHERE state='pending' AND id > ? ORDER BY id LIMIT ?",
                    (after, limit)).fetchall()
            except sqlite3.Error as exc:
                raise self._error("reading pending messages", exc) from None
        return [OutboxMessage(int(i), t, bytes(p)) for i, t, p in rows]

    def pending_count(self) -> int:
        """How many messages wait for the broker's acknowledgement."""
        return self._pending

    # ---------------------------------------------------------------------------------------------- acking
    def ack(self, rowid: int) -> None:
        """The broker acknowledged ``rowid``: sequenced rows become ``acked`` (kept for resend), others are deleted."""
        self.ack_many([rowid])

    def ack_many(self, rowids: Iterable[int]) -> None:
        """:meth:`ack` for several rows in one transaction (unknown or already acked ids are ignored)."""
        ids = [(int(r),) for r in rowids]
        if not ids:
            return
        now = time.time()
        with self._lock:
            try:
                with self._tx() as cur:
                    cur.executemany("DELETE FROM messages WHERE id=? AND state='pending' AND seq IS NULL", ids)
                    deleted = cur.rowcount
                    cur.executemany("UPDATE messages SET state='acked', acked_at=? WHERE id=? AND state='pending'",
                                    [(now, i) for (i,) in ids])
                    acked = cur.rowcount
                    pruned = self._prune(cur, self._acked + acked)
            except sqlite3.Error as exc:
                raise self._error("recording an acknowledgement", exc) from None
            self._pending -= deleted + acked
            self._acked += acked - pruned

    def _prune(self, cur: sqlite3.Cursor, acked: int) -> int:
        """Delete the oldest acked rows beyond ``keep_acked`` (with 10% slack so this runs rarely)."""
        if acked <= self.keep_acked + self.keep_acked // 10:
            return 0
        excess = acked - self.keep_acked
        cur.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE state='acked' ORDER BY id "
                    "LIMIT ?)", (excess,))
        return excess

    def reject(self, rowid: int) -> None:
        """The broker refused ``rowid`` for good (e.g. packet too large): keep it aside, never send it again."""
        with self._lock:
            try:
                with self._tx() as cur:
                    cur.execute("UPDATE messages SET state='rejected', acked_at=? WHERE id=? AND state='pending'",
                                (time.time(), int(rowid)))
                    changed = cur.rowcount
                    cur.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE state='rejected' "
                                "ORDER BY id DESC LIMIT -1 OFFSET ?)", (MAX_REJECTED_KEPT,))
                    removed = cur.rowcount
            except sqlite3.Error as exc:
                raise self._error("recording a rejected message", exc) from None
            self._pending -= changed
            self._rejected += changed - removed

    # ---------------------------------------------------------------------------------------------- resend
    def resend(self, stream: str, ranges: Sequence[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
        """Re-queue acked sequenced rows whose seq is in the inclusive ``ranges``.

        Returns ``(requeued, unavailable)``: how many rows became pending again, and the merged seq ranges this
        outbox no longer has (pruned, dropped, never written, another stream, or beyond ``max_pending``). Rows
        still pending are neither requeued nor unavailable: they are on their way.
        """
        wanted: list[tuple[int, int]] = []
        for pair in ranges:
            first, last = pair
            if isinstance(first, bool) or isinstance(last, bool) or not isinstance(first, int) \
                    or not isinstance(last, int) or first < 1 or last < first:
                raise OutboxError(f"resend range {pair!r} is invalid: use [first, last] with 1 <= first <= last")
            wanted.append((first, last))
        wanted = _merge(wanted)
        if stream != self._stream:
            return 0, wanted
        unavailable: list[tuple[int, int]] = []
        with self._lock:
            room = max(0, self.max_pending - self._pending)
            requeue: list[int] = []
            try:
                with self._tx() as cur:
                    for first, last in wanted:
                        expected = first
                        rows = cur.execute("SELECT id, seq, state FROM messages WHERE seq BETWEEN ? AND ? "
                                           "ORDER BY seq", (first, last)).fetchall()
                        for rowid, seq, state in rows:
                            if state == "rejected" or (state == "acked" and len(requeue) >= room):
                                continue  # a gap: reported below
                            if seq > expected:
                                unavailable.append((expected, seq - 1))
                            expected = seq + 1
                            if state == "acked":
                                requeue.append(rowid)
                        if expected <= last:
                            unavailable.append((expected, last))
                    cur.executemany("UPDATE messages SET state='pending', acked_at=NULL WHERE id=? AND state='acked'",
                                    [(i,) for i in requeue])
            except sqlite3.Error as exc:
                raise self._error("re-queueing windows", exc) from None
            self._pending += len(requeue)
            self._acked -= len(requeue)
        return len(requeue), _merge(unavailable)

    # ---------------------------------------------------------------------------------------------- misc
    def stats(self) -> dict[str, Any]:
        """``{"pending", "acked_kept", "rejected", "dropped", "stream", "next_seq"}``."""
        with self._lock:
            return {"pending": self._pending, "acked_kept": self._acked, "rejected": self._rejected,
                    "dropped": self._dropped, "stream": self._stream, "next_seq": self._next_seq}

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; safe to call twice."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is replayed on the next open; nothing is lost
            self._close_quietly()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, pending={self._pending}, dropped={self._dropped})"
