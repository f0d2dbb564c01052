"""The partner API: defaults, sites, effective configuration, framework
usage, enrollment tokens, appliances, escalations, alerts, evidence. Every
query is scoped to the caller's partner; another partner's site is "not
found". Plus the admin API that creates partners."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import (
    AcknowledgeIn,
    AlertOut,
    ApplianceOut,
    ApplianceSummary,
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
    Setting,
    SettingsWarning,
    SiteCreate,
    SiteFrameworks,
    SiteOut,
    SiteOverrides,
    Source,
    TokenCreate,
    TokenOut,
)
from msp_central.auth import KeyHolder, require_admin, require_partner
from msp_central.catalogue import Tier
from msp_central.central_log import actor_of, record, record_revocation
from msp_central.config import Settings
from msp_central.context import central, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import (
    appliances,
    audit_checkpoints,
    audit_logs,
    certificates,
    escalations,
    evidence,
    evidence_heads,
    partners,
    security_alerts,
    sites,
)
from msp_central.liveness import last_sync, row_status
from msp_central.pagination import Keyset, fetch_page, page_request, page_response
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
    keyset = Keyset([(partners.c.created_at, "asc"), (partners.c.id, "asc")])
    page = page_request(request, keyset)
    async with read_only(central(request).engine) as connection:
        rows, cursor = await fetch_page(connection, sa.select(partners), keyset, page)
    return page_response(request, [partner_out(row) for row in rows], cursor)


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


def _json_array_has(dialect: str, column: Any, value: str) -> sa.ColumnElement[bool]:
    """Whether the JSON array in ``column`` holds the string ``value``."""
    if dialect == "postgresql":
        return sa.cast(column, JSONB).contains([value])
    members = sa.func.json_each(column).table_valued("value")
    return sa.exists(sa.select(1).select_from(members).where(members.c.value == value))


def _json_type(dialect: str, column: Any) -> sa.ColumnElement[str]:
    """The JSON type of ``column`` ('array', 'null', ...); 'null' for SQL NULL too."""
    if dialect == "postgresql":
        kind = sa.func.jsonb_typeof(sa.cast(column, JSONB))
    else:
        kind = sa.func.json_type(column)
    return sa.func.coalesce(kind, "null")


def _runs_framework(dialect: str, partner: sa.Row[Any], framework: str) -> sa.ColumnElement[bool]:
    """Sites whose effective frameworks include ``framework``: their own list
    when they have one, else the partner's defaults (one partner's sites)."""
    own = _json_type(dialect, sites.c.frameworks) == "array"
    in_own = sa.and_(own, _json_array_has(dialect, sites.c.frameworks, framework))
    if framework in (partner.frameworks or []):
        return sa.or_(in_own, sa.not_(own))
    return in_own


def _contains(column: sa.ColumnElement[str], text: str) -> sa.ColumnElement[bool]:
    """Case-insensitive substring, LIKE's wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.ilike(f"%{escaped}%", escape="\\")


def _is_set(column: sa.ColumnElement[Any], wanted: bool) -> sa.ColumnElement[bool]:
    """``column`` is not NULL when ``wanted``, NULL otherwise."""
    return column.is_not(None) if wanted else column.is_(None)


@routes.get("/api/v1/sites")
async def list_sites(request: web.Request) -> web.Response:
    """The partner's sites, oldest first; ``framework``, ``decommissioned``
    and ``name`` filter them."""
    holder = await require_partner(request)
    keyset = Keyset([(sites.c.created_at, "asc"), (sites.c.id, "asc")])
    page = page_request(request, keyset)
    filters = checked_query(request)
    async with read_only(central(request).engine) as connection:
        partner = await get_partner(connection, _partner_id(holder))
        query = sa.select(sites).where(
            sites.c.partner_id == partner.id,
            _is_set(sites.c.decommissioned_at, filters["decommissioned"]),
        )
        if "framework" in filters:
            dialect = connection.dialect.name
            query = query.where(_runs_framework(dialect, partner, filters["framework"]))
        if "name" in filters:
            query = query.where(_contains(sites.c.name, filters["name"]))
        rows, cursor = await fetch_page(connection, query, keyset, page)
        tier_runbooks: dict[Tier, list[str]] = {}  # read once per tier, not once per site
        items = [await site_out(connection, row, partner, tier_runbooks) for row in rows]
    return page_response(request, items, cursor)


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


def _sources(site: sa.Row[Any]) -> dict[Setting, Source]:
    """Which of a site's settings are its own and which the partner's
    defaults (the rule of :func:`msp_central.queries.effective_config`)."""
    return {
        "industry": "site" if site.industry else "partner",
        "tier": "site" if site.tier else "partner",
        "frameworks": "site" if site.frameworks is not None else "partner",
    }


@routes.get("/api/v1/framework-usage")
async def framework_usage(request: web.Request) -> web.Response:
    """Which frameworks each of the partner's sites in service runs, and how
    many sites use each framework (a decommissioned site runs nothing)."""
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        partner = await get_partner(connection, _partner_id(holder))
        names = await known_frameworks(connection)
        rows = (
            await connection.execute(
                sa.select(sites)
                .where(sites.c.partner_id == partner.id, sites.c.decommissioned_at.is_(None))
                .order_by(sites.c.created_at)
            )
        ).all()
    users: dict[str, list[str]] = defaultdict(list)
    per_site = []
    for site in rows:
        chosen = list(site.frameworks if site.frameworks is not None else partner.frameworks)
        per_site.append(
            SiteFrameworks(
                site_id=site.id,
                name=site.name,
                frameworks=chosen,
                sources=_sources(site),
            )
        )
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


_APPLIANCE_ORDER = Keyset([(appliances.c.created_at, "asc"), (appliances.c.id, "asc")])


async def _appliance_page(request: web.Request, scope: sa.ColumnElement[bool]) -> web.Response:
    """A page of the appliances ``scope`` selects, oldest first, filtered by
    ``decommissioned``. Their status is the liveness rule's, computed per row
    from each appliance's own heartbeat interval: no status filter, since a
    filter applied after paging would thin pages and one in SQL would be a
    second copy of that rule."""
    page = page_request(request, _APPLIANCE_ORDER)
    filters = checked_query(request)
    service = central(request)
    now = service.clock()
    query = (
        sa.select(
            appliances,
            audit_logs.c.size,
            audit_logs.c.root,
            audit_logs.c.updated_at,
            certificates.c.not_after,
        )
        .outerjoin(audit_logs, audit_logs.c.appliance_id == appliances.c.id)
        .outerjoin(certificates, certificates.c.serial == appliances.c.current_serial)
        .where(scope, _is_set(appliances.c.decommissioned_at, filters["decommissioned"]))
    )
    async with read_only(service.engine) as connection:
        rows, cursor = await fetch_page(connection, query, _APPLIANCE_ORDER, page)
        flagged: dict[str, int] = dict(
            (
                await connection.execute(
                    sa.select(audit_checkpoints.c.appliance_id, sa.func.count())
                    .where(
                        audit_checkpoints.c.appliance_id.in_([row.id for row in rows]),
                        audit_checkpoints.c.signed_after_expiry.is_(True),
                    )
                    .group_by(audit_checkpoints.c.appliance_id)
                )
            ).all()
        )
        failing = await _failing_checks(connection, [row.id for row in rows])
    items = []
    for row in rows:
        status, seen = row_status(row, now, service.settings)
        reported = (row.heartbeat or {}).get("log_size")
        items.append(
            ApplianceOut(
                id=row.id,
                site_id=row.site_id,
                created_at=row.created_at,
                status=status,
                last_seen_at=seen,
                last_sync_at=last_sync(row),
                witnessed_size=int(row.size or 0),
                witnessed_root=row.root or "",
                log_size=reported if isinstance(reported, int) else None,
                flagged_checkpoints=int(flagged.get(row.id, 0)),
                certificate_serial=row.current_serial,
                certificate_not_after=row.not_after,
                heartbeat=row.heartbeat,
                failing_checks=failing.get(row.id, []),
            )
        )
    return page_response(request, items, cursor)


async def _failing_checks(
    connection: AsyncConnection, appliance_ids: list[str]
) -> dict[str, list[str]]:
    """Per appliance of a page, the checks whose head (the newest bundle by
    log position that its log does not contradict, as posture reads it)
    failed or erred."""
    if not appliance_ids:
        return {}
    rows = await connection.execute(
        sa.select(evidence_heads.c.appliance_id, evidence_heads.c.check_id)
        .where(
            evidence_heads.c.appliance_id.in_(appliance_ids),
            evidence_heads.c.result.in_(("fail", "error")),
        )
        .order_by(evidence_heads.c.appliance_id, evidence_heads.c.check_id)
    )
    found: dict[str, list[str]] = {}
    for appliance_id, check_id in rows.all():
        found.setdefault(appliance_id, []).append(check_id)
    return found


@routes.get("/api/v1/sites/{site_id}/appliances")
async def list_appliances(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
    return await _appliance_page(request, appliances.c.site_id == site.id)


@routes.get("/api/v1/appliances")
async def list_partner_appliances(request: web.Request) -> web.Response:
    """The appliances of every site of the partner; ``site_id`` narrows them
    to one (another partner's site gives an empty page)."""
    holder = await require_partner(request)
    scope: sa.ColumnElement[bool] = appliances.c.site_id.in_(_partner_sites(holder))
    site_id = checked_query(request).get("site_id")
    if site_id is not None:
        scope = sa.and_(scope, appliances.c.site_id == site_id)
    return await _appliance_page(request, scope)


# An appliance whose certificate ends within this many days (or has ended)
# counts as "certificate expiring"; the summary answers it, and the console
# flags the same certificates in its list.
CERTIFICATE_EXPIRING_DAYS = 14


@routes.get("/api/v1/appliances/summary")
async def appliance_summary(request: web.Request) -> web.Response:
    """Counts over every appliance ``GET /api/v1/appliances`` would list with
    the same ``site_id`` and ``decommissioned``, not over one page of it
    (another partner's site counts nothing, as it lists nothing)."""
    holder = await require_partner(request)
    filters = checked_query(request)
    scope: sa.ColumnElement[bool] = appliances.c.site_id.in_(_partner_sites(holder))
    if "site_id" in filters:
        scope = sa.and_(scope, appliances.c.site_id == filters["site_id"])
    service = central(request)
    async with read_only(service.engine) as connection:
        summary = await _summarise(
            connection,
            sa.and_(scope, _is_set(appliances.c.decommissioned_at, filters["decommissioned"])),
            service.clock(),
            service.settings,
        )
    return json_response(summary)


async def _summarise(
    connection: AsyncConnection, scope: sa.ColumnElement[bool], now: datetime, settings: Settings
) -> ApplianceSummary:
    """One query for every appliance ``scope`` selects, reading only what the
    counts need; each status is :func:`row_status`'s, computed in Python
    from the same columns as the list computes it."""
    failing = (
        sa.exists()
        .where(
            evidence_heads.c.appliance_id == appliances.c.id,
            evidence_heads.c.result.in_(("fail", "error")),
        )
        .label("failing")
    )
    rows = await connection.execute(
        sa.select(
            appliances.c.last_seen_at,
            appliances.c.revoked_at,
            appliances.c.decommissioned_at,
            appliances.c.heartbeat,
            audit_logs.c.size,
            audit_logs.c.updated_at,
            certificates.c.not_after,
            failing,
        )
        .outerjoin(audit_logs, audit_logs.c.appliance_id == appliances.c.id)
        .outerjoin(certificates, certificates.c.serial == appliances.c.current_serial)
        .where(scope)
    )
    expiring_before = now + timedelta(days=CERTIFICATE_EXPIRING_DAYS)
    counts: Counter[str] = Counter()
    total = expiring = with_failing = 0
    for row in rows:
        status, _ = row_status(row, now, settings)
        counts[status] += 1
        total += 1
        # A revoked certificate's end no longer matters; the list says "Revoked".
        in_service = status not in ("revoked", "decommissioned")
        if in_service and row.not_after is not None and row.not_after < expiring_before:
            expiring += 1
        if row.failing:
            with_failing += 1
    return ApplianceSummary(
        total=total,
        online=counts["online"],
        offline=counts["offline"],
        never_seen=counts["never-seen"],
        revoked=counts["revoked"],
        decommissioned=counts["decommissioned"],
        certificate_expiring=expiring,
        with_failing_checks=with_failing,
        expiring_within_days=CERTIFICATE_EXPIRING_DAYS,
        counted_at=now,
    )


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


def _period(column: Any, filters: dict[str, Any]) -> list[sa.ColumnElement[bool]]:
    """``from`` (inclusive) and ``to`` (exclusive) on ``column``."""
    bounds = []
    if "from" in filters:
        bounds.append(column >= filters["from"])
    if "to" in filters:
        bounds.append(column < filters["to"])
    return bounds


def _equal(filters: dict[str, Any], **columns: Any) -> list[sa.ColumnElement[bool]]:
    """``column == value`` for each filter given (by its parameter name)."""
    return [column == filters[name] for name, column in columns.items() if name in filters]


_ESCALATION_ORDER = Keyset(
    [
        (escalations.c.received_at, "desc"),
        (escalations.c.appliance_id, "asc"),
        (escalations.c.escalation_id, "asc"),
    ]
)


@routes.get("/api/v1/escalations")
async def list_escalations(request: web.Request) -> web.Response:
    """The partner's escalations, newest first; ``?open=true`` for the
    unacknowledged ones only, and filters by site, appliance, severity and
    time received."""
    holder = await require_partner(request)
    page = page_request(request, _ESCALATION_ORDER)
    filters = checked_query(request)
    query = sa.select(escalations).where(
        escalations.c.site_id.in_(_partner_sites(holder)),
        *_equal(
            filters,
            site_id=escalations.c.site_id,
            appliance_id=escalations.c.appliance_id,
            severity=escalations.c.severity,
        ),
        *_period(escalations.c.received_at, filters),
    )
    if "open" in filters:
        query = query.where(_is_set(escalations.c.acknowledged_at, not filters["open"]))
    async with read_only(central(request).engine) as connection:
        rows, cursor = await fetch_page(connection, query, _ESCALATION_ORDER, page)
    return page_response(request, [_escalation_out(row) for row in rows], cursor)


def _escalation_out(row: sa.Row[Any]) -> EscalationOut:
    document = row.document
    return EscalationOut(
        id=row.escalation_id,
        appliance_id=row.appliance_id,
        site_id=row.site_id,
        severity=row.severity,
        title=row.title,
        detail=document["detail"],
        created_at=row.created_at,
        received_at=row.received_at,
        log_index=document.get("log_index"),
        acknowledged_at=row.acknowledged_at,
        acknowledged_by=row.acknowledged_by,
        acknowledged_note=row.acknowledged_note,
    )


@routes.post("/api/v1/escalations/{appliance_id}/{escalation_id}/acknowledge")
async def acknowledge(request: web.Request) -> web.Response:
    """Acknowledge an escalation, with an optional ``{"note": ...}`` (an empty
    body is no note). The first acknowledgement stands: a later one changes
    nothing and answers the escalation as it is."""
    holder = await require_partner(request)
    raw = await read_body(request)
    note = parse_body(raw, AcknowledgeIn, request).note if raw.strip() else ""
    service = central(request)
    escalation_id = request.match_info["escalation_id"]
    where = (
        # Escalation ids are the appliance's own: one appliance's id says
        # nothing about another's.
        escalations.c.appliance_id == request.match_info["appliance_id"],
        escalations.c.escalation_id == escalation_id,
        escalations.c.site_id.in_(_partner_sites(holder)),
    )
    actor = actor_of(holder)
    async with write(service.engine) as connection:
        changed = await connection.execute(
            sa.update(escalations)
            .where(*where, escalations.c.acknowledged_at.is_(None))
            .values(
                acknowledged_at=service.clock(),
                acknowledged_by=actor,
                acknowledged_note=note or None,
            )
        )
        row = (await connection.execute(sa.select(escalations).where(*where))).first()
        if row is None:
            raise Problem("not-found", f"no escalation {escalation_id[:64]}")
        if changed.rowcount:
            data = {"appliance_id": row.appliance_id, "escalation_id": row.escalation_id}
            if note:
                data["note"] = note
            await record(
                connection,
                service.root,
                kind="escalation.acknowledged",
                actor=actor,
                data=data,
                now=service.clock(),
                partner_id=holder.partner_id,
                site_id=row.site_id,
            )
    return json_response(_escalation_out(row))


_ALERT_ORDER = Keyset([(security_alerts.c.id, "desc")])


@routes.get("/api/v1/security-alerts")
async def list_alerts(request: web.Request) -> web.Response:
    """Security alerts of the partner's sites, newest first, filtered by
    site, appliance, code and time raised."""
    holder = await require_partner(request)
    page = page_request(request, _ALERT_ORDER)
    filters = checked_query(request)
    query = sa.select(security_alerts).where(
        sa.or_(
            security_alerts.c.site_id.in_(_partner_sites(holder)),
            # Alerts about the partner's own accounts (failed sign-ins).
            security_alerts.c.partner_id == holder.partner_id,
        ),
        *_equal(
            filters,
            site_id=security_alerts.c.site_id,
            appliance_id=security_alerts.c.appliance_id,
            code=security_alerts.c.code,
        ),
        *_period(security_alerts.c.created_at, filters),
    )
    async with read_only(central(request).engine) as connection:
        rows, cursor = await fetch_page(connection, query, _ALERT_ORDER, page)
    items = [
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
    return page_response(request, items, cursor)


def _has_key(dialect: str, column: sa.ColumnElement[Any], key: str) -> sa.ColumnElement[bool]:
    """Whether the JSON object in ``column`` has the member ``key``."""
    if dialect == "postgresql":
        has: sa.ColumnElement[bool] = sa.cast(column, JSONB).has_key(key)
        return has
    members = sa.func.json_each(column).table_valued("key")
    return sa.exists(sa.select(1).select_from(members).where(members.c.key == key))


_EVIDENCE_ORDER = Keyset(
    [
        (evidence.c.received_at, "desc"),
        (evidence.c.appliance_id, "asc"),
        (evidence.c.bundle_id, "asc"),
    ]
)


@routes.get("/api/v1/sites/{site_id}/evidence")
async def list_evidence(request: web.Request) -> web.Response:
    """A site's evidence bundles, the newest received first, filtered by
    appliance, check, result, framework, time collected and ``in_log``."""
    holder = await require_partner(request)
    page = page_request(request, _EVIDENCE_ORDER)
    filters = checked_query(request)
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        query = sa.select(evidence).where(
            evidence.c.site_id == site.id,
            *_equal(
                filters,
                appliance_id=evidence.c.appliance_id,
                check_id=evidence.c.check_id,
                result=evidence.c.result,
                in_log=evidence.c.in_log,
            ),
            *_period(evidence.c.collected_at, filters),
        )
        if "framework" in filters:
            dialect = connection.dialect.name
            query = query.where(_has_key(dialect, evidence.c.controls, filters["framework"]))
        rows, cursor = await fetch_page(connection, query, _EVIDENCE_ORDER, page)
    items = [
        EvidenceOut(
            id=row.bundle_id,
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
    return page_response(request, items, cursor)
