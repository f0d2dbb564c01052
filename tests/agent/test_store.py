"""SQLiteStore: one owner per file, migrations, quarantine of damaged files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from msp_agent.store import DatabaseTooNewError, SQLiteStore, connect

MIGRATIONS = [
    "CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    "ALTER TABLE t ADD COLUMN w TEXT;",
]


async def test_creates_migrates_and_sets_durability_pragmas(tmp_path: Path) -> None:
    store, quarantine = await SQLiteStore.open(tmp_path / "a.sqlite", MIGRATIONS)
    assert quarantine is None
    try:
        pragmas = await store.run(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
                c.execute("PRAGMA user_version").fetchone()[0],
            )
        )
        assert pragmas == ("wal", 2, 2)  # synchronous=FULL is 2
    finally:
        await store.close()


async def test_write_commits_or_rolls_back_as_one(tmp_path: Path) -> None:
    store, _ = await SQLiteStore.open(tmp_path / "a.sqlite", MIGRATIONS)
    try:
        await store.write(
            lambda c: c.executemany("INSERT INTO t (n, v) VALUES (?, ?)", [(1, "a"), (2, "b")])
        )

        def half_then_fail(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t (n, v) VALUES (3, 'c')")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await store.write(half_then_fail)
        rows = await store.run(lambda c: c.execute("SELECT n FROM t ORDER BY n").fetchall())
        assert rows == [(1,), (2,)]
    finally:
        await store.close()


async def test_refuses_a_database_from_a_newer_agent(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    store, _ = await SQLiteStore.open(path, MIGRATIONS)
    await store.close()
    with pytest.raises(DatabaseTooNewError, match="schema version 2; this agent knows up to 1"):
        await SQLiteStore.open(path, MIGRATIONS[:1])


async def test_failed_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    store, _ = await SQLiteStore.open(path, MIGRATIONS[:1])
    await store.close()
    with pytest.raises(sqlite3.OperationalError):
        await SQLiteStore.open(path, [*MIGRATIONS[:1], "ALTER TABLE missing ADD COLUMN x;"])
    connection = connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
    connection.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda p: p.write_bytes(b"this is not a database at all" * 100), id="not_a_database"
        ),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:100] + b"\xff" * (len(p.read_bytes()) - 100)),
            id="corrupt_pages",
        ),
    ],
)
async def test_damaged_database_is_quarantined_not_replaced_silently(
    tmp_path: Path, damage
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "a.sqlite"
    store, _ = await SQLiteStore.open(path, MIGRATIONS)
    await store.write(
        lambda c: c.executemany(
            "INSERT INTO t (n, v) VALUES (?, ?)", [(i, "x" * 500) for i in range(200)]
        )
    )
    await store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    damaged = path.read_bytes()
    damage(path)
    damaged = path.read_bytes()

    store, quarantine = await SQLiteStore.open(path, MIGRATIONS)
    try:
        assert quarantine is not None
        assert quarantine.moved_to.name.startswith("a.sqlite.corrupt-")
        assert quarantine.moved_to.read_bytes() == damaged, "the damaged file is kept as it was"
        assert quarantine.reason
        count = await store.run(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        assert count == 0
    finally:
        await store.close()
