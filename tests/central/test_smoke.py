"""A first walk through the server: catalogue, partner, site, enroll, sync."""

from __future__ import annotations

from tests.central.support import Harness


async def test_enroll_and_sync(harness: Harness) -> None:
    partner = await harness.partner()
    reply = await partner.request("GET", "/api/v1/frameworks")
    assert reply.status == 200
    assert len(reply.body) == 10
    appliance = await harness.enroll(partner)
    appliance.grow(10)
    reply = await appliance.sync(appliance.batch(0))
    assert reply.status == 200, reply.body
    assert reply.body["size"] == 10
    appliance.grow(5)
    batch = appliance.batch(10)
    reply = await appliance.sync(batch)
    assert reply.status == 200, reply.body
    again = await appliance.sync(batch)
    assert again.status == 200, again.body
    assert again.body == reply.body
