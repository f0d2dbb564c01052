"""The partner API: defaults, sites, effective configuration, framework
usage, enrollment tokens, appliances, escalations, alerts, evidence. Every
query is scoped to the caller's partner; another partner's site is "not
found". Plus the admin API that creates partners."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from msp_central.api_models import (
    AlertOut,
    ApplianceOut,
    ApplyPreset,
    EscalationOut,
    EvidenceOut,
    FrameworkUsage,
    FrameworkUse,
    Industry,
    PartnerCreate,
    PartnerCreated,
    PartnerDefaults,
    PartnerOut,
    RevokeIn,
    SettingsWarning,
    SiteCreate,
    SiteFrameworks,
    SiteOut,
    SiteOverrides,
    TokenCreate,
    TokenOut,
)
from msp_central.auth import KeyHolder, require_admin, require_partner
from msp_central.catalogue import Tier
from msp_central.central_log import actor_of, record, record_revocation
from msp_central.context import central, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import (
    appliances,
    audit_checkpoints,
    audit_logs,
    certificates,
    escalations,
    evidence,
    partners,
    security_alerts,
    sites,
)
from msp_central.liveness import appliance_status
from msp_central.params import checked_query
from msp_central.problems import Problem
from msp_central.queries import (
    check_frameworks,
    create_partner,
    create_site,
    effective_config,
    get_partner,
    get_preset,
    get_site,
    issue_enrollment_token,
    known_frameworks,
    overrides_of,
    partner_out,
    require_active,
    revoke_certificate,
    settings_warnings,
    site_out,
)
from msp_protocol.encoding import format_time

routes = web.RouteTableDef()


def _partner_id(holder: KeyHolder) -> str:
    assert holder.partner_id is not None
    return holder.partner_id


# --- admin ------------------------------------------------------------------------------


@routes.post("/api/v1/partners")
async def create_partner_handler(request: web.Request) -> web.Response:
    holder = await require_admin(request)
    body = parse_body(await read_body(request), PartnerCreate, request)
    service = central(request)
    async with write(service.engine) as connection:
        row, key = await create_partner(connection, body.name, service.clock())
        await record(
            connection,
            service.root,
            kind="partner.created",
            actor=actor_of(holder),
            data={"partner_id": row.id, "name": row.name},
            now=service.clock(),
            partner_id=row.id,
        )
    return json_response(PartnerCreated(partner=partner_out(row), api_key=key), status=201)


@routes.get("/api/v1/partners")
async def list_partners(request: web.Request) -> web.Response:
    await require_admin(request)
    async with read_only(central(request).engine) as connection:
        rows = (await connection.execute(sa.select(partners).order_by(partners.c.created_at))).all()
    return json_response([partner_out(row) for row in rows])


# --- the partner and its defaults ---------------------------------------------------------


@routes.get("/api/v1/partner")
async def get_partner_handler(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        return json_response(partner_out(await get_partner(connection, _partner_id(holder))))


async def set_defaults(
    request: web.Request,
    holder: KeyHolder,
    change: Callable[[PartnerDefaults], PartnerDefaults],
) -> tuple[PartnerOut, list[SettingsWarning]]:
    """Replace the partner's defaults by ``change(current)``, read and
    written in one transaction (a concurrent change is never lost); the
    result and what looks unintended in it."""
    service = central(request)
    async with write(service.engine) as connection:
        current = partner_out(await get_partner(connection, _partner_id(holder), lock=True))
        defaults = change(current.defaults)
        await check_frameworks(connection, defaults.frameworks)
        await connection.execute(
            sa.update(partners)
            .where(partners.c.id == holder.partner_id)
            .values(
                industry=defaults.industry,
                tier=defaults.tier.value,
                frameworks=list(defaults.frameworks),
            )
        )
        await record(
            connection,
            service.root,
            kind="partner.defaults",
            actor=actor_of(holder),
            data=defaults.model_dump(mode="json"),
            now=service.clock(),
            partner_id=holder.partner_id,
        )
        warnings = await settings_warnings(connection, defaults.industry, list(defaults.frameworks))
        return partner_out(await get_partner(connection, _partner_id(holder))), warnings


@routes.put("/api/v1/partner/defaults")
async def put_defaults(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    defaults = parse_body(await read_body(request), PartnerDefaults, request)
    partner, _ = await set_defaults(request, holder, lambda _: defaults)
    return json_response(partner)


async def _requested_preset(request: web.Request) -> tuple[Industry, Tier, list[str]]:
    """The preset named in the body: its industry, tier and frameworks."""
    body = parse_body(await read_body(request), ApplyPreset, request)
    async with read_only(central(request).engine) as connection:
        preset = await get_preset(connection, body.preset)
    return body.preset, Tier(preset.tier), list(preset.frameworks)


@routes.post("/api/v1/partner/apply-preset")
async def apply_partner_preset(request: web.Request) -> web.Response:
    """Set the partner's defaults to an industry preset in one call."""
    holder = await require_partner(request)
    industry, tier, chosen = await _requested_preset(request)
    defaults = PartnerDefaults(industry=industry, tier=tier, frameworks=chosen)
    partner, _ = await set_defaults(request, holder, lambda _: defaults)
    return json_response(partner)


# --- sites -----------------------------------------------------------------------------


@routes.get("/api/v1/sites")
async def list_sites(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        partner = await get_partner(connection, _partner_id(holder))
        rows = (
            await connection.execute(
                sa.select(sites)
                .where(sites.c.partner_id == partner.id)
                .order_by(sites.c.created_at)
            )
        ).all()
        return json_response([await site_out(connection, row, partner) for row in rows])


@routes.post("/api/v1/sites")
async def create_site_handler(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    body = parse_body(await read_body(request), SiteCreate, request)
    service = central(request)
    async with write(service.engine) as connection:
        row = await create_site(
            connection, _partner_id(holder), body.name, body.overrides, service.clock()
        )
        await record(
            connection,
            service.root,
            kind="site.created",
            actor=actor_of(holder),
            data={"site_id": row.id, "name": row.name, **body.overrides.model_dump(mode="json")},
            now=service.clock(),
            partner_id=holder.partner_id,
            site_id=row.id,
        )
        return json_response(await site_out(connection, row), status=201)


@routes.get("/api/v1/sites/{site_id}")
async def get_site_handler(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        row = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        return json_response(await site_out(connection, row))


async def set_overrides(
    request: web.Request,
    holder: KeyHolder,
    change: Callable[[SiteOverrides], SiteOverrides],
) -> tuple[SiteOut, list[SettingsWarning]]:
    """Replace a site's overrides by ``change(current)`` in one transaction;
    the site and what looks unintended in its effective settings. A
    decommissioned site is a conflict."""
    site_id = request.match_info["site_id"]
    service = central(request)
    async with write(service.engine) as connection:
        site = await get_site(connection, site_id, holder.partner_id, lock=True)
        require_active(site, "changing its settings")
        overrides = change(overrides_of(site))
        await check_frameworks(connection, overrides.frameworks)
        await connection.execute(
            sa.update(sites)
            .where(sites.c.id == site_id)
            .values(
                industry=overrides.industry,
                tier=overrides.tier.value if overrides.tier else None,
                frameworks=overrides.frameworks,
            )
        )
        await record(
            connection,
            service.root,
            kind="site.overrides",
            actor=actor_of(holder),
            data={"site_id": site_id, **overrides.model_dump(mode="json")},
            now=service.clock(),
            partner_id=holder.partner_id,
            site_id=site_id,
        )
        out = await site_out(connection, await get_site(connection, site_id))
        warnings = await settings_warnings(
            connection, out.effective.industry, list(out.effective.frameworks)
        )
        return out, warnings


@routes.put("/api/v1/sites/{site_id}/overrides")
async def put_overrides(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    overrides = parse_body(await read_body(request), SiteOverrides, request)
    site, _ = await set_overrides(request, holder, lambda _: overrides)
    return json_response(site)


@routes.post("/api/v1/sites/{site_id}/apply-preset")
async def apply_site_preset(request: web.Request) -> web.Response:
    """Override one site with an industry preset (industry, tier, frameworks)."""
    holder = await require_partner(request)
    industry, tier, chosen = await _requested_preset(request)
    overrides = SiteOverrides(industry=industry, tier=tier, frameworks=chosen)
    site, _ = await set_overrides(request, holder, lambda _: overrides)
    return json_response(site)


@routes.get("/api/v1/sites/{site_id}/effective-config")
async def get_effective(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        partner = await get_partner(connection, site.partner_id)
        return json_response(await effective_config(connection, site, partner))


@routes.get("/api/v1/framework-usage")
async def framework_usage(request: web.Request) -> web.Response:
    """Which frameworks each of the partner's sites runs, and how many sites
    use each framework."""
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        partner = await get_partner(connection, _partner_id(holder))
        names = await known_frameworks(connection)
        rows = (
            await connection.execute(
                sa.select(sites)
                .where(sites.c.partner_id == partner.id)
                .order_by(sites.c.created_at)
            )
        ).all()
    users: dict[str, list[str]] = defaultdict(list)
    per_site = []
    for site in rows:
        chosen = list(site.frameworks if site.frameworks is not None else partner.frameworks)
        per_site.append(SiteFrameworks(site_id=site.id, name=site.name, frameworks=chosen))
        for framework in chosen:
            users[framework].append(site.id)
    return json_response(
        FrameworkUsage(
            site_count=len(rows),
            frameworks=[
                FrameworkUse(framework=fid, name=name, site_count=len(users[fid]), sites=users[fid])
                for fid, name in names.items()
            ],
            sites=per_site,
        )
    )


@routes.post("/api/v1/sites/{site_id}/enrollment-tokens")
async def create_token(request: web.Request) -> web.Response:
    """A single-use, expiring token an appliance of this site enrolls with.
    The token is shown once; the server keeps only its hash."""
    holder = await require_partner(request)
    body = parse_body(await read_body(request), TokenCreate, request)
    service = central(request)
    site_id = request.match_info["site_id"]
    lifetime = service.settings.enrollment_token_lifetime
    if body.hours is not None:
        lifetime = timedelta(hours=body.hours)
    async with write(service.engine) as connection:
        site = await get_site(connection, site_id, holder.partner_id, lock=True)
        require_active(site, "enrollment")
        token, row = await issue_enrollment_token(
            connection, site_id, lifetime, service.clock(), created_by=actor_of(holder)
        )
        await record(
            connection,
            service.root,
            kind="token.created",
            actor=actor_of(holder),
            data={
                "site_id": site_id,
                "token_id": row.id,
                "expires_at": format_time(row.expires_at),
            },
            now=service.clock(),
            partner_id=holder.partner_id,
            site_id=site_id,
        )
    return json_response(
        TokenOut(id=row.id, token=token, site_id=site_id, expires_at=row.expires_at), status=201
    )


# --- appliances ------------------------------------------------------------------------


@routes.get("/api/v1/sites/{site_id}/appliances")
async def list_appliances(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    service = central(request)
    now = service.clock()
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        rows = (
            await connection.execute(
                sa.select(
                    appliances,
                    audit_logs.c.size,
                    audit_logs.c.root,
                    audit_logs.c.updated_at,
                    certificates.c.not_after,
                )
                .outerjoin(audit_logs, audit_logs.c.appliance_id == appliances.c.id)
                .outerjoin(certificates, certificates.c.serial == appliances.c.current_serial)
                .where(appliances.c.site_id == site.id)
                .order_by(appliances.c.created_at)
            )
        ).all()
        flagged: dict[str, int] = dict(
            (
                await connection.execute(
                    sa.select(audit_checkpoints.c.appliance_id, sa.func.count())
                    .where(audit_checkpoints.c.signed_after_expiry.is_(True))
                    .group_by(audit_checkpoints.c.appliance_id)
                )
            ).all()
        )
    result = []
    for row in rows:
        last_sync = row.updated_at if row.size else None
        seen = max((t for t in (row.last_seen_at, last_sync) if t is not None), default=None)
        status = appliance_status(
            now,
            last_contact=seen,
            heartbeat=row.heartbeat,
            revoked_at=row.revoked_at,
            decommissioned_at=row.decommissioned_at,
            settings=service.settings,
        )
        result.append(
            ApplianceOut(
                id=row.id,
                site_id=row.site_id,
                created_at=row.created_at,
                status=status,
                last_seen_at=seen,
                last_sync_at=last_sync,
                audit_size=int(row.size or 0),
                audit_root=row.root or "",
                flagged_checkpoints=int(flagged.get(row.id, 0)),
                certificate_serial=row.current_serial,
                certificate_not_after=row.not_after,
                heartbeat=row.heartbeat,
            )
        )
    return json_response(result)


@routes.post("/api/v1/certificates/{serial}/revoke")
async def revoke(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    body = parse_body(await read_body(request), RevokeIn, request)
    service = central(request)
    async with write(service.engine) as connection:
        result = await revoke_certificate(
            connection,
            service.root,
            request.match_info["serial"],
            body.reason,
            service.clock(),
            partner_id=holder.partner_id,
        )
        await record_revocation(
            connection, service.root, result, body.reason, actor_of(holder), service.clock()
        )
    return json_response(result)


# --- escalations, alerts, evidence ---------------------------------------------------------


def _partner_sites(holder: KeyHolder) -> Any:
    return sa.select(sites.c.id).where(sites.c.partner_id == holder.partner_id)


@routes.get("/api/v1/escalations")
async def list_escalations(request: web.Request) -> web.Response:
    """The partner's escalations, newest first; ``?open=true`` for the
    unacknowledged ones only."""
    holder = await require_partner(request)
    query = (
        sa.select(escalations)
        .where(escalations.c.site_id.in_(_partner_sites(holder)))
        .order_by(escalations.c.received_at.desc())
        .limit(500)
    )
    if checked_query(request).get("open"):
        query = query.where(escalations.c.acknowledged_at.is_(None))
    async with read_only(central(request).engine) as connection:
        rows = (await connection.execute(query)).all()
    return json_response([_escalation_out(row) for row in rows])


def _escalation_out(row: sa.Row[Any]) -> EscalationOut:
    document = row.document
    return EscalationOut(
        escalation_id=row.escalation_id,
        appliance_id=row.appliance_id,
        site_id=row.site_id,
        severity=row.severity,
        title=row.title,
        detail=document["detail"],
        created_at=row.created_at,
        received_at=row.received_at,
        log_index=document.get("log_index"),
        acknowledged_at=row.acknowledged_at,
    )


@routes.post("/api/v1/escalations/{appliance_id}/{escalation_id}/acknowledge")
async def acknowledge(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    await read_body(request)
    service = central(request)
    escalation_id = request.match_info["escalation_id"]
    where = (
        # Escalation ids are the appliance's own: one appliance's id says
        # nothing about another's.
        escalations.c.appliance_id == request.match_info["appliance_id"],
        escalations.c.escalation_id == escalation_id,
        escalations.c.site_id.in_(_partner_sites(holder)),
    )
    async with write(service.engine) as connection:
        changed = await connection.execute(
            sa.update(escalations)
            .where(*where, escalations.c.acknowledged_at.is_(None))
            .values(acknowledged_at=service.clock(), acknowledged_by=holder.key_prefix)
        )
        row = (await connection.execute(sa.select(escalations).where(*where))).first()
        if row is None:
            raise Problem("not-found", f"no escalation {escalation_id[:64]}")
        if changed.rowcount:
            await record(
                connection,
                service.root,
                kind="escalation.acknowledged",
                actor=actor_of(holder),
                data={"appliance_id": row.appliance_id, "escalation_id": row.escalation_id},
                now=service.clock(),
                partner_id=holder.partner_id,
                site_id=row.site_id,
            )
    return json_response(_escalation_out(row))


@routes.get("/api/v1/security-alerts")
async def list_alerts(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        rows = (
            await connection.execute(
                sa.select(security_alerts)
                .where(security_alerts.c.site_id.in_(_partner_sites(holder)))
                .order_by(security_alerts.c.id.desc())
                .limit(500)
            )
        ).all()
    return json_response(
        [
            AlertOut(
                id=row.id,
                appliance_id=row.appliance_id,
                site_id=row.site_id,
                code=row.code,
                detail=row.detail,
                created_at=row.created_at,
            )
            for row in rows
        ]
    )


@routes.get("/api/v1/sites/{site_id}/evidence")
async def list_evidence(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        rows = (
            await connection.execute(
                sa.select(evidence)
                .where(evidence.c.site_id == site.id)
                .order_by(evidence.c.received_at.desc())
                .limit(500)
            )
        ).all()
    return json_response(
        [
            EvidenceOut(
                bundle_id=row.bundle_id,
                appliance_id=row.appliance_id,
                site_id=row.site_id,
                check_id=row.check_id,
                result=row.result,
                controls=row.controls,
                collected_at=row.collected_at,
                log_index=row.log_index,
                signed_after_expiry=row.signed_after_expiry,
                in_log=row.in_log,
                received_at=row.received_at,
            )
            for row in rows
        ]
    )
