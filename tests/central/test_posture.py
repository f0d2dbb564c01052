"""Compliance posture: per control from the latest signed evidence, roll-ups
across a partner's sites, and the daily trend, on both backends."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from msp_central.api_models import PartnerPostureOut
from msp_protocol.encoding import format_time
from tests.central.support import ApplianceClient, Harness, KeyClient

HIPAA_AUDIT = "164.312(b)"  # mapped to time_sync (basic tier)
HIPAA_AUTH = "164.312(d)"  # mapped to ssh_password_login_disabled (basic tier)
HIPAA_RISK = "164.308(a)(1)(ii)(B)"  # mapped only to full-tier runbooks


async def _hipaa_site(
    harness: Harness, partner: KeyClient, name: str = "Northside Clinic", tier: str = "basic"
) -> str:
    reply = await partner.request(
        "POST",
        "/api/v1/sites",
        {"name": name, "overrides": {"frameworks": ["hipaa"], "tier": tier}},
    )
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


async def _deliver(appliance: ApplianceClient, **bundle: Any) -> str:
    if not appliance.records:
        appliance.grow(1)
    envelope = appliance.sign_bundle(**bundle)
    reply = await appliance.push(envelope)
    assert reply.status == 201, reply.body
    return str(reply.body["bundle_id"])


async def _posture(partner: KeyClient, site_id: str, query: str = "") -> dict[str, Any]:
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture{query}")
    assert reply.status == 200, reply.body
    return reply.body  # type: ignore[no-any-return]


def _controls(posture: dict[str, Any], framework: str = "hipaa") -> dict[str, dict[str, Any]]:
    (found,) = [f for f in posture["frameworks"] if f["framework_id"] == framework]
    return {c["control_id"]: c for c in found["controls"]}


async def _basic_coverage(partner: KeyClient, framework: str) -> tuple[set[str], set[str]]:
    """The framework's controls, and those a basic-tier runbook covers."""
    catalogue = await partner.request("GET", f"/api/v1/frameworks/{framework}")
    runbooks = await partner.request("GET", "/api/v1/runbooks")
    basic = {r["id"] for r in runbooks.body if r["tier"] == "basic"}
    every = {c["id"] for c in catalogue.body["controls"]}
    covered = {c["id"] for c in catalogue.body["controls"] if basic & set(c["runbooks"])}
    return every, covered


async def test_a_new_site_is_stale_where_checks_cover_and_manual_elsewhere(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    posture = await _posture(partner, site_id)
    every, covered = await _basic_coverage(partner, "hipaa")
    controls = _controls(posture)
    assert set(controls) == every
    assert {c for c, v in controls.items() if v["state"] == "stale"} == covered
    assert {c for c, v in controls.items() if v["state"] == "manual"} == every - covered
    assert controls[HIPAA_RISK]["state"] == "manual"  # its runbooks are full tier only
    assert all(v["evidence"] is None for v in controls.values())
    (hipaa,) = posture["frameworks"]
    assert hipaa["score"] == 0
    assert hipaa["counts"]["stale"] == len(covered)
    assert sum(hipaa["counts"].values()) == len(every)


async def test_states_follow_the_latest_evidence_with_its_reason(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    await _deliver(appliance, check_id="time_sync", controls={"hipaa": (HIPAA_AUDIT,)})
    failed = await _deliver(
        appliance,
        check_id="ssh_password_login_disabled",
        controls={"hipaa": (HIPAA_AUTH,)},
        result="fail",
        observed={"reason": "sshd allows PasswordAuthentication", "password": True},
    )
    controls = _controls(await _posture(partner, site_id))
    assert controls[HIPAA_AUDIT]["state"] == "passing"
    assert controls[HIPAA_AUDIT]["automated"] is True
    auth = controls[HIPAA_AUTH]
    assert auth["state"] == "failing"
    assert auth["evidence"]["bundle_id"] == failed
    assert auth["evidence"]["appliance_id"] == appliance.appliance_id
    assert auth["evidence"]["reason"] == "sshd allows PasswordAuthentication"
    assert auth["evidence"]["check_id"] == "ssh_password_login_disabled"

    harness.clock.advance(timedelta(minutes=1))
    fixed = await _deliver(
        appliance, check_id="ssh_password_login_disabled", controls={"hipaa": (HIPAA_AUTH,)}
    )
    auth = _controls(await _posture(partner, site_id))[HIPAA_AUTH]
    assert (auth["state"], auth["evidence"]["bundle_id"], auth["evidence"]["reason"]) == (
        "passing",
        fixed,
        None,
    )


async def test_the_worst_appliance_decides_and_errors_say_why(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    first = await harness.enroll(partner, site_id)
    second = await harness.enroll(partner, site_id)
    await _deliver(first, controls={"hipaa": (HIPAA_AUDIT,)})
    await _deliver(
        second,
        controls={"hipaa": (HIPAA_AUDIT,)},
        result="error",
        observed={"reason": "cannot read the clock: permission denied"},
    )
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert audit["state"] == "error"
    assert audit["checks"] == 2
    assert audit["evidence"]["appliance_id"] == second.appliance_id
    assert audit["evidence"]["reason"] == "cannot read the clock: permission denied"

    # A revoked appliance's evidence stops counting.
    revoked = await partner.request(
        "POST", f"/api/v1/certificates/{second.serial}/revoke", {"reason": "decommissioned"}
    )
    assert revoked.status == 200, revoked.body
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert (audit["state"], audit["checks"]) == ("passing", 1)


async def test_evidence_goes_stale_after_missed_rounds_of_the_reported_interval(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)})
    harness.clock.advance(timedelta(minutes=40))  # under 3 rounds of the default 900 s
    assert _controls(await _posture(partner, site_id))[HIPAA_AUDIT]["state"] == "passing"
    harness.clock.advance(timedelta(minutes=6))
    stale = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert stale["state"] == "stale"
    assert stale["evidence"]["result"] == "pass"  # the evidence it last had is still shown

    beat = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/heartbeat",
        {
            "version": "1",
            "log_size": len(appliance.records),
            "queues": {},
            "clock": format_time(harness.clock()),
            "check_interval_seconds": 60,
        },
    )
    assert beat.status == 200, beat.body
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)})
    harness.clock.advance(timedelta(seconds=179))
    assert _controls(await _posture(partner, site_id))[HIPAA_AUDIT]["state"] == "passing"
    harness.clock.advance(timedelta(seconds=2))
    assert _controls(await _posture(partner, site_id))[HIPAA_AUDIT]["state"] == "stale"


async def test_score_counts_only_controls_evidence_decides(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    _every, covered = await _basic_coverage(partner, "hipaa")
    await _deliver(appliance, controls={"hipaa": tuple(sorted(covered))})
    (hipaa,) = (await _posture(partner, site_id))["frameworks"]
    assert hipaa["counts"]["passing"] == len(covered)
    assert hipaa["score"] == 100
    await _deliver(
        appliance, check_id="firewall_active", controls={"hipaa": (HIPAA_AUDIT,)}, result="fail"
    )
    (hipaa,) = (await _posture(partner, site_id))["frameworks"]
    assert hipaa["counts"]["failing"] == 1
    assert hipaa["score"] == round(100 * (len(covered) - 1) / len(covered))


async def test_partner_rollup_sorts_failing_controls_by_sites_and_sees_only_its_own(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    sites = [await _hipaa_site(harness, partner, f"Clinic {n}") for n in range(3)]
    for n, site_id in enumerate(sites):
        appliance = await harness.enroll(partner, site_id)
        await _deliver(
            appliance,
            controls={"hipaa": (HIPAA_AUDIT,)},
            result="fail" if n < 2 else "pass",
            observed={"reason": f"clock off by {n + 5} s"},
        )
        await _deliver(
            appliance,
            check_id="ssh_password_login_disabled",
            controls={"hipaa": (HIPAA_AUTH,)},
            result="fail" if n == 0 else "pass",
        )
    other = await harness.partner("Other MSP")
    await harness.enroll(other, await _hipaa_site(harness, other, "Elsewhere"))

    reply = await partner.request("GET", "/api/v1/posture")
    assert reply.status == 200, reply.body
    body = reply.body
    assert [s["site_id"] for s in body["sites"]] == sites
    failing = [(c["control_id"], c["site_count"]) for c in body["failing_controls"]]
    assert failing == [(HIPAA_AUDIT, 2), (HIPAA_AUTH, 1)]
    assert [s["site_id"] for s in body["failing_controls"][0]["sites"]] == sites[:2]
    assert body["failing_controls"][0]["sites"][1]["evidence"]["reason"] == "clock off by 6 s"
    (hipaa,) = body["frameworks"]
    assert hipaa["site_count"] == 3
    assert hipaa["counts"]["failing"] == 3
    assert hipaa["counts"]["passing"] == 3
    # Built as JSON values for speed, the answer is exactly the model's.
    assert PartnerPostureOut.model_validate(body).model_dump(mode="json") == body

    theirs = await other.request("GET", "/api/v1/posture")
    assert [s["name"] for s in theirs.body["sites"]] == ["Elsewhere"]
    assert theirs.body["failing_controls"] == []
    hidden = await other.request("GET", f"/api/v1/sites/{sites[0]}/posture")
    assert (hidden.status, hidden.code) == (404, "not-found")
    hidden = await other.request("GET", f"/api/v1/sites/{sites[0]}/posture/trend")
    assert (hidden.status, hidden.code) == (404, "not-found")


async def test_framework_filter(harness: Harness) -> None:
    partner = await harness.partner()
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": "Both", "overrides": {"frameworks": ["hipaa", "pci_dss"]}}
    )
    site_id = reply.body["id"]
    both = await _posture(partner, site_id)
    assert [f["framework_id"] for f in both["frameworks"]] == ["hipaa", "pci_dss"]
    only = await _posture(partner, site_id, "?framework=pci_dss")
    assert [f["framework_id"] for f in only["frameworks"]] == ["pci_dss"]


async def test_trend_is_the_posture_at_each_days_end(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    now = harness.clock()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    harness.clock.advance(midnight - now)
    start = harness.clock()
    # Day 0: passing from noon on; day 1: failing at noon; day 2: nothing at all.
    harness.clock.advance(timedelta(hours=12))
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)})
    harness.clock.advance(timedelta(hours=11, minutes=50))
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)})
    harness.clock.advance(timedelta(hours=12, minutes=10))
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)}, result="fail")
    harness.clock.advance(timedelta(hours=11, minutes=55))
    await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)}, result="fail")
    harness.clock.advance(timedelta(days=1, hours=1))

    # Now: day 3, 01:55. Five days back: the day before day 0, days 0 to 2, today.
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture/trend?days=5")
    assert reply.status == 200, reply.body
    days = reply.body["days"]
    day0 = start.date()
    assert [d["date"] for d in days] == [
        (day0 + timedelta(days=n)).isoformat() for n in range(-1, 4)
    ]
    counts = [d["frameworks"][0]["counts"] for d in days]
    assert (counts[0]["passing"], counts[0]["failing"]) == (0, 0)  # nothing yet
    assert counts[1]["passing"] == 1  # the 23:50 bundle is fresh at midnight
    assert (counts[2]["passing"], counts[2]["failing"]) == (0, 1)
    assert (counts[3]["failing"], counts[3]["stale"]) == (0, counts[0]["stale"])  # no news: stale
    assert counts[4] == counts[3]
    assert days[4]["at"] == reply.body["days"][4]["at"]
    full = await partner.request("GET", f"/api/v1/sites/{site_id}/posture/trend")
    assert len(full.body["days"]) == 90


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/posture/trend?days=0", "days must be"),
        ("/posture/trend?days=91", "days must be"),
        ("/posture/trend?days=x", "days must be"),
        ("/posture/trend?days=%EF%BC%91", "days must be"),
        ("/posture?framework=sox", "is not one this site uses"),
        ("/posture?framework=hipaa&framework=hipaa", "at most once"),
        ("/posture?open=yes", "unknown query parameter"),
    ],
    ids=[
        "zero-days",
        "too-many-days",
        "not-a-number",
        "fullwidth-digit",
        "unused-framework",
        "framework-twice",
        "unknown-parameter",
    ],
)
async def test_bad_queries_are_400s(harness: Harness, path: str, detail: str) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}{path}")
    assert (reply.status, reply.code) == (400, "malformed-query")
    assert detail in reply.body["detail"]
    unknown = await partner.request("GET", "/api/v1/posture?site=x")
    assert (unknown.status, unknown.code) == (400, "malformed-query")


async def test_a_clock_that_jumped_ahead_once_does_not_freeze_a_check(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(1)
    ahead = appliance.clock
    appliance.clock = lambda: ahead() + timedelta(days=365)
    early = appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)})
    appliance.clock = ahead
    assert (await appliance.push(early)).status == 201
    failed = await _deliver(appliance, controls={"hipaa": (HIPAA_AUDIT,)}, result="fail")
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    # The appliance's own order (its log) decides which bundle is newest.
    assert (audit["state"], audit["evidence"]["bundle_id"]) == ("failing", failed)


async def test_a_bundle_its_log_contradicts_counts_for_nothing(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(1)
    genuine = appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)})
    # The bundle pushed is not the one its log entry records.
    appliance.records.pop()
    other = appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)}, result="fail")
    assert (await appliance.push(genuine)).status == 201
    assert (await appliance.sync(appliance.batch(0))).status == 200
    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/evidence")
    assert [(e["id"], e["in_log"]) for e in listed.body["items"]] == [(_id_of(genuine), False)]
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert (audit["state"], audit["evidence"], audit["checks"]) == ("stale", None, 0)
    assert _id_of(other) != _id_of(genuine)


async def test_a_late_older_bundle_does_not_displace_the_newer(harness: Harness) -> None:
    """Bundles queued offline arrive out of order: the appliance's log order
    decides which one speaks, not the order of arrival."""
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(1)
    older = appliance.sign_bundle(
        controls={"hipaa": (HIPAA_AUDIT,)}, result="fail", observed={"reason": "drift 9 s"}
    )
    harness.clock.advance(timedelta(minutes=1))
    newer = appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)})
    assert (await appliance.push(newer)).status == 201
    assert (await appliance.push(older)).status == 201
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert (audit["state"], audit["evidence"]["bundle_id"]) == ("passing", _id_of(newer))


async def test_a_contradicted_newest_bundle_gives_way_to_the_one_before(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(1)
    before = await _deliver(
        appliance,
        controls={"hipaa": (HIPAA_AUDIT,)},
        result="fail",
        observed={"reason": "clock drift 9 s"},
    )
    harness.clock.advance(timedelta(minutes=1))
    genuine = appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)})
    appliance.records.pop()
    appliance.sign_bundle(controls={"hipaa": (HIPAA_AUDIT,)}, result="error")
    assert (await appliance.push(genuine)).status == 201
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert (audit["state"], audit["evidence"]["in_log"]) == ("passing", None)
    # The witnessed log shows the newest bundle was not what the appliance
    # logged: the bundle before it speaks again, with its reason.
    assert (await appliance.sync(appliance.batch(0))).status == 200
    audit = _controls(await _posture(partner, site_id))[HIPAA_AUDIT]
    assert audit["state"] == "failing"
    assert audit["evidence"]["bundle_id"] == before
    assert audit["evidence"]["reason"] == "clock drift 9 s"
    assert audit["evidence"]["in_log"] is True


def _id_of(envelope: Any) -> str:
    return str(json.loads(envelope.payload_bytes())["bundle_id"])


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/sites/%00/posture",
        "/api/v1/sites/%00/posture/trend",
        "/api/v1/sites/%00/auditor-package",
        "/api/v1/sites/%00/manual-evidence",
        "/api/v1/sites/x/manual-evidence/%00",
        "/api/v1/sites/x/evidence/%00/y",
        "/api/v1/sites/x/appliances/%01/audit-export",
        "/api/v1/sites/%00",
    ],
)
async def test_control_characters_in_path_ids_are_404s_on_every_backend(
    harness: Harness, path: str
) -> None:
    partner = await harness.partner()
    reply = await partner.request("GET", path)
    assert (reply.status, reply.code) == (404, "not-found")


async def test_absurd_query_values_are_400s(harness: Harness) -> None:
    partner = await harness.partner()
    site_id = await _hipaa_site(harness, partner)
    for path in (
        f"/api/v1/sites/{site_id}/posture/trend?days={'9' * 5000}",
        f"/api/v1/sites/{site_id}/posture/trend?days=3&days=4",
        f"/api/v1/sites/{site_id}/auditor-package?to=0001-01-01T00:00:00Z",
        f"/api/v1/sites/{site_id}/auditor-package?from=0001-01-01T00:00:00Z",
    ):
        reply = await partner.request("GET", path)
        assert (reply.status, reply.code) == (400, "malformed-query"), path
