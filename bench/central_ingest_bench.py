"""Audit ingest throughput of the central server over loopback, against a
plain aiohttp handler measured in the same run.

    uv run python bench/central_ingest_bench.py [--quick] [--batches N] [--appliances N]
        [--database-url URL] [--workers N]

Both servers run as separate processes; the same client sends the same
bodies to each: batches of 1,000 audit entries (about 300 bytes each),
several appliances at once, each appliance's batches in order.

- ``ingest``: the real server on SQLite (or ``--database-url``): RFC 9421
  check, nonce recorded, every entry parsed and hashed, tree and checkpoint
  verified, entries, checkpoint and receipt committed (``synchronous=FULL``),
  receipt signed.
- ``plain``: an aiohttp handler that reads the body and ``json.loads`` it;
- ``plain_entries``: the same, and it also base64-decodes and ``json.loads``
  every entry (the least any witness of this format must do per entry).

Entries travel as base64 of their exact canonical bytes (design §4), so
parsing a body is cheap: one string per entry. That is why ``plain`` is
fast and the ratio against it small.

Figures (``figure=value unit``): entries/s of each and the ratios. Targets
(issue 4): ingest >= 50,000 entries/s on SQLite, ratio >= 0.3 against the
plain handler.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiohttp import web

from msp_central.api_models import SiteOverrides
from msp_central.context import write_root_key
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.queries import create_enrollment_token, create_partner, create_site
from msp_protocol.delegation import DelegationCertificate, Scope, make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey
from msp_protocol.log import genesis_entry, make_checkpoint, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, consistency_proof
from msp_protocol.sync import SyncRequest

BATCH = 1_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"server at {url} did not start")


def serve_plain(port: int, *, entries: bool) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        value = json.loads(body)
        if entries:  # also decode and parse every entry, as any witness must
            for text in value["entries"]:
                json.loads(base64.b64decode(text))
        return web.json_response({"size": len(value["entries"])})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/api/v1/appliances/{appliance_id}/audit/sync", handler)
    app.router.add_get("/api/v1/openapi.json", lambda _r: web.json_response({}))
    web.run_app(app, host="127.0.0.1", port=port, print=None)


class Appliance:
    def __init__(self, appliance_id: str, key: SigningKey, serial: str) -> None:
        self.appliance_id = appliance_id
        self.key = key
        self.serial = serial

    def bodies(self, batches: int) -> list[bytes]:
        """Every batch of this appliance's log, prebuilt (the client's cost
        must not be what is measured)."""
        now = datetime.now(UTC)
        records = [
            genesis_entry(
                appliance_id=self.appliance_id,
                key_id=self.key.key_id,
                certificate_serial=self.serial,
                ts=now,
            )
        ]
        for index in range(1, batches * BATCH):
            records.append(
                make_entry(
                    index,
                    now,
                    "check.run",
                    "agent",
                    {
                        "check": "time_sync",
                        "result": "pass",
                        "observed": {"offset_ms": index % 97, "source": "ntp.example.org"},
                        "controls": {"hipaa": ["164.312(b)"], "pci_dss": ["10.6.1"]},
                    },
                )
            )
        leaves = LeafHashTree([r.leaf_hash for r in records])
        bodies = []
        state = TreeState()
        for start in range(0, len(records), BATCH):
            end = start + BATCH
            state.extend(r.leaf_hash for r in records[start:end])
            request = SyncRequest.build(
                old_size=start,
                entries=[r.raw for r in records[start:end]],
                consistency=consistency_proof(start, end, leaves) if start else [],
                checkpoint=make_checkpoint(
                    self.key, appliance_id=self.appliance_id, state=state, ts=now
                ),
            )
            bodies.append(request.canonical_bytes())
        return bodies


async def send_all(base: str, appliances: list[Appliance], bodies: dict[str, list[bytes]]) -> float:
    """Send every appliance's batches in order, appliances concurrently;
    return the seconds it took."""

    async def one(session: aiohttp.ClientSession, appliance: Appliance) -> None:
        path = f"/api/v1/appliances/{appliance.appliance_id}/audit/sync"
        for body in bodies[appliance.appliance_id]:
            headers = sign_request(appliance.key, "POST", base + path, body=body)
            headers["Content-Type"] = "application/json"
            async with session.post(base + path, data=body, headers=headers) as response:
                text = await response.read()
                if response.status != 200:
                    raise SystemExit(f"sync refused: {response.status} {text[:300]!r}")

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, a) for a in appliances))
        return time.perf_counter() - started


async def prepare_central(
    directory: Path, database_url: str, count: int
) -> tuple[list[str], SigningKey]:
    """Migrate, create a partner, a site and ``count`` enrollment tokens."""
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        now = datetime.now(UTC)
        async with engine.begin() as connection:
            partner, _key = await create_partner(connection, "bench", now)
            site = await create_site(connection, partner.id, "bench site", SiteOverrides(), now)
            tokens = []
            for _ in range(count):
                token, _ = await create_enrollment_token(
                    connection, site.id, timedelta(hours=1), now
                )
                tokens.append(token)
    finally:
        await engine.dispose()
    return tokens, write_root_key(directory / "root.key")


async def enroll(base: str, token: str, root_key_id: str) -> Appliance:
    key = SigningKey.generate()
    request = make_delegation_request(
        purpose="enroll",
        audience=root_key_id,
        subject=key,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        enrollment_token=token,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base + "/api/v1/enroll", json={"token": token, "request": request.to_wire()}
        ) as response,
    ):
        body = await response.json()
        if response.status != 201:
            raise SystemExit(f"enrollment failed: {body}")
    certificate = Envelope.from_wire(body["certificate"])
    serial = DelegationCertificate.from_json(certificate.payload_bytes()).serial
    return Appliance(body["appliance_id"], key, serial)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


async def run(batches: int, appliance_count: int, database_url: str | None, workers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-ingest-bench-") as tmp:
        directory = Path(tmp)
        url = database_url or f"sqlite+aiosqlite:///{directory / 'central.db'}"
        tokens, root = await prepare_central(directory, url, appliance_count)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        central = start(
            [
                "-m",
                "msp_central.cli",
                "--state-dir",
                str(directory),
                "--database-url",
                url,
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            {"MSP_CENTRAL_ROOT_KEY_FILE": str(directory / "root.key")},
        )
        try:
            await wait_until_up(base + "/api/v1/openapi.json")
            appliances = [await enroll(base, token, root.key_id) for token in tokens]
            bodies = {a.appliance_id: a.bodies(batches) for a in appliances}
            entries = batches * BATCH * appliance_count
            ingest_seconds = await send_all(base, appliances, bodies)
        finally:
            stop(central)

        baselines = {}
        for name, flags in (("plain", []), ("plain_entries", ["--parse-entries"])):
            plain_port = free_port()
            plain_base = f"http://127.0.0.1:{plain_port}"
            plain = start([__file__, "--serve-plain", str(plain_port), *flags])
            try:
                await wait_until_up(plain_base + "/api/v1/openapi.json")
                baselines[name] = await send_all(plain_base, appliances, bodies)
            finally:
                stop(plain)

    ingest_rate = entries / ingest_seconds
    plain_rate = entries / baselines["plain"]
    entries_rate = entries / baselines["plain_entries"]
    backend = url.split(":", 1)[0].split("+")[0]
    print(f"entries={entries} entries")
    print(f"appliances={appliance_count} appliances")
    print(f"workers={workers} processes")
    print(f"ingest_{backend}={ingest_rate:.0f} entries/s")
    print(f"plain_parse_handler={plain_rate:.0f} entries/s")
    print(f"plain_parse_entries_handler={entries_rate:.0f} entries/s")
    print(f"ingest_vs_plain={ingest_rate / plain_rate:.3f} ratio")
    print(f"ingest_vs_plain_entries={ingest_rate / entries_rate:.3f} ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--batches", type=int, default=10, help="batches per appliance")
    parser.add_argument("--appliances", type=int, default=8)
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--workers", type=int, default=1, help="server processes (serve --workers)")
    parser.add_argument("--serve-plain", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parse-entries", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_plain:
        serve_plain(args.serve_plain, entries=args.parse_entries)
        return
    batches, appliances = (2, 2) if args.quick else (args.batches, args.appliances)
    asyncio.run(run(batches, appliances, args.database_url, args.workers))


if __name__ == "__main__":
    main()
