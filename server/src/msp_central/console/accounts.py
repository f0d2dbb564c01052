"""Partner users: invitations, Argon2id passwords, TOTP second factors and
roles.

A user belongs to one partner and holds one role: a *viewer* reads, an
*editor* also changes compliance settings, acknowledges escalations and
manages appliances, an *admin* also manages users, API keys and
notification channels. An API key acts as an admin of its partner.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import pyotp
import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.context import new_secret
from msp_central.db.tables import user_invites, user_sessions, users
from msp_central.events import new_id
from msp_central.problems import Problem
from msp_protocol.delegation import token_digest

Role = Literal["viewer", "editor", "admin"]
Need = Literal["read", "edit", "admin"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "editor", "admin")
_RANK: Final = {"read": 0, "edit": 1, "admin": 2, "viewer": 0, "editor": 1}

# NIST SP 800-63B: at least 8 characters, allow long passphrases; we ask 12.
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
# RFC 6238 defaults (30 s steps, 6 digits); one step either side for clock drift.
TOTP_STEP = 30
TOTP_DRIFT_STEPS = 1

# RFC 9106's second recommended setting (Argon2id, 64 MiB, t=3, p=4):
# argon2-cffi's defaults.
_HASHER: Final = PasswordHasher()
# Verified when no such user exists, so the answer takes as long either way.
_DUMMY_HASH: Final = _HASHER.hash("no such user: a password nobody has")
_EMAIL: Final = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z0-9-]{2,63}")


def allows(role: str, need: Need) -> bool:
    """Whether a user of ``role`` may do what needs ``need``."""
    return role == "admin" or _RANK.get(role, -1) >= _RANK[need]


def normalise_email(value: str) -> str:
    """The address as stored and compared: trimmed and lower-cased."""
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        raise Problem("malformed-document", "an e-mail address such as name@example.com")
    return email


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise Problem("malformed-document", f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise Problem("malformed-document", f"a password has at most {MAX_PASSWORD} characters")


async def hash_password(password: str) -> str:
    """Argon2id, off the event loop (it takes tens of milliseconds by design)."""
    check_password(password)
    return await asyncio.to_thread(_HASHER.hash, password)


async def password_matches(stored: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _HASHER.verify(stored or _DUMMY_HASH, password[:MAX_PASSWORD]) and (
                stored is not None
            )
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


# --- invitations ----------------------------------------------------------------------


async def create_invite(
    connection: AsyncConnection,
    *,
    partner_id: str,
    email: str,
    role: str,
    actor: str,
    now: datetime,
    lifetime: timedelta,
) -> tuple[str, str, datetime]:
    """A one-time invitation: (its id, the secret token, its expiry). Only
    the token's hash is stored; the link is shown or sent once."""
    email = normalise_email(email)
    if role not in ROLES:
        raise Problem("malformed-document", f"role must be one of {', '.join(ROLES)}")
    taken = (await connection.execute(sa.select(users.c.id).where(users.c.email == email))).first()
    if taken is not None:
        raise Problem("conflict", f"{email} already has an account")
    token = new_secret("msp_inv")
    invite_id = new_id("inv")
    expires = now + lifetime
    await connection.execute(
        sa.insert(user_invites).values(
            id=invite_id,
            token_sha256=token_digest(token),
            partner_id=partner_id,
            email=email,
            role=role,
            created_at=now,
            created_by=actor,
            expires_at=expires,
        )
    )
    return invite_id, token, expires


async def open_invite(connection: AsyncConnection, token: str, now: datetime) -> Any:
    """The invitation ``token`` opens, if it is still good; else None."""
    if not re.fullmatch(r"msp_inv_[0-9a-f]{64}", token):
        return None
    row = (
        await connection.execute(
            sa.select(user_invites).where(user_invites.c.token_sha256 == token_digest(token))
        )
    ).first()
    if row is None or row.used_at is not None or row.revoked_at is not None:
        return None
    if row.expires_at <= now:
        return None
    return row


async def accept_invite(
    connection: AsyncConnection, invite: Any, password_hash: str, now: datetime
) -> str:
    """Create the invited user (once: the invitation is used up in the same
    transaction); returns the user id."""
    used = await connection.execute(
        sa.update(user_invites)
        .where(user_invites.c.id == invite.id, user_invites.c.used_at.is_(None))
        .values(used_at=now)
    )
    if used.rowcount != 1:
        raise Problem("conflict", "this invitation has already been used")
    taken = (
        await connection.execute(sa.select(users.c.id).where(users.c.email == invite.email))
    ).first()
    if taken is not None:
        raise Problem("conflict", f"{invite.email} already has an account")
    user_id = new_id("usr")
    await connection.execute(
        sa.insert(users).values(
            id=user_id,
            partner_id=invite.partner_id,
            email=invite.email,
            password_hash=password_hash,
            role=invite.role,
            totp_enabled=False,
            created_at=now,
            created_by=invite.created_by,
        )
    )
    return user_id


async def create_user(
    connection: AsyncConnection,
    *,
    partner_id: str,
    email: str,
    password: str,
    role: Role,
    actor: str,
    now: datetime,
) -> str:
    """A user with a password set directly (the demo, and the CLI's first
    admin when no e-mail can reach them)."""
    email = normalise_email(email)
    taken = (await connection.execute(sa.select(users.c.id).where(users.c.email == email))).first()
    if taken is not None:
        raise Problem("conflict", f"{email} already has an account")
    user_id = new_id("usr")
    await connection.execute(
        sa.insert(users).values(
            id=user_id,
            partner_id=partner_id,
            email=email,
            password_hash=await hash_password(password),
            role=role,
            totp_enabled=False,
            created_at=now,
            created_by=actor,
        )
    )
    return user_id


async def end_sessions(connection: AsyncConnection, user_id: str, now: datetime) -> int:
    """Sign the user out everywhere; returns how many sessions ended."""
    result = await connection.execute(
        sa.update(user_sessions)
        .where(user_sessions.c.user_id == user_id, user_sessions.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount or 0)


# --- TOTP (RFC 6238) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TotpSetup:
    secret: str
    uri: str


TOTP_ISSUER: Final = "MSP Compliance"


def new_totp(email: str) -> TotpSetup:
    return totp_setup(pyotp.random_base32(), email)


def totp_setup(secret: str, email: str) -> TotpSetup:
    """The key and the otpauth:// URI an authenticator app takes."""
    uri = pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=TOTP_ISSUER)
    return TotpSetup(secret, uri)


def totp_step(secret: str, code: str, now: datetime, last_step: int | None) -> int | None:
    """The time step ``code`` is valid for (now, or one step either side),
    or None; a step at or before ``last_step`` was used already (a code
    works once)."""
    code = code.strip().replace(" ", "")
    if not re.fullmatch(r"[0-9]{6}", code):
        return None
    totp = pyotp.TOTP(secret)
    current = int(now.timestamp()) // TOTP_STEP
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if last_step is not None and step <= last_step:
            continue
        if hmac.compare_digest(totp.at(step * TOTP_STEP), code):
            return step
    return None
