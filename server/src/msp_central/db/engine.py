"""The database engine: SQLite (embedded default) or PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (a receipt the server
signed is on disk), foreign keys on, and every transaction ``BEGIN
IMMEDIATE``: writers queue on the database lock at the start instead of
failing half-way with "database is locked". PostgreSQL serialises the
writers of one appliance's log with ``SELECT … FOR UPDATE``.

Both run behind a bounded connection pool: a request waits at most
``pool_timeout`` seconds for a connection (:func:`database_failure` tells
the server's error handling a full pool, and a database that went away,
from its own bugs).
"""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 30_000

T = TypeVar("T")


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    pool_timeout: float = 30,
) -> AsyncEngine:
    """An engine for ``url`` (sqlite+aiosqlite or postgresql+asyncpg) whose
    pool keeps ``pool_size`` connections, opens up to ``max_overflow`` more
    under load, and makes a caller wait at most ``pool_timeout`` seconds for
    one (then ``sqlalchemy.exc.TimeoutError``)."""
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout}
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("database_url does not parse as a SQLAlchemy URL") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend in {"sqlite", "postgresql"} and driver not in {"aiosqlite", "asyncpg"}:
        raise ValueError(
            f"unsupported database driver {parsed.drivername!r}: "
            "use sqlite+aiosqlite or postgresql+asyncpg"
        )
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        memory = not parsed.database or parsed.database == ":memory:"
        engine = create_async_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            hide_parameters=True,  # errors must not carry request contents into logs
            # An in-memory database lives in its one connection: no pool.
            **({} if memory else pool),
        )
        _configure_sqlite(engine.sync_engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_async_engine(
            parsed,
            pool_pre_ping=True,
            hide_parameters=True,
            # A database that does not answer a new connection is as
            # unavailable as one that refuses it: no longer than a pool wait.
            connect_args={"timeout": pool_timeout},
            **pool,
        )
    raise ValueError(
        f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers (see read_only) take a snapshot and never block a writer.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


READ_ONLY = "msp_read_only"


class DatabaseFailure(enum.Enum):
    """Why a request failed for the database rather than for itself."""

    BUSY = "busy"  # no pooled connection came free in time
    UNAVAILABLE = "unavailable"  # the database refused, cut or lost the connection


def database_failure(error: BaseException) -> DatabaseFailure | None:
    """What ``error`` says of the database: None if it is not a failure of
    the database's load or availability (a bug, a constraint, bad input)."""
    if isinstance(error, sa.exc.TimeoutError):
        return DatabaseFailure.BUSY
    if isinstance(error, DBAPIError):
        # Operational and interface errors are the driver's "cannot talk
        # to the database" (SQLite: cannot open or lock the file).
        if error.connection_invalidated or isinstance(error, OperationalError | InterfaceError):
            return DatabaseFailure.UNAVAILABLE
        return None
    # Opening a connection fails with the driver's own error, unwrapped
    # (asyncpg: ConnectionRefusedError, a timeout, "too many connections"):
    # one raised inside the pool is the database's, anywhere else it is not.
    from_driver = isinstance(error, OSError) or type(error).__module__.startswith("asyncpg")
    if from_driver and _raised_in_pool(error.__traceback__):
        return DatabaseFailure.UNAVAILABLE
    return None


def _raised_in_pool(traceback: TracebackType | None) -> bool:
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__name__", "").startswith("sqlalchemy.pool"):
            return True
        traceback = traceback.tb_next
    return False


# One write transaction at a time per process on SQLite: the database allows
# one writer anyway, and a writer that finds it locked waits in SQLite's busy
# handler, which sleeps in steps of up to 100 ms and so misses the moment the
# lock is free. Queued here instead, the next writer starts at once.
_sqlite_writers: weakref.WeakKeyDictionary[AsyncEngine, asyncio.Lock] = weakref.WeakKeyDictionary()


# The same file through the synchronous driver, for write transactions that
# must cross into the database thread once rather than once per statement
# (see run_write).
_sqlite_sync: weakref.WeakKeyDictionary[AsyncEngine, Engine] = weakref.WeakKeyDictionary()


def _sync_engine(engine: AsyncEngine) -> Engine:
    sync = _sqlite_sync.get(engine)
    if sync is None:
        sync = sa.create_engine(
            engine.url.set(drivername="sqlite"),
            # One writer at a time (the lock in run_write), from whichever
            # worker thread runs it.
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            poolclass=sa.pool.QueuePool,
            pool_size=1,
            max_overflow=0,
            hide_parameters=True,
        )
        _configure_sqlite(sync)
        _sqlite_sync[engine] = sync
    return sync


async def dispose(engine: AsyncEngine) -> None:
    """Close every connection of ``engine`` (and of its synchronous twin)."""
    sync = _sqlite_sync.pop(engine, None)
    if sync is not None:
        sync.dispose()
    await engine.dispose()


async def run_write(engine: AsyncEngine, work: Callable[[Connection], T]) -> T:
    """Run ``work(connection)`` (synchronous SQLAlchemy Core) in one write
    transaction. On SQLite the whole transaction runs in a worker thread in
    one go: the write lock is then held for the statements alone, not for
    the event-loop round trips between them, which under load cost more
    than the statements. On PostgreSQL it runs through the async driver."""
    if engine.dialect.name != "sqlite":
        async with engine.begin() as connection:
            return await connection.run_sync(work)
    lock = _sqlite_writers.setdefault(engine, asyncio.Lock())
    async with lock:
        return await asyncio.to_thread(_in_transaction, _sync_engine(engine), work)


def _in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return work(connection)


@asynccontextmanager
async def write(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
    if engine.dialect.name != "sqlite":
        async with engine.begin() as connection:
            yield connection
        return
    lock = _sqlite_writers.setdefault(engine, asyncio.Lock())
    async with lock, engine.begin() as connection:
        yield connection


@asynccontextmanager
async def read_only(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reading: on SQLite a deferred transaction (a WAL
    snapshot that neither waits for nor blocks the writer); writes go through
    ``engine.begin()``, which takes the write lock up front."""
    async with engine.connect() as connection:
        yield await connection.execution_options(**{READ_ONLY: True})


def _insert_ignore_statement(dialect: str, table: Table) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def insert_ignore_sync(connection: Connection, table: Table, row: dict[str, Any]) -> bool:
    """:func:`insert_ignore` for one row inside :func:`run_write`."""
    statement = _insert_ignore_statement(connection.dialect.name, table)
    return bool(connection.execute(statement, row).rowcount)


async def insert_ignore(
    connection: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]
) -> int:
    """Insert rows, skipping any whose primary key exists; return how many
    were inserted. Never raises for a duplicate, so the transaction survives
    (PostgreSQL aborts a transaction on any error)."""
    if len(rows) != 1:
        # asyncpg reports no row count for executemany: one row at a time.
        raise ValueError("insert_ignore takes exactly one row")
    statement = _insert_ignore_statement(connection.dialect.name, table)
    result = await connection.execute(statement, rows[0])
    return int(result.rowcount)


def insert_rows(
    connection: Connection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """Insert many rows in one driver ``executemany``, past SQLAlchemy's
    per-row parameter processing: the witness's bulk path (1,000 audit
    entries a batch), inside :func:`run_write`. Values must already be what
    the driver takes (str, int, bytes)."""
    if not rows:
        return
    style = connection.dialect.paramstyle
    if style == "qmark":
        marks = ", ".join("?" for _ in columns)
    elif style in ("numeric_dollar", "format"):
        marks = (
            ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            if style == "numeric_dollar"
            else ", ".join("%s" for _ in columns)
        )
    else:  # pragma: no cover - the two supported drivers use the styles above
        raise ValueError(f"unsupported parameter style {style}")
    quote = connection.dialect.identifier_preparer.quote
    statement = (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608
        f"VALUES ({marks})"
    )
    connection.exec_driver_sql(statement, rows)
