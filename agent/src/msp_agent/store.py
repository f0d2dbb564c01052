"""One SQLite file, one connection, one thread.

Every database of the agent has exactly one owner: a :class:`SQLiteStore`
that holds the file's only connection inside a dedicated thread. Callers hand
it a function to run against the connection (:meth:`SQLiteStore.run`) or to run
inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (:meth:`SQLiteStore.write`); either
crosses the thread boundary once however many statements the function runs
(a thread hop costs about 0.2 ms, a row insert a few microseconds). The event
loop never blocks on SQLite.

On open, the file is checked (``PRAGMA quick_check``). A file that fails —
corrupt pages, not a database at all — is *quarantined*: renamed beside the
original with its WAL and shared-memory files, never deleted, and a fresh
database is created; the caller receives a :class:`Quarantine` report to log
and escalate. A database written by a newer agent (higher ``user_version``
than this code knows) is refused, never downgraded.

Durability: WAL journal with ``synchronous=FULL`` — a commit returns only
after the WAL is flushed to disk, so "acknowledged" means "survives a power
cut or ``kill -9``".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from msp_agent.files import fsync_directory

log = logging.getLogger(__name__)

T = TypeVar("T")

Migration = str  # one SQL script; migrations[i] takes user_version i to i + 1


class StoreError(Exception):
    """A database that cannot be used as it is (the operator must act)."""


class DatabaseTooNewError(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A damaged database moved aside at open."""

    original: Path
    moved_to: Path
    reason: str


class SQLiteStore:
    def __init__(self, path: Path, executor: ThreadPoolExecutor, connection: sqlite3.Connection):
        self.path = path
        self._executor = executor
        self._connection = connection
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, migrations: Sequence[Migration], *, name: str | None = None
    ) -> tuple[SQLiteStore, Quarantine | None]:
        """Open (creating if needed) and migrate ``path``.

        Returns the store and, if the existing file had to be quarantined, the
        report of it. Raises :class:`DatabaseTooNewError` for a database from a
        newer agent.
        """
        executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sqlite-{name or path.stem}"
        )
        loop = asyncio.get_running_loop()
        try:
            connection, quarantine = await loop.run_in_executor(
                executor, _open_checked, path, list(migrations)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, connection), quarantine

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the store's thread (no transaction opened)."""
        if self._closed:
            raise StoreError(f"{self.path.name} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._connection)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` inside one ``BEGIN IMMEDIATE`` transaction.

        Commits if ``fn`` returns, rolls back if it raises. When this returns,
        the transaction is on disk.
        """
        return await self.run(lambda connection: transaction(connection, fn))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _close, self._connection)
        self._executor.shutdown(wait=True)


def transaction(connection: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = fn(connection)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return result


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the agent's PRAGMAs. Read-only connections are for
    tools (``msp-agent audit verify``) reading while the service writes."""
    if readonly:
        connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
        )
    else:
        connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path.name}: cannot use WAL journal (got {mode})")
        connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def _open_checked(
    path: Path, migrations: list[Migration]
) -> tuple[sqlite3.Connection, Quarantine | None]:
    quarantine = None
    if path.exists():
        problem = _integrity_problem(path)
        if problem is not None:
            quarantine = quarantine_file(path, problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = connect(path)
    try:
        _migrate(connection, path, migrations)
    except BaseException:
        connection.close()
        raise
    return connection, quarantine


def _integrity_problem(path: Path) -> str | None:
    try:
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            rows = connection.execute("PRAGMA quick_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"
    messages = [row[0] for row in rows]
    if messages != ["ok"]:
        return "; ".join(messages[:5])
    return None


def quarantine_file(path: Path, reason: str) -> Quarantine:
    """Move a damaged database (and its WAL and shared memory) aside, keeping it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    moved = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(Path(f"{moved}{suffix}"))
    fsync_directory(path.parent)
    log.error("database %s failed its integrity check (%s); moved to %s", path, reason, moved)
    return Quarantine(path, moved, reason)


def _migrate(connection: sqlite3.Connection, path: Path, migrations: list[Migration]) -> None:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise DatabaseTooNewError(
            f"{path.name} has schema version {version}; this agent knows up to "
            f"{len(migrations)}: it was written by a newer agent, refusing to open it"
        )
    for number in range(version, len(migrations)):
        # The script and the version bump are one transaction: a crash
        # mid-migration leaves the previous version, never half of one.
        try:
            connection.executescript(
                f"BEGIN IMMEDIATE;\n{migrations[number]}\n"
                f"PRAGMA user_version = {number + 1};\nCOMMIT;"
            )
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise


def _close(connection: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        connection.execute("PRAGMA optimize")
    connection.close()
