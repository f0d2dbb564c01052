"""Cheap requests stay cheap: an appliance request is refused from its
headers, before its body is read; large bodies are handled a few at a time;
a request aiohttp's parser refuses gets a problem document, and no
credential reaches the log.

The refusals travel over raw sockets that send the headers only: the
answer arrives although the body never does, which it could not if the
server waited for the body first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_central.queries import create_partner
from msp_central.serving import ProblemAppRunner, install_redaction, redact
from msp_central.uploads import UPLOAD_SLOTS
from msp_protocol.httpsig import HttpRequest, content_digest, sign_message, sign_request
from msp_protocol.keys import SigningKey
from tests.central.support import ROOT, ApplianceClient, Clock, Harness

EIGHT_MB = 8_000_000  # under the audit sync limit (8 MiB): only the signature refuses it
NONCE = "c0ffeec0ffeec0ffeec0ffeec0ffeec0"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/problem+json"), self
        value: dict[str, Any] = json.loads(self.body)
        assert value["status"] == self.status
        assert value["type"] == "urn:msp:problem:" + value["code"]
        return value


class Connection:
    """A raw HTTP/1.1 connection: send bytes, read one answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        async with asyncio.timeout(10):
            status = int((await self.reader.readline()).split()[1])
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(status, headers, body)

    def close(self) -> None:
        self.writer.close()


def head(method: str, path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def port_of(harness: Harness) -> int:
    port = harness.client.server.port
    assert port is not None
    return port


def sync_path(app: ApplianceClient) -> str:
    return f"/api/v1/appliances/{app.appliance_id}/audit/sync"


def forged(app: ApplianceClient, path: str, body_digest: str, *, key_id: str) -> dict[str, str]:
    """Headers signed by a key that is not the appliance's, naming ``key_id``."""
    headers = {"Content-Digest": body_digest}
    request = HttpRequest.build("POST", app.url(path), headers)
    params: dict[str, Any] = {
        "created": int(app.clock().timestamp()),
        "nonce": NONCE,
        "keyid": key_id,
    }
    signed = sign_message(
        SigningKey.generate(),
        request,
        components=["@method", "@target-uri", "content-digest"],
        params=params,
    )
    return headers | signed


def stale(app: ApplianceClient, path: str) -> dict[str, str]:
    created = int(app.clock().timestamp()) - 3600
    return sign_request(app.key, "POST", app.url(path), body=b"x" * 64, created=created)


# Ways to send 8 MB the server must not read, and the problem each gets.
DIGEST = content_digest(b"x" * 64)
REFUSALS: dict[str, tuple[Callable[[ApplianceClient, str], dict[str, str]], int, str]] = {
    "unsigned": (lambda app, path: {}, 401, "malformed-signature-header"),
    "forged for the appliance's key id": (
        lambda app, path: forged(app, path, DIGEST, key_id=app.key.key_id),
        401,
        "bad-request-signature",
    ),
    "unknown key": (
        lambda app, path: forged(app, path, DIGEST, key_id="ed25519:" + "ab" * 16),
        401,
        "unknown-key",
    ),
    "stale": (stale, 401, "stale-signature"),
    "signed without a digest": (
        lambda app, path: app.signed("POST", path, b""),
        401,
        "signature-missing-component",
    ),
}


async def refused_upfront(harness: Harness, path: str, headers: dict[str, str]) -> Answer:
    """Send the headers of an 8 MB upload, never its body; the answer."""
    port = port_of(harness)
    connection = await Connection.open(port)
    try:
        await connection.send(head("POST", path, port, headers))
        return await connection.answer()
    finally:
        connection.close()


@pytest.mark.parametrize("how", sorted(REFUSALS))
async def test_an_unsigned_or_badly_signed_upload_is_refused_before_its_body(
    harness: Harness, how: str
) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    make, status, code = REFUSALS[how]
    path = sync_path(app)
    headers = make(app, path) | {"Content-Type": "application/json"}
    answer = await refused_upfront(harness, path, headers | {"Content-Length": str(EIGHT_MB)})
    assert answer.status == status
    assert answer.problem["code"] == code
    # The appliance is unharmed: its next genuine sync goes through.
    app.grow(3)
    reply = await app.sync(app.batch(0))
    assert reply.status == 200, reply.body


async def test_other_appliance_routes_refuse_before_the_body(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    other = await harness.enroll(partner)
    for route in ("evidence", "escalations", "heartbeat", "certificates"):
        path = f"/api/v1/appliances/{app.appliance_id}/{route}"
        unsigned = await refused_upfront(
            harness, path, {"Content-Type": "application/json", "Content-Length": "100000"}
        )
        assert (unsigned.status, unsigned.problem["code"]) == (401, "malformed-signature-header")
        # Signed by another appliance for this one's path: refused as well.
        headers = other.signed("POST", path, b"x" * 64) | {"Content-Length": "100000"}
        misdirected = await refused_upfront(harness, path, headers)
        assert (misdirected.status, misdirected.problem["code"]) == (403, "wrong-appliance")


async def test_a_declared_body_over_the_limit_is_refused_before_anything(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = sync_path(app)
    headers = app.signed("POST", path, b"x" * 64) | {"Content-Length": str(9 * 1024 * 1024)}
    answer = await refused_upfront(harness, path, headers)
    assert (answer.status, answer.problem["code"]) == (413, "body-too-large")


async def test_a_good_signed_sync_works_with_and_without_a_length(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    app.grow(5)
    reply = await app.sync(app.batch(0))
    assert reply.status == 200, reply.body
    assert reply.body["size"] == 5
    # Chunked (no Content-Length): read up to the route's limit, then verified.
    app.grow(5)
    body = app.batch(5).canonical_bytes()
    path = sync_path(app)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = await harness.client.post(
        path, data=chunks(), headers=app.signed("POST", path, body)
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["size"] == 10


async def test_a_chunked_body_is_stopped_at_the_route_limit(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{app.appliance_id}/heartbeat"
    limit = harness.client.app[CENTRAL].settings.max_body_bytes
    body = b"x" * (limit + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await harness.client.post(
        path, data=chunks(), headers=app.signed("POST", path, body)
    )
    assert response.status == 413
    assert (await response.json())["code"] == "body-too-large"


# --- the bound on large bodies at once ----------------------------------------------


@pytest.fixture
async def busy_harness(database_url: str, tmp_path: Path, aiohttp_client: Any) -> Harness:
    """A server taking one large (over 1 KiB) body at a time, waiting 0.2 s."""
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        large_body_bytes=1024,
        max_large_bodies=1,
        large_body_wait_seconds=0.2,
    )
    clock = Clock()
    app = create_app(settings, root=ROOT, clock=clock)
    client = await aiohttp_client(app)
    return Harness(client, app[CENTRAL].engine, clock)


async def test_large_bodies_beyond_the_bound_get_503_with_retry_after(
    busy_harness: Harness,
) -> None:
    harness = busy_harness
    partner = await harness.partner()
    first, second = await harness.enroll(partner), await harness.enroll(partner)
    port = port_of(harness)
    first.grow(40)
    body = first.batch(0).canonical_bytes()
    assert len(body) > 1024
    path = sync_path(first)
    slots = harness.client.app[UPLOAD_SLOTS]
    slow = await Connection.open(port)
    try:
        headers = first.signed("POST", path, body) | {"Content-Length": str(len(body))}
        await slow.send(head("POST", path, port, headers) + body[:100])
        async with asyncio.timeout(10):
            # The server's state, not an event of ours: poll it.
            while slots.held == 0:  # noqa: ASYNC110 - the first upload holds the only slot
                await asyncio.sleep(0.01)
        # Another large upload: no slot within the wait, 503, its body unread.
        second.grow(40)
        other = second.batch(0).canonical_bytes()
        other_path = sync_path(second)
        headers = second.signed("POST", other_path, other) | {"Content-Length": str(len(other))}
        answer = await refused_upfront(harness, other_path, headers)
        assert answer.status == 503
        assert answer.problem["code"] == "server-busy"
        assert int(answer.headers["retry-after"]) >= 1
        # A small request needs no slot meanwhile.
        reply = await second.request(
            "GET", f"/api/v1/appliances/{second.appliance_id}/bundles/site-config"
        )
        assert reply.status == 200, reply.body
        # The first upload completes; then the second goes through on retry.
        await slow.send(body[100:])
        done = await slow.answer()
        assert done.status == 200, done.body
    finally:
        slow.close()
    assert slots.held == 0
    reply = await second.sync(second.batch(0))
    assert reply.status == 200, reply.body


# --- what aiohttp's parser refuses, and the log ----------------------------------------


@pytest.fixture
async def problem_server(settings: Settings) -> AsyncIterator[tuple[int, str]]:
    """The app served as ``msp-central serve`` serves it; its port and a
    real partner API key."""
    app = create_app(settings, root=ROOT, clock=Clock())
    runner = ProblemAppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with app[CENTRAL].engine.begin() as connection:
            _row, key = await create_partner(connection, "Acme MSP", Clock()())
        yield port, key
    finally:
        await runner.cleanup()


MALFORMED = {
    "broken header line": ("{auth}\r\nBroken header line\r\n", 400, "malformed"),
    "control character in the key's line": ("{auth}\x01\r\n", 400, "malformed"),
    "header line too long": ("{auth}\r\nX-Long: " + "a" * 9000 + "\r\n", 431, "header-too-large"),
    "bad method": ("{auth}\r\n", 400, "malformed"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_request_the_parser_refuses_gets_a_problem_and_no_key_is_logged(
    problem_server: tuple[int, str], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    port, key = problem_server
    lines, status, code = MALFORMED[case]
    method = "G(T" if case == "bad method" else "GET"
    raw = f"{method} /api/v1/partner HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    raw += lines.format(auth=f"Authorization: Bearer {key}") + "\r\n"
    caplog.set_level(logging.DEBUG)
    connection = await Connection.open(port)
    try:
        await connection.send(raw.encode("latin-1"))
        answer = await connection.answer()
    finally:
        connection.close()
    assert answer.status == status
    assert answer.problem["code"] == code
    assert key.encode() not in answer.body
    assert any(r.name == "aiohttp.server" for r in caplog.records)  # it was logged
    secret = key.split("_", 1)[1]
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in (record.exc_text or "")
        assert record.exc_info is None or secret not in str(record.exc_info[1])


def test_every_kind_of_secret_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_redaction()
    key, token = "mspk_" + "0f" * 32, "msp-enroll_" + "a1" * 32
    caplog.set_level(logging.INFO)
    log = logging.getLogger("msp_central")
    log.info("line %r", f"Authorization: Bearer {key}\r\nCookie: session=abc")
    log.info("token %s and key %s cut short", token, key[:20])
    log.info("Signature: msp=:AAAA:")
    log.info("invitation %s", "msp_inv_" + "b2" * 32)
    try:
        raise ValueError(f"Authorization: Bearer {key}")
    except ValueError:
        log.exception("failed")
    text = caplog.text
    for secret in ("0f0f0f", "a1a1a1", "b2b2b2", "session=abc", "AAAA"):
        assert secret not in text, secret
    assert redact("a plain line") == "a plain line"
    assert "mspk_[redacted]" in redact(key)
