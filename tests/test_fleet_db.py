"""The fleet database wrapper on real SQLite and a real PostgreSQL server: migrations, placeholders, transactions."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from pathlib import Path

import pytest
from collector_helpers import pg_url

from edge_sdk.fleet.db import MIGRATIONS_DIR, Database, DatabaseError, split_statements

TABLES = {"devices", "windows", "streams", "events", "dead_letters", "alerts", "schema_migrations"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        with pg_url() as url:
            yield url


def _tables(db: Database) -> set[str]:
    if db.dialect == "sqlite":
        rows = db.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = db.query("SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'")
    return {r["name"] for r in rows}


def test_migrate_applies_every_file_once(db_url: str) -> None:
    with Database.connect(db_url) as db:
        files = [p.name for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
        applied = db.migrate()
        assert [f"{a}.sql" for a in applied] == files
        assert TABLES <= _tables(db)
        assert db.migrate() == []
        rows = db.query("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [int(f.split("_")[0]) for f in files]
        assert all(r["applied_at"] > 1.5e9 for r in rows)


def test_same_queries_on_both_dialects(db_url: str) -> None:
    with Database.connect(db_url) as db:
        db.migrate()
        insert = ("INSERT INTO events (event_id, fleet, device, ts, received_at, kind, level, data) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING")
        rows = [(f"{i:032x}", "f", "d", 1.7e9 + i, 1.7e9, "model.loaded", "info", '{"pct": "100%"}')
                for i in (1, 2, 2, 3)]
        assert db.executemany(insert, rows) == 3  # the duplicate is not counted
        assert db.execute(insert, rows[0]) == 0
        got = db.query("SELECT event_id, data, '50%' AS lit FROM events WHERE kind = ? AND ts > ? ORDER BY ts",
                       ("model.loaded", 1.7e9 + 1.5))
        assert [r["event_id"] for r in got] == [f"{2:032x}", f"{3:032x}"]
        assert got[0]["data"] == '{"pct": "100%"}' and got[0]["lit"] == "50%"
        blob = bytes(range(256))
        new = db.query("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?) "
                       "RETURNING id", (1.7e9, "edge/f/d/telemetry", "bad", blob))
        back = db.query("SELECT payload FROM dead_letters WHERE id = ?", (new[0]["id"],))
        assert bytes(back[0]["payload"]) == blob


def test_transaction_commits_or_rolls_back(db_url: str) -> None:
    with Database.connect(db_url) as db:
        db.migrate()
        sql = "INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)"
        with pytest.raises(RuntimeError):
            with db.transaction():
                db.execute(sql, (1.0, "t", "kept?", b"x"))
                with db.transaction():  # nested: joins the outer one
                    db.execute(sql, (2.0, "t", "kept?", b"y"))
                raise RuntimeError("boom")
        assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 0
        with db.transaction():
            db.lock("test-lock")
            db.execute(sql, (1.0, "t", "kept", b"x"))
            # inside the transaction our own write is visible
            assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 1
        assert db.query("SELECT reason FROM dead_letters")[0]["reason"] == "kept"


def test_threads_share_one_database(db_url: str) -> None:
    with Database.connect(db_url) as db:
        db.migrate()
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for i in range(50):
                    with db.transaction():
                        db.execute("INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)",
                                   (float(i), f"t{k}", "r", b""))
                    db.query("SELECT COUNT(*) AS n FROM dead_letters WHERE topic = ?", (f"t{k}",))
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 200


def _migrate_in_process(url: str, directory: str, out: multiprocessing.Queue) -> None:
    try:
        with Database.connect(url) as db:
            out.put(db.migrate(Path(directory)))
    except BaseException as exc:  # reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_migrate_at_once_and_later_files_just_work(db_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for p in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(p, migrations / p.name)
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_process, args=(db_url, str(migrations), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(r, list) for r in results), results
    n = len(list(MIGRATIONS_DIR.glob("*.sql")))
    assert sorted(len(r) for r in results) == [0, n]  # one process applied everything, the other nothing
    # a later migration (issue 6 style): comments with ';', a string with ';' and the dialect placeholders
    (migrations / "0099_extra.sql").write_text(
        "-- a comment; with a semicolon\nCREATE TABLE extra (id {autoid}, note TEXT NOT NULL DEFAULT 'a;b', "
        "data {blob});\n/* block; comment */\nCREATE INDEX extra_note ON extra (note);\n")
    with Database.connect(db_url) as db:
        assert db.migrate(migrations) == ["0099_extra"]
        db.execute("INSERT INTO extra (data) VALUES (?)", (b"\x00\x01",))
        assert db.query("SELECT id, note FROM extra") == [{"id": 1, "note": "a;b"}]
        assert db.migrate(migrations) == []


def test_a_failing_migration_names_the_file_and_applies_nothing(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok_table (x INTEGER);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE broken (x INTEGER;")
    with Database.connect(db_url) as db:
        with pytest.raises(DatabaseError, match=r"0002_broken\.sql"):
            db.migrate(tmp_path)
        assert "ok_table" not in _tables(db)
        assert db.applied_migrations() == []


@pytest.mark.parametrize("url, expected", [
    ("mysql://localhost/x", "unsupported database URL"),
    ("fleet.db", "unsupported database URL"),
    ("sqlite:///", "names no file"),
    ("sqlite:////no/such/folder/f.db", "does not exist"),
    ("postgresql://root@127.0.0.1:1/none", "cannot connect"),
])
def test_bad_urls_give_one_line_errors(url: str, expected: str) -> None:
    with pytest.raises(DatabaseError) as info:
        Database.connect(url)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if "unsupported" in expected:
        assert "sqlite:///" in message and "postgresql://" in message


def test_split_statements_ignores_semicolons_in_comments_and_strings() -> None:
    sql = "-- x; y\nCREATE TABLE a (s TEXT DEFAULT 'x;''y');\n/* ; */ INSERT INTO a VALUES ('--;');;\n"
    assert split_statements(sql) == ["CREATE TABLE a (s TEXT DEFAULT 'x;''y')", "INSERT INTO a VALUES ('--;')"]


def test_memory_database_works_for_threads() -> None:
    with Database.connect("sqlite:///:memory:") as db:
        db.migrate()
        t = threading.Thread(target=lambda: db.execute(
            "INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (1, 't', 'r', x'00')"))
        t.start()
        t.join()
        assert db.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 1
