"""The ``@target-uri`` an appliance signs is the URI exactly as it sent it.

A signer signs the bytes of the request line it sends, percent escapes and
all; the server rebuilds the URI from the raw path and query as they
arrived (behind a reverse proxy: its normalised ``public_url`` followed by
them). Rebuilt from the decoded path, ``/appliances/%61pp…`` or ``a%2Fb``
would differ from what was signed and every such request would be refused
as a bad signature. Requests travel over a real socket, with the path and
query sent as written (the HTTP client told they are already encoded), on
the direct and the proxied configuration and on both backends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from yarl import URL

from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_protocol.encoding import format_time
from msp_protocol.httpsig import sign_request
from tests.central.support import ApplianceClient, Harness

# How an operator might spell the proxy's URL; the server normalises it.
PUBLIC_URL = "HTTPS://Central.Example.COM:443/msp/./"
PUBLIC_NORMAL = "https://central.example.com/msp"


@pytest.fixture(params=["direct", "proxied"])
def settings(request: pytest.FixtureRequest, database_url: str, tmp_path: Any) -> Settings:
    public_url = PUBLIC_URL if request.param == "proxied" else None
    return Settings(state_dir=tmp_path / "state", database_url=database_url, public_url=public_url)


def escape_first(text: str) -> str:
    """``text`` with its first character percent-encoded (``app`` → ``%61pp``)."""
    return f"%{ord(text[0]):02X}{text[1:]}"


async def send_raw(
    harness: Harness,
    app: ApplianceClient,
    method: str,
    raw_path: str,
    body: bytes = b"",
    *,
    signed_path: str | None = None,
) -> tuple[int, Any]:
    """Sign the URI as the appliance sees it (the public URL when proxied)
    with ``signed_path`` (default: ``raw_path``), and send ``raw_path`` byte
    for byte."""
    server = harness.client.server
    sent_to = f"http://127.0.0.1:{server.port}{raw_path}"
    public_url = harness.client.app[CENTRAL].settings.public_url
    signed_uri = (public_url + (signed_path or raw_path)) if public_url else sent_to
    if signed_path and not public_url:
        signed_uri = f"http://127.0.0.1:{server.port}{signed_path}"
    headers = sign_request(
        app.key, method, signed_uri, body=body, created=int(app.clock().timestamp())
    )
    if body:
        headers["Content-Type"] = "application/json"
    async with harness.client.session.request(
        method, URL(sent_to, encoded=True), data=body or None, headers=headers
    ) as response:
        return response.status, json.loads(await response.read() or b"null")


def heartbeat(app: ApplianceClient) -> bytes:
    return json.dumps(
        {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": format_time(app.clock())}
    ).encode()


async def test_public_url_is_normalised(harness: Harness, settings: Settings) -> None:
    assert settings.public_url in (None, PUBLIC_NORMAL)


async def test_an_escaped_path_verifies_as_sent(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{escape_first(app.appliance_id)}/heartbeat"
    status, body = await send_raw(harness, app, "POST", path, heartbeat(app))
    assert status == 200, body


async def test_an_escaped_segment_verifies_as_sent(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{app.appliance_id}/bundles/%73ite-config"
    status, body = await send_raw(harness, app, "GET", path)
    assert status == 200, body


async def test_an_escaped_slash_is_signed_as_sent(harness: Harness) -> None:
    """``%2F`` decodes to a path separator: the signature over the URI as
    sent verifies, and the id it spells (``<id>/x``) is not the signer's."""
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{app.appliance_id}%2Fx/heartbeat"
    status, body = await send_raw(harness, app, "POST", path, heartbeat(app))
    assert (status, body["code"]) == (403, "wrong-appliance"), body


async def test_the_decoded_spelling_is_not_what_was_signed(harness: Harness) -> None:
    """Signed with an escape, sent without it: another URI, refused."""
    partner = await harness.partner()
    app = await harness.enroll(partner)
    sent = f"/api/v1/appliances/{app.appliance_id}/heartbeat"
    signed = f"/api/v1/appliances/{escape_first(app.appliance_id)}/heartbeat"
    status, body = await send_raw(harness, app, "POST", sent, heartbeat(app), signed_path=signed)
    assert (status, body["code"]) == (401, "bad-request-signature"), body
