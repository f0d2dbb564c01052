"""Migrations create exactly the schema the code uses, on both backends,
load the catalogue, and a database from a newer server is refused."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from msp_central.app import create_app
from msp_central.catalogue import load_catalogue
from msp_central.config import Settings
from msp_central.db.engine import create_engine
from msp_central.db.migrate import DatabaseVersionError, check_current, head_revision, upgrade
from msp_central.db.tables import controls, frameworks, metadata
from tests.central.support import ROOT


def _diff(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def test_migrated_schema_matches_the_tables(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
        await check_current(engine)
        assert await upgrade(engine) == head_revision()  # a second upgrade is a no-op
    finally:
        await engine.dispose()


async def test_the_catalogue_is_loaded(database_url: str) -> None:
    catalogue = load_catalogue(1)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            ids = (
                (
                    await connection.execute(
                        sa.select(frameworks.c.id).order_by(frameworks.c.position)
                    )
                )
                .scalars()
                .all()
            )
            count = (
                await connection.execute(sa.select(sa.func.count()).select_from(controls))
            ).scalar()
    finally:
        await engine.dispose()
    assert ids == [f.id for f in catalogue.frameworks]
    assert count == sum(len(f.controls) for f in catalogue.frameworks)


async def test_a_newer_database_is_refused(database_url: str, tmp_path: Any) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(DatabaseVersionError, match="9999"):
            await check_current(engine)
        with pytest.raises(DatabaseVersionError, match="unknown to this server"):
            await upgrade(engine)
        app = create_app(Settings(state_dir=tmp_path, database_url=database_url), root=ROOT)
        with pytest.raises(DatabaseVersionError, match="msp-central db upgrade"):
            async with TestServer(app):
                pass
    finally:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(f"UPDATE alembic_version SET version_num = '{head_revision()}'")
            )
        await engine.dispose()


async def test_an_empty_database_is_refused_until_upgraded(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    engine = create_engine(url)
    try:
        with pytest.raises(DatabaseVersionError, match="revision none"):
            await check_current(engine)
        await upgrade(engine)
        await check_current(engine)
    finally:
        await engine.dispose()
