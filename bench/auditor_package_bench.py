"""Building a 90-day auditor package for a busy site, against reading what
it is made of, measured in the same run.

    uv run python bench/auditor_package_bench.py [--quick] [--bundles N]
        [--appliances N] [--postgresql] [--repeat N]

Setup (not measured): a central server process whose clock this process
moves; two appliances enrolled through the API (real tokens, keys and
certificates, renewed every 20 days as an agent does) write 90 days of
audit log, plus a few days before the period: per evidence bundle one
``evidence.signed`` entry and two ``check.run`` entries. Every bundle is
POSTed to the evidence endpoint and the log is synced in batches of 1,000
entries, every request signed (RFC 9421). Controls are the catalogue's
for the runbooks, so the summary covers real HIPAA and PCI DSS controls.

Then a fresh server (``msp-central serve``, real clock) on the same database,
and:

- ``baseline``: the database work alone, in this process: the site's
  evidence rows of the period, and per appliance the leaf hashes before its
  segment, the segment's entries and its checkpoint (the same queries the
  package needs, no parsing);
- ``build``: ``GET /api/v1/sites/{site}/auditor-package?from=..&to=..`` over
  loopback, until the whole body is read; also ``build_direct``:
  ``msp_central.packages.auditor_package`` called in this process;
- ``verify``: ``msp_protocol.package.check_auditor_package`` on the body, as
  an auditor runs it.

Figures (``figure=value unit``); each timing is the best of ``--repeat``.
``populate_seconds`` is the setup, for the record: on SQLite it is bound by
the evidence endpoint (one request, two write transactions a bundle),
15-25 ms a bundle on a shared 2-vCPU machine, so the default 100,000 bundles
take half an hour or more to set up; ``--quick`` uses 500.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.sharedctypes
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import sqlalchemy as sa
from aiohttp import web

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import load_root_key, write_root_key
from msp_central.db.engine import create_engine, read_only
from msp_central.db.migrate import upgrade
from msp_central.db.tables import audit_checkpoints, evidence
from msp_central.exports import entry_bytes, leaf_hashes
from msp_central.packages import auditor_package, package_request
from msp_central.queries import create_partner, get_partner, get_site
from msp_protocol.delegation import DelegationCertificate, Scope, make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import format_time, utc_now
from msp_protocol.evidence import EvidenceBundle, evidence_entry_data, sign_evidence
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey
from msp_protocol.log import EntryRecord, genesis_entry, make_checkpoint, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, consistency_proof
from msp_protocol.package import check_auditor_package
from msp_protocol.sync import MAX_BATCH_ENTRIES, SyncRequest

# The central tests' helpers for a throwaway PostgreSQL database.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.central.support import create_pg_database, drop_pg_database

DAYS = 90
LEAD_DAYS = 3  # before the period: each segment starts mid-log, with a prefix
RENEW_EVERY_DAYS = 20  # certificates last 30 days; agents renew well before
FRAMEWORKS = ("hipaa", "pci_dss")
IN_FLIGHT = 8  # evidence POSTs at once per appliance
PG_ADMIN_URL = os.environ.get(
    "MSP_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def catalogue_checks() -> dict[str, dict[str, tuple[str, ...]]]:
    """Runbook id -> the controls of FRAMEWORKS it gives evidence for, from
    the catalogue the server ships."""
    text = resources.files("msp_central").joinpath("data/frameworks-v2.json").read_text()
    mapped: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for mapping in json.loads(text)["mappings"]:
        if mapping["framework"] in FRAMEWORKS:
            mapped[mapping["runbook"]][mapping["framework"]].append(mapping["control"])
    return {
        runbook: {framework: tuple(ids) for framework, ids in sorted(by.items())}
        for runbook, by in sorted(mapped.items())
    }


# --- the server whose clock this process moves ----------------------------------------


class SharedClock:
    """The server's clock: a simulated instant (epoch seconds) the bench
    process sets."""

    def __init__(self, value: multiprocessing.sharedctypes.Synchronized[float]) -> None:
        self.value = value

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.value.value, UTC)


def serve_with_clock(
    state_dir: str,
    database_url: str,
    port: int,
    value: multiprocessing.sharedctypes.Synchronized[float],
) -> None:
    settings = Settings(state_dir=Path(state_dir), database_url=database_url)
    app = create_app(settings, root=load_root_key(settings.key_file), clock=SharedClock(value))
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def wait_until_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"server at {url} did not start")


# --- the appliances ---------------------------------------------------------------------


@dataclass
class Appliance:
    appliance_id: str
    key: SigningKey
    serial: str
    records: list[EntryRecord] = field(default_factory=list)
    synced: int = 0  # the size the server has witnessed
    bundles: int = 0


@dataclass
class Site:
    base: str
    session: aiohttp.ClientSession
    root_key_id: str
    clock: Callable[[], datetime]
    partner_key: str
    site_id: str = ""

    async def post(
        self, path: str, body: bytes, *, appliance: Appliance | None = None
    ) -> dict[str, Any]:
        if appliance is not None:
            headers = sign_request(
                appliance.key,
                "POST",
                self.base + path,
                body=body,
                created=int(self.clock().timestamp()),
            )
        else:
            headers = {"Authorization": f"Bearer {self.partner_key}"}
        headers["Content-Type"] = "application/json"
        async with self.session.post(self.base + path, data=body, headers=headers) as response:
            text = await response.read()
            if response.status not in (200, 201):
                raise RuntimeError(f"POST {path}: {response.status} {text[:300]!r}")
        value: dict[str, Any] = json.loads(text)
        return value

    async def enroll(self) -> Appliance:
        token = (await self.post(f"/api/v1/sites/{self.site_id}/enrollment-tokens", b"{}"))["token"]
        key = SigningKey.generate()
        request = make_delegation_request(
            purpose="enroll",
            audience=self.root_key_id,
            subject=key,
            scopes=(Scope.AUDIT, Scope.EVIDENCE),
            enrollment_token=token,
            created=self.clock(),
        )
        body = json.dumps({"token": token, "request": request.to_wire()}).encode()
        reply = await self.post("/api/v1/enroll", body)
        certificate = Envelope.from_wire(reply["certificate"])
        serial = DelegationCertificate.from_json(certificate.payload_bytes()).serial
        appliance = Appliance(reply["appliance_id"], key, serial)
        appliance.records.append(
            genesis_entry(
                appliance_id=appliance.appliance_id,
                key_id=key.key_id,
                certificate_serial=serial,
                ts=self.clock(),
            )
        )
        return appliance

    async def renew(self, appliance: Appliance) -> None:
        request = make_delegation_request(
            purpose="renew",
            audience=self.root_key_id,
            subject=appliance.key,
            scopes=(Scope.AUDIT, Scope.EVIDENCE),
            current=(appliance.serial, appliance.key),
            created=self.clock(),
        )
        path = f"/api/v1/appliances/{appliance.appliance_id}/certificates"
        body = json.dumps({"request": request.to_wire()}).encode()
        reply = await self.post(path, body, appliance=appliance)
        certificate = Envelope.from_wire(reply["certificate"])
        verified = DelegationCertificate.from_json(certificate.payload_bytes())
        appliance.serial = verified.serial
        append(
            appliance,
            self.clock(),
            "key.renewed",
            {
                "key_id": appliance.key.key_id,
                "serial": verified.serial,
                "not_after": verified.not_after.isoformat(),
            },
        )

    async def day(
        self,
        appliance: Appliance,
        start: datetime,
        bundles: int,
        checks: dict[str, dict[str, tuple[str, ...]]],
    ) -> None:
        """One day of an appliance's log: ``bundles`` evidence bundles, each
        between two other entries, POSTed, then the day's entries synced in
        batches."""
        runbooks = sorted(checks)
        envelopes = []
        step = timedelta(days=1) / max(bundles, 1)
        for n in range(bundles):
            at = start + step * n
            number = appliance.bundles + n
            runbook = runbooks[number % len(runbooks)]
            # About one run in twelve fails, each runbook's in turn.
            result = "fail" if number % 12 == 5 else "pass"
            append(
                appliance,
                at,
                "check.run",
                {"check_id": "journal-size", "result": "pass", "observed": {"bytes": number}},
            )
            bundle = EvidenceBundle(
                bundle_id=f"ev-{appliance.appliance_id[-8:]}-{number:07d}",
                site_id=self.site_id,
                appliance_id=appliance.appliance_id,
                check_id=runbook,
                controls=checks[runbook],
                result=result,
                observed={"status": result, "sample": number % 97, "source": "bench"},
                collected_at=at,
                log_index=len(appliance.records),
            )
            envelope = sign_evidence(appliance.key, bundle)
            envelopes.append((bundle.log_index, envelope))
            append(appliance, at, "evidence.signed", evidence_entry_data(envelope))
            append(
                appliance,
                at + step / 2,
                "check.run",
                {"check_id": "nix-generations", "result": "pass", "observed": {"count": 12}},
            )
        appliance.bundles += bundles
        path = f"/api/v1/appliances/{appliance.appliance_id}/evidence"
        end = len(appliance.records)
        for old in range(appliance.synced, end, MAX_BATCH_ENTRIES):
            new = min(old + MAX_BATCH_ENTRIES, end)
            # As an agent does: evidence goes up as it is signed, the log
            # follows at the next sync.
            batch = [e for index, e in envelopes if old <= index < new]
            await bounded(
                [self.post(path, e.canonical_bytes(), appliance=appliance) for e in batch],
                IN_FLIGHT,
            )
            await self.sync(appliance, old, new)

    async def sync(self, appliance: Appliance, old: int, new: int) -> None:
        records = appliance.records
        leaves = [r.leaf_hash for r in records[:new]]
        state = TreeState()
        state.extend(leaves)
        request = SyncRequest.build(
            old_size=old,
            entries=[r.raw for r in records[old:new]],
            consistency=consistency_proof(old, new, LeafHashTree(leaves)) if old else [],
            checkpoint=make_checkpoint(
                appliance.key, appliance_id=appliance.appliance_id, state=state, ts=self.clock()
            ),
        )
        path = f"/api/v1/appliances/{appliance.appliance_id}/audit/sync"
        reply = await self.post(path, request.canonical_bytes(), appliance=appliance)
        if reply["size"] != new:
            raise RuntimeError(f"sync answered size {reply['size']}, expected {new}")
        appliance.synced = new


def append(appliance: Appliance, at: datetime, kind: str, data: dict[str, Any]) -> None:
    appliance.records.append(make_entry(len(appliance.records), at, kind, "agent", data))


async def bounded(calls: list[Awaitable[Any]], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[Any]) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(c) for c in calls))


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole numbers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def populate(
    directory: Path, url: str, bundles: int, appliance_count: int, period_start: datetime
) -> tuple[str, str, int]:
    """Build the site through the API; return (site id, partner key, entries)."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        async with engine.begin() as connection:
            _partner, partner_key = await create_partner(connection, "bench MSP", utc_now())
    finally:
        await engine.dispose()
    root = write_root_key(directory / "keys" / "root.key")

    context = multiprocessing.get_context("spawn")
    first_day = period_start - timedelta(days=LEAD_DAYS)
    value = context.Value("d", (first_day - timedelta(minutes=5)).timestamp())
    port = free_port()
    server = context.Process(
        target=serve_with_clock, args=(str(directory), url, port, value), daemon=True
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    checks = catalogue_checks()
    try:
        await wait_until_up(base + "/api/v1/openapi.json")
        async with aiohttp.ClientSession() as session:
            site = Site(
                base,
                session,
                root.key_id,
                lambda: datetime.fromtimestamp(value.value, UTC),
                partner_key,
            )
            created = await site.post(
                "/api/v1/sites",
                json.dumps(
                    {"name": "Northside Clinic", "overrides": {"frameworks": list(FRAMEWORKS)}}
                ).encode(),
            )
            site.site_id = created["id"]
            appliances = [await site.enroll() for _ in range(appliance_count)]
            lead = max(1, bundles * LEAD_DAYS // DAYS)
            per_day = spread(bundles, DAYS)
            for day in range(-LEAD_DAYS, DAYS):
                start = period_start + timedelta(days=day)
                # Every request of the day is signed at its end, when the
                # day's entries exist.
                value.value = (start + timedelta(days=1)).timestamp()
                if day > -LEAD_DAYS and (day + LEAD_DAYS) % RENEW_EVERY_DAYS == 0:
                    for appliance in appliances:
                        await site.renew(appliance)
                count = per_day[day] if day >= 0 else spread(lead, LEAD_DAYS)[day]
                shares = spread(count, appliance_count)
                await asyncio.gather(
                    *(
                        site.day(appliance, start, share, checks)
                        for appliance, share in zip(appliances, shares, strict=True)
                    )
                )
    finally:
        server.terminate()
        server.join(15)
    # The genesis and renewals are synced with the first day after them.
    entries = sum(len(a.records) for a in appliances)
    return site.site_id, partner_key, entries


# --- the measurements -------------------------------------------------------------------


async def baseline(url: str, site_id: str, start: datetime, end: datetime) -> int:
    """The database reads the package is made of; returns the rows read."""
    engine = create_engine(url)
    try:
        async with read_only(engine) as connection:
            rows = (
                await connection.execute(
                    sa.select(
                        evidence.c.appliance_id,
                        evidence.c.log_index,
                        evidence.c.controls,
                        evidence.c.envelope,
                        evidence.c.in_log,
                    )
                    .where(
                        evidence.c.site_id == site_id,
                        evidence.c.collected_at >= start,
                        evidence.c.collected_at < end,
                    )
                    .order_by(evidence.c.appliance_id, evidence.c.log_index)
                )
            ).all()
            span: dict[str, list[int]] = {}
            for row in rows:
                if row.in_log:
                    held = span.setdefault(row.appliance_id, [row.log_index, row.log_index])
                    held[1] = row.log_index
            read = len(rows)
            for appliance_id, (first, last) in span.items():
                size = (
                    await connection.execute(
                        sa.select(audit_checkpoints.c.size, audit_checkpoints.c.receipt)
                        .where(
                            audit_checkpoints.c.appliance_id == appliance_id,
                            audit_checkpoints.c.size > last,
                        )
                        .order_by(audit_checkpoints.c.size)
                        .limit(1)
                    )
                ).one()[0]
                read += len(await leaf_hashes(connection, appliance_id, first))
                read += len(await entry_bytes(connection, appliance_id, first, int(size)))
    finally:
        await engine.dispose()
    return read


async def direct_build(url: str, site_id: str, start: datetime, end: datetime) -> bytes:
    engine = create_engine(url)
    try:
        async with read_only(engine) as connection:
            site = await get_site(connection, site_id)
            partner = await get_partner(connection, site.partner_id)
            asked = package_request(
                site, partner, frameworks=(), start=start, end=end, now=utc_now()
            )
            return await auditor_package(connection, asked, utc_now())
    finally:
        await engine.dispose()


async def http_build(base: str, partner_key: str, site_id: str, query: str) -> bytes:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"{base}/api/v1/sites/{site_id}/auditor-package?{query}",
            headers={"Authorization": f"Bearer {partner_key}"},
        ) as response,
    ):
        body = await response.read()
        if response.status != 200:
            raise SystemExit(f"package refused: {response.status} {body[:300]!r}")
    return body


def start_server(directory: Path, url: str, port: int) -> subprocess.Popen[bytes]:
    """The server as deployed (``msp-central serve``), on the real clock."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "msp_central.cli",
            "--state-dir",
            str(directory),
            "--database-url",
            url,
            "serve",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _undated(package: bytes) -> bytes:
    return re.sub(rb'"generated_at":"[^"]*"', b"", package, count=1)


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def timed(repeat: int, work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """The best of ``repeat`` runs, and the last run's value."""
    seconds = []
    value = None
    for _ in range(repeat):
        started = time.perf_counter()
        value = await work()
        seconds.append(time.perf_counter() - started)
    return min(seconds), value


async def run(bundles: int, appliance_count: int, postgresql: bool, repeat: int) -> None:
    pg_name = f"msp_package_bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="msp-package-bench-") as tmp:
        directory = Path(tmp)
        url = (
            await create_pg_database(pg_name, PG_ADMIN_URL)
            if postgresql
            else f"sqlite+aiosqlite:///{directory / 'central.db'}"
        )
        try:
            await measure(directory, url, bundles, appliance_count, repeat)
        finally:
            if postgresql:
                await drop_pg_database(pg_name, PG_ADMIN_URL)


async def measure(
    directory: Path, url: str, bundles: int, appliance_count: int, repeat: int
) -> None:
    # Whole days, ending at the last midnight: the period an auditor asks for.
    today = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
    period_start, period_end = today - timedelta(days=DAYS + 1), today - timedelta(days=1)
    started = time.perf_counter()
    site_id, partner_key, entries = await populate(
        directory, url, bundles, appliance_count, period_start
    )
    populate_seconds = time.perf_counter() - started
    query = urlencode({"from": format_time(period_start), "to": format_time(period_end)})

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(directory, url, port)
    try:
        await wait_until_up(base + "/api/v1/openapi.json")
        baseline_seconds, rows = await timed(
            repeat, lambda: baseline(url, site_id, period_start, period_end)
        )
        build_seconds, body = await timed(
            repeat, lambda: http_build(base, partner_key, site_id, query)
        )
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    direct_seconds, direct = await timed(
        repeat, lambda: direct_build(url, site_id, period_start, period_end)
    )
    # The same package both ways, but for the time it was generated at.
    if _undated(direct) != _undated(body):
        raise SystemExit(
            f"the API's package ({len(body)} bytes) differs from the direct one ({len(direct)})"
        )

    root = load_root_key(directory / "keys" / "root.key")
    verify_seconds, result = await timed(
        1, lambda: asyncio.to_thread(check_auditor_package, body, [root.verify_key], at=utc_now())
    )
    report = result.unwrap()
    if report.bundles != bundles or report.unwitnessed_bundles:
        raise SystemExit(f"the package proves {report.bundles} bundles, expected {bundles}")
    package = json.loads(body)
    package_entries = sum(len(segment["entries"]) for segment in package["logs"])

    print(f"bundles={report.bundles} bundles")
    print(f"appliances={appliance_count} appliances")
    print(f"entries={entries} entries")
    print(f"package_entries={package_entries} entries")
    print(f"baseline_rows={rows} rows")
    print(f"package_bytes={len(body)} bytes")
    print(f"populate_seconds={populate_seconds:.1f} s")
    print(f"baseline_seconds={baseline_seconds:.3f} s")
    print(f"build_seconds={build_seconds:.3f} s")
    print(f"build_direct_seconds={direct_seconds:.3f} s")
    print(f"verify_seconds={verify_seconds:.3f} s")
    print(f"build_over_baseline={build_seconds / baseline_seconds:.1f} ratio")
    print(f"verify_over_build={verify_seconds / build_seconds:.2f} ratio")
    if rss is not None:
        print(f"server_peak_rss={rss:.0f} MiB")
    print(f"build_rate={report.bundles / build_seconds:,.0f} bundles/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    parser.add_argument("--bundles", type=int, default=100_000, help="bundles in the period")
    parser.add_argument("--appliances", type=int, default=2)
    parser.add_argument("--postgresql", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    parser.add_argument("--repeat", type=int, default=3, help="timings keep the best of N")
    args = parser.parse_args()
    bundles = 500 if args.quick else args.bundles
    asyncio.run(run(bundles, args.appliances, args.postgresql, args.repeat))


if __name__ == "__main__":
    main()
