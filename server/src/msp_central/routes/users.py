"""The partner's console users: who is asking, invitations, roles,
removal, and signing out everywhere.

Admins (and API keys, which act as admins) manage users; anyone may list
them. Every change is recorded in the central log with who made it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import (
    InviteCreate,
    InviteCreated,
    InviteOut,
    Me,
    SessionsEnded,
    UserOut,
    UserUpdate,
)
from msp_central.auth import KeyHolder, require_partner
from msp_central.central_log import actor_of, record
from msp_central.console.accounts import create_invite, end_sessions
from msp_central.console.sessions import own_origin
from msp_central.context import central, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import partners, user_invites, users
from msp_central.notifier import send_mail
from msp_central.pagination import Keyset, fetch_page, page_request, page_response
from msp_central.problems import Problem
from msp_central.queries import spent_state

log = logging.getLogger("msp_central.users")
routes = web.RouteTableDef()

USERS = Keyset([(users.c.created_at, "asc"), (users.c.id, "asc")])
INVITES = Keyset([(user_invites.c.created_at, "desc"), (user_invites.c.id, "asc")])


def user_out(row: Any) -> UserOut:
    return UserOut(
        id=row.id,
        email=row.email,
        role=row.role,
        totp_enabled=row.totp_enabled,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def invite_out(row: Any, now: datetime) -> InviteOut:
    return InviteOut(
        id=row.id,
        email=row.email,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        state=spent_state(row, now) or "pending",
    )


def invite_link(base: str, token: str) -> str:
    """The link an invited person opens. The token travels in the fragment,
    which browsers never send to a server: it stays out of access logs and
    proxies; the page's form carries it to the server once."""
    return f"{base}/console/invite#{token}"


async def _partner_name(connection: AsyncConnection, partner_id: str) -> str:
    query = sa.select(partners.c.name).where(partners.c.id == partner_id)
    return str((await connection.execute(query)).scalar_one())


@routes.get("/api/v1/me")
async def me(request: web.Request) -> web.Response:
    """Who is asking, for which partner, with which role."""
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        partner_name = await _partner_name(connection, str(holder.partner_id))
        user = None
        if holder.user_id is not None:
            user = (
                await connection.execute(sa.select(users).where(users.c.id == holder.user_id))
            ).one()
    return json_response(
        Me(
            kind="user" if user is not None else "key",
            partner_id=str(holder.partner_id),
            partner_name=partner_name,
            role=holder.user_role or "admin",  # type: ignore[arg-type]
            user_id=user.id if user is not None else None,
            email=user.email if user is not None else None,
            totp_enabled=user.totp_enabled if user is not None else None,
        )
    )


@routes.delete("/api/v1/me/sessions")
async def sign_out_everywhere(request: web.Request) -> web.Response:
    """End every session of the asking user, this one included."""
    holder = await require_partner(request, "read")
    if holder.user_id is None:
        raise Problem("forbidden", "only a console user has sessions")
    service = central(request)
    async with write(service.engine) as connection:
        ended = await end_sessions(connection, holder.user_id, service.clock())
    return json_response(SessionsEnded(ended=ended))


@routes.get("/api/v1/users")
async def list_users(request: web.Request) -> web.Response:
    """The partner's console users, oldest first (removed ones are gone)."""
    holder = await require_partner(request)
    page = page_request(request, USERS)
    async with read_only(central(request).engine) as connection:
        query = sa.select(users).where(
            users.c.partner_id == holder.partner_id, users.c.removed_at.is_(None)
        )
        rows, cursor = await fetch_page(connection, query, USERS, page)
    return page_response(request, [user_out(row) for row in rows], cursor)


async def _own_user(connection: AsyncConnection, holder: KeyHolder, user_id: str) -> Any:
    row = (
        await connection.execute(
            sa.select(users)
            .where(
                users.c.id == user_id,
                users.c.partner_id == holder.partner_id,
                users.c.removed_at.is_(None),
            )
            .with_for_update()
        )
    ).first()
    if row is None:
        raise Problem("not-found", f"no user {user_id[:64]}")
    return row


async def _other_admins(connection: AsyncConnection, holder: KeyHolder, user_id: str) -> int:
    return int(
        (
            await connection.execute(
                sa.select(sa.func.count())
                .select_from(users)
                .where(
                    users.c.partner_id == holder.partner_id,
                    users.c.removed_at.is_(None),
                    users.c.role == "admin",
                    users.c.id != user_id,
                )
            )
        ).scalar_one()
    )


async def _lock_partner(connection: AsyncConnection, holder: KeyHolder) -> None:
    """The partner's row serialises user changes: two demotions at once
    cannot each leave the other as the last admin."""
    await connection.execute(
        sa.select(partners.c.id).where(partners.c.id == holder.partner_id).with_for_update()
    )


@routes.patch("/api/v1/users/{user_id}")
async def change_role(request: web.Request) -> web.Response:
    """Give a user another role; the partner's last admin stays an admin."""
    holder = await require_partner(request, "admin")
    body = parse_body(await read_body(request), UserUpdate, request)
    service = central(request)
    now = service.clock()
    user_id = request.match_info["user_id"]
    async with write(service.engine) as connection:
        await _lock_partner(connection, holder)
        row = await _own_user(connection, holder, user_id)
        if row.role != body.role:
            if row.role == "admin" and not await _other_admins(connection, holder, user_id):
                raise Problem("conflict", f"{row.email} is the partner's last admin")
            await connection.execute(
                sa.update(users).where(users.c.id == user_id).values(role=body.role)
            )
            await record(
                connection,
                service.root,
                kind="user.role_changed",
                actor=actor_of(holder),
                data={"user_id": user_id, "from": row.role, "to": body.role},
                now=now,
                partner_id=holder.partner_id,
            )
            row = await _own_user(connection, holder, user_id)
    return json_response(user_out(row))


@routes.delete("/api/v1/users/{user_id}")
async def remove_user(request: web.Request) -> web.Response:
    """Remove a user: their sessions end at once. The partner's last admin
    cannot be removed."""
    holder = await require_partner(request, "admin")
    service = central(request)
    now = service.clock()
    user_id = request.match_info["user_id"]
    async with write(service.engine) as connection:
        await _lock_partner(connection, holder)
        row = await _own_user(connection, holder, user_id)
        if row.role == "admin" and not await _other_admins(connection, holder, user_id):
            raise Problem("conflict", f"{row.email} is the partner's last admin")
        await connection.execute(
            # The address is freed for a new invitation; the id stays in the log.
            sa.update(users)
            .where(users.c.id == user_id)
            .values(removed_at=now, email=f"removed:{user_id}")
        )
        await end_sessions(connection, user_id, now)
        await record(
            connection,
            service.root,
            kind="user.removed",
            actor=actor_of(holder),
            data={"user_id": user_id, "role": row.role},
            now=now,
            partner_id=holder.partner_id,
        )
    return web.Response(status=204)


@routes.get("/api/v1/user-invites")
async def list_invites(request: web.Request) -> web.Response:
    """The partner's invitations, newest first, with their state."""
    holder = await require_partner(request, "admin")
    service = central(request)
    page = page_request(request, INVITES)
    async with read_only(service.engine) as connection:
        query = sa.select(user_invites).where(user_invites.c.partner_id == holder.partner_id)
        rows, cursor = await fetch_page(connection, query, INVITES, page)
    now = service.clock()
    return page_response(request, [invite_out(row, now) for row in rows], cursor)


@routes.post("/api/v1/user-invites")
async def invite(request: web.Request) -> web.Response:
    """Invite someone by e-mail address with a role. The one-time link is
    in the answer (shown once) and, when the server has SMTP, e-mailed."""
    holder = await require_partner(request, "admin")
    body = parse_body(await read_body(request), InviteCreate, request)
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        await _lock_partner(connection, holder)
        invite_id, token, _ = await create_invite(
            connection,
            partner_id=str(holder.partner_id),
            email=body.email,
            role=body.role,
            actor=actor_of(holder),
            now=now,
            lifetime=timedelta(hours=service.settings.console_invite_hours),
        )
        row = (
            await connection.execute(sa.select(user_invites).where(user_invites.c.id == invite_id))
        ).one()
        partner_name = await _partner_name(connection, row.partner_id)
        await record(
            connection,
            service.root,
            kind="user.invited",
            actor=actor_of(holder),
            data={"invite_id": invite_id, "email": row.email, "role": row.role},
            now=now,
            partner_id=holder.partner_id,
        )
    link = invite_link(own_origin(request), token)
    emailed = False
    if service.settings.smtp_configured:
        emailed = await _mail_invite(
            request, row.email, partner_name, row.role, link, row.expires_at
        )
    return json_response(
        InviteCreated(invite=invite_out(row, now), link=link, emailed=emailed), status=201
    )


async def _mail_invite(
    request: web.Request, email: str, partner: str, role: str, link: str, expires: datetime
) -> bool:
    settings = central(request).settings
    message = EmailMessage()
    message["Subject"] = f"[MSP] You are invited to {partner}'s compliance console"
    message["From"] = settings.smtp_from or ""
    message["To"] = email
    message.set_content(
        f"You are invited to {partner}'s compliance console as {role}.\n\n"
        f"Open this link to choose your password (it works once, until "
        f"{expires.isoformat()}):\n\n{link}\n\n"
        "If you did not expect this invitation, ignore this message.\n"
    )
    try:
        await asyncio.to_thread(send_mail, settings, message)
    except Exception:  # the link is in the answer all the same
        log.exception("e-mailing an invitation failed")
        return False
    return True


@routes.delete("/api/v1/user-invites/{invite_id}")
async def revoke_invite(request: web.Request) -> web.Response:
    """Withdraw an invitation that has not been used."""
    holder = await require_partner(request, "admin")
    service = central(request)
    now = service.clock()
    invite_id = request.match_info["invite_id"]
    async with write(service.engine) as connection:
        row = (
            await connection.execute(
                sa.select(user_invites).where(
                    user_invites.c.id == invite_id,
                    user_invites.c.partner_id == holder.partner_id,
                )
            )
        ).first()
        if row is None:
            raise Problem("not-found", f"no invitation {invite_id[:64]}")
        if row.used_at is None and row.revoked_at is None:
            await connection.execute(
                sa.update(user_invites).where(user_invites.c.id == invite_id).values(revoked_at=now)
            )
            await record(
                connection,
                service.root,
                kind="user.invite_revoked",
                actor=actor_of(holder),
                data={"invite_id": invite_id},
                now=now,
                partner_id=holder.partner_id,
            )
            row = (
                await connection.execute(
                    sa.select(user_invites).where(user_invites.c.id == invite_id)
                )
            ).one()
    return json_response(invite_out(row, now))
