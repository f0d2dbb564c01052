"""What fuzzing the server from its own OpenAPI document found, one test a
finding: where the document allowed what the server refused (or the other
way round), the two now agree."""

from __future__ import annotations

import base64
import re
import sys
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msp_central.names import name_pattern, readable_name
from msp_central.openapi import QUERY_PARAMETERS, document
from msp_protocol.encoding import b64decode
from msp_protocol.errors import MalformedError
from tests.central.support import Harness


def _schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}


def _valid(name: str, value: Any) -> bool:
    return jsonschema.Draft202012Validator(_schema(name)).is_valid(value)


def test_the_documented_name_pattern_is_what_the_server_takes() -> None:
    """Every character (surrogates are not characters), alone and after a
    letter: the pattern matches exactly when readable_name accepts."""
    pattern = re.compile(name_pattern())
    disagree = []
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        for text in (chr(code), "a" + chr(code), " " + chr(code) + " "):
            try:
                readable_name(text)
                accepted = True
            except ValueError:
                accepted = False
            if accepted != bool(pattern.fullmatch(text)):
                disagree.append(f"U+{code:04X}")
    assert not disagree, disagree[:20]
    schema = document()["components"]["schemas"]["PartnerCreate"]["properties"]["name"]
    assert schema["pattern"] == name_pattern()


async def test_a_name_with_a_c1_control_is_refused_by_both(harness: Harness) -> None:
    admin = await harness.admin()
    for name in ("Acme\u0086MSP", "Acme\U000f5fb4", "   "):
        assert not _valid("PartnerCreate", {"name": name})
        refused = await admin.request("POST", "/api/v1/partners", {"name": name})
        assert refused.status == 400, refused.body
    assert _valid("PartnerCreate", {"name": "Ærø Clinic — North"})
    made = await admin.request("POST", "/api/v1/partners", {"name": "Ærø Clinic — North"})
    assert made.status == 201, made.body


async def test_a_framework_listed_twice_is_refused_by_both(harness: Harness) -> None:
    partner = await harness.partner()
    twice = {"tier": "full", "frameworks": ["hipaa", "sox", "hipaa"]}
    assert not _valid("PartnerDefaults", twice)
    refused = await partner.request("PUT", "/api/v1/partner/defaults", twice)
    assert (refused.status, refused.code) == (400, "malformed-document")
    once = {"tier": "full", "frameworks": ["hipaa", "sox"]}
    assert _valid("PartnerDefaults", once)
    assert (await partner.request("PUT", "/api/v1/partner/defaults", once)).status == 200


def _free_text_parameters() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for (method, path), parameters in QUERY_PARAMETERS.items():
        for parameter in parameters:
            schema = parameter["schema"]
            schema = schema.get("items", schema) if schema.get("type") == "array" else schema
            if schema.get("type") == "string" and "enum" not in schema and "format" not in schema:
                found.append((f"{method.upper()} {path}", parameter["name"], schema))
    return found


def test_every_free_text_query_parameter_states_no_control_characters() -> None:
    """The server refuses a control character in any query value: each
    string parameter's pattern says so."""
    found = _free_text_parameters()
    assert len(found) >= 10
    for operation, name, schema in found:
        assert "pattern" in schema, (operation, name)
        assert not re.search(schema["pattern"], "a\x1eb"), (operation, name)
        assert not re.search(schema["pattern"], "a\x7fb"), (operation, name)


async def test_a_control_character_in_a_filter_is_refused(harness: Harness) -> None:
    partner = await harness.partner()
    for path in ("/api/v1/appliances?site_id=%1E", "/api/v1/sites?name=a%02b"):
        refused = await partner.request("GET", path)
        assert (refused.status, refused.code) == (400, "malformed-query"), path


@pytest.mark.parametrize(
    "moment",
    [
        "2026-11-25T12:00:00+02:00",
        "2026-11-25t12:00:00.123456789z",
        "2026-11-25T12:00:00.10Z",
        "0001-01-01T00:00:00+23:59",  # before the first moment there is
        "9999-12-31T23:59:59-23:59",  # after the last
        "2016-12-31T23:59:60Z",  # a leap second
    ],
)
async def test_any_rfc_3339_date_time_is_a_filter_bound(harness: Harness, moment: str) -> None:
    """The document says format date-time: any offset, any fraction."""
    partner = await harness.partner()
    site = await harness.site(partner)
    quoted = moment.replace("+", "%2B")
    for path in (
        f"/api/v1/escalations?from={quoted}",
        f"/api/v1/security-alerts?to={quoted}",
        f"/api/v1/sites/{site}/evidence?from={quoted}",
    ):
        reply = await partner.request("GET", path)
        assert reply.status == 200, (path, reply.body)


async def test_an_offset_period_of_an_auditor_package(harness: Harness) -> None:
    partner = await harness.partner()
    defaults = {"tier": "basic", "frameworks": ["hipaa"]}
    assert (await partner.request("PUT", "/api/v1/partner/defaults", defaults)).status == 200
    site = await harness.site(partner)
    path = f"/api/v1/sites/{site}/auditor-package?from=2026-11-01T00:00:00%2B01:00"
    reply = await partner.request("GET", path)
    assert reply.status == 200, reply.body
    assert reply.body["period_start"] == "2026-10-31T23:00:00Z"
    bad = await partner.request("GET", f"/api/v1/sites/{site}/auditor-package?to=yesterday")
    assert (bad.status, bad.code) == (400, "malformed-query")


async def test_an_auditor_package_of_a_site_without_frameworks_is_a_conflict(
    harness: Harness,
) -> None:
    """Nothing is wrong with the request; the site's settings leave nothing
    to package (as with the site's OSCAL posture)."""
    partner = await harness.partner()
    site = await harness.site(partner)
    reply = await partner.request("GET", f"/api/v1/sites/{site}/auditor-package")
    assert (reply.status, reply.code) == (409, "conflict"), reply.body


async def test_enrollment_looks_at_the_token_before_the_request(harness: Harness) -> None:
    """An unknown token is refused as such, whatever the envelope holds; the
    document names the one payload type an enrollment request has."""
    envelope = {
        "payloadType": "0",
        "payload": "",
        "signatures": [{"keyid": "0123456789abcdef", "sig": ""}],
    }
    reply = await harness.client.post(
        "/api/v1/enroll", json={"token": "t" * 32, "request": envelope}
    )
    body = await reply.json()
    assert (reply.status, body["code"]) == (403, "bad-enrollment-token"), body
    assert not _valid("EnrollIn", {"token": "t" * 32, "request": envelope})
    enroll = {**envelope, "payloadType": "application/vnd.msp.delegation-request.v1+json"}
    assert _valid("EnrollIn", {"token": "t" * 32, "request": enroll})


@given(st.text(alphabet="AQgwEIMa+/=0z9", max_size=12))
def test_the_documented_base64_is_what_the_server_decodes(text: str) -> None:
    pattern = document()["components"]["schemas"]["ManualEvidenceIn"]["properties"]["content"]
    try:
        decoded = b64decode(text, what="content")
        accepted = bool(decoded)
    except MalformedError:
        accepted = False
    assert accepted == bool(re.search(pattern["pattern"], text)), text


def test_canonical_base64_of_any_bytes_matches_the_pattern() -> None:
    pattern = document()["components"]["schemas"]["ManualEvidenceIn"]["properties"]["content"]
    for size in range(1, 9):
        text = base64.b64encode(bytes(range(250, 250 - size, -1))).decode()
        assert re.search(pattern["pattern"], text), text


async def test_an_invitation_address_as_the_document_and_the_server_read_it(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    for email, ok in (("000", False), ("a@b", False), (" New.Person@Example.com ", True)):
        assert _valid("InviteCreate", {"email": email, "role": "viewer"}) is ok, email
        reply = await partner.request(
            "POST", "/api/v1/user-invites", {"email": email, "role": "viewer"}
        )
        assert reply.status == (201 if ok else 400), (email, reply.body)


async def test_a_channel_takes_the_address_of_its_kind(harness: Harness) -> None:
    partner = await harness.partner()
    for body in (
        {"kind": "email"},
        {"kind": "webhook"},
        {"kind": "webhook", "email": "ops@example.com", "url": "http://127.0.0.1:9/"},
        {"kind": "email", "url": "http://127.0.0.1:9/"},
    ):
        assert not _valid("ChannelCreate", body), body
        reply = await partner.request("POST", "/api/v1/notification-channels", body)
        assert (reply.status, reply.code) == (400, "malformed-document"), (body, reply.body)
    webhook = {"kind": "webhook", "url": "http://127.0.0.1:9/hooks", "email": None}
    assert _valid("ChannelCreate", webhook)
    made = await partner.request("POST", "/api/v1/notification-channels", webhook)
    assert made.status == 201, made.body
