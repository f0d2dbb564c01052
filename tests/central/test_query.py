"""Query strings are checked against the OpenAPI document for every
operation: a parameter an operation does not declare is a 400 problem, for
the public endpoints too, and only once the caller is known for the rest
(an anonymous caller gets its 401 first)."""

from __future__ import annotations

from typing import Any

import pytest

from msp_central.openapi import OPERATIONS, query_parameters
from tests.central.support import Harness


async def test_public_endpoints_refuse_unknown_parameters(harness: Harness) -> None:
    for method, path in (
        ("GET", "/api/v1/openapi.json?format=yaml"),
        ("GET", "/.well-known/msp-central-key?hex=1"),
        ("POST", "/api/v1/enroll?token=x"),
    ):
        async with harness.client.request(method, path, json={}) as response:
            body: Any = await response.json(content_type=None)
            assert response.status == 400, (path, body)
            assert response.content_type == "application/problem+json"
            assert body["code"] == "malformed-query"
            assert "unknown query parameter" in body["detail"]


async def test_authentication_comes_before_the_query(harness: Harness) -> None:
    async with harness.client.get("/api/v1/sites?bogus=1") as response:
        assert response.status == 401


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/api/v1/sites?bogus=1", "unknown query parameter 'bogus'"),
        ("/api/v1/sites?limit=1&limit=2", "limit may be given at most once"),
        ("/api/v1/sites?limit=ten", "limit must be an integer"),
        ("/api/v1/sites?decommissioned=yes", "decommissioned must be true or false"),
        ("/api/v1/escalations?open=yes", "open must be true or false"),
        ("/api/v1/escalations?from=yesterday", "from is not RFC 3339"),
        ("/api/v1/escalations?severity=urgent", "severity must be one of"),
        ("/api/v1/sites?cursor=" + "A" * 600, "cursor is longer than 512 characters"),
        ("/api/v1/sites?name=%00", "name holds a control character"),
        ("/api/v1/partner?x=1", "unknown query parameter 'x'"),
    ],
    ids=[
        "unknown",
        "twice",
        "not-integer",
        "not-boolean",
        "open-yes",
        "bad-time",
        "not-in-enum",
        "too-long",
        "control-character",
        "none-declared",
    ],
)
async def test_bad_query_strings(harness: Harness, path: str, detail: str) -> None:
    partner = await harness.partner()
    reply = await partner.request("GET", path)
    assert (reply.status, reply.code) == (400, "malformed-query"), reply.body
    assert detail in reply.body["detail"]


def test_every_operation_is_covered_by_the_declaration() -> None:
    """Every documented operation has a declaration (possibly empty) the
    check reads; an undocumented one has none."""
    for method, path, *_ in OPERATIONS:
        assert query_parameters(method, path) is not None, (method, path)
    assert query_parameters("get", "/api/v1/not-documented") is None
