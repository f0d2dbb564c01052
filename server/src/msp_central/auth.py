"""Who is asking: partners and admins by bearer key, partner users by
console session, appliances by RFC 9421.

Every handler calls one of :func:`require_partner`, :func:`require_admin` or
:func:`require_appliance` first, and scopes every query by what it returns
(a partner sees only its own sites; an appliance acts only as itself). Once
the caller is known, each also checks the query string against the
operation's declared parameters (:mod:`msp_central.params`).

A console user acts for their partner within their role (viewer, editor,
admin: :mod:`msp_central.console.accounts`), and a state-changing request
made with a session must carry its CSRF token. An API key acts as an admin
of its partner.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import Connection

from msp_central import throttle
from msp_central.console.accounts import Need, allows
from msp_central.console.sessions import SAFE_METHODS, check_csrf, load_session, session_secret
from msp_central.context import Central, central
from msp_central.db.engine import insert_ignore_sync, read_only, run_write, write
from msp_central.db.tables import api_keys, appliances, certificates, request_nonces, sites
from msp_central.params import checked_query
from msp_central.problems import Problem
from msp_protocol.delegation import token_digest
from msp_protocol.errors import ProtocolError
from msp_protocol.httpsig import (
    AuthenticatedRequest,
    HttpRequest,
    averify_headers,
    averify_request,
)
from msp_protocol.keys import VerifyKey

_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,256}")
# The longest key id the throttle keeps (ours are 64 hex digits).
_KEY_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class KeyHolder:
    role: Literal["partner", "admin"]
    partner_id: str | None
    key_prefix: str
    key_id: str
    # Set when a console user signed in asks (key_prefix and key_id are then
    # empty): who, and with which role.
    user_id: str | None = None
    user_role: str | None = None


async def _bearer(request: web.Request) -> KeyHolder:
    header = request.headers.get("Authorization")
    if not header:
        if session_secret(request) is not None:
            return await _session_user(request)
        raise Problem(
            "missing-credentials", "an Authorization: Bearer <api key> header is required"
        )
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    # Keys are printable ASCII; anything else (bytes that were not UTF-8 on
    # the wire reach us as lone surrogates) is no key, before any hashing.
    # It is refused for nothing and names no credential: not counted, as a
    # missing header is not.
    if scheme.lower() != "bearer" or not secret or not _PRINTABLE_ASCII.fullmatch(secret):
        raise Problem("bad-credentials", "Authorization must be Bearer <api key>")
    digest = token_digest(secret)
    # Counted by the key's hash: the throttle never holds a key.
    await throttle.guard(request, "bearer", digest)
    async with read_only(central(request).engine) as connection:
        row = (
            await connection.execute(sa.select(api_keys).where(api_keys.c.key_sha256 == digest))
        ).first()
    unknown = Problem("bad-credentials", "the API key is unknown or revoked")
    # The lookup is by hash, so timing reveals nothing about a stored key;
    # compare_digest keeps the last comparison constant-time all the same.
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        raise await throttle.failed(request, "bearer", digest, unknown)
    # A rotated key is revoked at a time that may still lie ahead.
    if row.revoked_at is not None and row.revoked_at <= central(request).clock():
        # A revoked key still in use is its partner's concern (an admin
        # key's, the administrators'); its prefix is public.
        holder = throttle.Subject(partner_id=row.partner_id, named=f"revoked key {row.prefix}")
        raise await throttle.failed(request, "bearer", digest, unknown, holder)
    throttle.succeeded(request, "bearer", digest)
    return KeyHolder(row.role, row.partner_id, row.prefix, row.id)


async def _session_user(request: web.Request) -> KeyHolder:
    """The console user whose session cookie came with the request; a
    state-changing request must also carry the session's CSRF token."""
    session = await load_session(request)
    if session is None:
        raise Problem("session-expired", "the console session has ended; sign in again")
    if request.method not in SAFE_METHODS:
        check_csrf(request, session, None)
    return KeyHolder(
        "partner", session.partner_id, "", "", user_id=session.user_id, user_role=session.role
    )


async def require_partner(request: web.Request, need: Need | None = None) -> KeyHolder:
    """A partner's key, or one of its console users whose role allows
    ``need`` (by default: reading for GET and HEAD, editing otherwise)."""
    holder = await _bearer(request)
    if holder.role != "partner" or holder.partner_id is None:
        raise Problem("forbidden", "this endpoint is for partner keys")
    if holder.user_role is not None:
        need = need or ("read" if request.method in SAFE_METHODS else "edit")
        if not allows(holder.user_role, need):
            raise Problem(
                "forbidden",
                f"a {holder.user_role} may not do this; it needs the "
                f"{'admin' if need == 'admin' else 'editor'} role",
            )
    checked_query(request)
    return holder


async def require_admin(request: web.Request) -> KeyHolder:
    holder = await _bearer(request)
    if holder.role != "admin":
        raise Problem("forbidden", "this endpoint is for admin keys")
    checked_query(request)
    return holder


async def require_partner_or_admin(request: web.Request) -> KeyHolder:
    holder = await _bearer(request)
    checked_query(request)
    return holder


# --- appliances ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appliance:
    appliance_id: str
    site_id: str
    partner_id: str
    serial: str
    key_id: str
    revoked: bool
    signature: AuthenticatedRequest


def target_uri(request: web.Request) -> str:
    """The URI the appliance signed: behind a reverse proxy, the configured
    public URL (normalised at load) followed by the path and query exactly
    as they arrived; otherwise what the request says it was sent to.

    The signer signs the bytes it sends, so the path is taken raw: the
    decoded path would turn ``/a%2Fb`` into ``/a/b`` and refuse the request."""
    public = central(request).settings.public_url
    if public:
        return public + request.raw_path
    return str(request.url)


async def _current_key(service: Central, key_id: str) -> tuple[Any, bool]:
    """The certificate row through which ``key_id`` speaks for its appliance,
    and whether using it promotes a rotation; (None, False) for any other key.

    The key speaks for its appliance if it holds the current certificate, or
    a rotation from the current one that it has not used yet (from its first
    accepted request on, it is current). A key replaced by a rotation, and
    any older certificate of the key, no longer count."""
    async with read_only(service.engine) as connection:
        rows = (
            await connection.execute(
                sa.select(
                    certificates.c.serial,
                    certificates.c.subject_key,
                    certificates.c.revoked_at,
                    certificates.c.replaces,
                    certificates.c.purpose,
                    appliances.c.id.label("appliance_id"),
                    appliances.c.site_id,
                    appliances.c.revoked_at.label("appliance_revoked_at"),
                    appliances.c.current_serial,
                    sites.c.partner_id,
                )
                .join(appliances, appliances.c.id == certificates.c.appliance_id)
                .join(sites, sites.c.id == appliances.c.site_id)
                .where(certificates.c.key_id == key_id)
            )
        ).all()
    row = next((r for r in rows if r.serial == r.current_serial), None)
    if row is not None:
        return row, False
    row = next((r for r in rows if r.purpose == "rotate" and r.replaces == r.current_serial), None)
    return row, row is not None


async def _signature_failed(
    request: web.Request, found: dict[str, Any], refusal: Problem
) -> Problem:
    """The problem to answer a signature that failed with: counted once its
    key id was read (an unsigned, unparsable or stale request is refused
    for nothing and names no credential), and 429 once its source failed
    too often. An alert about a known appliance's key goes to its partner."""
    if "key_id" not in found:
        return refusal
    row = found.get("row")
    holder = None
    if row is not None:
        holder = throttle.Subject(
            partner_id=str(row.partner_id),
            site_id=str(row.site_id),
            appliance_id=str(row.appliance_id),
            named=f"key {found['key_id'][:16]} of appliance {row.appliance_id}",
        )
    return await throttle.failed(request, "signature", found["key_id"], refusal, holder)


def _is_revoked(row: Any) -> bool:
    return row.revoked_at is not None or row.appliance_revoked_at is not None


def declares_body(request: web.Request) -> bool:
    """Whether the request says it carries a body (a Content-Length above 0).
    A chunked body of unknown length counts as none here: its digest is then
    required, as for any body, by the full check once it is read."""
    return bool(request.content_length)


async def precheck_appliance(
    request: web.Request, *, appliance_id: str | None = None, allow_revoked: bool = False
) -> None:
    """Refuse a request from its headers alone, before its body is read:
    the signature fields parse, are fresh and cover what they must, a
    declared body has a Content-Digest field, the key is current for the
    appliance ``appliance_id`` names, and the signature over the headers
    verifies (:func:`msp_protocol.httpsig.averify_headers`). Nothing is
    recorded: :func:`require_appliance` runs every check again, the digest
    and the nonce included, once the body is in (the key may have been
    revoked while it arrived)."""
    service = central(request)
    found: dict[str, Any] = {}

    async def resolve_key(key_id: str) -> VerifyKey | None:
        # The key id is read: from here on a failure counts against it, and
        # a key id failing too often from this source is not looked up.
        found["key_id"] = key_id[:_KEY_ID_CHARS]
        await throttle.guard(request, "signature", found["key_id"])
        row, _promote = await _current_key(service, key_id)
        if row is None:
            return None
        found["row"] = row
        return VerifyKey.from_hex(row.subject_key)

    http = HttpRequest.build(request.method, target_uri(request), request.headers.items())
    try:
        await averify_headers(
            http,
            has_body=declares_body(request),
            resolve_key=resolve_key,
            now=service.clock(),
            limits=service.limits,
        )
    except ProtocolError as exc:
        raise await _signature_failed(request, found, Problem.from_protocol(exc)) from None
    row = found["row"]
    if appliance_id is not None and appliance_id != str(row.appliance_id):
        raise Problem("wrong-appliance", "the request is signed by another appliance's key")
    if _is_revoked(row) and not allow_revoked:
        raise Problem("appliance-revoked", f"certificate {row.serial} is revoked")


async def require_appliance(
    request: web.Request,
    body: bytes,
    *,
    appliance_id: str | None = None,
    allow_revoked: bool = False,
    defer_nonce: bool = False,
) -> Appliance:
    """Verify the request's RFC 9421 signature and return the appliance whose
    current key signed it. ``appliance_id`` (from the path) must be that
    appliance. A revoked appliance is refused unless ``allow_revoked`` (it
    must still be able to fetch the revocation list that names it).

    With ``defer_nonce`` the nonce is not recorded here: the caller records
    it (:func:`record_nonce`) in the transaction that carries the request's
    effect, or before answering without one. The audit sync does this so a
    batch costs one write transaction, not two."""
    service = central(request)
    found: dict[str, Any] = {}

    async def resolve_key(key_id: str) -> VerifyKey | None:
        found["key_id"] = key_id[:_KEY_ID_CHARS]
        row, promote = await _current_key(service, key_id)
        if row is None:
            return None
        if promote:
            found["promote"] = row
        found["row"] = row
        return VerifyKey.from_hex(row.subject_key)

    async def nonce_seen(key_id: str, nonce: str, created: int) -> bool:
        if defer_nonce:
            return False
        row = {"key_id": key_id, "nonce": nonce, "created": created}
        return not await run_write(
            service.engine, lambda connection: insert_ignore_sync(connection, request_nonces, row)
        )

    http = HttpRequest.build(request.method, target_uri(request), request.headers.items())
    try:
        signature = await averify_request(
            http,
            body,
            resolve_key=resolve_key,
            nonce_seen=nonce_seen,
            now=service.clock(),
            limits=service.limits,
        )
    except ProtocolError as exc:
        raise await _signature_failed(request, found, Problem.from_protocol(exc)) from None
    throttle.succeeded(request, "signature", found["key_id"])
    row = found["row"]
    caller = Appliance(
        appliance_id=str(row.appliance_id),
        site_id=str(row.site_id),
        partner_id=str(row.partner_id),
        serial=str(row.serial),
        key_id=signature.key_id,
        revoked=_is_revoked(row),
        signature=signature,
    )
    if appliance_id is not None and appliance_id != caller.appliance_id:
        raise Problem("wrong-appliance", "the request is signed by another appliance's key")
    if caller.revoked and not allow_revoked:
        raise Problem("appliance-revoked", f"certificate {caller.serial} is revoked")
    checked_query(request)
    if "promote" in found and not caller.revoked:
        # The rotated key's first request: from now on it is the current one.
        async with write(service.engine) as connection:
            await connection.execute(
                sa.update(appliances)
                .where(
                    appliances.c.id == row.appliance_id, appliances.c.current_serial == row.replaces
                )
                .values(current_serial=row.serial)
            )
    return caller


def record_nonce(connection: Connection, caller: Appliance) -> None:
    """Record a deferred nonce inside a write transaction (run_write); a nonce
    already seen is a replay, and the transaction is rolled back."""
    signature = caller.signature
    row = {"key_id": signature.key_id, "nonce": signature.nonce, "created": signature.created}
    if not insert_ignore_sync(connection, request_nonces, row):
        raise Problem("replayed-nonce", f"nonce {signature.nonce[:32]} was already used")


async def commit_nonce(request: web.Request, caller: Appliance) -> None:
    """Record a deferred nonce in a transaction of its own."""
    await run_write(central(request).engine, lambda connection: record_nonce(connection, caller))
