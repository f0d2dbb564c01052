"""Hostile requests the server must answer as problems, never as a 500
with internal text: bytes that are not UTF-8 in the headers it reads, and
failures inside the server, which are logged with their traceback and
shown to nobody."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp import web

from msp_central.app import create_app
from msp_central.config import Settings
from msp_protocol.errors import UsageError
from tests.central.support import ROOT, Harness


async def _raw(harness: Harness, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send ``head`` (request line and headers, as bytes) over a socket."""
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
        writer.write(head + length + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in headers.lower(), answer[:500]
    return int(status_line.split()[1]), json.loads(payload)


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (
            b"GET /api/v1/sites HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\n",
            401,
            "bad-credentials",
        ),
        (
            b"GET /api/v1/sites HTTP/1.1\r\nHost: x\r\nAuthorization: \xc3\xa9\xff \xff\r\n",
            401,
            "bad-credentials",
        ),
        (
            b"GET /api/v1/sites HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer mspk_\xe2\x80\x8b\r\n",
            401,
            "bad-credentials",
        ),
        (
            b"POST /api/v1/appliances/a-1/heartbeat HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nSignature-Input: msp=\xff\xfe\r\n"
            b"Signature: msp=:\xff:\r\n",
            401,
            None,
        ),
        (
            b'GET /api/v1/revocations HTTP/1.1\r\nHost: x\r\nIf-None-Match: "\xff"\r\n'
            b"Signature-Input: \xff\r\nSignature: \xff\r\n",
            401,
            None,
        ),
    ],
    ids=["bearer-latin1", "scheme-not-utf8", "bearer-zero-width", "signature", "etag"],
)
async def test_headers_that_are_not_utf8(
    harness: Harness, head: bytes, status: int, code: str | None
) -> None:
    got, problem = await _raw(harness, head, b"{}" if head.startswith(b"POST") else b"")
    assert got == status, problem
    if code is not None:
        assert problem["code"] == code


async def test_a_server_failure_is_logged_and_tells_nothing(
    settings: Settings, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Raised from the protocol library (a misuse inside the server) or
    anywhere else: the caller reads a 500 that names nothing internal; the
    log holds the traceback."""
    app = create_app(settings, root=ROOT)

    async def misuse(request: web.Request) -> web.Response:
        raise UsageError("internal detail: the table layout")

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("internal detail: a file path")

    app.router.add_get("/test/misuse", misuse)
    app.router.add_get("/test/crash", crash)
    client = await aiohttp_client(app)
    caplog.set_level(logging.ERROR, logger="msp_central")
    for path in ("/test/misuse", "/test/crash"):
        caplog.clear()
        response = await client.get(path)
        body = await response.json(content_type=None)
        assert response.status == 500
        assert body["code"] == "internal-error"
        assert "internal detail" not in json.dumps(body)
        assert any(
            record.exc_info and "internal detail" in str(record.exc_info[1])
            for record in caplog.records
        ), caplog.records
