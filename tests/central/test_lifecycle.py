"""What changes over a resource's life: settings by JSON Merge Patch,
renaming and decommissioning sites and appliances, enrollment tokens listed
and revoked, API keys created, rotated and revoked. Every response is
checked against the OpenAPI document (support.call)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central.db.tables import central_log_entries
from tests.central.support import Harness, KeyClient, Reply, call

MERGE_PATCH = "application/merge-patch+json"
INHERIT: dict[str, Any] = {"industry": None, "tier": None, "frameworks": None}


async def patch(caller: KeyClient, path: str, value: Any, content_type: str = MERGE_PATCH) -> Reply:
    return await call(
        caller.client,
        "PATCH",
        path,
        body=json.dumps(value).encode(),
        headers={"Authorization": f"Bearer {caller.key}", "Content-Type": content_type},
    )


async def new_site(partner: KeyClient, name: str = "Clinic", **overrides: Any) -> dict[str, Any]:
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": name, "overrides": overrides or INHERIT}
    )
    assert reply.status == 201, reply.body
    return dict(reply.body)


async def log_kinds(harness: Harness) -> list[str]:
    async with harness.engine.connect() as connection:
        rows = await connection.execute(
            sa.select(central_log_entries.c.kind).order_by(central_log_entries.c.idx)
        )
        return [row.kind for row in rows]


async def log_raw(harness: Harness) -> bytes:
    async with harness.engine.connect() as connection:
        rows = await connection.execute(sa.select(central_log_entries.c.raw))
        return b"".join(bytes(row.raw) for row in rows)


async def enroll_with(harness: Harness, token: str) -> Reply:
    return await harness.enroll_with(token)


# --- settings by merge patch ------------------------------------------------------------


async def test_merge_patch_of_the_defaults_keeps_absent_members_and_clears_null(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    put = await partner.request(
        "PUT",
        "/api/v1/partner/defaults",
        {"industry": "healthcare", "tier": "full", "frameworks": ["hipaa", "soc2"]},
    )
    assert put.status == 200, put.body

    reply = await patch(partner, "/api/v1/partner/defaults", {"frameworks": ["hipaa"]})
    assert reply.status == 200, reply.body
    assert reply.body["defaults"] == {
        "industry": "healthcare",
        "tier": "full",
        "frameworks": ["hipaa"],
    }
    assert reply.body["warnings"] == []

    # null clears: industry none, tier basic; plain JSON is accepted too.
    reply = await patch(
        partner,
        "/api/v1/partner/defaults",
        {"industry": None, "tier": None},
        content_type="application/json",
    )
    assert reply.status == 200, reply.body
    assert reply.body["defaults"] == {"industry": None, "tier": "basic", "frameworks": ["hipaa"]}
    reply = await patch(partner, "/api/v1/partner/defaults", {"frameworks": None})
    assert reply.body["defaults"]["frameworks"] == []
    assert [w["code"] for w in reply.body["warnings"]] == ["no-frameworks"]
    # An empty patch changes nothing, and the PUT still replaces it all.
    assert (await patch(partner, "/api/v1/partner/defaults", {})).body["defaults"] == {
        "industry": None,
        "tier": "basic",
        "frameworks": [],
    }
    assert (await log_kinds(harness)).count("partner.defaults") == 5


async def test_merge_patch_of_site_overrides(harness: Harness) -> None:
    partner = await harness.partner()
    site = await new_site(partner, tier="full", frameworks=["hipaa"])
    path = f"/api/v1/sites/{site['id']}/overrides"

    reply = await patch(partner, path, {"industry": "healthcare"})
    assert reply.status == 200, reply.body
    assert reply.body["overrides"] == {
        "industry": "healthcare",
        "tier": "full",
        "frameworks": ["hipaa"],
    }
    assert reply.body["warnings"] == []
    assert reply.body["decommissioned_at"] is None
    got = await partner.request("GET", f"/api/v1/sites/{site['id']}")
    assert {k: v for k, v in reply.body.items() if k != "warnings"} == got.body

    # An industry whose preset shares no framework with the selection.
    reply = await patch(partner, path, {"frameworks": ["pci_dss"]})
    assert [w["code"] for w in reply.body["warnings"]] == ["industry-mismatch"]
    assert "healthcare" in reply.body["warnings"][0]["detail"]

    # null: back to inheriting the partner's default (here: none).
    reply = await patch(partner, path, {"frameworks": None, "tier": None})
    assert reply.body["overrides"] == {"industry": "healthcare", "tier": None, "frameworks": None}
    assert reply.body["effective"]["sources"]["frameworks"] == "partner"
    assert [w["code"] for w in reply.body["warnings"]] == ["no-frameworks"]
    assert (await log_kinds(harness)).count("site.overrides") == 3


@pytest.mark.parametrize(
    ("value", "content_type", "status", "code", "detail"),
    [
        pytest.param({"frameworks": ["nist_999"]}, MERGE_PATCH, 400, "malformed-document",
                     "unknown framework", id="unknown-framework"),
        pytest.param({"frameworks": ["hipaa", "hipaa"]}, MERGE_PATCH, 400, "malformed-document",
                     "listed twice", id="duplicate"),
        pytest.param({"tier": "premium"}, MERGE_PATCH, 400, "malformed-document", "tier",
                     id="tier"),
        pytest.param({"colour": None}, MERGE_PATCH, 400, "malformed-document", "colour",
                     id="unknown-member"),
        pytest.param(["hipaa"], MERGE_PATCH, 400, "malformed-document", "not a JSON object",
                     id="not-an-object"),
        pytest.param({"tier": "full"}, "text/plain", 415, "unsupported-media-type",
                     "merge-patch", id="media-type"),
    ],
)  # fmt: skip
async def test_a_bad_patch_changes_nothing(
    harness: Harness, value: Any, content_type: str, status: int, code: str, detail: str
) -> None:
    partner = await harness.partner()
    site = await new_site(partner, tier="full", frameworks=["hipaa"])
    before = await log_kinds(harness)
    for path in ("/api/v1/partner/defaults", f"/api/v1/sites/{site['id']}/overrides"):
        reply = await patch(partner, path, value, content_type)
        assert reply.status == status, reply.body
        assert reply.code == code
        assert detail in reply.body["detail"]
    assert (await partner.request("GET", f"/api/v1/sites/{site['id']}")).body == site
    assert await log_kinds(harness) == before


# --- sites ------------------------------------------------------------------------------


async def test_rename_a_site(harness: Harness) -> None:
    partner = await harness.partner()
    site = await new_site(partner)
    path = f"/api/v1/sites/{site['id']}"
    reply = await partner.request("PATCH", path, {"name": "  Clinic North  "})
    assert reply.status == 200, reply.body
    assert reply.body == {**site, "name": "Clinic North"}
    assert (await partner.request("GET", path)).body["name"] == "Clinic North"
    for bad in ({"name": ""}, {"name": "a\nb"}, {}, {"name": "x", "id": "y"}):
        refused = await partner.request("PATCH", path, bad)
        assert refused.status == 400, (bad, refused.body)
        assert refused.code == "malformed-document"
    assert (await log_kinds(harness)).count("site.renamed") == 1


async def test_decommissioning_a_site(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    site_id = appliance.site_id
    appliance.grow(3)
    envelope = appliance.sign_bundle()
    assert (await appliance.push(envelope)).status == 201
    assert (await appliance.sync(appliance.batch(0))).status == 200
    unused = await harness.token(partner, site_id)

    reply = await partner.request("DELETE", f"/api/v1/sites/{site_id}")
    assert reply.status == 200, reply.body
    decommissioned = reply.body["decommissioned_at"]
    assert decommissioned is not None
    # Repeating it changes nothing.
    again = await partner.request("DELETE", f"/api/v1/sites/{site_id}")
    assert again.status == 200, again.body
    assert again.body == reply.body
    kinds = await log_kinds(harness)
    assert kinds.count("site.decommissioned") == 1
    assert kinds.count("appliance.decommissioned") == 1
    assert kinds.count("certificate.revoked") == 1

    # The appliance is refused; its certificate is on the revocation list.
    refused = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/heartbeat",
        {"version": "1", "log_size": 4, "queues": {}, "clock": "2026-01-01T00:00:00Z"},
    )
    assert refused.status == 403, refused.body
    assert refused.code == "appliance-revoked"
    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/appliances")
    assert listed.body["items"] == []  # lists leave decommissioned appliances out...
    listed = await partner.request("GET", f"/api/v1/sites/{site_id}/appliances?decommissioned=true")
    assert [a["status"] for a in listed.body["items"]] == ["decommissioned"]  # ...unless asked

    # The unused token is revoked: enrolling with it is refused.
    enrolled = await enroll_with(harness, unused)
    assert enrolled.status == 403, enrolled.body
    assert enrolled.code == "bad-enrollment-token"
    assert "revoked" in enrolled.body["detail"]
    tokens = await partner.request("GET", f"/api/v1/sites/{site_id}/enrollment-tokens")
    assert sorted(t["state"] for t in tokens.body["items"]) == ["revoked", "used"]

    # History stays readable.
    bundle_id = json.loads(envelope.payload_bytes())["bundle_id"]
    for path in (
        f"/api/v1/sites/{site_id}/evidence",
        f"/api/v1/sites/{site_id}/evidence/{appliance.appliance_id}/{bundle_id}",
        f"/api/v1/sites/{site_id}/appliances/{appliance.appliance_id}/audit-export",
        f"/api/v1/sites/{site_id}",
    ):
        readable = await partner.request("GET", path)
        assert readable.status == 200, (path, readable.body)

    # Nothing new for it: 409 with a clear detail.
    for method, path, value in (
        ("POST", f"/api/v1/sites/{site_id}/enrollment-tokens", {}),
        ("PUT", f"/api/v1/sites/{site_id}/overrides", INHERIT),
        ("PATCH", f"/api/v1/sites/{site_id}/overrides", {"tier": "full"}),
        ("POST", f"/api/v1/sites/{site_id}/apply-preset", {"preset": "healthcare"}),
        ("PATCH", f"/api/v1/sites/{site_id}", {"name": "Reopened"}),
    ):
        conflict = await partner.request(method, path, value)
        assert conflict.status == 409, (method, path, conflict.body)
        assert conflict.code == "conflict"
        assert "decommissioned" in conflict.body["detail"]
    assert (await partner.request("GET", f"/api/v1/sites/{site_id}")).body == reply.body


async def test_decommissioning_an_appliance(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    other = await harness.enroll(partner, appliance.site_id)
    appliance.grow(3)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    # A rotated key is revoked too: every certificate of the appliance.
    new_key, new_serial = await appliance.rotate()
    path = f"/api/v1/sites/{appliance.site_id}/appliances/{appliance.appliance_id}/decommission"
    reply = await partner.request("POST", path, {"reason": "hardware replaced"})
    assert reply.status == 200, reply.body
    assert reply.body["id"] == appliance.appliance_id
    assert sorted(reply.body["revoked_serials"]) == sorted([appliance.serial, new_serial])
    again = await partner.request("POST", path, {})
    assert again.body == reply.body
    assert (await log_kinds(harness)).count("appliance.decommissioned") == 1
    assert b"hardware replaced" in await log_raw(harness)

    for key in (appliance.key, new_key):
        refused = await appliance.request("GET", "/api/v1/revocations", key=key)
        assert refused.status in (200, 304), refused.body  # it may still read the list
        synced = await appliance.sync(appliance.batch(0), key=key)
        assert synced.status == 403, synced.body
        assert synced.code == "appliance-revoked"
    audit = await partner.request(
        "GET", f"/api/v1/sites/{appliance.site_id}/appliances/{appliance.appliance_id}/audit-export"
    )
    assert audit.status == 200, audit.body
    # The other appliance of the site is untouched, and the site open.
    other.grow(2)
    assert (await other.sync(other.batch(0))).status == 200
    assert (await harness.token(partner, appliance.site_id)).startswith("msp-enroll_")

    missing = await partner.request(
        "POST", f"/api/v1/sites/{appliance.site_id}/appliances/appliance-none/decommission", {}
    )
    assert missing.status == 404, missing.body


# --- enrollment tokens -------------------------------------------------------------------


async def test_tokens_are_listed_paginated_and_revoked(harness: Harness) -> None:
    partner = await harness.partner()
    site = await new_site(partner)
    base = f"/api/v1/sites/{site['id']}/enrollment-tokens"
    created = []
    for _ in range(3):
        reply = await partner.request("POST", base, {"hours": 1})
        assert reply.status == 201, reply.body
        created.append(reply.body)
        harness.clock.advance(timedelta(seconds=1))
    ids = [token["id"] for token in created]

    first = await partner.request("GET", f"{base}?limit=2")
    assert first.status == 200, first.body
    assert [t["id"] for t in first.body["items"]] == ids[::-1][:2]
    assert first.headers["Link"].endswith('rel="next"')
    rest = await partner.request("GET", f"{base}?limit=2&cursor={first.body['next_cursor']}")
    assert rest.status == 200, rest.body
    assert [t["id"] for t in rest.body["items"]] == ids[:1]
    assert rest.body["next_cursor"] is None
    item = first.body["items"][0]
    assert item["state"] == "active"
    assert item["created_by"].startswith(f"partner:{partner.partner_id}/key:")
    assert all(c["token"] not in json.dumps(first.body) for c in created)

    revoked = await partner.request("DELETE", f"{base}/{ids[0]}")
    assert revoked.status == 200, revoked.body
    assert revoked.body["state"] == "revoked"
    assert (await partner.request("DELETE", f"{base}/{ids[0]}")).body == revoked.body
    refused = await enroll_with(harness, created[0]["token"])
    assert (refused.status, refused.code) == (403, "bad-enrollment-token"), refused.body

    # A used token cannot be revoked; an expired one shows as expired.
    assert (await enroll_with(harness, created[1]["token"])).status == 201
    used = await partner.request("DELETE", f"{base}/{ids[1]}")
    assert (used.status, used.code) == (409, "conflict"), used.body
    harness.clock.advance(timedelta(hours=2))
    states = {t["id"]: t["state"] for t in (await partner.request("GET", base)).body["items"]}
    assert states == {ids[0]: "revoked", ids[1]: "used", ids[2]: "expired"}
    assert (await log_kinds(harness)).count("token.revoked") == 1
    assert (await partner.request("DELETE", f"{base}/tok-none")).status == 404
    bad = await partner.request("GET", f"{base}?limit=0")
    assert (bad.status, bad.code) == (400, "malformed-query"), bad.body


# --- API keys ----------------------------------------------------------------------------


async def test_api_keys_create_list_rotate_revoke(harness: Harness) -> None:
    partner = await harness.partner()
    created = await partner.request("POST", "/api/v1/api-keys", {"name": "backup automation"})
    assert created.status == 201, created.body
    automation = KeyClient(harness.client, created.body["api_key"], partner.partner_id)
    assert (await automation.request("GET", "/api/v1/partner")).status == 200
    key = created.body["key"]
    assert (key["name"], key["role"], key["state"]) == ("backup automation", "partner", "active")
    assert created.body["api_key"].startswith(key["prefix"])

    listed = await partner.request("GET", "/api/v1/api-keys")
    assert listed.status == 200, listed.body
    assert [k["id"] for k in listed.body["items"]][1:] == [key["id"]]
    assert created.body["api_key"] not in json.dumps(listed.body)

    # Rotation with an hour of overlap: the old key works until then.
    rotated = await automation.request(
        "POST", f"/api/v1/api-keys/{key['id']}/rotate", {"overlap_minutes": 60}
    )
    assert rotated.status == 201, rotated.body
    assert rotated.body["previous"]["state"] == "expiring"
    assert rotated.body["key"]["name"] == "backup automation"
    successor = KeyClient(harness.client, rotated.body["api_key"], partner.partner_id)
    assert (await automation.request("GET", "/api/v1/partner")).status == 200
    assert (await successor.request("GET", "/api/v1/partner")).status == 200
    harness.clock.advance(timedelta(minutes=61))
    expired = await automation.request("GET", "/api/v1/partner")
    assert (expired.status, expired.code) == (401, "bad-credentials"), expired.body
    assert (await successor.request("GET", "/api/v1/partner")).status == 200

    # Revoke now; the last active key cannot be revoked.
    first_id = listed.body["items"][0]["id"]
    revoked = await successor.request("DELETE", f"/api/v1/api-keys/{first_id}")
    assert revoked.status == 200, revoked.body
    assert revoked.body["state"] == "revoked"
    assert (await partner.request("GET", "/api/v1/partner")).status == 401
    last = await successor.request("DELETE", f"/api/v1/api-keys/{rotated.body['key']['id']}")
    assert (last.status, last.code) == (409, "conflict"), last.body
    assert "last active key" in last.body["detail"]
    states = [
        k["state"] for k in (await successor.request("GET", "/api/v1/api-keys")).body["items"]
    ]
    assert states == ["revoked", "revoked", "active"]
    gone = await successor.request(
        "POST", f"/api/v1/api-keys/{first_id}/rotate", {"overlap_minutes": 0}
    )
    assert gone.status == 409, gone.body

    kinds = await log_kinds(harness)
    assert [k for k in kinds if k.startswith("key.")] == [
        "key.created",
        "key.rotated",
        "key.revoked",
    ]
    raw = await log_raw(harness)
    for secret in (created.body["api_key"], rotated.body["api_key"]):
        assert secret.encode() not in raw
    too_long = await successor.request(
        "POST", f"/api/v1/api-keys/{rotated.body['key']['id']}/rotate", {"overlap_minutes": 10081}
    )
    assert too_long.status == 400, too_long.body


# --- another partner ----------------------------------------------------------------------


async def test_another_partner_gets_not_found_on_all_of_it(harness: Harness) -> None:
    owner = await harness.partner()
    appliance = await harness.enroll(owner)
    site_id = appliance.site_id
    token = await owner.request("POST", f"/api/v1/sites/{site_id}/enrollment-tokens", {})
    key = await owner.request("POST", "/api/v1/api-keys", {"name": "ci"})
    other = await harness.partner("Other MSP")
    token_id, key_id = token.body["id"], key.body["key"]["id"]
    before = await log_kinds(harness)
    for method, path, value in (
        ("PATCH", f"/api/v1/sites/{site_id}/overrides", {"tier": "full"}),
        ("PATCH", f"/api/v1/sites/{site_id}", {"name": "Mine"}),
        ("DELETE", f"/api/v1/sites/{site_id}", None),
        (
            "POST",
            f"/api/v1/sites/{site_id}/appliances/{appliance.appliance_id}/decommission",
            {},
        ),
        ("GET", f"/api/v1/sites/{site_id}/enrollment-tokens", None),
        ("DELETE", f"/api/v1/sites/{site_id}/enrollment-tokens/{token_id}", None),
        ("POST", f"/api/v1/api-keys/{key_id}/rotate", {"overlap_minutes": 5}),
        ("DELETE", f"/api/v1/api-keys/{key_id}", None),
    ):
        reply = await other.request(method, path, value)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.code == "not-found"
    assert len((await other.request("GET", "/api/v1/api-keys")).body["items"]) == 1
    assert await log_kinds(harness) == before
    # The other partner's own appliance with the owner's site: not found either.
    their_site = await new_site(other)
    cross = await other.request(
        "POST",
        f"/api/v1/sites/{their_site['id']}/appliances/{appliance.appliance_id}/decommission",
        {},
    )
    assert cross.status == 404, cross.body
    admin = await harness.admin()
    forbidden = await admin.request("GET", "/api/v1/api-keys")
    assert forbidden.status == 403, forbidden.body
