"""Migrations create exactly the schema the code uses, on both backends,
load the catalogue, and a database from a newer server is refused."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from msp_central.app import create_app
from msp_central.catalogue import CURRENT_VERSION, Catalogue, load_catalogue
from msp_central.config import Settings
from msp_central.db.engine import create_engine
from msp_central.db.migrate import (
    DatabaseVersionError,
    alembic_config,
    check_current,
    head_revision,
    upgrade,
)
from msp_central.db.tables import (
    control_runbook_mapping,
    controls,
    evidence,
    evidence_heads,
    frameworks,
    metadata,
    presets,
    runbooks,
)
from msp_protocol.evidence import EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey
from tests.central.support import ROOT, create_pg_database, drop_pg_database


def _diff(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def test_migrated_schema_matches_the_tables(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
        await check_current(engine)
        assert await upgrade(engine) == head_revision()  # a second upgrade is a no-op
    finally:
        await engine.dispose()


async def test_the_catalogue_is_loaded(database_url: str) -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            ids = (
                (
                    await connection.execute(
                        sa.select(frameworks.c.id).order_by(frameworks.c.position)
                    )
                )
                .scalars()
                .all()
            )
            count = (
                await connection.execute(sa.select(sa.func.count()).select_from(controls))
            ).scalar()
    finally:
        await engine.dispose()
    assert ids == [f.id for f in catalogue.frameworks]
    assert count == sum(len(f.controls) for f in catalogue.frameworks)


async def test_a_newer_database_is_refused(database_url: str, tmp_path: Any) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(DatabaseVersionError, match="9999"):
            await check_current(engine)
        with pytest.raises(DatabaseVersionError, match="unknown to this server"):
            await upgrade(engine)
        app = create_app(Settings(state_dir=tmp_path, database_url=database_url), root=ROOT)
        with pytest.raises(DatabaseVersionError, match="msp-central db upgrade"):
            async with TestServer(app):
                pass
    finally:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(f"UPDATE alembic_version SET version_num = '{head_revision()}'")
            )
        await engine.dispose()


async def test_an_empty_database_is_refused_until_upgraded(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    engine = create_engine(url)
    try:
        with pytest.raises(DatabaseVersionError, match="revision none"):
            await check_current(engine)
        await upgrade(engine)
        await check_current(engine)
    finally:
        await engine.dispose()


# --- moving between catalogue versions -------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database no migration has touched: the catalogue migrations are run
    step by step from the start, not from the session's migrated template."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'steps.db'}"
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    name = f"msp_central_steps_{os.getpid()}"
    yield asyncio.run(create_pg_database(name, admin_url))

    asyncio.run(drop_pg_database(name, admin_url))


async def _to_revision(url: str, revision: str, *, down: bool = False) -> None:
    config = alembic_config(url)
    engine = create_engine(url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


def _expected(catalogue: Catalogue) -> dict[str, set[tuple[Any, ...]]]:
    """The catalogue tables' rows for ``catalogue``, as sets of tuples."""
    return {
        "frameworks": {
            (f.id, f.name, f.edition, n, catalogue.version)
            for n, f in enumerate(catalogue.frameworks)
        },
        "controls": {
            (f.id, c.id, c.title, n) for f in catalogue.frameworks for n, c in enumerate(f.controls)
        },
        "control_runbook_mapping": {
            (m.framework, m.control, m.runbook) for m in catalogue.mappings
        },
        "runbooks": {
            (r.id, r.title, r.tier.value, r.check, r.l1_action, r.description)
            for r in catalogue.runbooks
        },
        "presets": {
            (p.id, p.name, p.description, p.tier.value, tuple(p.frameworks), n)
            for n, p in enumerate(catalogue.presets)
        },
    }


async def _stored(url: str) -> dict[str, set[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = {
                table.name: (await connection.execute(sa.select(table))).all()
                for table in (frameworks, controls, control_runbook_mapping, runbooks)
            }
            preset_rows = (await connection.execute(sa.select(presets))).all()
    finally:
        await engine.dispose()
    result = {name: {tuple(row) for row in table_rows} for name, table_rows in rows.items()}
    result["presets"] = {
        (p.id, p.name, p.description, p.tier, tuple(p.frameworks), p.position) for p in preset_rows
    }
    return result


async def test_catalogue_v1_upgrades_in_place_and_downgrades_back(
    blank_database_url: str,
) -> None:
    """0003 moves a database that holds version 1 to version 2 without
    dropping a version 1 id, and its downgrade leaves exactly version 1."""
    url = blank_database_url
    await _to_revision(url, "0002")
    assert await _stored(url) == _expected(load_catalogue(1))

    await _to_revision(url, "0003")
    assert await _stored(url) == _expected(load_catalogue(2))

    await _to_revision(url, "0002", down=True)
    assert await _stored(url) == _expected(load_catalogue(1))

    # And up again: a downgraded database is an ordinary version 1 database.
    await _to_revision(url, "head")
    assert await _stored(url) == _expected(load_catalogue(CURRENT_VERSION))


async def test_0005_names_existing_keys_and_tokens_and_keeps_audit_rows(
    blank_database_url: str,
) -> None:
    """Keys and tokens made before 0005 get ids from their hashes; audit
    entries and checkpoints become generation 1; and back down again."""
    url = blank_database_url
    await _to_revision(url, "0004")
    engine = create_engine(url)
    now = "2026-01-01 00:00:00"
    statements = [
        "INSERT INTO partners (id, name, created_at, tier, frameworks)"
        f" VALUES ('p-1', 'P', '{now}', 'basic', '[]')",
        "INSERT INTO api_keys (key_sha256, prefix, role, partner_id, created_at)"
        f" VALUES ('{'ab' * 32}', 'mspk_1234567', 'partner', 'p-1', '{now}')",
        f"INSERT INTO sites (id, partner_id, name, created_at) VALUES ('s-1', 'p-1', 'S', '{now}')",
        "INSERT INTO enrollment_tokens (token_sha256, site_id, created_at, expires_at)"
        f" VALUES ('{'cd' * 32}', 's-1', '{now}', '{now}')",
        f"INSERT INTO appliances (id, site_id, created_at) VALUES ('a-1', 's-1', '{now}')",
        "INSERT INTO audit_entries (appliance_id, idx, leaf_hash, raw)"
        " VALUES ('a-1', 0, :leaf, :raw)",
        "INSERT INTO escalations (appliance_id, escalation_id, site_id, severity, title, "
        "document, created_at, received_at, acknowledged_at, acknowledged_by) VALUES "
        f"('a-1', 'e-1', 's-1', 'critical', 'T', '{{}}', '{now}', '{now}', '{now}', "
        "'mspk_1234567')",
    ]
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(sa.text(statement), {"leaf": b"\x01" * 32, "raw": b"{}"})
    finally:
        await engine.dispose()

    await _to_revision(url, "0005")
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            key = (await connection.execute(sa.text("SELECT id, name FROM api_keys"))).one()
            token = (await connection.execute(sa.text("SELECT id FROM enrollment_tokens"))).one()
            entry = (
                await connection.execute(sa.text("SELECT generation, idx FROM audit_entries"))
            ).one()
            acknowledged_by = (
                await connection.execute(sa.text("SELECT acknowledged_by FROM escalations"))
            ).scalar_one()
    finally:
        await engine.dispose()
    assert tuple(key) == ("key-" + "ab" * 8, "")
    assert token[0] == "tok-" + "cd" * 8
    assert tuple(entry) == (1, 0)
    assert acknowledged_by == "mspk_1234567"

    await _to_revision(url, "0004", down=True)
    await _to_revision(url, "head")


async def test_0009_fills_the_evidence_heads_by_the_posture_rule(
    blank_database_url: str,
) -> None:
    """Each (appliance, check) pair's head is its newest bundle by log
    generation, then index, that its log does not contradict, with the
    signed reason (base64 in either alphabet); and back down again."""
    url = blank_database_url
    await _to_revision(url, "0008")
    key = SigningKey.generate()
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def bundle(
        appliance: str, check: str, generation: int, index: int, in_log: bool | None, **kw: Any
    ) -> dict[str, Any]:
        signed = EvidenceBundle(
            bundle_id=f"ev-{appliance}-{check}-{generation}-{index}",
            site_id="s-1",
            appliance_id=appliance,
            check_id=check,
            controls={"hipaa": ("164.312(b)",)},
            result=kw.get("result", "pass"),
            observed=kw.get("observed", {}),
            collected_at=at + timedelta(minutes=index),
            log_index=index,
        )
        envelope = sign_evidence(key, signed).to_wire()
        if kw.get("urlsafe"):
            envelope["payload"] = envelope["payload"].replace("+", "-").replace("/", "_")
            envelope["payload"] = envelope["payload"].rstrip("=")
        return {
            "appliance_id": appliance,
            "bundle_id": signed.bundle_id,
            "site_id": "s-1",
            "check_id": check,
            "result": signed.result,
            "controls": {"hipaa": ["164.312(b)"]},
            "collected_at": signed.collected_at,
            "log_generation": generation,
            "log_index": index,
            "payload_sha256": "00" * 32,
            "envelope": json.dumps(envelope),
            "serial": "1",
            "signed_after_expiry": False,
            "in_log": in_log,
            "received_at": at,
        }

    failed = {"result": "fail", "observed": {"reason": "ntp unreachable " + "x" * 600}}
    rows = [
        bundle("a-1", "time_sync", 1, 5, True),
        bundle("a-1", "time_sync", 1, 9, None, **failed, urlsafe=True),  # the head
        bundle("a-1", "time_sync", 1, 7, True),
        bundle("a-1", "ssh", 1, 3, True, result="fail", observed={"reason": "password login"}),
        bundle("a-1", "ssh", 1, 4, False),  # contradicted: index 3 speaks
        bundle("a-2", "time_sync", 1, 80, True),
        bundle("a-2", "time_sync", 2, 2, True),  # a later generation wins
        bundle("a-2", "ssh", 1, 6, False),  # contradicted and alone: no head
    ]
    engine = create_engine(url)
    now = "2026-01-01 00:00:00"
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(
                    "INSERT INTO partners (id, name, created_at, tier, frameworks)"
                    f" VALUES ('p-1', 'P', '{now}', 'basic', '[]')"
                )
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO sites (id, partner_id, name, created_at)"
                    f" VALUES ('s-1', 'p-1', 'S', '{now}')"
                )
            )
            await connection.execute(sa.insert(evidence), rows)
    finally:
        await engine.dispose()

    await _to_revision(url, "0009")
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            heads = (await connection.execute(sa.select(evidence_heads))).mappings().all()
    finally:
        await engine.dispose()
    found = {
        (h["appliance_id"], h["check_id"]): (
            h["bundle_id"],
            h["in_log"],
            h["result"],
            h["reason"],
            h["collected_at"],
        )
        for h in heads
    }
    assert found == {
        ("a-1", "time_sync"): (
            "ev-a-1-time_sync-1-9",
            None,
            "fail",
            ("ntp unreachable " + "x" * 600)[:500],
            at + timedelta(minutes=9),
        ),
        ("a-1", "ssh"): (
            "ev-a-1-ssh-1-3",
            True,
            "fail",
            "password login",
            at + timedelta(3 / 1440),
        ),
        ("a-2", "time_sync"): (
            "ev-a-2-time_sync-2-2",
            True,
            "pass",
            None,
            at + timedelta(2 / 1440),
        ),
    }

    await _to_revision(url, "0008", down=True)
    await _to_revision(url, "head")
