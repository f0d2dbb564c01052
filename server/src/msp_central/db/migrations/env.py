"""Alembic environment: runs migrations on the configured engine (async)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from msp_central.db.engine import create_engine
from msp_central.db.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate() -> None:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        async with engine.connect() as async_connection:
            await async_connection.run_sync(_run)
            await async_connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
given = context.config.attributes.get("connection")
if given is not None:
    # Called by msp_central.db.migrate from inside the server's event loop,
    # with a connection already in a transaction.
    _run(given)
else:
    asyncio.run(_migrate())
