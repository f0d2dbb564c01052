"""HTTP semantics around the API: every error is a problem document with
the headers HTTP asks for, and conditional GETs understand ETag lists."""

from __future__ import annotations

import json

from tests.central.support import Harness


async def test_unknown_route_and_method(harness: Harness) -> None:
    missing = await harness.client.get("/api/v1/nothing-here")
    assert missing.status == 404
    assert missing.content_type == "application/problem+json"
    assert json.loads(await missing.read())["type"] == "urn:msp:problem:not-found"
    wrong = await harness.client.delete("/api/v1/sites")
    assert wrong.status == 405
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert json.loads(await wrong.read())["code"] == "method-not-allowed"


async def test_bearer_challenges(harness: Harness) -> None:
    for headers in ({}, {"Authorization": "Bearer mspk_" + "0" * 64}):
        reply = await harness.client.get("/api/v1/partner", headers=headers)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="msp-central"'


async def test_if_none_match_forms(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/bundles/site-config"
    first = await appliance.request("GET", path)
    etag = first.headers["ETag"]
    for header, status in (
        (etag, 304),
        (f"W/{etag}", 304),
        (f'"other", {etag}', 304),
        ("*", 304),
        ('"other"', 200),
    ):
        reply = await harness.client.get(
            path, headers={**appliance.signed("GET", path), "If-None-Match": header}
        )
        assert reply.status == status, header
        await reply.read()
