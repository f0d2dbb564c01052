"""The partner API's lists: keyset pages that hold every row exactly once,
filters done in the database, bad queries refused, and one partner never
seeing another's rows through any of them. Rows are inserted straight into
the database where the API would be slow to make them."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from msp_central.db.tables import (
    appliances,
    audit_logs,
    central_log_entries,
    escalations,
    evidence,
    manual_evidence,
    security_alerts,
    sites,
)
from msp_central.queries import new_id
from msp_protocol.encoding import format_time
from tests.central.support import Harness, KeyClient

Row = dict[str, Any]


# --- rows straight into the database -------------------------------------------------


async def insert(harness: Harness, table: sa.Table, *rows: Row) -> None:
    shapes: dict[frozenset[str], list[Row]] = {}
    for row in rows:  # one executemany per set of columns given
        shapes.setdefault(frozenset(row), []).append(row)
    async with harness.engine.begin() as connection:
        for same in shapes.values():
            await connection.execute(sa.insert(table), same)


def site_row(partner: KeyClient, name: str, at: datetime, **values: Any) -> Row:
    return {
        "id": new_id("site"),
        "partner_id": partner.partner_id,
        "name": name,
        "created_at": at,
        **values,
    }


def appliance_row(site_id: str, at: datetime, **values: Any) -> Row:
    return {"id": new_id("appliance"), "site_id": site_id, "created_at": at, **values}


def evidence_row(site_id: str, appliance_id: str, at: datetime, **values: Any) -> Row:
    return {
        "appliance_id": appliance_id,
        "bundle_id": new_id("ev"),
        "site_id": site_id,
        "check_id": "time_sync",
        "result": "pass",
        "controls": {"hipaa": ["164.312(b)"]},
        "collected_at": at,
        "log_index": 1,
        "payload_sha256": "0" * 64,
        "envelope": "{}",
        "serial": "serial-1",
        "signed_after_expiry": False,
        "in_log": True,
        "received_at": at,
        **values,
    }


def escalation_row(site_id: str, appliance_id: str, at: datetime, **values: Any) -> Row:
    return {
        "appliance_id": appliance_id,
        "escalation_id": new_id("esc"),
        "site_id": site_id,
        "severity": "high",
        "title": "Backup failed",
        "document": {"detail": {"job": "nightly"}},
        "created_at": at,
        "received_at": at,
        **values,
    }


def alert_row(site_id: str, appliance_id: str, at: datetime, **values: Any) -> Row:
    return {
        "appliance_id": appliance_id,
        "site_id": site_id,
        "code": "unknown-key",
        "detail": "a checkpoint by a key never delegated",
        "created_at": at,
        **values,
    }


def attachment_row(site_id: str, at: datetime) -> Row:
    return {
        "id": new_id("doc"),
        "site_id": site_id,
        "framework_id": "hipaa",
        "control_id": "164.308(a)(1)(ii)(A)",
        "filename": "policy.pdf",
        "media_type": "application/pdf",
        "size": 3,
        "sha256": "0" * 64,
        "note": "",
        "attached_by": "partner:test/key:test",
        "attached_at": at,
        "expires_at": None,
        "log_index": 0,
        "content": b"pdf",
    }


# --- reading lists ---------------------------------------------------------------------


def with_query(path: str, **query: Any) -> str:
    if not query:
        return path
    text = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return f"{path}{'&' if '?' in path else '?'}{text}"


async def page(client: KeyClient, path: str, **query: Any) -> list[Row]:
    """The first page's items, asserting it is the only one."""
    reply = await client.request("GET", with_query(path, **query))
    assert reply.status == 200, reply.body
    assert reply.body["next_cursor"] is None
    items: list[Row] = reply.body["items"]
    return items


async def walk(
    client: KeyClient,
    path: str,
    limit: int,
    between: Callable[[], Awaitable[None]] | None = None,
) -> list[Row]:
    """Every item of a list, following each page's Link header; ``between``
    runs after every page but the last."""
    url = with_query(path, limit=limit)
    items: list[Row] = []
    while True:
        reply = await client.request("GET", url)
        assert reply.status == 200, reply.body
        cursor = reply.body["next_cursor"]
        items += reply.body["items"]
        if cursor is None:
            assert "Link" not in reply.headers
            assert len(reply.body["items"]) <= limit
            return items
        assert len(reply.body["items"]) == limit
        found = re.fullmatch(r'<([^>]+)>; rel="next"', reply.headers["Link"])
        assert found is not None, reply.headers["Link"]
        url = found.group(1)
        assert f"cursor={cursor}" in url
        assert f"limit={limit}" in url
        if between is not None:
            await between()


def ids(items: list[Row]) -> list[str]:
    return [item["id"] for item in items]


def keys(items: list[Row]) -> list[tuple[str, str]]:
    return [(item["appliance_id"], item["id"]) for item in items]


# --- a world of two partners -----------------------------------------------------------


class World:
    """Partner A with two sites and appliances, partner B with one of each."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.now = harness.clock()

    async def build(self) -> World:
        harness = self.harness
        self.admin = await harness.admin()
        self.a = await harness.partner("Acme MSP")
        self.b = await harness.partner("Rival MSP")
        self.site = await harness.site(self.a, "Clinic")
        self.other_site = await harness.site(self.a, "Branch")
        self.foreign_site = await harness.site(self.b, "Rival clinic")
        earlier = self.now - timedelta(days=1)
        self.app = appliance_row(self.site, earlier)
        self.sibling = appliance_row(self.other_site, earlier)
        self.foreign = appliance_row(self.foreign_site, earlier)
        await insert(harness, appliances, self.app, self.sibling, self.foreign)
        return self


@pytest.fixture
async def world(harness: Harness) -> World:
    return await World(harness).build()


# --- every row exactly once --------------------------------------------------------------


async def test_sites_page_by_page(harness: Harness, world: World) -> None:
    start = world.now + timedelta(minutes=1)  # after the world's own sites
    made = [site_row(world.a, f"Site {n}", start + timedelta(seconds=n // 3)) for n in range(10)]
    await insert(harness, sites, *made)
    late: list[str] = []

    async def more() -> None:
        at = start + timedelta(hours=1, seconds=len(late))
        row = site_row(world.a, f"Late {len(late)}", at)
        late.append(row["id"])
        await insert(harness, sites, row)

    listed = ids(await walk(world.a, "/api/v1/sites", 3, more))
    made.sort(key=lambda r: (r["created_at"], r["id"]))  # ties go by id
    expected = [world.site, world.other_site, *(row["id"] for row in made)]
    # Oldest first; sites made while paging are newest, so the walk ends with them.
    assert listed == expected + late
    assert world.foreign_site not in listed


async def test_appliances_page_by_page(harness: Harness, world: World) -> None:
    made = [appliance_row(world.site, world.now + timedelta(seconds=n // 2)) for n in range(7)]
    await insert(harness, appliances, *made)
    added: list[str] = []

    async def more() -> None:
        row = appliance_row(world.site, world.now - timedelta(days=3))  # before the cursor
        added.append(row["id"])
        await insert(harness, appliances, row)

    listed = ids(await walk(world.a, f"/api/v1/sites/{world.site}/appliances", 2, more))
    made.sort(key=lambda r: (r["created_at"], r["id"]))  # ties go by id
    assert listed == [world.app["id"], *(row["id"] for row in made)]
    assert not set(added) & set(listed)
    everywhere = ids(await walk(world.a, "/api/v1/appliances", 3))
    assert sorted(everywhere) == sorted(
        [world.app["id"], world.sibling["id"], *(row["id"] for row in made), *added]
    )
    assert len(set(everywhere)) == len(everywhere)


async def test_evidence_page_by_page(harness: Harness, world: World) -> None:
    # Many bundles share a received_at: the appliance and bundle ids order them.
    made = [
        evidence_row(world.site, world.app["id"], world.now - timedelta(minutes=n // 4))
        for n in range(21)
    ]
    await insert(harness, evidence, *made)

    async def more() -> None:
        newer = world.now + timedelta(minutes=1)  # before the cursor: not in this walk
        await insert(harness, evidence, evidence_row(world.site, world.app["id"], newer))

    listed = keys(await walk(world.a, f"/api/v1/sites/{world.site}/evidence", 4, more))
    expected = sorted(
        made, key=lambda r: (-r["received_at"].timestamp(), r["appliance_id"], r["bundle_id"])
    )
    assert listed == [(r["appliance_id"], r["bundle_id"]) for r in expected]


async def test_escalations_and_alerts_page_by_page(harness: Harness, world: World) -> None:
    made = [
        escalation_row(world.site, world.app["id"], world.now - timedelta(minutes=n // 3))
        for n in range(11)
    ]
    await insert(harness, escalations, *made)

    async def more_escalations() -> None:
        newer = world.now + timedelta(minutes=1)  # before the cursor: not in this walk
        await insert(harness, escalations, escalation_row(world.site, world.app["id"], newer))

    listed = keys(await walk(world.a, "/api/v1/escalations", 3, more_escalations))
    expected = sorted(
        made, key=lambda r: (-r["received_at"].timestamp(), r["appliance_id"], r["escalation_id"])
    )
    assert listed == [(r["appliance_id"], r["escalation_id"]) for r in expected]

    await insert(harness, security_alerts, *(alert_row(world.site, world.app["id"], world.now)
                                            for _ in range(9)))  # fmt: skip

    async def more_alerts() -> None:
        await insert(harness, security_alerts, alert_row(world.site, world.app["id"], world.now))

    alerts = ids(await walk(world.a, "/api/v1/security-alerts", 4, more_alerts))
    assert alerts == sorted(alerts, reverse=True)
    assert len(alerts) == len(set(alerts)) == 9


async def test_partners_and_attachments_page_by_page(harness: Harness, world: World) -> None:
    for n in range(5):
        await harness.partner(f"MSP {n}")
    listed = await walk(world.admin, "/api/v1/partners", 2)
    names = [p["name"] for p in listed]
    assert names == ["Acme MSP", "Rival MSP", *(f"MSP {n}" for n in range(5))]

    made = [attachment_row(world.site, world.now - timedelta(minutes=n // 2)) for n in range(7)]
    await insert(harness, manual_evidence, *made)

    async def more() -> None:
        newer = world.now + timedelta(minutes=1)  # before the cursor: not in this walk
        await insert(harness, manual_evidence, attachment_row(world.site, newer))

    path = f"/api/v1/sites/{world.site}/manual-evidence"
    attached = ids(await walk(world.a, path, 3, more))
    expected = sorted(made, key=lambda r: (-r["attached_at"].timestamp(), r["id"]))
    assert attached == [r["id"] for r in expected]


async def test_more_than_500_rows_are_all_reachable(harness: Harness, world: World) -> None:
    bundles = [
        evidence_row(world.site, world.app["id"], world.now - timedelta(seconds=n // 50))
        for n in range(1234)
    ]
    await insert(harness, evidence, *bundles)
    await insert(harness, security_alerts, *(alert_row(world.site, world.app["id"], world.now)
                                            for _ in range(612)))  # fmt: skip
    path = f"/api/v1/sites/{world.site}/evidence"
    listed = keys(await walk(world.a, path, 500))
    assert sorted(listed) == sorted((r["appliance_id"], r["bundle_id"]) for r in bundles)
    # The default page is 100: a client that follows the cursor gets them all.
    first = await world.a.request("GET", path)
    assert (len(first.body["items"]), first.body["next_cursor"] is not None) == (100, True)
    alerts = ids(await walk(world.a, "/api/v1/security-alerts", 500))
    assert len(set(alerts)) == len(alerts) == 612


# --- filters -----------------------------------------------------------------------------


async def test_site_filters(harness: Harness, world: World) -> None:
    defaults = {"tier": "basic", "frameworks": ["hipaa", "soc2"]}
    assert (await world.a.request("PUT", "/api/v1/partner/defaults", defaults)).status == 200
    at = world.now
    own = site_row(world.a, "Dental 50% Off", at, frameworks=["gdpr", "hipaa"])
    only_gdpr = site_row(world.a, "dental_lab", at, frameworks=["gdpr"])
    empty = site_row(world.a, "Nothing", at, frameworks=[])
    inherits = site_row(world.a, "Inherits", at)  # SQL NULL: the partner's defaults
    gone = site_row(world.a, "Closed dental", at, decommissioned_at=at)
    foreign = site_row(world.b, "Rival dental", at, frameworks=["hipaa"])
    await insert(harness, sites, own, only_gdpr, empty, inherits, gone, foreign)
    # world.site and world.other_site were made with null frameworks (JSON null).
    path = "/api/v1/sites"

    async def names(**query: Any) -> set[str]:
        return {site["name"] for site in await page(world.a, path, **query)}

    inheriting = {"Clinic", "Branch", "Inherits"}
    assert await names() == inheriting | {"Dental 50% Off", "dental_lab", "Nothing"}
    assert await names(framework="hipaa") == inheriting | {"Dental 50% Off"}
    assert await names(framework="soc2") == inheriting
    assert await names(framework="gdpr") == {"Dental 50% Off", "dental_lab"}
    assert await names(framework="pci_dss") == set()
    assert await names(framework="nist") == set()
    assert await names(decommissioned="true") == {"Closed dental"}
    assert await names(decommissioned="false") == await names()
    assert await names(name="DENTAL") == {"Dental 50% Off", "dental_lab"}
    assert await names(name="dental", decommissioned="true") == {"Closed dental"}
    assert await names(name="50%") == {"Dental 50% Off"}
    assert await names(name="_") == {"dental_lab"}  # LIKE's wildcards are literal
    assert await names(name="n_a") == set()
    assert await names(name="rival") == set()
    assert await names(framework="hipaa", name="dental") == {"Dental 50% Off"}
    # Every listed site shows the framework in its effective configuration.
    for site in await page(world.a, path, framework="hipaa"):
        assert "hipaa" in site["effective"]["frameworks"]


async def test_appliance_status_and_filters(harness: Harness, world: World) -> None:
    now, at = world.now, world.now - timedelta(days=1)
    beat = {"version": "1", "log_size": 5, "queues": {}, "clock": "2026-11-25T00:00:00Z"}
    online = appliance_row(world.site, at, last_seen_at=now - timedelta(minutes=1), heartbeat=beat)
    offline = appliance_row(world.site, at, last_seen_at=now - timedelta(hours=1))
    synced = appliance_row(world.site, at)
    empty_sync = appliance_row(world.site, at)
    revoked = appliance_row(world.site, at, revoked_at=at, last_seen_at=now)
    gone = appliance_row(world.site, at, revoked_at=at, decommissioned_at=at, last_seen_at=now)
    await insert(harness, appliances, online, offline, synced, empty_sync, revoked, gone)
    log = {"generation": 1, "root": "ab" * 32, "nodes": [], "updated_at": now}
    await insert(
        harness,
        audit_logs,
        {**log, "appliance_id": synced["id"], "size": 3},
        {**log, "appliance_id": empty_sync["id"], "size": 0},  # an empty log is not a sign of life
    )
    path = f"/api/v1/sites/{world.site}/appliances"
    listed = {item["id"]: item for item in await page(world.a, path)}
    assert {key: item["status"] for key, item in listed.items()} == {
        world.app["id"]: "never-seen",
        online["id"]: "online",
        offline["id"]: "offline",
        synced["id"]: "online",
        empty_sync["id"]: "never-seen",
        revoked["id"]: "revoked",
    }
    assert (listed[online["id"]]["log_size"], listed[online["id"]]["witnessed_size"]) == (5, 0)
    assert (listed[synced["id"]]["log_size"], listed[synced["id"]]["witnessed_size"]) == (None, 3)
    assert listed[synced["id"]]["witnessed_root"] == "ab" * 32

    async def status_of(where: str, **query: Any) -> dict[str, str]:
        return {item["id"]: item["status"] for item in await page(world.a, where, **query)}

    assert await status_of(path, decommissioned="true") == {gone["id"]: "decommissioned"}
    assert await status_of(path, decommissioned="false") == await status_of(path)
    # The status moves with the clock: an hour on, nobody is online.
    harness.clock.advance(timedelta(hours=1))
    assert "online" not in (await status_of(path)).values()

    everywhere = await status_of("/api/v1/appliances")
    assert set(everywhere) == {*listed, world.sibling["id"]}
    assert set(await status_of("/api/v1/appliances", site_id=world.other_site)) == {
        world.sibling["id"]
    }
    # Another partner's site: an empty page through the filter, not found by path.
    assert await status_of("/api/v1/appliances", site_id=world.foreign_site) == {}
    assert await status_of("/api/v1/appliances", site_id="site-none") == {}
    reply = await world.a.request("GET", f"/api/v1/sites/{world.foreign_site}/appliances")
    assert (reply.status, reply.code) == (404, "not-found")


async def test_evidence_filters(harness: Harness, world: World) -> None:
    second = appliance_row(world.site, world.now)
    await insert(harness, appliances, second)
    t0 = world.now - timedelta(hours=10)

    def bundle(n: int, appliance: Row, **values: Any) -> Row:
        return evidence_row(world.site, appliance["id"], t0 + timedelta(hours=n), **values)

    rows = [
        bundle(0, world.app),
        bundle(1, world.app, check_id="disk_encryption", result="fail",
               controls={"soc2": ["CC6.1"]}),
        bundle(2, second, result="error", in_log=None),
        bundle(3, second, check_id="disk_encryption", in_log=False,
               controls={"soc2": ["CC6.1"], "hipaa": ["164.312(a)(2)(iv)"]}),
        bundle(4, world.app, result="not_applicable", controls={}),
    ]  # fmt: skip
    await insert(harness, evidence, *rows)
    await insert(harness, evidence, evidence_row(world.foreign_site, world.foreign["id"], t0))
    path = f"/api/v1/sites/{world.site}/evidence"

    async def found(**query: Any) -> list[int]:
        listed = [item["id"] for item in await page(world.a, path, **query)]
        return sorted(n for n, row in enumerate(rows) if row["bundle_id"] in listed)

    assert await found() == [0, 1, 2, 3, 4]
    assert await found(appliance_id=second["id"]) == [2, 3]
    assert await found(appliance_id=world.foreign["id"]) == []
    assert await found(check_id="disk_encryption") == [1, 3]
    assert await found(result="pass") == [0, 3]
    assert await found(result="fail") == [1]
    assert await found(result="error") == [2]
    assert await found(result="not_applicable") == [4]
    assert await found(framework="hipaa") == [0, 2, 3]
    assert await found(framework="soc2") == [1, 3]
    assert await found(framework="gdpr") == []
    moment, until = format_time(t0 + timedelta(hours=1)), format_time(t0 + timedelta(hours=3))
    assert await found(**{"from": moment}) == [1, 2, 3, 4]
    assert await found(to=until) == [0, 1, 2]  # to is exclusive
    assert await found(**{"from": moment, "to": until}) == [1, 2]
    assert await found(in_log="true") == [0, 1, 4]
    assert await found(in_log="false") == [3]
    assert await found(check_id="disk_encryption", framework="hipaa", in_log="false") == [3]
    reply = await world.a.request("GET", f"/api/v1/sites/{world.foreign_site}/evidence")
    assert (reply.status, reply.code) == (404, "not-found")


async def test_escalation_filters(harness: Harness, world: World) -> None:
    t0 = world.now - timedelta(hours=5)
    rows = [
        escalation_row(world.site, world.app["id"], t0),
        escalation_row(world.site, world.app["id"], t0 + timedelta(hours=1), severity="critical",
                       acknowledged_at=world.now, acknowledged_by="partner:x/key:y"),
        escalation_row(world.other_site, world.sibling["id"], t0 + timedelta(hours=2),
                       severity="low"),
        escalation_row(world.foreign_site, world.foreign["id"], t0 + timedelta(hours=1)),
    ]  # fmt: skip
    await insert(harness, escalations, *rows)

    async def found(client: KeyClient = world.a, **query: Any) -> list[int]:
        listed = keys(await page(client, "/api/v1/escalations", **query))
        return sorted(
            n for n, row in enumerate(rows) if (row["appliance_id"], row["escalation_id"]) in listed
        )

    assert await found() == [0, 1, 2]
    assert await found(world.b) == [3]
    assert await found(site_id=world.other_site) == [2]
    assert await found(site_id=world.foreign_site) == []
    assert await found(appliance_id=world.app["id"]) == [0, 1]
    assert await found(appliance_id=world.foreign["id"]) == []
    assert await found(world.b, appliance_id=world.app["id"]) == []
    assert await found(world.b, site_id=world.site) == []
    assert await found(severity="critical") == [1]
    assert await found(severity="medium") == []
    assert await found(open="true") == [0, 2]
    assert await found(open="false") == [1]
    moment = format_time(t0 + timedelta(hours=1))
    assert await found(**{"from": moment}) == [1, 2]
    assert await found(to=moment) == [0]
    assert await found(site_id=world.site, open="true", severity="high") == [0]


async def test_alert_filters(harness: Harness, world: World) -> None:
    t0 = world.now - timedelta(hours=5)
    rows = [
        alert_row(world.site, world.app["id"], t0),
        alert_row(world.site, world.app["id"], t0 + timedelta(hours=1), code="evidence-not-in-log"),
        alert_row(world.other_site, world.sibling["id"], t0 + timedelta(hours=2)),
        alert_row(world.foreign_site, world.foreign["id"], t0),
    ]
    for row in rows:  # one at a time: ids follow the order
        await insert(harness, security_alerts, row)

    async def found(client: KeyClient = world.a, **query: Any) -> list[int]:
        listed = ids(await page(client, "/api/v1/security-alerts", **query))
        assert listed == sorted(listed, reverse=True)
        return sorted(n for n, row in enumerate(rows) if (n + 1) in listed)

    assert await found() == [0, 1, 2]
    assert await found(world.b) == [3]
    assert await found(site_id=world.site) == [0, 1]
    assert await found(site_id=world.foreign_site) == []
    assert await found(world.b, site_id=world.site) == []
    assert await found(appliance_id=world.sibling["id"]) == [2]
    assert await found(world.b, appliance_id=world.sibling["id"]) == []
    assert await found(code="evidence-not-in-log") == [1]
    assert await found(code="nothing") == []
    moment = format_time(t0 + timedelta(hours=1))
    assert await found(**{"from": moment}) == [1, 2]
    assert await found(to=moment) == [0]


async def test_a_partner_sees_none_of_another_partners_rows(harness: Harness, world: World) -> None:
    """Partner B asks for A's rows through every filter naming them: empty
    pages or not found, and none of A's ids in any answer."""
    at = world.now
    await insert(harness, evidence, evidence_row(world.site, world.app["id"], at))
    await insert(harness, escalations, escalation_row(world.site, world.app["id"], at))
    await insert(harness, security_alerts, alert_row(world.site, world.app["id"], at))
    await insert(harness, manual_evidence, attachment_row(world.site, at))
    secrets_of_a = [world.site, world.other_site, world.app["id"], world.sibling["id"]]
    lists = [
        ("/api/v1/sites", {"name": "clinic"}),
        ("/api/v1/sites", {"framework": "hipaa"}),
        ("/api/v1/appliances", {"site_id": world.site}),
        ("/api/v1/escalations", {"site_id": world.site}),
        ("/api/v1/escalations", {"appliance_id": world.app["id"]}),
        ("/api/v1/security-alerts", {"site_id": world.site}),
        ("/api/v1/security-alerts", {"appliance_id": world.app["id"]}),
    ]
    for path, query in lists:
        answer = await world.b.request("GET", with_query(path, **query))
        assert answer.status == 200, (path, answer.body)
        assert answer.body["items"] == [] or path == "/api/v1/sites", (path, query)
        assert not [i for i in secrets_of_a if i in json.dumps(answer.body)], (path, query)
    for path in ("appliances", "evidence", "manual-evidence"):
        answer = await world.b.request(
            "GET", f"/api/v1/sites/{world.site}/{path}?appliance_id={world.app['id']}"
            if path == "evidence" else f"/api/v1/sites/{world.site}/{path}"
        )  # fmt: skip
        assert (answer.status, answer.code) == (404, "not-found"), path
    # ... while A sees them.
    assert len(await page(world.a, "/api/v1/escalations", site_id=world.site)) == 1
    assert len(await page(world.a, f"/api/v1/sites/{world.site}/manual-evidence")) == 1


# --- bad queries -------------------------------------------------------------------------

LISTS = [
    "/api/v1/sites",
    "/api/v1/sites/{site}/appliances",
    "/api/v1/appliances",
    "/api/v1/sites/{site}/evidence",
    "/api/v1/sites/{site}/manual-evidence",
    "/api/v1/escalations",
    "/api/v1/security-alerts",
    "/api/v1/partners",
]

BAD = [
    pytest.param("limit=0", id="limit-zero"),
    pytest.param("limit=501", id="limit-over-500"),
    pytest.param("limit=ten", id="limit-not-a-number"),
    pytest.param("limit=5&limit=6", id="limit-twice"),
    pytest.param("colour=red", id="unknown-parameter"),
    pytest.param("cursor=!!!", id="cursor-not-base64url"),
    pytest.param("cursor=abc", id="cursor-garbage"),
    pytest.param("cursor=" + "A" * 600, id="cursor-too-long"),
    pytest.param(
        "cursor=" + base64.urlsafe_b64encode(b'{"a": 1}').decode().rstrip("="),
        id="cursor-not-a-list",
    ),
]


async def _rows_for_two_pages(harness: Harness, world: World) -> None:
    at = world.now
    await insert(harness, sites, *(site_row(world.a, f"S{n}", at) for n in range(3)))
    await insert(harness, appliances, *(appliance_row(world.site, at) for _ in range(3)))
    await insert(harness, evidence, *(evidence_row(world.site, world.app["id"], at)
                                      for _ in range(3)))  # fmt: skip
    await insert(harness, escalations, *(escalation_row(world.site, world.app["id"], at)
                                         for _ in range(3)))  # fmt: skip
    await insert(harness, security_alerts, *(alert_row(world.site, world.app["id"], at)
                                             for _ in range(3)))  # fmt: skip
    await insert(harness, manual_evidence, *(attachment_row(world.site, at) for _ in range(3)))


def _client(world: World, path: str) -> KeyClient:
    return world.admin if path == "/api/v1/partners" else world.a


@pytest.mark.parametrize("query", BAD)
@pytest.mark.parametrize("path", LISTS)
async def test_bad_queries_are_refused(
    harness: Harness, world: World, path: str, query: str
) -> None:
    where = path.format(site=world.site)
    reply = await _client(world, path).request("GET", f"{where}?{query}")
    assert (reply.status, reply.code) == (400, "malformed-query"), reply.body


@pytest.mark.parametrize(
    ("path", "query"),
    [
        pytest.param("/api/v1/escalations", "open=yes", id="open-yes"),
        pytest.param("/api/v1/escalations", "severity=urgent", id="unknown-severity"),
        pytest.param("/api/v1/escalations", "from=yesterday", id="from-not-a-time"),
        pytest.param("/api/v1/escalations", "to=2026-11-25T00:00:00", id="to-without-zone"),
        pytest.param("/api/v1/sites", "decommissioned=maybe", id="decommissioned-maybe"),
        pytest.param("/api/v1/sites", "name=a%00b", id="name-with-nul"),
        pytest.param(
            "/api/v1/sites/{site}/appliances", "decommissioned=1", id="decommissioned-one"
        ),
        pytest.param("/api/v1/appliances", "site_id=" + "s" * 65, id="site-id-too-long"),
        pytest.param("/api/v1/sites/{site}/evidence", "result=passed", id="unknown-result"),
        pytest.param("/api/v1/sites/{site}/evidence", "in_log=1", id="in-log-one"),
        pytest.param("/api/v1/security-alerts", "from=2026-13-01T00:00:00Z", id="from-month-13"),
    ],
)
async def test_bad_filters_are_refused(
    harness: Harness, world: World, path: str, query: str
) -> None:
    reply = await world.a.request("GET", f"{path.format(site=world.site)}?{query}")
    assert (reply.status, reply.code) == (400, "malformed-query"), reply.body


def _recode(cursor: str, change: Callable[[list[Any]], list[Any]]) -> str:
    parts = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    text = json.dumps(change(parts)).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


# A filter each list accepts, to make a cursor of "another filter".
OTHER_FILTER = {
    "/api/v1/sites": "name=s",
    "/api/v1/sites/{site}/appliances": "decommissioned=true",
    "/api/v1/appliances": "decommissioned=true",
    "/api/v1/sites/{site}/evidence": "result=pass",
    "/api/v1/escalations": "severity=high",
    "/api/v1/security-alerts": "code=unknown-key",
}


@pytest.mark.parametrize("path", LISTS)
async def test_cursors_only_work_where_they_were_issued(
    harness: Harness, world: World, path: str
) -> None:
    await _rows_for_two_pages(harness, world)
    client = _client(world, path)
    where = path.format(site=world.site)
    first = await client.request("GET", f"{where}?limit=1")
    assert first.status == 200, first.body
    cursor = first.body["next_cursor"]
    assert cursor is not None
    second = await client.request("GET", f"{where}?limit=1&cursor={cursor}")
    assert second.status == 200, second.body
    assert second.body["items"] != first.body["items"]

    def refused(reply: Any) -> bool:
        return (reply.status, reply.code) == (400, "malformed-query")

    if path in OTHER_FILTER:
        other = await client.request("GET", f"{where}?{OTHER_FILTER[path]}&cursor={cursor}")
        assert refused(other), other.body
    wrong = [
        _recode(cursor, lambda p: [p[0], *[[v] for v in p[1:]]]),  # lists where values go
        _recode(cursor, lambda p: [p[0], *[True for _ in p[1:]]]),  # booleans
        _recode(cursor, lambda p: [p[0], *[{"t": "yesterday"} for _ in p[1:]]]),  # bad times
        _recode(cursor, lambda p: [p[0], *[2**70 for _ in p[1:]]]),  # numbers past 63 bits
        _recode(cursor, lambda p: p[:-1]),  # a value short
        _recode(cursor, lambda p: ["0" * 16, *p[1:]]),  # another query's fingerprint
    ]
    for bad in wrong:
        reply = await client.request("GET", f"{where}?cursor={bad}")
        assert refused(reply), (bad, reply.body)


# --- acknowledging with a note -------------------------------------------------------------


async def test_acknowledgement_notes(harness: Harness, world: World) -> None:
    rows = [escalation_row(world.site, world.app["id"], world.now) for _ in range(3)]
    await insert(harness, escalations, *rows)
    noted, bare, empty = (f"/api/v1/escalations/{world.app['id']}/{r['escalation_id']}/acknowledge"
                          for r in rows)  # fmt: skip
    actor = f"partner:{world.a.partner_id}/key:{world.a.key[:12]}"

    note = "Called the practice: the backup disk was full, replaced 'today'."
    first = await world.a.request("POST", noted, {"note": note})
    assert first.status == 200, first.body
    assert (first.body["acknowledged_by"], first.body["acknowledged_note"]) == (actor, note)
    again = await world.a.request("POST", noted, {"note": "something else"})
    assert again.body == first.body  # the first acknowledgement stands
    plain = await world.a.request("POST", bare)
    assert (plain.status, plain.body["acknowledged_note"]) == (200, None)
    assert plain.body["acknowledged_by"] == actor
    assert (await world.a.request("POST", empty, {})).body["acknowledged_note"] is None

    listed = {e["id"]: e for e in await page(world.a, "/api/v1/escalations", open="false")}
    assert listed[rows[0]["escalation_id"]] == first.body
    async with harness.engine.connect() as connection:
        raws = (
            await connection.execute(
                sa.select(central_log_entries.c.raw)
                .where(central_log_entries.c.kind == "escalation.acknowledged")
                .order_by(central_log_entries.c.idx)
            )
        ).scalars()
        entries = [json.loads(raw) for raw in raws]
    assert [e["data"].get("note") for e in entries] == [note, None, None]
    assert [e["data"]["escalation_id"] for e in entries] == [r["escalation_id"] for r in rows]
    assert {e["actor"] for e in entries} == {actor}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({"note": "x" * 2001}, "malformed-document", id="note-too-long"),
        pytest.param({"note": "line\nbreak"}, "malformed-document", id="note-with-newline"),
        pytest.param({"note": 7}, "malformed-document", id="note-not-text"),
        pytest.param({"note": "ok", "by": "me"}, "malformed-document", id="extra-member"),
        pytest.param([], "malformed-document", id="not-an-object"),
    ],
)
async def test_bad_acknowledgement_notes(
    harness: Harness, world: World, body: Any, code: str
) -> None:
    row = escalation_row(world.site, world.app["id"], world.now)
    await insert(harness, escalations, row)
    path = f"/api/v1/escalations/{world.app['id']}/{row['escalation_id']}/acknowledge"
    reply = await world.a.request("POST", path, body)
    assert (reply.status, reply.code) == (400, code), reply.body
    (still,) = await page(world.a, "/api/v1/escalations", open="true")
    assert still["acknowledged_at"] is None
    longest = await world.a.request("POST", path, {"note": "x" * 2000})
    assert (longest.status, longest.body["acknowledged_note"]) == (200, "x" * 2000)
