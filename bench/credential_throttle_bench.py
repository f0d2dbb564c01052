"""What repeated failed credentials get from the central server, what a
neighbour behind the same address gets meanwhile, and what a refusal costs.

    uv run python bench/credential_throttle_bench.py [--smoke] [--requests N]

The real server runs in its own process on loopback (SQLite, the default
throttle settings), as if behind a reverse proxy: ``trusted_proxies`` is the
loopback address and each simulated client names its address in
X-Forwarded-For. One partner, one site, two enrolled appliances.

Behaviour, one address per phase (``figure=value`` counts and statuses):

- ``same_key``: one unknown API key, again and again, until 429; then the
  partner's valid key from the same address;
- ``spray``: a new unknown API key each time until the first 429, the valid
  key then, and on until the valid key too is refused (only with a flood
  bound set; by default it never is: the run stops at SPRAY_CAP failures);
- ``signature``: appliance A's heartbeats under its own key id with a
  signature that does not verify, until 429; then appliance B's heartbeats
  and an audit upload from the same address;
- ``enrollment``: one unknown enrollment token until 429; then a new
  appliance enrolling with a valid token from the same address;
- the security alerts stored at the end.

Cost, each the mean of ``--requests`` sequential requests over one
keep-alive connection, with every request built beforehand:

- ``key_refused_401``: an unknown API key, each from a new address (looked
  up in the database): the baseline;
- ``key_throttled_429``: the throttled key from its address (refused before
  any lookup); ``key_valid_200``: the valid key on the same route;
- ``signature_refused_401``: A's key id with a bad signature, each from a
  new address (key looked up, Ed25519 checked): the baseline;
- ``signature_throttled_429``: the same from the throttled address.

The ratios 429/401 are what the figures are for; the absolute times depend
on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa

from central_ingest_bench import Appliance, enroll, free_port, stop, wait_until_up
from msp_central.api_models import SiteOverrides
from msp_central.context import write_root_key
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.db.tables import security_alerts
from msp_central.queries import create_enrollment_token, create_partner, create_site
from msp_protocol.delegation import Scope, make_delegation_request
from msp_protocol.encoding import format_time
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey

PARTNER_ROUTE = "/api/v1/partner"
# Far above every default bound: a phase that reaches it has found none.
GIVE_UP = 5_000
# Failures sprayed from one address before the run says the valid key from
# it was never refused (twice the source budget's old flood bound).
SPRAY_CAP = 2_000


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The server, its log to a file: thousands of refusals would fill a pipe
    nobody reads, and the server would stop to wait for it."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, *args], env={**os.environ, **env}, stdout=sink, stderr=sink
        )


def addresses() -> Iterator[str]:
    """A new client address each time (10.0.0.0/8)."""
    for n in itertools.count(1):
        yield f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


async def prepare(directory: Path, url: str) -> tuple[str, list[str], SigningKey]:
    """Migrate; a partner (its key), a site and three enrollment tokens."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        now = datetime.now(UTC)
        async with engine.begin() as connection:
            partner, key = await create_partner(connection, "bench", now)
            site = await create_site(connection, partner.id, "bench site", SiteOverrides(), now)
            tokens = [
                (await create_enrollment_token(connection, site.id, timedelta(hours=1), now))[0]
                for _ in range(3)
            ]
    finally:
        await engine.dispose()
    return key, tokens, write_root_key(directory / "root.key")


async def count_alerts(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            found = await connection.execute(
                sa.select(sa.func.count()).where(security_alerts.c.code == "credential-failures")
            )
            return int(found.scalar_one())
    finally:
        await engine.dispose()


class Client:
    """Requests over one keep-alive connection, each from a named address."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def send(
        self, method: str, path: str, address: str, headers: dict[str, str], body: bytes = b""
    ) -> int:
        async with self.session.request(
            method,
            self.base + path,
            data=body or None,
            headers={**headers, "X-Forwarded-For": address},
        ) as response:
            await response.read()
            return response.status

    async def with_key(self, key: str, address: str) -> int:
        return await self.send("GET", PARTNER_ROUTE, address, {"Authorization": f"Bearer {key}"})

    def heartbeat(self, appliance: Appliance, *, forged: bool) -> tuple[str, dict[str, str], bytes]:
        path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
        body = (
            b'{"clock":"' + format_time(datetime.now(UTC)).encode() + b'","log_size":0,'
            b'"queues":{},"version":"bench"}'
        )
        headers = sign_request(appliance.key, "POST", self.base + path, body=body)
        if forged:  # another request's signature: A's key id, not verifying
            other = sign_request(appliance.key, "POST", self.base + path, body=body)
            headers["Signature"] = other["Signature"]
        return path, headers | {"Content-Type": "application/json"}, body

    async def beat(self, appliance: Appliance, address: str, *, forged: bool = False) -> int:
        path, headers, body = self.heartbeat(appliance, forged=forged)
        return await self.send("POST", path, address, headers, body)

    async def upload(self, appliance: Appliance, address: str) -> int:
        path = f"/api/v1/appliances/{appliance.appliance_id}/audit/sync"
        body = appliance.bodies(1)[0]
        headers = sign_request(appliance.key, "POST", self.base + path, body=body)
        return await self.send(
            "POST", path, address, headers | {"Content-Type": "application/json"}, body
        )

    async def enroll(self, token: str, root: SigningKey, address: str) -> int:
        request = make_delegation_request(
            purpose="enroll",
            audience=root.key_id,
            subject=SigningKey.generate(),
            scopes=[Scope.AUDIT, Scope.EVIDENCE],
            enrollment_token=token,
        )
        async with self.session.post(
            self.base + "/api/v1/enroll",
            json={"token": token, "request": request.to_wire()},
            headers={"X-Forwarded-For": address},
        ) as response:
            await response.read()
            return response.status


async def until_429(attempt: Any) -> int:
    """How many answers came before the first 429."""
    for before in range(GIVE_UP):
        if await attempt() == 429:
            return before
    raise SystemExit(f"no 429 after {GIVE_UP} failed attempts")


def statuses(answers: list[int]) -> str:
    return ",".join(f"{status}x{count}" for status, count in sorted(Counter(answers).items()))


async def timed(requests: list[Any]) -> tuple[float, list[int]]:
    """Mean seconds per request, sent one after another; the statuses."""
    started = time.perf_counter()
    answers = [await request() for request in requests]
    return (time.perf_counter() - started) / len(requests), answers


async def behaviour(
    client: Client, key: str, a: Appliance, b: Appliance, tokens: list[str], root: SigningKey
) -> dict[str, str]:
    figures: dict[str, str] = {}
    same = f"mspk_{secrets.token_hex(32)}"
    figures["same_key_failures_before_429"] = str(
        await until_429(lambda: client.with_key(same, "192.0.2.1"))
    )
    figures["same_key_neighbour_valid_key"] = str(await client.with_key(key, "192.0.2.1"))

    spray = "192.0.2.2"
    figures["spray_failures_before_429"] = str(
        await until_429(lambda: client.with_key(f"mspk_{secrets.token_hex(32)}", spray))
    )
    figures["spray_neighbour_valid_key_after_429"] = str(await client.with_key(key, spray))
    # With the default settings (no flood bound) the valid key is never
    # refused; SPRAY_CAP failures later the figure says so.
    flood = 1 + int(figures["spray_failures_before_429"])
    while await client.with_key(key, spray) == 200 and flood <= SPRAY_CAP:
        await client.with_key(f"mspk_{secrets.token_hex(32)}", spray)
        flood += 1
    figures["spray_failures_before_valid_key_refused"] = (
        str(flood) if flood <= SPRAY_CAP else f"never (still served after {SPRAY_CAP})"
    )

    nat = "192.0.2.3"
    figures["signature_failures_before_429"] = str(
        await until_429(lambda: client.beat(a, nat, forged=True))
    )
    figures["signature_own_valid_key_same_address"] = str(await client.beat(a, nat))
    figures["signature_own_valid_key_elsewhere"] = str(await client.beat(a, "192.0.2.99"))
    beats = [await client.beat(b, nat) for _ in range(20)]
    figures["signature_neighbour_heartbeats"] = statuses(beats)
    figures["signature_neighbour_upload"] = str(await client.upload(b, nat))

    unknown = f"msp-enroll_{secrets.token_hex(32)}"
    figures["enrollment_failures_before_429"] = str(
        await until_429(lambda: client.enroll(unknown, root, "192.0.2.4"))
    )
    figures["enrollment_neighbour_valid_token"] = str(
        await client.enroll(tokens[2], root, "192.0.2.4")
    )
    return figures


async def costs(client: Client, key: str, a: Appliance, count: int) -> dict[str, str]:
    fresh = addresses()
    throttled_key = f"mspk_{secrets.token_hex(32)}"
    await until_429(lambda: client.with_key(throttled_key, "192.0.2.10"))
    await until_429(lambda: client.beat(a, "192.0.2.11", forged=True))

    def key_call(secret: str, address: str) -> Any:
        return lambda: client.with_key(secret, address)

    def signed_call(address: str) -> Any:
        path, headers, body = client.heartbeat(a, forged=True)
        return lambda: client.send("POST", path, address, headers, body)

    runs = {
        "key_refused_401": [
            key_call(f"mspk_{secrets.token_hex(32)}", next(fresh)) for _ in range(count)
        ],
        "key_throttled_429": [key_call(throttled_key, "192.0.2.10") for _ in range(count)],
        "key_valid_200": [key_call(key, "192.0.2.12") for _ in range(count)],
        "signature_refused_401": [signed_call(next(fresh)) for _ in range(count)],
        "signature_throttled_429": [signed_call("192.0.2.11") for _ in range(count)],
    }
    figures: dict[str, str] = {}
    means: dict[str, float] = {}
    for name, requests in runs.items():
        mean, answers = await timed(requests)
        means[name] = mean
        figures[f"{name}_mean"] = f"{mean * 1e6:.0f} us"
        figures[f"{name}_answers"] = f"{statuses(answers)} status"
    figures["key_429_vs_401"] = f"{means['key_throttled_429'] / means['key_refused_401']:.2f} ratio"
    figures["key_429_vs_valid_200"] = (
        f"{means['key_throttled_429'] / means['key_valid_200']:.2f} ratio"
    )
    figures["signature_429_vs_401"] = (
        f"{means['signature_throttled_429'] / means['signature_refused_401']:.2f} ratio"
    )
    return figures


async def run(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-throttle-bench-") as tmp:
        directory = Path(tmp)
        url = f"sqlite+aiosqlite:///{directory / 'central.db'}"
        key, tokens, root = await prepare(directory, url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        central = start(
            [
                *("-m", "msp_central.cli", "--state-dir", str(directory)),
                *("--database-url", url, "serve", "--port", str(port)),
            ],
            {
                "MSP_CENTRAL_ROOT_KEY_FILE": str(directory / "root.key"),
                "MSP_CENTRAL_TRUSTED_PROXIES": '["127.0.0.1"]',
            },
            directory / "server.log",
        )
        try:
            await wait_until_up(base + "/api/v1/openapi.json")
            a = await enroll(base, tokens[0], root.key_id)
            b = await enroll(base, tokens[1], root.key_id)
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = Client(session, base)
                figures = await behaviour(client, key, a, b, tokens, root)
                figures |= await costs(client, key, a, count)
        finally:
            stop(central)
        figures["alerts_stored"] = str(await count_alerts(url))
    print(f"requests={count} per cost figure")
    for name, value in figures.items():
        print(f"{name}={value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a small run (CI)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per cost figure")
    args = parser.parse_args()
    asyncio.run(run(50 if args.smoke else args.requests))


if __name__ == "__main__":
    main()
