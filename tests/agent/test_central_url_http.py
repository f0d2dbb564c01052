"""However the operator spells central_url, every signed request is accepted.

The real central server listens on loopback (SQLite); the agent loads its
settings from a file naming the server in another spelling (host case,
scheme case, a trailing slash, dot segments, escapes, the default port),
enrolls, and makes each kind of signed request. Before the URL was
normalised the agent signed the string as written while the HTTP client
sent a rewritten one, and the server refused every signed request."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given

from msp_agent.config import load_settings
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import DelegatedSigningKey
from msp_central.api_models import SiteOverrides
from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.queries import create_enrollment_token, create_partner, create_site
from msp_protocol.bundle import BundleKind
from msp_protocol.encoding import format_time, utc_now
from msp_protocol.httpsig import HttpRequest, verify_request
from msp_protocol.keys import SigningKey
from tests.protocol.test_urls import spellings

ROOT = SigningKey(b"\x0b" * 32)


@dataclass
class Central:
    port: int
    tokens: list[str]


@pytest.fixture
async def central(tmp_path: Path) -> AsyncIterator[Central]:
    """A central server on 127.0.0.1 with one site and a few enrollment tokens."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'central.db'}"
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        now = utc_now()
        async with engine.begin() as connection:
            partner, _ = await create_partner(connection, "Acme", now)
            site = await create_site(connection, partner.id, "Clinic", SiteOverrides(), now)
            tokens = [
                (await create_enrollment_token(connection, site.id, timedelta(hours=1), now))[0]
                for _ in range(3)
            ]
    finally:
        await engine.dispose()
    app = create_app(Settings(state_dir=tmp_path / "central", database_url=database_url), root=ROOT)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        yield Central(server.port, tokens)
    finally:
        await server.close()


SPELLINGS = [
    "http://LOCALHOST:{port}",
    "http://127.0.0.1:{port}/",
    "http://127.0.0.1:{port}/./",
    "HTTP://127.0.0.1:{port}",
    "hTTp://LocalHost:{port}//",
    "http://127.0.0.1:{port}/%2e/api/..",
    "  http://Localhost:{port}/a/b/../../  ",
]


async def signed_requests_succeed(client: HttpCentralClient, token: str, key_dir: Path) -> None:
    """Enroll (unsigned), then one of each signed request; any refusal raises."""
    signer = DelegatedSigningKey.load_or_create(key_dir, central_keys=[ROOT.verify_key])
    signer.install_certificate(
        await client.request_certificate(
            signer.enrollment_request(audience=ROOT.key_id, token=token),
            enrollment_token=token,
        )
    )
    client.signing_key = signer.signing_key
    answer = await client.heartbeat(
        {"version": "0.1.0", "log_size": 0, "queues": {}, "clock": format_time(utc_now())}
    )
    assert answer["witnessed_size"] == 0
    assert await client.fetch_bundle(BundleKind.SITE_CONFIG, None) is not None
    assert await client.fetch_revocations(None) is not None
    renewed = signer.install_certificate(
        await client.request_certificate(signer.renewal_request(audience=ROOT.key_id))
    )
    assert renewed.certificate.subject_key == signer.verify_key.hex


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_every_spelling_of_central_url_is_accepted(
    central: Central, tmp_path: Path, spelling: str
) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_url": spelling.format(port=central.port)}))
    settings = load_settings(config, state_dir=tmp_path / "state")
    async with aiohttp.ClientSession() as session:
        client = HttpCentralClient(
            settings.require_central_url(), session, signing_key=lambda: ROOT
        )
        await signed_requests_succeed(client, central.tokens[0], settings.key_dir)
    assert settings.central_url in (
        f"http://127.0.0.1:{central.port}",
        f"http://localhost:{central.port}",
    )


async def test_the_client_normalises_a_url_it_is_given_as_written(
    central: Central, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        client = HttpCentralClient(
            f"HTTP://LocalHost:{central.port}/./x/../", session, signing_key=lambda: ROOT
        )
        assert client.base_url == f"http://localhost:{central.port}"
        await signed_requests_succeed(client, central.tokens[1], tmp_path / "keys")


async def test_the_signed_target_uri_is_the_sent_one_byte_for_byte() -> None:
    """Below a path prefix with escapes an HTTP library would rewrite
    (lowercase hex, an escaped unreserved character): the signature verifies
    over the URI rebuilt from the raw request line and Host field, as they
    arrived, with no normalisation on the receiving side."""
    arrived: list[str] = []

    async def record(request: web.Request) -> web.Response:
        target_uri = f"http://{request.headers['Host']}{request.raw_path}"
        body = await request.read()
        verify_request(
            HttpRequest.build(request.method, target_uri, request.headers.items()),
            body,
            resolve_key=lambda key_id: ROOT.verify_key,
            nonce_seen=lambda key_id, nonce, created: False,
        )
        arrived.append(target_uri)
        return web.json_response({"witnessed_size": 0})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    port = server.port
    try:
        async with aiohttp.ClientSession() as session:
            client = HttpCentralClient(
                f"http://LOCALHOST:{port}/msp%7ecentral/caf%c3%a9%2fx/",
                session,
                signing_key=lambda: ROOT,
                appliance_id="appliance-1",
            )
            await client.heartbeat({"log_size": 0})
    finally:
        await server.close()
    base = f"http://localhost:{port}/msp~central/caf%C3%A9%2Fx"
    assert client.base_url == base
    assert arrived == [f"{base}/api/v1/appliances/appliance-1/heartbeat"]


class Loopback(AbstractResolver):
    """Every host name is this machine, at the test server's port: the
    request still names the host and port it was given (Host field)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self.port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@functools.cache
def server_tls(directory: str) -> ssl.SSLContext:
    """A TLS context with a throw-away self-signed certificate (the client
    does not check it: what is under test is the URL, not the PKI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central.test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def what_the_server_rebuilds(central_url: str, tls: ssl.SSLContext) -> tuple[str, str]:
    """Send one signed heartbeat to a server (TLS for an https URL) that
    rebuilds the target URI as the central server does without public_url
    (aiohttp's request.url) and verifies the signature over it; return what
    was signed and what was rebuilt."""
    rebuilt: list[str] = []

    async def check(request: web.Request) -> web.Response:
        target_uri = str(request.url)
        rebuilt.append(target_uri)
        verify_request(
            HttpRequest.build(request.method, target_uri, request.headers.items()),
            await request.read(),
            resolve_key=lambda key_id: ROOT.verify_key,
            nonce_seen=lambda key_id, nonce, created: False,
        )
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", check)
    https = central_url.strip().lower().startswith("https:")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls if https else None)
    try:
        assert server.port is not None
        connector = aiohttp.TCPConnector(resolver=Loopback(server.port), ssl=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = HttpCentralClient(
                central_url, session, signing_key=lambda: ROOT, appliance_id="a-1"
            )
            await client.heartbeat({})
    finally:
        await server.close()
    return client.base_url + "/api/v1/appliances/a-1/heartbeat", rebuilt[0]


@given(spellings())
def test_the_server_rebuilds_what_was_signed(
    tmp_path_factory: pytest.TempPathFactory, pair: tuple[str, str]
) -> None:
    normal, spelt = pair
    tls = server_tls(str(tmp_path_factory.getbasetemp()))
    signed, rebuilt = asyncio.run(what_the_server_rebuilds(spelt, tls))
    assert signed == rebuilt == normal + "/api/v1/appliances/a-1/heartbeat"
