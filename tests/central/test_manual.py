"""Manual evidence and the central log: documents partners attach to controls
no check covers, counted by posture until they expire, their hashes in the
central server's own Merkle log, which administrators export and auditors
verify with only the central public key."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest

from msp_central.context import CENTRAL
from msp_protocol.central_log import check_central_log_export, check_central_record
from msp_protocol.encoding import format_time, utc_now
from tests.central.support import ROOT, Harness, KeyClient

KEYS = [ROOT.verify_key]
RISK_ANALYSIS = "164.308(a)(1)(ii)(A)"  # no check covers it: manual
AUDIT = "164.312(b)"  # time_sync covers it
POLICY = b"%PDF-1.7\nRisk analysis 2026, approved by the board.\n"


async def _site(partner: KeyClient) -> str:
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": "Northside", "overrides": {"frameworks": ["hipaa"]}}
    )
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


def _document(control_id: str = RISK_ANALYSIS, **changes: Any) -> dict[str, Any]:
    return {
        "framework_id": "hipaa",
        "control_id": control_id,
        "filename": "risk-analysis-2026.pdf",
        "media_type": "application/pdf",
        "content": base64.b64encode(POLICY).decode(),
        "note": "annual risk analysis",
        **changes,
    }


async def _state(partner: KeyClient, site_id: str, control_id: str) -> dict[str, Any]:
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture")
    (hipaa,) = reply.body["frameworks"]
    (control,) = [c for c in hipaa["controls"] if c["control_id"] == control_id]
    return control  # type: ignore[no-any-return]


async def test_an_attached_document_makes_a_manual_control_pass_until_it_expires(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    assert (await _state(partner, site_id, RISK_ANALYSIS))["state"] == "manual"

    expires = harness.clock() + timedelta(days=365)
    reply = await partner.request(
        "POST",
        f"/api/v1/sites/{site_id}/manual-evidence",
        _document(expires_at=format_time(expires)),
    )
    assert reply.status == 201, reply.body
    attached = reply.body
    assert attached["sha256"] == hashlib.sha256(POLICY).hexdigest()
    assert attached["size"] == len(POLICY)
    assert attached["in_force"] is True
    assert attached["attached_by"].startswith(f"partner:{partner.partner_id}/key:")

    control = await _state(partner, site_id, RISK_ANALYSIS)
    assert control["state"] == "passing"
    assert control["evidence"] is None
    assert control["manual_evidence"]["id"] == attached["id"]

    base = f"/api/v1/sites/{site_id}/manual-evidence/{attached['id']}"
    document = await partner.client.get(
        f"{base}/document", headers={"Authorization": f"Bearer {partner.key}"}
    )
    assert document.status == 200
    assert await document.read() == POLICY
    assert document.headers["X-Content-Type-Options"] == "nosniff"
    assert document.headers["Content-Disposition"].startswith("attachment;")

    proof = await partner.request("GET", f"{base}/proof")
    assert proof.status == 200, proof.body
    entry = check_central_record(proof.body, KEYS).unwrap()
    assert entry.kind == "evidence.attached"
    assert entry.index == attached["log_index"]
    assert entry.data["sha256"] == attached["sha256"]
    assert entry.data["site_id"] == site_id
    tampered = dict(proof.body)
    tampered["inclusion"] = list(reversed(proof.body["inclusion"]))
    if len(tampered["inclusion"]) > 1:
        assert not check_central_record(tampered, KEYS).ok

    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/manual-evidence")
    assert [a["id"] for a in listed.body["items"]] == [attached["id"]]

    harness.clock.advance(timedelta(days=366))
    control = await _state(partner, site_id, RISK_ANALYSIS)
    assert (control["state"], control["manual_evidence"]) == ("manual", None)
    again = await partner.request("GET", base)
    assert again.body["in_force"] is False


async def test_a_document_beside_an_automated_control_is_shown_not_counted(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    reply = await partner.request(
        "POST", f"/api/v1/sites/{site_id}/manual-evidence", _document(AUDIT)
    )
    assert reply.status == 201, reply.body
    control = await _state(partner, site_id, AUDIT)
    assert control["state"] == "stale"  # the signed evidence alone decides
    assert control["manual_evidence"]["id"] == reply.body["id"]


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"framework_id": "sox"}, "not one this site uses"),
        ({"control_id": "164.999(z)"}, "has no control"),
        ({"content": "not base64!"}, "content"),
        ({"media_type": "application/pdf\r\nX-Evil: 1"}, "media_type"),
        ({"filename": "a\nb.pdf"}, "filename"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "in the past"),
        ({"extra": 1}, "extra"),
    ],
    ids=[
        "unused-framework",
        "unknown-control",
        "bad-base64",
        "header-injection",
        "control-char-name",
        "expired",
        "unknown-field",
    ],
)
async def test_bad_attachments_are_refused_and_store_nothing(
    harness: Harness, changes: dict[str, Any], detail: str
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    reply = await partner.request(
        "POST", f"/api/v1/sites/{site_id}/manual-evidence", _document(**changes)
    )
    assert (reply.status, reply.code) == (400, "malformed-document"), reply.body
    assert detail in reply.body["detail"]
    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/manual-evidence")
    assert listed.body == {"items": [], "next_cursor": None}


async def test_another_partner_sees_no_document(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    attached = await partner.request(
        "POST", f"/api/v1/sites/{site_id}/manual-evidence", _document()
    )
    other = await harness.partner("Other MSP")
    base = f"/api/v1/sites/{site_id}/manual-evidence"
    for path in (base, f"{base}/{attached.body['id']}", f"{base}/{attached.body['id']}/proof"):
        reply = await other.request("GET", path)
        assert (reply.status, reply.code) == (404, "not-found"), path
    document = await other.client.get(
        f"{base}/{attached.body['id']}/document", headers={"Authorization": f"Bearer {other.key}"}
    )
    assert document.status == 404
    refused = await other.request("POST", base, _document())
    assert (refused.status, refused.code) == (404, "not-found")


async def test_the_central_log_records_who_did_what_and_verifies(harness: Harness) -> None:
    admin = await harness.admin()
    partner = await harness.partner()
    site_id = await _site(partner)
    overrides = {"tier": "full", "frameworks": ["hipaa"]}
    await partner.request("PUT", f"/api/v1/sites/{site_id}/overrides", overrides)
    await partner.request(
        "PUT", "/api/v1/partner/defaults", {"tier": "basic", "frameworks": ["soc2"]}
    )
    await partner.request("POST", f"/api/v1/sites/{site_id}/enrollment-tokens", {})
    appliance = await harness.enroll(partner, site_id)
    await partner.request("POST", f"/api/v1/sites/{site_id}/manual-evidence", _document())
    revoked = await partner.request(
        "POST", f"/api/v1/certificates/{appliance.serial}/revoke", {"reason": "stolen"}
    )
    assert revoked.status == 200

    refused = await partner.request("GET", "/api/v1/central-log/export")
    assert (refused.status, refused.code) == (403, "forbidden")
    reply = await admin.request("GET", "/api/v1/central-log/export")
    assert reply.status == 200, reply.body
    report = check_central_log_export(reply.body, KEYS, at=utc_now()).unwrap()
    kinds = [json.loads(base64.b64decode(entry))["kind"] for entry in reply.body["entries"]]
    assert kinds[0] == "central.genesis"
    assert kinds[1:] == [
        "site.created",
        "site.overrides",
        "partner.defaults",
        "token.created",
        "token.created",  # the one enroll used
        "evidence.attached",
        "certificate.revoked",
    ]
    assert report.size == len(kinds)
    edited = dict(reply.body)
    edited["entries"] = [*reply.body["entries"][:2], *reply.body["entries"][3:]]
    assert not check_central_log_export(edited, KEYS, at=utc_now()).ok


async def test_oscal_names_the_document_behind_a_passing_manual_control(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    attached = await partner.request(
        "POST", f"/api/v1/sites/{site_id}/manual-evidence", _document()
    )
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture/oscal")
    assert reply.status == 200, reply.body
    (result,) = reply.body["assessment-results"]["results"]
    (finding,) = [
        f
        for f in result["findings"]
        if {"name": "control-id", "value": RISK_ANALYSIS}
        in [{"name": p["name"], "value": p["value"]} for p in f["props"]]
    ]
    assert finding["target"]["status"]["state"] == "satisfied"
    assert attached.body["sha256"] in finding["target"]["status"]["remarks"]


async def test_documents_up_to_the_limit_are_taken_and_larger_ones_refused(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    limit = harness.client.server.app[CENTRAL].settings.max_document_bytes
    path = f"/api/v1/sites/{site_id}/manual-evidence"
    whole = bytes(range(256)) * (limit // 256)
    taken = await partner.request("POST", path, _document(content=base64.b64encode(whole).decode()))
    assert taken.status == 201, taken.body
    assert taken.body["size"] == len(whole)
    over = await partner.request(
        "POST", path, _document(content=base64.b64encode(whole + b"x" * 4096).decode())
    )
    assert (over.status, over.code) == (413, "body-too-large")
