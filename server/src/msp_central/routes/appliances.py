"""The appliance API: enrollment, certificates, revocations, heartbeat,
config bundles, witnessed audit sync, evidence and escalations.

Everything but enrollment is authenticated with RFC 9421 signatures by the
appliance's current key (see :mod:`msp_central.auth`); enrollment is
authenticated by the one-time token and the request's proof of possession.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central import metrics, throttle
from msp_central.api_models import (
    CertificateIn,
    CertificateOut,
    EnrollIn,
    EnrollOut,
    EscalationAccepted,
    EvidenceAccepted,
    HeartbeatIn,
    HeartbeatOut,
)
from msp_central.auth import Appliance, commit_nonce, record_nonce
from msp_central.catalogue import Tier
from msp_central.context import (
    Central,
    central,
    json_response,
    parse_body,
    parse_json_object,
    read_body,
)
from msp_central.db.engine import insert_ignore, insert_rows, read_only, run_write, write
from msp_central.db.tables import (
    appliances,
    audit_checkpoints,
    audit_entries,
    audit_logs,
    certificates,
    config_bundles,
    control_runbook_mapping,
    controls,
    enrollment_tokens,
    escalations,
    evidence,
    frameworks,
    request_nonces,
    runbooks,
)
from msp_central.events import escalation_event, store_alert
from msp_central.evidence_heads import advance, head_of, reason_of_observed, settle
from msp_central.params import checked_query
from msp_central.problems import Problem
from msp_central.queries import (
    current_revocations,
    effective_config,
    get_partner,
    get_site,
    lock_revocations,
    new_id,
    publish_revocations,
    record_alert,
    revocation_list,
)
from msp_central.uploads import signed_body
from msp_protocol.bundle import BundleKind, ConfigBundle, Escalation, sign_bundle
from msp_protocol.canonical import canonicalize
from msp_protocol.delegation import (
    DelegationCertificate,
    DelegationRequest,
    Purpose,
    VerifiedDelegation,
    check_delegation,
    check_delegation_request,
    issue_delegation,
    token_digest,
)
from msp_protocol.dsse import Envelope, unverified_payload
from msp_protocol.errors import EvidenceError, MalformedError, ProtocolError
from msp_protocol.evidence import check_evidence, recorded_evidence
from msp_protocol.keys import VerifyKey
from msp_protocol.log import LogEntry, make_receipt, parse_entry
from msp_protocol.merkle import EMPTY_ROOT
from msp_protocol.result import Result
from msp_protocol.sync import (
    MAX_BATCH_ENTRIES,
    AlreadyWitnessed,
    SyncAccepted,
    SyncRequest,
    SyncResponse,
    WitnessState,
    check_sync,
    failure_details,
)

routes = web.RouteTableDef()


def _small(service: Central) -> int:
    """The body limit of every appliance route but sync and evidence."""
    return service.settings.max_body_bytes


async def _alert(service: Central, caller: Appliance, code: str, detail: str) -> None:
    await record_alert(
        service.engine,
        appliance_id=caller.appliance_id,
        site_id=caller.site_id,
        code=code,
        detail=detail,
        now=service.clock(),
    )


# --- enrollment and certificates ------------------------------------------------------


def _refused(result: Result[Any]) -> Problem:
    code = "stale-request" if "stale-request" in result.codes else "delegation-request-refused"
    return Problem(code, result.describe())


def _store_certificate(
    envelope: Envelope, appliance_id: str, purpose: str, now: datetime, replaces: str | None
) -> dict[str, Any]:
    certificate = DelegationCertificate.from_json(envelope.payload_bytes())
    return {
        "serial": certificate.serial,
        "appliance_id": appliance_id,
        "key_id": certificate.subject_key_id,
        "subject_key": certificate.subject_key,
        "envelope": envelope.canonical_bytes().decode(),
        "not_before": certificate.not_before,
        "not_after": certificate.not_after,
        "issued_at": now,
        "purpose": purpose,
        "replaces": replaces,
    }


@routes.post("/api/v1/enroll")
async def enroll(request: web.Request) -> web.Response:
    """First certificate for a new appliance: a one-time token of the site,
    and a request signed by the key to certify (proof of possession). A
    retry with the same token and key (an answer lost on the way) gets the
    certificate issued the first time."""
    checked_query(request)  # none declared: any is refused
    body = parse_body(await read_body(request), EnrollIn, request)
    # Counted by the token's hash: the throttle never holds a token.
    digest = token_digest(body.token)
    await throttle.guard(request, "enrollment", digest)
    try:
        response = await _enroll(request, body, digest)
    except Problem as problem:
        if problem.code != "bad-enrollment-token":
            raise
        raise await throttle.failed(request, "enrollment", digest, problem) from None
    throttle.succeeded(request, "enrollment", digest)
    return response


async def _enroll(request: web.Request, body: EnrollIn, digest: str) -> web.Response:
    service = central(request)
    now = service.clock()
    # The token is the credential: without a live one the request is not
    # looked at (no signature work for strangers, and nothing learnt).
    async with read_only(service.engine) as connection:  # no write lock for unknown tokens
        known = (
            await connection.execute(
                sa.select(enrollment_tokens.c.expires_at).where(
                    enrollment_tokens.c.token_sha256 == digest
                )
            )
        ).first()
    if known is None or known.expires_at <= now:
        raise Problem("bad-enrollment-token", "the enrollment token is unknown or expired")
    checked = check_delegation_request(
        body.request,
        purpose="enroll",
        audience=service.root.key_id,
        now=now,
        enrollment_token=body.token,
        limits=service.limits,
    )
    if not checked.ok:
        raise _refused(checked)
    asked = checked.unwrap().request
    subject = VerifyKey.from_hex(asked.subject_key)
    async with write(service.engine) as connection:
        token = (
            await connection.execute(
                sa.select(enrollment_tokens)
                .where(enrollment_tokens.c.token_sha256 == digest)
                .with_for_update()
            )
        ).first()
        if token is None or token.expires_at <= now:
            raise Problem("bad-enrollment-token", "the enrollment token is unknown or expired")
        if token.revoked_at is not None and token.used_at is None:
            raise Problem("bad-enrollment-token", "the enrollment token was revoked")
        if token.used_at is not None:
            first = (
                await connection.execute(
                    sa.select(certificates.c.envelope).where(
                        certificates.c.appliance_id == token.appliance_id,
                        certificates.c.key_id == subject.key_id,
                        certificates.c.purpose == "enroll",
                    )
                )
            ).first()
            if first is None:
                raise Problem("bad-enrollment-token", "the enrollment token was already used")
            # A retry of the same enrollment: the first answer, again.
            return json_response(
                EnrollOut(
                    appliance_id=token.appliance_id,
                    site_id=token.site_id,
                    certificate=Envelope.from_json(first.envelope.encode()),
                )
            )
        await _record_request_nonce(connection, subject.key_id, asked)
        appliance_id = new_id("appliance")
        envelope = issue_delegation(
            service.root,
            subject=subject,
            appliance_id=appliance_id,
            site_id=token.site_id,
            scopes=asked.scopes,
            not_before=now.replace(microsecond=0),
            lifetime=service.settings.certificate_lifetime,
            limits=service.limits,
        )
        row = _store_certificate(envelope, appliance_id, "enroll", now, None)
        await connection.execute(
            sa.insert(appliances).values(
                id=appliance_id, site_id=token.site_id, created_at=now, current_serial=row["serial"]
            )
        )
        await connection.execute(sa.insert(certificates).values(**row))
        await connection.execute(
            sa.insert(audit_logs).values(
                appliance_id=appliance_id,
                size=0,
                root=EMPTY_ROOT.hex(),
                nodes=[],
                checkpoint_sha256=None,
                updated_at=now,
            )
        )
        await connection.execute(
            sa.update(enrollment_tokens)
            .where(enrollment_tokens.c.token_sha256 == token.token_sha256)
            .values(used_at=now, appliance_id=appliance_id)
        )
    return json_response(
        EnrollOut(appliance_id=appliance_id, site_id=token.site_id, certificate=envelope),
        status=201,
    )


@routes.post("/api/v1/appliances/{appliance_id}/certificates")
@signed_body(_small)
async def renew_or_rotate(request: web.Request, caller: Appliance, raw: bytes) -> web.Response:
    """Renew (same key, new window) or rotate (new key, signed by both). The
    HTTP request is signed by the current key; so is the delegation request.
    A certificate that expired while the appliance was offline may still be
    renewed: the key was never revoked, and it proves possession."""
    service = central(request)
    body = parse_body(raw, CertificateIn, request)
    try:
        asked = DelegationRequest.from_wire(unverified_payload(body.request, limits=service.limits))
    except MalformedError as exc:
        raise Problem.from_protocol(exc) from None
    if asked.purpose == "enroll":
        raise Problem("delegation-request-refused", "enroll at /api/v1/enroll with a token")
    purpose: Purpose = asked.purpose
    async with write(service.engine) as connection:
        # One certificate change per appliance at a time, decided on the
        # state as it is under the lock.
        appliance = (
            await connection.execute(
                sa.select(appliances.c.current_serial)
                .where(appliances.c.id == caller.appliance_id)
                .with_for_update()
            )
        ).one()
        now = service.clock()
        if appliance.current_serial != caller.serial:
            raise Problem("conflict", "the appliance's certificate changed meanwhile; retry")
        current_row = await _certificate_row(connection, caller.serial)
        if asked.current_serial is not None and asked.current_serial == current_row.replaces:
            # The answer to this renewal was lost: the certificate it issued
            # is the current one. Check the request against the certificate
            # it names, and answer what the first attempt got.
            replaced = _certificate_of(await _certificate_row(connection, asked.current_serial))
            checked = check_delegation_request(
                body.request,
                purpose=purpose,
                audience=service.root.key_id,
                now=now,
                current=replaced,
                limits=service.limits,
            )
            if not checked.ok or current_row.purpose != purpose:
                raise _refused(checked)
            return json_response(
                CertificateOut(certificate=Envelope.from_json(current_row.envelope.encode()))
            )
        current = _certificate_of(current_row)
        checked = check_delegation_request(
            body.request,
            purpose=purpose,
            audience=service.root.key_id,
            now=now,
            current=current,
            limits=service.limits,
        )
        if not checked.ok:
            raise _refused(checked)
        if not set(asked.scopes) <= set(current.scopes):
            raise Problem("scope-not-granted", "a renewal or rotation cannot widen the scopes")
        subject = VerifyKey.from_hex(asked.subject_key)
        if purpose == "rotate":
            issued = (
                await connection.execute(
                    sa.select(certificates.c.envelope).where(
                        certificates.c.appliance_id == caller.appliance_id,
                        certificates.c.replaces == caller.serial,
                        certificates.c.purpose == "rotate",
                        certificates.c.key_id == subject.key_id,
                    )
                )
            ).first()
            if issued is not None:  # a retried rotation: the certificate already issued
                return json_response(
                    CertificateOut(certificate=Envelope.from_json(issued.envelope.encode()))
                )
        await _record_request_nonce(connection, caller.key_id, asked)
        envelope = issue_delegation(
            service.root,
            subject=subject,
            appliance_id=caller.appliance_id,
            site_id=caller.site_id,
            scopes=asked.scopes,
            not_before=now.replace(microsecond=0),
            lifetime=service.settings.certificate_lifetime,
            limits=service.limits,
        )
        row = _store_certificate(envelope, caller.appliance_id, purpose, now, caller.serial)
        await connection.execute(sa.insert(certificates).values(**row))
        if purpose == "renew":
            await connection.execute(
                sa.update(appliances)
                .where(appliances.c.id == caller.appliance_id)
                .values(current_serial=row["serial"])
            )
    return json_response(CertificateOut(certificate=envelope), status=201)


async def _certificate_row(connection: AsyncConnection, serial: str) -> sa.Row[Any]:
    return (
        await connection.execute(sa.select(certificates).where(certificates.c.serial == serial))
    ).one()


def _certificate_of(row: sa.Row[Any]) -> DelegationCertificate:
    return DelegationCertificate.from_json(
        Envelope.from_json(row.envelope.encode()).payload_bytes()
    )


async def _record_request_nonce(
    connection: AsyncConnection, key_id: str, request: DelegationRequest
) -> None:
    """A delegation request is good once: its nonce joins the request nonces,
    purged like them once its freshness window has passed."""
    row = {
        "key_id": key_id,
        "nonce": "request:" + request.nonce,
        "created": int(request.created.timestamp()),
    }
    if not await insert_ignore(connection, request_nonces, [row]):
        raise Problem("delegation-request-refused", "this delegation request was already used")


@routes.get("/api/v1/revocations")
@signed_body(_small, allow_revoked=True)
async def get_revocations(request: web.Request, _caller: Appliance, _raw: bytes) -> web.Response:
    """The signed revocation list. A revoked appliance may fetch it: that is
    how it learns to stop signing."""
    service = central(request)
    async with read_only(service.engine) as connection:
        current = await current_revocations(connection)
    if current is None:
        async with write(service.engine) as connection:
            await lock_revocations(connection)
            current = await current_revocations(connection)
            if current is None:  # the first list: version 1, empty
                await publish_revocations(connection, service.root, service.clock())
                current = await current_revocations(connection)
    assert current is not None
    etag = f'"revocations-{current[0]}"'
    if _matches(request, etag):
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(
        body=current[1].encode(), content_type="application/json", headers={"ETag": etag}
    )


@routes.post("/api/v1/appliances/{appliance_id}/heartbeat")
@signed_body(_small)
async def heartbeat(request: web.Request, caller: Appliance, raw: bytes) -> web.Response:
    service = central(request)
    beat = parse_body(raw, HeartbeatIn, request)
    now = service.clock()
    async with write(service.engine) as connection:
        await connection.execute(
            sa.update(appliances)
            .where(appliances.c.id == caller.appliance_id)
            .values(last_seen_at=now, heartbeat=beat.model_dump(mode="json", exclude_none=True))
        )
        witnessed = (
            await connection.execute(
                sa.select(audit_logs.c.size).where(audit_logs.c.appliance_id == caller.appliance_id)
            )
        ).scalar_one()
    return json_response(
        HeartbeatOut(
            server_time=now,
            clock_skew_seconds=round((beat.clock - now).total_seconds(), 3),
            witnessed_size=int(witnessed),
        )
    )


def _matches(request: web.Request, etag: str) -> bool:
    """If-None-Match names this ETag (weak comparison, lists, ``*``)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


# --- signed config bundles ---------------------------------------------------------------


async def bundle_content(
    connection: AsyncConnection, kind: BundleKind, site_id: str
) -> dict[str, Any]:
    site = await get_site(connection, site_id)
    config = await effective_config(
        connection, site, await get_partner(connection, site.partner_id)
    )
    if kind == BundleKind.SITE_CONFIG:
        return config.model_dump(mode="json")
    if kind == BundleKind.RUNBOOKS:
        query = sa.select(runbooks).order_by(runbooks.c.id)
        if config.tier == Tier.BASIC:
            query = query.where(runbooks.c.tier == Tier.BASIC.value)
        rows = (await connection.execute(query)).all()
        return {
            "tier": config.tier.value,
            "runbooks": [
                {
                    "id": r.id,
                    "title": r.title,
                    "tier": r.tier,
                    "check": r.check_name,
                    "l1_action": r.l1_action,
                }
                for r in rows
            ],
        }
    chosen = config.frameworks
    framework_rows = (
        await connection.execute(
            sa.select(frameworks).where(frameworks.c.id.in_(chosen)).order_by(frameworks.c.position)
        )
    ).all()
    control_rows = (
        await connection.execute(
            sa.select(controls)
            .where(controls.c.framework_id.in_(chosen))
            .order_by(controls.c.framework_id, controls.c.position)
        )
    ).all()
    mapping_rows = (
        await connection.execute(
            sa.select(control_runbook_mapping)
            .where(control_runbook_mapping.c.framework_id.in_(chosen))
            .order_by(control_runbook_mapping.c.runbook_id)
        )
    ).all()
    mapped: dict[tuple[str, str], list[str]] = {}
    for m in mapping_rows:
        mapped.setdefault((m.framework_id, m.control_id), []).append(m.runbook_id)
    return {
        "frameworks": [
            {
                "id": f.id,
                "name": f.name,
                "edition": f.edition,
                "controls": [
                    {
                        "id": c.control_id,
                        "title": c.title,
                        "runbooks": mapped.get((c.framework_id, c.control_id), []),
                    }
                    for c in control_rows
                    if c.framework_id == f.id
                ],
            }
            for f in framework_rows
        ]
    }


@routes.get("/api/v1/appliances/{appliance_id}/bundles/{kind}")
@signed_body(_small)
async def get_bundle(request: web.Request, caller: Appliance, _raw: bytes) -> web.Response:
    """The appliance's current signed bundle of ``kind``. A new version is
    signed when the content changed or the last one passed half its life;
    versions only go up. ``If-None-Match`` with the current ETag gets 304."""
    service = central(request)
    try:
        kind = BundleKind(request.match_info["kind"])
    except ValueError:
        raise Problem("not-found", f"no bundle kind {request.match_info['kind'][:32]}") from None
    for _attempt in range(3):
        now = service.clock()
        try:
            async with write(service.engine) as connection:
                content = await bundle_content(connection, kind, caller.site_id)
                digest = hashlib.sha256(canonicalize(content)).hexdigest()
                latest = (
                    await connection.execute(
                        sa.select(config_bundles)
                        .where(
                            config_bundles.c.site_id == caller.site_id,
                            config_bundles.c.kind == kind.value,
                        )
                        .order_by(config_bundles.c.version.desc())
                        .limit(1)
                    )
                ).first()
                lifetime = service.settings.bundle_lifetime
                fresh = (
                    latest is not None
                    and latest.content_sha256 == digest
                    and latest.expires_at - now > lifetime / 2
                )
                if latest is not None and fresh:
                    version, text = int(latest.version), str(latest.envelope)
                else:
                    version = int(latest.version) + 1 if latest is not None else 1
                    envelope = sign_bundle(
                        service.root,
                        ConfigBundle(
                            kind=kind,
                            site_id=caller.site_id,
                            version=version,
                            issued_at=now,
                            expires_at=now + lifetime,
                            content=content,
                        ),
                    )
                    text = envelope.canonical_bytes().decode()
                    await connection.execute(
                        sa.insert(config_bundles).values(
                            site_id=caller.site_id,
                            kind=kind.value,
                            version=version,
                            content_sha256=digest,
                            envelope=text,
                            issued_at=now,
                            expires_at=now + lifetime,
                        )
                    )
            break
        except IntegrityError:
            continue  # another replica signed this version first: read it
    else:
        raise Problem("conflict", "bundle versions kept changing; retry")
    etag = f'"{kind.value}-{version}"'
    if _matches(request, etag):
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=text.encode(), content_type="application/json", headers={"ETag": etag})


# --- witnessed audit sync ----------------------------------------------------------------


async def _signer_delegation(
    connection: AsyncConnection,
    service: Central,
    caller: Appliance,
    envelope: Envelope,
    *,
    lock: bool = False,
) -> tuple[VerifiedDelegation, sa.Row[Any]]:
    """The certificate of the key that signed ``envelope``: one of this
    appliance's (a superseded key's too: its old signatures stay valid).
    Expired certificates are accepted and flagged (``signed_after_expiry``).
    With ``lock``, a revocation of it waits for this transaction."""
    key_id = envelope.signatures[0].keyid
    query = (
        sa.select(certificates)
        .where(
            certificates.c.appliance_id == caller.appliance_id,
            certificates.c.key_id == key_id,
        )
        .order_by(certificates.c.issued_at.desc())
        .limit(1)
    )
    row = (await connection.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise Problem(
            "unknown-key", f"key {key_id} was never delegated to this appliance", status=422
        )
    verified = check_delegation(
        Envelope.from_json(row.envelope.encode()),
        roots=[service.root.verify_key],
        at=service.clock(),
        appliance_id=caller.appliance_id,
        allow_expired=True,
        limits=service.limits,
    )
    return verified.unwrap(), row


@routes.post("/api/v1/appliances/{appliance_id}/audit/sync")
@signed_body(lambda service: service.settings.max_sync_body_bytes, defer_nonce=True)
async def audit_sync(request: web.Request, caller: Appliance, raw: bytes) -> web.Response:
    """Witness a batch of the appliance's audit log (design §4): check it
    against what was witnessed, store entries and checkpoint atomically and
    answer with a receipt. 409 ``stale-size`` tells the appliance where the
    server's log ends; any verification failure is a 422 and a security
    alert, and stores nothing."""
    service = central(request)
    try:
        sync = _parse_sync(raw, request)
    except Problem:
        await commit_nonce(request, caller)
        raise
    try:
        return await _witness(service, caller, sync, request.app)
    except Problem as problem:
        if problem.code in ("replayed-nonce", "conflict"):
            raise
        if problem.status < 500:  # a verdict on the batch, not a busy server
            metrics.witness_refused(request.app, "audit", problem.code)
        # The nonce is spent whatever the verdict (a replay is refused as one).
        await commit_nonce(request, caller)
        # Anything wrong inside an authenticated batch (not a stale size,
        # which is a normal race) is what tampering looks like.
        if problem.status in (400, 422):
            await _alert(service, caller, problem.code, problem.detail)
        raise
    except ProtocolError as exc:
        refusal = Problem.from_protocol(exc)
        metrics.witness_refused(request.app, "audit", refusal.code)
        await commit_nonce(request, caller)
        await _alert(service, caller, exc.code, str(exc))
        raise refusal from None


def _parse_sync(raw: bytes, request: web.Request) -> SyncRequest:
    value = parse_json_object(raw, request)
    # An oversized batch is refused by its count, with its own problem, so
    # the appliance knows to split it rather than that it is malformed.
    if isinstance(value.get("entries"), list):
        count = len(value["entries"])
        if count > MAX_BATCH_ENTRIES:
            raise Problem("batch-too-large", f"batch of {count} entries, limit {MAX_BATCH_ENTRIES}")
    try:
        return SyncRequest.from_wire(value)
    except MalformedError as exc:
        raise Problem.from_protocol(exc) from None


async def _witness(
    service: Central, caller: Appliance, sync: SyncRequest, app: web.Application
) -> web.Response:
    """Check the batch against a snapshot of the witness state, outside any
    write transaction (the check is the expensive part), then commit only if
    the state is still the one checked against; if another request moved it
    meanwhile, check again."""
    for _attempt in range(5):
        async with read_only(service.engine) as connection:
            delegation, cert_row = await _signer_delegation(
                connection, service, caller, sync.checkpoint
            )
            revocations = await revocation_list(connection)
            witnessed = await _witness_state(connection, caller.appliance_id)
            generation, state = witnessed.generation, witnessed.state
            stored = await _stored_leaves(
                connection, caller.appliance_id, generation, sync, state.size
            )
            windows = await _key_windows(connection, caller.appliance_id, cert_row.key_id)
        # ~10 ms of CPU a full batch: off the event loop, so that other
        # requests (and this server's database round trips) go on meanwhile.
        result = await asyncio.to_thread(
            functools.partial(
                check_sync,
                sync,
                state=state,
                delegation=delegation,
                stored_leaf=stored.__getitem__,
                revocations=revocations,
                limits=service.limits,
            )
        )
        if not result.ok:
            failure = result.failures[0]
            raise Problem.from_protocol(failure, **failure_details(failure))
        outcome = result.unwrap()
        if isinstance(outcome, AlreadyWitnessed) or (
            state.size > 0 and outcome.state.size == state.size
        ):
            # The checkpoint already cosigned, or the same tree signed again:
            # nothing to store; the receipt for that tree stands.
            await run_write(service.engine, lambda connection: record_nonce(connection, caller))
            return json_response(await _stored_receipt(service, caller, generation, state.size))
        assert isinstance(outcome, SyncAccepted)
        now = service.clock()
        receipt = make_receipt(service.root, outcome.checkpoint, now)
        # Flagged for review, never refused: signed under an expired
        # certificate, or at a time (the appliance's clock) no certificate
        # of its key covered, such as offline between expiry and a renewal
        # that reached the server before this batch did.
        signed_at, skew = outcome.checkpoint.checkpoint.ts, service.limits.clock_skew
        late = delegation.signed_after_expiry or not any(
            start - skew <= signed_at <= end + skew for start, end in windows
        )
        if await _commit(service, caller, witnessed, outcome, receipt, cert_row.serial, late, now):
            metrics.audit_entries_ingested(app, len(outcome.records))
            return json_response(SyncResponse(size=outcome.state.size, receipt=receipt))
    raise Problem("conflict", "the log kept changing during this sync; retry")


async def _key_windows(
    connection: AsyncConnection, appliance_id: str, key_id: str
) -> list[tuple[datetime, datetime]]:
    """The validity windows of every certificate issued to this key."""
    rows = await connection.execute(
        sa.select(certificates.c.not_before, certificates.c.not_after).where(
            certificates.c.appliance_id == appliance_id, certificates.c.key_id == key_id
        )
    )
    return [(row.not_before, row.not_after) for row in rows]


async def _witness_state(connection: AsyncConnection, appliance_id: str) -> _Witnessed:
    """The generation of the log being witnessed and its witness state."""
    log = (
        await connection.execute(
            sa.select(audit_logs).where(audit_logs.c.appliance_id == appliance_id)
        )
    ).one()
    return _Witnessed(
        int(log.generation),
        WitnessState(
            size=int(log.size),
            root=log.root,
            nodes=tuple(log.nodes),
            checkpoint_sha256=log.checkpoint_sha256,
        ),
    )


async def _stored_leaves(
    connection: AsyncConnection, appliance_id: str, generation: int, sync: SyncRequest, size: int
) -> dict[int, bytes]:
    """The leaf hashes held for the indices this batch resends."""
    end = min(size, sync.old_size + len(sync.entries))
    if sync.old_size >= end:
        return {}
    rows = await connection.execute(
        sa.select(audit_entries.c.idx, audit_entries.c.leaf_hash).where(
            audit_entries.c.appliance_id == appliance_id,
            audit_entries.c.generation == generation,
            audit_entries.c.idx >= sync.old_size,
            audit_entries.c.idx < end,
        )
    )
    return {int(row.idx): bytes(row.leaf_hash) for row in rows}


async def _stored_receipt(
    service: Central, caller: Appliance, generation: int, size: int
) -> SyncResponse:
    async with read_only(service.engine) as connection:
        text = (
            await connection.execute(
                sa.select(audit_checkpoints.c.receipt).where(
                    audit_checkpoints.c.appliance_id == caller.appliance_id,
                    audit_checkpoints.c.generation == generation,
                    audit_checkpoints.c.size == size,
                )
            )
        ).scalar_one()
    return SyncResponse(size=size, receipt=Envelope.from_json(text.encode()))


@dataclass(frozen=True, slots=True)
class _Witnessed:
    """The witness state a batch was checked against, in its generation."""

    generation: int
    state: WitnessState


async def _commit(
    service: Central,
    caller: Appliance,
    witnessed: _Witnessed,
    outcome: SyncAccepted,
    receipt: Envelope,
    serial: str,
    signed_after_expiry: bool,
    now: datetime,
) -> bool:
    """Store entries, checkpoint, receipt and the new state in one
    transaction, if the state is still ``checked`` and the signing
    certificate was not revoked below the new size meanwhile; False (check
    again) otherwise (a new generation approved meanwhile is such a
    change). Evidence that arrived before its entry is checked against the
    entry now."""
    new, checked, generation = outcome.state, witnessed.state, witnessed.generation

    def store(connection: Connection) -> bool:
        record_nonce(connection, caller)  # deferred by audit_sync: one transaction a batch
        cutoff = (
            sa.select(certificates.c.cutoff_size)
            .where(certificates.c.serial == serial, certificates.c.revoked_at.is_not(None))
            .scalar_subquery()
        )
        current = connection.execute(
            sa.select(
                audit_logs.c.generation,
                audit_logs.c.size,
                audit_logs.c.checkpoint_sha256,
                cutoff.label("cutoff"),
            )
            .where(audit_logs.c.appliance_id == caller.appliance_id)
            .with_for_update(of=audit_logs)
        ).one()
        if (current.generation, current.size, current.checkpoint_sha256) != (
            generation,
            checked.size,
            checked.checkpoint_sha256,
        ):
            raise _Moved
        if current.cutoff is not None and new.size > int(current.cutoff):
            raise _Moved
        insert_rows(
            connection,
            audit_entries,
            ("appliance_id", "generation", "idx", "leaf_hash", "raw"),
            [
                (
                    caller.appliance_id,
                    generation,
                    checked.size + offset,
                    record.leaf_hash,
                    record.raw,
                )
                for offset, record in enumerate(outcome.records)
            ],
        )
        connection.execute(
            sa.insert(audit_checkpoints).values(
                appliance_id=caller.appliance_id,
                generation=generation,
                size=new.size,
                root=new.root,
                checkpoint=outcome.checkpoint.envelope.canonical_bytes().decode(),
                receipt=receipt.canonical_bytes().decode(),
                serial=serial,
                signed_after_expiry=signed_after_expiry,
                received_at=now,
            )
        )
        connection.execute(
            sa.update(audit_logs)
            .where(audit_logs.c.appliance_id == caller.appliance_id)
            .values(
                size=new.size,
                root=new.root,
                nodes=list(new.nodes),
                checkpoint_sha256=new.checkpoint_sha256,
                updated_at=now,
            )
        )
        _check_pending_evidence(connection, caller, witnessed, outcome, now)
        return True

    try:
        return await run_write(service.engine, store)
    except _Moved:  # rolled back, the nonce with it: check again
        return False


class _Moved(Exception):
    """The witness state or the signer's revocation changed since the check."""


def _check_pending_evidence(
    connection: Connection,
    caller: Appliance,
    witnessed: _Witnessed,
    outcome: SyncAccepted,
    now: datetime,
) -> None:
    """Evidence submitted before its audit entry was witnessed: compare each
    bundle with the entry that now arrived, and record the verdict (a
    mismatch is a security alert). Only bundles of this generation: one still
    waiting in an earlier generation's log waits for good."""
    start = witnessed.state.size
    pending = connection.execute(
        sa.select(
            evidence.c.bundle_id,
            evidence.c.check_id,
            evidence.c.log_index,
            evidence.c.payload_sha256,
        ).where(
            evidence.c.appliance_id == caller.appliance_id,
            evidence.c.log_generation == witnessed.generation,
            evidence.c.in_log.is_(None),
            evidence.c.log_index >= start,
            evidence.c.log_index < outcome.state.size,
        )
    ).all()
    for bundle in pending:
        record = outcome.records[int(bundle.log_index) - start]
        matches = _records_bundle(record.entry, bundle.bundle_id, bundle.payload_sha256)
        connection.execute(
            sa.update(evidence)
            .where(
                evidence.c.appliance_id == caller.appliance_id,
                evidence.c.bundle_id == bundle.bundle_id,
            )
            .values(in_log=matches)
        )
        settle(connection, caller.appliance_id, bundle.check_id, bundle.bundle_id, matches)
        if not matches:
            detail = (
                f"witnessed audit entry {bundle.log_index} does not record "
                f"evidence bundle {bundle.bundle_id} as it was submitted"
            )
            store_alert(
                connection,
                appliance_id=caller.appliance_id,
                site_id=caller.site_id,
                code="evidence-not-in-log",
                detail=detail,
                now=now,
            )


def _records_bundle(entry: LogEntry, bundle_id: str, digest: str) -> bool:
    """Whether an audit entry is the one recording this evidence bundle."""
    try:
        data = recorded_evidence(entry)
    except EvidenceError:
        return False
    return data.bundle_id == bundle_id and data.payload_sha256 == digest


# --- evidence and escalations --------------------------------------------------------------


@routes.post("/api/v1/appliances/{appliance_id}/evidence")
@signed_body(lambda service: service.limits.max_evidence_bytes * 2)
async def submit_evidence(request: web.Request, caller: Appliance, raw: bytes) -> web.Response:
    """Store a signed evidence bundle (idempotent by bundle id). The signer's
    certificate must grant the evidence scope and cover the bundle's log
    position; when the bundle's audit entry is already witnessed, it must
    record this very bundle."""
    service = central(request)
    envelope = parse_body(raw, Envelope, request)
    try:
        return await _store_evidence(service, caller, envelope)
    except Problem as problem:
        if problem.code != "replayed-nonce" and problem.status < 500:
            metrics.witness_refused(request.app, "evidence", problem.code)
        # A bundle that does not verify, or a different bundle under an id
        # already stored, is what tampering looks like.
        if problem.status == 422 or problem.code == "conflict":
            await _alert(service, caller, problem.code, problem.detail)
        raise


async def _store_evidence(service: Central, caller: Appliance, envelope: Envelope) -> web.Response:
    now = service.clock()
    async with write(service.engine) as connection:
        delegation, cert_row = await _signer_delegation(
            connection, service, caller, envelope, lock=True
        )
        checked = check_evidence(envelope, delegation=delegation, limits=service.limits)
        if not checked.ok:
            failure = checked.failures[0]
            code = (
                failure.code
                if failure.code in ("scope-not-granted", "wrong-subject")
                else "bad-evidence"
            )
            raise Problem(code, checked.describe())
        verified = checked.unwrap()
        bundle = verified.bundle
        if cert_row.revoked_at is not None and bundle.log_index >= int(cert_row.cutoff_size):
            raise Problem(
                "certificate-revoked",
                f"bundle at log index {bundle.log_index} signed under certificate "
                f"{cert_row.serial}, revoked from log size {cert_row.cutoff_size}",
            )
        # Locked: an approval of a new log cannot slip in between this read
        # and the insert, filing the bundle under a generation just closed.
        generation = (
            await connection.execute(
                sa.select(audit_logs.c.generation)
                .where(audit_logs.c.appliance_id == caller.appliance_id)
                .with_for_update()
            )
        ).scalar_one()
        in_log = await _evidence_in_log(
            connection, caller, generation, bundle.log_index, verified.digest, bundle.bundle_id
        )
        row = {
            "bundle_id": bundle.bundle_id,
            "appliance_id": caller.appliance_id,
            "site_id": caller.site_id,
            "check_id": bundle.check_id,
            "result": bundle.result,
            "controls": {k: list(v) for k, v in bundle.controls.items()},
            "collected_at": bundle.collected_at,
            "log_generation": generation,
            "log_index": bundle.log_index,
            "payload_sha256": verified.digest,
            "envelope": envelope.canonical_bytes().decode(),
            "serial": cert_row.serial,
            "signed_after_expiry": delegation.signed_after_expiry,
            "in_log": in_log,
            "received_at": now,
        }
        inserted = await insert_ignore(connection, evidence, [row])
        if inserted:
            reason = reason_of_observed(bundle.observed)
            await connection.execute(advance(connection.dialect.name, head_of(row, reason)))
        else:
            held = (
                await connection.execute(
                    sa.select(evidence.c.payload_sha256).where(
                        evidence.c.appliance_id == caller.appliance_id,
                        evidence.c.bundle_id == bundle.bundle_id,
                    )
                )
            ).one()
            if held.payload_sha256 != verified.digest:
                raise Problem("conflict", f"another bundle is stored as {bundle.bundle_id}")
    return json_response(
        EvidenceAccepted(
            bundle_id=bundle.bundle_id,
            stored=bool(inserted),
            signed_after_expiry=delegation.signed_after_expiry,
            in_log=in_log,
        ),
        status=201 if inserted else 200,
    )


async def _evidence_in_log(
    connection: AsyncConnection,
    caller: Appliance,
    generation: int,
    index: int,
    digest: str,
    bundle_id: str,
) -> bool | None:
    """True when the bundle's audit entry (at ``index`` of the log of the
    generation being witnessed) is witnessed and records it; None when that
    entry has not arrived yet (it is checked when it does)."""
    raw = (
        await connection.execute(
            sa.select(audit_entries.c.raw).where(
                audit_entries.c.appliance_id == caller.appliance_id,
                audit_entries.c.generation == generation,
                audit_entries.c.idx == index,
            )
        )
    ).scalar()
    if raw is None:
        return None
    if not _records_bundle(parse_entry(bytes(raw), expected_index=index).entry, bundle_id, digest):
        raise Problem(
            "evidence-not-in-log",
            f"witnessed audit entry {index} does not record bundle {bundle_id} with this payload",
        )
    return True


@routes.post("/api/v1/appliances/{appliance_id}/escalations")
@signed_body(_small)
async def escalate(request: web.Request, caller: Appliance, raw: bytes) -> web.Response:
    """Store an urgent escalation (idempotent by escalation id)."""
    service = central(request)
    escalation = parse_body(raw, Escalation, request)
    if escalation.appliance_id != caller.appliance_id or escalation.site_id != caller.site_id:
        raise Problem("wrong-subject", "the escalation names another appliance or site")
    document = escalation.to_wire()
    async with write(service.engine) as connection:
        inserted = await insert_ignore(
            connection,
            escalations,
            [
                {
                    "escalation_id": escalation.escalation_id,
                    "appliance_id": caller.appliance_id,
                    "site_id": caller.site_id,
                    "severity": escalation.severity,
                    "title": escalation.title,
                    "document": document,
                    "created_at": escalation.created_at,
                    "received_at": service.clock(),
                }
            ],
        )
        if inserted:
            await connection.run_sync(
                functools.partial(
                    escalation_event,
                    appliance_id=caller.appliance_id,
                    site_id=caller.site_id,
                    escalation_id=escalation.escalation_id,
                    severity=escalation.severity,
                    title=escalation.title,
                    created_at=escalation.created_at,
                    now=service.clock(),
                )
            )
        else:
            held = (
                await connection.execute(
                    sa.select(escalations.c.document).where(
                        escalations.c.appliance_id == caller.appliance_id,
                        escalations.c.escalation_id == escalation.escalation_id,
                    )
                )
            ).scalar_one()
            if canonicalize(held) != canonicalize(document):
                raise Problem(
                    "escalation-conflict",
                    f"another escalation is stored as {escalation.escalation_id}",
                )
    return json_response(
        EscalationAccepted(escalation_id=escalation.escalation_id, stored=bool(inserted)),
        status=201 if inserted else 200,
    )
