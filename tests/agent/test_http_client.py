"""The agent's HTTP client against the real central server (in this process,
on loopback, SQLite): enrollment, a witnessed sync of a real audit trail,
bundles, escalations, revocations, heartbeat, and how failures are sorted."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer

from msp_agent.audit import OfflineAuditTrail
from msp_agent.central import CentralRejected, CentralUnavailable
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import DelegatedSigningKey
from msp_central.api_models import SiteOverrides
from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.db.tables import audit_entries, audit_logs, escalations
from msp_central.queries import create_enrollment_token, create_partner, create_site
from msp_protocol.bundle import BundleKind, Escalation, verify_bundle
from msp_protocol.delegation import verify_revocations
from msp_protocol.encoding import utc_now
from msp_protocol.keys import SigningKey
from msp_protocol.sync import SyncRequest

ROOT = SigningKey(b"\x09" * 32)


@dataclass
class Central:
    server: TestServer
    url: str
    token: str
    site_id: str
    database_url: str

    async def scalar(self, query: Any) -> Any:
        engine = create_engine(self.database_url)
        try:
            async with engine.connect() as connection:
                return (await connection.execute(query)).scalar()
        finally:
            await engine.dispose()


@pytest.fixture
async def central(tmp_path: Path) -> Any:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'central.db'}"
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        now = utc_now()
        async with engine.begin() as connection:
            partner, _ = await create_partner(connection, "Acme", now)
            site = await create_site(connection, partner.id, "Clinic", SiteOverrides(), now)
            token, _ = await create_enrollment_token(connection, site.id, timedelta(hours=1), now)
    finally:
        await engine.dispose()
    app = create_app(Settings(state_dir=tmp_path / "central", database_url=database_url), root=ROOT)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Central(server, str(server.make_url("")).rstrip("/"), token, site.id, database_url)
    finally:
        await server.close()


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def enroll(
    central: Central, session: aiohttp.ClientSession, key_dir: Path
) -> tuple[DelegatedSigningKey, HttpCentralClient]:
    signer = DelegatedSigningKey.load_or_create(key_dir, central_keys=[ROOT.verify_key])
    client = HttpCentralClient(central.url, session, signing_key=signer.signing_key)
    certificate = await client.request_certificate(
        signer.enrollment_request(audience=ROOT.key_id, token=central.token),
        enrollment_token=central.token,
    )
    signer.install_certificate(certificate)
    assert client.appliance_id is not None
    return signer, client


async def open_trail(
    tmp_path: Path, signer: DelegatedSigningKey, client: HttpCentralClient
) -> OfflineAuditTrail:
    assert client.appliance_id is not None
    return await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=client.appliance_id,
        signer=signer,
        central_keys=[ROOT.verify_key],
        row_key=signer.audit_row_key(),
    )


async def test_an_audit_trail_is_witnessed_over_http(
    central: Central, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    signer, client = await enroll(central, session, tmp_path / "keys")
    assert client.appliance_id is not None
    trail = await open_trail(tmp_path, signer, client)
    try:
        for start in range(0, 2_400, 300):
            await asyncio.gather(
                *(trail.append("check.run", "agent", {"n": n}) for n in range(start, start + 300))
            )
        report = await trail.sync(client, max_batch=1_000)
        assert (report.from_size, report.to_size, report.batches) == (0, trail.size, 3)
        assert (await trail.head()).receipt_size == trail.size
        assert await central.scalar(sa.select(audit_logs.c.size)) == trail.size
        assert (
            await central.scalar(sa.select(sa.func.count()).select_from(audit_entries))
            == trail.size
        )
        # More entries later: only they travel.
        await trail.append("check.run", "agent", {"n": "late"})
        assert (await trail.sync(client)).batches == 1
        assert await central.scalar(sa.select(audit_logs.c.size)) == trail.size
    finally:
        await trail.close()


async def test_bundles_escalations_revocations_heartbeat(
    central: Central, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    signer, client = await enroll(central, session, tmp_path / "keys")
    assert client.appliance_id is not None
    fetched = await client.fetch_bundle(BundleKind.SITE_CONFIG, None)
    assert fetched is not None
    verify_bundle(
        fetched.envelope,
        roots=[ROOT.verify_key],
        kind=BundleKind.SITE_CONFIG,
        site_id=central.site_id,
        at=utc_now(),
    )
    assert await client.fetch_bundle(BundleKind.SITE_CONFIG, fetched.etag) is None

    incident = Escalation(
        escalation_id="esc-disk",
        appliance_id=client.appliance_id,
        site_id=central.site_id,
        severity="critical",
        title="State directory full",
        detail={"free_bytes": 0},
        created_at=utc_now(),
    )
    await client.escalate(incident)
    await client.escalate(incident)  # a resend is harmless
    assert await central.scalar(sa.select(sa.func.count()).select_from(escalations)) == 1
    with pytest.raises(CentralRejected) as refused:
        await client.escalate(incident.model_copy(update={"title": "something else"}))
    assert (refused.value.status, refused.value.code) == (409, "escalation-conflict")

    revocations = await client.fetch_revocations(None)
    assert revocations is not None
    assert (
        verify_revocations(revocations.envelope, roots=[ROOT.verify_key]).revocations.version == 1
    )
    assert await client.fetch_revocations(revocations.etag) is None

    answer = await client.heartbeat(
        {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": "2026-11-25T00:00:00Z"}
    )
    assert answer["witnessed_size"] == 0

    # Renewal over HTTP: signed by the current key, answered with a new certificate.
    renewed = signer.install_certificate(
        await client.request_certificate(signer.renewal_request(audience=ROOT.key_id))
    )
    assert renewed.certificate.subject_key == signer.verify_key.hex


async def test_a_stale_sync_carries_the_server_size(
    central: Central, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    signer, client = await enroll(central, session, tmp_path / "keys")
    assert client.appliance_id is not None
    trail = await open_trail(tmp_path, signer, client)
    try:
        await trail.append("check.run", "agent", {"n": 1})
        await trail.sync(client)
        witnessed = trail.size
        await trail.append("check.run", "agent", {"n": 2})
        # A batch claiming the server holds nothing: 409, and where it is.
        request = SyncRequest.build(
            old_size=0,
            entries=await trail.entries(0, trail.size),
            consistency=[],
            checkpoint=await trail.checkpoint_at(trail.size),
        )
        with pytest.raises(CentralRejected) as stale:
            await client.sync_audit(client.appliance_id, request)
        assert (stale.value.status, stale.value.code) == (409, "stale-size")
        assert stale.value.extra["server_size"] == witnessed
    finally:
        await trail.close()


async def test_no_server_is_unavailable_not_rejected(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = HttpCentralClient(
        f"http://127.0.0.1:{port}", session, signing_key=SigningKey.generate, appliance_id="x"
    )
    with pytest.raises(CentralUnavailable):
        await client.heartbeat({})
    with pytest.raises(CentralUnavailable, match="not enrolled"):
        await HttpCentralClient(
            "http://127.0.0.1:1", session, signing_key=SigningKey.generate
        ).heartbeat({})


@pytest.mark.parametrize(
    ("status", "content_type", "body", "final"),
    [
        (403, "text/html", b"<h1>Blocked by the site's web filter</h1>", False),
        (407, "text/plain", b"proxy authentication required", False),
        (
            401,
            "application/problem+json",
            b'{"type":"urn:msp:problem:stale-signature","title":"t","status":401,"detail":"too old"}',
            False,
        ),
        (
            401,
            "application/problem+json",
            b'{"type":"urn:msp:problem:future-signature","title":"t","status":401,"detail":"ahead"}',
            False,
        ),
        (
            422,
            "application/problem+json",
            b'{"type":"urn:msp:problem:bad-evidence","title":"t","status":422,"detail":"no"}',
            True,
        ),
        (
            403,
            "application/problem+json",
            b'{"type":"about:blank","title":"Forbidden","status":403}',
            False,
        ),
    ],
    ids=["web-filter", "proxy-auth", "clock-behind", "clock-ahead", "refused", "foreign-problem"],
)
async def test_only_the_servers_own_final_refusals_are_final(
    session: aiohttp.ClientSession, status: int, content_type: str, body: bytes, final: bool
) -> None:
    """A refusal sets evidence and incidents aside for good, so only the
    central server's own problem documents count, and not those a later
    attempt may not get (a request dated outside its window)."""
    from aiohttp import web

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(
            status=status, body=body, content_type=content_type.split(";", maxsplit=1)[0]
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = HttpCentralClient(
            str(server.make_url("")).rstrip("/"),
            session,
            signing_key=lambda: ROOT,
            appliance_id="appliance-1",
        )
        escalation = Escalation.model_validate(
            {
                "escalation_id": "inc-1",
                "appliance_id": "appliance-1",
                "site_id": "site-1",
                "severity": "critical",
                "title": "t",
                "detail": {},
                "created_at": utc_now(),
            }
        )
        if final:
            with pytest.raises(CentralRejected) as refused:
                await client.escalate(escalation)
            assert refused.value.code == "bad-evidence"
            assert client.connectivity.state.value == "online"
        else:
            with pytest.raises(CentralUnavailable) as unavailable:
                await client.escalate(escalation)
            assert client.connectivity.state.value != "online"
            if b"signature" in body:
                assert unavailable.value.code in ("stale-signature", "future-signature")
    finally:
        await server.close()
