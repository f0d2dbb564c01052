"""Fixtures: the central server on SQLite and on PostgreSQL.

Each backend is migrated once per session (a real ``alembic upgrade``);
each test then gets a clean copy: a copied SQLite file, or the PostgreSQL
test database with every non-catalogue table truncated. PostgreSQL is the
session's server (``postgres_admin_url``: the running one, else a throw-away
cluster); these tests never skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.db.tables import metadata
from tests.central.support import ROOT, Clock, Harness, create_pg_database, drop_pg_database

T = TypeVar("T")

CATALOGUE = {
    "frameworks",
    "controls",
    "runbooks",
    "control_runbook_mapping",
    "presets",
    "alembic_version",
}


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def _run_apart(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: while the console's browser
    tests run, Playwright's synchronous driver keeps an event loop marked as
    running in the main thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "central.db"
    _run_apart(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    name = f"msp_central_test_{os.getpid()}"
    url = _run_apart(create_pg_database(name, postgres_admin_url))
    _run_apart(_migrate(url))
    yield url

    _run_apart(drop_pg_database(name, postgres_admin_url))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "central.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    _run_apart(_truncate(url))
    return url


async def _truncate(url: str) -> None:
    engine = create_engine(url)
    try:
        names = [t.name for t in metadata.sorted_tables if t.name not in CATALOGUE]
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
            )
    finally:
        await engine.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", database_url=database_url)


@pytest.fixture
async def harness(settings: Settings, aiohttp_client: Any) -> Harness:
    clock = Clock()
    app = create_app(settings, root=ROOT, clock=clock)
    client = await aiohttp_client(app)
    return Harness(client, app[CENTRAL].engine, clock)
