"""Repeated failed credentials (API keys, enrollment tokens, request
signatures) are refused with 429 and Retry-After and raise one security
alert, while a neighbour behind the same address with a valid credential
keeps working (:mod:`msp_central.throttle`).

Sources are told apart by X-Forwarded-For from a trusted proxy (the test
client's loopback address), as they would be behind a reverse proxy. The
limits are small here so that each threshold is a handful of requests; the
window is moved by the server's clock, never waited for.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central import throttle
from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_central.db.tables import notification_events, security_alerts
from msp_central.openapi import OPERATIONS, document
from msp_central.problems import PROBLEM_TYPE_PREFIX
from msp_protocol.delegation import token_digest
from msp_protocol.encoding import utc_now
from msp_protocol.keys import SigningKey
from tests.central.support import ROOT, ApplianceClient, Clock, Harness, Reply, call, dumps

NAT = "203.0.113.7"  # one address, many appliances and people behind it
ELSEWHERE = "198.51.100.20"
WINDOW = timedelta(minutes=15)
PER_CREDENTIAL = 3
PER_SOURCE = 6
FLOOD = 12
ALERT_AT = 5
BEAT = {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": "2026-11-25T00:00:00Z"}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        trusted_proxies=["127.0.0.1"],
        credential_window_minutes=15,
        credential_identity_failures=PER_CREDENTIAL,
        credential_source_failures=PER_SOURCE,
        credential_source_flood=FLOOD,
        credential_alert_failures=ALERT_AT,
    )


def source(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def with_key(harness: Harness, key: str, address: str, path: str = "/api/v1/sites") -> Reply:
    return await call(
        harness.client, "GET", path, headers={"Authorization": f"Bearer {key}", **source(address)}
    )


async def signed(
    appliance: ApplianceClient,
    method: str,
    path: str,
    value: Any,
    address: str,
    *,
    forged: bool = False,
    key: SigningKey | None = None,
) -> Reply:
    """A request signed by the appliance (or ``key``) from ``address``;
    ``forged``: under the appliance's key id, but with the signature of
    another request (another nonce), so it does not verify."""
    body = dumps(value) if value is not None else b""
    headers = appliance.signed(method, path, body, key)
    if forged:
        headers["Signature"] = appliance.signed(method, path, body, key)["Signature"]
    return await call(
        appliance.client, method, path, body=body or None, headers={**headers, **source(address)}
    )


async def heartbeat(
    appliance: ApplianceClient, address: str, *, forged: bool = False, key: SigningKey | None = None
) -> Reply:
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    return await signed(appliance, "POST", path, BEAT, address, forged=forged, key=key)


async def enroll(harness: Harness, token: str, address: str) -> Reply:
    return await harness.enroll_with(token, headers=source(address))


async def alerts(harness: Harness) -> list[Any]:
    async with harness.engine.connect() as connection:
        return list(
            (
                await connection.execute(
                    sa.select(security_alerts)
                    .where(security_alerts.c.code == throttle.ALERT_CODE)
                    .order_by(security_alerts.c.id)
                )
            ).all()
        )


def assert_too_many(reply: Reply) -> int:
    """A 429 problem document with Retry-After; returns the seconds."""
    assert reply.status == 429, reply.body
    assert reply.body["type"] == PROBLEM_TYPE_PREFIX + "too-many-attempts"
    assert reply.code == "too-many-attempts"
    wait = int(reply.headers["Retry-After"])
    assert reply.body["retry_after"] == wait
    assert 0 < wait <= WINDOW.total_seconds()
    return wait


def random_key() -> str:
    return f"mspk_{secrets.token_hex(32)}"


# --- API keys -------------------------------------------------------------------------


async def test_a_bad_api_key_is_refused_429_after_the_threshold(harness: Harness) -> None:
    partner = await harness.partner()
    bad = random_key()
    for _ in range(PER_CREDENTIAL):
        reply = await with_key(harness, bad, NAT)
        assert (reply.status, reply.code) == (401, "bad-credentials")
    assert_too_many(await with_key(harness, bad, NAT))
    # The neighbour behind the same address, with its valid key, is served.
    assert (await with_key(harness, partner.key, NAT)).status == 200
    # The same bad key from another address is still only refused, not throttled.
    assert (await with_key(harness, bad, ELSEWHERE)).status == 401


async def test_a_spray_of_keys_is_throttled_by_source_and_alerts_once(harness: Harness) -> None:
    partner = await harness.partner()
    statuses = [(await with_key(harness, random_key(), NAT)).status for _ in range(PER_SOURCE)]
    assert statuses == [401] * PER_SOURCE
    # Past the source's budget a failing key is answered 429; a valid one,
    # from the same address, is still served.
    for _ in range(FLOOD - PER_SOURCE - 1):
        assert_too_many(await with_key(harness, random_key(), NAT))
        assert (await with_key(harness, partner.key, NAT)).status == 200
    assert_too_many(await with_key(harness, random_key(), NAT))
    # A flood (FLOOD failures): now every key from the address is refused
    # before it is looked at, the valid one too; other addresses are not.
    assert_too_many(await with_key(harness, random_key(), NAT))
    assert_too_many(await with_key(harness, partner.key, NAT))
    assert (await with_key(harness, partner.key, ELSEWHERE)).status == 200
    raised = await alerts(harness)
    assert len(raised) == 1
    alert = raised[0]
    assert alert.detail == f"{ALERT_AT} failed API key attempts from {NAT} within 15 minutes"
    assert (alert.partner_id, alert.site_id, alert.appliance_id) == (None, None, None)


async def test_without_a_flood_bound_a_valid_neighbour_is_never_refused(
    database_url: str, tmp_path: Path, aiohttp_client: Any
) -> None:
    """The default: however long a neighbour behind the same address keeps
    failing, a valid credential from that address is served."""
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        trusted_proxies=["127.0.0.1"],
        credential_identity_failures=PER_CREDENTIAL,
        credential_source_failures=PER_SOURCE,
    )
    assert settings.credential_source_flood is None
    clock = Clock()
    app = create_app(settings, root=ROOT, clock=clock)
    harness = Harness(await aiohttp_client(app), app[CENTRAL].engine, clock)
    partner = await harness.partner()
    for _ in range(20 * PER_SOURCE):
        reply = await with_key(harness, random_key(), NAT)
        assert reply.status in (401, 429)
    assert_too_many(await with_key(harness, random_key(), NAT))
    assert (await with_key(harness, partner.key, NAT)).status == 200


async def test_a_revoked_key_in_use_alerts_its_partner(harness: Harness) -> None:
    partner = await harness.partner()
    made = await partner.request("POST", "/api/v1/api-keys", {"name": "old"})
    assert made.status == 201, made.body
    old, secret = made.body["key"], made.body["api_key"]
    revoked = await partner.request("DELETE", f"/api/v1/api-keys/{old['id']}")
    assert revoked.status == 200, revoked.body
    for _ in range(PER_CREDENTIAL):
        assert (await with_key(harness, secret, NAT)).status == 401
    for _ in range(ALERT_AT - PER_CREDENTIAL):
        assert_too_many(await with_key(harness, secret, NAT))
    (alert,) = await alerts(harness)
    assert alert.partner_id == partner.partner_id
    assert f"(revoked key {old['prefix']})" in alert.detail
    listed = await partner.request("GET", "/api/v1/security-alerts?code=credential-failures")
    assert [item["detail"] for item in listed.body["items"]] == [alert.detail]


async def test_the_count_ends_with_its_window(harness: Harness) -> None:
    bad = random_key()
    for _ in range(PER_CREDENTIAL):
        await with_key(harness, bad, NAT)
    first = assert_too_many(await with_key(harness, bad, NAT))
    harness.clock.advance(timedelta(minutes=5))
    later = assert_too_many(await with_key(harness, bad, NAT))
    assert later <= first - 5 * 60 + 1
    harness.clock.advance(WINDOW - timedelta(minutes=5))
    for _ in range(PER_CREDENTIAL):
        assert (await with_key(harness, bad, NAT)).status == 401
    assert_too_many(await with_key(harness, bad, NAT))


async def test_an_ipv6_host_is_counted_by_its_64(harness: Harness) -> None:
    bad = random_key()
    for address in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        assert (await with_key(harness, bad, address)).status == 401
    assert_too_many(await with_key(harness, bad, "2001:db8:1:2::abcd"))
    assert (await with_key(harness, bad, "2001:db8:1:3::1")).status == 401


# --- enrollment tokens ----------------------------------------------------------------


async def test_bad_enrollment_tokens_are_throttled_without_locking_out_a_neighbour(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    site = await harness.site(partner)
    bad = f"msp-enroll_{secrets.token_hex(32)}"
    for _ in range(PER_CREDENTIAL):
        reply = await enroll(harness, bad, NAT)
        assert (reply.status, reply.code) == (403, "bad-enrollment-token")
    for _ in range(ALERT_AT - PER_CREDENTIAL + 2):
        assert_too_many(await enroll(harness, bad, NAT))
    # A new appliance behind the same address enrolls with its own token.
    assert (await enroll(harness, await harness.token(partner, site), NAT)).status == 201
    (alert,) = await alerts(harness)
    assert alert.detail == (
        f"{ALERT_AT} failed enrollment token attempts from {NAT} within 15 minutes"
    )
    assert alert.partner_id is None


async def test_a_used_token_tried_again_counts(harness: Harness) -> None:
    partner = await harness.partner()
    token = await harness.token(partner, await harness.site(partner))
    assert (await enroll(harness, token, NAT)).status == 201
    for _ in range(PER_CREDENTIAL):  # another key, the same spent token
        assert (await enroll(harness, token, NAT)).code == "bad-enrollment-token"
    assert_too_many(await enroll(harness, token, NAT))


# --- request signatures ---------------------------------------------------------------


async def test_an_appliance_with_bad_signatures_does_not_lock_out_its_nat_neighbour(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    a = await harness.enroll(partner)
    b = await harness.enroll(partner)
    for _ in range(PER_CREDENTIAL):
        reply = await heartbeat(a, NAT, forged=True)
        assert (reply.status, reply.code) == (401, "bad-request-signature")
    assert_too_many(await heartbeat(a, NAT, forged=True))
    # A's key is refused from this address, a valid signature too, until the
    # window ends; from elsewhere it is heard.
    assert_too_many(await heartbeat(a, NAT))
    assert (await heartbeat(a, ELSEWHERE)).status == 200
    # B, behind the same address, keeps working: heartbeats and uploads.
    for _ in range(FLOOD):
        assert (await heartbeat(b, NAT)).status == 200
    b.grow(3)
    batch = b.batch(0)
    path = f"/api/v1/appliances/{b.appliance_id}/audit/sync"
    assert (await signed(b, "POST", path, batch, NAT)).status == 200
    assert_too_many(await heartbeat(a, NAT, forged=True))
    # One alert, for A's partner, naming A.
    (alert,) = await alerts(harness)
    assert (alert.partner_id, alert.site_id, alert.appliance_id) == (
        partner.partner_id,
        a.site_id,
        a.appliance_id,
    )
    assert alert.detail == (
        f"{ALERT_AT} failed request signature attempts from {NAT} within 15 minutes "
        f"(key {a.key.key_id[:16]} of appliance {a.appliance_id})"
    )
    listed = await partner.request("GET", "/api/v1/security-alerts?code=credential-failures")
    assert [item["appliance_id"] for item in listed.body["items"]] == [a.appliance_id]
    # And the partner is told, as of every security alert.
    async with harness.engine.connect() as connection:
        events = (
            await connection.execute(
                sa.select(notification_events.c.partner_id, notification_events.c.payload).where(
                    notification_events.c.kind == "security.alert"
                )
            )
        ).all()
    assert [(e.partner_id, e.payload["code"]) for e in events] == [
        (partner.partner_id, throttle.ALERT_CODE)
    ]


async def test_unknown_keys_are_throttled_by_source_and_alert_the_administrators(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    known = await harness.enroll(partner)
    for _ in range(PER_SOURCE):
        reply = await heartbeat(known, NAT, key=SigningKey.generate())
        assert (reply.status, reply.code) == (401, "unknown-key")
    assert_too_many(await heartbeat(known, NAT, key=SigningKey.generate()))
    assert (await heartbeat(known, NAT)).status == 200
    (alert,) = await alerts(harness)
    assert (alert.partner_id, alert.appliance_id) == (None, None)


async def test_a_success_clears_the_count_of_its_own_key(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    for _ in range(PER_CREDENTIAL - 1):
        assert (await heartbeat(appliance, NAT, forged=True)).status == 401
    assert (await heartbeat(appliance, NAT)).status == 200
    for _ in range(PER_CREDENTIAL):
        assert (await heartbeat(appliance, NAT, forged=True)).status == 401
    assert_too_many(await heartbeat(appliance, NAT, forged=True))


async def test_a_replayed_request_counts_against_its_key(harness: Harness) -> None:
    """A captured request sent again (the nonce is spent) fails under the
    appliance's key id: from the replaying address it is throttled, the
    appliance itself, elsewhere, is not."""
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    body = dumps(BEAT)
    captured = {**appliance.signed("POST", path, body), **source(ELSEWHERE)}
    assert (await call(harness.client, "POST", path, body=body, headers=captured)).status == 200
    replayed = {**captured, **source(NAT)}
    for _ in range(PER_CREDENTIAL):
        reply = await call(harness.client, "POST", path, body=body, headers=replayed)
        assert (reply.status, reply.code) == (401, "replayed-nonce")
    assert_too_many(await call(harness.client, "POST", path, body=body, headers=replayed))
    assert (await heartbeat(appliance, ELSEWHERE)).status == 200


async def test_unsigned_requests_are_not_counted(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    for _ in range(FLOOD + 1):
        reply = await call(harness.client, "POST", path, body=dumps(BEAT), headers=source(NAT))
        assert reply.status == 401
        assert reply.code == "malformed-signature-header"
    assert (await heartbeat(appliance, NAT)).status == 200
    assert await alerts(harness) == []


# --- what is never kept ---------------------------------------------------------------


async def test_no_secret_reaches_the_log_or_the_alerts(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    partner = await harness.partner()
    keys = [random_key() for _ in range(ALERT_AT)]
    tokens = [f"msp-enroll_{secrets.token_hex(32)}" for _ in range(ALERT_AT)]
    for key, token in zip(keys, tokens, strict=True):
        await with_key(harness, key, NAT)
        await enroll(harness, token, NAT)
    raised = await alerts(harness)
    assert len(raised) == 2
    assert "security alert credential-failures" in caplog.text
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("msp_central")]
    details = [alert.detail for alert in raised]
    for secret in [*keys, *tokens, partner.key]:
        assert secret not in caplog.text
        assert secret not in "".join(details)
        # Not even the hash, by which the database finds a key.
        assert token_digest(secret) not in "".join(ours + details)


# --- the counts themselves ------------------------------------------------------------


def test_the_counts_are_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(throttle, "MAX_TRACKED", 4)
    counts = throttle.CredentialThrottle(
        Settings(state_dir=tmp_path, credential_identity_failures=1)
    )
    now = utc_now()
    counts.failed("bearer", NAT, "first", now, None)
    assert counts.check("bearer", NAT, "first", now).retry_after is not None
    for n in range(4):
        counts.failed("bearer", NAT, f"other {n}", now, None)
    # The oldest count went to make room: a fresh start, never a refusal.
    assert counts.check("bearer", NAT, "first", now).retry_after is None
    assert counts.check("bearer", NAT, "other 3", now).retry_after is not None


def test_a_flood_limit_below_the_failure_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="credential_source_flood"):
        Settings(state_dir=tmp_path, credential_source_failures=10, credential_source_flood=5)


def test_the_document_states_429_where_credentials_are_checked() -> None:
    paths = document()["paths"]
    for method, path, _summary, security, _request, _responses in OPERATIONS:
        responses = paths[path][method]["responses"]
        expected = bool(security) or path == "/api/v1/enroll"
        assert ("429" in responses) == expected, (method, path)
        if expected:
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
