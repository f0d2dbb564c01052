"""The appliance summary: counts over every appliance the list holds, not
one page of it, each status exactly as the list gives it; the same filters
and the same partner scoping as the list; bad queries refused. Rows are
inserted straight into the database, as in the list tests."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from msp_central.db.tables import appliances, audit_logs, certificates, evidence_heads
from msp_central.routes.partners import CERTIFICATE_EXPIRING_DAYS
from tests.central.support import Harness
from tests.central.test_lists import Row, World, appliance_row, insert, walk, with_query, world

__all__ = ["world"]  # the fixture, shared with the list tests

SUMMARY = "/api/v1/appliances/summary"
ZERO = {
    "total": 0,
    "online": 0,
    "offline": 0,
    "never_seen": 0,
    "revoked": 0,
    "decommissioned": 0,
    "certificate_expiring": 0,
    "with_failing_checks": 0,
}


def certificate_row(appliance: Row, serial: str, ends_in: timedelta, now: Any) -> Row:
    return {
        "serial": serial,
        "appliance_id": appliance["id"],
        "key_id": "k" * 16,
        "subject_key": "0" * 64,
        "envelope": "{}",
        "not_before": now - timedelta(days=30),
        "not_after": now + ends_in,
        "issued_at": now - timedelta(days=30),
        "purpose": "enroll",
    }


def head_row(appliance: Row, check_id: str, result: str, now: Any) -> Row:
    return {
        "appliance_id": appliance["id"],
        "check_id": check_id,
        "site_id": appliance["site_id"],
        "bundle_id": f"ev-{appliance['id']}-{check_id}",
        "result": result,
        "controls": {},
        "collected_at": now,
        "log_generation": 1,
        "log_index": 1,
        "signed_after_expiry": False,
        "in_log": True,
        "reason": None,
    }


async def summary(world: World, **query: Any) -> dict[str, Any]:
    reply = await world.a.request("GET", with_query(SUMMARY, **query))
    assert reply.status == 200, reply.body
    assert reply.body["expiring_within_days"] == CERTIFICATE_EXPIRING_DAYS
    counts: dict[str, Any] = reply.body
    return {key: counts[key] for key in ZERO}


def tally(items: list[Row], now: Any) -> dict[str, int]:
    """The counts as the list's items give them: each item's status, its
    certificate if in service, whether any check fails."""
    statuses = Counter(item["status"] for item in items)
    soon = now + timedelta(days=CERTIFICATE_EXPIRING_DAYS)
    return {
        "total": len(items),
        "online": statuses["online"],
        "offline": statuses["offline"],
        "never_seen": statuses["never-seen"],
        "revoked": statuses["revoked"],
        "decommissioned": statuses["decommissioned"],
        "certificate_expiring": sum(
            item["status"] not in ("revoked", "decommissioned")
            and item["certificate_not_after"] is not None
            and datetime.fromisoformat(item["certificate_not_after"]) < soon
            for item in items
        ),
        "with_failing_checks": sum(bool(item["failing_checks"]) for item in items),
    }


async def fleet(harness: Harness, world: World) -> dict[str, Row]:
    """Partner A's first site: one appliance of each kind, beyond one page."""
    now, at = world.now, world.now - timedelta(days=1)
    ago = {"last_seen_at": now - timedelta(minutes=5)}
    made = {
        # Five minutes silent: online at the default interval (5 minutes,
        # three beats) and at its own 2 minutes, offline at its own 10 seconds.
        "online": appliance_row(world.site, at, **ago),
        "offline": appliance_row(
            world.site, at, **ago, heartbeat={"heartbeat_interval_seconds": 10}
        ),
        "slow": appliance_row(world.site, at, **ago, heartbeat={"heartbeat_interval_seconds": 120}),
        "synced": appliance_row(world.site, at),
        "expiring": appliance_row(world.site, at, **ago),
        "expired": appliance_row(world.site, at, **ago),
        "lasting": appliance_row(world.site, at, **ago),
        "revoked": appliance_row(world.site, at, revoked_at=at, last_seen_at=now),
        "gone": appliance_row(
            world.site, at, revoked_at=at, decommissioned_at=at, last_seen_at=now
        ),
        "failing": appliance_row(world.site, at, **ago),
        "erring": appliance_row(world.site, at),
        "passing": appliance_row(world.site, at),
    }
    for name in ("expiring", "expired", "lasting", "revoked", "gone"):
        made[name]["current_serial"] = f"serial-{name}"
    await insert(harness, appliances, *made.values())
    ends = {
        "expiring": timedelta(days=CERTIFICATE_EXPIRING_DAYS - 1),
        "expired": timedelta(days=-1),
        "lasting": timedelta(days=CERTIFICATE_EXPIRING_DAYS + 1),
        "revoked": timedelta(days=1),  # revoked: its end no longer matters
        "gone": timedelta(days=1),
    }
    await insert(
        harness,
        certificates,
        *(certificate_row(made[n], f"serial-{n}", end, now) for n, end in ends.items()),
    )
    log = {"generation": 1, "root": "ab" * 32, "nodes": [], "updated_at": now}
    await insert(harness, audit_logs, {**log, "appliance_id": made["synced"]["id"], "size": 3})
    await insert(
        harness,
        evidence_heads,
        head_row(made["failing"], "backup", "fail", now),
        head_row(made["failing"], "time_sync", "pass", now),
        head_row(made["erring"], "backup", "error", now),
        head_row(made["passing"], "backup", "pass", now),
        head_row(made["gone"], "backup", "fail", now),
    )
    return made


async def test_the_summary_counts_every_appliance_as_the_list_does(
    harness: Harness, world: World
) -> None:
    await fleet(harness, world)
    listed = await walk(world.a, f"/api/v1/sites/{world.site}/appliances", 4)
    counted = await summary(world, site_id=world.site)
    assert counted == tally(listed, world.now)
    # world.app (never seen) and eleven in service; the decommissioned one
    # is counted only when asked for, as it is listed.
    assert counted == {
        "total": 12,
        "online": 7,  # online, slow, synced, expiring, expired, lasting, failing
        "offline": 1,
        "never_seen": 3,  # world.app, erring, passing
        "revoked": 1,
        "decommissioned": 0,
        "certificate_expiring": 2,  # expiring, expired
        "with_failing_checks": 2,  # failing, erring
    }
    gone = await summary(world, site_id=world.site, decommissioned="true")
    assert gone == {**ZERO, "total": 1, "decommissioned": 1, "with_failing_checks": 1}
    assert await summary(world, site_id=world.site, decommissioned="false") == counted

    # All the partner's sites: the sibling (never seen) too.
    everywhere = await summary(world)
    assert everywhere == tally(await walk(world.a, "/api/v1/appliances", 5), world.now)
    assert everywhere == {**counted, "total": 13, "never_seen": 4}

    # The status moves with the clock: an hour on, nobody is online.
    harness.clock.advance(timedelta(hours=1))
    later = await summary(world, site_id=world.site)
    assert later["online"] == 0
    assert later["offline"] == 8
    assert later == tally(
        await walk(world.a, f"/api/v1/sites/{world.site}/appliances", 4), harness.clock()
    )


async def test_the_summary_is_scoped_like_the_list(harness: Harness, world: World) -> None:
    await fleet(harness, world)
    assert await summary(world, site_id=world.other_site) == {**ZERO, "total": 1, "never_seen": 1}
    # Another partner's site, or none: nothing, as the list gives nothing.
    assert await summary(world, site_id=world.foreign_site) == ZERO
    assert await summary(world, site_id="site-none") == ZERO
    # Partner B counts only its own appliance.
    reply = await world.b.request("GET", SUMMARY)
    assert reply.status == 200, reply.body
    assert (reply.body["total"], reply.body["never_seen"]) == (1, 1)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("?decommissioned=yes", id="boolean-not-true-or-false"),
        pytest.param("?limit=10", id="not-a-page"),
        pytest.param("?cursor=abc", id="no-cursor"),
        pytest.param("?status=online", id="unknown-filter"),
        pytest.param("?site_id=a&site_id=b", id="site-twice"),
        pytest.param("?site_id=" + "x" * 65, id="site-too-long"),
        pytest.param("?site_id=%0A", id="site-with-control"),
    ],
)
async def test_bad_queries_are_refused(harness: Harness, world: World, query: str) -> None:
    reply = await world.a.request("GET", SUMMARY + query)
    assert (reply.status, reply.code) == (400, "malformed-query"), reply.body
