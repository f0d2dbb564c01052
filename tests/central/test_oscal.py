"""The site's posture as an OSCAL Assessment Results document, validated
against compliance-trestle's OSCAL models, on both backends: states map
onto objective statuses, and every evidenced finding links a signed
evidence export the partner can fetch."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import trestle.oscal
from pydantic import ValidationError
from trestle.oscal.assessment_results import AssessmentResults

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.oscal import OSCAL_VERSION, assessment_results, control_token
from msp_central.posture import ControlPosture, FrameworkPosture, Observation
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import parse_time
from tests.central.support import ROOT, Harness, KeyClient

HIPAA_AUDIT = "164.312(b)"  # time_sync: passing
HIPAA_AUTH = "164.312(d)"  # ssh_password_login_disabled: failing, with a reason
HIPAA_ENCRYPTION = "164.312(a)(2)(iv)"  # disk_encryption: error, with a reason
HIPAA_INTEGRITY = "164.312(c)(1)"  # file_integrity: its bundle goes stale
HIPAA_MEDIA = "164.310(d)(1)"  # removable_media: not applicable
HIPAA_RISK = "164.308(a)(1)(ii)(B)"  # only full-tier runbooks map it: manual

NS = "urn:msp:posture"


def validate(document: dict[str, Any]) -> AssessmentResults:
    """The document, parsed by OSCAL's models (strict: extra fields refused)."""
    assert set(document) == {"assessment-results"}
    return AssessmentResults.model_validate(document["assessment-results"])


def props(item: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in item.get("props", []) if p.get("ns") == NS}


async def _site(partner: KeyClient, frameworks: list[str], name: str = "Northside Clinic") -> str:
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": name, "overrides": {"frameworks": frameworks}}
    )
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


async def _oscal(partner: KeyClient, site_id: str, query: str = "") -> dict[str, Any]:
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture/oscal{query}")
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Disposition"] == (
        f'attachment; filename="assessment-results-{site_id}.json"'
    )
    return reply.body  # type: ignore[no-any-return]


async def _every_state(harness: Harness, partner: KeyClient) -> tuple[str, dict[str, str]]:
    """A HIPAA site with a control in each state; the bundle ids by control."""
    site_id = await _site(partner, ["hipaa"])
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(1)
    sent: dict[str, str] = {}

    async def deliver(control: str, check_id: str, result: str, reason: str | None) -> None:
        envelope = appliance.sign_bundle(
            check_id=check_id,
            controls={"hipaa": (control,)},
            result=result,
            observed={"reason": reason} if reason else {"ok": True},
        )
        reply = await appliance.push(envelope)
        assert reply.status == 201, reply.body
        sent[control] = reply.body["bundle_id"]

    await deliver(HIPAA_INTEGRITY, "file_integrity", "pass", None)
    harness.clock.advance(timedelta(minutes=46))  # past 3 rounds of the default 900 s
    await deliver(HIPAA_AUDIT, "time_sync", "pass", None)
    await deliver(
        HIPAA_AUTH, "ssh_password_login_disabled", "fail", "sshd allows PasswordAuthentication"
    )
    await deliver(HIPAA_ENCRYPTION, "disk_encryption", "error", "cannot read the LUKS header")
    await deliver(HIPAA_MEDIA, "removable_media", "not_applicable", "no USB controller")
    return site_id, sent


async def test_every_state_maps_onto_an_objective_status_and_the_document_validates(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id, sent = await _every_state(harness, partner)
    document = await _oscal(partner, site_id)
    parsed = validate(document)
    assert parsed.metadata.oscal_version.root.root == trestle.oscal.OSCAL_VERSION == OSCAL_VERSION

    body = document["assessment-results"]
    metadata = body["metadata"]
    assert "Northside Clinic" in metadata["title"]
    assert body["import-ap"]["href"] == f"urn:msp:assessment-plan:{site_id}"
    assert "No assessment plan document is published" in body["import-ap"]["remarks"]
    (result,) = body["results"]
    assert result["start"] == metadata["last-modified"]
    evaluated = parse_time(result["start"])
    assert abs(evaluated - harness.clock()) < timedelta(seconds=30)
    assert props(result) == {"site-id": site_id}

    # The same posture the posture endpoint computes, control for control.
    posture = await partner.request("GET", f"/api/v1/sites/{site_id}/posture")
    (hipaa,) = posture.body["frameworks"]
    states = {c["control_id"]: c["state"] for c in hipaa["controls"]}
    findings = {props(f)["control-id"]: f for f in result["findings"]}
    assert list(findings) == list(states)
    (selection,) = result["reviewed-controls"]["control-selections"]
    assert props(selection) == {"framework": "hipaa"}
    assert [c["control-id"] for c in selection["include-controls"]] == [
        f["target"]["target-id"] for f in result["findings"]
    ]
    for control_id, finding in findings.items():
        assert props(finding) == {
            "framework": "hipaa",
            "control-id": control_id,
            "posture-state": states[control_id],
        }
        assert finding["target"]["type"] == "objective-id"
        assert finding["target"]["status"]["state"] == (
            "satisfied" if states[control_id] == "passing" else "not-satisfied"
        )

    assert findings[HIPAA_AUTH]["target"]["target-id"] == "hipaa-164.312.d"
    assert findings[HIPAA_RISK]["target"]["target-id"] == "hipaa-164.308.a.1.ii.b"
    expected = {
        HIPAA_AUDIT: ("passing", "satisfied", "pass", "passed"),
        HIPAA_AUTH: ("failing", "not-satisfied", "fail", "sshd allows PasswordAuthentication"),
        HIPAA_ENCRYPTION: ("error", "not-satisfied", "other", "cannot read the LUKS header"),
        HIPAA_INTEGRITY: ("stale", "not-satisfied", "other", "older than its appliance's"),
        HIPAA_MEDIA: ("not_applicable", "not-satisfied", "other", "no USB controller"),
        HIPAA_RISK: ("manual", "not-satisfied", "other", "No automated check covers"),
    }
    for control_id, (state, status, reason, remark) in expected.items():
        target = findings[control_id]["target"]
        assert states[control_id] == state, control_id
        assert (target["status"]["state"], target["status"]["reason"]) == (status, reason)
        assert remark in target["status"]["remarks"], (control_id, target["status"]["remarks"])
    assert findings[HIPAA_MEDIA]["target"]["implementation-status"] == {"state": "not-applicable"}
    assert "implementation-status" not in findings[HIPAA_AUTH]["target"]
    # A covered control with no bundle yet is stale, and says so.
    unevidenced = [c for c, s in states.items() if s == "stale" and c not in sent]
    assert unevidenced
    assert "No evidence yet" in findings[unevidenced[0]]["target"]["status"]["remarks"]
    assert "related-observations" not in findings[unevidenced[0]]
    assert "related-observations" not in findings[HIPAA_RISK]

    # Each evidenced finding names the observation of its bundle.
    observations = {o["uuid"]: o for o in result["observations"]}
    assert len(observations) == len(sent)
    for control_id, bundle_id in sent.items():
        (related,) = findings[control_id]["related-observations"]
        observation = observations[related["observation-uuid"]]
        assert props(observation)["bundle-id"] == bundle_id
        assert observation["methods"] == ["TEST"]
    failed = observations[findings[HIPAA_AUTH]["related-observations"][0]["observation-uuid"]]
    assert failed["description"] == (
        f"Check ssh_password_login_disabled on appliance {props(failed)['appliance-id']}: "
        "fail (sshd allows PasswordAuthentication)."
    )


async def test_every_evidenced_finding_links_the_signed_export_of_its_bundle(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id, sent = await _every_state(harness, partner)
    document = await _oscal(partner, site_id)
    (result,) = document["assessment-results"]["results"]
    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/evidence")
    collected = {e["id"]: e["collected_at"] for e in listed.body["items"]}
    origin = str(harness.client.make_url("/")).rstrip("/")
    linked = set()
    for observation in result["observations"]:
        (evidence,) = observation["relevant-evidence"]
        href = evidence["href"]
        assert href.startswith(f"{origin}/api/v1/sites/{site_id}/evidence/"), href
        bundle_id = props(observation)["bundle-id"]
        # The listing's times are pydantic's (trailing zeros kept): compare instants.
        assert datetime.fromisoformat(observation["collected"]) == datetime.fromisoformat(
            collected[bundle_id]
        )
        reply = await partner.request("GET", urlsplit(href).path)
        assert reply.status == 200, reply.body
        payload = json.loads(Envelope.from_wire(reply.body["evidence"]).payload_bytes())
        assert payload["bundle_id"] == bundle_id
        assert payload["check_id"] in observation["description"]
        assert payload["result"] in observation["description"]
        linked.add(bundle_id)
    assert linked == set(sent.values())


async def test_links_use_the_public_url_behind_a_reverse_proxy(
    harness: Harness, settings: Settings, aiohttp_client: Any
) -> None:
    partner = await harness.partner()
    site_id, _sent = await _every_state(harness, partner)
    proxied = create_app(
        settings.model_copy(update={"public_url": "https://central.example.net"}),
        root=ROOT,
        clock=harness.clock,
    )
    behind = KeyClient(await aiohttp_client(proxied), partner.key, partner.partner_id)
    (result,) = (await _oscal(behind, site_id))["assessment-results"]["results"]
    hrefs = [o["relevant-evidence"][0]["href"] for o in result["observations"]]
    assert hrefs
    assert all(h.startswith(f"https://central.example.net/api/v1/sites/{site_id}/") for h in hrefs)


async def test_every_framework_at_once_gives_distinct_valid_control_ids(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    catalogue = await partner.request("GET", "/api/v1/frameworks")
    every = [f["id"] for f in catalogue.body]
    site_id = await _site(partner, every)
    document = await _oscal(partner, site_id)
    validate(document)
    (result,) = document["assessment-results"]["results"]
    selections = result["reviewed-controls"]["control-selections"]
    assert [props(s)["framework"] for s in selections] == every
    ids = [c["control-id"] for s in selections for c in s["include-controls"]]
    assert len(ids) == len(set(ids)) == sum(len(f["controls"]) for f in catalogue.body)
    assert {f["target"]["target-id"] for f in result["findings"]} == set(ids)
    assert {"nist_csf-gv.oc-01", "pci_dss-1.1.1", "gdpr-art.5.1.a", "soc2-cc6.1"} <= set(ids)

    only = await _oscal(partner, site_id, "?framework=pci_dss")
    (result,) = only["assessment-results"]["results"]
    assert {props(f)["framework"] for f in result["findings"]} == {"pci_dss"}


async def test_another_partner_gets_404_and_a_site_without_frameworks_409(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    other = await harness.partner("Other MSP")
    hidden = await other.request("GET", f"/api/v1/sites/{site_id}/posture/oscal")
    assert (hidden.status, hidden.code) == (404, "not-found")
    empty = await _site(partner, [], "Nothing chosen")
    reply = await partner.request("GET", f"/api/v1/sites/{empty}/posture/oscal")
    assert (reply.status, reply.code) == (409, "conflict")
    assert "no framework" in reply.body["detail"]


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("?framework=sox", "is not one this site uses"),
        ("?framework=hipaa&framework=hipaa", "at most once"),
        ("?days=3", "unknown query parameter"),
    ],
    ids=["unused-framework", "framework-twice", "unknown-parameter"],
)
async def test_bad_queries_are_400s(harness: Harness, query: str, detail: str) -> None:
    partner = await harness.partner()
    site_id = await _site(partner, ["hipaa"])
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/posture/oscal{query}")
    assert (reply.status, reply.code) == (400, "malformed-query")
    assert detail in reply.body["detail"]


# --- the pure document builder ------------------------------------------------------------

AT = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


def _posture(collected: datetime = AT) -> list[FrameworkPosture]:
    bundle = Observation(
        appliance_id="app-1",
        bundle_id="ev-1",
        check_id="time_sync",
        result="pass",
        controls={"hipaa": (HIPAA_AUDIT, HIPAA_AUTH)},
        collected_at=collected,
        log_index=4,
        signed_after_expiry=False,
        in_log=None,
    )
    controls = tuple(
        ControlPosture("hipaa", c, "A control", True, "passing", bundle, 1)
        for c in (HIPAA_AUDIT, HIPAA_AUTH)
    )
    counts: dict[Any, int] = {"passing": 2}
    return [FrameworkPosture("hipaa", "HIPAA", counts, 100, controls)]


def _build(at: datetime = AT, site_id: str = "site-1") -> dict[str, Any]:
    return assessment_results(
        site_id=site_id,
        site_name="Clinic",
        evaluated_at=at,
        posture=_posture(),
        base_url="https://central.example.net",
    )


def _uuids(document: dict[str, Any]) -> list[str]:
    (result,) = document["assessment-results"]["results"]
    return [
        document["assessment-results"]["uuid"],
        result["uuid"],
        *(f["uuid"] for f in result["findings"]),
        *(o["uuid"] for o in result["observations"]),
    ]


def test_uuids_are_deterministic_per_site_and_evaluation_time() -> None:
    first = _build()
    validate(first)
    assert first == _build()
    uuids = _uuids(first)
    assert len(set(uuids)) == len(uuids) == 5  # one bundle behind two controls: one observation
    assert set(uuids).isdisjoint(_uuids(_build(AT + timedelta(seconds=1))))
    assert set(uuids).isdisjoint(_uuids(_build(site_id="site-2")))
    (result,) = first["assessment-results"]["results"]
    (observation,) = result["observations"]
    assert observation["remarks"] == "The bundle is not yet witnessed in its appliance's audit log."
    assert observation["relevant-evidence"][0]["href"] == (
        "https://central.example.net/api/v1/sites/site-1/evidence/app-1/ev-1"
    )


def test_an_empty_posture_is_refused() -> None:
    with pytest.raises(ValueError, match="no control"):
        assessment_results(
            site_id="site-1", site_name="Clinic", evaluated_at=AT, posture=[], base_url=""
        )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("results", 0, "findings", 0, "target", "target-id"), HIPAA_AUDIT),
        (("results", 0, "findings", 0, "target", "status", "state"), "passing"),
        (("results", 0, "findings", 0, "uuid"), "00000000-0000-0000-0000-000000000000"),
        (("results", 0, "observations", 0, "methods"), []),
        (("metadata", "title"), "two\nlines"),
    ],
    ids=["raw-catalogue-id", "our-state-word", "nil-uuid", "no-method", "multiline-title"],
)
def test_the_validator_refuses_what_oscal_refuses(path: tuple[Any, ...], value: Any) -> None:
    """What the OSCAL models check is what the document builder must get
    right: a catalogue id as it stands is not an OSCAL token, and so on."""
    document = _build()
    node: Any = document["assessment-results"]
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(ValidationError):
        validate(document)


def test_control_tokens_follow_oscal_conventions() -> None:
    assert control_token("hipaa", "164.312(a)(2)(iv)") == "hipaa-164.312.a.2.iv"
    assert control_token("nist_csf", "GV.OC-01") == "nist_csf-gv.oc-01"
    assert control_token("cmmc", "AC.L2-3.1.1") == "cmmc-ac.l2-3.1.1"
    assert control_token("gdpr", "Art.32(1)(a)") == "gdpr-art.32.1.a"
    assert control_token("sox", "ITGC AC 01") == "sox-itgc-ac-01"
