"""The fleet database: one small wrapper over SQLite (embedded default) and PostgreSQL (psycopg 3).

SQL is written once with ``?`` placeholders; for PostgreSQL they become ``%s``. Migrations are the files
``edge_sdk/fleet/migrations/NNNN_name.sql`` applied in number order, each once, recorded in
``schema_migrations(version, name, applied_at)``; ``{autoid}`` and ``{blob}`` are replaced per dialect.

Thread safety: connections live in a small pool. A :meth:`Database.transaction` pins one connection to the
calling thread until it ends, so every ``execute``/``query`` inside it runs in that transaction; outside a
transaction each call is its own short transaction. SQLite runs in WAL mode (readers never block the
writer) with ``synchronous=FULL`` (a commit the collector acknowledges to the broker survives a power loss) and a
busy timeout set before anything else; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue
instead of deadlocking. Switching a fresh file to WAL and migrating are retried while another process holds the
lock (SQLite answers "database is locked" there without waiting). New database files are created 0600.

Accepted URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``,
``postgresql://user[:password]@host[:port]/dbname`` (``postgres://`` too).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.errors import DatabaseError

__all__ = ["MIGRATIONS_DIR", "Database", "DatabaseError", "split_statements"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_URL_FORMS = "sqlite:///PATH.db (sqlite:////abs/path.db, sqlite:///:memory:) or postgresql://USER@HOST:PORT/DBNAME"
_DIALECT_SUBST = {
    "sqlite": {"{autoid}": "INTEGER PRIMARY KEY", "{blob}": "BLOB"},
    "postgresql": {"{autoid}": "BIGSERIAL PRIMARY KEY", "{blob}": "BYTEA"},
}
_MIGRATION_NAME = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.sql$")
_PG_LOCK_MIGRATE = 0x65646765  # "edge": advisory lock key held while migrating
_POOL_IDLE = 4
_BUSY_S = 30.0  # how long a SQLite statement (and connect / migrate) waits for another process's lock


def _locked(exc: BaseException) -> bool:
    """Is this SQLite's "database is locked / busy" (worth retrying), possibly wrapped in a DatabaseError?"""
    for e in (exc, exc.__cause__):
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return True
    return False


def _retry_locked(fn: Any, what: str) -> Any:
    """Run ``fn()`` again while SQLite reports the database locked, up to ``_BUSY_S`` seconds (with jitter).

    Needed where SQLite returns SQLITE_BUSY at once instead of calling the busy handler (a connection holding a
    read lock that must upgrade while another holds RESERVED: switching journal mode, upgrading a transaction).
    """
    deadline = time.monotonic() + _BUSY_S
    delay = 0.005
    while True:
        try:
            return fn()
        except (sqlite3.OperationalError, DatabaseError) as exc:
            if not _locked(exc) or time.monotonic() >= deadline:
                if isinstance(exc, DatabaseError):
                    raise
                raise DatabaseError(f"{what}: {exc} (still locked by another process after {_BUSY_S:g} s)") from exc
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


def _create_private(path: str) -> None:
    """Create the database file 0600 (whatever the umask) before SQLite opens it; its -wal and -shm files get
    the same mode from SQLite. An existing file is left as it is."""
    try:
        os.close(os.open(Path(path).expanduser(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def _wal(conn: sqlite3.Connection) -> None:
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        conn.execute("PRAGMA journal_mode = WAL")


def split_statements(sql: str) -> list[str]:
    """Split a script on ``;`` that are outside comments (``--``, ``/* */``) and quoted strings.

    Comments are removed; empty statements are dropped.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            continue
        if ch == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            buf.append(" ")
            continue
        if ch in ("'", '"'):
            j = i + 1
            while j < n:
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # doubled quote inside the literal
                        j += 2
                        continue
                    break
                j += 1
            buf.append(sql[i:j + 1])
            i = j + 1
            continue
        if ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
        else:
            buf.append(ch)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


def _to_pyformat(sql: str) -> str:
    """``?`` -> ``%s`` and ``%`` -> ``%%`` outside quoted strings (psycopg's placeholder style)."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


class Database:
    """A fleet database (SQLite or PostgreSQL) with ``?`` placeholders, transactions and migrations.

    Use :meth:`connect`; ``dialect`` is ``"sqlite"`` or ``"postgresql"``.
    """

    def __init__(self, url: str, dialect: str, target: str, *, max_connections: int) -> None:
        self.url = url
        self.dialect = dialect
        self._target = target
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._local = threading.local()
        self._closed = False
        self._sql_cache: dict[str, str] = {}

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str) -> Database:
        """Open ``url`` (see the module docstring for the accepted forms); the first connection is made now."""
        if not isinstance(url, str):
            raise DatabaseError(f"database URL must be a string like {_URL_FORMS}")
        if url.startswith("sqlite:///"):
            target = url[len("sqlite:///"):]
            if not target:
                raise DatabaseError(f"database URL {url!r} names no file: use {_URL_FORMS}")
            memory = target == ":memory:"
            if not memory:
                parent = Path(target).expanduser().parent
                if not parent.is_dir():
                    raise DatabaseError(f"database URL {url!r}: folder {parent} does not exist: create it first")
            db = cls(url, "sqlite", target, max_connections=1 if memory else 8)
        elif url.startswith(("postgresql://", "postgres://")):
            require("psycopg", extra="postgres", purpose="a PostgreSQL fleet database")
            db = cls(url, "postgresql", url, max_connections=8)
        else:
            raise DatabaseError(f"unsupported database URL {url!r}: use {_URL_FORMS}")
        db._release(db._open())  # fail now, not at the first message, when the database is unreachable
        return db

    def _open(self) -> Any:
        self._slots.acquire()
        try:
            if self.dialect == "sqlite":
                return self._open_sqlite()
            import psycopg
            from psycopg.rows import dict_row

            try:
                return psycopg.connect(self._target, autocommit=False, row_factory=dict_row, connect_timeout=10)
            except psycopg.OperationalError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DatabaseError(f"cannot connect to {self._redacted()}: {first}") from None
        except sqlite3.Error as exc:
            self._slots.release()
            raise DatabaseError(f"cannot open {self.url}: {exc}") from None
        except BaseException:
            self._slots.release()
            raise

    def _open_sqlite(self) -> sqlite3.Connection:
        memory = self._target == ":memory:"
        if not memory:
            _create_private(self._target)
        conn = sqlite3.connect(self._target, timeout=_BUSY_S, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_S * 1000)}")  # first: every later statement may wait
            conn.row_factory = sqlite3.Row
            if not memory:
                _retry_locked(lambda: _wal(conn), f"cannot open {self.url}")
            conn.execute("PRAGMA synchronous = FULL")  # acknowledged commits survive a power loss
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _redacted(self) -> str:
        return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", self.url)

    def _acquire(self) -> Any:
        if self._closed:
            raise DatabaseError("the database is closed")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._open()

    def _release(self, conn: Any) -> None:
        if self._closed or self._idle.qsize() >= _POOL_IDLE:
            self._close_conn(conn)
        else:
            self._idle.put(conn)

    def _discard(self, conn: Any) -> None:
        self._close_conn(conn)

    def _close_conn(self, conn: Any) -> None:
        try:
            conn.close()
        finally:
            self._slots.release()

    # -- statements ---------------------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        if self.dialect == "sqlite":
            return sql
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = _to_pyformat(sql)
        return out

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        """The connection for one call: the current transaction's, or a pooled one whose implicit transaction
        ends with the call (committed when the call succeeds, rolled back when it raises: :meth:`_finish`)."""
        tx = getattr(self._local, "conn", None)
        if tx is not None:
            yield tx
            return
        conn = self._acquire()
        broken = False
        try:
            ok = False
            try:
                yield conn
                ok = True
            finally:
                self._finish(conn, ok)
        except BaseException as exc:
            broken = self._is_broken(conn, exc)
            raise
        finally:
            self._give_back(conn, broken)

    def _give_back(self, conn: Any, broken: bool) -> None:
        """Return ``conn`` to the pool, or close it when it broke (a dead PostgreSQL connection must not be reused)."""
        if broken:
            self._discard(conn)
        else:
            self._release(conn)

    def _is_broken(self, conn: Any, exc: BaseException) -> bool:
        if self.dialect == "sqlite":
            return False
        return bool(getattr(conn, "closed", False)) or getattr(conn, "broken", False)

    def _finish(self, conn: Any, ok: bool) -> None:
        """End the implicit transaction of a single call on PostgreSQL (SQLite runs in autocommit mode)."""
        if self.dialect == "postgresql" and not conn.closed:
            if ok:
                conn.commit()
            else:
                conn.rollback()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed (-1 when not applicable)."""
        with self._conn() as conn:
            return conn.execute(self._sql(sql), tuple(params)).rowcount

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> int:
        """Run one statement for each parameter tuple; returns the total number of rows changed."""
        rows = [tuple(p) for p in seq]
        if not rows:
            return 0
        with self._conn() as conn:
            if self.dialect == "sqlite":
                return conn.executemany(sql, rows).rowcount
            with conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
                return cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a SELECT (or ``... RETURNING``) and return its rows as dicts keyed by column name."""
        with self._conn() as conn:
            rows = conn.execute(self._sql(sql), tuple(params)).fetchall()
        if self.dialect == "sqlite":
            return [dict(r) for r in rows]
        return rows

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Database]:
        """One transaction: committed when the block ends, rolled back when it raises. Nested blocks join it.

        On SQLite a write transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock at once).
        """
        if getattr(self._local, "conn", None) is not None:
            yield self
            return
        conn = self._acquire()
        broken = False
        self._local.conn = conn
        try:
            if self.dialect == "sqlite":
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield self
            self._end(conn, "COMMIT")
        except BaseException as exc:
            broken = self._is_broken(conn, exc)
            if not broken:
                try:
                    self._end(conn, "ROLLBACK")
                except Exception:  # the connection died mid-transaction: drop it, keep the cause
                    broken = True
            raise
        finally:
            self._local.conn = None
            self._give_back(conn, broken)

    def _end(self, conn: Any, how: str) -> None:
        if self.dialect == "sqlite":
            conn.execute(how)
        elif how == "COMMIT":
            conn.commit()
        else:
            conn.rollback()

    def lock(self, name: str) -> None:
        """Serialise a critical section across processes for the rest of the current transaction.

        PostgreSQL: a transaction-scoped advisory lock keyed by ``name``; SQLite: a no-op, because a write
        transaction (``BEGIN IMMEDIATE``) already excludes every other writer.
        """
        if getattr(self._local, "conn", None) is None:
            raise DatabaseError("Database.lock() must be called inside transaction()")
        if self.dialect == "postgresql":
            key = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "big", signed=True)
            self.query("SELECT pg_advisory_xact_lock(?) AS locked", (key,))

    # -- migrations ---------------------------------------------------------------------------------------------
    def migrations(self, directory: Path | None = None) -> list[tuple[int, str, Path]]:
        """``(version, name, path)`` of every migration file, in version order."""
        found: dict[int, tuple[int, str, Path]] = {}
        for path in sorted(Path(directory or MIGRATIONS_DIR).glob("*.sql")):
            m = _MIGRATION_NAME.match(path.name)
            if not m:
                raise DatabaseError(f"migration file {path.name} is not named NNNN_name.sql: rename it")
            version = int(m.group(1))
            if version in found:
                raise DatabaseError(f"migrations {found[version][2].name} and {path.name} share version {version}")
            found[version] = (version, m.group(2), path)
        return [found[v] for v in sorted(found)]

    def applied_migrations(self) -> list[int]:
        """Versions recorded in ``schema_migrations`` (empty when the table does not exist yet)."""
        try:
            return [r["version"] for r in self.query("SELECT version FROM schema_migrations ORDER BY version")]
        except (sqlite3.Error, DatabaseError):
            return []
        except Exception as exc:  # psycopg.errors.UndefinedTable: imported lazily, matched by name
            if type(exc).__name__ == "UndefinedTable":
                return []
            raise

    def migrate(self, directory: Path | None = None) -> list[str]:
        """Apply every migration not yet applied, in order, in one transaction; returns the names applied.

        Safe when several processes migrate at once: the transaction holds SQLite's write lock or a
        PostgreSQL advisory lock, and the applied versions are read again under it.
        """
        todo = self.migrations(directory)
        if self.dialect == "sqlite":  # another process migrating or writing: wait for it, then look again
            return _retry_locked(lambda: self._migrate(todo), f"cannot migrate {self.url}")
        return self._migrate(todo)

    def _migrate(self, todo: list[tuple[int, str, Path]]) -> list[str]:
        subst = _DIALECT_SUBST[self.dialect]
        applied_now: list[str] = []
        with self.transaction():
            if self.dialect == "postgresql":
                self.query("SELECT pg_advisory_xact_lock(?) AS locked", (_PG_LOCK_MIGRATE,))
            self.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            done = {r["version"] for r in self.query("SELECT version FROM schema_migrations")}
            for version, name, path in todo:
                if version in done:
                    continue
                script = path.read_text(encoding="utf-8")
                for key, value in subst.items():
                    script = script.replace(key, value)
                for stmt in split_statements(script):
                    try:
                        self.execute(stmt)
                    except Exception as exc:  # re-raised with the file and statement named
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise DatabaseError(f"migration {path.name} failed at {stmt.split(chr(10))[0][:80]!r}: "
                                            f"{first}") from exc
                self.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (version, name, time.time()))
                applied_now.append(f"{version:04d}_{name}")
        return applied_now

    def close(self) -> None:
        """Close every idle connection; later calls raise :class:`DatabaseError`."""
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            self._close_conn(conn)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Database({self._redacted()!r})"
