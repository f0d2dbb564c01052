"""The partner API for what changes over a resource's life: settings by
JSON Merge Patch, renaming and decommissioning sites and appliances,
enrollment tokens listed and revoked, API keys created, rotated, revoked.

Decommissioning takes a site or an appliance out of service and keeps its
history: every certificate is revoked (the appliance's signed requests are
refused from then on), unused enrollment tokens are revoked, and the
evidence, audit logs and exports stay readable. It cannot be undone, and
repeating it changes nothing. Every change is recorded in the central log
in the transaction that makes it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from aiohttp import web
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRotate,
    ApiKeyRotated,
    ApplianceDecommission,
    ApplianceDecommissioned,
    PartnerDefaults,
    PartnerSettingsOut,
    SiteOverrides,
    SiteRename,
    SiteSettingsOut,
)
from msp_central.auth import KeyHolder, require_partner
from msp_central.central_log import actor_of, record, record_revocation
from msp_central.context import central, json_response, parse_body, parse_json_object, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import api_keys, appliances, certificates, enrollment_tokens, sites
from msp_central.pagination import Keyset, fetch_page, page_request, page_response
from msp_central.problems import Problem
from msp_central.queries import (
    api_key_out,
    check_site_name_free,
    get_partner,
    get_site,
    issue_api_key,
    require_active,
    revoke_certificate,
    site_out,
    token_out,
)
from msp_central.routes.partners import set_defaults, set_overrides
from msp_protocol.encoding import format_time
from msp_protocol.keys import SigningKey
from msp_protocol.model import first_problem

routes = web.RouteTableDef()

MERGE_PATCH = "application/merge-patch+json"
Settings = TypeVar("Settings", PartnerDefaults, SiteOverrides)


def _partner_id(holder: KeyHolder) -> str:
    assert holder.partner_id is not None
    return holder.partner_id


# --- settings by JSON Merge Patch (RFC 7396) ----------------------------------------------


async def _merge_patch(request: web.Request) -> dict[str, Any]:
    return parse_json_object(
        await read_body(request), request, media_types=(MERGE_PATCH, "application/json")
    )


def merged(current: Settings, patch: dict[str, Any]) -> Settings:
    """``current`` with ``patch`` applied as RFC 7396 says: a member absent
    is unchanged, null clears it (back to the model's default), any other
    value replaces it. The result is checked like a whole document."""
    fields = type(current).model_fields
    unknown = sorted(set(patch) - set(fields))
    if unknown:
        raise Problem("malformed-document", f"{unknown[0][:32]}: no such setting")
    value = current.model_dump(mode="json")
    for name, given in patch.items():
        if given is None:
            value.pop(name)
        else:
            value[name] = given
    try:
        return type(current).model_validate(value)
    except ValidationError as exc:
        raise Problem("malformed-document", first_problem(exc)) from None


@routes.patch("/api/v1/partner/defaults")
async def patch_defaults(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    patch = await _merge_patch(request)
    partner, warnings = await set_defaults(request, holder, lambda now: merged(now, patch))
    return json_response(PartnerSettingsOut(**partner.model_dump(), warnings=warnings))


@routes.patch("/api/v1/sites/{site_id}/overrides")
async def patch_overrides(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    patch = await _merge_patch(request)
    site, warnings = await set_overrides(request, holder, lambda now: merged(now, patch))
    return json_response(SiteSettingsOut(**site.model_dump(), warnings=warnings))


# --- sites ---------------------------------------------------------------------------------


@routes.patch("/api/v1/sites/{site_id}")
async def rename_site(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    body = parse_body(await read_body(request), SiteRename, request)
    service = central(request)
    site_id = request.match_info["site_id"]
    async with write(service.engine) as connection:
        site = await get_site(connection, site_id, holder.partner_id, lock=True)
        require_active(site, "renaming")
        if body.name != site.name:
            await get_partner(connection, site.partner_id, lock=True)
            await check_site_name_free(connection, site.partner_id, body.name, renaming=site_id)
            await connection.execute(
                sa.update(sites).where(sites.c.id == site_id).values(name=body.name)
            )
            await record(
                connection,
                service.root,
                kind="site.renamed",
                actor=actor_of(holder),
                data={"site_id": site_id, "name": body.name, "previous_name": site.name},
                now=service.clock(),
                partner_id=holder.partner_id,
                site_id=site_id,
            )
        return json_response(await site_out(connection, await get_site(connection, site_id)))


@routes.delete("/api/v1/sites/{site_id}")
async def decommission_site(request: web.Request) -> web.Response:
    """Take a site out of service: unused tokens revoked, then every
    appliance decommissioned. Its history stays."""
    holder = await require_partner(request)
    service = central(request)
    site_id = request.match_info["site_id"]
    now = service.clock()
    actor = actor_of(holder)
    async with write(service.engine) as connection:
        site = await get_site(connection, site_id, holder.partner_id, lock=True)
        if site.decommissioned_at is None:
            # Tokens first: an enrollment in flight holds its token's row, so
            # this waits for it, and the appliance it made is found below.
            tokens = await _revoke_unused_tokens(connection, site_id, now)
            await connection.execute(
                sa.update(sites).where(sites.c.id == site_id).values(decommissioned_at=now)
            )
            retired = []
            for appliance_id in (
                await connection.execute(
                    sa.select(appliances.c.id)
                    .where(
                        appliances.c.site_id == site_id, appliances.c.decommissioned_at.is_(None)
                    )
                    .order_by(appliances.c.created_at, appliances.c.id)
                )
            ).scalars():
                await _decommission_appliance(
                    connection, service.root, appliance_id, "site decommissioned", actor, now
                )
                retired.append(appliance_id)
            await record(
                connection,
                service.root,
                kind="site.decommissioned",
                actor=actor,
                data={"site_id": site_id, "appliances": retired, "revoked_tokens": tokens},
                now=now,
                partner_id=holder.partner_id,
                site_id=site_id,
            )
        return json_response(await site_out(connection, await get_site(connection, site_id)))


async def _revoke_unused_tokens(
    connection: AsyncConnection, site_id: str, now: datetime
) -> list[str]:
    unused = (
        enrollment_tokens.c.site_id == site_id,
        enrollment_tokens.c.used_at.is_(None),
        enrollment_tokens.c.revoked_at.is_(None),
    )
    revoked = await connection.execute(
        sa.update(enrollment_tokens)
        .where(*unused)
        .values(revoked_at=now)
        .returning(enrollment_tokens.c.id)
    )
    return sorted(revoked.scalars())


# --- appliances ----------------------------------------------------------------------------


async def _decommission_appliance(
    connection: AsyncConnection,
    root: SigningKey,
    appliance_id: str,
    reason: str,
    actor: str,
    now: datetime,
) -> None:
    """Revoke every certificate of the appliance (each key with all its
    serials), mark it decommissioned, and record it all."""
    while True:
        serial = (
            await connection.execute(
                sa.select(certificates.c.serial)
                .where(
                    certificates.c.appliance_id == appliance_id,
                    certificates.c.revoked_at.is_(None),
                )
                .order_by(certificates.c.issued_at, certificates.c.serial)
                .limit(1)
            )
        ).scalar()
        if serial is None:
            break
        revoked = await revoke_certificate(connection, root, serial, reason, now)
        await record_revocation(connection, root, revoked, reason, actor, now)
    await connection.execute(
        sa.update(appliances)
        .where(appliances.c.id == appliance_id)
        .values(decommissioned_at=now, revoked_at=sa.func.coalesce(appliances.c.revoked_at, now))
    )
    row = (
        await connection.execute(
            sa.select(appliances.c.site_id, sites.c.partner_id)
            .join(sites, sites.c.id == appliances.c.site_id)
            .where(appliances.c.id == appliance_id)
        )
    ).one()
    await record(
        connection,
        root,
        kind="appliance.decommissioned",
        actor=actor,
        data={"appliance_id": appliance_id, "reason": reason},
        now=now,
        partner_id=row.partner_id,
        site_id=row.site_id,
    )


@routes.post("/api/v1/sites/{site_id}/appliances/{appliance_id}/decommission")
async def decommission_appliance(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    body = parse_body(await read_body(request), ApplianceDecommission, request)
    service = central(request)
    site_id, appliance_id = request.match_info["site_id"], request.match_info["appliance_id"]
    async with write(service.engine) as connection:
        await get_site(connection, site_id, holder.partner_id, lock=True)
        where = (appliances.c.id == appliance_id, appliances.c.site_id == site_id)
        row = (await connection.execute(sa.select(appliances).where(*where))).first()
        if row is None:
            raise Problem("not-found", f"no appliance {appliance_id[:64]} in site {site_id[:64]}")
        if row.decommissioned_at is None:
            await _decommission_appliance(
                connection,
                service.root,
                appliance_id,
                body.reason,
                actor_of(holder),
                service.clock(),
            )
        row = (await connection.execute(sa.select(appliances).where(*where))).one()
        serials = (
            await connection.execute(
                sa.select(certificates.c.serial)
                .where(certificates.c.appliance_id == appliance_id)
                .order_by(certificates.c.issued_at, certificates.c.serial)
            )
        ).scalars()
        return json_response(
            ApplianceDecommissioned(
                id=appliance_id,
                site_id=site_id,
                decommissioned_at=row.decommissioned_at,
                revoked_serials=list(serials),
            )
        )


# --- enrollment tokens ---------------------------------------------------------------------

TOKENS = Keyset([(enrollment_tokens.c.created_at, "desc"), (enrollment_tokens.c.id, "desc")])


@routes.get("/api/v1/sites/{site_id}/enrollment-tokens")
async def list_tokens(request: web.Request) -> web.Response:
    """The site's enrollment tokens, newest first, with their state; never
    their secrets (only hashes are kept)."""
    holder = await require_partner(request)
    service = central(request)
    page = page_request(request, TOKENS)
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        query = sa.select(enrollment_tokens).where(enrollment_tokens.c.site_id == site.id)
        rows, cursor = await fetch_page(connection, query, TOKENS, page)
    now = service.clock()
    return page_response(request, [token_out(row, now) for row in rows], cursor)


@routes.delete("/api/v1/sites/{site_id}/enrollment-tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke a token not used yet: enrollment refuses it from now on."""
    holder = await require_partner(request)
    service = central(request)
    site_id, token_id = request.match_info["site_id"], request.match_info["token_id"]
    now = service.clock()
    async with write(service.engine) as connection:
        await get_site(connection, site_id, holder.partner_id)
        where = (enrollment_tokens.c.id == token_id, enrollment_tokens.c.site_id == site_id)
        row = (
            await connection.execute(sa.select(enrollment_tokens).where(*where).with_for_update())
        ).first()
        if row is None:
            raise Problem(
                "not-found", f"no enrollment token {token_id[:64]} in site {site_id[:64]}"
            )
        if row.used_at is not None:
            raise Problem(
                "conflict",
                f"token {token_id} was used by appliance {row.appliance_id}: "
                "decommission the appliance instead",
            )
        if row.revoked_at is None:
            await connection.execute(
                sa.update(enrollment_tokens).where(*where).values(revoked_at=now)
            )
            await record(
                connection,
                service.root,
                kind="token.revoked",
                actor=actor_of(holder),
                data={"site_id": site_id, "token_id": token_id},
                now=now,
                partner_id=holder.partner_id,
                site_id=site_id,
            )
            row = (await connection.execute(sa.select(enrollment_tokens).where(*where))).one()
    return json_response(token_out(row, now))


# --- API keys ------------------------------------------------------------------------------

KEYS = Keyset([(api_keys.c.created_at, "asc"), (api_keys.c.id, "asc")])


def _own_keys(holder: KeyHolder) -> tuple[sa.ColumnElement[bool], ...]:
    return (api_keys.c.partner_id == holder.partner_id, api_keys.c.role == "partner")


async def _own_key(connection: AsyncConnection, holder: KeyHolder, key_id: str) -> Any:
    row = (
        await connection.execute(
            sa.select(api_keys).where(api_keys.c.id == key_id, *_own_keys(holder)).with_for_update()
        )
    ).first()
    if row is None:
        raise Problem("not-found", f"no API key {key_id[:64]}")
    return row


@routes.get("/api/v1/api-keys")
async def list_keys(request: web.Request) -> web.Response:
    """The partner's API keys, oldest first, revoked ones included."""
    holder = await require_partner(request, "admin")
    service = central(request)
    page = page_request(request, KEYS)
    async with read_only(service.engine) as connection:
        query = sa.select(api_keys).where(*_own_keys(holder))
        rows, cursor = await fetch_page(connection, query, KEYS, page)
    now = service.clock()
    return page_response(request, [api_key_out(row, now) for row in rows], cursor)


@routes.post("/api/v1/api-keys")
async def create_key(request: web.Request) -> web.Response:
    """Another key for the partner (for an automation); shown once."""
    holder = await require_partner(request, "admin")
    body = parse_body(await read_body(request), ApiKeyCreate, request)
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        await get_partner(connection, _partner_id(holder), lock=True)
        secret, row = await issue_api_key(
            connection,
            "partner",
            holder.partner_id,
            now,
            name=body.name,
            created_by=actor_of(holder),
        )
        await record(
            connection,
            service.root,
            kind="key.created",
            actor=actor_of(holder),
            data={"key_id": row.id, "prefix": row.prefix, "name": row.name},
            now=now,
            partner_id=holder.partner_id,
        )
    return json_response(ApiKeyCreated(key=api_key_out(row, now), api_key=secret), status=201)


@routes.post("/api/v1/api-keys/{key_id}/rotate")
async def rotate_key(request: web.Request) -> web.Response:
    """A new key of the same name and role; the old one keeps working for
    ``overlap_minutes`` so the automations using it can switch."""
    holder = await require_partner(request, "admin")
    body = parse_body(await read_body(request), ApiKeyRotate, request)
    service = central(request)
    now = service.clock()
    key_id = request.match_info["key_id"]
    async with write(service.engine) as connection:
        await get_partner(connection, _partner_id(holder), lock=True)
        old = await _own_key(connection, holder, key_id)
        if old.revoked_at is not None and old.revoked_at <= now:
            raise Problem("conflict", f"API key {key_id} is revoked: create a new key instead")
        ends = now + timedelta(minutes=body.overlap_minutes)
        if old.revoked_at is not None:
            ends = min(ends, old.revoked_at)  # a rotation never lengthens a key's life
        secret, new = await issue_api_key(
            connection, old.role, old.partner_id, now, name=old.name, created_by=actor_of(holder)
        )
        await connection.execute(
            sa.update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=ends)
        )
        await record(
            connection,
            service.root,
            kind="key.rotated",
            actor=actor_of(holder),
            data={
                "key_id": key_id,
                "prefix": old.prefix,
                "revoked_at": format_time(ends),
                "new_key_id": new.id,
                "new_prefix": new.prefix,
            },
            now=now,
            partner_id=holder.partner_id,
        )
        old = await _own_key(connection, holder, key_id)
    return json_response(
        ApiKeyRotated(key=api_key_out(new, now), api_key=secret, previous=api_key_out(old, now)),
        status=201,
    )


@routes.delete("/api/v1/api-keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    """Revoke a key now. The partner's last active key cannot be revoked:
    nothing could then act for the partner."""
    holder = await require_partner(request, "admin")
    service = central(request)
    now = service.clock()
    key_id = request.match_info["key_id"]
    async with write(service.engine) as connection:
        # The partner's row serialises key changes: two revocations at once
        # cannot each leave the other as the last key.
        await get_partner(connection, _partner_id(holder), lock=True)
        row = await _own_key(connection, holder, key_id)
        if row.revoked_at is None or row.revoked_at > now:
            others = (
                await connection.execute(
                    sa.select(sa.func.count())
                    .select_from(api_keys)
                    .where(
                        *_own_keys(holder), api_keys.c.id != key_id, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).scalar_one()
            if not others:
                raise Problem(
                    "conflict",
                    f"API key {key_id} is the partner's last active key: create another key "
                    "(POST /api/v1/api-keys) or rotate this one instead",
                )
            await connection.execute(
                sa.update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now)
            )
            await record(
                connection,
                service.root,
                kind="key.revoked",
                actor=actor_of(holder),
                data={"key_id": key_id, "prefix": row.prefix},
                now=now,
                partner_id=holder.partner_id,
            )
            row = await _own_key(connection, holder, key_id)
    return json_response(api_key_out(row, now))
