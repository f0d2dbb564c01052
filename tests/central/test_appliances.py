"""The appliance API beyond audit sync: enrollment, renewal, rotation,
revocation lists, heartbeat, config bundles, evidence, escalations."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central.db.tables import enrollment_tokens, security_alerts
from msp_protocol.bundle import BundleKind, Escalation, verify_bundle
from msp_protocol.delegation import (
    Scope,
    make_delegation_request,
    verify_delegation,
    verify_revocations,
)
from msp_protocol.dsse import Envelope
from msp_protocol.evidence import EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey
from tests.central.support import ApplianceClient, Harness, KeyClient, call, dumps


def enroll_body(harness: Harness, token: str, key: SigningKey, **kwargs: Any) -> bytes:
    request = make_delegation_request(
        purpose="enroll",
        audience=kwargs.pop("audience", harness.root.key_id),
        subject=key,
        scopes=kwargs.pop("scopes", (Scope.AUDIT, Scope.EVIDENCE)),
        enrollment_token=kwargs.pop("request_token", token),
        created=kwargs.pop("created", harness.clock()),
    )
    return dumps({"token": token, "request": request.to_wire()})


async def test_enrollment_certificate_is_for_the_appliance_key(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    verified = verify_delegation(
        appliance.certificate, roots=[harness.root.verify_key], at=harness.clock()
    )
    certificate = verified.certificate
    assert certificate.subject_key == appliance.key.verify_key.hex
    assert (certificate.appliance_id, certificate.site_id) == (
        appliance.appliance_id,
        appliance.site_id,
    )
    assert certificate.lifetime == timedelta(days=30)
    assert set(certificate.scopes) == {Scope.AUDIT, Scope.EVIDENCE}


async def test_a_token_enrolls_once_and_a_lost_answer_can_be_retried(harness: Harness) -> None:
    partner = await harness.partner()
    site = await harness.site(partner)
    token = await harness.token(partner, site)
    key = SigningKey.generate()
    first = await call(
        harness.client, "POST", "/api/v1/enroll", body=enroll_body(harness, token, key)
    )
    assert first.status == 201
    retry = await call(
        harness.client, "POST", "/api/v1/enroll", body=enroll_body(harness, token, key)
    )
    assert retry.status == 200
    assert retry.body == first.body  # the same appliance and certificate
    thief = await call(
        harness.client,
        "POST",
        "/api/v1/enroll",
        body=enroll_body(harness, token, SigningKey.generate()),
    )
    assert (thief.status, thief.code) == (403, "bad-enrollment-token")


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("unknown_token", 403, "bad-enrollment-token"),
        ("expired_token", 403, "bad-enrollment-token"),
        ("token_does_not_match_request", 422, "delegation-request-refused"),
        ("request_for_another_server", 422, "delegation-request-refused"),
        ("stale_request", 422, "stale-request"),
        ("not_signed_by_the_subject", 422, "delegation-request-refused"),
        ("not_json", 400, "malformed-json"),
    ],
)
async def test_enrollment_refusals(harness: Harness, case: str, status: int, code: str) -> None:
    partner = await harness.partner()
    site = await harness.site(partner)
    token = await harness.token(partner, site)
    key = SigningKey.generate()
    body = enroll_body(harness, token, key)
    if case == "unknown_token":
        other = "msp-enroll_" + "0" * 64
        body = enroll_body(harness, other, key)
    elif case == "expired_token":
        harness.clock.advance(timedelta(hours=73))
        body = enroll_body(harness, token, key)
    elif case == "token_does_not_match_request":
        body = enroll_body(harness, token, key, request_token="msp-enroll_" + "1" * 64)
    elif case == "request_for_another_server":
        body = enroll_body(harness, token, key, audience=SigningKey.generate().key_id)
    elif case == "stale_request":
        body = enroll_body(harness, token, key, created=harness.clock() - timedelta(minutes=10))
    elif case == "not_signed_by_the_subject":
        request = make_delegation_request(
            purpose="enroll",
            audience=harness.root.key_id,
            subject=key,
            scopes=(Scope.AUDIT,),
            enrollment_token=token,
            created=harness.clock(),
        )
        other = SigningKey.generate()
        forged = request.model_copy(
            update={
                "signatures": (request.signatures[0].model_copy(update={"keyid": other.key_id}),)
            }
        )
        body = dumps({"token": token, "request": forged.to_wire()})
    else:
        body = b"{not json"
    reply = await call(harness.client, "POST", "/api/v1/enroll", body=body)
    assert (reply.status, reply.code) == (status, code), reply.body
    async with harness.engine.connect() as connection:
        used = (await connection.execute(sa.select(enrollment_tokens.c.used_at))).scalars().all()
    assert used == [None]  # a refused enrollment does not use up the token


async def test_renewal_keeps_the_key(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    harness.clock.advance(timedelta(days=16))
    request = make_delegation_request(
        purpose="renew",
        audience=harness.root.key_id,
        subject=appliance.key,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        current=(appliance.serial, appliance.key),
        created=harness.clock(),
    )
    path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"
    reply = await appliance.request("POST", path, {"request": request.to_wire()})
    assert reply.status == 201, reply.body
    renewed = verify_delegation(
        Envelope.from_wire(reply.body["certificate"]),
        roots=[harness.root.verify_key],
        at=harness.clock(),
    ).certificate
    assert renewed.subject_key == appliance.key.verify_key.hex
    assert renewed.serial != appliance.serial
    assert renewed.not_after > harness.clock() + timedelta(days=29)
    # The answer was lost: the appliance asks again, naming the old serial,
    # and gets the certificate the first request was issued.
    retry = await appliance.request("POST", path, {"request": request.to_wire()})
    assert retry.status == 200, retry.body
    assert retry.body == reply.body
    again = make_delegation_request(
        purpose="renew",
        audience=harness.root.key_id,
        subject=appliance.key,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        current=(renewed.serial, appliance.key),
        created=harness.clock(),
    )
    assert (await appliance.request("POST", path, {"request": again.to_wire()})).status == 201
    # A request replayed after that: it names a serial two renewals old.
    old = await appliance.request("POST", path, {"request": request.to_wire()})
    assert (old.status, old.code) == (422, "delegation-request-refused")
    replay = await appliance.request("POST", path, {"request": again.to_wire()})
    assert (replay.status, replay.code) == (200, None)  # names the replaced serial: the answer


async def test_rotation_switches_keys_at_first_use(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    new_key = SigningKey.generate()
    request = make_delegation_request(
        purpose="rotate",
        audience=harness.root.key_id,
        subject=new_key,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        current=(appliance.serial, appliance.key),
        created=harness.clock(),
    )
    path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"
    first = await appliance.request("POST", path, {"request": request.to_wire()})
    assert first.status == 201
    # The answer was lost: the old key may still ask again, and is answered.
    again = await appliance.request("POST", path, {"request": request.to_wire()})
    assert (again.status, again.body) == (200, first.body)
    heartbeat = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    beat = {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": "2026-11-25T00:00:00Z"}
    assert (await appliance.request("POST", heartbeat, beat, key=new_key)).status == 200
    old = await appliance.request("POST", heartbeat, beat)  # the old key no longer speaks
    assert (old.status, old.code) == (401, "unknown-key")


async def test_revocation_list_versions_and_cutoff(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    other = await harness.enroll(partner)
    empty = await other.request("GET", "/api/v1/revocations")
    assert empty.status == 200
    first = verify_revocations(Envelope.from_wire(empty.body), roots=[harness.root.verify_key])
    assert (first.revocations.version, first.revocations.revoked) == (1, ())
    unchanged = await call(
        harness.client,
        "GET",
        "/api/v1/revocations",
        headers={
            **other.signed("GET", "/api/v1/revocations"),
            "If-None-Match": empty.headers["ETag"],
        },
    )
    assert unchanged.status == 304
    appliance.grow(4)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    reply = await partner.request(
        "POST", f"/api/v1/certificates/{appliance.serial}/revoke", {"reason": "lost"}
    )
    assert reply.status == 200
    assert (reply.body["cutoff_size"], reply.body["revocation_list_version"]) == (4, 2)
    # The revoked appliance can no longer act, but can learn that it is revoked.
    refused = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/heartbeat",
        {"version": "x", "log_size": 4, "queues": {}, "clock": "2026-11-25T00:00:00Z"},
    )
    assert (refused.status, refused.code) == (403, "appliance-revoked")
    listed = await appliance.request("GET", "/api/v1/revocations")
    revocations = verify_revocations(
        Envelope.from_wire(listed.body), roots=[harness.root.verify_key], min_version=2
    ).revocations
    entry = revocations.find(appliance.serial)
    assert entry is not None
    assert (entry.cutoff_size, entry.reason, entry.appliance_id) == (
        4,
        "",
        appliance.appliance_id,
    )
    twice = await partner.request("POST", f"/api/v1/certificates/{appliance.serial}/revoke", {})
    assert twice.body["revocation_list_version"] == 2  # revoking again changes nothing


async def test_heartbeat_records_state(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    skewed = (harness.clock() + timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    beat = {
        "version": "0.1.0",
        "log_size": 3,
        "queues": {"evidence": 2, "urgent": 1},
        "clock": skewed,
    }
    reply = await appliance.request(
        "POST", f"/api/v1/appliances/{appliance.appliance_id}/heartbeat", beat
    )
    assert reply.status == 200
    assert 88 <= reply.body["clock_skew_seconds"] <= 91
    assert reply.body["witnessed_size"] == 0
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    (state,) = listed.body["items"]
    assert state["status"] == "online"
    assert state["heartbeat"]["queues"] == {"evidence": 2, "urgent": 1}
    assert state["log_size"] == beat["log_size"]
    bad = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/heartbeat",
        {**beat, "clock": "yesterday"},
    )
    assert (bad.status, bad.code) == (400, "malformed-document")


async def test_config_bundles_etag_and_versions(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    await partner.request("POST", "/api/v1/partner/apply-preset", {"preset": "healthcare"})
    path = f"/api/v1/appliances/{appliance.appliance_id}/bundles/frameworks"
    first = await appliance.request("GET", path)
    assert first.status == 200
    bundle = verify_bundle(
        Envelope.from_wire(first.body),
        roots=[harness.root.verify_key],
        kind=BundleKind.FRAMEWORKS,
        site_id=appliance.site_id,
        at=harness.clock(),
    ).bundle
    assert bundle.version == 1
    assert [f["id"] for f in bundle.content["frameworks"]] == ["hipaa", "nist_csf"]
    hipaa = bundle.content["frameworks"][0]
    assert any(c["id"] == "164.312(b)" and c["runbooks"] for c in hipaa["controls"])
    same = await call(
        harness.client,
        "GET",
        path,
        headers={**appliance.signed("GET", path), "If-None-Match": first.headers["ETag"]},
    )
    assert same.status == 304
    await partner.request(
        "PUT", f"/api/v1/sites/{appliance.site_id}/overrides", {"frameworks": ["pci_dss"]}
    )
    changed = await appliance.request("GET", path)
    assert changed.headers["ETag"] != first.headers["ETag"]
    newer = verify_bundle(
        Envelope.from_wire(changed.body),
        roots=[harness.root.verify_key],
        kind=BundleKind.FRAMEWORKS,
        site_id=appliance.site_id,
        at=harness.clock(),
        min_version=2,
    ).bundle
    assert [f["id"] for f in newer.content["frameworks"]] == ["pci_dss"]
    harness.clock.advance(timedelta(days=4))  # past half its life: re-signed, version up
    renewed = await appliance.request("GET", path)
    assert Envelope.from_wire(renewed.body) != Envelope.from_wire(changed.body)
    for kind in ("runbooks", "site-config"):
        reply = await appliance.request(
            "GET", f"/api/v1/appliances/{appliance.appliance_id}/bundles/{kind}"
        )
        assert reply.status == 200
    runbooks = verify_bundle(
        Envelope.from_wire(reply.body),
        roots=[harness.root.verify_key],
        kind=BundleKind.SITE_CONFIG,
        site_id=appliance.site_id,
        at=harness.clock(),
    ).bundle.content
    assert runbooks["frameworks"] == ["pci_dss"]
    unknown = await appliance.request(
        "GET", f"/api/v1/appliances/{appliance.appliance_id}/bundles/secrets"
    )
    assert (unknown.status, unknown.code) == (404, "not-found")


# --- evidence ---------------------------------------------------------------------------


def evidence_for(
    appliance: ApplianceClient, *, key: SigningKey | None = None, **changes: Any
) -> Envelope:
    return appliance.sign_bundle(key=key, **changes)


async def test_evidence_is_verified_stored_once_and_checked_against_the_log(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(1)
    path = f"/api/v1/appliances/{appliance.appliance_id}/evidence"
    envelope = evidence_for(appliance)
    early = await appliance.request("POST", path, envelope)
    assert early.status == 201
    assert early.body == {
        "bundle_id": early.body["bundle_id"],
        "stored": True,
        "signed_after_expiry": False,
        "in_log": None,
    }
    assert (await appliance.sync(appliance.batch(0))).status == 200
    again = await appliance.request("POST", path, envelope)
    assert (again.status, again.body["stored"], again.body["in_log"]) == (200, False, True)
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/evidence")
    assert [e["id"] for e in listed.body["items"]] == [early.body["bundle_id"]]
    assert listed.body["items"][0]["controls"] == {"hipaa": ["164.312(b)"], "pci_dss": ["10.6.1"]}


async def test_evidence_refusals(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    audit_only = await harness.enroll(partner, appliance.site_id, scopes=(Scope.AUDIT,))
    appliance.grow(1)
    path = f"/api/v1/appliances/{appliance.appliance_id}/evidence"
    forged = evidence_for(appliance, key=SigningKey.generate())
    reply = await appliance.request("POST", path, forged)
    assert (reply.status, reply.code) == (422, "unknown-key")
    other_site = evidence_for(appliance, site_id="site-elsewhere")
    reply = await appliance.request("POST", path, other_site)
    assert (reply.status, reply.code) == (422, "wrong-subject")
    audit_only.grow(1)
    reply = await audit_only.request(
        "POST", f"/api/v1/appliances/{audit_only.appliance_id}/evidence", evidence_for(audit_only)
    )
    assert (reply.status, reply.code) == (422, "scope-not-granted")
    async with harness.engine.connect() as connection:
        codes = (await connection.execute(sa.select(security_alerts.c.code))).scalars().all()
    assert sorted(codes) == ["scope-not-granted", "unknown-key", "wrong-subject"]


async def test_evidence_differing_from_its_witnessed_entry(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(1)
    genuine = evidence_for(appliance, bundle_id="ev-1")
    assert (await appliance.sync(appliance.batch(0))).status == 200
    # Same index and id, different content: not the bundle the log recorded.
    bundle = EvidenceBundle.from_json(genuine.payload_bytes()).model_copy(update={"result": "fail"})
    altered = sign_evidence(appliance.key, bundle)
    reply = await appliance.request(
        "POST", f"/api/v1/appliances/{appliance.appliance_id}/evidence", altered
    )
    assert (reply.status, reply.code) == (422, "evidence-not-in-log")


# --- escalations ---------------------------------------------------------------------------


def escalation(appliance: ApplianceClient, **changes: Any) -> dict[str, Any]:
    return Escalation(
        escalation_id=changes.pop("escalation_id", f"esc-{uuid.uuid4().hex[:12]}"),
        appliance_id=changes.pop("appliance_id", appliance.appliance_id),
        site_id=appliance.site_id,
        severity="critical",
        title=changes.pop("title", "Disk full on the state directory"),
        detail={"free_bytes": 0},
        created_at=appliance.clock(),
    ).to_wire()


async def test_escalations_are_idempotent(harness: Harness) -> None:
    partner: KeyClient = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
    document = escalation(appliance, escalation_id="esc-1")
    first = await appliance.request("POST", path, document)
    again = await appliance.request("POST", path, document)
    assert (first.status, first.body["stored"]) == (201, True)
    assert (again.status, again.body["stored"]) == (200, False)
    conflict = await appliance.request("POST", path, {**document, "title": "something else"})
    assert (conflict.status, conflict.code) == (409, "escalation-conflict")
    impostor = await appliance.request(
        "POST", path, escalation(appliance, appliance_id="appliance-x")
    )
    assert (impostor.status, impostor.code) == (422, "wrong-subject")
    listed = await partner.request("GET", "/api/v1/escalations?open=true")
    assert [e["id"] for e in listed.body["items"]] == ["esc-1"]


async def test_a_sync_shows_the_appliance_online(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/sites/{appliance.site_id}/appliances"
    listed = await partner.request("GET", path)
    assert [(a["status"], a["last_sync_at"]) for a in listed.body["items"]] == [
        ("never-seen", None)
    ]
    appliance.grow(3)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    (state,) = (await partner.request("GET", path)).body["items"]
    assert (state["status"], state["witnessed_size"]) == ("online", 3)
    assert state["last_sync_at"] == state["last_seen_at"] is not None
    # Silent for three beats of the default interval (it never said its own).
    harness.clock.advance(timedelta(minutes=14))
    (state,) = (await partner.request("GET", path)).body["items"]
    assert state["status"] == "online"
    harness.clock.advance(timedelta(minutes=2))
    (state,) = (await partner.request("GET", path)).body["items"]
    assert state["status"] == "offline"


async def test_the_list_names_each_appliances_failing_checks(harness: Harness) -> None:
    """A check is failing while its newest bundle (by log position) failed
    or erred; a later pass clears it."""
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    other = await harness.enroll(partner, appliance.site_id)
    for owner, check, result in [
        (appliance, "time_sync", "fail"),
        (appliance, "time_sync", "pass"),
        (appliance, "backup", "pass"),
        (appliance, "backup", "fail"),
        (appliance, "disk_encryption", "error"),
        (appliance, "firewall", "not_applicable"),
        (other, "firewall", "fail"),
    ]:
        reply = await owner.push(owner.sign_bundle(check_id=check, result=result))
        assert reply.status == 201, reply.body
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    failing = {item["id"]: item["failing_checks"] for item in listed.body["items"]}
    assert failing == {
        appliance.appliance_id: ["backup", "disk_encryption"],
        other.appliance_id: ["firewall"],
    }
    fresh = await harness.enroll(partner)
    listed = await partner.request("GET", f"/api/v1/appliances?site_id={fresh.site_id}")
    assert [item["failing_checks"] for item in listed.body["items"]] == [[]]
