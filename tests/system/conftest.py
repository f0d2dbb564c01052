"""Fixtures for the system tests: a central server process behind a
fault-injecting proxy, and a local stand-in for Twilio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.agent.fake_twilio import FakeTwilio
from tests.system.harness import Central, start_proxy
from tests.system.proxy import ProxyProcess

ON_CALL = "+15005550100"


@pytest.fixture
async def central(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Central]:
    lifetime = getattr(request, "param", None)
    server = Central(tmp_path / "central", certificate_lifetime_days=lifetime)
    server.setup()
    server.start()
    try:
        await server.ready()
        server.api("POST", f"/api/v1/sites/{server.site_id}/apply-preset", {"preset": "healthcare"})
        yield server
    finally:
        if server.server.running:
            server.server.terminate()
        print(server.server.output())  # shown by pytest only when the test fails


@pytest.fixture
def proxy(central: Central) -> Iterator[ProxyProcess]:
    with start_proxy(central.port) as process:
        yield process


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[FakeTwilio, str]]:
    fake = FakeTwilio()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def twilio_settings(fake: FakeTwilio, url: str, directory: Path) -> dict[str, Any]:
    secret = directory / "twilio-auth-token"
    directory.mkdir(parents=True, exist_ok=True)
    secret.write_text(fake.auth_token)
    secret.chmod(0o600)
    return {
        "twilio_account_sid": fake.account_sid,
        "twilio_auth_token_file": str(secret),
        "twilio_from": "+15005550006",
        "twilio_api_url": url,
        "on_call_numbers": [ON_CALL],
    }
