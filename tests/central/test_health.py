"""The health endpoint a load balancer asks."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from tests.central.support import Harness, call


async def settled(harness: Harness) -> None:
    """Wait until no connection is checked out (the notifier's first round
    takes one at start): one disposed of while in use is dropped unclosed
    when it comes back, and its driver warns about it in a later test."""
    pool = harness.engine.pool
    assert isinstance(pool, QueuePool)
    async with asyncio.timeout(10):
        while pool.checkedout():  # noqa: ASYNC110 - the pool has no event to wait on
            await asyncio.sleep(0.01)


async def test_health_answers_while_the_database_does(harness: Harness) -> None:
    reply = await call(harness.client, "GET", "/api/v1/health")
    assert reply.status == 200
    assert reply.body == {
        "status": "ok",
        "database": "ok",
        "lanes": {
            "bulk": {"in_flight": 0, "limit": 8, "shed": 0},
            "urgent": {"in_flight": 0, "limit": 64, "shed": 0},
            "interactive": {"in_flight": 0, "limit": 32, "shed": 0},
        },
    }


async def test_health_is_503_when_the_database_is_gone(harness: Harness) -> None:
    # The engine can no longer reach its database: every new connection
    # fails, as when PostgreSQL stops or the SQLite file's disk vanishes.
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("connection refused")

    await settled(harness)
    await harness.engine.dispose()
    sa.event.listen(harness.engine.sync_engine, "do_connect", refuse)
    try:
        reply = await call(harness.client, "GET", "/api/v1/health")
    finally:
        sa.event.remove(harness.engine.sync_engine, "do_connect", refuse)
    assert reply.status == 503
    assert reply.code == "database-unavailable"
    assert int(reply.headers["Retry-After"]) >= 1


async def test_health_takes_no_query(harness: Harness) -> None:
    reply = await call(harness.client, "GET", "/api/v1/health?verbose=1")
    assert reply.status == 400
