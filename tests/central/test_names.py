"""Names as a person reads them: stored in NFC with plain spacing, nothing
invisible in them, and one name per partner and per site of a partner."""

from __future__ import annotations

import pytest

from tests.central.support import Harness


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("Cafe\u0301 Clinic", "Caf\u00e9 Clinic"),
        ("North\u00a0side  Clinic", "North side Clinic"),
        ("  Law\u2009office ", "Law office"),
    ],
    ids=["nfc", "no-break-space", "thin-space"],
)
async def test_names_are_stored_as_typed_and_read(
    harness: Harness, given: str, stored: str
) -> None:
    partner = await harness.partner()
    created = await partner.request("POST", "/api/v1/sites", {"name": given})
    assert created.status == 201, created.body
    assert created.body["name"] == stored


@pytest.mark.parametrize(
    "name",
    ["Acme MSP\u200b", "\u202eACME", "Acme\u2028MSP", "\ufeffAcme", "\u200b\u200c", "Acme\ue000"],
    ids=["zero-width-space", "bidi-override", "line-separator", "bom", "only-invisible", "private"],
)
async def test_invisible_characters_are_refused(harness: Harness, name: str) -> None:
    admin = await harness.admin()
    reply = await admin.request("POST", "/api/v1/partners", {"name": name})
    assert (reply.status, reply.code) == (400, "malformed-document"), reply.body
    partner = await harness.partner()
    reply = await partner.request("POST", "/api/v1/sites", {"name": name})
    assert (reply.status, reply.code) == (400, "malformed-document"), reply.body


async def test_one_partner_per_name(harness: Harness) -> None:
    admin = await harness.admin()
    first = await admin.request("POST", "/api/v1/partners", {"name": "Acme Networks"})
    assert first.status == 201
    for twin in ("acme networks", "ACME\u00a0Networks", "Acme  Networks", "\uff21cme Networks"):
        reply = await admin.request("POST", "/api/v1/partners", {"name": twin})
        assert (reply.status, reply.code) == (409, "conflict"), (twin, reply.body)
        assert first.body["partner"]["id"] in reply.body["detail"]


async def test_one_site_per_name_within_a_partner(harness: Harness) -> None:
    partner = await harness.partner()
    other = await harness.partner()
    first = await partner.request("POST", "/api/v1/sites", {"name": "Northside Clinic"})
    second = await partner.request("POST", "/api/v1/sites", {"name": "Southside Clinic"})
    twin = await partner.request("POST", "/api/v1/sites", {"name": "northside\u00a0clinic"})
    assert (twin.status, twin.code) == (409, "conflict")
    # Another partner's sites are its own business.
    assert (
        await other.request("POST", "/api/v1/sites", {"name": "Northside Clinic"})
    ).status == 201
    # Renaming onto another site's name is refused; onto its own, harmless.
    clash = await partner.request(
        "PATCH", f"/api/v1/sites/{second.body['id']}", {"name": "NORTHSIDE CLINIC"}
    )
    assert (clash.status, clash.code) == (409, "conflict")
    same = await partner.request(
        "PATCH", f"/api/v1/sites/{first.body['id']}", {"name": "Northside  Clinic"}
    )
    assert same.status == 200, same.body
    # A decommissioned site's name is free again.
    assert (await partner.request("DELETE", f"/api/v1/sites/{first.body['id']}")).status == 200
    again = await partner.request("POST", "/api/v1/sites", {"name": "Northside Clinic"})
    assert again.status == 201, again.body
