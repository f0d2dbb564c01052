"""Generations of an appliance's witnessed audit log, for partners.

When an appliance loses its local log (a corrupt database quarantined, a
tail cut off) it begins a new one at index 0, and the server refuses it:
the new history is no extension of the one witnessed. After such a refusal
the partner may approve the new log: the current generation is closed (its
entries, checkpoints and evidence are kept, and stay exportable), the
approval is recorded in ``audit_log_generations`` and in the central log,
and the next generation starts empty, so the appliance's next sync from
index 0 is witnessed. Evidence still waiting for its entry in the closed
generation waits for good: it stays unwitnessed (see ADR 0016).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import AuditLogGenerationOut, AuditLogGenerationsOut, NewAuditLogIn
from msp_central.auth import require_partner
from msp_central.central_log import actor_of, record
from msp_central.context import central, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import appliances, audit_log_generations, audit_logs, security_alerts
from msp_central.problems import Problem
from msp_central.queries import get_site
from msp_protocol.merkle import EMPTY_ROOT

routes = web.RouteTableDef()

# The sync refusals that say the appliance's log is not the one witnessed
# (rather than a batch that is malformed or badly signed): the ones a new
# log answers. The sync handler records them as security alerts.
HISTORY_REFUSALS = ("rewrite", "truncated-history", "stale-size", "bad-consistency-proof")


async def _appliance_log(
    connection: AsyncConnection, site_id: str, appliance_id: str, *, lock: bool = False
) -> sa.Row[Any]:
    """The appliance's witness state, if the appliance is of ``site_id``."""
    query = (
        sa.select(audit_logs)
        .join(appliances, appliances.c.id == audit_logs.c.appliance_id)
        .where(appliances.c.id == appliance_id, appliances.c.site_id == site_id)
    )
    row = (
        await connection.execute(query.with_for_update(of=audit_logs) if lock else query)
    ).first()
    if row is None:
        raise Problem("not-found", f"no appliance {appliance_id[:64]}")
    return row


async def _generations(connection: AsyncConnection, log: sa.Row[Any]) -> AuditLogGenerationsOut:
    approvals = (
        await connection.execute(
            sa.select(audit_log_generations)
            .where(audit_log_generations.c.appliance_id == log.appliance_id)
            .order_by(audit_log_generations.c.generation)
        )
    ).all()
    approved = {int(row.generation): row for row in approvals}
    current = int(log.generation)
    generations = []
    for generation in range(1, current + 1):
        row = approved.get(generation)
        # A closed generation ends where the approval of the next one found it.
        closing = approved.get(generation + 1)
        generations.append(
            AuditLogGenerationOut(
                generation=generation,
                current=generation == current,
                size=int(log.size) if closing is None else int(closing.previous_size),
                root=log.root if closing is None else closing.previous_root,
                approved_at=row.approved_at if row is not None else None,
                approved_by=row.approved_by if row is not None else None,
                reason=row.reason if row is not None else None,
                central_log_index=int(row.central_log_index) if row is not None else None,
            )
        )
    return AuditLogGenerationsOut(
        appliance_id=log.appliance_id, current_generation=current, generations=generations
    )


@routes.get("/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/generations")
async def list_generations(request: web.Request) -> web.Response:
    """The generations of an appliance's witnessed log, oldest first. One a
    partner approved each: a short list, answered whole."""
    holder = await require_partner(request)
    info = request.match_info
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, info["site_id"], holder.partner_id)
        log = await _appliance_log(connection, site.id, info["appliance_id"])
        return json_response(await _generations(connection, log))


@routes.post("/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/approve-new")
async def approve_new_log(request: web.Request) -> web.Response:
    """Close the current generation of the appliance's log and start the
    next one empty; only after the server refused the appliance's log
    since the current generation began (409 ``conflict`` otherwise)."""
    holder = await require_partner(request)
    approval = parse_body(await read_body(request), NewAuditLogIn, request)
    service = central(request)
    info = request.match_info
    now = service.clock()
    async with write(service.engine) as connection:
        site = await get_site(connection, info["site_id"], holder.partner_id)
        log = await _appliance_log(connection, site.id, info["appliance_id"], lock=True)
        generation = int(log.generation)
        began = (
            await connection.execute(
                sa.select(audit_log_generations.c.approved_at).where(
                    audit_log_generations.c.appliance_id == log.appliance_id,
                    audit_log_generations.c.generation == generation,
                )
            )
        ).scalar_one_or_none()
        refused = sa.select(security_alerts.c.id).where(
            security_alerts.c.appliance_id == log.appliance_id,
            security_alerts.c.code.in_(HISTORY_REFUSALS),
        )
        if began is not None:
            refused = refused.where(security_alerts.c.created_at > began)
        if (await connection.execute(refused.limit(1))).first() is None:
            raise Problem(
                "conflict", "nothing to approve: the server has not refused this appliance's log"
            )
        index = await record(
            connection,
            service.root,
            kind="audit.new_log_approved",
            actor=actor_of(holder),
            data={
                "appliance_id": log.appliance_id,
                "generation": generation,
                "size": int(log.size),
                "root": log.root,
                "reason": approval.reason,
            },
            now=now,
            partner_id=holder.partner_id,
            site_id=site.id,
        )
        await connection.execute(
            sa.insert(audit_log_generations).values(
                appliance_id=log.appliance_id,
                generation=generation + 1,
                approved_at=now,
                approved_by=actor_of(holder),
                reason=approval.reason,
                previous_size=int(log.size),
                previous_root=log.root,
                central_log_index=index,
            )
        )
        await connection.execute(
            sa.update(audit_logs)
            .where(audit_logs.c.appliance_id == log.appliance_id)
            .values(
                generation=generation + 1,
                size=0,
                root=EMPTY_ROOT.hex(),
                nodes=[],
                checkpoint_sha256=None,
                updated_at=now,
            )
        )
        log = await _appliance_log(connection, site.id, log.appliance_id)
        return json_response(await _generations(connection, log), status=201)
