"""Races between requests (as two replicas or two retries produce them) and
the regressions a review found: none may lose a revocation, lock an
appliance out, or accept what a revocation forbids."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import msp_central.routes.appliances as appliance_routes
from msp_central.db.tables import (
    audit_logs,
    certificates,
    evidence,
    request_nonces,
    security_alerts,
)
from msp_central.queries import revocation_list, revoke_certificate
from msp_protocol.bundle import Escalation
from msp_protocol.delegation import DelegationRequest, Scope, make_delegation_request
from msp_protocol.evidence import EvidenceBundle, evidence_entry_data, sign_evidence
from msp_protocol.keys import SigningKey
from msp_protocol.log import make_entry
from tests.central.support import ApplianceClient, Harness, call

BEAT = {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": "2026-11-25T00:00:00Z"}


async def heartbeat(appliance: ApplianceClient) -> int:
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    return (await appliance.request("POST", path, BEAT)).status


async def alert_codes(harness: Harness) -> list[str]:
    async with harness.engine.connect() as connection:
        return list(
            (
                await connection.execute(
                    sa.select(security_alerts.c.code).order_by(security_alerts.c.id)
                )
            ).scalars()
        )


async def test_concurrent_revocations_all_reach_the_signed_list(harness: Harness) -> None:
    partner = await harness.partner()
    appliances = [await harness.enroll(partner) for _ in range(6)]
    replies = await asyncio.gather(
        *(
            partner.request("POST", f"/api/v1/certificates/{a.serial}/revoke", {"reason": "x"})
            for a in appliances
        )
    )
    assert [r.status for r in replies] == [200] * 6
    async with harness.engine.connect() as connection:
        newest = await revocation_list(connection)
    assert newest is not None
    assert {r.serial for r in newest.revoked} == {a.serial for a in appliances}
    assert newest.version == 6


async def test_a_revocation_between_check_and_commit_is_honoured(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(10)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    appliance.grow(5)
    commit = appliance_routes._commit
    revoked: list[int] = []

    async def revoke_first(*args: Any, **kwargs: Any) -> bool:
        if not revoked:  # the key is revoked after the batch was checked
            async with harness.engine.begin() as connection:
                out = await revoke_certificate(
                    connection, harness.root, appliance.serial, "stolen", harness.clock()
                )
            revoked.append(out.cutoff_size)
        return await commit(*args, **kwargs)

    monkeypatch.setattr(appliance_routes, "_commit", revoke_first)
    reply = await appliance.sync(appliance.batch(10))
    assert revoked == [10]
    assert (reply.status, reply.code) == (422, "certificate-revoked")
    async with harness.engine.connect() as connection:
        assert (await connection.execute(sa.select(audit_logs.c.size))).scalar() == 10


async def test_concurrent_renewals_leave_the_appliance_working(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"

    async def renew() -> Any:
        request = make_delegation_request(
            purpose="renew",
            audience=harness.root.key_id,
            subject=appliance.key,
            scopes=(Scope.AUDIT, Scope.EVIDENCE),
            current=(appliance.serial, appliance.key),
            created=harness.clock(),
        )
        return await appliance.request("POST", path, {"request": request.to_wire()})

    replies = await asyncio.gather(*(renew() for _ in range(4)))
    statuses = sorted(r.status for r in replies)
    # One renewal is issued; the others were answered with it (a retry of the
    # same renewal) or asked to retry, which then answers it.
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {200, 201, 409}, statuses
    issued = {r.body["certificate"]["signatures"][0]["sig"] for r in replies if r.status < 300}
    assert len(issued) == 1
    retried = await renew()
    assert retried.status == 200
    assert await heartbeat(appliance) == 200


async def test_revoking_a_renewed_serial_stops_the_key(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(5)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    request = make_delegation_request(
        purpose="renew",
        audience=harness.root.key_id,
        subject=appliance.key,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        current=(appliance.serial, appliance.key),
        created=harness.clock(),
    )
    path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"
    renewed = await appliance.request("POST", path, {"request": request.to_wire()})
    assert renewed.status == 201
    # The partner revokes the serial it knows, the first one: the key is stopped.
    reply = await partner.request(
        "POST", f"/api/v1/certificates/{appliance.serial}/revoke", {"reason": "stolen"}
    )
    assert reply.status == 200
    assert reply.body["cutoff_size"] == 5
    assert len(reply.body["revoked_serials"]) == 2
    assert await heartbeat(appliance) == 403
    async with harness.engine.connect() as connection:
        newest = await revocation_list(connection)
        revoked = (
            await connection.execute(
                sa.select(certificates.c.serial).where(certificates.c.revoked_at.is_not(None))
            )
        ).scalars()
        assert newest is not None
        assert {r.serial for r in newest.revoked} == set(revoked)


async def test_the_same_tree_signed_again_gets_the_stored_receipt(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(10)
    first = await appliance.sync(appliance.batch(0))
    harness.clock.advance(timedelta(seconds=2))
    again = await appliance.sync(appliance.batch(10))  # no entries, a new signing of size 10
    assert again.status == 200, again.body
    assert again.body == first.body


async def test_acknowledging_names_the_appliance(harness: Harness) -> None:
    partner = await harness.partner()
    first, second = await harness.enroll(partner), await harness.enroll(partner)
    for appliance in (first, second):
        document = Escalation(
            escalation_id="esc-1",
            appliance_id=appliance.appliance_id,
            site_id=appliance.site_id,
            severity="high",
            title="t",
            detail={},
            created_at=harness.clock(),
        )
        path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
        assert (await appliance.request("POST", path, document.to_wire())).status == 201
    ack = await partner.request(
        "POST", f"/api/v1/escalations/{first.appliance_id}/esc-1/acknowledge"
    )
    assert (ack.status, ack.body["appliance_id"]) == (200, first.appliance_id)
    still_open = await partner.request("GET", "/api/v1/escalations?open=true")
    assert [e["appliance_id"] for e in still_open.body["items"]] == [second.appliance_id]


def bundle_at(appliance: ApplianceClient, index: int, result: str = "pass") -> Any:
    return sign_evidence(
        appliance.key,
        EvidenceBundle(
            bundle_id=f"ev-{uuid.uuid4().hex[:12]}",
            site_id=appliance.site_id,
            appliance_id=appliance.appliance_id,
            check_id="time_sync",
            controls={"hipaa": ("164.312(b)",)},
            result=result,
            observed={},
            collected_at=appliance.clock(),
            log_index=index,
        ),
    )


async def test_evidence_sent_before_its_entry_is_checked_when_the_entry_arrives(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(1)
    path = f"/api/v1/appliances/{appliance.appliance_id}/evidence"
    honest, forged = bundle_at(appliance, 1), bundle_at(appliance, 2)
    for envelope in (honest, forged):
        reply = await appliance.request("POST", path, envelope)
        assert (reply.status, reply.body["in_log"]) == (201, None)
    # Entry 1 records the honest bundle; entry 2 records a different one.
    appliance.records.append(
        make_entry(1, appliance.clock(), "evidence.signed", "agent", evidence_entry_data(honest))
    )
    other = bundle_at(appliance, 2, result="fail")
    appliance.records.append(
        make_entry(2, appliance.clock(), "evidence.signed", "agent", evidence_entry_data(other))
    )
    assert (await appliance.sync(appliance.batch(0))).status == 200
    async with harness.engine.connect() as connection:
        verdicts = dict(
            (await connection.execute(sa.select(evidence.c.log_index, evidence.c.in_log))).all()
        )
    assert verdicts == {1: True, 2: False}
    assert await alert_codes(harness) == ["evidence-not-in-log"]
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/evidence")
    assert {e["log_index"]: e["in_log"] for e in listed.body["items"]} == {1: True, 2: False}


async def test_a_delegation_request_nonce_is_recorded(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    request = make_delegation_request(
        purpose="renew",
        audience=harness.root.key_id,
        subject=appliance.key,
        scopes=(Scope.AUDIT,),
        current=(appliance.serial, appliance.key),
        created=harness.clock(),
    )
    path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"
    assert (await appliance.request("POST", path, {"request": request.to_wire()})).status == 201
    nonce = DelegationRequest.from_json(request.payload_bytes()).nonce
    async with harness.engine.connect() as connection:
        recorded = (
            (
                await connection.execute(
                    sa.select(request_nonces.c.key_id).where(
                        request_nonces.c.nonce == "request:" + nonce
                    )
                )
            )
            .scalars()
            .all()
        )
    assert recorded == [appliance.key.key_id]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/api/v1/sites", {"name": "a\u0000b"}, id="nul_in_site_name"),
        pytest.param("/api/v1/sites", {"name": "two\nlines"}, id="newline_in_site_name"),
    ],
)
async def test_control_characters_are_refused(harness: Harness, path: str, body: Any) -> None:
    partner = await harness.partner()
    reply = await partner.request("POST", path, body)
    assert (reply.status, reply.code) == (400, "malformed-document")


async def test_a_replayed_sync_request_is_refused_as_a_replay(harness: Harness) -> None:
    """audit sync records its nonce in the transaction that stores the batch:
    the exact request sent again is a replay, whatever the batch's verdict."""
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/audit/sync"
    appliance.grow(4)
    good = appliance.batch(0).canonical_bytes()
    headers = appliance.signed("POST", path, good)
    first = await call(harness.client, "POST", path, body=good, headers=headers)
    again = await call(harness.client, "POST", path, body=good, headers=headers)
    assert first.status == 200
    assert (again.status, again.code) == (401, "replayed-nonce")
    appliance.grow(2)
    bad = appliance.batch(4, signer=SigningKey.generate()).canonical_bytes()
    headers = appliance.signed("POST", path, bad)
    refused = await call(harness.client, "POST", path, body=bad, headers=headers)
    replayed = await call(harness.client, "POST", path, body=bad, headers=headers)
    assert (refused.status, refused.code) == (422, "unknown-key")
    assert (replayed.status, replayed.code) == (401, "replayed-nonce")
    assert await alert_codes(harness) == ["unknown-key"]  # one alert, not two
