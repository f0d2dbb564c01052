"""Page timings of the partner console at a real partner's volume, against a
trivial request measured in the same run.

    uv run python bench/console_pages_bench.py [--quick] [--postgresql] [--rounds N]
        [--cache-dir DIR] [--reseed]

It seeds one partner with 1,000 sites (mixed frameworks, tiers and
overrides), 3,000 enrolled appliances (certificates, heartbeats with queues,
witnessed log sizes) and a million signed evidence bundles over 90 days,
escalations and security alerts, plus a second partner with a tenth of that
(every list must find the first partner's rows by index, not by skipping
the other's). Rows go straight into the real schema after the migrations,
with SQLAlchemy Core bulk inserts; bundles are really signed by their
appliance's key, so every value reads back as the server stored it. The
SQLite file is kept (``--cache-dir``, keyed by SEED_VERSION and the volume)
so a second run does not seed again; PostgreSQL (``--postgresql``,
127.0.0.1:5432, trust auth) gets a database of its own for the run,
dropped afterwards; it is filled from the cached SQLite file, so both
backends hold the same rows.

The server runs as deployed (``msp-central serve``) on loopback. A page's
time is what the browser waits for: the GET of its HTML shell, then the
JSON calls its module makes on load (PAGE_CALLS), concurrently, wall-clock;
all with a console session cookie. The same calls made with an API key
instead give the ``key`` figures. Pages are measured round-robin, after
warm-up rounds.

Figures (``figure=value unit``): seeding time; per page and per call the
median and p95 in ms; each page's median over the baseline's (``GET
/api/v1/me`` with the session); whether each page's median is under the
target. Target (the console issue): every page under 300 ms on this volume.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from yarl import URL

from msp_central.console.accounts import create_invite, create_user
from msp_central.context import write_root_key
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.db.tables import (
    appliances,
    audit_logs,
    certificates,
    control_runbook_mapping,
    escalations,
    evidence,
    evidence_heads,
    metadata,
    partners,
    presets,
    runbooks,
    security_alerts,
    sites,
)
from msp_central.evidence_heads import head_of, reason_of_envelope
from msp_central.openapi import OPERATIONS, QUERY_PARAMETERS
from msp_central.queries import create_api_key, create_partner, new_id
from msp_protocol.bundle import Escalation
from msp_protocol.delegation import DelegationCertificate, Scope, issue_delegation
from msp_protocol.encoding import format_time
from msp_protocol.evidence import CheckResult, EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey

# The central tests' helpers for a throwaway PostgreSQL database.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.central.support import create_pg_database, drop_pg_database

# Bump when what is seeded changes: a cached file of another version is seeded again.
SEED_VERSION = 2
TARGET_MS = 300.0
DAYS = 90
PG_ADMIN_URL = os.environ.get(
    "MSP_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
EMAIL = "bench-admin@example.com"
PASSWORD = "a bench password, long enough"
INSERT_CHUNK = 5_000

# The JSON calls each page's module makes on load, as the browser makes
# them ({site}: the first site of the list). Keep in step with the pages'
# modules; check_page_calls holds every path and query to the OpenAPI
# document, so a renamed route or filter fails the run.
PAGE_CALLS: dict[str, list[str]] = {
    "compliance": [
        "/api/v1/partner",
        "/api/v1/frameworks",
        "/api/v1/presets",
        "/api/v1/framework-usage",
        "/api/v1/sites?limit=50",
    ],
    # The Posture page is two views: the partner's roll-up, and one site's
    # controls with its trend (?site=).
    "posture": ["/api/v1/posture"],
    "posture-site": ["/api/v1/sites/{site}/posture", "/api/v1/sites/{site}/posture/trend"],
    "appliances": [
        "/api/v1/sites?limit=50",
        "/api/v1/appliances?limit=50",
        "/api/v1/appliances/summary",
    ],
    "escalations": [
        "/api/v1/escalations?open=true&limit=50",
        "/api/v1/security-alerts?limit=50",
    ],
    "auditors": ["/api/v1/sites?limit=50", "/.well-known/msp-central-key"],
    "users": ["/api/v1/me", "/api/v1/users", "/api/v1/user-invites", "/api/v1/api-keys"],
}
BASELINE = "/api/v1/me"
# The HTML shell of a page, where it is not /console/<page>.
SHELLS = {"posture-site": "/console/posture?site={site}"}


@dataclass(frozen=True)
class Volume:
    """What one partner holds."""

    sites: int
    appliances: int
    bundles: int
    escalations: int
    alerts: int

    def tenth(self) -> Volume:
        return Volume(*(max(1, value // 10) for value in asdict(self).values()))


FULL = Volume(sites=1_000, appliances=3_000, bundles=1_000_000, escalations=3_000, alerts=1_000)
QUICK = Volume(sites=20, appliances=60, bundles=5_000, escalations=60, alerts=20)


def check_page_calls() -> None:
    """Every call of PAGE_CALLS is a GET the OpenAPI document declares,
    with only query parameters it declares for that operation."""
    declared = {(method, path) for method, path, *_ in OPERATIONS}
    for page, calls in PAGE_CALLS.items():
        for call in calls:
            parts = urlsplit(call)
            path = parts.path.replace("{site}", "{site_id}")
            if ("get", path) not in declared:
                raise SystemExit(f"PAGE_CALLS[{page!r}]: GET {path} is not an operation")
            names = {p["name"] for p in QUERY_PARAMETERS.get(("get", path), [])}
            for name, _ in parse_qsl(parts.query):
                if name not in names:
                    raise SystemExit(f"PAGE_CALLS[{page!r}]: {path} takes no ?{name}")


# --- seeding --------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """What the migrations loaded: checks per tier, the controls each check
    gives evidence for, and the presets."""

    checks: dict[str, list[str]]  # tier -> check names
    controls: dict[str, dict[str, list[str]]]  # check -> framework -> control ids
    presets: list[tuple[str, str, list[str]]]  # (industry, tier, frameworks)
    frameworks: list[str]


async def read_catalogue(connection: AsyncConnection) -> Catalogue:
    rows = (await connection.execute(sa.select(runbooks.c.tier, runbooks.c.check_name))).all()
    checks: dict[str, list[str]] = {"basic": [], "full": []}
    for row in rows:
        checks["full"].append(row.check_name)
        if row.tier == "basic":
            checks["basic"].append(row.check_name)
    controls: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    mapped = await connection.execute(
        sa.select(
            runbooks.c.check_name,
            control_runbook_mapping.c.framework_id,
            control_runbook_mapping.c.control_id,
        ).join(runbooks, runbooks.c.id == control_runbook_mapping.c.runbook_id)
    )
    for pair in mapped:
        controls[pair.check_name][pair.framework_id].append(pair.control_id)
    preset_rows = (await connection.execute(sa.select(presets).order_by(presets.c.position))).all()
    return Catalogue(
        checks={tier: sorted(set(names)) for tier, names in checks.items()},
        controls={check: dict(by) for check, by in controls.items()},
        presets=[(row.id, row.tier, list(row.frameworks)) for row in preset_rows],
        frameworks=sorted({f for by in controls.values() for f in by}),
    )


async def insert(engine: AsyncEngine, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), INSERT_CHUNK):
        async with engine.begin() as connection:
            await connection.execute(sa.insert(table), rows[start : start + INSERT_CHUNK])


def spread(total: int, parts: int) -> Iterator[int]:
    """``total`` split into ``parts`` near-equal whole numbers."""
    base, extra = divmod(total, parts)
    for index in range(parts):
        yield base + (1 if index < extra else 0)


@dataclass
class Fleet:
    """The appliances seeded for one partner, with what their bundles need."""

    rows: list[dict[str, Any]]
    keys: dict[str, SigningKey]
    tiers: dict[str, str]  # appliance -> its site's effective tier
    frameworks: dict[str, list[str]]  # appliance -> its site's effective frameworks


_KINDS = ("Clinic", "Office", "Branch", "Store")


def site_rows(
    partner_id: str, count: int, now: datetime, catalogue: Catalogue, rng: random.Random
) -> list[dict[str, Any]]:
    """Sites with mixed settings: a fifth inherit everything, the others
    override tier, industry or frameworks (a preset's or a hand-picked set);
    a few are decommissioned."""
    rows: list[dict[str, Any]] = []
    for index in range(count):
        industry, tier, chosen = None, None, None
        if index % 5:
            preset = rng.choice(catalogue.presets)
            industry = preset[0] if rng.random() < 0.6 else None
            tier = rng.choice([None, "basic", "full"])
            chosen = (
                preset[2]
                if rng.random() < 0.5
                else rng.sample(catalogue.frameworks, rng.randint(1, 3))
            )
        rows.append(
            {
                "id": new_id("site"),
                "partner_id": partner_id,
                "name": f"Site {index + 1:04d} {rng.choice(_KINDS)}",
                "created_at": now - timedelta(days=400) + timedelta(minutes=index),
                "industry": industry,
                "tier": tier,
                "frameworks": chosen,
                "decommissioned_at": now - timedelta(days=5) if index % 50 == 49 else None,
            }
        )
    return rows


def fleet_of(
    site_list: list[dict[str, Any]],
    partner: dict[str, Any],
    count: int,
    now: datetime,
    root: SigningKey,
    rng: random.Random,
) -> tuple[Fleet, list[dict[str, Any]], list[dict[str, Any]]]:
    """Appliances spread over the sites, each with its enrollment
    certificate and its witnessed log; the rows of all three tables."""
    fleet = Fleet([], {}, {}, {})
    certificate_rows, log_rows = [], []
    slots = [
        site
        for site, n in zip(site_list, spread(count, len(site_list)), strict=True)
        for _ in range(n)
    ]
    for index, site in enumerate(slots):
        appliance_id = new_id("appliance")
        key = SigningKey.generate()
        issued = now - timedelta(days=rng.randint(1, 25))
        envelope = issue_delegation(
            root,
            subject=key.verify_key,
            appliance_id=appliance_id,
            site_id=site["id"],
            scopes=[Scope.AUDIT, Scope.EVIDENCE],
            not_before=issued.replace(microsecond=0),
        )
        certificate = DelegationCertificate.from_json(envelope.payload_bytes())
        revoked = now - timedelta(days=3) if index % 100 == 37 else None
        silent = index % 40 == 7  # stopped reporting twelve days ago
        last_seen = now - (timedelta(days=12) if silent else timedelta(seconds=rng.randint(5, 90)))
        log_size = rng.randint(5_000, 400_000)
        fleet.rows.append(
            {
                "id": appliance_id,
                "site_id": site["id"],
                "created_at": now - timedelta(days=DAYS + 10) + timedelta(seconds=index),
                "current_serial": certificate.serial,
                "revoked_at": revoked,
                "last_seen_at": last_seen,
                "heartbeat": None,  # set with the check interval its bundles imply
                "decommissioned_at": None,
            }
        )
        certificate_rows.append(
            {
                "serial": certificate.serial,
                "appliance_id": appliance_id,
                "key_id": certificate.subject_key_id,
                "subject_key": certificate.subject_key,
                "envelope": envelope.canonical_bytes().decode(),
                "not_before": certificate.not_before,
                "not_after": certificate.not_after,
                "issued_at": issued,
                "purpose": "enroll",
                "replaces": None,
                "revoked_at": revoked,
                "cutoff_size": log_size if revoked else None,
                "revocation_reason": "appliance stolen" if revoked else None,
            }
        )
        log_rows.append(
            {
                "appliance_id": appliance_id,
                "generation": 1,
                "size": log_size,
                "root": secrets.token_hex(32),
                "nodes": [secrets.token_hex(32) for _ in range(bin(log_size).count("1"))],
                "checkpoint_sha256": secrets.token_hex(32),
                "updated_at": last_seen,
            }
        )
        fleet.keys[appliance_id] = key
        fleet.tiers[appliance_id] = site["tier"] or partner["tier"]
        fleet.frameworks[appliance_id] = (
            site["frameworks"] if site["frameworks"] is not None else partner["frameworks"]
        )
    return fleet, certificate_rows, log_rows


_REASONS = (
    "clock offset 2.4 s exceeds 1 s",
    "3 security updates pending for more than 30 days",
    "firewall default policy is ACCEPT",
    "disk encryption not enabled on /dev/sda2",
    "backup older than 48 hours",
)


def bundle_rows(
    appliance: dict[str, Any],
    fleet: Fleet,
    count: int,
    now: datetime,
    catalogue: Catalogue,
    rng: random.Random,
) -> Iterator[dict[str, Any]]:
    """``count`` signed bundles of one appliance over the last DAYS days,
    its checks in turn; sets the appliance's heartbeat to the check interval
    those bundles imply, so posture finds them fresh (but for the silent
    appliances)."""
    appliance_id = appliance["id"]
    key = fleet.keys[appliance_id]
    checks = catalogue.checks[fleet.tiers[appliance_id]]
    end = appliance["last_seen_at"]
    start = now - timedelta(days=DAYS)
    step = (end - start) / max(count, 1)
    interval = max(60, math.ceil((step * len(checks)).total_seconds() / 60) * 60)
    times = sorted(start + step * n + step * rng.random() * 0.8 for n in range(count))
    frameworks = set(fleet.frameworks[appliance_id])
    for offset, collected in enumerate(times):
        check = checks[offset % len(checks)]
        mapped = catalogue.controls.get(check) or {"cis": ["1.1"]}
        controls = {f: ids for f, ids in mapped.items() if f in frameworks} or mapped
        draw = rng.random()
        result: CheckResult = (
            "pass"
            if draw < 0.85
            else "fail"
            if draw < 0.95
            else "error"
            if draw < 0.98
            else "not_applicable"
        )
        observed: dict[str, Any] = {"duration_ms": rng.randint(5, 900)}
        if result in ("fail", "error"):
            observed["reason"] = rng.choice(_REASONS)
        log_index = offset + 1  # 0 is the log's genesis entry
        bundle = EvidenceBundle(
            bundle_id=f"ev-{log_index:07d}-{secrets.token_hex(4)}",
            site_id=appliance["site_id"],
            appliance_id=appliance_id,
            check_id=check,
            controls={f: tuple(ids) for f, ids in sorted(controls.items())},
            result=result,
            observed=observed,
            collected_at=collected,
            log_index=log_index,
        )
        envelope = sign_evidence(key, bundle)
        yield {
            "appliance_id": appliance_id,
            "bundle_id": bundle.bundle_id,
            "site_id": appliance["site_id"],
            "check_id": check,
            "result": result,
            "controls": {f: list(ids) for f, ids in bundle.controls.items()},
            "collected_at": collected,
            "log_generation": 1,
            "log_index": log_index,
            "payload_sha256": hashlib.sha256(envelope.payload_bytes()).hexdigest(),
            "envelope": envelope.canonical_bytes().decode(),
            "serial": appliance["current_serial"],
            "signed_after_expiry": False,
            "in_log": None if now - collected < timedelta(hours=1) else True,
            "received_at": collected + timedelta(seconds=rng.randint(1, 120)),
        }
    appliance["heartbeat"] = {
        "version": "1.4.2",
        "log_size": count + rng.randint(1, 50),
        "queues": {"audit": rng.randint(0, 3), "evidence": rng.randint(0, 5), "escalations": 0},
        "clock": format_time(appliance["last_seen_at"]),
        "check_interval_seconds": interval,
        "heartbeat_interval_seconds": 60,
    }


async def seed_partner(
    engine: AsyncEngine,
    name: str,
    volume: Volume,
    now: datetime,
    root: SigningKey,
    catalogue: Catalogue,
    rng: random.Random,
) -> tuple[str, str, str]:
    """One partner and everything it holds: (partner id, an API key, its
    first site's id)."""
    async with engine.begin() as connection:
        partner_row, api_key = await create_partner(connection, name, now - timedelta(days=500))
        await connection.execute(
            sa.update(partners)
            .where(partners.c.id == partner_row.id)
            .values(industry="healthcare", tier="basic", frameworks=["hipaa", "nist_csf"])
        )
        for label in ("monitoring", "ticketing"):
            await create_api_key(connection, "partner", partner_row.id, now, name=label)
    partner = {"tier": "basic", "frameworks": ["hipaa", "nist_csf"]}
    site_list = site_rows(partner_row.id, volume.sites, now, catalogue, rng)
    await insert(engine, sites, site_list)
    fleet, certificate_rows, log_rows = fleet_of(
        site_list, partner, volume.appliances, now, root, rng
    )
    pending: list[dict[str, Any]] = []
    # Each (appliance, check) pair's newest bundle, as ingest keeps it: an
    # appliance's bundles come in log order and none is contradicted.
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for appliance, count in zip(fleet.rows, spread(volume.bundles, len(fleet.rows)), strict=True):
        for row in bundle_rows(appliance, fleet, count, now, catalogue, rng):
            pending.append(row)
            newest[row["appliance_id"], row["check_id"]] = row
        if len(pending) >= 10 * INSERT_CHUNK:
            await insert(engine, evidence, pending)
            pending = []
    await insert(engine, appliances, fleet.rows)  # heartbeats now set
    await insert(engine, certificates, certificate_rows)
    await insert(engine, audit_logs, log_rows)
    await insert(engine, evidence, pending)
    await insert(
        engine,
        evidence_heads,
        [head_of(row, reason_of_envelope(row["envelope"])) for row in newest.values()],
    )
    await insert(engine, escalations, escalation_rows(fleet, volume.escalations, now, rng))
    await insert(
        engine, security_alerts, alert_rows(partner_row.id, fleet, volume.alerts, now, rng)
    )
    return partner_row.id, api_key, site_list[0]["id"]


def escalation_rows(
    fleet: Fleet, count: int, now: datetime, rng: random.Random
) -> list[dict[str, Any]]:
    """Escalations over the period; the older ones mostly acknowledged."""
    rows: list[dict[str, Any]] = []
    for index in range(count):
        appliance = fleet.rows[index % len(fleet.rows)]
        created = now - timedelta(seconds=rng.randint(60, DAYS * 86_400))
        escalation = Escalation(
            escalation_id=f"esc-{index:06d}",
            appliance_id=appliance["id"],
            site_id=appliance["site_id"],
            severity=rng.choice(["critical", "high", "medium", "low"]),
            title=rng.choice(["Disk full on /var", "Backup failed", "Firewall disabled"]),
            detail={"check": "disk_space", "observed": {"free_bytes": rng.randint(0, 10**6)}},
            created_at=created,
            log_index=rng.randint(1, 10_000),
        )
        acknowledged = rng.random() < 0.85
        rows.append(
            {
                "appliance_id": appliance["id"],
                "escalation_id": escalation.escalation_id,
                "site_id": appliance["site_id"],
                "severity": escalation.severity,
                "title": escalation.title,
                "document": escalation.to_wire(),
                "created_at": created,
                "received_at": created + timedelta(seconds=rng.randint(1, 30)),
                "acknowledged_at": created + timedelta(hours=2) if acknowledged else None,
                "acknowledged_by": "partner:bench/user:usr-bench" if acknowledged else None,
                "acknowledged_note": "handled on site" if acknowledged else None,
            }
        )
    return rows


def alert_rows(
    partner_id: str, fleet: Fleet, count: int, now: datetime, rng: random.Random
) -> list[dict[str, Any]]:
    """Ingest alerts about appliances, and a few about the partner's accounts."""
    rows: list[dict[str, Any]] = []
    for index in range(count):
        appliance = fleet.rows[rng.randrange(len(fleet.rows))]
        about_account = index % 25 == 0
        rows.append(
            {
                "appliance_id": None if about_account else appliance["id"],
                "site_id": None if about_account else appliance["site_id"],
                "partner_id": partner_id if about_account else None,
                "code": "sign-in-failures" if about_account else "evidence-not-in-log",
                "detail": "10 failed sign-ins for a user"
                if about_account
                else "witnessed audit entry does not record the bundle",
                "created_at": now - timedelta(seconds=rng.randint(60, DAYS * 86_400)),
            }
        )
    rows.sort(key=lambda row: row["created_at"])  # ids grow with time, as ingest makes them
    return rows


@dataclass(frozen=True)
class Seeded:
    partner_id: str
    api_key: str
    site_id: str
    seeded_at: str
    seed_seconds: float


async def seed(url: str, state_dir: Path, volume: Volume) -> Seeded:
    """Migrate, then seed the bench partner, its console users, and a
    second partner with a tenth of its volume."""
    started = time.perf_counter()
    root = write_root_key(state_dir / "keys" / "root.key")
    now = datetime.now(UTC)
    rng = random.Random(SEED_VERSION)
    engine = create_engine(url)
    try:
        await upgrade(engine)
        async with engine.connect() as connection:
            catalogue = await read_catalogue(connection)
        await seed_partner(engine, "Other partner", volume.tenth(), now, root, catalogue, rng)
        partner_id, api_key, site_id = await seed_partner(
            engine, "Bench partner", volume, now, root, catalogue, rng
        )
        async with engine.begin() as connection:
            await create_user(
                connection,
                partner_id=partner_id,
                email=EMAIL,
                password=PASSWORD,
                role="admin",
                actor="bench",
                now=now,
            )
            for index, role in enumerate(["editor", "viewer"] * 4):
                await create_invite(
                    connection,
                    partner_id=partner_id,
                    email=f"colleague{index}@example.com",
                    role=role,
                    actor="bench",
                    now=now,
                    lifetime=timedelta(days=7),
                )
    finally:
        await engine.dispose()
    return Seeded(partner_id, api_key, site_id, format_time(now), time.perf_counter() - started)


async def cached_sqlite(cache_dir: Path, volume: Volume, reseed: bool) -> tuple[Path, Seeded, bool]:
    """The seeded SQLite state directory for this volume, seeding it on the
    first run; whether it was seeded now."""
    key = hashlib.sha256(json.dumps([SEED_VERSION, asdict(volume)]).encode()).hexdigest()[:12]
    directory = cache_dir / f"console-v{SEED_VERSION}-{key}"
    manifest = directory / "seeded.json"
    if manifest.exists() and not reseed:
        return directory, Seeded(**json.loads(manifest.read_text())), False
    shutil.rmtree(directory, ignore_errors=True)
    building = cache_dir / f"{directory.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    seeded = await seed(f"sqlite+aiosqlite:///{building / 'central.db'}", building, volume)
    (building / "seeded.json").write_text(json.dumps(asdict(seeded)))
    building.rename(directory)
    return directory, seeded, True


async def copy_rows(source_url: str, target_url: str) -> None:
    """Every seeded row of the SQLite file into a migrated empty database
    (the catalogue the migrations loaded is left as it is): the same data on
    both backends, without signing a million bundles again."""
    source, target = create_engine(source_url), create_engine(target_url)
    try:
        await upgrade(target)
        for table in metadata.sorted_tables:
            async with target.connect() as connection:
                if (
                    await connection.execute(sa.select(sa.func.count()).select_from(table))
                ).scalar():
                    continue  # loaded by the migrations
            async with source.connect() as connection:
                result = await connection.stream(sa.select(table))
                async for chunk in result.partitions(INSERT_CHUNK):
                    await insert(target, table, [dict(row._mapping) for row in chunk])
        async with target.begin() as connection:
            for table in metadata.sorted_tables:
                for column in table.primary_key.columns:
                    if column.autoincrement is True:  # explicit ids: move the sequence past them
                        await connection.execute(
                            sa.text(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', "
                                f"'{column.name}'), coalesce(max({column.name}), 0) + 1, false) "
                                f"FROM {table.name}"
                            )
                        )
    finally:
        await source.dispose()
        await target.dispose()


# --- measuring ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(state_dir: Path, url: str, port: int) -> subprocess.Popen[bytes]:
    """The server as deployed (``msp-central serve``), migrating first: a
    cached file seeded under an older schema gets the newer migrations."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "msp_central.cli",
            "--state-dir",
            str(state_dir),
            "--database-url",
            url,
            "serve",
            "--migrate",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        # To a file: a pipe nobody reads fills with the access log and
        # stalls the server mid-run.
        stderr=(state_dir.parent / "server.log").open("wb"),
    )


async def wait_until_up(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(1_200):
            if server.poll() is not None:
                error = (await asyncio.to_thread(log.read_text, errors="replace"))[-2_000:]
                raise SystemExit(f"the server exited: {error}")
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"server at {url} did not start")


async def sign_in(session: aiohttp.ClientSession, base: str) -> None:
    """POST the sign-in form as the browser does; the cookie jar keeps the session."""
    async with session.post(
        base + "/console/sign-in",
        data={"email": EMAIL, "password": PASSWORD, "next": "/console/compliance"},
        headers={"Origin": base},
        allow_redirects=False,
    ) as response:
        if response.status != 303:
            raise SystemExit(f"sign-in refused: {response.status} {(await response.text())[:300]}")
    if not session.cookie_jar.filter_cookies(URL(base)):
        raise SystemExit("sign-in set no session cookie")


async def timed_get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> float:
    """Milliseconds to GET ``url`` and read its body; anything but 200 stops the run."""
    started = time.perf_counter()
    async with session.get(url, headers=headers, allow_redirects=False) as response:
        body = await response.read()
        if response.status != 200:
            raise SystemExit(f"GET {url}: {response.status} {body[:300]!r}")
    return (time.perf_counter() - started) * 1_000


@dataclass
class Samples:
    pages: dict[str, list[float]]
    calls: dict[tuple[str, str], list[float]]


async def measure_page(
    session: aiohttp.ClientSession,
    base: str,
    page: str,
    shell_path: str,
    calls: list[tuple[str, str]],
    headers: dict[str, str] | None,
    samples: Samples,
) -> None:
    """The shell, then the page's calls concurrently (``headers``: the API
    key, else the session cookie), wall-clock."""
    started = time.perf_counter()
    shell = await timed_get(session, base + shell_path)
    times = await asyncio.gather(*(timed_get(session, base + url, headers) for _, url in calls))
    samples.pages[page].append((time.perf_counter() - started) * 1_000)
    samples.calls[page, "shell"].append(shell)
    for (call, _), took in zip(calls, times, strict=True):
        samples.calls[page, call].append(took)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


async def measure(base: str, seeded: Seeded, rounds: int, warmup: int) -> dict[str, Samples]:
    """Session and API-key samples of every page and of the baseline,
    round-robin so drift in the machine's load affects them alike."""
    resolved = {
        page: [(call, call.replace("{site}", seeded.site_id)) for call in calls]
        for page, calls in PAGE_CALLS.items()
    }
    key_headers = {"Authorization": f"Bearer {seeded.api_key}"}
    results = {mode: Samples(defaultdict(list), defaultdict(list)) for mode in ("session", "key")}
    jar = aiohttp.CookieJar(unsafe=True)  # loopback is an IP address
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(cookie_jar=jar, connector=connector) as session:
        await sign_in(session, base)
        for round_index in range(warmup + rounds):
            target = (
                results
                if round_index >= warmup
                else {mode: Samples(defaultdict(list), defaultdict(list)) for mode in results}
            )
            baseline = await timed_get(session, base + BASELINE)
            target["session"].pages["baseline"].append(baseline)
            for page, calls in resolved.items():
                shell = SHELLS.get(page, f"/console/{page}").replace("{site}", seeded.site_id)
                for headers, mode in ((None, "session"), (key_headers, "key")):
                    await measure_page(session, base, page, shell, calls, headers, target[mode])
    return results


def report(results: dict[str, Samples]) -> None:
    session, key = results["session"], results["key"]
    baseline = statistics.median(session.pages["baseline"])
    print(f"baseline_median={baseline:.1f} ms ({BASELINE}, session)")
    for page in PAGE_CALLS:
        median = statistics.median(session.pages[page])
        under = "yes" if median < TARGET_MS else "no"
        print(f"page_{page}_median={median:.1f} ms")
        print(f"page_{page}_p95={p95(session.pages[page]):.1f} ms")
        print(f"page_{page}_over_baseline={median / baseline:.1f} ratio")
        print(f"page_{page}_under_{TARGET_MS:.0f}ms={under}")
        print(f"page_{page}_key_median={statistics.median(key.pages[page]):.1f} ms")
        print(f"page_{page}_key_p95={p95(key.pages[page]):.1f} ms")
        for (owner, call), values in session.calls.items():
            if owner != page:
                continue
            keyed = key.calls.get((owner, call), [])
            extra = f" key_median={statistics.median(keyed):.1f}" if call != "shell" else ""
            print(
                f"call_{page}[{call}]_median={statistics.median(values):.1f} ms"
                f" p95={p95(values):.1f}{extra}"
            )
    slowest = max(PAGE_CALLS, key=lambda p: statistics.median(session.pages[p]))
    print(f"slowest_page={slowest}")
    medians = [statistics.median(session.pages[page]) for page in PAGE_CALLS]
    print(f"all_under_{TARGET_MS:.0f}ms={'yes' if max(medians) < TARGET_MS else 'no'}")


async def run_on(
    state_dir: Path, url: str, seeded: Seeded, rounds: int, warmup: int
) -> dict[str, Samples]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(state_dir, url, port)
    try:
        await wait_until_up(base + "/api/v1/openapi.json", server, state_dir.parent / "server.log")
        return await measure(base, seeded, rounds, warmup)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


async def run(args: argparse.Namespace) -> None:
    check_page_calls()
    volume = QUICK if args.quick else FULL
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 30)
    warmup = 1 if args.quick else 3
    print(f"volume=sites:{volume.sites} appliances:{volume.appliances} bundles:{volume.bundles}")
    with tempfile.TemporaryDirectory(prefix="msp-console-bench-") as tmp:
        work = Path(tmp)
        cache_dir = args.cache_dir or Path(tempfile.gettempdir()) / "msp-console-bench"
        cached, seeded, fresh = await cached_sqlite(cache_dir, volume, args.reseed)
        state = "seeded now" if fresh else f"cached in {cached}, seeded {seeded.seeded_at}"
        print(f"seed_seconds={seeded.seed_seconds:.1f} s ({state})")
        # A copy: the run's sign-ins and migrations must not change the cache.
        started = time.perf_counter()
        shutil.copytree(cached, work / "state")
        sqlite_url = f"sqlite+aiosqlite:///{work / 'state' / 'central.db'}"
        if args.postgresql:
            name = f"msp_console_bench_{os.getpid()}"
            url = await create_pg_database(name, PG_ADMIN_URL)
            try:
                await copy_rows(sqlite_url, url)
                print(f"copy_seconds={time.perf_counter() - started:.1f} s (into postgresql)")
                results = await run_on(work / "state", url, seeded, rounds, warmup)
            finally:
                await drop_pg_database(name, PG_ADMIN_URL)
        else:
            print(f"copy_seconds={time.perf_counter() - started:.1f} s")
            results = await run_on(work / "state", sqlite_url, seeded, rounds, warmup)
    print(f"backend={'postgresql' if args.postgresql else 'sqlite'}")
    print(f"rounds={rounds}")
    report(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    parser.add_argument("--postgresql", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    parser.add_argument("--rounds", type=int, help="measured rounds per page (default 30)")
    parser.add_argument("--cache-dir", type=Path, help="where the seeded SQLite file is kept")
    parser.add_argument("--reseed", action="store_true", help="seed the SQLite file again")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
