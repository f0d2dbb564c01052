"""The compliance catalogue, read-only, for any partner or admin key."""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from aiohttp import web

from msp_central.api_models import ControlOut, FrameworkOut, PresetOut, RunbookOut
from msp_central.auth import require_partner_or_admin
from msp_central.catalogue import Tier
from msp_central.context import central, json_response
from msp_central.db.engine import read_only
from msp_central.db.tables import control_runbook_mapping, controls, frameworks, presets, runbooks
from msp_central.problems import Problem

routes = web.RouteTableDef()


@routes.get("/api/v1/frameworks")
async def list_frameworks(request: web.Request) -> web.Response:
    await require_partner_or_admin(request)
    async with read_only(central(request).engine) as connection:
        framework_rows = (
            await connection.execute(sa.select(frameworks).order_by(frameworks.c.position))
        ).all()
        control_rows = (
            await connection.execute(
                sa.select(controls).order_by(controls.c.framework_id, controls.c.position)
            )
        ).all()
        mapping_rows = (
            await connection.execute(
                sa.select(control_runbook_mapping).order_by(control_runbook_mapping.c.runbook_id)
            )
        ).all()
    mapped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m in mapping_rows:
        mapped[(m.framework_id, m.control_id)].append(m.runbook_id)
    by_framework: dict[str, list[ControlOut]] = defaultdict(list)
    for c in control_rows:
        runbook_ids = mapped[(c.framework_id, c.control_id)]
        by_framework[c.framework_id].append(
            ControlOut(
                id=c.control_id,
                title=c.title,
                runbooks=runbook_ids,
                automated=bool(runbook_ids),
            )
        )
    wanted = request.match_info.get("framework_id")
    result = [
        FrameworkOut(id=f.id, name=f.name, edition=f.edition, controls=by_framework[f.id])
        for f in framework_rows
        if wanted is None or f.id == wanted
    ]
    if wanted is not None:
        if not result:
            raise Problem("not-found", f"no framework {wanted[:32]}")
        return json_response(result[0])
    return json_response(result)


routes.get("/api/v1/frameworks/{framework_id}")(list_frameworks)


@routes.get("/api/v1/runbooks")
async def list_runbooks(request: web.Request) -> web.Response:
    await require_partner_or_admin(request)
    async with read_only(central(request).engine) as connection:
        rows = (await connection.execute(sa.select(runbooks).order_by(runbooks.c.id))).all()
    return json_response(
        [
            RunbookOut(
                id=r.id,
                title=r.title,
                tier=Tier(r.tier),
                check=r.check_name,
                l1_action=r.l1_action,
                description=r.description,
            )
            for r in rows
        ]
    )


@routes.get("/api/v1/presets")
async def list_presets(request: web.Request) -> web.Response:
    await require_partner_or_admin(request)
    async with read_only(central(request).engine) as connection:
        rows = (await connection.execute(sa.select(presets).order_by(presets.c.position))).all()
    return json_response(
        [
            PresetOut(
                id=p.id,
                name=p.name,
                description=p.description,
                tier=Tier(p.tier),
                frameworks=list(p.frameworks),
            )
            for p in rows
        ]
    )
