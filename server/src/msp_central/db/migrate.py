"""Running the Alembic migrations from code (``msp-central db upgrade``)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATION_LOCK = 0x6D73702D6D696772  # "msp-migr": a PostgreSQL advisory lock of our own


class DatabaseVersionError(Exception):
    """The database was migrated by a newer server than this one."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "msp_central.db:migrations")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def upgrade(engine: AsyncEngine) -> str:
    """Migrate to the newest revision; return it. Refuses a database whose
    revision this code does not know (migrated by a newer server)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    script = ScriptDirectory.from_config(config)
    current = await current_revision(engine)
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise DatabaseVersionError(
            f"database is at revision {current}, unknown to this server (newer?): refusing it"
        )

    def _upgrade(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Replicas started together (migrate_on_start) migrate one at a
            # time; the later ones find nothing left to do.
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
    return head_revision()


async def check_current(engine: AsyncEngine) -> None:
    """Raise unless the database is exactly at this code's head revision."""
    current = await current_revision(engine)
    head = head_revision()
    if current != head:
        raise DatabaseVersionError(
            f"database is at revision {current or 'none'}, this server needs {head}: "
            "run `msp-central db upgrade`"
        )
