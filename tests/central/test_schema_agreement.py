"""The OpenAPI document and the server agree: what the document allows is
accepted, and what the server refuses, the document says it would."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from msp_central.api_models import FRAMEWORK_IDS
from msp_central.db.tables import frameworks
from msp_central.openapi import document
from tests.central.support import Harness


async def test_the_documented_framework_ids_are_the_catalogues(harness: Harness) -> None:
    async with harness.engine.connect() as connection:
        stored = (await connection.execute(sa.select(frameworks.c.id))).scalars().all()
    assert sorted(stored) == sorted(FRAMEWORK_IDS)
    schemas = document()["components"]["schemas"]
    items = schemas["PartnerDefaults"]["properties"]["frameworks"]["items"]
    assert items["enum"] == list(FRAMEWORK_IDS)


async def test_whole_numbers_written_with_a_fraction_are_integers(harness: Harness) -> None:
    """JSON Schema's integer is any number without a fraction: 497.0 is 497."""
    partner = await harness.partner()
    site = await harness.site(partner)
    made = await partner.request(
        "POST", f"/api/v1/sites/{site}/enrollment-tokens", {"hours": 497.0}
    )
    assert made.status == 201, made.body
    key = await partner.request("POST", "/api/v1/api-keys", {"name": "ci"})
    rotated = await partner.request(
        "POST", f"/api/v1/api-keys/{key.body['key']['id']}/rotate", {"overlap_minutes": 30.0}
    )
    assert rotated.status == 201, rotated.body


@pytest.mark.parametrize("hours", [497.5, "497", True, None, 1e300])
async def test_what_is_not_an_integer_is_refused(harness: Harness, hours: object) -> None:
    partner = await harness.partner()
    site = await harness.site(partner)
    refused = await partner.request(
        "POST", f"/api/v1/sites/{site}/enrollment-tokens", {"hours": hours}
    )
    if hours is None:  # the field may be null: the default lifetime
        assert refused.status == 201
        return
    assert refused.status == 400, refused.body
