"""RFC 9421 request signatures through the real server: each way of getting
one wrong is refused with its own problem, changes nothing, and leaves the
appliance able to make its next genuine request.

The refusals travel as raw requests: headers from
:func:`msp_protocol.httpsig.sign_request`, then altered the way an attacker
(or a broken proxy) would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from msp_protocol.encoding import format_time
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey
from tests.central.support import ApplianceClient, Harness, KeyClient, Reply, call

NONCE = "5eed5eed5eed5eed5eed5eed5eed5eed"


@dataclass(frozen=True)
class Attempt:
    """One raw request: what is sent, whatever was signed."""

    method: str
    path: str
    body: bytes
    headers: dict[str, str]


def heartbeat_path(app: ApplianceClient) -> str:
    return f"/api/v1/appliances/{app.appliance_id}/heartbeat"


def bundle_path(app: ApplianceClient) -> str:
    return f"/api/v1/appliances/{app.appliance_id}/bundles/site-config"


def heartbeat_body(app: ApplianceClient, log_size: int = 0) -> bytes:
    return json.dumps(
        {
            "version": "0.1.0",
            "log_size": log_size,
            "queues": {"urgent": 0},
            "clock": format_time(app.clock()),
        }
    ).encode()


def signed(
    app: ApplianceClient,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    created: int | None = None,
    key: SigningKey | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    return sign_request(
        key or app.key,
        method,
        app.url(path),
        body=body,
        created=int(app.clock().timestamp()) if created is None else created,
        nonce=nonce,
    )


async def send(harness: Harness, attempt: Attempt) -> Reply:
    return await call(
        harness.client,
        attempt.method,
        attempt.path,
        body=attempt.body or None,
        headers=attempt.headers,
    )


def without(headers: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in names}


def now(app: ApplianceClient) -> int:
    return int(app.clock().timestamp())


# --- the refusals -------------------------------------------------------------------


def heartbeat_signed(
    app: ApplianceClient,
    *,
    created: int | None = None,
    key: SigningKey | None = None,
    nonce: str | None = None,
) -> Attempt:
    body = heartbeat_body(app)
    path = heartbeat_path(app)
    headers = signed(app, "POST", path, body, created=created, key=key, nonce=nonce)
    return Attempt("POST", path, body, headers)


def stale(app: ApplianceClient) -> Attempt:
    # The limit is five minutes; the server's clock can only have moved on since.
    return heartbeat_signed(app, created=now(app) - 301)


def long_ago(app: ApplianceClient) -> Attempt:
    return heartbeat_signed(app, created=now(app) - 86_400)


def future(app: ApplianceClient) -> Attempt:
    # The skew allowed is 60 s; 120 s leaves room for the clock to tick meanwhile.
    return heartbeat_signed(app, created=now(app) + 120)


def unknown_key(app: ApplianceClient) -> Attempt:
    return heartbeat_signed(app, key=SigningKey.generate())


def body_changed(app: ApplianceClient) -> Attempt:
    attempt = heartbeat_signed(app)
    return Attempt(attempt.method, attempt.path, heartbeat_body(app, log_size=99), attempt.headers)


def path_changed(app: ApplianceClient) -> Attempt:
    # Signed for the heartbeat, sent to the escalations of the same appliance.
    attempt = heartbeat_signed(app)
    path = f"/api/v1/appliances/{app.appliance_id}/escalations"
    return Attempt("POST", path, attempt.body, attempt.headers)


def method_changed(app: ApplianceClient) -> Attempt:
    body = heartbeat_body(app)
    path = heartbeat_path(app)
    return Attempt("POST", path, body, signed(app, "PUT", path, body))


def method_changed_without_body(app: ApplianceClient) -> Attempt:
    path = bundle_path(app)
    return Attempt("GET", path, b"", signed(app, "POST", path))


def query_added(app: ApplianceClient) -> Attempt:
    path = bundle_path(app)
    return Attempt("GET", path + "?kind=runbooks", b"", signed(app, "GET", path))


def unsigned(app: ApplianceClient) -> Attempt:
    attempt = heartbeat_signed(app)
    return Attempt(
        attempt.method,
        attempt.path,
        attempt.body,
        without(attempt.headers, "Signature", "Signature-Input"),
    )


def signature_field_missing(app: ApplianceClient) -> Attempt:
    attempt = heartbeat_signed(app)
    return Attempt(
        attempt.method, attempt.path, attempt.body, without(attempt.headers, "Signature")
    )


def digest_removed(app: ApplianceClient) -> Attempt:
    attempt = heartbeat_signed(app)
    return Attempt(
        attempt.method, attempt.path, attempt.body, without(attempt.headers, "Content-Digest")
    )


def body_added(app: ApplianceClient) -> Attempt:
    # Signed without a body (so without content-digest), sent with one.
    path = heartbeat_path(app)
    return Attempt("POST", path, heartbeat_body(app), signed(app, "POST", path))


def foreign_algorithm(app: ApplianceClient) -> Attempt:
    attempt = heartbeat_signed(app)
    headers = dict(attempt.headers)
    headers["Signature-Input"] += ';alg="hmac-sha256"'
    return Attempt(attempt.method, attempt.path, attempt.body, headers)


def short_nonce(app: ApplianceClient) -> Attempt:
    return heartbeat_signed(app, nonce="abc")


REFUSALS = [
    pytest.param(stale, "stale-signature", id="stale_created"),
    pytest.param(long_ago, "stale-signature", id="created_a_day_ago"),
    pytest.param(future, "future-signature", id="created_in_the_future"),
    pytest.param(unknown_key, "unknown-key", id="keyid_of_an_unknown_key"),
    pytest.param(body_changed, "content-digest-mismatch", id="body_changed_after_signing"),
    pytest.param(path_changed, "bad-request-signature", id="path_changed_after_signing"),
    pytest.param(method_changed, "bad-request-signature", id="method_changed_after_signing"),
    pytest.param(
        method_changed_without_body, "bad-request-signature", id="method_changed_without_body"
    ),
    pytest.param(query_added, "bad-request-signature", id="query_added_after_signing"),
    pytest.param(unsigned, "malformed-signature-header", id="signature_missing"),
    pytest.param(
        signature_field_missing, "malformed-signature-header", id="signature_field_missing"
    ),
    pytest.param(digest_removed, "signature-missing-component", id="content_digest_removed"),
    pytest.param(body_added, "signature-missing-component", id="body_added_after_signing"),
    pytest.param(foreign_algorithm, "malformed-signature-header", id="foreign_algorithm"),
    pytest.param(short_nonce, "malformed-signature-header", id="nonce_too_short"),
]


async def appliance_state(partner: KeyClient, app: ApplianceClient) -> tuple[object, ...]:
    path = f"/api/v1/sites/{app.site_id}/appliances"
    (listed,) = (await partner.request("GET", path)).body["items"]
    escalations = (await partner.request("GET", "/api/v1/escalations")).body["items"]
    return listed["heartbeat"], listed["last_seen_at"], escalations


@pytest.mark.parametrize(("make", "code"), REFUSALS)
async def test_refused_signature(
    harness: Harness, make: Callable[[ApplianceClient], Attempt], code: str
) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    before = await appliance_state(partner, app)

    reply = await send(harness, make(app))
    assert (reply.status, reply.code) == (401, code), reply.body
    assert reply.body["type"] == f"urn:msp:problem:{code}"
    # Nothing happened, and the appliance is not locked out.
    assert await appliance_state(partner, app) == before == (None, None, [])
    genuine = await app.request("POST", heartbeat_path(app), json.loads(heartbeat_body(app)))
    assert genuine.status == 200, genuine.body


async def test_freshness_window_accepts_created_within_its_bounds(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    for created in (now(app) - 290, now(app), now(app) + 30):
        reply = await send(harness, heartbeat_signed(app, created=created))
        assert reply.status == 200, (created - now(app), reply.body)


async def test_replayed_request_is_refused(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    attempt = heartbeat_signed(app)
    first = await send(harness, attempt)
    assert first.status == 200, first.body
    again = await send(harness, attempt)
    assert (again.status, again.code) == (401, "replayed-nonce"), again.body
    assert again.body["type"] == "urn:msp:problem:replayed-nonce"

    # The nonce is spent for the key, whatever request carries it next.
    nonce = attempt.headers["Signature-Input"].split('nonce="')[1].split('"')[0]
    path = bundle_path(app)
    other = await send(harness, Attempt("GET", path, b"", signed(app, "GET", path, nonce=nonce)))
    assert (other.status, other.code) == (401, "replayed-nonce"), other.body


async def test_nonces_are_per_key(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    neighbour = await harness.enroll(partner, app.site_id)
    for appliance in (app, neighbour):
        reply = await send(harness, heartbeat_signed(appliance, nonce=NONCE))
        assert reply.status == 200, reply.body


async def test_forged_request_does_not_use_up_the_nonce(harness: Harness) -> None:
    """A request signed by another key but claiming the appliance's keyid
    (the Signature-Input of the genuine request, another key's Signature) is
    refused before its nonce is recorded: the genuine request with that nonce
    then succeeds, once."""
    partner = await harness.partner()
    app = await harness.enroll(partner)
    other = await harness.enroll(partner, app.site_id)  # a real, enrolled key
    genuine = heartbeat_signed(app, nonce=NONCE)
    created = int(genuine.headers["Signature-Input"].split("created=")[1].split(";")[0])
    by_other = signed(
        app, "POST", genuine.path, genuine.body, created=created, key=other.key, nonce=NONCE
    )
    assert app.key.key_id in genuine.headers["Signature-Input"]
    forged = Attempt(
        "POST",
        genuine.path,
        genuine.body,
        {**genuine.headers, "Signature": by_other["Signature"]},
    )
    assert forged.headers != genuine.headers

    for _ in range(2):  # forging again does not spend it either
        reply = await send(harness, forged)
        assert (reply.status, reply.code) == (401, "bad-request-signature"), reply.body
    reply = await send(harness, genuine)
    assert reply.status == 200, reply.body
    reply = await send(harness, genuine)
    assert (reply.status, reply.code) == (401, "replayed-nonce"), reply.body
