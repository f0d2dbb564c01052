"""Auditor packages built by the central server and checked as an auditor
would, with msp_protocol's checker and nothing but the central public key."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from msp_protocol.encoding import format_time, utc_now
from msp_protocol.package import check_auditor_package
from tests.central.support import ROOT, ApplianceClient, Harness, KeyClient

KEYS = [ROOT.verify_key]
AUDIT = "164.312(b)"
AUTH = "164.312(d)"


async def _site(partner: KeyClient, frameworks: list[str]) -> str:
    reply = await partner.request(
        "POST",
        "/api/v1/sites",
        {"name": "Northside Clinic", "overrides": {"frameworks": frameworks}},
    )
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


async def _bundle(appliance: ApplianceClient, **fields: Any) -> str:
    envelope = appliance.sign_bundle(**fields)
    reply = await appliance.push(envelope)
    assert reply.status == 201, reply.body
    return str(reply.body["bundle_id"])


async def _sync(appliance: ApplianceClient, old: int) -> int:
    reply = await appliance.sync(appliance.batch(old))
    assert reply.status == 200, reply.body
    return len(appliance.records)


async def _package(partner: KeyClient, site_id: str, **query: Any) -> tuple[int, bytes, Any]:
    path = f"/api/v1/sites/{site_id}/auditor-package"
    if query:
        path += "?" + urlencode(query, doseq=True)
    reply = await partner.request("GET", path)
    raw = json.dumps(reply.body).encode() if reply.status == 200 else b""
    return reply.status, raw, reply


async def test_a_package_of_two_appliances_verifies_and_agrees_with_the_posture(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa", "pci_dss"])
    first = await harness.enroll(partner, site_id)
    second = await harness.enroll(partner, site_id)
    for appliance in (first, second):
        appliance.grow(3)
    before = await _bundle(first, controls={"hipaa": (AUDIT,)})  # before the period
    harness.clock.advance(timedelta(hours=1))
    start = harness.clock()
    inside = [
        await _bundle(first, controls={"hipaa": (AUDIT,)}),
        await _bundle(
            first,
            check_id="ssh_password_login_disabled",
            controls={"hipaa": (AUTH,)},
            result="fail",
            observed={"reason": "sshd allows PasswordAuthentication"},
        ),
        await _bundle(second, controls={"hipaa": (AUDIT,), "pci_dss": ("10.6.1",)}),
    ]
    pci_only = await _bundle(second, check_id="firewall_active", controls={"pci_dss": ("1.2.1",)})
    first.grow(4)
    size = {first.appliance_id: await _sync(first, 0), second.appliance_id: await _sync(second, 0)}
    unwitnessed = await _bundle(first, controls={"hipaa": (AUDIT,)})  # entry not synced yet
    harness.clock.advance(timedelta(minutes=1))

    status, raw, reply = await _package(
        partner, site_id, framework="hipaa", **{"from": format_time(start)}
    )
    assert status == 200, reply.body
    assert reply.headers["Content-Disposition"].startswith(
        f'attachment; filename="auditor-package-{site_id}-'
    )
    report = check_auditor_package(raw, KEYS, at=utc_now()).unwrap()
    assert report.frameworks == ("hipaa",)
    assert report.bundles == 3
    package = reply.body
    ids = {json.loads(_payload(e))["bundle_id"] for e in package["evidence"]}
    assert ids == set(inside)
    assert not {before, pci_only, unwitnessed} & ids
    assert package["summary"]["unwitnessed_bundles"] == 1
    segments = {s.appliance_id: s for s in report.segments}
    assert set(segments) == set(size)
    assert segments[first.appliance_id].start == 4  # the first bundle in the period

    # The package's states are the posture's states at the period's end.
    posture = await partner.request("GET", f"/api/v1/sites/{site_id}/posture?framework=hipaa")
    states = {c["control_id"]: c["state"] for c in posture.body["frameworks"][0]["controls"]}
    summary = {c["control_id"]: c for c in package["summary"]["controls"]}
    assert summary[AUTH]["state"] == states[AUTH] == "failing"
    assert summary[AUTH]["latest"]["reason"] == "sshd allows PasswordAuthentication"
    assert summary[AUDIT]["state"] == states[AUDIT] == "passing"
    assert summary[AUDIT]["counts"] == {"pass": 2, "fail": 0, "error": 0, "not_applicable": 0}
    assert set(summary) >= set(states)


def _payload(envelope: dict[str, Any]) -> bytes:
    return base64.b64decode(envelope["payload"])


async def test_tampering_with_a_served_package_is_named(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(2)
    for result in ("pass", "fail", "pass"):
        await _bundle(appliance, controls={"hipaa": (AUDIT,)}, result=result)
    await _sync(appliance, 0)
    status, raw, _reply = await _package(partner, site_id)
    assert status == 200
    assert check_auditor_package(raw, KEYS, at=utc_now()).ok

    dropped = json.loads(raw)
    del dropped["evidence"][1]
    result = check_auditor_package(dropped, KEYS, at=utc_now())
    assert not result.ok
    assert "summary" in result.failures[0].message or "bundle" in result.failures[0].message
    edited = json.loads(raw)
    edited["summary"]["controls"][0]["state"] = (
        "passing" if edited["summary"]["controls"][0]["state"] != "passing" else "failing"
    )
    assert not check_auditor_package(edited, KEYS, at=utc_now()).ok


async def test_a_package_with_no_evidence_still_lists_the_controls(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    status, raw, reply = await _package(partner, site_id)
    assert status == 200, reply.body
    report = check_auditor_package(raw, KEYS, at=utc_now()).unwrap()
    assert report.bundles == 0
    assert reply.body["summary"]["controls"]
    assert {c["state"] for c in reply.body["summary"]["controls"]} == {"no-evidence"}


async def test_a_rotated_key_in_the_period(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(2)
    await _bundle(appliance, controls={"hipaa": (AUDIT,)})
    size = await _sync(appliance, 0)
    appliance.key, appliance.serial = await appliance.rotate()
    await _bundle(appliance, controls={"hipaa": (AUDIT,)}, result="fail")
    await _sync(appliance, size)
    status, raw, _reply = await _package(partner, site_id)
    assert status == 200
    report = check_auditor_package(raw, KEYS, at=utc_now()).unwrap()
    assert report.bundles == 2
    assert len(report.segments[0].key_ids) == 2


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ({"framework": "sox"}, "is not one this site uses"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-01-01T00:00:00Z", "from": "2026-02-01T00:00:00Z"}, "end after it starts"),
        ({"from": "2024-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "longer than 366 days"),
        ({"to": ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]}, "at most once"),
        ({"site": "x"}, "unknown query parameter"),
    ],
    ids=["unused-framework", "bad-time", "backwards", "too-long", "to-twice", "unknown-parameter"],
)
async def test_bad_package_queries(harness: Harness, query: dict[str, Any], detail: str) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    status, _raw, reply = await _package(partner, site_id, **query)
    assert (status, reply.code) == (400, "malformed-query")
    assert detail in reply.body["detail"]


async def test_another_partners_site_has_no_package(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    other = await harness.partner("Other MSP")
    status, _raw, reply = await _package(other, site_id)
    assert (status, reply.code) == (404, "not-found")
