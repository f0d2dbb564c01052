"""Queries shared by the HTTP handlers and the CLI.

Every function takes an open connection (the caller owns the transaction)
and raises :class:`~msp_central.problems.Problem` for what the caller did
wrong.
"""

from __future__ import annotations

import functools
import secrets
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from msp_central.api_models import (
    ApiKeyOut,
    EffectiveConfig,
    EnrollmentTokenOut,
    PartnerDefaults,
    PartnerOut,
    RevokeOut,
    SettingsWarning,
    SiteOut,
    SiteOverrides,
)
from msp_central.catalogue import Tier
from msp_central.context import new_secret
from msp_central.db.engine import write
from msp_central.db.tables import (
    api_keys,
    appliances,
    audit_logs,
    certificates,
    enrollment_tokens,
    frameworks,
    partners,
    presets,
    revocation_lists,
    runbooks,
    sites,
)
from msp_central.events import store_alert
from msp_central.names import name_key, readable_name
from msp_central.problems import Problem
from msp_protocol.delegation import Revocation, RevocationList, sign_revocations, token_digest
from msp_protocol.dsse import Envelope
from msp_protocol.keys import SigningKey

Row = sa.Row[Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


# --- partners and keys ------------------------------------------------------------------


def partner_out(row: Row) -> PartnerOut:
    return PartnerOut(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        defaults=PartnerDefaults(
            industry=row.industry, tier=Tier(row.tier), frameworks=list(row.frameworks)
        ),
    )


def _readable(name: str) -> str:
    try:
        return readable_name(name)
    except ValueError as exc:
        raise Problem("malformed-document", str(exc)) from None


async def check_site_name_free(
    connection: AsyncConnection, partner_id: str, name: str, *, renaming: str | None = None
) -> None:
    """Refuse a name another of the partner's sites in service already has,
    as a person reads it (:func:`msp_central.names.name_key`)."""
    rows = await connection.execute(
        sa.select(sites.c.id, sites.c.name).where(
            sites.c.partner_id == partner_id,
            sites.c.decommissioned_at.is_(None),
            sites.c.id != (renaming or ""),
        )
    )
    key = name_key(name)
    for row in rows:
        if name_key(row.name) == key:
            raise Problem("conflict", f"site {row.id} is already named {row.name[:200]!r}")


async def create_partner(connection: AsyncConnection, name: str, now: datetime) -> tuple[Row, str]:
    """A partner with empty defaults, and its first API key (returned once).
    The name is refused when another partner's name reads the same."""
    name = _readable(name)
    key_of_name = name_key(name)
    for other in await connection.execute(sa.select(partners.c.id, partners.c.name)):
        if name_key(other.name) == key_of_name:
            raise Problem("conflict", f"partner {other.id} is already named {other.name[:200]!r}")
    partner_id = new_id("partner")
    await connection.execute(
        sa.insert(partners).values(
            id=partner_id, name=name, created_at=now, industry=None, tier="basic", frameworks=[]
        )
    )
    key = await create_api_key(connection, "partner", partner_id, now)
    row = (await connection.execute(sa.select(partners).where(partners.c.id == partner_id))).one()
    return row, key


async def create_api_key(
    connection: AsyncConnection,
    role: str,
    partner_id: str | None,
    now: datetime,
    *,
    name: str = "",
    created_by: str | None = None,
) -> str:
    """A new API key; the secret is returned once and stored only as a hash."""
    key, _ = await issue_api_key(
        connection, role, partner_id, now, name=name, created_by=created_by
    )
    return key


async def issue_api_key(
    connection: AsyncConnection,
    role: str,
    partner_id: str | None,
    now: datetime,
    *,
    name: str = "",
    created_by: str | None = None,
) -> tuple[str, Row]:
    """:func:`create_api_key`, with the stored row."""
    key = new_secret("mspk")
    key_id = new_id("key")
    await connection.execute(
        sa.insert(api_keys).values(
            key_sha256=token_digest(key),
            id=key_id,
            name=name,
            prefix=key[:12],
            role=role,
            partner_id=partner_id,
            created_at=now,
            created_by=created_by,
        )
    )
    row = (await connection.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).one()
    return key, row


def api_key_out(row: Row, now: datetime) -> ApiKeyOut:
    if row.revoked_at is None:
        state = "active"
    elif row.revoked_at > now:
        state = "expiring"
    else:
        state = "revoked"
    return ApiKeyOut(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
        state=state,  # type: ignore[arg-type]
    )


async def get_partner(connection: AsyncConnection, partner_id: str, *, lock: bool = False) -> Row:
    """The partner; ``lock`` holds its row to the end of the transaction
    (PostgreSQL; SQLite's writers are serialised already)."""
    query = sa.select(partners).where(partners.c.id == partner_id)
    row = (await connection.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise Problem("not-found", f"no partner {partner_id[:64]}")
    return row


# --- the catalogue -----------------------------------------------------------------------


async def known_frameworks(connection: AsyncConnection) -> dict[str, str]:
    rows = await connection.execute(
        sa.select(frameworks.c.id, frameworks.c.name).order_by(frameworks.c.position)
    )
    return {row.id: row.name for row in rows}


async def check_frameworks(connection: AsyncConnection, names: list[str] | None) -> None:
    if names is None:
        return
    known = await known_frameworks(connection)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise Problem("malformed-document", f"unknown framework {unknown[0]}")
    if len(set(names)) != len(names):
        raise Problem("malformed-document", "a framework is listed twice")


async def get_preset(connection: AsyncConnection, preset_id: str) -> Row:
    row = (await connection.execute(sa.select(presets).where(presets.c.id == preset_id))).first()
    if row is None:
        raise Problem("not-found", f"no preset {preset_id[:32]}")
    return row


async def runbooks_for_tier(connection: AsyncConnection, tier: Tier) -> list[str]:
    query = sa.select(runbooks.c.id).order_by(runbooks.c.id)
    if tier == Tier.BASIC:
        query = query.where(runbooks.c.tier == Tier.BASIC.value)
    return list((await connection.execute(query)).scalars())


# --- sites ------------------------------------------------------------------------------


def overrides_of(site: Row) -> SiteOverrides:
    return SiteOverrides(
        industry=site.industry,
        tier=Tier(site.tier) if site.tier else None,
        frameworks=list(site.frameworks) if site.frameworks is not None else None,
    )


async def effective_config(
    connection: AsyncConnection,
    site: Row,
    partner: Row,
    tier_runbooks: dict[Tier, list[str]] | None = None,
) -> EffectiveConfig:
    """The settings a site runs with: each one the site's override if it has
    one, else the partner's default. ``tier_runbooks`` memoises the runbooks
    of each tier across the sites of one answer (a page of sites would
    otherwise read them once per site)."""
    tier = Tier(site.tier or partner.tier)
    chosen_frameworks = site.frameworks if site.frameworks is not None else partner.frameworks
    if tier_runbooks is None:
        tier_runbooks = {}
    if tier not in tier_runbooks:
        tier_runbooks[tier] = await runbooks_for_tier(connection, tier)
    return EffectiveConfig(
        site_id=site.id,
        industry=site.industry or partner.industry,
        tier=tier,
        frameworks=list(chosen_frameworks),
        runbooks=list(tier_runbooks[tier]),
        sources={
            "industry": "site" if site.industry else "partner",
            "tier": "site" if site.tier else "partner",
            "frameworks": "site" if site.frameworks is not None else "partner",
        },
    )


async def site_out(
    connection: AsyncConnection,
    site: Row,
    partner: Row | None = None,
    tier_runbooks: dict[Tier, list[str]] | None = None,
) -> SiteOut:
    partner = partner or await get_partner(connection, site.partner_id)
    return SiteOut(
        id=site.id,
        partner_id=site.partner_id,
        name=site.name,
        created_at=site.created_at,
        overrides=overrides_of(site),
        effective=await effective_config(connection, site, partner, tier_runbooks),
        decommissioned_at=site.decommissioned_at,
    )


def require_active(site: Row, action: str) -> None:
    """Refuse a change to a decommissioned site (``action`` says which)."""
    if site.decommissioned_at is not None:
        raise Problem(
            "conflict",
            f"site {site.id} was decommissioned at {site.decommissioned_at.isoformat()}: "
            f"{action} is closed; its history stays readable",
        )


async def settings_warnings(
    connection: AsyncConnection, industry: str | None, chosen: list[str]
) -> list[SettingsWarning]:
    """What looks unintended in an industry and a framework selection (the
    effective ones of a site, or a partner's defaults)."""
    warnings = []
    if not chosen:
        warnings.append(
            SettingsWarning(
                code="no-frameworks",
                detail="no framework is selected: no control is evaluated",
            )
        )
    if industry is not None and chosen:
        preset = (
            await connection.execute(
                sa.select(presets.c.frameworks).where(presets.c.id == industry)
            )
        ).scalar()
        if preset and not set(preset) & set(chosen):
            warnings.append(
                SettingsWarning(
                    code="industry-mismatch",
                    detail=f"none of the frameworks of the {industry} preset "
                    f"({', '.join(preset)}) is selected",
                )
            )
    return warnings


async def get_site(
    connection: AsyncConnection,
    site_id: str,
    partner_id: str | None = None,
    *,
    lock: bool = False,
) -> Row:
    """The site (of ``partner_id`` when given: another's is "not found");
    ``lock`` holds its row to the end of the transaction."""
    query = sa.select(sites).where(sites.c.id == site_id)
    if partner_id is not None:
        query = query.where(sites.c.partner_id == partner_id)
    if lock:
        query = query.with_for_update()
    row = (await connection.execute(query)).first()
    if row is None:
        raise Problem("not-found", f"no site {site_id[:64]}")
    return row


async def create_site(
    connection: AsyncConnection, partner_id: str, name: str, overrides: SiteOverrides, now: datetime
) -> Row:
    await check_frameworks(connection, overrides.frameworks)
    name = _readable(name)
    await get_partner(connection, partner_id, lock=True)  # one new name at a time
    await check_site_name_free(connection, partner_id, name)
    site_id = new_id("site")
    await connection.execute(
        sa.insert(sites).values(
            id=site_id,
            partner_id=partner_id,
            name=name,
            created_at=now,
            industry=overrides.industry,
            tier=overrides.tier.value if overrides.tier else None,
            frameworks=overrides.frameworks,
        )
    )
    return await get_site(connection, site_id)


async def create_enrollment_token(
    connection: AsyncConnection, site_id: str, lifetime: timedelta, now: datetime
) -> tuple[str, datetime]:
    token, row = await issue_enrollment_token(connection, site_id, lifetime, now)
    return token, row.expires_at


async def issue_enrollment_token(
    connection: AsyncConnection,
    site_id: str,
    lifetime: timedelta,
    now: datetime,
    *,
    created_by: str | None = None,
) -> tuple[str, Row]:
    """A single-use token (returned once, stored as a hash) and its row."""
    token = new_secret("msp-enroll")
    token_id = new_id("tok")
    await connection.execute(
        sa.insert(enrollment_tokens).values(
            token_sha256=token_digest(token),
            id=token_id,
            site_id=site_id,
            created_at=now,
            created_by=created_by,
            expires_at=now + lifetime,
        )
    )
    row = (
        await connection.execute(
            sa.select(enrollment_tokens).where(enrollment_tokens.c.id == token_id)
        )
    ).one()
    return token, row


def spent_state(row: Any, now: datetime) -> Literal["used", "revoked", "expired"] | None:
    """Why a one-time secret (an enrollment token, an invitation) no longer
    works, or None while it still does."""
    if row.used_at is not None:
        return "used"
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    return None


def token_out(row: Row, now: datetime) -> EnrollmentTokenOut:
    state = spent_state(row, now) or "active"
    return EnrollmentTokenOut(
        id=row.id,
        site_id=row.site_id,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        used_at=row.used_at,
        appliance_id=row.appliance_id,
        revoked_at=row.revoked_at,
        state=state,
    )


# --- revocation -------------------------------------------------------------------------


async def current_revocations(connection: AsyncConnection) -> tuple[int, str] | None:
    row = (
        await connection.execute(
            sa.select(revocation_lists.c.version, revocation_lists.c.envelope)
            .order_by(revocation_lists.c.version.desc())
            .limit(1)
        )
    ).first()
    return (int(row.version), str(row.envelope)) if row else None


async def revocation_list(connection: AsyncConnection) -> RevocationList | None:
    current = await current_revocations(connection)
    if current is None:
        return None
    envelope = Envelope.from_json(current[1].encode())
    return RevocationList.from_json(envelope.payload_bytes())


# Any 64-bit number of our own: the PostgreSQL advisory lock that
# serialises revocations (SQLite's write lock already does).
REVOCATION_LOCK = 0x6D73702D7265766F  # "msp-revo"


async def lock_revocations(connection: AsyncConnection) -> None:
    """Serialise revocation-list publication across replicas, so that two
    revocations at once can neither collide on a version nor publish a list
    that misses the other's serial."""
    if connection.dialect.name == "postgresql":
        await connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": REVOCATION_LOCK}
        )


async def revoke_certificate(
    connection: AsyncConnection,
    root: SigningKey,
    serial: str,
    reason: str,
    now: datetime,
    *,
    partner_id: str | None = None,
) -> RevokeOut:
    """Revoke a certificate, and with it every certificate of the same key
    (a renewal keeps the key: revoking the old serial must stop the key).

    The cutoff is the size of the log the server has witnessed: checkpoints
    up to it stay valid (they were cosigned before anyone knew), anything
    larger signed under these serials is refused. The log row is locked, so
    a sync in flight either lands before the cutoff is read or sees the
    revocation. A new revocation list (next version, every revoked serial)
    is signed."""
    await lock_revocations(connection)
    query = (
        sa.select(certificates, appliances.c.current_serial, sites.c.partner_id)
        .join(appliances, appliances.c.id == certificates.c.appliance_id)
        .join(sites, sites.c.id == appliances.c.site_id)
        .where(certificates.c.serial == serial)
    )
    if partner_id is not None:
        query = query.where(sites.c.partner_id == partner_id)
    cert = (await connection.execute(query)).first()
    if cert is None:
        raise Problem("not-found", f"no certificate {serial[:32]}")
    same_key = (
        certificates.c.appliance_id == cert.appliance_id,
        certificates.c.key_id == cert.key_id,
        certificates.c.revoked_at.is_(None),
    )
    pending = (
        (await connection.execute(sa.select(certificates.c.serial).where(*same_key)))
        .scalars()
        .all()
    )
    if pending:
        witnessed = (
            await connection.execute(
                sa.select(audit_logs.c.size)
                .where(audit_logs.c.appliance_id == cert.appliance_id)
                .with_for_update()
            )
        ).scalar()
        await connection.execute(
            sa.update(certificates)
            .where(*same_key)
            .values(revoked_at=now, cutoff_size=int(witnessed or 0), revocation_reason=reason)
        )
        if cert.current_serial in pending:
            await connection.execute(
                sa.update(appliances)
                .where(appliances.c.id == cert.appliance_id)
                .values(revoked_at=now)
            )
        await publish_revocations(connection, root, now)
    revoked = (
        await connection.execute(
            sa.select(certificates.c.serial, certificates.c.cutoff_size)
            .where(
                certificates.c.appliance_id == cert.appliance_id,
                certificates.c.key_id == cert.key_id,
            )
            .order_by(certificates.c.issued_at)
        )
    ).all()
    current = await current_revocations(connection)
    assert current is not None
    return RevokeOut(
        serial=serial,
        appliance_id=cert.appliance_id,
        cutoff_size=int(next(row.cutoff_size for row in revoked if row.serial == serial)),
        revoked_serials=[row.serial for row in revoked],
        revocation_list_version=current[0],
    )


async def publish_revocations(connection: AsyncConnection, root: SigningKey, now: datetime) -> None:
    """Sign the next version of the revocation list. The caller holds
    :func:`lock_revocations` (or SQLite's write lock)."""
    await lock_revocations(connection)
    revoked = await connection.execute(
        sa.select(certificates)
        .where(certificates.c.revoked_at.is_not(None))
        .order_by(certificates.c.revoked_at, certificates.c.serial)
    )
    current = await current_revocations(connection)
    version = (current[0] if current else 0) + 1
    revocations = RevocationList(
        version=version,
        issuer=root.key_id,
        issued_at=now,
        revoked=tuple(
            Revocation(
                serial=row.serial,
                appliance_id=row.appliance_id,
                cutoff_size=int(row.cutoff_size),
                revoked_at=row.revoked_at,
                # Every appliance of every partner reads this list: the
                # partner's reason stays in its own view, not here.
                reason="",
            )
            for row in revoked
        ),
    )
    envelope = sign_revocations(root, revocations)
    await connection.execute(
        sa.insert(revocation_lists).values(
            version=version, envelope=envelope.canonical_bytes().decode(), issued_at=now
        )
    )


# --- alerts -----------------------------------------------------------------------------


async def record_alert(
    engine: AsyncEngine,
    *,
    code: str,
    detail: str,
    now: datetime,
    appliance_id: str | None = None,
    site_id: str | None = None,
    partner_id: str | None = None,
) -> None:
    """A security alert, in its own transaction: it must survive the refusal
    of the request that raised it."""
    async with write(engine) as connection:
        await connection.run_sync(
            functools.partial(
                store_alert,
                appliance_id=appliance_id,
                site_id=site_id,
                partner_id=partner_id,
                code=code,
                detail=detail,
                now=now,
            )
        )
