"""The console's HTML: sign-in, the second factor, invitations, the account
page, and the shell of each page (whose ES module fills it from the API).

Forms post back here with the session's CSRF token; the pages' own changes
go through the JSON API (:mod:`msp_central.auth` accepts the session there).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, quote

import jinja2
import segno
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.central_log import record, user_actor
from msp_central.console.accounts import (
    MIN_PASSWORD,
    accept_invite,
    end_sessions,
    hash_password,
    new_totp,
    normalise_email,
    open_invite,
    password_matches,
    totp_setup,
    totp_step,
)
from msp_central.console.sessions import (
    Session,
    check_csrf,
    check_origin,
    clear_cookie,
    client_source,
    forget_failures,
    load_session,
    plain_http_allowed,
    record_failure,
    session_secret,
    set_cookie,
    start_session,
    throttled,
)
from msp_central.context import central
from msp_central.db.engine import read_only, write
from msp_central.db.tables import user_sessions, users
from msp_central.problems import Problem

routes = web.RouteTableDef()

# slug, heading: the pages, in the order the navigation shows them.
# The second factor's QR code: 4 px modules, the standard 4-module quiet zone.
QR_SCALE: Final = 4
QR_BORDER: Final = 4
PAGES: Final[tuple[tuple[str, str], ...]] = (
    ("compliance", "Compliance"),
    ("posture", "Posture"),
    ("appliances", "Appliances"),
    ("escalations", "Escalations and alerts"),
    ("auditors", "Auditors"),
    ("users", "Users and keys"),
)
_TITLES: Final = dict(PAGES)
HOME: Final = "/console/compliance"
MAX_FORM_BYTES: Final = 16 * 1024
_STATIC: Final = resources.files("msp_central.console") / "static"
_TYPES: Final = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".woff2": "font/woff2",
    ".png": "image/png",
}


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("msp_central.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.globals["static"] = static_url
    environment.globals["has_static"] = lambda name: _STATIC.joinpath(name).is_file()
    environment.globals["pages"] = PAGES
    return environment


@cache
def _digest(name: str) -> str:
    target = _STATIC.joinpath(name)
    if not target.is_file():
        return "missing"  # answered with a 404 when asked for
    return hashlib.sha256(target.read_bytes()).hexdigest()[:12]


def static_url(name: str) -> str:
    """An asset's URL, named by its content so a new release is never served
    from a stale cache."""
    return f"/console/static/{name}?v={_digest(name)}"


def render(
    template: str, *, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> web.Response:
    context.setdefault("session", None)
    context.setdefault("page", None)
    text = _environment().get_template(template).render(**context)
    return web.Response(
        status=status, text=text, content_type="text/html", charset="utf-8", headers=headers
    )


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console page of this server only."""
    if value and value.startswith("/console/") and "//" not in value and "\\" not in value:
        return value[:500]
    return HOME


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise Problem(
            "unsupported-media-type", "send the form as application/x-www-form-urlencoded"
        )
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise Problem("body-too-large", f"a form has at most {MAX_FORM_BYTES} bytes")
    body = await request.content.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise Problem("body-too-large", f"a form has at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise Problem("malformed", "the form is not UTF-8") from None
    return {key: values[0] for key, values in fields.items() if values}


def _redirect(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


async def _signed_in(request: web.Request) -> Session:
    """The signed-in user, or a redirect to the sign-in page."""
    session = await load_session(request)
    if session is None:
        target = request.path_qs if request.method == "GET" else HOME
        raise _redirect(f"/console/sign-in?next={_quote(target)}")
    return session


def _quote(value: str) -> str:
    return quote(value, safe="/")


# --- pages ------------------------------------------------------------------------------


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    raise _redirect(HOME)


@routes.get("/console")
@routes.get("/console/")
async def console_home(request: web.Request) -> web.Response:
    raise _redirect(HOME)


@routes.get("/console/static/{name:[A-Za-z0-9_/.-]+}")
async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if ".." in name or name.startswith("/") or suffix not in _TYPES:
        raise Problem("not-found", "no such file")
    target = _STATIC.joinpath(name)
    if not target.is_file():
        raise Problem("not-found", "no such file")
    body = target.read_bytes()
    headers = {"Cache-Control": "public, max-age=31536000, immutable"}
    if request.query.get("v") != _digest(name):
        headers["Cache-Control"] = "no-cache"
    return web.Response(body=body, content_type=_TYPES[suffix], headers=headers)


@routes.get("/console/{page:[a-z]+}")
async def page(request: web.Request) -> web.Response:
    slug = request.match_info["page"]
    if slug in ("account",):
        return await account(request)
    if slug not in _TITLES:
        raise Problem("not-found", f"no console page {slug}")
    session = await _signed_in(request)
    return render("page.html", session=session, page=slug, title=_TITLES[slug])


# --- signing in ---------------------------------------------------------------------------


@routes.get("/console/sign-in")
async def sign_in_form(request: web.Request) -> web.Response:
    if await load_session(request) is not None:
        raise _redirect(_safe_next(request.query.get("next")))
    message = None
    if request.query.get("ended") == "1":
        message = "You are signed out."
    elif session_secret(request) is not None:
        message = "Your session has ended. Sign in again."
    return render(
        "signin.html",
        title="Sign in",
        next=_safe_next(request.query.get("next")),
        email="",
        message=message,
        error=None,
    )


@routes.post("/console/sign-in")
async def sign_in(request: web.Request) -> web.Response:
    check_origin(request)
    form = await _form(request)
    target = _safe_next(form.get("next"))
    raw_email = form.get("email", "")[:254]
    password = form.get("password", "")

    def refuse(error: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
        return render(
            "signin.html",
            status=status,
            headers=headers,
            title="Sign in",
            next=target,
            email=raw_email,
            message=None,
            error=error,
        )

    if not plain_http_allowed(request):
        return refuse(
            "The console signs in only over HTTPS (or plain HTTP on this machine's loopback): "
            "set public_url to the https URL of the proxy in front of this server.",
            403,
        )
    try:
        email = normalise_email(raw_email)
    except Problem:
        return refuse("Enter your e-mail address and password.", 400)
    wait = await throttled(request, email)
    if wait is not None:
        return refuse(
            f"Too many failed attempts. Try again in {_duration(wait)}.",
            429,
            {"Retry-After": str(wait)},
        )
    service = central(request)
    async with read_only(service.engine) as connection:
        user = (
            await connection.execute(
                sa.select(users).where(users.c.email == email, users.c.removed_at.is_(None))
            )
        ).first()
    if not await password_matches(user.password_hash if user else None, password) or user is None:
        await record_failure(request, email, user.partner_id if user else None)
        return refuse("That e-mail address and password do not match an account.", 401)
    await forget_failures(request, email)
    async with write(service.engine) as connection:
        secret = await start_session(
            connection,
            service,
            user_id=user.id,
            second_factor_pending=user.totp_enabled,
            source=client_source(request),
        )
    location = f"/console/second-factor?next={_quote(target)}" if user.totp_enabled else target
    response = web.HTTPSeeOther(location)
    set_cookie(response, request, secret)
    raise response


def _duration(seconds: int) -> str:
    minutes = (seconds + 59) // 60
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


@routes.get("/console/second-factor")
async def second_factor_form(request: web.Request) -> web.Response:
    session = await load_session(request, allow_pending=True)
    if session is None:
        raise _redirect("/console/sign-in")
    if not session.second_factor_pending:
        raise _redirect(_safe_next(request.query.get("next")))
    return render(
        "second_factor.html",
        title="Two-factor code",
        session=session,
        next=_safe_next(request.query.get("next")),
        error=None,
    )


@routes.post("/console/second-factor")
async def second_factor(request: web.Request) -> web.Response:
    session = await load_session(request, allow_pending=True)
    if session is None or not session.second_factor_pending:
        raise _redirect("/console/sign-in")
    form = await _form(request)
    check_csrf(request, session, form.get("csrf_token", ""))
    target = _safe_next(form.get("next"))
    wait = await throttled(request, session.email)
    if wait is not None:
        return render(
            "second_factor.html",
            status=429,
            headers={"Retry-After": str(wait)},
            title="Two-factor code",
            session=session,
            next=target,
            error=f"Too many failed attempts. Try again in {_duration(wait)}.",
        )
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        user = await _locked_user(connection, session.user_id)
        step = totp_step(user.totp_secret or "", form.get("code", ""), now, user.totp_last_step)
        secret = None
        if step is not None:
            await connection.execute(
                sa.update(users).where(users.c.id == user.id).values(totp_last_step=step)
            )
            # A new session id once fully signed in: a cookie planted before
            # the second factor opens nothing.
            await connection.execute(
                sa.update(user_sessions)
                .where(user_sessions.c.id_sha256 == session.id_sha256)
                .values(revoked_at=now)
            )
            secret = await start_session(
                connection,
                service,
                user_id=user.id,
                second_factor_pending=False,
                source=client_source(request),
            )
    if secret is None:
        await record_failure(request, session.email, session.partner_id)
        return render(
            "second_factor.html",
            status=401,
            title="Two-factor code",
            session=session,
            next=target,
            error="That code is not right (or was used already). Try the next one.",
        )
    await forget_failures(request, session.email)
    response = web.HTTPSeeOther(target)
    set_cookie(response, request, secret)
    raise response


@routes.post("/console/sign-out")
async def sign_out(request: web.Request) -> web.Response:
    session = await load_session(request, allow_pending=True)
    if session is not None:
        form = await _form(request)
        check_csrf(request, session, form.get("csrf_token", ""))
        service = central(request)
        async with write(service.engine) as connection:
            await connection.execute(
                sa.update(user_sessions)
                .where(user_sessions.c.id_sha256 == session.id_sha256)
                .values(revoked_at=service.clock())
            )
    response = web.HTTPSeeOther("/console/sign-in?ended=1")
    clear_cookie(response, request)
    raise response


# --- invitations --------------------------------------------------------------------------


@routes.get("/console/invite")
async def invite_form(request: web.Request) -> web.Response:
    return render(
        "invite.html",
        title="Accept your invitation",
        token="",
        error=None,
        min_password=MIN_PASSWORD,
    )


@routes.post("/console/invite")
async def accept(request: web.Request) -> web.Response:
    check_origin(request)
    form = await _form(request)
    token = form.get("token", "").strip()

    def refuse(error: str, status: int) -> web.Response:
        return render(
            "invite.html",
            status=status,
            title="Accept your invitation",
            token=token,
            error=error,
            min_password=MIN_PASSWORD,
        )

    if not plain_http_allowed(request):
        return refuse("The console accepts invitations only over HTTPS.", 403)
    password = form.get("password", "")
    if password != form.get("confirm", ""):
        return refuse("The two passwords differ.", 400)
    try:
        password_hash = await hash_password(password)
    except Problem as problem:
        return refuse(problem.detail[:1].upper() + problem.detail[1:] + ".", 400)
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        invite = await open_invite(connection, token, now)
        if invite is None:
            return refuse(
                "This invitation is unknown, used, withdrawn or expired: ask your administrator "
                "for a new one.",
                400,
            )
        try:
            user_id = await accept_invite(connection, invite, password_hash, now)
        except Problem as problem:
            return refuse(problem.detail, 409)
        await record(
            connection,
            service.root,
            kind="user.joined",
            actor=user_actor(invite.partner_id, user_id),
            data={"user_id": user_id, "invite_id": invite.id, "role": invite.role},
            now=now,
            partner_id=invite.partner_id,
        )
        secret = await start_session(
            connection,
            service,
            user_id=user_id,
            second_factor_pending=False,
            source=client_source(request),
        )
    response = web.HTTPSeeOther(HOME)
    set_cookie(response, request, secret)
    raise response


# --- the account page ---------------------------------------------------------------------


async def account(request: web.Request, **context: Any) -> web.Response:
    session = await _signed_in(request)
    context.setdefault("message", None)
    context.setdefault("error", None)
    context.setdefault("setup", None)
    if context["setup"] is not None:
        context["setup_qr"] = totp_qr(context["setup"].uri)
    status = context.pop("status", 200)
    return render(
        "account.html",
        status=status,
        session=session,
        page="account",
        title="Your account",
        **context,
    )


@dataclass(frozen=True, slots=True)
class QrImage:
    src: str  # an SVG data: URI (the page's CSP allows data: images)
    width: int
    height: int


def totp_qr(uri: str) -> QrImage:
    """The otpauth:// link as a QR code, drawn here (no request leaves the
    server), for the phone's authenticator app to scan."""
    code = segno.make(uri, error="m", micro=False)
    width, height = code.symbol_size(scale=QR_SCALE, border=QR_BORDER)
    src = code.svg_data_uri(scale=QR_SCALE, border=QR_BORDER, dark="#000", light="#fff")
    return QrImage(src, int(width), int(height))


async def _locked_user(connection: AsyncConnection, user_id: str) -> Any:
    """The user's row, locked until the transaction ends: a TOTP step is
    used at most once however many requests race."""
    query = sa.select(users).where(users.c.id == user_id).with_for_update()
    return (await connection.execute(query)).one()


async def _account_form(request: web.Request) -> tuple[Session, dict[str, str]]:
    session = await _signed_in(request)
    form = await _form(request)
    check_csrf(request, session, form.get("csrf_token", ""))
    return session, form


@routes.post("/console/account/totp/start")
async def totp_start(request: web.Request) -> web.Response:
    session, _ = await _account_form(request)
    if session.totp_enabled:
        raise _redirect("/console/account")
    setup = new_totp(session.email)
    service = central(request)
    async with write(service.engine) as connection:
        await connection.execute(
            sa.update(users)
            .where(users.c.id == session.user_id, users.c.totp_enabled.is_(False))
            .values(totp_secret=setup.secret)
        )
    return await account(request, setup=setup)


@routes.post("/console/account/totp/confirm")
async def totp_confirm(request: web.Request) -> web.Response:
    session, form = await _account_form(request)
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        user = await _locked_user(connection, session.user_id)
        if user.totp_enabled or not user.totp_secret:
            raise _redirect("/console/account")
        step = totp_step(user.totp_secret, form.get("code", ""), now, user.totp_last_step)
        if step is not None:
            await connection.execute(
                sa.update(users)
                .where(users.c.id == user.id)
                .values(totp_enabled=True, totp_last_step=step)
            )
            await record(
                connection,
                service.root,
                kind="user.totp_enabled",
                actor=user_actor(session.partner_id, session.user_id),
                data={"user_id": session.user_id},
                now=now,
                partner_id=session.partner_id,
            )
    if step is None:
        again = totp_setup(user.totp_secret, session.email)
        return await account(
            request, setup=again, status=400, error="That code is not right. Try the next one."
        )
    return await account(request, message="Two-factor sign-in is on.")


@routes.post("/console/account/totp/disable")
async def totp_disable(request: web.Request) -> web.Response:
    session, form = await _account_form(request)
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        user = await _locked_user(connection, session.user_id)
        step = totp_step(user.totp_secret or "", form.get("code", ""), now, user.totp_last_step)
        if user.totp_enabled and step is not None:
            await connection.execute(
                sa.update(users)
                .where(users.c.id == user.id)
                .values(totp_enabled=False, totp_secret=None, totp_last_step=None)
            )
            await record(
                connection,
                service.root,
                kind="user.totp_disabled",
                actor=user_actor(session.partner_id, session.user_id),
                data={"user_id": session.user_id},
                now=now,
                partner_id=session.partner_id,
            )
    if step is None:
        return await account(request, status=400, error="That code is not right.")
    return await account(request, message="Two-factor sign-in is off.")


@routes.post("/console/account/sign-out-everywhere")
async def sign_out_everywhere(request: web.Request) -> web.Response:
    session, _ = await _account_form(request)
    service = central(request)
    async with write(service.engine) as connection:
        await end_sessions(connection, session.user_id, service.clock())
    response = web.HTTPSeeOther("/console/sign-in?ended=1")
    clear_cookie(response, request)
    raise response
