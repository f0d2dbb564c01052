"""The health endpoint a load balancer (or an operator) asks.

``GET /api/v1/health`` needs no credential and names no tenant's data. It
answers 200 while this replica can serve, and 503 (problem+json
``database-unavailable``, with Retry-After) when it cannot: its database
does not answer within :data:`DATABASE_TIMEOUT_SECONDS`. A
balancer's health check then takes the replica out of rotation.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from aiohttp import web

from msp_central.api_models import HealthOut
from msp_central.context import central, json_response
from msp_central.db.engine import read_only
from msp_central.params import checked_query
from msp_central.problems import Problem, problem_response

routes = web.RouteTableDef()

DATABASE_TIMEOUT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5


async def database_answers(request: web.Request) -> bool:
    """Whether ``SELECT 1`` comes back in time."""
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
            async with read_only(central(request).engine) as connection:
                await connection.execute(sa.text("SELECT 1"))
    except Exception:  # any failure means: not able to serve
        return False
    return True


@routes.get("/api/v1/health")
async def health(request: web.Request) -> web.Response:
    checked_query(request)  # none declared: any is refused
    if await database_answers(request):
        return json_response(HealthOut(status="ok", database="ok"))
    response = problem_response(
        Problem("database-unavailable", "the database does not answer"), request.path
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
