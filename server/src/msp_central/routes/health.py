"""The health endpoint a load balancer (or an operator) asks.

``GET /api/v1/health`` needs no credential, names no tenant's data and is
never shed by admission control. It answers 200 while this replica can
serve: ``status`` ``ok``, or ``busy`` while it sheds load (a balancer must
keep sending it requests: it refuses what it cannot take by itself, and
taking every busy replica out would leave none), with each lane's requests
in flight, limit and shed total. It answers 503 problem+json, with
Retry-After, when it cannot serve: ``shutting-down`` from the moment it
was asked to stop, ``database-unavailable`` when its database does not
answer within :data:`DATABASE_TIMEOUT_SECONDS`. A balancer's health check
then takes the replica out of rotation.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from msp_central.api_models import HealthOut, LaneHealthOut
from msp_central.config import Settings
from msp_central.context import ADMISSION, central, json_response
from msp_central.db.engine import read_only
from msp_central.params import checked_query
from msp_central.problems import Problem, problem_response

routes = web.RouteTableDef()

DATABASE_TIMEOUT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5


async def database_answers(request: web.Request) -> bool:
    """Whether ``SELECT 1`` comes back in time, or every pooled connection
    is in use: a full pool is a database serving this replica's requests
    (it is shed as busy), not one gone away, and a balancer must not take
    a replica out for being busy."""
    service = central(request)
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
            async with read_only(service.engine) as connection:
                await connection.execute(sa.text("SELECT 1"))
    except Exception:  # any failure means: not able to serve, unless busy
        return _pool_full(service.engine, service.settings)
    return True


def _pool_full(engine: AsyncEngine, settings: Settings) -> bool:
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return False
    return pool.checkedout() >= settings.database_pool_size + settings.database_max_overflow


def _unavailable(request: web.Request, problem: Problem) -> web.Response:
    response = problem_response(problem, request.path)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


@routes.get("/api/v1/health")
async def health(request: web.Request) -> web.Response:
    checked_query(request)  # none declared: any is refused
    gate = request.app[ADMISSION]
    if gate.shutting_down:
        return _unavailable(request, Problem("shutting-down", "this server is shutting down"))
    if not await database_answers(request):
        return _unavailable(
            request, Problem("database-unavailable", "the database does not answer")
        )
    lanes = {
        lane.value: LaneHealthOut(in_flight=state.in_flight, limit=state.limit, shed=state.shed)
        for lane, state in gate.lanes.items()
    }
    status = "busy" if gate.busy else "ok"
    return json_response(
        HealthOut.model_validate({"status": status, "database": "ok", "lanes": lanes})
    )
