"""Whatever the server accepts and stores, every endpoint that reads it back
can serve: a value that cannot be written again (a whole float beyond
±(2**53 - 1), written ``1e20``) is refused at the door, not stored to break
the partner's lists later. Checked as a property over generated escalation
details, the freest JSON an appliance sends, on both backends."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from msp_protocol.bundle import Escalation
from tests.central.support import ApplianceClient, Harness, KeyClient

TRICKY: list[Any] = [
    1e20,
    -1e20,
    9007199254740993.0,
    2**53 - 1,
    -(2**53) + 1,
    1e21,
    1.5e300,
    -0.0,
    0.1,
    5e-324,
    "\u0000",
    "\u200b\u202e\ufeff",
    "\U0001f600 \u00e9",
    "",
    {"": None},
    [[[[]]]],
    {"a": {"b": [1.0, 2.5, {"c": 1e16}]}},
]


def _value(generator: random.Random, depth: int = 0) -> Any:
    roll = generator.random()
    if depth < 3 and roll < 0.25:
        return {
            _text(generator): _value(generator, depth + 1) for _ in range(generator.randrange(4))
        }
    if depth < 3 and roll < 0.4:
        return [_value(generator, depth + 1) for _ in range(generator.randrange(4))]
    if roll < 0.55:
        return generator.choice(TRICKY)
    if roll < 0.7:
        return generator.uniform(-1e25, 1e25) * generator.choice([1, 1e-30, 1e-5, 1e5])
    if roll < 0.8:
        return generator.randrange(-(2**53) + 1, 2**53)
    if roll < 0.9:
        return float(generator.randrange(-(2**62), 2**62))  # whole: many beyond 2**53
    return _text(generator)


def _text(generator: random.Random) -> str:
    alphabet = 'aZ09 \u00e9\u200b\u0000\u202e\U0001f600"\\/\t'
    return "".join(generator.choice(alphabet) for _ in range(generator.randrange(6)))


async def _post(appliance: ApplianceClient, detail: Any) -> tuple[int, Any]:
    document = Escalation(
        escalation_id=f"esc-{uuid.uuid4().hex[:12]}",
        appliance_id=appliance.appliance_id,
        site_id=appliance.site_id,
        severity="critical",
        title="Generated detail",
        detail={},
        created_at=appliance.clock(),
    ).to_wire()
    body = json.dumps({**document, "detail": {"value": detail}}).encode()
    path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
    response = await appliance.client.request(
        "POST", path, data=body, headers=appliance.signed("POST", path, body)
    )
    answer = await response.json(content_type=None)
    return response.status, (document["escalation_id"], answer)


async def test_every_accepted_escalation_can_be_listed_again(harness: Harness) -> None:
    partner: KeyClient = await harness.partner()
    appliance = await harness.enroll(partner)
    generator = random.Random(20261203)
    details = [*TRICKY, *(_value(generator) for _ in range(60))]
    accepted: dict[str, Any] = {}
    refused = 0
    for detail in details:
        status, (escalation_id, answer) = await _post(appliance, detail)
        assert status in (201, 400), (detail, status, answer)
        if status == 201:
            accepted[escalation_id] = detail
        else:
            refused += 1
            assert answer["code"] == "malformed-json", answer
            assert "whole number beyond" in answer["detail"]
        # After every request, the lists still answer.
        listed = await partner.request("GET", "/api/v1/escalations?limit=500")
        assert listed.status == 200, (detail, listed.body)
    assert refused >= 3  # 1e20, -1e20 and 9007199254740993.0 at least
    assert len(accepted) >= len(details) // 2
    listed = await partner.request("GET", "/api/v1/escalations?limit=500")
    served = {item["id"]: item["detail"]["value"] for item in listed.body["items"]}
    assert served.keys() == accepted.keys()
    for escalation_id, detail in accepted.items():
        # Equal as JSON values (1.0 may come back as 1; -0.0 as 0).
        assert json.loads(json.dumps(served[escalation_id])) == json.loads(json.dumps(detail))
