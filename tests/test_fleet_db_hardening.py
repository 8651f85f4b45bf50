"""The SQLite fleet database under concurrency and on disk (issue 13).

* several processes opening and migrating one fresh SQLite file at the same moment all succeed (before: one
  failed with ``cannot open ... database is locked``: switching to WAL happened before any busy handling);
* acknowledged writes are durable: ``synchronous=FULL``;
* the database files are created private (0600, whatever the umask).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from edge_sdk.fleet.db import MIGRATIONS_DIR, Database


def _open_and_migrate(url: str, start: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    try:
        start.wait(30)
        with Database.connect(url) as db:
            applied = db.migrate()
            db.execute("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
                       (1.0, "t", "r", b"x"))
            out.put(len(applied))
    except BaseException as exc:  # reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")


def test_many_processes_open_and_migrate_one_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n_files = len(list(MIGRATIONS_DIR.glob("*.sql")))
    for round_ in range(2):
        url = f"sqlite:///{tmp_path}/fleet{round_}.db"
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_and_migrate, args=(url, start, out)) for _ in range(6)]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert all(isinstance(r, int) for r in results), results
        assert sorted(results) == [0] * 5 + [n_files]
        with Database.connect(url) as db:
            assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 6


def test_connect_waits_for_a_writer_on_a_fresh_rollback_journal_file(tmp_path: Path) -> None:
    """A fresh file still in rollback-journal mode with a writer holding RESERVED: switching to WAL gets
    SQLITE_BUSY at once (SQLite skips the busy handler there to avoid a deadlock); connect must wait and retry."""
    path = tmp_path / "fleet.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(1.0, lambda: other.execute("COMMIT"))
    release.start()
    t0 = time.monotonic()
    try:
        with Database.connect(f"sqlite:///{path}") as db:
            assert time.monotonic() - t0 >= 0.9  # it waited for the writer
            assert db.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
            assert db.migrate()
    finally:
        release.join()
        other.close()


def test_sqlite_commits_are_durable_and_files_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with Database.connect(f"sqlite:///{tmp_path}/fleet.db") as db:
            db.migrate()
            db.execute("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
                       (1.0, "t", "r", b"x"))
            assert db.query("PRAGMA synchronous")[0]["synchronous"] == 2  # FULL
            assert db.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
            files = sorted(tmp_path.glob("fleet.db*"))
            assert {f.name for f in files} >= {"fleet.db", "fleet.db-wal", "fleet.db-shm"}
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f.name, oct(f.stat().st_mode))
    finally:
        os.umask(old)
