"""Console sessions: stored server-side, named by an HttpOnly cookie.

The cookie holds 256 random bits; the database holds only their SHA-256.
A session ends after ``console_idle_minutes`` without a request, at the
latest ``console_session_hours`` after sign-in, at sign-out, and for every
device at once on "sign out everywhere" or when the user is removed.

Every state-changing request made with a session must carry the session's
CSRF token (the ``X-CSRF-Token`` header, or the ``csrf_token`` field of a
form) and, when the browser says where it comes from, come from this
server's own origin. The cookie is ``SameSite=Strict`` as well.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.context import Central, central
from msp_central.db.engine import read_only, write
from msp_central.db.tables import login_failures, partners, user_sessions, users
from msp_central.events import store_alert
from msp_central.problems import Problem
from msp_protocol.delegation import token_digest

SECURE_COOKIE: Final = "__Host-msp-session"
PLAIN_COOKIE: Final = "msp-session"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# last_seen_at is written at most this often: reading a page is not a write.
TOUCH_EVERY: Final = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Session:
    id_sha256: str
    user_id: str
    email: str
    role: str
    partner_id: str
    partner_name: str
    csrf_token: str
    second_factor_pending: bool
    totp_enabled: bool


def client_source(request: web.Request) -> str:
    """The client's address: the peer's, or, when the peer is a trusted
    reverse proxy, the last address it added to X-Forwarded-For."""
    peer = request.remote or "unknown"
    if peer in central(request).settings.trusted_proxies:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            return peer[:64]
    return peer[:64]


def secure_cookies(request: web.Request) -> bool:
    """Cookies are Secure unless the console is reached over plain HTTP on
    the loopback interface (the demo, a local test)."""
    public = central(request).settings.public_url
    if public:
        return public.startswith("https://")
    if request.secure:
        return True
    return not _loopback(request.host.rsplit(":", 1)[0].strip("[]"))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_allowed(request: web.Request) -> bool:
    """Whether a session cookie can be set at all: over HTTPS, or plain
    HTTP on loopback. Anything else would send the cookie in the clear."""
    public = central(request).settings.public_url
    if public:
        return public.startswith("https://") or _loopback(
            public.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        )
    return request.secure or not secure_cookies(request)


def cookie_name(request: web.Request) -> str:
    return SECURE_COOKIE if secure_cookies(request) else PLAIN_COOKIE


def session_secret(request: web.Request) -> str | None:
    value = request.cookies.get(SECURE_COOKIE) or request.cookies.get(PLAIN_COOKIE)
    if value and len(value) <= 128 and value.isascii():
        return value
    return None


def set_cookie(response: web.StreamResponse, request: web.Request, secret: str) -> None:
    response.set_cookie(
        cookie_name(request),
        secret,
        path="/",
        httponly=True,
        secure=secure_cookies(request),
        samesite="Strict",
    )


def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(
        cookie_name(request),
        path="/",
        secure=secure_cookies(request),
        httponly=True,
        samesite="Strict",
    )


async def start_session(
    connection: AsyncConnection,
    service: Central,
    *,
    user_id: str,
    second_factor_pending: bool,
    source: str,
) -> str:
    """A new session for ``user_id``; returns the cookie's secret."""
    now = service.clock()
    secret = os.urandom(32).hex()
    await connection.execute(
        sa.insert(user_sessions).values(
            id_sha256=token_digest(secret),
            user_id=user_id,
            csrf_token=os.urandom(32).hex(),
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(hours=service.settings.console_session_hours),
            second_factor_pending=second_factor_pending,
            source=source[:64],
        )
    )
    return secret


async def load_session(request: web.Request, *, allow_pending: bool = False) -> Session | None:
    """The live session the request's cookie names, or None. Seen now: its
    idle clock restarts."""
    secret = session_secret(request)
    if secret is None:
        return None
    service = central(request)
    now = service.clock()
    digest = token_digest(secret)
    async with read_only(service.engine) as connection:
        row = (
            await connection.execute(
                sa.select(
                    user_sessions,
                    users.c.email,
                    users.c.role,
                    users.c.partner_id,
                    users.c.removed_at,
                    users.c.totp_enabled,
                    partners.c.name.label("partner_name"),
                )
                .join(users, users.c.id == user_sessions.c.user_id)
                .join(partners, partners.c.id == users.c.partner_id)
                .where(user_sessions.c.id_sha256 == digest)
            )
        ).first()
    if row is None or row.revoked_at is not None or row.removed_at is not None:
        return None
    idle = timedelta(minutes=service.settings.console_idle_minutes)
    if row.expires_at <= now or row.last_seen_at + idle <= now:
        return None
    if row.second_factor_pending and not allow_pending:
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        async with write(service.engine) as connection:
            await connection.execute(
                sa.update(user_sessions)
                .where(user_sessions.c.id_sha256 == digest)
                .values(last_seen_at=now)
            )
    return Session(
        id_sha256=digest,
        user_id=row.user_id,
        email=row.email,
        role=row.role,
        partner_id=row.partner_id,
        partner_name=row.partner_name,
        csrf_token=row.csrf_token,
        second_factor_pending=row.second_factor_pending,
        totp_enabled=row.totp_enabled,
    )


def own_origin(request: web.Request) -> str:
    public = central(request).settings.public_url
    if public:
        scheme, _, rest = public.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}".lower()
    return f"{request.scheme}://{request.host}".lower()


def check_origin(request: web.Request) -> None:
    """A state-changing request must not come from another site: the Origin
    header (or, failing that, Sec-Fetch-Site) says where it came from."""
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != own_origin(request):
        raise Problem("csrf-failed", "the request came from another origin")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Problem("csrf-failed", "the request came from another site")


def check_csrf(request: web.Request, session: Session, token: str | None) -> None:
    """The session's CSRF token must come with a state-changing request."""
    check_origin(request)
    given = token if token is not None else request.headers.get("X-CSRF-Token", "")
    if not given or not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        raise Problem("csrf-failed", "the request lacks this session's CSRF token")


# --- failed sign-ins ------------------------------------------------------------------


async def throttled(request: web.Request, email: str) -> int | None:
    """Seconds to wait before this source may try ``email`` again, or None.

    Two counters over the window: the address from this source (so one
    guesser cannot lock a user out from everywhere, and neighbours behind
    one NAT address keep their own counts), and everything from this source
    (so one source cannot walk through many addresses)."""
    service = central(request)
    settings = service.settings
    now = service.clock()
    window = timedelta(minutes=settings.login_window_minutes)
    source = client_source(request)
    since = now - window
    async with read_only(service.engine) as connection:
        pair = (
            await connection.execute(
                sa.select(sa.func.count(), sa.func.min(login_failures.c.created_at)).where(
                    login_failures.c.email == email,
                    login_failures.c.source == source,
                    login_failures.c.created_at > since,
                )
            )
        ).one()
        everything = (
            await connection.execute(
                sa.select(sa.func.count(), sa.func.min(login_failures.c.created_at)).where(
                    login_failures.c.source == source, login_failures.c.created_at > since
                )
            )
        ).one()
    for count, oldest, limit in (
        (pair[0], pair[1], settings.login_account_failures),
        (everything[0], everything[1], settings.login_source_failures),
    ):
        if count >= limit and oldest is not None:
            return max(1, int((oldest + window - now).total_seconds()) + 1)
    return None


async def record_failure(request: web.Request, email: str, partner_id: str | None) -> None:
    """Count a failed sign-in; at the alert threshold for the account (from
    any source), raise one security alert for its partner."""
    service = central(request)
    settings = service.settings
    now = service.clock()
    source = client_source(request)
    async with write(service.engine) as connection:
        await connection.execute(
            sa.insert(login_failures).values(email=email[:254], source=source, created_at=now)
        )
        if partner_id is None:
            return
        since = now - timedelta(minutes=settings.login_window_minutes)
        failures = (
            await connection.execute(
                sa.select(login_failures.c.source).where(
                    login_failures.c.email == email, login_failures.c.created_at > since
                )
            )
        ).all()
        if len(failures) != settings.login_alert_failures:
            return
        sources = sorted({row.source for row in failures})
        detail = (
            f"{len(failures)} failed sign-ins to {email} within "
            f"{settings.login_window_minutes} minutes, from {', '.join(sources[:10])}"
        )
        await connection.run_sync(
            functools.partial(
                store_alert,
                partner_id=partner_id,
                code="login-failures",
                detail=detail,
                now=now,
            )
        )


async def forget_failures(request: web.Request, email: str) -> None:
    """A successful sign-in clears this source's count for the address."""
    service = central(request)
    async with write(service.engine) as connection:
        await connection.execute(
            sa.delete(login_failures).where(
                login_failures.c.email == email,
                login_failures.c.source == client_source(request),
            )
        )


def session_summary(session: Session) -> dict[str, Any]:
    return {
        "user_id": session.user_id,
        "email": session.email,
        "role": session.role,
        "partner_id": session.partner_id,
        "partner_name": session.partner_name,
        "totp_enabled": session.totp_enabled,
    }
